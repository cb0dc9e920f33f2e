//! Child processes that end with their owner: output to a log file, killed (with their
//! process group) on drop; and the waits and ports the harness needs.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `ok` every 50 ms until it holds; an error naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A child process with its log file.
pub(super) struct Proc {
    child: Option<Child>,
    pub(super) log: PathBuf,
}

impl Proc {
    pub(super) fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub(super) fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub(super) fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub(super) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout`; returns how long it took to exit.
    pub(super) fn stop(&mut self, timeout: Duration) -> Result<Duration> {
        let Some(mut c) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let start = Instant::now();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM)?;
        while start.elapsed() < timeout {
            if c.try_wait()?.is_some() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("did not exit within {timeout:?} of SIGTERM")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The mount points below `dir`, from this process's mount table.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    mounts_in(dir).into_iter().map(|m| m.point).collect()
}

/// One line of `/proc/self/mountinfo`.
struct MountInfo {
    point: String,
    fstype: String,
    source: String,
}

/// The mounts below `dir`, as `/proc/self/mountinfo` lists them.
fn mounts_in(dir: &Path) -> Vec<MountInfo> {
    let prefix = format!("{}/", dir.display());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut fs = right.split(' ');
            Some(MountInfo {
                point: point.to_string(),
                fstype: fs.next()?.to_string(),
                source: fs.next()?.to_string(),
            })
        })
        .filter(|m| m.point.starts_with(&prefix))
        .collect()
}

/// The EROFS mounts below `dir`: (mount point, source), as `/proc/self/mountinfo`
/// shows them.
pub fn erofs_mounts_below(dir: &Path) -> Vec<(String, String)> {
    mounts_in(dir)
        .into_iter()
        .filter(|m| m.fstype == "erofs")
        .map(|m| (m.point, m.source))
        .collect()
}

/// The loop devices whose backing file lies below `dir`: (`/dev/loopN`, file).
pub fn loop_devices_below(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let device = Path::new("/dev").join(e.file_name());
            let file = ringio::loopdev::backing_file(&device)?;
            file.starts_with(dir)
                .then(|| (device.display().to_string(), file.display().to_string()))
        })
        .collect()
}

/// Detaches every mount below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let mut points = mounts_below(dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs `f` until it answers with anything but gRPC's `unavailable`, at most `tries`
/// times, `pause` apart: what a user does while containerd redials a restarted
/// snapshotter (it backs off between attempts). The last answer is returned.
pub fn retry_unavailable<T>(
    tries: usize,
    pause: Duration,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut last = None;
    for _ in 0..tries.max(1) {
        match f() {
            Err(e) if e.to_string().contains("unavailable") => {
                last = Some(e);
                std::thread::sleep(pause);
            }
            answer => return answer,
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("still unavailable")))
}
