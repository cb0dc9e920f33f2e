//! Handing the allocator's free memory back to the kernel once a large piece of work is
//! done.
//!
//! An apply holds up to tens of MiB of file data in flight (buffers of up to 16 MiB, on
//! several threads). glibc serves such buffers from `mmap` at first, then raises its
//! `mmap` threshold to the largest buffer freed (up to 32 MiB) and serves the next ones
//! from its per-thread arenas, which it shrinks only from their top. Once the apply is
//! over, that memory is free in the allocator but still resident: a daemon that pulled a
//! few images stays at the peak of its largest apply. [`release_free_memory`] asks glibc
//! to return every whole free page of every arena (`malloc_trim(0)`), which costs a walk
//! of the arenas' free lists, not a system call per buffer as a fixed low threshold would
//! on every apply.

#![allow(unsafe_code)]

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
        // as an apply does: a large buffer freed (which raises glibc's mmap threshold),
        // then many buffers below it, touched and freed out of order on other threads
        drop(std::hint::black_box(vec![1u8; 24 << 20]));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    let mut held = Vec::new();
                    for i in 0..48 {
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
