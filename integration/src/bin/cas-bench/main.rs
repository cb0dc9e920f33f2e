//! `cas-bench`: benchmark images, the dedup benchmark (`make bench-dedup`) and the
//! performance benchmark against containerd's overlayfs (`make bench`, see [`perf`]).
//!
//! ```text
//! cas-bench images --cache DIR --versions N   # OCI layouts from DIR/rootfs/{base,app}-i
//! cas-bench dedup  --cache DIR --versions N --out FILE.md
//! cas-bench perf   [--quick] [--runs N] [--containerd 1.6|1.7|2|DIR] [--no-cas-diff] [--local] …
//! cas-bench durability [--runs N] [--workdir DIR]  # journal latency, recovery time
//! ```
//!
//! `scripts/bench-dedup.sh` builds the root filesystems (`debootstrap` bases, and an
//! `apt-get install` step run in an overlay mount above each base) and then runs both
//! commands. `dedup` starts a registry, containerd and our daemon, pulls every image of
//! the family with containerd's overlayfs snapshotter and with ours in the same
//! containerd, and after each version of the family reports:
//!
//! * bytes on disk of each snapshotter (`du`: blocks of every inode counted once,
//!   directories and metadata included, containerd's content store excluded);
//! * our file-level savings from `casctl stats` (logical = what the layers' regular
//!   files hold, physical = the objects);
//! * the file-level theoretical maximum, measured independently of our code: every
//!   regular file in containerd's overlayfs snapshots hashed, distinct contents against
//!   all contents (inodes counted once per layer, as overlayfs stores them).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas_integration::compression::Compression;
use cas_integration::fixture::finish_oci_layout;
use cas_integration::harness::{workspace_bin, Containerd, Daemon, Registry};
use cas_integration::registry::push_layout;
use cas_integration::rootfs::{write_dir_layer, write_dir_layer_as, DirKind};
use clap::{Parser, Subcommand};
use sha2::{Digest as _, Sha256};

mod durability;
mod engine;
mod gc;
mod images;
mod layout;
mod partial;
mod perf;
mod plot;
mod scale;

/// Benchmark images, the dedup benchmark and the performance benchmark.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build OCI layouts `images/base-i` (one layer) and `images/app-i` (base + app
    /// layer) from `rootfs/base-i` and the overlay upper `rootfs/app-i/upper`.
    Images {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long, default_value_t = 3)]
        versions: usize,
    },
    /// Pull the family into overlayfs and into cas-snapshotter; report bytes on disk.
    Dedup {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long, default_value_t = 3)]
        versions: usize,
        /// Markdown report to write.
        #[arg(long)]
        out: PathBuf,
        /// Where registry, containerd and the store live (default: a new temp dir).
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// Time unpacks and pulls with overlayfs and with cas-snapshotter in one containerd;
    /// write report.md, results/bench.csv and SVG plots.
    Perf(perf::PerfArgs),
    /// Commit record latency of both journal backends and recovery time with 1,000
    /// committed snapshots, on an XFS loop filesystem and on the filesystem under it.
    Durability(durability::DurabilityArgs),
    /// The fast path alone (no containerd): apply each layer blob into a new store and
    /// again into the same store, next to single-core decompression and `tar -x`.
    Engine(engine::EngineArgs),
    /// A layer's metadata as a stub tree and as one EROFS image: write, disk, walk.
    Layout(layout::LayoutArgs),
    /// GC of part of a large store while a Commit loop runs: GC time and commit stalls,
    /// over the GC candidates and in the first GC after an unclean stop.
    Gc(gc::GcArgs),
    /// Stores of growing size: request latencies, stats, GC of 1%, memory, disk per
    /// object and recovery against the number of objects.
    Scale(scale::ScaleArgs),
    /// Pulls over a shaped link: overlayfs's full pull against cas's partial pull of the
    /// same zstd:chunked images, v1 then a near-duplicate v2.
    Partial(partial::PartialArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The store's own logs (recovery phases of `durability`) when RUST_LOG asks for them.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(io::stderr)
        .init();
    let r = match args.cmd {
        Cmd::Images { cache, versions } => images(&cache, versions),
        Cmd::Dedup {
            cache,
            versions,
            out,
            workdir,
        } => dedup(&cache, versions, &out, workdir.as_deref()),
        Cmd::Perf(a) => perf::perf(&a),
        Cmd::Durability(a) => durability::run(&a),
        Cmd::Engine(a) => engine::run(&a),
        Cmd::Layout(a) => layout::run(&a),
        Cmd::Gc(a) => gc::run(&a),
        Cmd::Scale(a) => scale::run(&a),
        Cmd::Partial(a) => partial::run(&a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cas-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The type of the filesystem `dir` is on (`findmnt`), if it can be told.
pub fn fs_type(dir: &Path) -> Option<String> {
    Command::new("findmnt")
        .args(["-no", "FSTYPE", "--target"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn cmd() -> Vec<String> {
    vec!["/bin/sh".into()]
}

/// Builds whatever layout is missing. A layout is complete once its `.done` marker
/// exists next to it; the script removes the markers when it rebuilds a root fs.
fn images(cache: &Path, versions: usize) -> Result<()> {
    for i in 1..=versions {
        let base_dir = cache.join(format!("images/base-{i}"));
        let app_dir = cache.join(format!("images/app-{i}"));
        let done = |d: &Path| d.with_extension("done");
        let zstd_done = i != 1
            || ["base-1-zstd", "app-1-zstd"]
                .iter()
                .all(|n| done(&cache.join("images").join(n)).exists());
        if done(&base_dir).exists() && done(&app_dir).exists() && zstd_done {
            continue;
        }
        for d in [&base_dir, &app_dir] {
            let _ = fs::remove_dir_all(d);
            let _ = fs::remove_file(done(d));
        }
        let t = Instant::now();
        let rootfs = cache.join(format!("rootfs/base-{i}"));
        let upper = cache.join(format!("rootfs/app-{i}/upper"));
        let base_blobs = base_dir.join("blobs/sha256");
        let base = write_dir_layer(&rootfs, DirKind::Rootfs, &base_blobs)?;
        finish_oci_layout(&base_dir, std::slice::from_ref(&base), &cmd())?;
        let app_blobs = app_dir.join("blobs/sha256");
        fs::create_dir_all(&app_blobs)?;
        let name = &base.digest["sha256:".len()..];
        fs::hard_link(base_blobs.join(name), app_blobs.join(name))?;
        let app = write_dir_layer(&upper, DirKind::OverlayUpper, &app_blobs)?;
        finish_oci_layout(&app_dir, &[base.clone(), app.clone()], &cmd())?;
        File::create(done(&base_dir))?;
        File::create(done(&app_dir))?;
        if i == 1 {
            // the first version in zstd too: the same trees, the other compression
            let zbase_dir = cache.join("images/base-1-zstd");
            let zapp_dir = cache.join("images/app-1-zstd");
            for d in [&zbase_dir, &zapp_dir] {
                let _ = fs::remove_dir_all(d);
                let _ = fs::remove_file(done(d));
            }
            let zb = zbase_dir.join("blobs/sha256");
            let zbase = write_dir_layer_as(&rootfs, DirKind::Rootfs, &zb, Compression::Zstd)?;
            finish_oci_layout(&zbase_dir, std::slice::from_ref(&zbase), &cmd())?;
            let za = zapp_dir.join("blobs/sha256");
            fs::create_dir_all(&za)?;
            let name = &zbase.digest["sha256:".len()..];
            fs::hard_link(zb.join(name), za.join(name))?;
            let zapp = write_dir_layer_as(&upper, DirKind::OverlayUpper, &za, Compression::Zstd)?;
            finish_oci_layout(&zapp_dir, &[zbase, zapp], &cmd())?;
            File::create(done(&zbase_dir))?;
            File::create(done(&zapp_dir))?;
        }
        println!(
            "version {i}: base layer {} ({}), app layer {} ({}) in {:.1}s",
            short(&base.digest),
            mib(base.size),
            short(&app.digest),
            mib(app.size),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn short(d: &str) -> &str {
    &d["sha256:".len().."sha256:".len() + 12]
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// A difference of percentages, without the sign of a rounded-away negative zero.
fn points(d: f64) -> f64 {
    if d.abs() < 0.05 {
        0.0
    } else {
        d
    }
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

/// Waits (up to a minute) until `tmp` is empty, then syncs: what the store holds for good.
/// On XFS, the blocks it preallocated past the end of files that were growing (sled's
/// log, containerd's databases) are given back first, as XFS does by itself within
/// `fs.xfs.speculative_prealloc_lifetime` (five minutes).
fn settle(tmp: &Path, xfs: bool) -> Result<()> {
    let start = Instant::now();
    while fs::read_dir(tmp)?.next().is_some() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            bail!("{} still holds entries after a minute", tmp.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    nix::unistd::sync();
    if xfs {
        let out = Command::new("xfs_spaceman")
            .args(["-c", "prealloc -s"])
            .arg(tmp)
            .output()
            .context("running xfs_spaceman")?;
        if !out.status.success() {
            bail!(
                "xfs_spaceman prealloc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        nix::unistd::sync();
    }
    Ok(())
}

/// Bytes of the blocks allocated to the file `name` in each directory of `dir`.
fn blocks_of(dir: &Path, name: &str) -> Result<u64> {
    let mut bytes = 0;
    for e in fs::read_dir(dir)? {
        match fs::symlink_metadata(e?.path().join(name)) {
            Ok(md) => bytes += std::os::unix::fs::MetadataExt::blocks(&md) * 512,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(bytes)
}

/// `du -sB1 -x`: bytes of allocated blocks, each inode once.
fn du(path: &Path) -> Result<u64> {
    let out = Command::new("du")
        .arg("-sB1")
        .arg("-x")
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!(
            "du {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .context("du printed nothing")?
        .parse()
        .context("du output")
}

/// Regular-file contents of unpacked layers, hashed once per layer directory.
#[derive(Default)]
struct Contents {
    /// Layer directories already counted.
    seen_layers: HashSet<PathBuf>,
    /// Distinct content digest -> its size.
    distinct: HashMap<[u8; 32], u64>,
    /// Bytes of every regular file (inodes counted once per layer).
    total: u64,
    /// Files counted.
    files: u64,
}

impl Contents {
    fn add_layer(&mut self, dir: &Path) -> Result<()> {
        if !self.seen_layers.insert(dir.to_path_buf()) {
            return Ok(());
        }
        let mut inodes = HashSet::new();
        let mut buf = vec![0u8; 1 << 20];
        for e in walkdir::WalkDir::new(dir).follow_links(false) {
            let e = e?;
            if !e.file_type().is_file() {
                continue;
            }
            let md = e.metadata()?;
            if !inodes.insert(md.ino()) {
                continue;
            }
            let mut f = File::open(e.path())?;
            let mut h = Sha256::new();
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                h.update(&buf[..n]);
            }
            self.distinct.insert(h.finalize().into(), md.len());
            self.total += md.len();
            self.files += 1;
        }
        Ok(())
    }

    fn distinct_bytes(&self) -> u64 {
        self.distinct.values().sum()
    }

    fn max_savings(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * (1.0 - self.distinct_bytes() as f64 / self.total as f64)
    }
}

struct Row {
    versions: usize,
    /// du of the store's objects, snapshots (stubs, directories, manifests) and index.
    parts: [u64; 3],
    /// Of the snapshots: the blocks of the layers' images and of their manifests.
    images_du: u64,
    manifests_du: u64,
    images: usize,
    overlay_du: u64,
    cas_du: u64,
    logical: u64,
    physical: u64,
    objects: u64,
    files: u64,
    total: u64,
    distinct: u64,
    max_savings: f64,
}

impl Row {
    fn du_savings(&self) -> f64 {
        100.0 * (1.0 - self.cas_du as f64 / self.overlay_du as f64)
    }
    fn file_savings(&self) -> f64 {
        100.0 * (1.0 - self.physical as f64 / self.logical as f64)
    }
}

fn dedup(cache: &Path, versions: usize, out: &Path, workdir: Option<&Path>) -> Result<()> {
    let tmp;
    let work = match workdir {
        Some(w) => {
            fs::create_dir_all(w)?;
            w.to_path_buf()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("cas-bench-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let registry = Registry::start(&work.join("registry"))?;
    for i in 1..=versions {
        for kind in ["base", "app"] {
            let layout = cache.join(format!("images/{kind}-{i}"));
            if !layout.with_extension("done").exists() {
                bail!(
                    "{} is missing: run `cas-bench images` first",
                    layout.display()
                );
            }
            push_layout(
                &layout,
                &registry.addr,
                &format!("bench/{kind}"),
                &i.to_string(),
            )?;
        }
    }
    let bin = workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?;
    let store = work.join("store");
    let daemon = Daemon::start(
        &bin,
        &store,
        &work.join("cas.sock"),
        &work.join("cas-snapshotter.log"),
        None,
    )?;
    let containerd = Containerd::start(&work.join("containerd"), &daemon.sock)?;
    let overlay_root = containerd
        .dir
        .join("root/io.containerd.snapshotter.v1.overlayfs");
    let casctl = workspace_bin("casctl", "CASCTL_BIN")?;

    let xfs = fs_type(&work).as_deref() == Some("xfs");
    let mut contents = Contents::default();
    let mut rows = Vec::new();
    for i in 1..=versions {
        for kind in ["base", "app"] {
            let image = format!("{}/bench/{kind}:{i}", registry.addr);
            for sn in ["overlayfs", "cas"] {
                let t = Instant::now();
                containerd
                    .ctr(&[
                        "images",
                        "pull",
                        "--plain-http",
                        "--snapshotter",
                        sn,
                        &image,
                    ])
                    .with_context(|| format!("pulling {image} with {sn}"))?;
                println!(
                    "pulled {image} with {sn} in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
        // A Commit that ingested a tree deletes it in the background: measured after.
        settle(&store.join("cas/tmp"), xfs)?;
        // The overlayfs snapshots are the unpacked layers: the independent measure.
        for e in fs::read_dir(overlay_root.join("snapshots"))? {
            contents.add_layer(&e?.path().join("fs"))?;
        }
        let stats = Command::new(&casctl)
            .arg("--root")
            .arg(&store)
            .args(["stats", "--json"])
            .output()?;
        if !stats.status.success() {
            bail!("casctl stats: {}", String::from_utf8_lossy(&stats.stderr));
        }
        let s: serde_json::Value = serde_json::from_slice(&stats.stdout)?;
        let field = |k: &str| s[k].as_u64().with_context(|| format!("stats has no {k}"));
        let row = Row {
            parts: [
                du(&store.join("cas"))?,
                du(&store.join("snapshots"))?,
                du(&store.join("index"))?,
            ],
            images_du: blocks_of(&store.join("snapshots"), "layer.erofs")?,
            manifests_du: blocks_of(&store.join("snapshots"), "manifest")?,
            versions: i,
            images: 2 * i,
            overlay_du: du(&overlay_root.join("snapshots"))?,
            cas_du: du(&store)?,
            logical: field("logical_bytes")?,
            physical: field("physical_bytes")?,
            objects: field("objects")?,
            files: contents.files,
            total: contents.total,
            distinct: contents.distinct_bytes(),
            max_savings: contents.max_savings(),
        };
        println!(
            "{} version(s): overlayfs {} MB, cas {} MB on disk ({:.1}% saved); files {:.1}% saved, maximum {:.1}%",
            i,
            mb(row.overlay_du),
            mb(row.cas_du),
            row.du_savings(),
            row.file_savings(),
            row.max_savings
        );
        rows.push(row);
    }
    // One container from the last app image, to show the deduplicated tree runs.
    let image = format!("{}/bench/app:{versions}", registry.addr);
    let ran = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "cas",
        &image,
        "bench-run",
        "python3",
        "-c",
        "import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)",
    ])?;
    println!("container from {image}: {}", ran.trim());
    let fsck = Command::new(&casctl)
        .arg("--root")
        .arg(&store)
        .arg("fsck")
        .output()?;
    if !fsck.status.success() {
        bail!("casctl fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    }
    let fstype = fs_type(&work).unwrap_or_default();
    let report = render(&rows, ran.trim(), &fstype);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("\n{report}");
    drop(containerd);
    drop(daemon);
    drop(registry);
    Ok(())
}

fn render(rows: &[Row], ran: &str, fstype: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Dedup benchmark: Debian image families\n");
    let _ = writeln!(
        s,
        "Each version is an independent `debootstrap --variant=minbase bookworm` base image \
         and an app image (`apt-get install` of a few packages in a layer above that base). \
         A row holds every image of versions 1..N, pulled in one containerd with its \
         overlayfs snapshotter and with cas-snapshotter, both on one `{fstype}` filesystem. \
         Produced by `make bench-dedup`.\n"
    );
    let _ = writeln!(
        s,
        "| versions | images | overlayfs on disk (MB) | cas on disk (MB) | saved on disk | \
         files: logical / physical (MB) | files saved | theoretical max | gap to it (pts): \
         files / on disk |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1}% | {} / {} | {:.1}% | {:.1}% | {:.1} / {:.1} |",
            r.versions,
            r.images,
            mb(r.overlay_du),
            mb(r.cas_du),
            r.du_savings(),
            mb(r.logical),
            mb(r.physical),
            r.file_savings(),
            r.max_savings,
            points(r.max_savings - r.file_savings()),
            points(r.max_savings - r.du_savings()),
        );
    }
    let _ = writeln!(
        s,
        "\nIndependent measure (containerd's overlayfs snapshots, every regular file hashed):\n"
    );
    let _ = writeln!(s, "| versions | regular files | all contents (MB) | distinct contents (MB) | objects in cas | cas on disk: objects / snapshots (of which images, manifests) / index (MB) |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} / {} ({}, {}) / {} |",
            r.versions,
            r.files,
            mb(r.total),
            mb(r.distinct),
            r.objects,
            mb(r.parts[0]),
            mb(r.parts[1]),
            mb(r.images_du),
            mb(r.manifests_du),
            mb(r.parts[2]),
        );
    }
    let _ = writeln!(
        s,
        "\n*On disk* is `du -sB1 -x` of containerd's overlayfs `snapshots/` and of the whole \
         cas-snapshotter root (objects, stubs, manifests, index); both include directories. \
         *Files* is `casctl stats`: logical is what the layers' regular files hold, physical \
         the objects that store them. The theoretical maximum is 1 - distinct/all over the \
         regular files of the same layers, keyed on content only; on disk, both \
         snapshotters also keep every layer's directories, and we keep every layer's \
         metadata (its image, or its stubs and directories), a manifest per layer \
         (zstd-compressed) and the index, which is what separates the two savings columns. \
         Each row is measured once the store's background deletions are over, after a `sync` \
         (on XFS also after `xfs_spaceman -c 'prealloc -s'`: the blocks XFS preallocates past \
         the end of growing files, which it gives back by itself within five minutes). \
         A container from the last \
         app image printed: `{ran}`; `casctl fsck` was clean."
    );
    s
}
