//! Readings of the machine: page cache, process memory and CPU, load, sectors a device
//! wrote.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// `sync`, then drop the page cache, dentries and inodes.
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches (needs root)")
}

pub(super) fn status_kib(pid: i32, key: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

pub(super) fn hwm_kib(pid: i32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

/// utime + stime of a process, seconds.
pub(super) fn cpu_secs(pid: i32) -> Result<f64> {
    let (user, system) = cpu_times(Path::new(&format!("/proc/{pid}/stat")))?;
    Ok(user + system)
}

/// (utime, stime) in seconds from a `/proc/…/stat` file (a process's or a thread's).
pub fn cpu_times(stat: &Path) -> Result<(f64, f64)> {
    let s = fs::read_to_string(stat)?;
    let rest = &s[s.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(f.get(i).context("short stat")?.parse::<u64>()? as f64 / 100.0)
    };
    Ok((ticks(11)?, ticks(12)?))
}

pub(super) fn load1() -> Result<f64> {
    Ok(fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()?)
}

pub(super) fn sectors_written(dev: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/sys/block/{dev}/stat"))?;
    let f: Vec<&str> = s.split_whitespace().collect();
    Ok(f.get(6).context("short block stat")?.parse()?)
}

pub(super) fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(super) fn status_like(path: &str, key: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
