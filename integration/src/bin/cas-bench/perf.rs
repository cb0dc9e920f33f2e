//! `cas-bench perf` (`make bench`): containerd's overlayfs snapshotter and ours, side by
//! side, in one containerd.
//!
//! Everything (registry storage, containerd's root, our store) lives on one fresh XFS
//! filesystem on a loop file: the ext4 root of these machines slows down over repeated
//! create/delete cycles, XFS on a loop file stays flat. Each case runs for both
//! snapshotters in turn, the order swapped every run; before each timed step every
//! image is removed (containerd's synchronous GC empties both snapshotters), the case's
//! setup runs (content fetched, a base unpacked), then `sync` and
//! `echo 3 > /proc/sys/vm/drop_caches`.
//!
//! A timed step is `ctr images pull`: with the content already fetched (`ctr content
//! fetch`) it only resolves the tag on the local registry and unpacks, which is how
//! `ctr` unpacks an image alone; a cold pull also downloads. containerd is the cached 2.x
//! by default (`--containerd` picks 1.6, 1.7, 2 or a directory), configured by the
//! harness for its release: on >= 1.7.4 with our `cas-diff` differ declared for `cas`.
//! 1.6 and 1.7's `ctr` unpack through the diff service, which falls back to walking when
//! `cas-diff` answers Unimplemented; 2.x's `ctr` pulls through the transfer service,
//! which does not fall back, so the bench then pulls with `--local` (see
//! `choose_unpack_path`). Per step
//! we record the time until `ctr` returns and until a following `sync` returns (our
//! commits are durable when they return, overlayfs' unpacks are not), the sectors the
//! loop device wrote (everything the step wrote, flushed by that `sync`), and the peak
//! RSS of our daemon and of containerd (`VmHWM`, reset through `clear_refs` before the
//! step).
//!
//! The physical limits are measured in the same run: single-threaded `gzip -dc`,
//! `pigz -dc` and `zstd -dc` of the same blobs (from page cache; MB/s of uncompressed
//! data) and `fio` sequential write and read on the same filesystem. A case's limit is
//! the longer of decompressing its blobs and writing its files' bytes at fio's rate.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas_integration::compression::LayerCompression;

use crate::{durability, engine, fs_type};
use cas_integration::harness::{
    differ_config, workspace_bin, Containerd, ContainerdBin, ContainerdOptions, ContainerdVersion,
    Daemon, FsKind, LoopFs, Registry,
};
use cas_integration::registry::push_layout;

use crate::images::{ensure_images, scaling_image, Image, Sizes};
use crate::plot;

/// Arguments of `cas-bench perf`.
#[derive(Debug, clap::Args)]
pub struct PerfArgs {
    /// Where generated image blobs are cached (rebuilt when missing).
    #[arg(long, default_value = "/var/cache/cas-bench")]
    pub cache: PathBuf,
    /// Directory for report.md; CSV and SVGs go to its results/.
    #[arg(long, default_value = "bench")]
    pub out: PathBuf,
    /// Smaller images, a few minutes in all (still `--runs` runs per case).
    #[arg(long)]
    pub quick: bool,
    /// Timed runs per case and snapshotter.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Which containerd: `1.6` (the system's), `1.7` or `2` (the series that
    /// scripts/containerd-versions.sh caches), or a directory holding `containerd`, `ctr`
    /// and the shim. Default: `2` when cached (our differ needs >= 1.7.4), else the
    /// system's.
    #[arg(long)]
    pub containerd: Option<String>,
    /// Do not declare our differ: both snapshotters unpack with containerd's walking
    /// differ. By default `cas-diff` is declared on containerd >= 1.7.4 (the diff
    /// service's first differ; on 2.x also the transfer service's differ for `cas`).
    #[arg(long)]
    pub no_cas_diff: bool,
    /// `ctr images pull --local` on containerd 2.x: the client unpacks through the diff
    /// service (which falls back to walking when `cas-diff` answers Unimplemented) rather
    /// than the transfer service. Chosen by itself when a transfer pull into `cas` fails
    /// for want of our Diff service.
    #[arg(long)]
    pub local: bool,
    /// The conformance harness's run.sh, for the Snapshots API benchmark (skipped if absent).
    #[arg(long)]
    pub conformance: Option<PathBuf>,
    /// Where the loop file goes (default: a new directory in /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Size of the (sparse) loop filesystem, GiB.
    #[arg(long, default_value_t = 40)]
    pub fs_gib: u64,
    /// Only these cases (by id: `unpack`, `near-dup`, `scale-100000`, …; repeat the flag);
    /// the report then holds only them. Default: every case.
    #[arg(long = "case")]
    pub only: Vec<String>,
}

/// The two snapshotters, as containerd names them.
pub const SNAPSHOTTERS: [&str; 2] = ["overlayfs", "cas"];

/// One benchmark case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short name (CSV, plots).
    pub id: String,
    /// What it measures.
    pub title: String,
    /// Images unpacked with the same snapshotter before the timed step.
    setup: Vec<String>,
    /// Images pulled in the timed step (at once when several).
    targets: Vec<String>,
    /// Whether the content is absent before the timed step (download included).
    cold: bool,
    /// Files of a scaling case.
    pub scaling_files: Option<u64>,
}

/// One timed step.
#[derive(Debug, Clone)]
pub struct Sample {
    pub case: String,
    pub sn: &'static str,
    pub run: usize,
    pub secs: f64,
    pub synced_secs: f64,
    pub written: u64,
    pub daemon_hwm_kib: u64,
    pub containerd_hwm_kib: u64,
    pub daemon_cpu: f64,
    pub containerd_cpu: f64,
    pub load1: f64,
}

/// median, min, max.
pub fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn cases(sizes: Sizes) -> Vec<Case> {
    let c = |id: &str, title: &str, setup: &[&str], targets: &[&str], cold: bool| Case {
        id: id.into(),
        title: title.into(),
        setup: setup.iter().map(|s| s.to_string()).collect(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
        cold,
        scaling_files: None,
    };
    let mut v = vec![
        c(
            "unpack",
            "unpack only (content present), base image, gzip",
            &[],
            &["base-1"],
            false,
        ),
        c(
            "unpack-zstd",
            "unpack only, the same base image, zstd",
            &[],
            &["base-1-zstd"],
            false,
        ),
        c(
            "cold-pull",
            "cold pull (fetch + unpack) of the base image",
            &[],
            &["base-1"],
            true,
        ),
        c(
            "near-dup",
            "unpack a near-duplicate base (another build of it present)",
            &["base-1"],
            &["base-2"],
            false,
        ),
        c(
            "large-files",
            "unpack one layer of large files",
            &[],
            &["large"],
            false,
        ),
        c(
            "small-files",
            "unpack one layer of small files",
            &[],
            &["small"],
            false,
        ),
        c(
            "app-on-base",
            "unpack an app layer over a present base",
            &["base-1"],
            &["app"],
            false,
        ),
        c(
            "4-pulls",
            "four cold pulls at once (near-duplicate bases)",
            &[],
            &["base-1", "base-2", "base-3", "base-4"],
            true,
        ),
    ];
    v[4].title = format!("{} ({})", v[4].title, "see sizes below");
    v[5].title = format!("unpack one layer of {} small files", sizes.small_files());
    for n in sizes.scaling() {
        let img = scaling_image(n);
        let mut case = c(
            &format!("scale-{n}"),
            &format!("unpack a layer of {n} files"),
            &[],
            &[&img],
            false,
        );
        case.scaling_files = Some(n);
        v.push(case);
    }
    v
}

struct Rig {
    // Drop order: containerd, daemon, registry, then the filesystem.
    containerd: Containerd,
    daemon: Daemon,
    registry: Registry,
    fs: LoopFs,
    dev: String,
    images: BTreeMap<String, Image>,
    /// Pass `--local` to `ctr images pull` (containerd 2.x).
    local: bool,
}

impl Rig {
    fn reference(&self, image: &str) -> String {
        format!("{}/bench/{image}:1", self.registry.addr)
    }

    fn remove_all_images(&self) -> Result<()> {
        let list = self.containerd.ctr(&["images", "ls", "-q"])?;
        for r in list.lines().filter(|l| !l.trim().is_empty()) {
            self.containerd.ctr(&["images", "rm", "--sync", r.trim()])?;
        }
        for sn in SNAPSHOTTERS {
            let left = self
                .containerd
                .ctr(&["snapshots", "--snapshotter", sn, "ls"])?;
            if left.lines().count() > 1 {
                bail!("{sn} still holds snapshots after removing every image:\n{left}");
            }
        }
        Ok(())
    }

    /// Best effort after a failed pull: every image, then whatever snapshots `sn` still
    /// holds (children before parents, so a few passes).
    fn remove_leftovers(&self, sn: &str) {
        if let Ok(list) = self.containerd.ctr(&["images", "ls", "-q"]) {
            for r in list.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.containerd.ctr(&["images", "rm", "--sync", r.trim()]);
            }
        }
        for _ in 0..8 {
            let Ok(list) = self
                .containerd
                .ctr(&["snapshots", "--snapshotter", sn, "ls"])
            else {
                return;
            };
            let keys: Vec<&str> = list
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            if keys.is_empty() {
                return;
            }
            for k in keys.iter().rev() {
                let _ = self
                    .containerd
                    .ctr(&["snapshots", "--snapshotter", sn, "rm", k]);
            }
        }
    }

    fn fetch(&self, image: &str) -> Result<()> {
        self.containerd
            .ctr(&["content", "fetch", "--plain-http", &self.reference(image)])
            .map(drop)
    }

    fn pull(&self, sn: &str, image: &str) -> Result<()> {
        let reference = self.reference(image);
        let mut args = vec!["images", "pull", "--plain-http"];
        if self.local {
            args.push("--local");
        }
        args.extend(["--snapshotter", sn, &reference]);
        self.containerd
            .ctr(&args)
            .with_context(|| format!("pulling {image} into {sn}"))
            .map(drop)
    }

    /// How the timed pulls unpack, for the report and the console. On containerd 2.x with
    /// `cas-diff` declared, first tries a transfer-service pull of the smallest image into
    /// `cas`: until the daemon serves Diff it fails ("not implemented"), and the bench
    /// pulls with `--local` instead, through the diff service and its fallback to walking.
    fn choose_unpack_path(&mut self) -> Result<String> {
        let c = &self.containerd;
        let ours = if c.differ {
            "`cas-diff` first, containerd's walking differ when it answers Unimplemented"
        } else {
            "containerd's walking differ"
        };
        if c.version.major < 2 {
            // 1.6 has no transfer service (nor --local); 1.7's ctr unpacks itself unless
            // --local=false.
            if self.local {
                println!(
                    "bench: --local ignored: containerd {}'s ctr unpacks itself",
                    c.version
                );
                self.local = false;
            }
            return Ok(format!(
                "`ctr images pull`, unpacked by the client through containerd's diff service \
                 (cas: {ours}; overlayfs: walking)"
            ));
        }
        if self.local {
            return Ok(format!(
                "`ctr images pull --local` (chosen with --local), unpacked by the client through \
                 containerd's diff service (cas: {ours}; overlayfs: walking)"
            ));
        }
        if !c.differ {
            return Ok(
                "`ctr images pull` through the transfer service (walking differ for both)".into(),
            );
        }
        let probe = self
            .images
            .iter()
            .min_by_key(|(_, img)| img.layers.iter().map(|l| l.blob.size).sum::<u64>())
            .map(|(name, _)| name.clone())
            .context("no images")?;
        let tried = self.fetch(&probe).and_then(|()| self.pull("cas", &probe));
        if tried.is_err() {
            self.remove_leftovers("cas");
        }
        self.remove_all_images()?;
        match tried {
            Ok(()) => Ok(
                "`ctr images pull` through the transfer service (cas: `cas-diff`; overlayfs: walking)"
                    .into(),
            ),
            Err(e) if format!("{e:#}").contains("not implemented") => {
                println!(
                    "bench: containerd {}'s transfer service cannot unpack into cas through cas-diff: \
                     the daemon does not serve Diff yet ({}). Pulling with `ctr images pull --local` \
                     instead (both snapshotters; cas-diff is tried first, then walking). \
                     CONTAINERD=1.7 measures the same path with 1.7's ctr.",
                    c.version,
                    format!("{e:#}").lines().next().unwrap_or_default()
                );
                self.local = true;
                Ok(format!(
                    "`ctr images pull --local`, unpacked by the client through containerd's diff \
                     service (cas: {ours}; overlayfs: walking): the transfer service's pull into cas \
                     through `cas-diff` failed, the daemon does not serve Diff yet"
                ))
            }
            Err(e) => Err(e.context(format!(
                "probe pull of {probe} into cas through the transfer service\n{}",
                self.containerd.log()
            ))),
        }
    }

    fn measure(&self, case: &Case, sn: &'static str, run: usize) -> Result<Sample> {
        self.remove_all_images()?;
        for img in &case.setup {
            self.fetch(img)?;
            self.pull(sn, img)?;
        }
        if !case.cold {
            for img in &case.targets {
                self.fetch(img)?;
            }
        }
        drop_caches()?;
        let dpid = self.daemon.pid().context("daemon not running")?;
        let cpid = self.containerd.pid().context("containerd not running")?;
        for p in [dpid, cpid] {
            fs::write(format!("/proc/{p}/clear_refs"), "5")?;
        }
        let (dcpu, ccpu) = (cpu_secs(dpid)?, cpu_secs(cpid)?);
        let load1 = load1()?;
        let sectors = sectors_written(&self.dev)?;
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let pulls: Vec<_> = case
                .targets
                .iter()
                .map(|img| s.spawn(move || self.pull(sn, img)))
                .collect();
            for p in pulls {
                p.join()
                    .map_err(|_| anyhow::anyhow!("pull thread panicked"))??;
            }
            Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        nix::unistd::sync();
        let synced_secs = t.elapsed().as_secs_f64();
        Ok(Sample {
            case: case.id.clone(),
            sn,
            run,
            secs,
            synced_secs,
            written: (sectors_written(&self.dev)? - sectors) * 512,
            daemon_hwm_kib: hwm_kib(dpid)?,
            containerd_hwm_kib: hwm_kib(cpid)?,
            daemon_cpu: cpu_secs(dpid)? - dcpu,
            containerd_cpu: cpu_secs(cpid)? - ccpu,
            load1,
        })
    }

    /// Layers a case's timed step applies (those its setup did not already unpack).
    fn applied(&self, case: &Case) -> Vec<&crate::images::Layer> {
        let present: HashSet<&str> = case
            .setup
            .iter()
            .flat_map(|i| self.images[i].layers.iter().map(|l| l.blob.digest.as_str()))
            .collect();
        case.targets
            .iter()
            .flat_map(|i| self.images[i].layers.iter())
            .filter(|l| !present.contains(l.blob.digest.as_str()))
            .collect()
    }
}

/// The containerd that `--containerd` names, or `2` when cached, else the system's.
fn select_containerd(arg: Option<&str>) -> Result<ContainerdBin> {
    if let Some(a) = arg {
        let bin = ContainerdBin::from_arg(a);
        if !bin.present() {
            bail!(
                "no containerd and ctr in {} (scripts/containerd-versions.sh, or make deps, \
                 fetches 1.7 and 2)",
                bin.dir().unwrap_or_default().display()
            );
        }
        return Ok(bin);
    }
    let two = ContainerdBin::Cached("2".into());
    if two.present() {
        return Ok(two);
    }
    println!(
        "bench: no cached containerd 2 in {} (scripts/containerd-versions.sh, or make deps): \
         using the system's containerd; on 1.6 both snapshotters unpack with the walking differ \
         (the cas-diff fast path needs >= {})",
        two.dir().unwrap_or_default().display(),
        ContainerdVersion::PROXY_DIFFER
    );
    Ok(ContainerdBin::System)
}

/// `casctl stats`' count of how the daemon's layers came in (one-pass applies by
/// `cas-diff`, or containerd's applier and an ingest at Commit), in words.
fn cas_layer_paths(store: &Path) -> String {
    let out = workspace_bin("casctl", "CASCTL_BIN").and_then(|bin| {
        Ok(Command::new(bin)
            .arg("--root")
            .arg(store)
            .args(["stats", "--json"])
            .output()?)
    });
    let stats: Option<serde_json::Value> = out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let Some(p) = stats
        .as_ref()
        .map(|s| &s["ingest_paths"])
        .filter(|p| p.is_object())
    else {
        return "unknown (no `casctl stats` from the daemon)".into();
    };
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    format!(
        "{} applied in one pass by `cas-diff`, {} written by containerd's applier and ingested \
         at commit ({} handed back by `cas-diff` as Unimplemented, {} failed)",
        n("fast_path_applies"),
        n("commit_ingests"),
        n("fallback_applies"),
        n("failed_applies")
    )
}

/// `given`, created if missing, or else a new directory in /var/tmp named `prefix…`,
/// removed when the returned guard drops.
pub fn work_dir(
    given: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(w) => {
            fs::create_dir_all(w)?;
            Ok((w.to_path_buf(), None))
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/var/tmp")?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}

/// `sync`, then drop the page cache, dentries and inodes.
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches (needs root)")
}

fn status_kib(pid: i32, key: &str) -> Result<u64> {
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

fn hwm_kib(pid: i32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

/// utime + stime of a process, seconds.
fn cpu_secs(pid: i32) -> Result<f64> {
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

fn load1() -> Result<f64> {
    Ok(fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()?)
}

fn sectors_written(dev: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/sys/block/{dev}/stat"))?;
    let f: Vec<&str> = s.split_whitespace().collect();
    Ok(f.get(6).context("short block stat")?.parse()?)
}

/// A physical-limit measurement: name, values (MB/s).
pub struct Limit {
    pub name: String,
    pub what: String,
    pub mbps: Vec<f64>,
}

/// Decompresses `blob` with `tool` (`gzip`, `pigz`, `zstd`; `cat` for a plain tar) on
/// one core into a pipe that is counted and discarded: (seconds, bytes out).
pub fn time_decompress(tool: &str, blob: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let mut child = Command::new(tool)
        .args(decompress_args(tool))
        .arg(blob)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool} (make deps)"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match out.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    if !child.wait()?.success() {
        bail!("{tool} -dc {} failed", blob.display());
    }
    Ok((t.elapsed().as_secs_f64(), n))
}

/// The arguments that make `tool` write `blob` decompressed to stdout.
pub fn decompress_args(tool: &str) -> &'static [&'static str] {
    if tool == "cat" {
        &[]
    } else {
        &["-dc"]
    }
}

/// `fio` sequential write then read of `mib` MiB in `dir`; MB/s of each.
fn fio(dir: &Path, mib: u64) -> Result<(f64, f64)> {
    fs::create_dir_all(dir)?;
    let file = dir.join("seq");
    let run = |rw: &str| -> Result<f64> {
        let out = Command::new("fio")
            .args([
                "--name=seq",
                &format!("--rw={rw}"),
                "--bs=1M",
                &format!("--size={mib}M"),
                "--ioengine=psync",
                "--end_fsync=1",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", file.display()))
            .output()
            .context("running fio (make deps)")?;
        if !out.status.success() {
            bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let key = if rw == "write" { "write" } else { "read" };
        let bw = v["jobs"][0][key]["bw_bytes"]
            .as_f64()
            .context("fio printed no bandwidth")?;
        Ok(bw / 1e6)
    };
    let w = run("write")?;
    drop_caches()?;
    let r = run("read")?;
    fs::remove_file(&file)?;
    Ok((w, r))
}

/// The Snapshots API benchmark of the conformance harness: containerd's benchsuite
/// against containerd's overlayfs served over gRPC (`ref`) and against our daemon.
/// Returns (label, metric, ms per layer) for every count.
fn snapshots_api(
    run_sh: &Path,
    daemon_bin: &Path,
    cache: &Path,
    tmp: &Path,
    quick: bool,
    runs: usize,
    log: &Path,
) -> Result<Vec<(String, String, f64)>> {
    fs::create_dir_all(tmp)?;
    let out = Command::new("bash")
        .arg(run_sh)
        .arg("bench")
        .arg("ref")
        .arg(format!(
            "{} --root {{root}} --address {{sock}}",
            daemon_bin.display()
        ))
        .env("LABELS", "overlayfs,cas")
        .env("BENCHTIME", if quick { "2x" } else { "10x" })
        .env("COUNT", runs.to_string())
        .env("BUILD", cache.join("conf-build"))
        .env("CONF_TMP", tmp)
        .output()
        .context("running the conformance harness")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    fs::write(
        log,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )?;
    if !out.status.success() {
        bail!(
            "run.sh bench failed (see {}):\n{}",
            log.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_benchsuite(&text))
}

/// Layers per iteration of containerd's benchsuite.
const BENCHSUITE_LAYERS: f64 = 16.0;

/// `BenchmarkProxy/<label>/run-2  N  T ns/op …` and `BenchmarkProxy/<label>/prepare …`
/// lines into (label, metric, ms per layer).
fn parse_benchsuite(text: &str) -> Vec<(String, String, f64)> {
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != "ns/op" {
            continue;
        }
        let Some(name) = f[0].strip_prefix("BenchmarkProxy/") else {
            continue;
        };
        let mut parts = name.splitn(2, '/');
        let (Some(label), Some(metric)) = (parts.next(), parts.next()) else {
            continue;
        };
        let metric = if metric.starts_with("run") {
            "total"
        } else {
            metric
        };
        if let Ok(ns) = f[2].parse::<f64>() {
            v.push((
                label.to_string(),
                metric.to_string(),
                ns / 1e6 / BENCHSUITE_LAYERS,
            ));
        }
    }
    v
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs the whole benchmark and writes the report, CSV and plots.
pub fn perf(a: &PerfArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop mount, containerd, drop_caches)");
    }
    let started = Instant::now();
    let ctrd_bin = select_containerd(a.containerd.as_deref())?;
    let sizes = Sizes { quick: a.quick };
    let images = ensure_images(&a.cache, sizes)?;
    let (work, _tmp) = work_dir(a.workdir.as_deref(), "cas-perf-")?;
    let loopfs = LoopFs::new(&work, a.fs_gib << 10, FsKind::Xfs)?;
    let dev = loopfs.device()?;
    let m = loopfs.mnt.clone();
    let registry = Registry::start(&m.join("registry"))?;
    for (name, img) in &images {
        push_layout(&img.layout, &registry.addr, &format!("bench/{name}"), "1")?;
    }
    let bin = workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?;
    // cas-diff reads the blobs of this run's containerd, not the host's.
    let daemon_cfg = m.join("cas-snapshotter.toml");
    fs::write(&daemon_cfg, differ_config(&m.join("containerd")))?;
    let daemon = Daemon::start(
        &bin,
        &m.join("store"),
        &m.join("cas.sock"),
        &m.join("cas-snapshotter.log"),
        Some(&daemon_cfg),
    )?;
    let mut opts = ContainerdOptions::with_bin(ctrd_bin.clone()).differ(!a.no_cas_diff);
    opts.plain_http_registries.push(registry.addr.clone());
    let containerd = Containerd::start_with(&m.join("containerd"), &daemon.sock, &opts)?;
    let ctrd = format!("{} ({ctrd_bin})", containerd.version);
    if !containerd.differ && !a.no_cas_diff {
        println!(
            "bench: containerd {} has no proxy differs (>= {} needed): both snapshotters unpack \
             with the walking differ; CONTAINERD=1.7 or 2 for cas-diff",
            containerd.version,
            ContainerdVersion::PROXY_DIFFER
        );
    }
    let mut rig = Rig {
        containerd,
        daemon,
        registry,
        fs: loopfs,
        dev,
        images,
        local: a.local,
    };
    println!(
        "bench: containerd {ctrd}, cas-diff declared: {}; XFS on /dev/{} at {}",
        rig.containerd.differ,
        rig.dev,
        rig.fs.mnt.display()
    );
    let unpack = rig.choose_unpack_path()?;
    println!("bench: unpack: {unpack}");

    let mut cases = cases(sizes);
    if !a.only.is_empty() {
        let unknown: Vec<&String> = a
            .only
            .iter()
            .filter(|id| !cases.iter().any(|c| &c.id == *id))
            .collect();
        if !unknown.is_empty() {
            let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
            bail!("unknown case {unknown:?}; the cases are {ids:?}");
        }
        cases.retain(|c| a.only.contains(&c.id));
    }
    let mut samples = Vec::new();
    for case in &cases {
        for run in 0..a.runs {
            let order = if run % 2 == 0 {
                SNAPSHOTTERS
            } else {
                [SNAPSHOTTERS[1], SNAPSHOTTERS[0]]
            };
            for sn in order {
                let s = rig
                    .measure(case, sn, run)
                    .with_context(|| format!("case {} with {sn}", case.id))?;
                println!(
                    "{:<12} {:<9} run {}: {:>7.2}s ({:.2}s synced), wrote {:.1} MB, daemon peak {:.0} MiB, load {:.1}",
                    case.id,
                    sn,
                    run + 1,
                    s.secs,
                    s.synced_secs,
                    s.written as f64 / 1e6,
                    s.daemon_hwm_kib as f64 / 1024.0,
                    s.load1
                );
                samples.push(s);
            }
        }
    }
    rig.remove_all_images()?;
    let cas_layers = cas_layer_paths(&rig.daemon.root);
    println!("bench: cas layers since the daemon started: {cas_layers}");

    // Physical limits, on the same blobs and filesystem.
    let mut limits = Vec::new();
    let base = &rig.images["base-1"].layers[0];
    let base_zstd = &rig.images["base-1-zstd"].layers[0];
    let mut decomp_rate: BTreeMap<String, f64> = BTreeMap::new();
    for (tool, layer) in [("gzip", base), ("pigz", base), ("zstd", base_zstd)] {
        time_decompress(tool, &layer.path)?; // page cache
        let mut v = Vec::new();
        for _ in 0..a.runs {
            let (s, n) = time_decompress(tool, &layer.path)?;
            v.push(n as f64 / s / 1e6);
        }
        limits.push(Limit {
            name: format!("{tool} -dc"),
            what: format!(
                "base layer, {:.0} MB blob, MB/s of tar out",
                layer.blob.size as f64 / 1e6
            ),
            mbps: v,
        });
    }
    // Decompression time of every blob a case applies (median of the runs).
    for case in &cases {
        for l in rig.applied(case) {
            if decomp_rate.contains_key(&l.blob.digest) {
                continue;
            }
            let tool = l.blob.compression.decompressor();
            time_decompress(tool, &l.path)?;
            let mut v = Vec::new();
            for _ in 0..a.runs {
                v.push(time_decompress(tool, &l.path)?.0);
            }
            decomp_rate.insert(l.blob.digest.clone(), summary(v).0);
        }
    }
    let fio_mib = if a.quick { 512 } else { 2048 };
    let (mut w, mut r) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        let (ws, rs) = fio(&rig.fs.mnt.join("fio"), fio_mib)?;
        w.push(ws);
        r.push(rs);
    }
    let fio_write = summary(w.clone()).0;
    limits.push(Limit {
        name: "fio write".into(),
        what: format!("sequential, 1 MiB blocks, {fio_mib} MiB, fsync at end"),
        mbps: w,
    });
    limits.push(Limit {
        name: "fio read".into(),
        what: format!("sequential, 1 MiB blocks, {fio_mib} MiB, caches dropped"),
        mbps: r,
    });
    let case_limits: BTreeMap<String, f64> = cases
        .iter()
        .filter(|c| !c.cold && c.targets.len() == 1)
        .map(|c| {
            let layers = rig.applied(c);
            let decomp: f64 = layers.iter().map(|l| decomp_rate[&l.blob.digest]).sum();
            let bytes: u64 = layers.iter().map(|l| l.def.file_bytes()).sum();
            let write = bytes as f64 / 1e6 / fio_write;
            (c.id.clone(), decomp.max(write))
        })
        .collect();

    let api = match &a.conformance {
        Some(run_sh) if run_sh.is_file() => {
            println!("bench: Snapshots API benchmark (containerd's benchsuite)");
            snapshots_api(
                run_sh,
                &bin,
                &a.cache,
                &rig.fs.mnt.join("conf-tmp"),
                a.quick,
                a.runs,
                &a.out.join("results/snapshots-api.log"),
            )?
        }
        _ => Vec::new(),
    };

    // Durability costs on the same XFS and on the filesystem under it.
    let durability_dirs = [
        rig.fs.mnt.join("durability"),
        work.join("durability-backing-fs"),
    ];
    let mut targets = Vec::new();
    let backing_fs = fs_type(&work);
    for (fs_name, dir) in [
        "xfs".to_string(),
        backing_fs.clone().unwrap_or_else(|| "?".into()),
    ]
    .into_iter()
    .zip(&durability_dirs)
    {
        fs::create_dir_all(dir)?;
        targets.push(durability::Target {
            fs: fs_name,
            dir: dir.clone(),
        });
    }
    let durability = durability::measure(&targets, a.runs)?;
    for d in &durability_dirs {
        let _ = fs::remove_dir_all(d);
    }

    // The fast path alone, on the same filesystem.
    println!("bench: the fast path without containerd");
    let engine_dir = rig.fs.mnt.join("engine");
    fs::create_dir_all(&engine_dir)?;
    let engine_images: Vec<String> = ["base-1", "base-1-zstd", "large", "small"]
        .iter()
        .map(|s| s.to_string())
        .chain(sizes.scaling().first().map(|n| scaling_image(*n)))
        .collect();
    let engine = engine::measure(
        &a.cache,
        sizes,
        &engine_images,
        &engine_dir,
        a.runs,
        ringio::pool::BackendChoice::Auto,
    )?;
    let _ = fs::remove_dir_all(&engine_dir);

    let sizes_rows: Vec<(String, u64, u64, u64, &'static str)> = rig
        .images
        .values()
        .flat_map(|img| {
            img.layers.iter().map(move |l| {
                (
                    img.name.clone(),
                    l.def.files(),
                    l.def.file_bytes(),
                    l.blob.size,
                    l.blob.compression.as_str(),
                )
            })
        })
        .collect();
    let header = Header {
        quick: a.quick,
        runs: a.runs,
        containerd: ctrd,
        containerd_arg: a.containerd.clone(),
        cas_diff: rig.containerd.differ,
        unpack,
        cas_layers,
        fs_gib: a.fs_gib,
        backing_fs: backing_fs.unwrap_or_default(),
        minutes: started.elapsed().as_secs_f64() / 60.0,
        max_load: samples.iter().map(|s| s.load1).fold(0.0, f64::max),
    };
    drop(rig);

    let results = a.out.join("results");
    fs::create_dir_all(&results)?;
    let mut table = csv(&samples, &limits, &api);
    durability::csv(&durability, &mut table);
    fs::write(results.join("bench.csv"), table)?;
    plot::times(&results.join("bench-times.svg"), &cases, &samples)?;
    plot::scaling(&results.join("bench-scaling.svg"), &cases, &samples)?;
    let report = render(
        &header,
        &cases,
        &samples,
        &case_limits,
        &limits,
        &ApiSections {
            api: &api,
            durability: durability::render(&durability),
            engine: engine::table(&engine),
        },
        &sizes_rows,
    );
    fs::write(a.out.join("report.md"), &report)?;
    println!("\n{report}");
    Ok(())
}

/// The report's sections on the Snapshots API and on durability.
struct ApiSections<'a> {
    /// containerd's benchsuite: (label, metric, ms per layer).
    api: &'a [(String, String, f64)],
    /// Journal latency and recovery, rendered.
    durability: String,
    /// The fast path alone, rendered.
    engine: String,
}

struct Header {
    quick: bool,
    runs: usize,
    containerd: String,
    containerd_arg: Option<String>,
    cas_diff: bool,
    unpack: String,
    cas_layers: String,
    fs_gib: u64,
    backing_fs: String,
    minutes: f64,
    max_load: f64,
}

fn csv(samples: &[Sample], limits: &[Limit], api: &[(String, String, f64)]) -> String {
    let mut s = String::from("case,snapshotter,run,metric,value\n");
    for x in samples {
        let sn = x.sn;
        let r = x.run + 1;
        for (metric, v) in [
            ("seconds", x.secs),
            ("seconds_synced", x.synced_secs),
            ("written_bytes", x.written as f64),
            ("daemon_peak_rss_kib", x.daemon_hwm_kib as f64),
            ("containerd_peak_rss_kib", x.containerd_hwm_kib as f64),
            ("daemon_cpu_seconds", x.daemon_cpu),
            ("containerd_cpu_seconds", x.containerd_cpu),
            ("load1", x.load1),
        ] {
            let _ = writeln!(s, "{},{sn},{r},{metric},{v}", x.case);
        }
    }
    for l in limits {
        for (i, v) in l.mbps.iter().enumerate() {
            let _ = writeln!(s, "limit/{},-,{},mb_per_second,{v:.1}", l.name, i + 1);
        }
    }
    let mut count: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (label, metric, ms) in api {
        let n = count.entry((label.clone(), metric.clone())).or_default();
        *n += 1;
        let _ = writeln!(s, "snapshots-api/{metric},{label},{n},ms_per_layer,{ms:.3}");
    }
    s
}

fn values(samples: &[Sample], case: &str, sn: &str, f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.case == case && s.sn == sn)
        .map(f)
        .collect()
}

fn fmt_range(v: Vec<f64>, digits: usize) -> String {
    let (m, lo, hi) = summary(v);
    format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
}

fn render(
    h: &Header,
    cases: &[Case],
    samples: &[Sample],
    case_limits: &BTreeMap<String, f64>,
    limits: &[Limit],
    api: &ApiSections,
    sizes: &[(String, u64, u64, u64, &'static str)],
) -> String {
    let ApiSections {
        api,
        durability,
        engine,
    } = api;
    let mut s = String::new();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem = status_like("/proc/meminfo", "MemTotal:").unwrap_or(0) as f64 / (1 << 20) as f64;
    let _ = writeln!(
        s,
        "# Benchmark: cas-snapshotter against containerd's overlayfs\n"
    );
    let _ = writeln!(
        s,
        "Produced by `make bench{}{}`; raw numbers in [`results/bench.csv`](results/bench.csv), \
         plots [`results/bench-times.svg`](results/bench-times.svg) and \
         [`results/bench-scaling.svg`](results/bench-scaling.svg).\n",
        if h.quick { " QUICK=1" } else { "" },
        h.containerd_arg
            .as_deref()
            .map_or(String::new(), |c| format!(" CONTAINERD={c}"))
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = if h.max_load > 1.0 {
        format!(
            " **Busy machine**: 1-minute load average up to {:.1} on {cores} cores at the start of a timed \
             step (the benchmark's own earlier steps count in it, and any other work on the machine): \
             absolute times are noisy, compare the ratios.",
            h.max_load
        )
    } else {
        String::new()
    };
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| machine | {cpu}, {} cores, {mem:.0} GiB RAM |",
        sh("nproc", &[])
    );
    let _ = writeln!(s, "| kernel | {} |", sh("uname", &["-r"]));
    let _ = writeln!(
        s,
        "| filesystem | XFS (`mkfs.xfs` defaults) on a {} GiB sparse loop file on {}: registry, containerd's root and our store |",
        h.fs_gib, h.backing_fs
    );
    let _ = writeln!(
        s,
        "| containerd | {} (one instance, both snapshotters){} |",
        h.containerd,
        if h.cas_diff {
            ", `cas-diff` declared"
        } else {
            ", walking differ"
        }
    );
    let _ = writeln!(s, "| unpack | {} |", h.unpack);
    let _ = writeln!(s, "| cas layers | {} |", h.cas_layers);
    let _ = writeln!(
        s,
        "| runs | {} per case and snapshotter, alternating, caches dropped before each; {} images |",
        h.runs,
        if h.quick { "QUICK (small)" } else { "full-size" }
    );
    let _ = writeln!(
        s,
        "| date | {} ({:.0} minutes) |",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        h.minutes
    );
    let _ = writeln!(
        s,
        "\nTimes are seconds until `ctr` returns, median [min–max].{shared}\n"
    );

    let _ = writeln!(
        s,
        "| case | overlayfs (s) | cas (s) | cas / overlayfs | limit (s) | % of limit: overlayfs / cas | \
         until synced (s): overlayfs / cas | written (MB): overlayfs / cas | peak RSS (MiB): cas daemon / containerd with cas |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for c in cases.iter().filter(|c| c.scaling_files.is_none()) {
        let o = values(samples, &c.id, "overlayfs", |x| x.secs);
        let ours = values(samples, &c.id, "cas", |x| x.secs);
        let (om, cm) = (summary(o.clone()).0, summary(ours.clone()).0);
        let limit = case_limits.get(&c.id);
        let lim = limit.map_or("–".into(), |l| format!("{l:.2}"));
        let pct = limit.map_or("–".into(), |l| {
            format!("{:.0}% / {:.0}%", 100.0 * l / om, 100.0 * l / cm)
        });
        let med = |sn: &str, f: &dyn Fn(&Sample) -> f64| summary(values(samples, &c.id, sn, f)).0;
        let _ = writeln!(
            s,
            "| **{}**: {} | {} | {} | {:.2} | {lim} | {pct} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
            c.id,
            c.title,
            fmt_range(o, 2),
            fmt_range(ours, 2),
            cm / om,
            med("overlayfs", &|x| x.synced_secs),
            med("cas", &|x| x.synced_secs),
            med("overlayfs", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.daemon_hwm_kib as f64 / 1024.0),
            med("cas", &|x| x.containerd_hwm_kib as f64 / 1024.0),
        );
    }

    let _ = writeln!(s, "\n## Scaling with the number of files\n");
    let _ = writeln!(
        s,
        "One layer of N files of 0–2 KiB each, unpacked with the content present. Linear growth \
         keeps the per-file columns flat.\n"
    );
    let _ = writeln!(
        s,
        "| files | overlayfs (s) | cas (s) | cas / overlayfs | overlayfs µs/file | cas µs/file | cas daemon peak RSS (MiB) | written (MB): overlayfs / cas |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for c in cases.iter().filter(|c| c.scaling_files.is_some()) {
        let n = c.scaling_files.unwrap_or(1) as f64;
        let o = values(samples, &c.id, "overlayfs", |x| x.secs);
        let ours = values(samples, &c.id, "cas", |x| x.secs);
        let (om, cm) = (summary(o.clone()).0, summary(ours.clone()).0);
        let med = |sn: &str, f: &dyn Fn(&Sample) -> f64| summary(values(samples, &c.id, sn, f)).0;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} |",
            n,
            fmt_range(o, 2),
            fmt_range(ours, 2),
            cm / om,
            om / n * 1e6,
            cm / n * 1e6,
            med("cas", &|x| x.daemon_hwm_kib as f64 / 1024.0),
            med("overlayfs", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.written as f64 / 1e6),
        );
    }

    let _ = writeln!(s, "\n## Physical limits (same run, same filesystem)\n");
    let _ = writeln!(
        s,
        "| measure | MB/s, median [min–max] | of what |\n|---|---|---|"
    );
    for l in limits {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} |",
            l.name,
            fmt_range(l.mbps.clone(), 0),
            l.what
        );
    }
    let _ = writeln!(
        s,
        "\nA case's *limit* is the longer of two lower bounds: decompressing its blobs with `gzip -dc` \
         (`zstd -dc`) on one core, and writing its files' bytes at fio's sequential write rate. \
         *% of limit* is limit / median time: 100% would be an unpack as fast as decompression alone."
    );

    let _ = writeln!(s, "\n## The fast path alone (no containerd)\n");
    let _ = writeln!(
        s,
        "`cas::unpack::apply_blob` on the same blobs, called directly (`make bench-engine`), on the same \
         filesystem: *cas new* into an empty store, *cas known* the same blob again into that store (the \
         near-duplicate case: only stubs are written). *tar -x + syncfs* is GNU tar fed by the same \
         decompressor, then `syncfs`: a plain unpacker whose result is on disk, as ours is when the \
         apply returns. *limit* is single-core `gzip -dc` / `zstd -dc` into a pipe; *% of limit* is \
         limit / time (above 100%: faster than that tool alone). The blob is in the page cache, the \
         rest of the cache dropped before each step; medians of the runs.\n"
    );
    s.push_str(engine);

    if !api.is_empty() {
        let _ = writeln!(
            s,
            "\n## Snapshots API latency (containerd's benchsuite over gRPC)\n"
        );
        let _ = writeln!(
            s,
            "containerd's `snapshots/benchsuite` through the conformance harness: 16 layers per \
             iteration, each Prepare, mount + write ~10 files of 1 MiB + unmount, Commit; \
             `overlayfs` is containerd's own overlayfs snapshotter served over gRPC by the \
             harness's reference server. Milliseconds per layer; *total* is the median [min–max] over the counts, the steps are the last count's (upstream prints them once).\n"
        );
        let _ = writeln!(
            s,
            "| step | overlayfs (ms) | cas (ms) | cas / overlayfs |\n|---|---|---|---|"
        );
        for metric in ["prepare", "write", "commit", "total"] {
            let get = |label: &str| -> Vec<f64> {
                api.iter()
                    .filter(|(l, m, _)| l == label && m == metric)
                    .map(|x| x.2)
                    .collect()
            };
            let (o, c) = (get("overlayfs"), get("cas"));
            if o.is_empty() || c.is_empty() {
                continue;
            }
            let ratio = summary(c.clone()).0 / summary(o.clone()).0;
            let _ = writeln!(
                s,
                "| {metric} | {} | {} | {ratio:.2} |",
                fmt_range(o, 2),
                fmt_range(c, 2)
            );
        }
    }

    let _ = writeln!(s);
    s.push_str(durability);

    let _ = writeln!(s, "\n## Images\n");
    let _ = writeln!(
        s,
        "Generated by `cas_integration::fixture::write_files_layer` (deterministic content, half of \
         every 4 KiB block repeating a pattern, so gzip gets about 2:1), cached under the `--cache` \
         directory. `base-2..4` are independent builds of `base-1`: the same `usr/` files with other \
         times and their own `etc/` files. `app` is `base-1`'s layer plus an app layer.\n"
    );
    let _ = writeln!(s, "| image | layer files | file bytes (MB) | blob (MB) | compression |\n|---|---|---|---|---|");
    for (name, files, bytes, blob, comp) in sizes {
        let _ = writeln!(
            s,
            "| {name} | {files} | {:.1} | {:.1} | {comp} |",
            *bytes as f64 / 1e6,
            *blob as f64 / 1e6
        );
    }
    let _ = writeln!(
        s,
        "\n## Method\n\nEach timed step is `ctr images pull` after every image was removed \
         (`ctr images rm --sync`: containerd's GC empties both snapshotters) and the case's setup \
         ran: content fetched with `ctr content fetch` (all cases but the cold pulls, so only the \
         unpack is timed; the pull still resolves the tag on the local registry), a base unpacked \
         with the same snapshotter for the near-duplicate and app cases. Then `sync`, \
         `echo 3 > /proc/sys/vm/drop_caches`, and the step. *Until synced* adds a `sync` after \
         `ctr` returns: our Commit makes a layer durable before it returns, containerd's overlayfs \
         leaves dirty pages behind. *Written* is the loop device's sectors written over the step \
         and that `sync` (`/sys/block/<dev>/stat`): everything containerd, the snapshotters and \
         the filesystem wrote. *Peak RSS* is `VmHWM`, reset through `/proc/<pid>/clear_refs` \
         before the step. Daemon and containerd CPU seconds per step are in the CSV."
    );
    s
}

fn status_like(path: &str, key: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
