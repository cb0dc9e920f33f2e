//! Durability costs: commit record latency of both journal backends, and recovery time
//! at start with many committed snapshots.
//!
//! * **Journal**: each backend appends 2,000 records of 200 bytes (the size of a commit
//!   record) one at a time, as the daemon does before it answers a Commit, with a
//!   checkpoint every 64 records as the daemon makes; the time of every append is kept
//!   and p50, p99 and max are reported per run. The atomic backend
//!   (`pwritev2(RWF_ATOMIC | RWF_DSYNC)` of one block) runs where the filesystem reports
//!   atomic write units (XFS on this kernel); the rename backend (temp file + fsync +
//!   rename + directory fsync) runs on every filesystem given.
//! * **Recovery**: 1,000 parentless snapshots are prepared, written and committed
//!   through the service, then the store is reopened as the daemon does at start
//!   (journal replay, index open, reconcile, orphan sweep): after unclean stops (the
//!   service dropped without its shutdown, with commits since the last open, so
//!   records are replayed and the mirrors they name compared with the index) and
//!   after clean ones (the daemon's shutdown: checkpoint and clean-stop marker), each
//!   with the page cache dropped (a reboot) and kept (a restart of the daemon alone),
//!   medians of several runs. Every reopen must list every committed snapshot.
//!
//! `make bench` runs both on its XFS filesystem and on the filesystem under it; `make
//! bench-durability` runs them alone (`cas-bench durability`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cas_integration::harness::{FsKind, LoopFs};
use cas_snapshotter::service::CasSnapshotter;
use config::StoreConfig;
use containerd_snapshots::Snapshotter as _;
use ringio::journal::{Backend, Journal, JournalMode};

use crate::fs_type;
use crate::perf::{drop_caches, summary, work_dir};

/// Records appended per journal run.
const RECORDS: usize = 2000;
/// Bytes of one record: about a commit record's.
const RECORD_BYTES: usize = 200;
/// Records between checkpoints, as the daemon makes them.
const CHECKPOINT_EVERY: usize = 64;
/// Committed snapshots in the recovery measurement.
pub const SNAPSHOTS: usize = 1000;

/// `cas-bench durability` arguments.
#[derive(Debug, clap::Args)]
pub struct DurabilityArgs {
    /// Runs per measure.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the XFS loop file and the rename journal go (default: a new directory in
    /// /var/tmp); its own filesystem is measured too.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// One filesystem to measure on.
pub struct Target {
    /// How the report names it (`xfs`, `ext4`).
    pub fs: String,
    /// A directory on it, owned by the benchmark.
    pub dir: PathBuf,
}

/// The append latencies of one run of one backend.
pub struct JournalRun {
    pub fs: String,
    pub backend: String,
    pub run: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Reopen times of one store, in ms: after unclean and clean stops, with the page
/// cache dropped (as after a reboot) and kept (as after a daemon restart).
pub struct Recovery {
    pub fs: String,
    pub crash_cold_ms: Vec<f64>,
    pub crash_warm_ms: Vec<f64>,
    pub clean_cold_ms: Vec<f64>,
    pub clean_warm_ms: Vec<f64>,
}

/// Both measures.
pub struct Durability {
    pub journal: Vec<JournalRun>,
    pub recovery: Vec<Recovery>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn journal_runs(t: &Target, mode: JournalMode, runs: usize) -> Result<Vec<JournalRun>> {
    let payload = vec![b'r'; RECORD_BYTES];
    let mut out = Vec::new();
    for run in 0..runs {
        let dir = t.dir.join(format!("journal-{mode:?}-{run}"));
        fs::create_dir_all(&dir)?;
        let mut j = Journal::open(&dir, mode)
            .with_context(|| format!("opening a journal in {}", dir.display()))?;
        let backend = match j.backend() {
            Backend::Atomic { .. } => "RWF_ATOMIC",
            Backend::Rename => "rename",
        };
        let mut times = Vec::with_capacity(RECORDS);
        for i in 0..RECORDS {
            let started = Instant::now();
            let seq = j.append(&payload)?;
            times.push(started.elapsed());
            if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 {
                j.checkpoint(seq)?;
            }
        }
        drop(j);
        fs::remove_dir_all(&dir)?;
        times.sort();
        out.push(JournalRun {
            fs: t.fs.clone(),
            backend: backend.into(),
            run: run + 1,
            p50_ms: percentile(&times, 0.50),
            p99_ms: percentile(&times, 0.99),
            max_ms: percentile(&times, 1.0),
        });
    }
    Ok(out)
}

/// Opens the store as the daemon does at start, timed; the page cache dropped first
/// when `cold`.
fn open_store(root: &Path, cold: bool) -> Result<(CasSnapshotter, f64)> {
    if cold {
        drop_caches()?;
    }
    let started = Instant::now();
    let sn = CasSnapshotter::open_with(cas::Layout::ensure(root)?, &StoreConfig::default())?;
    Ok((sn, started.elapsed().as_secs_f64() * 1e3))
}

/// Prepares, writes and commits `n` more parentless snapshots, numbered from `from`.
async fn commit_more(sn: &CasSnapshotter, from: usize, n: usize) -> Result<()> {
    for i in from..from + n {
        let m = sn
            .prepare(format!("a{i}"), String::new(), HashMap::new())
            .await?;
        let upper = PathBuf::from(&m[0].source);
        fs::write(upper.join("file"), format!("content {i}\n"))?;
        fs::write(upper.join("shared"), b"the same in every layer\n")?;
        sn.commit(format!("c{i}"), format!("a{i}"), HashMap::new())
            .await?;
    }
    Ok(())
}

/// Reopens the store and checks every committed snapshot is listed.
async fn reopen(root: &Path, cold: bool, expected: usize) -> Result<(CasSnapshotter, f64)> {
    use futures::StreamExt as _;
    let (sn, ms) = open_store(root, cold)?;
    let n = sn.list(String::new(), vec![]).await?.count().await;
    if n != expected {
        bail!("after a restart {n} snapshots are listed, {expected} were committed");
    }
    Ok((sn, ms))
}

/// Commits between two unclean stops, so that every one has records to replay.
const COMMITS_BETWEEN_CRASHES: usize = 10;

async fn recovery(t: &Target, runs: usize) -> Result<Recovery> {
    if 2 * runs * COMMITS_BETWEEN_CRASHES > SNAPSHOTS / 2 {
        bail!(
            "at most {} runs of the recovery measure",
            SNAPSHOTS / 4 / COMMITS_BETWEEN_CRASHES
        );
    }
    let root = t.dir.join("recovery");
    let (sn, _) = open_store(&root, false)?;
    let mut committed = SNAPSHOTS - 2 * runs * COMMITS_BETWEEN_CRASHES;
    commit_more(&sn, 0, committed).await?;
    let mut r = Recovery {
        fs: t.fs.clone(),
        crash_cold_ms: Vec::new(),
        crash_warm_ms: Vec::new(),
        clean_cold_ms: Vec::new(),
        clean_warm_ms: Vec::new(),
    };
    // Unclean stops (the service dropped without its shutdown, records pending), then
    // clean ones (the daemon's shutdown: checkpoint and clean-stop marker).
    let mut sn = sn;
    for clean in [false, true] {
        for _ in 0..runs {
            for cold in [true, false] {
                if clean {
                    sn.shutdown().await?;
                } else {
                    commit_more(&sn, committed, COMMITS_BETWEEN_CRASHES).await?;
                    committed += COMMITS_BETWEEN_CRASHES;
                }
                drop(sn);
                let (next, ms) = reopen(&root, cold, committed).await?;
                sn = next;
                match (clean, cold) {
                    (false, true) => &mut r.crash_cold_ms,
                    (false, false) => &mut r.crash_warm_ms,
                    (true, true) => &mut r.clean_cold_ms,
                    (true, false) => &mut r.clean_warm_ms,
                }
                .push(ms);
            }
        }
    }
    // detaches the layers' images: the tree can go
    sn.shutdown().await?;
    drop(sn);
    fs::remove_dir_all(&root)?;
    Ok(r)
}

/// Journal latency on every target (the atomic backend where the filesystem offers it,
/// the rename backend everywhere), then recovery time on every target.
pub fn measure(targets: &[Target], runs: usize) -> Result<Durability> {
    let mut journal = Vec::new();
    for t in targets {
        println!("bench: journal latency on {}", t.fs);
        let auto = journal_runs(t, JournalMode::Auto, runs)?;
        if auto.iter().any(|r| r.backend != "rename") {
            journal.extend(auto);
            journal.extend(journal_runs(t, JournalMode::ForceRename, runs)?);
        } else {
            journal.extend(auto);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut recovery = Vec::new();
    for t in targets {
        println!(
            "bench: recovery with {SNAPSHOTS} committed snapshots on {}",
            t.fs
        );
        recovery.push(rt.block_on(self::recovery(t, runs))?);
    }
    Ok(Durability { journal, recovery })
}

/// The report's sections.
pub fn render(d: &Durability) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Commit record latency (journal)\n");
    let _ = writeln!(
        s,
        "{RECORDS} records of {RECORD_BYTES} bytes appended one at a time, as a Commit does \
         before it answers (checkpoint every {CHECKPOINT_EVERY}); per run p50/p99/max of the \
         appends, median [min–max] over the runs. Goal: p99 under 5 ms.\n"
    );
    let _ = writeln!(
        s,
        "| filesystem | backend | runs | p50 (ms) | p99 (ms) | max (ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in &d.journal {
        let k = (r.fs.clone(), r.backend.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (fs, backend) in keys {
        let runs: Vec<&JournalRun> = d
            .journal
            .iter()
            .filter(|r| r.fs == fs && r.backend == backend)
            .collect();
        let col = |f: fn(&JournalRun) -> f64| {
            let (m, lo, hi) = summary(runs.iter().map(|r| f(r)).collect());
            format!("{m:.2} [{lo:.2}–{hi:.2}]")
        };
        let _ = writeln!(
            s,
            "| {fs} | {backend} | {} | {} | {} | {} |",
            runs.len(),
            col(|r| r.p50_ms),
            col(|r| r.p99_ms),
            col(|r| r.max_ms),
        );
    }
    let _ = writeln!(s, "\n## Recovery at start\n");
    let _ = writeln!(
        s,
        "A store with {SNAPSHOTS} committed snapshots reopened as the daemon starts (journal \
         replay, index open, reconcile with the snapshots' `info` files, sweep of temporary \
         files); all of them must be listed after. *Unclean*: the service dropped without its \
         shutdown, {COMMITS_BETWEEN_CRASHES} commits since the last open, so records are \
         replayed and the `info` files of the snapshots they name are compared. *Clean*: after the daemon's shutdown \
         (checkpoint, clean-stop marker). *Cold*: page cache dropped before the open, as \
         after a reboot; *warm*: as after a restart of the daemon alone. Median [min–max] \
         of {} runs. Goal: under 100 ms.\n",
        d.recovery.first().map_or(0, |r| r.crash_cold_ms.len())
    );
    let _ = writeln!(
        s,
        "| filesystem | unclean, cold (ms) | unclean, warm (ms) | clean, cold (ms) | clean, warm (ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for r in &d.recovery {
        let col = |v: &[f64]| {
            let (m, lo, hi) = summary(v.to_vec());
            format!("{m:.0} [{lo:.0}–{hi:.0}]")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.fs,
            col(&r.crash_cold_ms),
            col(&r.crash_warm_ms),
            col(&r.clean_cold_ms),
            col(&r.clean_warm_ms),
        );
    }
    s
}

/// CSV rows (`case,snapshotter,run,metric,value`).
pub fn csv(d: &Durability, s: &mut String) {
    for r in &d.journal {
        for (metric, v) in [
            ("p50_ms", r.p50_ms),
            ("p99_ms", r.p99_ms),
            ("max_ms", r.max_ms),
        ] {
            let _ = writeln!(
                s,
                "journal/{}/{},cas,{},{metric},{v:.3}",
                r.fs, r.backend, r.run
            );
        }
    }
    for r in &d.recovery {
        for (metric, v) in [
            ("unclean_cold_ms", &r.crash_cold_ms),
            ("unclean_warm_ms", &r.crash_warm_ms),
            ("clean_cold_ms", &r.clean_cold_ms),
            ("clean_warm_ms", &r.clean_warm_ms),
        ] {
            for (i, ms) in v.iter().enumerate() {
                let _ = writeln!(s, "recovery/{},cas,{},{metric},{ms:.1}", r.fs, i + 1);
            }
        }
    }
}

/// `cas-bench durability`: an XFS loop filesystem made here and the filesystem under it.
pub fn run(a: &DurabilityArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop mount, stubs, drop_caches)");
    }
    let (work, _tmp) = work_dir(a.workdir.as_deref(), "cas-durability-")?;
    let xfs = LoopFs::new(&work, 4 << 10, FsKind::Xfs)?;
    let under = work.join("on-backing-fs");
    fs::create_dir_all(&under)?;
    let targets = [
        Target {
            fs: "xfs".into(),
            dir: xfs.mnt.clone(),
        },
        Target {
            fs: fs_type(&under).unwrap_or_else(|| "?".into()),
            dir: under.clone(),
        },
    ];
    let d = measure(&targets, a.runs)?;
    drop(xfs);
    let _ = fs::remove_dir_all(&under);
    println!("\n{}", render(&d));
    Ok(())
}
