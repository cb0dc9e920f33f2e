//! A network namespace of the test's own, joined to the host by a veth pair whose
//! registry side is rate-shaped with `tbf` (this kernel has no `netem`).

use std::process::Command;

use anyhow::{bail, Result};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The namespace `name` with `10.<net>.0.2/30` inside and `10.<net>.0.1/30` on the host;
/// removed (with its veth pair) on drop.
pub struct ShapedLink {
    /// The namespace.
    pub netns: String,
    /// The address inside it.
    pub inner: String,
    dev: String,
}

impl ShapedLink {
    /// Creates the namespace and the link, unshaped.
    pub fn create(name: &str, net: u8) -> Result<ShapedLink> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let (host, dev) = (format!("{name}-h"), format!("{name}-n"));
        let link = ShapedLink {
            netns: name.to_string(),
            inner: format!("10.{net}.0.2"),
            dev: dev.clone(),
        };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &dev])?;
        ip(&["link", "set", &dev, "netns", name])?;
        ip(&["addr", "add", &format!("10.{net}.0.1/30"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        let ns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", name, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        ns(&["addr", "add", &format!("10.{net}.0.2/30"), "dev", &dev])?;
        ns(&["link", "set", &dev, "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        Ok(link)
    }

    /// Shapes what leaves the namespace (the registry's answers) to `rate` (`tc`
    /// syntax: `100mbit`, `1gbit`); `None` removes the shaping.
    pub fn shape(&self, rate: Option<&str>) -> Result<()> {
        let tc = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "tc"])
                .args(args)
                .output()?;
            if !out.status.success() {
                bail!(
                    "tc {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        let _ = tc(&["qdisc", "del", "dev", &self.dev, "root"]);
        if let Some(r) = rate {
            // a bucket of 1 ms at the rate (at least 64 KiB), 50 ms of queue
            tc(&[
                "qdisc", "add", "dev", &self.dev, "root", "tbf", "rate", r, "burst", "256kb",
                "latency", "50ms",
            ])?;
        }
        Ok(())
    }

    /// Bytes sent out of the namespace so far.
    pub fn tx_bytes(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "cat"])
            .arg(format!("/sys/class/net/{}/statistics/tx_bytes", self.dev))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &format!("{}-h", self.netns)]);
    }
}
