//! The fast path alone: `cas::unpack::apply_blob` on the benchmark's layer blobs, with
//! no containerd, registry or gRPC around it, next to the two bounds an unpack cannot
//! beat and a plain unpacker of the same blob.
//!
//! For each layer, on one XFS loop filesystem, median of `--runs`, blob in the page
//! cache (its read is not what is measured; the pulls of `perf` include it):
//!
//! * **limit**: the blob through single-core `gzip -dc` / `zstd -dc` into a pipe that
//!   discards it (the physical limit of one stream), and
//! * **tar**: GNU `tar -x` of the same blob (decompressed by the same tool in a pipe)
//!   into an empty directory, then `syncfs`: what a plain, non-deduplicating unpacker
//!   costs when its result must be on disk, as ours is when `apply_blob` returns;
//! * **new**: `apply_blob` into an empty store (every object new);
//! * **known**: the same blob applied again into that store (every object known:
//!   the near-duplicate case, where only the layer's metadata is written).
//!
//! The layer's metadata is one EROFS image, as the daemon writes it where the kernel
//! mounts EROFS; `--layer-metadata stubs` measures a stub tree instead.
//!
//! The page cache is dropped before each timed step (after the blob is read once into
//! it again), so no step finds the previous one's pages. `cas-bench engine` prints the
//! table; `cas-bench perf` adds it to its report.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas::layout::Layout;
use cas::objects::ObjectStore;
use cas::unpack::{apply_blob, Limits, Target};
use cas_integration::compression::LayerCompression;
use cas_integration::harness::{FsKind, LoopFs};
use ringio::pool::{BackendChoice, Pool, PoolConfig};

use crate::images::{debian_images, ensure_images, Layer, Sizes};
use crate::perf::{cpu_times, decompress_args, drop_caches, summary, time_decompress, work_dir};

/// The Debian images measured when present: the bases (gzip, zstd), and the app layer
/// (the last layer of `app-1`, applied alone when named with `--image`).
const DEBIAN: [&str; 4] = ["base-1", "base-1-zstd", "app-1", "app-1-zstd"];

/// `cas-bench engine` arguments.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// Where generated image blobs are cached (rebuilt when missing).
    #[arg(long, default_value = "/var/cache/cas-bench")]
    pub cache: PathBuf,
    /// Runs per measure.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The small images of `perf --quick`.
    #[arg(long)]
    pub quick: bool,
    /// Images whose last layer is measured (default: every single-layer image, the
    /// Debian bases `scripts/bench-dedup.sh` builds among them when they are cached).
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// Where the loop file goes (default: a new directory in /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Force the I/O workers onto plain `pread`/`pwrite` threads (the fallback where
    /// io_uring is unavailable); by default io_uring where it works.
    #[arg(long)]
    pub threads: bool,
    /// New objects of at most this many bytes are written by plain threads beside the
    /// io_uring workers (`[ring] small_writes`; 0: every write through the ring).
    #[arg(long, default_value_t = ringio::DEFAULT_SMALL_WRITES)]
    pub small_writes: usize,
    /// How the applied layer's metadata is written: `erofs` (one image, the daemon's
    /// default where the kernel mounts EROFS) or `stubs` (a stub tree).
    #[arg(long, value_enum, default_value_t = Metadata::Erofs)]
    pub layer_metadata: Metadata,
}

/// The two layer layouts an apply can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metadata {
    /// One EROFS image per layer.
    Erofs,
    /// One stub inode per file, in the layer's tree.
    Stubs,
}

/// Medians (seconds) of one layer's measures.
pub struct EngineRow {
    pub image: String,
    pub files: u64,
    pub tar_bytes: u64,
    pub compression: &'static str,
    pub limit: f64,
    pub tar: f64,
    pub new: f64,
    pub known: f64,
}

impl EngineRow {
    fn mbps(&self, secs: f64) -> f64 {
        self.tar_bytes as f64 / 1e6 / secs
    }
}

/// `cas-bench engine`: measures and prints the table.
pub fn run(a: &EngineArgs) -> Result<()> {
    let (work, _keep) = work_dir(a.workdir.as_deref(), "cas-engine-")?;
    let fs = LoopFs::new(&work, 40 << 10, FsKind::Xfs).context("making the XFS loop filesystem")?;
    let pool = PoolConfig {
        backend: if a.threads {
            BackendChoice::Threads
        } else {
            BackendChoice::Auto
        },
        small_writes: a.small_writes,
        ..PoolConfig::default()
    };
    let rows = measure(
        &a.cache,
        Sizes { quick: a.quick },
        &a.images,
        &fs.mnt,
        a.runs,
        &pool,
        a.layer_metadata,
    )?;
    print!("{}", table(&rows));
    Ok(())
}

/// Measures the layers of `images` (every single-layer image when empty) in `dir`.
pub fn measure(
    cache: &Path,
    sizes: Sizes,
    images: &[String],
    dir: &Path,
    runs: usize,
    pool: &PoolConfig,
    metadata: Metadata,
) -> Result<Vec<EngineRow>> {
    let mut all = ensure_images(cache, sizes)?;
    // the real layers, where `scripts/bench-dedup.sh` built them
    all.extend(debian_images(cache, &DEBIAN)?);
    let pool = Pool::start(pool).context("starting the I/O pool")?;
    eprintln!(
        "engine: I/O workers on {}, layer metadata as {}",
        pool.backend().as_str(),
        metadata.describe()
    );
    let mut rows = Vec::new();
    for (name, image) in &all {
        if !images.is_empty() && !images.contains(name) {
            continue;
        }
        if images.is_empty() && image.layers.len() != 1 {
            continue;
        }
        let layer = image.layers.last().context("an image without layers")?;
        eprintln!("engine: {name}");
        let (mut limit, mut tar, mut new, mut known) = (vec![], vec![], vec![], vec![]);
        let mut tar_bytes = 0;
        for _ in 0..runs {
            warm(&layer.path)?;
            let (secs, bytes) = time_decompress(tool(layer), &layer.path)?;
            limit.push(secs);
            tar_bytes = bytes;
            let out = dir.join("tar");
            let _ = fs::remove_dir_all(&out);
            fs::create_dir_all(&out)?;
            cold(&layer.path)?;
            tar.push(tar_x(layer, &out)?);
            fs::remove_dir_all(&out)?;

            let root = dir.join("store");
            let _ = fs::remove_dir_all(&root);
            let layout = Layout::ensure(&root)?;
            let store = ObjectStore::new(&layout);
            cold(&layer.path)?;
            new.push(apply(&layout, &store, &pool, layer, 1, metadata)?);
            cold(&layer.path)?;
            known.push(apply(&layout, &store, &pool, layer, 2, metadata)?);
            drop(store);
            fs::remove_dir_all(&root)?;
        }
        let m = |v: Vec<f64>| summary(v).0;
        rows.push(EngineRow {
            image: name.clone(),
            files: layer.def.files(),
            tar_bytes,
            compression: layer.def.compression.as_str(),
            limit: m(limit),
            tar: m(tar),
            new: m(new),
            known: m(known),
        });
    }
    Ok(rows)
}

impl Metadata {
    /// How the report names it.
    pub fn describe(self) -> &'static str {
        match self {
            Metadata::Erofs => "one EROFS image",
            Metadata::Stubs => "a stub tree",
        }
    }
}

/// The table of `rows` (markdown).
pub fn table(rows: &[EngineRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| layer | files | tar MB | limit: `-dc` MB/s | tar -x + syncfs (s) | cas new (s) | cas known (s) | cas new / tar | cas known / tar | % of limit: tar / new / known |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let pct = |secs: f64| 100.0 * r.limit / secs;
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% / {:.0}% / {:.0}% |",
            r.image,
            r.compression,
            r.files,
            r.tar_bytes as f64 / 1e6,
            r.mbps(r.limit),
            r.tar,
            r.new,
            r.known,
            r.new / r.tar,
            r.known / r.tar,
            pct(r.tar),
            pct(r.new),
            pct(r.known),
        );
    }
    s
}

/// The single-core decompressor of `layer`'s blob (`cat` for a plain tar).
fn tool(layer: &Layer) -> &'static str {
    layer.def.compression.decompressor()
}

/// Reads the blob so it is in the page cache.
fn warm(blob: &Path) -> Result<()> {
    std::io::copy(&mut File::open(blob)?, &mut std::io::sink())?;
    Ok(())
}

/// Drops the page cache, then reads the blob into it again.
fn cold(blob: &Path) -> Result<()> {
    drop_caches()?;
    warm(blob)
}

/// `<tool> -dc blob | tar -x -C out`, then `syncfs` of `out`: seconds.
fn tar_x(layer: &Layer, out: &Path) -> Result<f64> {
    let cmd = tool(layer);
    let t = Instant::now();
    let mut dec = Command::new(cmd)
        .args(decompress_args(cmd))
        .arg(&layer.path)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    let status = Command::new("tar")
        .args(["-x", "--numeric-owner", "-C"])
        .arg(out)
        .stdin(dec.stdout.take().context("no stdout")?)
        .status()
        .context("starting tar")?;
    if !dec.wait()?.success() || !status.success() {
        bail!("tar -x of {} failed", layer.path.display());
    }
    let d = File::open(out)?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d))?;
    Ok(t.elapsed().as_secs_f64())
}

/// `apply_blob` of the layer into snapshot directory `n` of the store: seconds.
fn apply(
    layout: &Layout,
    store: &ObjectStore,
    pool: &Pool,
    layer: &Layer,
    n: u64,
    metadata: Metadata,
) -> Result<f64> {
    let dir = layout.snapshot_dir(n);
    let image = layout.image_file(n);
    let fs_dir = dir.join("fs");
    fs::create_dir_all(&fs_dir)?;
    let manifest = dir.join("manifest");
    let tmp = layout.tmp_dir();
    let target = Target {
        store,
        tmp_dir: &tmp,
        fs_dir: &fs_dir,
        lowers: &[],
        manifest: &manifest,
        image: (metadata == Metadata::Erofs).then_some(image.as_path()),
        pool,
    };
    let digest = layer.blob.digest.parse().context("the blob's digest")?;
    // this thread is apply_blob's unpack thread
    let (thread, process) = (
        Path::new("/proc/thread-self/stat"),
        Path::new("/proc/self/stat"),
    );
    let cpu0 = cpu_times(thread)?;
    let all0 = cpu_times(process)?;
    let t = Instant::now();
    let blob = File::open(&layer.path)?;
    let applied = apply_blob(
        std::io::BufReader::with_capacity(1 << 20, blob),
        layer.blob.size,
        Some(digest),
        Limits::default(),
        &target,
    )
    .map_err(|f| f.error)
    .with_context(|| format!("applying {}", layer.path.display()))?;
    let secs = t.elapsed().as_secs_f64();
    let cpu1 = cpu_times(thread)?;
    let all1 = cpu_times(process)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "  apply {n}: {:.0} ms (CPU: all threads {:.0} ms, unpack thread: user {:.0} ms, system {:.0} ms): waiting for input {:.0} ms, for writes {:.0} ms, for stubs {:.0} ms, syncfs + manifest {:.0} ms",
        secs * 1e3,
        (all1.0 + all1.1 - all0.0 - all0.1) * 1e3,
        (cpu1.0 - cpu0.0) * 1e3,
        (cpu1.1 - cpu0.1) * 1e3,
        ms(applied.times.input_wait),
        ms(applied.times.write_wait),
        ms(applied.times.stub_wait),
        ms(applied.times.sync)
    );
    if applied.diff_id.to_string() != layer.blob.diff_id {
        bail!("diffID {} != {}", applied.diff_id, layer.blob.diff_id);
    }
    Ok(secs)
}
