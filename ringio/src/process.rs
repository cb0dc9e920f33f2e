//! Waiting for a child process together with what it used, for the benchmarks that
//! report a tool's peak memory (`wait4(2)`, which `std` does not expose).

// wait4 has no wrapper in `nix`; each block names its invariant.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

/// How a child process ended, and its peak resident set.
#[derive(Debug, Clone, Copy)]
pub struct Exited {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its peak resident set size, in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
}

/// Waits for `child`, which nothing has waited for yet, and returns its exit status and
/// peak resident set size.
pub fn wait_with_peak_rss(child: Child) -> io::Result<Exited> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is a plain C struct of integers, for which all zero bytes is a
    // valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are live locals that outlive the call, of the
        // types wait4(2) writes; `pid` is our own child, not reaped yet (we own `child`).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // reaped: dropping the handle neither waits nor signals
    drop(child);
    Ok(Exited {
        status: ExitStatus::from_raw(status),
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_and_the_peak_of_what_the_child_touched() {
        let small = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let small = wait_with_peak_rss(small).unwrap();
        assert_eq!(small.status.code(), Some(3));
        assert!(small.max_rss_kib > 0);
        // dd reads 64 MiB from /dev/zero into one buffer: every page of it touched
        let big = std::process::Command::new("dd")
            .args([
                "if=/dev/zero",
                "of=/dev/null",
                "bs=64M",
                "count=1",
                "status=none",
            ])
            .spawn()
            .unwrap();
        let big = wait_with_peak_rss(big).unwrap();
        assert!(big.status.success());
        assert!(big.max_rss_kib >= 64 << 10, "{big:?}");
        assert!(big.max_rss_kib < (64 << 10) + (32 << 10), "{big:?}");
    }
}
