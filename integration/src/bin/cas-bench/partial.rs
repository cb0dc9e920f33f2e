//! `cas-bench partial`: pulls over a shaped link, overlayfs's full pull against cas's
//! partial pull of the same zstd:chunked images.
//!
//! The registry runs in a network namespace of its own behind a veth pair whose
//! registry side is shaped with `tbf` (each `--rates`). The images are two independent
//! builds of the same Debian base + app (`make bench-dedup`'s `app-1` and `app-2`),
//! converted to zstd:chunked (with a tar-split) by containers/storage (unstable's
//! skopeo, which `make deps` unpacks), or by `remote::encode` where that is missing.
//! Each run starts a fresh containerd 2.x and daemon and pulls v1 (nothing in common
//! with the empty store), then v2 (a near-duplicate): with overlayfs (containerd fetches every blob,
//! cas-diff is not involved) and with cas (the transfer service passes the layers'
//! labels; the daemon fetches the TOCs and the files it lacks). Timed: `ctr images
//! pull` until it returns, and until a `sync` after it returns (durable: the fair
//! figure, since the daemon syncs and overlayfs does not). Counted: the bytes the
//! registry's side of the link sent. Snapshotters alternate which goes first.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cas_integration::chunked::convert;
use cas_integration::harness::{
    differ_config, workspace_bin, Containerd, ContainerdOptions, Daemon, Registry, ShapedLink,
};
use cas_integration::registry::push_layout;

use crate::perf::summary;

/// `cas-bench partial` arguments.
#[derive(Debug, clap::Args)]
pub struct PartialArgs {
    /// The benchmark image cache (`images/app-1`, `images/app-2` from make bench-dedup).
    #[arg(long)]
    pub cache: PathBuf,
    /// Link rates (`tc` syntax), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["100mbit".to_string(), "1gbit".to_string()])]
    pub rates: Vec<String>,
    /// Runs per rate and snapshotter.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where containerd, the daemon and the registry live (default: a new directory in
    /// /var/tmp).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Where the report and the CSV go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// One timed pull.
#[derive(Debug, Clone)]
struct Sample {
    rate: String,
    run: usize,
    sn: &'static str,
    image: &'static str,
    secs: f64,
    synced_secs: f64,
    registry_bytes: u64,
}

const IMAGES: [&str; 2] = ["app-1", "app-2"];

/// Unstable's skopeo (`make deps` unpacks it), whose containers/storage writes
/// zstd:chunked with a tar-split: the producer of the benchmark's images when present.
fn storage_skopeo() -> Option<PathBuf> {
    let cache = std::env::var("CAS_SKOPEO_CACHE")
        .unwrap_or_else(|_| "/var/cache/cas-snapshotter/skopeo".into());
    let bin = Path::new(&cache).join("current/skopeo");
    bin.exists().then_some(bin)
}

/// The zstd:chunked copy of `cache/images/<name>`, made once: by containers/storage
/// (unstable's skopeo) when it is there, else by `remote::encode`. Returns the layout
/// and its producer.
fn chunked(cache: &Path, name: &str) -> Result<(PathBuf, String)> {
    let src = cache.join("images").join(name);
    if !src.join("index.json").exists() {
        bail!(
            "{} is missing: make bench-dedup (or make bench) builds the Debian images",
            src.display()
        );
    }
    let skopeo = storage_skopeo();
    let (tag, producer) = match &skopeo {
        Some(_) => (
            "storage",
            "containers/storage (skopeo copy --dest-compress-format zstd:chunked)",
        ),
        None => (
            "encode",
            "remote::encode (no containers/storage skopeo: make deps)",
        ),
    };
    let dst = cache.join("images").join(format!("{name}-chunked-{tag}"));
    let done = dst.with_extension("done");
    if done.exists() {
        return Ok((dst, producer.into()));
    }
    let _ = fs::remove_dir_all(&dst);
    println!("partial: converting {name} to zstd:chunked with {producer}");
    match skopeo {
        Some(bin) => {
            let out = std::process::Command::new(bin)
                .args(["--insecure-policy", "copy", "--quiet"])
                .args(["--dest-compress-format", "zstd:chunked"])
                .arg(format!("oci:{}", src.display()))
                .arg(format!("oci:{}", dst.display()))
                .output()?;
            if !out.status.success() {
                bail!("skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        None => {
            convert(&src, &dst, remote::encode::Options::default(), |_, t| Ok(t))?;
        }
    }
    fs::write(&done, b"")?;
    Ok((dst, producer.into()))
}

/// Compressed bytes of the layers of the image at `layout`.
fn layer_bytes(layout: &Path) -> Result<u64> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let m = index["manifests"][0]["digest"]
        .as_str()
        .context("manifest")?;
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(
        layout
            .join("blobs/sha256")
            .join(m.trim_start_matches("sha256:")),
    )?)?;
    Ok(manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum())
}

fn one_run(
    dir: &Path,
    link: &ShapedLink,
    registry: &str,
    sn: &'static str,
    rate: &str,
    run: usize,
) -> Result<Vec<Sample>> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let ctrd = dir.join("containerd");
    let cfg = format!(
        "[remote]\nconfig_path = \"{}\"\n{}",
        ctrd.join("certs.d").display(),
        differ_config(&ctrd)
    );
    fs::write(dir.join("config.toml"), cfg)?;
    let daemon = Daemon::start(
        &workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?,
        &dir.join("store"),
        &dir.join("cas.sock"),
        &dir.join("cas-snapshotter.log"),
        Some(&dir.join("config.toml")),
    )?;
    let mut opts = ContainerdOptions::cached("2").differ(true);
    opts.remote_snapshot_annotations = true;
    opts.plain_http_registries.push(registry.to_string());
    opts.snapshotter_root = Some(daemon.root.clone());
    let containerd = Containerd::start_with(&ctrd, &daemon.sock, &opts)?;
    let mut out = Vec::new();
    for image in IMAGES {
        let reference = format!("{registry}/bench/{image}:1");
        let before = link.tx_bytes()?;
        let t = Instant::now();
        containerd
            .pull(sn, &reference)
            .with_context(|| format!("pulling {image} into {sn}\n{}", daemon.log()))?;
        let secs = t.elapsed().as_secs_f64();
        nix::unistd::sync();
        let synced_secs = t.elapsed().as_secs_f64();
        out.push(Sample {
            rate: rate.to_string(),
            run,
            sn,
            image,
            secs,
            synced_secs,
            registry_bytes: link.tx_bytes()? - before,
        });
    }
    drop(containerd);
    drop(daemon);
    let _ = fs::remove_dir_all(dir);
    Ok(out)
}

/// Runs the benchmark (see the module docs).
pub fn run(a: &PartialArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("partial: needs root (network namespaces, mounts, containerd)");
    }
    let converted: Vec<(PathBuf, String)> = IMAGES
        .iter()
        .map(|n| chunked(&a.cache, n))
        .collect::<Result<_>>()?;
    let producer = converted[0].1.clone();
    let layouts: Vec<PathBuf> = converted.into_iter().map(|(l, _)| l).collect();
    let sizes: Vec<u64> = layouts
        .iter()
        .map(|l| layer_bytes(l))
        .collect::<Result<_>>()?;
    let (work, _guard) = crate::perf::work_dir(a.workdir.as_deref(), "cas-bench-partial-")?;
    let link = ShapedLink::create("casbench", 231)?;
    let addr = format!("{}:5000", link.inner);
    let registry = Registry::start_at(&work.join("registry"), &addr, Some(&link.netns))?;
    for (name, layout) in IMAGES.iter().zip(&layouts) {
        push_layout(layout, &registry.addr, &format!("bench/{name}"), "1")?;
    }
    let mut samples = Vec::new();
    for rate in &a.rates {
        link.shape(Some(rate))?;
        for run in 0..a.runs {
            let order: [&'static str; 2] = if run % 2 == 0 {
                ["overlayfs", "cas"]
            } else {
                ["cas", "overlayfs"]
            };
            for sn in order {
                let s = one_run(&work.join("run"), &link, &registry.addr, sn, rate, run)?;
                for x in &s {
                    println!(
                        "partial: {rate} run {run} {sn:9} {}: {:.2} s ({:.2} s durable), {} bytes from the registry",
                        x.image, x.secs, x.synced_secs, x.registry_bytes
                    );
                }
                samples.extend(s);
            }
        }
    }
    link.shape(None)?;
    write_results(a, &samples, &sizes, &producer)
}

fn write_results(a: &PartialArgs, samples: &[Sample], sizes: &[u64], producer: &str) -> Result<()> {
    fs::create_dir_all(&a.out)?;
    let mut csv = String::from("rate,run,snapshotter,image,secs,synced_secs,registry_bytes\n");
    for s in samples {
        csv += &format!(
            "{},{},{},{},{:.4},{:.4},{}\n",
            s.rate, s.run, s.sn, s.image, s.secs, s.synced_secs, s.registry_bytes
        );
    }
    fs::write(a.out.join("partial.csv"), csv)?;
    let med = |rate: &str, sn: &str, image: &str, f: &dyn Fn(&Sample) -> f64| {
        summary(
            samples
                .iter()
                .filter(|s| s.rate == rate && s.sn == sn && s.image == image)
                .map(f)
                .collect(),
        )
        .0
    };
    let mut md = format!(
        "# Partial pulls over a shaped link\n\n`cas-bench partial` (make bench-partial): the \
         Debian base + app family built twice (`app-1`, `app-2`), converted to zstd:chunked \
         (with a tar-split) by {producer}; a registry in a network namespace behind `tbf`; a fresh \
         containerd 2.x and daemon per run; v1 into the empty store, then v2. Medians of \
         the runs; durable = until a `sync` after the pull returns.\n\n\
         | link | image | layer bytes | overlayfs: registry bytes | cas: registry bytes | cas fetched | overlayfs durable s | cas durable s | overlayfs / cas |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for rate in &a.rates {
        for (i, image) in IMAGES.iter().enumerate() {
            let ob = med(rate, "overlayfs", image, &|s| s.registry_bytes as f64);
            let cb = med(rate, "cas", image, &|s| s.registry_bytes as f64);
            let ot = med(rate, "overlayfs", image, &|s| s.synced_secs);
            let ct = med(rate, "cas", image, &|s| s.synced_secs);
            md += &format!(
                "| {rate} | {image} | {} | {ob:.0} | {cb:.0} | {:.1}% | {ot:.2} | {ct:.2} | {:.2}x |\n",
                sizes[i],
                100.0 * cb / sizes[i] as f64,
                ot / ct
            );
        }
    }
    fs::write(a.out.join("partial.md"), &md)?;
    println!("{md}");
    Ok(())
}
