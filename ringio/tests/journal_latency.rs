//! Commit record latency of both journal backends (a benchmark, not a timed test:
//! `make bench-journal`; plain `cargo test` skips it).
//!
//! Each backend appends 2,000 records of 200 bytes (the size of a commit record) one at a
//! time, as the daemon does before it answers a Commit, and the time of each append is
//! kept: p50, p99 and max are printed per run, three runs per backend. The atomic backend
//! (`pwritev2(RWF_ATOMIC | RWF_DSYNC)` of one 4 KiB block) runs on an XFS filesystem on a
//! loop file made here, which reports atomic write units on recent kernels; the rename
//! backend (temp file + fsync + rename + directory fsync) runs on the same XFS and on the
//! filesystem of the system's temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringio::journal::{Backend, Journal, JournalMode};

const RECORDS: usize = 2000;
const RUNS: usize = 3;

struct Xfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xfs {
    fn new() -> Option<Xfs> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("journal.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        std::fs::File::create(&img).ok()?.set_len(512 << 20).ok()?;
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&img))
            || !ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(Xfs { mnt, _dir: dir })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn run(label: &str, dir: &Path, mode: JournalMode) {
    for n in 0..RUNS {
        let d = dir.join(format!("{label}-{n}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut j = Journal::open(&d, mode).unwrap();
        let backend = match j.backend() {
            Backend::Atomic { .. } => "RWF_ATOMIC",
            Backend::Rename => "rename",
        };
        let payload = vec![b'r'; 200];
        let mut times = Vec::with_capacity(RECORDS);
        for i in 0..RECORDS {
            let t = Instant::now();
            let seq = j.append(&payload).unwrap();
            times.push(t.elapsed());
            if i % 64 == 63 {
                // as the daemon does every 64 records: a checkpoint retires them
                j.checkpoint(seq).unwrap();
            }
        }
        times.sort();
        println!(
            "{label:<14} {backend:<10} run {n}: p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
            percentile(&times, 0.50).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3,
        );
    }
}

#[test]
#[ignore = "benchmark: make bench-journal"]
fn commit_record_latency() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the XFS loop filesystem needs root");
        return;
    }
    match Xfs::new() {
        Some(xfs) => {
            run("xfs", &xfs.mnt, JournalMode::Auto);
            run("xfs", &xfs.mnt, JournalMode::ForceRename);
        }
        None => eprintln!(
            "no XFS loop filesystem here (mkfs.xfs, loop devices): atomic backend not measured"
        ),
    }
    let tmp = tempfile::tempdir().unwrap();
    run("tmpdir", tmp.path(), JournalMode::ForceRename);
}
