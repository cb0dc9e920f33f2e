//! The images of `cas-bench perf`: generated layers ([`FileSet`]s), cached as blobs
//! outside the repository and assembled into OCI layouts.
//!
//! ```text
//! <cache>/perf/blobs/sha256/<digest>   every layer blob, named by digest
//! <cache>/perf/layers/<key>.json       a layer's definition key -> its blob (digest,
//!                                      diff_id, size): a layer is built once per definition
//! <cache>/perf/images/<name>/          the OCI layout pushed to the registry (blobs are
//!                                      hardlinks into blobs/; rewritten on every run)
//! ```
//!
//! A layer's key is the hash of its definition and [`GENERATOR_VERSION`], so a changed
//! definition or generator builds a new blob and a stale one is never reused.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use cas_integration::compression::{Compression, LayerCompression as _};
use cas_integration::fixture::{finish_oci_layout, write_files_layer, FileSet, LayerBlob};
use sha2::{Digest as _, Sha256};

/// Bump when [`write_files_layer`]'s output changes for the same definition.
const GENERATOR_VERSION: &str = "files-layer-v1";

/// Times of the near-duplicate builds: independent builds differ in their files' times.
const BUILD_TIMES: [u64; 4] = [1_700_000_000, 1_700_086_400, 1_700_172_800, 1_700_259_200];

/// One layer: the files it holds and how its blob is compressed.
#[derive(Debug, Clone)]
pub struct LayerDef {
    pub sets: Vec<FileSet>,
    pub compression: Compression,
    /// Files and their bytes, counted from the blob, for a layer not generated here
    /// (the Debian images).
    pub counted: Option<(u64, u64)>,
}

impl LayerDef {
    fn key(&self) -> String {
        let text = format!("{GENERATOR_VERSION} {:?} {:?}", self.sets, self.compression);
        hex::encode(&Sha256::digest(text.as_bytes())[..12])
    }

    /// Bytes of the regular files the layer holds (what an unpack writes as data).
    pub fn file_bytes(&self) -> u64 {
        match self.counted {
            Some((_, bytes)) => bytes,
            None => self.sets.iter().map(FileSet::total_bytes).sum(),
        }
    }

    /// Regular files in the layer.
    pub fn files(&self) -> u64 {
        match self.counted {
            Some((files, _)) => files,
            None => self.sets.iter().map(|s| s.count).sum(),
        }
    }
}

/// A layer as built: its definition and its blob in the cache.
#[derive(Debug, Clone)]
pub struct Layer {
    pub def: LayerDef,
    pub blob: LayerBlob,
    /// The blob file in the cache.
    pub path: PathBuf,
}

/// An image of the benchmark: its layers, bottom first, and its layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub layers: Vec<Layer>,
    pub layout: PathBuf,
}

/// How big the generated images are.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub quick: bool,
}

impl Sizes {
    fn pick(&self, quick: u64, full: u64) -> u64 {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// A distribution-like base layer: many small files and a few large ones under
    /// `usr/`, plus configuration-sized files under `etc/`. Version `v` of the family
    /// has the same `usr/` content with other times and its own `etc/` content.
    fn base(&self, v: usize, compression: Compression) -> LayerDef {
        let mtime = BUILD_TIMES[v - 1];
        LayerDef {
            sets: vec![
                FileSet {
                    dir: "usr".into(),
                    count: self.pick(1_500, 4_000),
                    min_size: 64,
                    max_size: 1 << 20,
                    skew: 4,
                    seed: 1,
                    mtime,
                    compressible: true,
                },
                FileSet {
                    dir: "etc".into(),
                    count: self.pick(200, 500),
                    min_size: 100,
                    max_size: 4_000,
                    skew: 1,
                    seed: 10 + v as u64,
                    mtime,
                    compressible: true,
                },
            ],
            compression,
            counted: None,
        }
    }

    fn app(&self) -> LayerDef {
        LayerDef {
            sets: vec![FileSet {
                dir: "app".into(),
                count: self.pick(300, 1_000),
                min_size: 64,
                max_size: 256 << 10,
                skew: 2,
                seed: 21,
                mtime: BUILD_TIMES[0] + 3600,
                compressible: true,
            }],
            compression: Compression::Gzip,
            counted: None,
        }
    }

    fn large(&self) -> LayerDef {
        let size = self.pick(32 << 20, 128 << 20);
        LayerDef {
            sets: vec![FileSet {
                dir: "data".into(),
                count: self.pick(4, 8),
                min_size: size,
                max_size: size,
                skew: 1,
                seed: 31,
                mtime: BUILD_TIMES[0],
                compressible: true,
            }],
            compression: Compression::Gzip,
            counted: None,
        }
    }

    fn small(&self, count: u64, max_size: u64, seed: u64) -> LayerDef {
        LayerDef {
            sets: vec![FileSet {
                dir: "files".into(),
                count,
                min_size: if max_size > 4096 { 512 } else { 0 },
                max_size,
                skew: 1,
                seed,
                mtime: BUILD_TIMES[0],
                compressible: true,
            }],
            compression: Compression::Gzip,
            counted: None,
        }
    }

    /// Number of small files of the small-files case.
    pub fn small_files(&self) -> u64 {
        self.pick(5_000, 50_000)
    }

    /// File counts of the scaling layers.
    pub fn scaling(&self) -> Vec<u64> {
        if self.quick {
            vec![10_000, 100_000]
        } else {
            vec![10_000, 100_000, 1_000_000]
        }
    }

    /// Every image of the benchmark, by name.
    pub fn definitions(&self) -> BTreeMap<String, Vec<LayerDef>> {
        let mut m = BTreeMap::new();
        for v in 1..=4 {
            m.insert(format!("base-{v}"), vec![self.base(v, Compression::Gzip)]);
        }
        m.insert("base-1-zstd".into(), vec![self.base(1, Compression::Zstd)]);
        m.insert(
            "app".into(),
            vec![self.base(1, Compression::Gzip), self.app()],
        );
        m.insert("large".into(), vec![self.large()]);
        m.insert(
            "small".into(),
            vec![self.small(self.small_files(), 8 << 10, 41)],
        );
        for n in self.scaling() {
            m.insert(scaling_image(n), vec![self.small(n, 2 << 10, 51)]);
        }
        m
    }
}

/// Name of the scaling image with `n` files.
pub fn scaling_image(n: u64) -> String {
    format!("files-{n}")
}

/// Builds what is missing in `cache` and returns every image, layouts written.
pub fn ensure_images(cache: &Path, sizes: Sizes) -> Result<BTreeMap<String, Image>> {
    let root = cache.join("perf");
    let blobs = root.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::create_dir_all(root.join("layers"))?;
    let mut out = BTreeMap::new();
    for (name, defs) in sizes.definitions() {
        let mut layers = Vec::new();
        for def in defs {
            let blob = ensure_layer(&root, &def)?;
            let path = blobs.join(&blob.digest["sha256:".len()..]);
            layers.push(Layer { def, blob, path });
        }
        let layout = root.join("images").join(&name);
        let _ = fs::remove_dir_all(&layout);
        let lblobs = layout.join("blobs/sha256");
        fs::create_dir_all(&lblobs)?;
        for l in &layers {
            let dst = lblobs.join(&l.blob.digest["sha256:".len()..]);
            if !dst.exists() {
                fs::hard_link(&l.path, &dst)
                    .with_context(|| format!("linking {}", l.path.display()))?;
            }
        }
        let blobs_of: Vec<LayerBlob> = layers.iter().map(|l| l.blob.clone()).collect();
        finish_oci_layout(&layout, &blobs_of, &["/bin/sh".to_string()])?;
        out.insert(
            name.clone(),
            Image {
                name,
                layers,
                layout,
            },
        );
    }
    Ok(out)
}

fn ensure_layer(root: &Path, def: &LayerDef) -> Result<LayerBlob> {
    let record = root.join("layers").join(format!("{}.json", def.key()));
    if let Ok(bytes) = fs::read(&record) {
        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
        let digest = v["digest"].as_str().unwrap_or_default().to_string();
        let blob = root
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        if blob.is_file() {
            return Ok(LayerBlob {
                digest,
                diff_id: v["diff_id"].as_str().unwrap_or_default().to_string(),
                size: v["size"].as_u64().unwrap_or_default(),
                compression: def.compression,
            });
        }
    }
    let t = Instant::now();
    let blob = write_files_layer(&def.sets, def.compression, &root.join("blobs/sha256"))?;
    println!(
        "built layer {} ({} files, {:.1} MB of files, blob {:.1} MB, {:?}) in {:.1}s",
        &blob.digest[7..19],
        def.files(),
        def.file_bytes() as f64 / 1e6,
        blob.size as f64 / 1e6,
        def.compression,
        t.elapsed().as_secs_f64()
    );
    let v = serde_json::json!({
        "digest": blob.digest,
        "diff_id": blob.diff_id,
        "size": blob.size,
    });
    fs::write(&record, serde_json::to_vec_pretty(&v)?)?;
    Ok(blob)
}

/// The Debian images `scripts/bench-dedup.sh` builds (`debootstrap` bases, an app layer
/// installed over base 1, zstd variants of both), as benchmark images named
/// `debian-<name>`: those of `names` whose layout in `<cache>/images` is complete.
pub fn debian_images(cache: &Path, names: &[&str]) -> Result<BTreeMap<String, Image>> {
    let mut out = BTreeMap::new();
    for name in names {
        let layout = cache.join("images").join(name);
        if !layout.with_extension("done").exists() {
            continue;
        }
        let index = oci_spec::image::ImageIndex::from_file(layout.join("index.json"))?;
        let desc = index.manifests().first().context("an empty image index")?;
        let blob = |d: &oci_spec::image::Digest| layout.join("blobs/sha256").join(d.digest());
        let manifest = oci_spec::image::ImageManifest::from_file(blob(desc.digest()))?;
        let config =
            oci_spec::image::ImageConfiguration::from_file(blob(manifest.config().digest()))?;
        let mut layers = Vec::new();
        for (l, diff_id) in manifest.layers().iter().zip(config.rootfs().diff_ids()) {
            let compression = Compression::of_media_type(l.media_type().as_ref())?;
            let path = blob(l.digest());
            let counted = count_files(&path, compression)
                .with_context(|| format!("reading {}", path.display()))?;
            layers.push(Layer {
                def: LayerDef {
                    sets: Vec::new(),
                    compression,
                    counted: Some(counted),
                },
                blob: LayerBlob {
                    digest: l.digest().to_string(),
                    diff_id: diff_id.clone(),
                    size: l.size(),
                    compression,
                },
                path,
            });
        }
        let name = format!("debian-{name}");
        out.insert(
            name.clone(),
            Image {
                name,
                layers,
                layout,
            },
        );
    }
    Ok(out)
}

/// Regular files in a layer blob, and their bytes.
fn count_files(blob: &Path, compression: Compression) -> Result<(u64, u64)> {
    let data = compression.decompress(&fs::read(blob)?)?;
    let mut archive = tar::Archive::new(&data[..]);
    let (mut files, mut bytes) = (0, 0);
    for e in archive.entries()? {
        let e = e?;
        if e.header().entry_type() == tar::EntryType::Regular {
            files += 1;
            bytes += e.size();
        }
    }
    Ok((files, bytes))
}
