//! A local OCI registry (Debian's `docker-registry`) on a free port of 127.0.0.1, its
//! storage under the test's directory.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use super::*;

/// Debian's `docker-registry` (Distribution 2.8) on a free loopback port.
pub struct Registry {
    proc: Proc,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Registry {
    /// Starts a registry storing under `dir`.
    pub fn start(dir: &Path) -> Result<Registry> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        Self::start_at(dir, &addr, None)
    }

    /// Starts a registry storing under `dir`, serving `addr`, inside the network
    /// namespace `netns` when given (`ip netns exec`).
    pub fn start_at(dir: &Path, addr: &str, netns: Option<&str>) -> Result<Registry> {
        fs::create_dir_all(dir.join("storage"))?;
        let addr = addr.to_string();
        let cfg = dir.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("storage").display()
            ),
        )?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let mut proc = Proc::spawn(cmd.arg("serve").arg(&cfg), &dir.join("registry.log"))?;
        let url = format!("http://{addr}/v2/");
        let up = wait_until("the registry", Duration::from_secs(15), || {
            ureq::get(&url).call().is_ok()
        });
        if up.is_err() || !proc.alive() {
            bail!("registry did not start:\n{}", proc.log_tail());
        }
        Ok(Registry { proc, addr })
    }

    /// A second registry over the storage of `of` (read-only use), serving HTTPS on a
    /// free loopback port with a certificate made for 127.0.0.1 by a CA of its own,
    /// whose certificate (PEM) it returns too; its files live under `dir`.
    pub fn start_tls_mirror(of: &Path, dir: &Path) -> Result<(Registry, std::path::PathBuf)> {
        fs::create_dir_all(dir)?;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            if !out.status.success() {
                bail!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cas-test CA",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ])?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let cfg = dir.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}, tls: {{certificate: {}, key: {}}}}}\n",
                of.join("storage").display(),
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            ),
        )?;
        let mut proc = Proc::spawn(
            Command::new("docker-registry").arg("serve").arg(&cfg),
            &dir.join("registry.log"),
        )?;
        let up = wait_until("the TLS registry", Duration::from_secs(15), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        if up.is_err() || !proc.alive() {
            bail!("TLS registry did not start:\n{}", proc.log_tail());
        }
        Ok((Registry { proc, addr }, dir.join("ca.pem")))
    }

    /// The log so far (for failure messages).
    pub fn log(&self) -> String {
        self.proc.log_tail()
    }
}
