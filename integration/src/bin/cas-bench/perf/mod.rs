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
//!
//! Where each part lives: `cases` (what runs), `rig` (containerd, registry, daemon and
//! the timed step), `measure` (readings of the machine), `limits` (the physical limits
//! and containerd's Snapshots API benchmark), `userns` (user-namespaced container
//! starts, containerd 2.x), `report` (the report and the CSV).

mod cases;
mod limits;
mod measure;
mod report;
mod rig;
mod userns;

pub use cases::*;
pub use limits::*;
pub use measure::*;
use report::*;
pub use rig::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas_integration::compression::LayerCompression;

use crate::{durability, engine, fs_type};
use cas_integration::harness::{
    differ_config, workspace_bin, Containerd, ContainerdOptions, ContainerdVersion, Daemon, FsKind,
    LoopFs, Registry,
};
use cas_integration::registry::push_layout;

use crate::images::{ensure_images, scaling_image, Sizes};
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
    /// Only these cases (by id: `unpack`, `near-dup`, `scale-100000`, `userns` for the
    /// user-namespaced starts, `engine` for the fast path alone, …; repeat the flag);
    /// the report then holds only them.
    /// Default: every case.
    #[arg(long = "case")]
    pub only: Vec<String>,
}

/// The id that selects the user-namespaced starts alone (`--case userns`).
const USERNS_CASE: &str = "userns";
/// The id that selects the fast path alone (`make bench-engine`'s measure) in `--case`.
const ENGINE_CASE: &str = "engine";

/// The two snapshotters, as containerd names them.
pub const SNAPSHOTTERS: [&str; 2] = ["overlayfs", "cas"];

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
    /// The daemon's RSS once the step and its `sync` are over: what it keeps.
    pub daemon_rss_after_kib: u64,
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

/// Runs the whole benchmark and writes the report, CSV and plots.
pub fn perf(a: &PerfArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop mount, containerd, drop_caches)");
    }
    let started = Instant::now();
    let ctrd_bin = select_containerd(a.containerd.as_deref())?;
    let sizes = Sizes { quick: a.quick };
    let mut images = ensure_images(&a.cache, sizes)?;
    let debian = crate::images::debian_images(&a.cache, &cases::DEBIAN_IMAGES)?;
    if debian.is_empty() {
        println!(
            "bench: no Debian images in {} (scripts/bench-dedup.sh builds them): synthetic cases only",
            a.cache.join("images").display()
        );
    }
    images.extend(debian);
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
    cases.extend(cases::debian_cases(&|name| rig.images.contains_key(name)));
    if !a.only.is_empty() {
        let unknown: Vec<&String> = a
            .only
            .iter()
            .filter(|id| {
                *id != USERNS_CASE && *id != ENGINE_CASE && !cases.iter().any(|c| &c.id == *id)
            })
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

    // User-namespaced starts: `--remap-labels` and proxy capabilities are 2.x's.
    let userns_image = ["debian-base-1", "base-1"]
        .into_iter()
        .find(|n| rig.images.contains_key(*n))
        .context("no base image")?;
    let want_userns = a.only.is_empty() || a.only.iter().any(|c| c == USERNS_CASE);
    let userns = if rig.containerd.version.major >= 2 && want_userns {
        println!("bench: user-namespaced container starts on {userns_image}");
        userns::measure(&rig, userns_image, a.runs.max(3))?
    } else {
        Vec::new()
    };
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
    let want_engine = a.only.is_empty() || a.only.iter().any(|c| c == ENGINE_CASE);
    let engine = if want_engine {
        println!("bench: the fast path without containerd");
        let engine_dir = rig.fs.mnt.join("engine");
        fs::create_dir_all(&engine_dir)?;
        let engine_images: Vec<String> = [
            "base-1",
            "base-1-zstd",
            "large",
            "small",
            "debian-base-1",
            "debian-base-1-zstd",
            "debian-app-1",
            "debian-app-1-zstd",
        ]
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
            &ringio::PoolConfig::default(),
            engine::Metadata::Erofs,
        )?;
        let _ = fs::remove_dir_all(&engine_dir);
        engine
    } else {
        Vec::new()
    };

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
    userns::csv(&userns, &mut table);
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
            engine: if engine.is_empty() {
                String::new()
            } else {
                engine::table(&engine)
            },
            userns: if userns.is_empty() {
                String::new()
            } else {
                userns::render(userns_image, &userns)
            },
        },
        &sizes_rows,
    );
    fs::write(a.out.join("report.md"), &report)?;
    println!("\n{report}");
    Ok(())
}
