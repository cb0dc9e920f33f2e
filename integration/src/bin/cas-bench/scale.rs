//! A store of many objects (`cas-bench scale`, `make bench-scale`): how the costs a node
//! notices grow with the number of objects the store holds.
//!
//! For each `--objects` N, a store on a fresh XFS loop filesystem is filled through the
//! real Snapshots code with N distinct small objects, in at most a few hundred layers
//! (1,000 files each, or N/300 when that is more). Then, in this order:
//!
//! * `--ops` rounds of Prepare (over a filled layer), Mounts, writing 10 new files,
//!   Commit, Stat and Remove of the layer, each call's latency kept (p50, p99);
//! * `casctl stats`'s figures (`Snapshots::stats`), 50 times;
//! * GC of 1% of the layers, with a Commit loop running meanwhile (the longest Commit);
//! * peak RSS over those steps (`VmHWM`): the store's code runs in the process as it
//!   does in the daemon, without the gRPC layer; next to it, the RSS of the process
//!   that filled the store, at the end of the fill;
//! * the disk used per object (the filesystem's used blocks over N);
//! * recovery: the store reopened after an unclean stop (dropped without shutdown),
//!   as the daemon starts after `kill -9`; and the clean reopen right after the fill.
//!   sled replays its log from where it last opened, so the first is what a daemon
//!   restarted since the fill pays, the second what one never restarted since pays;
//! * the first GC after that unclean stop, with the Commit loop running: it makes every
//!   unreferenced object a GC candidate before it collects, so it looks at every object
//!   (its time, and the longest Commit meanwhile);
//! * `casctl fsck` and then `casctl rebuild-index` on the stopped store, each a process
//!   of its own: time and peak RSS (`wait4`), and fsck must find the store clean.
//!
//! Each store size is filled in a process of its own (this binary again), and the
//! measured steps run in another, which opens the filled store as a daemon restarted on
//! it does: no size's memory carries into the next one's figures, and the fill's into
//! none.
//!
//! With `--repeats K`, every size is filled first and the measured steps (calls, stats,
//! GC of another 1% of the layers each time) then run K times, the sizes interleaved
//! round by round (in turn forwards and backwards), each round in a process of its own.
//! A p99 of one loop is a few samples of its slowest calls, and a shared machine moves it
//! by half from one loop to the next; interleaved rounds see the same machine. The table
//! gives the medians over the rounds (the longest Commit during GC: the longest of all
//! rounds), `scale-rounds.csv` every round, and stdout each larger size's p99s against
//! the smallest size's of the same round (the median of those ratios).
//!
//! Results go to `bench/results/scale.csv` and `bench/results/scale.svg` (each figure
//! against N, log scales) and a table on stdout.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cas::index::Kind;
use cas::snapshots::Snapshots;
use cas_integration::harness::{FsKind, LoopFs};

use crate::gc::{collect_while_committing, layer, open_with_cache};
use crate::perf::{summary, work_dir};
use crate::plot::{log_log_panels, Panel};

/// `cas-bench scale` arguments.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Store sizes, in objects (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000, 1_000_000])]
    pub objects: Vec<usize>,
    /// Rounds of Prepare/Mounts/Commit/Stat/Remove per store.
    #[arg(long, default_value_t = 200)]
    pub ops: usize,
    /// Where the loop files go (default: a new directory in /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// The index's page cache in MiB (`[store] index_cache_mib`; default: the store's).
    #[arg(long)]
    pub index_cache_mib: Option<u64>,
    /// Where the CSV and the plot go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Measure the one store size given in this process and write its CSV row to this
    /// file (how the parent runs each size).
    #[arg(long, hide = true)]
    pub row_to: Option<PathBuf>,
    /// With `--row-to`: only the measured steps, on the store filled at this root with
    /// `--layers` layers (how a size's process runs them apart from its fill).
    #[arg(long, hide = true)]
    pub serve: Option<PathBuf>,
    /// The layers of the store `--serve` names.
    #[arg(long, hide = true, default_value_t = 0)]
    pub layers: usize,
    /// Rounds of the measured steps per store size, the sizes interleaved round by round.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// With `--row-to`: only the fill, of the store at this root.
    #[arg(long, hide = true)]
    pub fill: Option<PathBuf>,
    /// With `--serve`: which round this is (its GC takes the round's own 1% of the layers).
    #[arg(long, hide = true, default_value_t = 0)]
    pub round: usize,
    /// With `--serve`: end with an unclean stop and the reopen after it (recovery).
    #[arg(long, hide = true)]
    pub recover: bool,
}

/// What one store size measured.
#[derive(Debug, Clone, Default)]
struct Row {
    objects: usize,
    layers: usize,
    fill_s: f64,
    /// (p50, p99) in ms, per call.
    prepare: (f64, f64),
    mounts: (f64, f64),
    commit: (f64, f64),
    stat: (f64, f64),
    remove: (f64, f64),
    stats_ms: f64,
    gc_s: f64,
    gc_removed: u64,
    gc_commit_max_ms: f64,
    /// Of that Commit, the wait for a shared GC lock.
    gc_commit_max_wait_ms: f64,
    /// Of that Commit, its `syncfs` and manifest.
    gc_commit_max_sync_ms: f64,
    /// The p99 of the Commits during GC.
    gc_commit_p99_ms: f64,
    /// The first GC after the unclean stop (which makes every unreferenced object a
    /// candidate first): seconds, and the longest Commit of the loop meanwhile.
    gc_after_crash_s: f64,
    gc_after_crash_commit_max_ms: f64,
    rss_mib: f64,
    /// RSS when the measured steps began (the store just opened by their process).
    rss_base_mib: f64,
    /// RSS of the process that filled the store, at the end of the fill.
    fill_rss_mib: f64,
    disk_per_object: f64,
    recovery_ms: f64,
    /// The clean reopen right after the fill.
    reopen_after_fill_ms: f64,
    /// `casctl fsck` on the stopped store: seconds and peak RSS.
    fsck_s: f64,
    fsck_rss_mib: f64,
    /// `casctl rebuild-index` on the stopped store: seconds and peak RSS.
    rebuild_s: f64,
    rebuild_rss_mib: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99) of `v`.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, ms(t.elapsed())))
}

/// A figure of this process's `/proc/self/status` in MiB (`VmHWM`: the peak RSS since
/// the last reset; `VmRSS`: now).
fn rss_mib(field: &str) -> Result<f64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(kib / 1024.0)
}

fn reset_peak_rss() -> Result<()> {
    // "5" resets the peak RSS to the current RSS (proc(5))
    fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}

fn used_bytes(mnt: &Path) -> Result<u64> {
    let s = nix::sys::statvfs::statvfs(mnt)?;
    Ok((s.blocks() - s.blocks_free()) * s.fragment_size())
}

/// How a store of `n` objects is laid out: (files per layer, layers).
fn shape(n: usize) -> (usize, usize) {
    let per_layer = (n / 300).max(1_000);
    (per_layer, n.div_ceil(per_layer))
}

/// Fills the store at `root` (on a loop filesystem of its own) with `n` objects, in this
/// process; the row holds the fill's figures.
fn fill(a: &ScaleArgs, root: &Path, n: usize) -> Result<Row> {
    let (per_layer, layers) = shape(n);
    let mnt = root.parent().context("the store's filesystem")?;
    let empty = used_bytes(mnt)?;
    let mut row = Row {
        objects: layers * per_layer,
        layers,
        ..Row::default()
    };
    println!(
        "scale: {} objects in {layers} layers of {per_layer} (XFS loop at {})",
        row.objects,
        mnt.display()
    );
    let sn = open_with_cache(root, a.index_cache_mib)?;
    let filled = Instant::now();
    for l in 0..layers {
        layer(&sn, &format!("l{l}"), &format!("l{l}"), per_layer)?;
        if l % (layers / 4).max(1) == 0 {
            println!(
                "scale: RSS {:.0} MiB after {} layers",
                rss_mib("VmRSS")?,
                l + 1
            );
        }
    }
    let rss_filled = rss_mib("VmRSS")?;
    // the first GC of a new store scans once; the store is then the steady state
    sn.gc()?;
    println!(
        "scale: RSS {rss_filled:.0} MiB after the fill, {:.0} MiB after its GC",
        rss_mib("VmRSS")?
    );
    row.fill_s = filled.elapsed().as_secs_f64();
    // the layers' trees are deleted off their Commits' path: done before anything is
    // measured (a daemon stopped meanwhile leaves them to the sweep at its next start)
    let tmp = sn.layout().tmp_dir();
    let deleting = Instant::now();
    while fs::read_dir(&tmp)?.next().is_some() && deleting.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "scale: filled in {:.1} s; the ingested trees deleted {:.1} s later",
        row.fill_s,
        deleting.elapsed().as_secs_f64()
    );
    row.disk_per_object = (used_bytes(mnt)? - empty) as f64 / row.objects as f64;
    sn.shutdown()?;
    drop(sn);
    row.fill_rss_mib = rss_mib("VmRSS")?;
    Ok(row)
}

/// Runs `cas-bench scale` for store size `n` with `args` in a new process of this
/// binary, which writes its row to `row_file`, and reads the row back.
fn in_a_process(a: &ScaleArgs, n: usize, row_file: &Path, args: &[&OsStr]) -> Result<Row> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("scale")
        .arg("--objects")
        .arg(n.to_string())
        .arg("--ops")
        .arg(a.ops.to_string())
        .arg("--row-to")
        .arg(row_file)
        .args(args);
    if let Some(mib) = a.index_cache_mib {
        cmd.arg("--index-cache-mib").arg(mib.to_string());
    }
    let status = cmd.status()?;
    anyhow::ensure!(
        status.success(),
        "cas-bench scale for {n} objects {args:?}: {status}"
    );
    let row = parse_row(&fs::read_to_string(row_file)?)?;
    fs::remove_file(row_file)?;
    Ok(row)
}

/// The store `sn` once no Commit loop holds it any more.
fn sole(sn: Arc<Snapshots>) -> Result<Snapshots> {
    Arc::try_unwrap(sn).map_err(|_| anyhow::anyhow!("store still shared"))
}

/// The measured steps on the store of `layers` filled layers at `root`, in this process
/// (opened as a restarted daemon opens it): the open, the calls' latencies, stats, GC of
/// the round's 1% of the layers, and with `--recover` the reopen after an unclean stop.
fn serve(a: &ScaleArgs, root: &Path, layers: usize) -> Result<Row> {
    let open = |root: &Path| open_with_cache(root, a.index_cache_mib);
    let mut row = Row::default();
    // sled replays its log from where it last opened (it writes the snapshot of its page
    // table at open): in the first round, right after the fill, that is every object's
    // reference
    let (sn, t) = timed(|| open(root))?;
    row.reopen_after_fill_ms = t;

    reset_peak_rss()?;
    row.rss_base_mib = rss_mib("VmRSS")?;
    let (mut prepare, mut mounts, mut commit, mut stat, mut remove) =
        (vec![], vec![], vec![], vec![], vec![]);
    // a Commit's steps: hashing and publishing, the image, `syncfs` + manifest, the rest
    let mut steps: [Vec<f64>; 4] = Default::default();
    let parent = format!("l{}", layers - 1);
    for i in 0..a.ops {
        let (key, name) = (format!("op-{i}-active"), format!("op-{i}"));
        let (_, t) =
            timed(|| Ok(sn.create(Kind::Active, &key, Some(&parent), Default::default())?))?;
        prepare.push(t);
        let (_, t) = timed(|| Ok(sn.mounts(&key)?))?;
        mounts.push(t);
        let dir = sn.layout().fs_dir(sn.stat(&key)?.id);
        for f in 0..10 {
            fs::write(
                dir.join(format!("new-{f}")),
                format!("round {i} file {f}\n"),
            )?;
        }
        let (done, t) = timed(|| Ok(sn.commit(&name, &key, Default::default())?))?;
        commit.push(t);
        let times = done.stats.times;
        let hash = ms(times.hash);
        let (image, sync) = (ms(times.image), ms(times.sync));
        steps[0].push(hash);
        steps[1].push(image);
        steps[2].push(sync);
        steps[3].push((t - hash - image - sync).max(0.0));
        let (_, t) = timed(|| Ok(sn.stat(&name)?))?;
        stat.push(t);
        let (_, t) = timed(|| Ok(sn.remove(&name)?))?;
        remove.push(t);
    }
    row.prepare = p50_p99(prepare);
    row.mounts = p50_p99(mounts);
    row.commit = p50_p99(commit);
    let [hash, image, sync, rest] = steps.map(p50_p99);
    eprintln!(
        "scale: Commit steps, p50 / p99 ms: hash and publish {:.2} / {:.2}, image {:.2} / {:.2}, syncfs and manifest {:.2} / {:.2}, the rest (index, journal, locks) {:.2} / {:.2}",
        hash.0, hash.1, image.0, image.1, sync.0, sync.1, rest.0, rest.1
    );
    row.stat = p50_p99(stat);
    row.remove = p50_p99(remove);

    let mut stats = Vec::new();
    for _ in 0..50 {
        stats.push(timed(|| Ok(sn.stats()?))?.1);
    }
    row.stats_ms = p50_p99(stats).0;

    let garbage = layers.div_ceil(100);
    for l in a.round * garbage..(a.round + 1) * garbage {
        sn.remove(&format!("l{l}"))?;
    }
    let sn = Arc::new(sn);
    let (gc_s, removed, commits) = collect_while_committing(&sn, &format!("scale-{}", a.round))?;
    row.gc_s = gc_s;
    row.gc_removed = removed;
    if let Some(c) = commits.iter().max_by(|a, b| a.wall.total_cmp(&b.wall)) {
        row.gc_commit_max_ms = c.wall;
        row.gc_commit_max_wait_ms = c.wait;
        row.gc_commit_max_sync_ms = c.sync;
    }
    row.gc_commit_p99_ms = p50_p99(commits.iter().map(|c| c.wall).collect()).1;
    row.rss_mib = rss_mib("VmHWM")?;

    let mut sn = sole(sn)?;
    if a.recover {
        // an unclean stop: dropped without shutdown, as after kill -9
        drop(sn);
        let (reopened, t) = timed(|| open(root))?;
        row.recovery_ms = t;
        let reopened = Arc::new(reopened);
        let (gc_s, _, commits) =
            collect_while_committing(&reopened, &format!("crash-{}", a.round))?;
        row.gc_after_crash_s = gc_s;
        row.gc_after_crash_commit_max_ms = commits.iter().map(|c| c.wall).fold(0.0, f64::max);
        sn = sole(reopened)?;
    }
    sn.shutdown()?;
    println!("scale: round {}: {row:?}", a.round);
    Ok(row)
}

const HEADER: &str = "objects,layers,fill_s,prepare_p50_ms,prepare_p99_ms,mounts_p50_ms,mounts_p99_ms,commit_p50_ms,commit_p99_ms,stat_p50_ms,stat_p99_ms,remove_p50_ms,remove_p99_ms,stats_ms,gc_s,gc_removed,gc_commit_max_ms,gc_commit_max_wait_ms,gc_commit_max_sync_ms,peak_rss_mib,rss_after_open_mib,disk_bytes_per_object,recovery_ms,reopen_after_fill_ms,fsck_s,fsck_rss_mib,rebuild_s,rebuild_rss_mib,fill_rss_mib,gc_commit_p99_ms,gc_after_crash_s,gc_after_crash_commit_max_ms";

/// A row as [`csv`] writes it.
fn parse_row(line: &str) -> Result<Row> {
    let v: Vec<f64> = line
        .trim()
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("a row of numbers: {line:?}"))?;
    anyhow::ensure!(
        v.len() == HEADER.split(',').count(),
        "{} fields in {line:?}",
        v.len()
    );
    let mut v = v.into_iter();
    let mut next = move || v.next().unwrap_or_default();
    Ok(Row {
        objects: next() as usize,
        layers: next() as usize,
        fill_s: next(),
        prepare: (next(), next()),
        mounts: (next(), next()),
        commit: (next(), next()),
        stat: (next(), next()),
        remove: (next(), next()),
        stats_ms: next(),
        gc_s: next(),
        gc_removed: next() as u64,
        gc_commit_max_ms: next(),
        gc_commit_max_wait_ms: next(),
        gc_commit_max_sync_ms: next(),
        rss_mib: next(),
        rss_base_mib: next(),
        disk_per_object: next(),
        recovery_ms: next(),
        reopen_after_fill_ms: next(),
        fsck_s: next(),
        fsck_rss_mib: next(),
        rebuild_s: next(),
        rebuild_rss_mib: next(),
        fill_rss_mib: next(),
        gc_commit_p99_ms: next(),
        gc_after_crash_s: next(),
        gc_after_crash_commit_max_ms: next(),
    })
}

fn csv(r: &Row) -> String {
    format!(
        "{},{},{:.1},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.0},{:.1},{:.1},{:.2},{:.1},{:.2},{:.1},{:.1},{:.1},{:.2},{:.1}",
        r.objects,
        r.layers,
        r.fill_s,
        r.prepare.0,
        r.prepare.1,
        r.mounts.0,
        r.mounts.1,
        r.commit.0,
        r.commit.1,
        r.stat.0,
        r.stat.1,
        r.remove.0,
        r.remove.1,
        r.stats_ms,
        r.gc_s,
        r.gc_removed,
        r.gc_commit_max_ms,
        r.gc_commit_max_wait_ms,
        r.gc_commit_max_sync_ms,
        r.rss_mib,
        r.rss_base_mib,
        r.disk_per_object,
        r.recovery_ms,
        r.reopen_after_fill_ms,
        r.fsck_s,
        r.fsck_rss_mib,
        r.rebuild_s,
        r.rebuild_rss_mib,
        r.fill_rss_mib,
        r.gc_commit_p99_ms,
        r.gc_after_crash_s,
        r.gc_after_crash_commit_max_ms
    )
}

/// Two log-log panels against the objects in the store: latencies (ms) and the rest.
fn plot(path: &Path, rows: &[Row]) -> Result<()> {
    if rows.len() < 2 {
        return Ok(());
    }
    type Series = (&'static str, fn(&Row) -> f64);
    let panels: [(&str, &'static str, Vec<Series>); 2] = [
        (
            "p99 latency of each call (ms)",
            "ms",
            vec![
                ("Prepare", |r| r.prepare.1),
                ("Mounts", |r| r.mounts.1),
                ("Commit", |r| r.commit.1),
                ("Stat", |r| r.stat.1),
                ("Remove", |r| r.remove.1),
                ("stats", |r| r.stats_ms),
                ("longest Commit during GC", |r| r.gc_commit_max_ms),
            ],
        ),
        (
            "GC of 1%, recovery, fsck, memory",
            "s / MiB",
            vec![
                ("GC of 1% of the layers (s)", |r| r.gc_s),
                ("recovery after an unclean stop (s)", |r| {
                    r.recovery_ms / 1000.0
                }),
                ("reopen after the fill (s)", |r| {
                    r.reopen_after_fill_ms / 1000.0
                }),
                ("peak RSS (MiB)", |r| r.rss_mib),
                ("casctl fsck (s)", |r| r.fsck_s),
                ("peak RSS of casctl fsck (MiB)", |r| r.fsck_rss_mib),
            ],
        ),
    ];
    let panels: Vec<Panel> = panels
        .into_iter()
        .map(|(title, unit, series)| Panel {
            title: title.to_string(),
            x_desc: "objects in the store",
            y_desc: unit,
            lines: series
                .into_iter()
                .map(|(label, f)| {
                    let pts = rows.iter().map(|r| (r.objects as f64, f(r))).collect();
                    (label.to_string(), pts)
                })
                .collect(),
        })
        .collect();
    log_log_panels(path, (1200, 520), &panels)
}

/// Runs `casctl --root root <args>` (the one built next to this binary) to its end;
/// returns its seconds and peak RSS in MiB. It must succeed: fsck exits 1 on any
/// inconsistency.
fn casctl(root: &Path, args: &[&str]) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?.with_file_name("casctl");
    anyhow::ensure!(
        exe.is_file(),
        "{} is missing: build it (cargo build --release -p cas --bin casctl)",
        exe.display()
    );
    let t = Instant::now();
    let child = std::process::Command::new(&exe)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let done = ringio::process::wait_with_peak_rss(child)?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(done.status.success(), "casctl {args:?}: {}", done.status);
    println!(
        "scale: casctl {} in {secs:.1} s, peak RSS {:.0} MiB",
        args[0],
        done.max_rss_kib as f64 / 1024.0
    );
    Ok((secs, done.max_rss_kib as f64 / 1024.0))
}

/// A store size being measured: its filesystem, the fill's row and each round's.
struct Size {
    n: usize,
    dir: PathBuf,
    root: PathBuf,
    fill: Row,
    rounds: Vec<Row>,
    _fs: LoopFs,
}

/// The median of `f` over `rows`.
fn median(rows: &[Row], f: impl Fn(&Row) -> f64) -> f64 {
    summary(rows.iter().map(f).collect()).0
}

/// One row for a size: the fill's figures, the medians of the rounds' (the longest
/// Commit during GC: the longest of all rounds; peak RSS: the highest), the first
/// round's reopen and the last round's recovery, and fsck's and rebuild-index's.
fn combine(s: &Size) -> Row {
    let r = &s.rounds[..];
    let pair = |f: fn(&Row) -> (f64, f64)| (median(r, |x| f(x).0), median(r, |x| f(x).1));
    let longest = r
        .iter()
        .max_by(|a, b| a.gc_commit_max_ms.total_cmp(&b.gc_commit_max_ms))
        .cloned()
        .unwrap_or_default();
    Row {
        prepare: pair(|x| x.prepare),
        mounts: pair(|x| x.mounts),
        commit: pair(|x| x.commit),
        stat: pair(|x| x.stat),
        remove: pair(|x| x.remove),
        stats_ms: median(r, |x| x.stats_ms),
        gc_s: median(r, |x| x.gc_s),
        gc_removed: median(r, |x| x.gc_removed as f64) as u64,
        gc_commit_max_ms: longest.gc_commit_max_ms,
        gc_commit_max_wait_ms: longest.gc_commit_max_wait_ms,
        gc_commit_max_sync_ms: longest.gc_commit_max_sync_ms,
        gc_commit_p99_ms: median(r, |x| x.gc_commit_p99_ms),
        rss_mib: r.iter().map(|x| x.rss_mib).fold(0.0, f64::max),
        rss_base_mib: median(r, |x| x.rss_base_mib),
        reopen_after_fill_ms: r.first().map_or(f64::NAN, |x| x.reopen_after_fill_ms),
        recovery_ms: r.last().map_or(f64::NAN, |x| x.recovery_ms),
        gc_after_crash_s: r.last().map_or(f64::NAN, |x| x.gc_after_crash_s),
        gc_after_crash_commit_max_ms: r
            .last()
            .map_or(f64::NAN, |x| x.gc_after_crash_commit_max_ms),
        ..s.fill.clone()
    }
}

/// Each larger size's p99s against the smallest size's of the same round, on stdout:
/// per round, and their median.
fn print_ratios(sizes: &[Size]) {
    let Some((base, rest)) = sizes.split_first() else {
        return;
    };
    type Call = (&'static str, fn(&Row) -> f64);
    let calls: [Call; 4] = [
        ("Prepare", |r| r.prepare.1),
        ("Commit", |r| r.commit.1),
        ("Stat", |r| r.stat.1),
        ("Commit during GC", |r| r.gc_commit_p99_ms),
    ];
    for s in rest {
        println!(
            "\np99 at {} objects against {} objects, round by round (the median of the rounds' ratios; the ratio of the medians)",
            s.fill.objects, base.fill.objects
        );
        for (name, f) in calls {
            let ratios: Vec<f64> = s
                .rounds
                .iter()
                .zip(&base.rounds)
                .map(|(x, b)| f(x) / f(b))
                .collect();
            let shown: Vec<String> = ratios.iter().map(|q| format!("{q:.2}")).collect();
            println!(
                "  {name}: {} ({:.2}x; {:.2}x)",
                shown.join(" "),
                summary(ratios).0,
                median(&s.rounds, f) / median(&base.rounds, f)
            );
        }
    }
}

/// Every round of every size, as `scale-rounds.csv` keeps them.
fn rounds_csv(sizes: &[Size]) -> String {
    let mut out = String::from(
        "objects,round,prepare_p99_ms,mounts_p99_ms,commit_p99_ms,stat_p99_ms,remove_p99_ms,stats_ms,gc_s,gc_commit_p99_ms,gc_commit_max_ms,gc_commit_max_wait_ms,gc_commit_max_sync_ms,peak_rss_mib\n",
    );
    for s in sizes {
        for (i, r) in s.rounds.iter().enumerate() {
            out.push_str(&format!(
                "{},{i},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.1},{:.1},{:.1},{:.1},{:.1}\n",
                s.fill.objects,
                r.prepare.1,
                r.mounts.1,
                r.commit.1,
                r.stat.1,
                r.remove.1,
                r.stats_ms,
                r.gc_s,
                r.gc_commit_p99_ms,
                r.gc_commit_max_ms,
                r.gc_commit_max_wait_ms,
                r.gc_commit_max_sync_ms,
                r.rss_mib
            ));
        }
    }
    out
}

pub fn run(a: &ScaleArgs) -> Result<()> {
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "needs root (loop mount)");
    anyhow::ensure!(a.repeats >= 1, "--repeats must be at least 1");
    if let Some(row_to) = &a.row_to {
        let [n] = a.objects[..] else {
            anyhow::bail!("--row-to measures one store size");
        };
        let row = match (&a.serve, &a.fill) {
            (Some(root), _) => serve(a, root, a.layers)?,
            (None, Some(root)) => fill(a, root, n)?,
            (None, None) => anyhow::bail!("--row-to needs --fill or --serve"),
        };
        return Ok(fs::write(row_to, csv(&row))?);
    }
    let (work, _tmp) = work_dir(a.workdir.as_deref(), "cas-scale-")?;
    let mut sizes = Vec::new();
    for &n in &a.objects {
        let (_, layers) = shape(n);
        // each round collects its own 1% of the layers; the last layer is the loop's parent
        anyhow::ensure!(
            a.repeats * layers.div_ceil(100) < layers,
            "{n} objects make {layers} layers: too few for {} rounds of GC",
            a.repeats
        );
        let dir = work.join(format!("objects-{n}"));
        fs::create_dir_all(&dir)?;
        // a block and an inode per small object, and room to spare
        let fs_mib = (n as u64 * 12 / 1024).max(4 << 10);
        let loopfs = LoopFs::new(&dir, fs_mib, FsKind::Xfs)?;
        let root = loopfs.mnt.join("store");
        let row_file = dir.join("fill.csv");
        let fill = in_a_process(a, n, &row_file, &[OsStr::new("--fill"), root.as_os_str()])?;
        sizes.push(Size {
            n,
            dir,
            root,
            fill,
            rounds: Vec::new(),
            _fs: loopfs,
        });
    }
    for round in 0..a.repeats {
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let s = &mut sizes[i];
            let (layers, round_arg) = (s.fill.layers.to_string(), round.to_string());
            let mut args = vec![
                OsStr::new("--serve"),
                s.root.as_os_str(),
                OsStr::new("--layers"),
                OsStr::new(&layers),
                OsStr::new("--round"),
                OsStr::new(&round_arg),
            ];
            if round + 1 == a.repeats {
                args.push(OsStr::new("--recover"));
            }
            let row_file = s.dir.join(format!("round-{round}.csv"));
            let row = in_a_process(a, s.n, &row_file, &args)?;
            s.rounds.push(row);
        }
    }
    let mut rows = Vec::new();
    for s in &sizes {
        let mut row = combine(s);
        (row.fsck_s, row.fsck_rss_mib) = casctl(&s.root, &["fsck", "--json"])?;
        (row.rebuild_s, row.rebuild_rss_mib) = casctl(&s.root, &["rebuild-index"])?;
        rows.push(row);
    }
    fs::create_dir_all(&a.out)?;
    let mut out = String::from(HEADER);
    out.push('\n');
    for r in &rows {
        out.push_str(&csv(r));
        out.push('\n');
    }
    let csv_path = a.out.join("scale.csv");
    fs::write(&csv_path, out)?;
    fs::write(a.out.join("scale-rounds.csv"), rounds_csv(&sizes))?;
    plot(&a.out.join("scale.svg"), &rows)?;
    println!(
        "\n| objects | layers | fill | Prepare p50/p99 | Mounts p50/p99 | Commit p50/p99 | Stat p50/p99 | Remove p50/p99 | stats | GC of 1% | Commit during GC: p99; longest (of it: waiting for GC, syncfs) | peak RSS (after the open; the filling process's) | disk per object | recovery | first GC after it (longest Commit meanwhile) | reopen after the fill | fsck (peak RSS) | rebuild-index (peak RSS) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let pair = |p: (f64, f64)| format!("{:.2} / {:.2} ms", p.0, p.1);
    for r in &rows {
        println!(
            "| {} | {} | {:.0} s | {} | {} | {} | {} | {} | {:.2} ms | {:.2} s ({} objects) | {:.1} ms; {:.1} ms ({:.1}, {:.1}) | {:.0} MiB ({:.0}; {:.0}) | {:.0} B | {:.0} ms | {:.2} s ({:.1} ms) | {:.0} ms | {:.1} s ({:.0} MiB) | {:.1} s ({:.0} MiB) |",
            r.objects,
            r.layers,
            r.fill_s,
            pair(r.prepare),
            pair(r.mounts),
            pair(r.commit),
            pair(r.stat),
            pair(r.remove),
            r.stats_ms,
            r.gc_s,
            r.gc_removed,
            r.gc_commit_p99_ms,
            r.gc_commit_max_ms,
            r.gc_commit_max_wait_ms,
            r.gc_commit_max_sync_ms,
            r.rss_mib,
            r.rss_base_mib,
            r.fill_rss_mib,
            r.disk_per_object,
            r.recovery_ms,
            r.gc_after_crash_s,
            r.gc_after_crash_commit_max_ms,
            r.reopen_after_fill_ms,
            r.fsck_s,
            r.fsck_rss_mib,
            r.rebuild_s,
            r.rebuild_rss_mib
        );
    }
    print_ratios(&sizes);
    println!(
        "\nscale: {} ({} round(s) per size; each round in scale-rounds.csv) and the plot next to it",
        csv_path.display(),
        a.repeats
    );
    Ok(())
}
