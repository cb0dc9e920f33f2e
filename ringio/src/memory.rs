//! Handing the allocator's free memory back to the kernel once a large piece of work is
//! done.
//!
//! An apply holds up to tens of MiB of file data in flight (buffers of up to 16 MiB, on
//! several threads). glibc serves such buffers from `mmap` at first, then raises its
//! `mmap` threshold to the largest buffer freed (up to 32 MiB) and serves the next ones
//! from its per-thread arenas, which it shrinks only from their top. Once the apply is
//! over, that memory is free in the allocator but still resident: a daemon that pulled a
//! few images stays at the peak of its largest apply. [`release_free_memory`] asks glibc
//! to return the whole free pages inside every arena (`malloc_trim(0)`; a thread
//! arena's top stays, which is one reason for [`limit_arenas`]), which costs a walk
//! of the arenas' free lists, not a system call per buffer as a fixed low threshold would
//! on every apply.

#![allow(unsafe_code)]

/// Arenas a daemon lets glibc keep ([`limit_arenas`]).
pub const DAEMON_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at `n` (`mallopt(M_ARENA_MAX)`); call it first thing, before
/// any thread starts. glibc gives threads arenas of their own, up to eight per core, and
/// each keeps what its thread freed in its own pieces; in a daemon whose threads come and
/// go with each request (the blocking pool, an apply's hashing threads), that memory
/// piles up in arenas no later request uses and that `malloc_trim` cannot empty where
/// live allocations are scattered over them. Measured with `cas-bench perf --quick
/// --case 4-pulls --case scale-10000` (six pulls in a row, three runs each): the RSS the
/// daemon kept after each pull went 55, 62, 86, 99, 101, 106 MiB with glibc's default
/// and 39, 38, 40, 44, 44, 46 MiB with two arenas, and no pull was slower. Returns
/// whether glibc took it (elsewhere than on glibc it does nothing and returns `false`).
pub fn limit_arenas(n: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes a setting of glibc's allocator
        // under its own lock; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = n;
        false
    }
}

/// Returns the allocator's free memory to the kernel; `true` when some was returned.
/// Elsewhere than on glibc, it does nothing and returns `false`.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas under
        // their locks; it is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_buffers_leave_the_process() {
        // In a process of its own: glibc does not give back the top of a thread's arena,
        // and what this leaves resident would count in the peak of every child another
        // test forks meanwhile.
        const CHILD: &str = "RINGIO_MEMORY_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "memory::tests::freed_buffers_leave_the_process",
                    "--include-ignored",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        // as an apply does: a large buffer freed (which raises glibc's mmap threshold),
        // then many buffers below it, touched and freed out of order on other threads
        drop(std::hint::black_box(vec![1u8; 24 << 20]));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    let mut held = Vec::new();
                    for i in 0..24 {
                        let b = vec![t as u8 + 1; 1 << 20];
                        if i % 8 == 0 {
                            kept.push(vec![0u8; 64]);
                        }
                        held.push(std::hint::black_box(b));
                    }
                    // freed in an order that leaves the small ones above them
                    drop(held);
                    kept
                })
            })
            .collect();
        let kept: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let before = rss_kib();
        release_free_memory();
        let after = rss_kib();
        assert!(
            after + (32 << 10) < before,
            "RSS {before} KiB before the trim, {after} KiB after"
        );
        drop(kept);
    }
}
