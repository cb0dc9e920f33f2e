//! Garbage collection against a Commit loop (`cas-bench gc`, `make bench-gc`): how long
//! a collection of a small part of a large store takes, and how long a Commit running
//! meanwhile waits for it.
//!
//! A store on an XFS loop filesystem is filled through the real Snapshots code with
//! `--objects` distinct small objects, in layers of 1,000 files; `--garbage-percent` of
//! the layers are then removed. While one thread runs GC, another prepares, writes 10
//! new files into and commits one layer after another; every Commit's latency is kept.
//! Each way, once:
//!
//! * *candidates*: the store's GC candidates (the objects whose last reference went),
//!   256 per batch, commits held off for one batch at most;
//! * *after a crash*: the store reopened after an unclean stop, whose first GC looks at
//!   every object (it makes the unreferenced ones candidates, a chunk at a time under
//!   the index's writer lock) and then collects the candidates.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cas::index::Kind;
use cas::snapshots::{OpenOptions, Snapshots};
use cas::Layout;
use cas_integration::harness::{FsKind, LoopFs};

use crate::perf::{summary, work_dir};

/// `cas-bench gc` arguments.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Distinct objects in the store.
    #[arg(long, default_value_t = 100_000)]
    pub objects: usize,
    /// Part of the layers removed before the collection, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub garbage_percent: f64,
    /// Where the loop file goes (default: a new directory in /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

const FILES_PER_LAYER: usize = 1_000;

pub(crate) fn open(root: &std::path::Path) -> Result<Snapshots> {
    open_with_cache(root, None)
}

/// [`open`] with an index cache of `cache_mib` (`None`: the default).
pub(crate) fn open_with_cache(root: &std::path::Path, cache_mib: Option<u64>) -> Result<Snapshots> {
    Ok(Snapshots::open(
        Layout::ensure(root)?,
        OpenOptions {
            index_cache_bytes: cache_mib.map(|m| m << 20),
            ..OpenOptions::default()
        },
        Arc::new(cas::sys::Host),
    )?)
}

/// Prepares `name`, writes `files` files of distinct content (`tag` makes it so) and
/// commits it; returns how long the Commit took.
pub(crate) fn layer(sn: &Snapshots, name: &str, tag: &str, files: usize) -> Result<Duration> {
    Ok(layer_timed(sn, name, tag, files)?.0)
}

/// [`layer`], and of the Commit's time what went before the store started on it (the
/// wait for a shared GC lock) and its `syncfs` and manifest.
pub(crate) fn layer_timed(
    sn: &Snapshots,
    name: &str,
    tag: &str,
    files: usize,
) -> Result<(Duration, Duration, Duration)> {
    let key = format!("{name}-active");
    sn.create(Kind::Active, &key, None, Default::default())?;
    let dir = sn.layout().fs_dir(sn.stat(&key)?.id);
    for i in 0..files {
        let sub = dir.join(format!("d{}", i / 100));
        if i % 100 == 0 {
            fs::create_dir(&sub)?;
        }
        fs::write(sub.join(format!("f{i}")), format!("{tag} object {i}\n"))?;
    }
    let t = Instant::now();
    let done = sn.commit(name, &key, Default::default())?;
    let wall = t.elapsed();
    Ok((
        wall,
        wall.saturating_sub(done.elapsed),
        done.stats.times.sync,
    ))
}

/// One Commit of the loop that runs during a collection, in ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitTimes {
    /// The whole call.
    pub wall: f64,
    /// Of it, the wait for a shared GC lock.
    pub wait: f64,
    /// Of it, the `syncfs` and the manifest.
    pub sync: f64,
}

/// One collection with the Commit loop running: (GC seconds, objects removed, the loop's
/// Commits).
pub(crate) fn collect_while_committing(
    sn: &Arc<Snapshots>,
    round: &str,
) -> Result<(f64, u64, Vec<CommitTimes>)> {
    let done = Arc::new(AtomicBool::new(false));
    let committer = {
        let (sn, done, round) = (sn.clone(), done.clone(), round.to_string());
        std::thread::spawn(move || -> Result<Vec<CommitTimes>> {
            let mut lat = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::Relaxed) || lat.len() < 3 {
                let name = format!("{round}-loop-{n}");
                let (wall, wait, sync) = layer_timed(&sn, &name, &name, 10)?;
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                lat.push(CommitTimes {
                    wall: ms(wall),
                    wait: ms(wait),
                    sync: ms(sync),
                });
                n += 1;
            }
            Ok(lat)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let g = sn.gc()?;
    let secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let lat = committer
        .join()
        .map_err(|_| anyhow::anyhow!("commit loop panicked"))??;
    Ok((secs, g.removed, lat))
}

pub fn run(a: &GcArgs) -> Result<()> {
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "needs root (loop mount)");
    let (work, _tmp) = work_dir(a.workdir.as_deref(), "cas-gc-")?;
    let fs_gib = (a.objects as u64 * 16 / (1 << 20)).max(4);
    let loopfs = LoopFs::new(&work, fs_gib << 10, FsKind::Xfs)?;
    let root = loopfs.mnt.join("store");
    let layers = a.objects.div_ceil(FILES_PER_LAYER);
    let garbage = ((layers as f64 * a.garbage_percent / 100.0).ceil() as usize).max(1);
    println!(
        "gc: filling a store with {} objects in {layers} layers (XFS loop at {})",
        layers * FILES_PER_LAYER,
        loopfs.mnt.display()
    );
    let mut rows = Vec::new();
    for way in ["candidates", "after a crash"] {
        let _ = fs::remove_dir_all(&root);
        let sn = open(&root)?;
        let filled = Instant::now();
        for l in 0..layers {
            layer(&sn, &format!("l{l}"), &format!("l{l}"), FILES_PER_LAYER)?;
        }
        // the first GC of a new store scans once; the store is then the steady state
        sn.gc()?;
        println!(
            "gc: {way}: filled in {:.1} s; removing {garbage} layers ({} objects)",
            filled.elapsed().as_secs_f64(),
            garbage * FILES_PER_LAYER
        );
        for l in 0..garbage {
            sn.remove(&format!("l{l}"))?;
        }
        let sn = if way == "after a crash" {
            // an unclean stop: the next GC trusts no candidate list
            drop(sn);
            open(&root)?
        } else {
            sn
        };
        let sn = Arc::new(sn);
        let (secs, removed, commits) = collect_while_committing(&sn, &way.replace(' ', "-"))?;
        let lat: Vec<f64> = commits.iter().map(|c| c.wall).collect();
        let (p50, _, max) = summary(lat.clone());
        println!(
            "gc: {way}: {removed} objects removed in {secs:.3} s; {} commits meanwhile, p50 {p50:.1} ms, max {max:.1} ms",
            lat.len()
        );
        rows.push((way, secs, removed, lat.len(), p50, max));
        if let Ok(sn) = Arc::try_unwrap(sn) {
            sn.shutdown()?;
        }
    }
    println!(
        "\n| GC of {garbage} of {layers} layers ({} objects) | GC time | objects removed | commits in the loop | commit p50 | commit max |\n|---|---:|---:|---:|---:|---:|",
        layers * FILES_PER_LAYER
    );
    for (way, secs, removed, n, p50, max) in rows {
        println!("| {way} | {secs:.3} s | {removed} | {n} | {p50:.1} ms | {max:.1} ms |");
    }
    Ok(())
}
