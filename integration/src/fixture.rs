//! Fixture images: real OCI images built from Rust, written as OCI image layouts.
//!
//! A layer is a list of [`Entry`]s written into a tar exactly as image builders do: PAX
//! `SCHILY.xattr.*` records for xattrs, GNU long names, hardlinks, symlinks, OCI
//! whiteouts (`.wh.<name>`) and opaque markers (`.wh..wh..opq`). Every entry carries fixed
//! metadata and entries are written in the given order, so a layer has the same digest
//! on every build: two images that share a layer share it byte for byte.
//!
//! [`build_base_image`] is the main fixture (three layers exercising every kind of entry
//! and metadata the snapshotter must reproduce); [`build_app_image`] shares its first
//! layer. [`write_oci_layout`] builds any [`ImageSpec`], including hostile ones.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::compression::{Compression, LayerCompression};

/// Text of `/etc/fixture-release` in the base image (as its last layer leaves it).
pub const BASE_RELEASE: &str = "cas-snapshotter fixture base, layer 2\n";
/// Text of `/etc/fixture-release` in the app image.
pub const APP_RELEASE: &str = "cas-snapshotter fixture app\n";

/// Ownership, permissions, time and xattrs of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, including set-id and sticky bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes (name, value), written as PAX `SCHILY.xattr.<name>`.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// Root-owned with `mode`, a fixed time, no xattrs.
    pub fn new(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            xattrs: Vec::new(),
        }
    }
    /// With this owner.
    pub fn owner(mut self, uid: u64, gid: u64) -> Meta {
        self.uid = uid;
        self.gid = gid;
        self
    }
    /// With this mtime.
    pub fn at(mut self, mtime: u64) -> Meta {
        self.mtime = mtime;
        self
    }
    /// With one more xattr.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Meta {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// One tar entry. Paths are relative to the image root (`etc/passwd`).
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Its path.
        path: String,
        /// Its metadata.
        meta: Meta,
    },
    /// A regular file.
    File {
        /// Its path.
        path: String,
        /// Its metadata.
        meta: Meta,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Its path.
        path: String,
        /// Where it points (not resolved).
        target: String,
        /// Its metadata (mode is ignored by Linux).
        meta: Meta,
    },
    /// A hard link to an earlier entry of the same layer.
    Hardlink {
        /// Its path.
        path: String,
        /// The path it links to.
        target: String,
    },
    /// An OCI whiteout: deletes `path` from the layers below.
    Whiteout {
        /// The path to delete.
        path: String,
    },
    /// An OCI opaque marker: hides everything below `dir` in the layers below.
    Opaque {
        /// The directory.
        dir: String,
    },
}

/// One layer.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Entries in tar order (parents before children).
    pub entries: Vec<Entry>,
    /// Blob compression.
    pub compression: Compression,
}

/// An image: layers bottom first, and the command of its config.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
    /// The config's `Cmd`.
    pub cmd: Vec<String>,
}

/// What [`write_oci_layout`] produced.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The OCI image layout directory.
    pub layout_dir: PathBuf,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// Uncompressed layer digests (the config's diff_ids), bottom first.
    pub layer_diff_ids: Vec<String>,
    /// Blob digests, bottom first.
    pub layer_digests: Vec<String>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn header(meta: &Meta, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode);
    h.set_uid(meta.uid);
    h.set_gid(meta.gid);
    h.set_mtime(meta.mtime);
    h.set_size(size);
    h
}

fn pax_xattrs(b: &mut tar::Builder<Vec<u8>>, meta: &Meta) -> Result<()> {
    if meta.xattrs.is_empty() {
        return Ok(());
    }
    let keys: Vec<(String, &[u8])> = meta
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
        .collect();
    b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))?;
    Ok(())
}

fn whiteout_path(path: &str, name: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, base)) => format!("{dir}/{name}{base}"),
        None => format!("{name}{path}"),
    }
}

/// The uncompressed tar of a layer.
pub fn layer_tar(layer: &LayerSpec) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in &layer.entries {
        match e {
            Entry::Dir { path, meta } => {
                pax_xattrs(&mut b, meta)?;
                let mut h = header(meta, tar::EntryType::Directory, 0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File { path, meta, data } => {
                pax_xattrs(&mut b, meta)?;
                let mut h = header(meta, tar::EntryType::Regular, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target, meta } => {
                pax_xattrs(&mut b, meta)?;
                let mut h = header(
                    &Meta {
                        mode: 0o777,
                        ..meta.clone()
                    },
                    tar::EntryType::Symlink,
                    0,
                );
                b.append_link(&mut h, path, target)?;
            }
            Entry::Hardlink { path, target } => {
                let mut h = header(&Meta::new(0o644), tar::EntryType::Link, 0);
                b.append_link(&mut h, path, target)?;
            }
            Entry::Whiteout { path } => {
                let mut h = header(&Meta::new(0o644), tar::EntryType::Regular, 0);
                b.append_data(&mut h, whiteout_path(path, ".wh."), std::io::empty())?;
            }
            Entry::Opaque { dir } => {
                let mut h = header(&Meta::new(0o644), tar::EntryType::Regular, 0);
                b.append_data(&mut h, format!("{dir}/.wh..wh..opq"), std::io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// A layer blob already written into a layout's `blobs/sha256`.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// `sha256:…` of the blob as stored (compressed).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    /// Bytes of the blob.
    pub size: u64,
    /// Its media type.
    pub compression: Compression,
}

/// Writes `spec` as an OCI image layout in `out_dir` (created; must not hold another image).
pub fn write_oci_layout(spec: &ImageSpec, out_dir: &Path) -> Result<BuiltImage> {
    let blobs = out_dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut layers = Vec::new();
    for layer in &spec.layers {
        let tar = layer_tar(layer)?;
        let diff_id = sha256(&tar);
        let blob = layer.compression.compress(&tar)?;
        let digest = sha256(&blob);
        fs::write(blobs.join(&digest["sha256:".len()..]), &blob)?;
        layers.push(LayerBlob {
            digest,
            diff_id,
            size: blob.len() as u64,
            compression: layer.compression,
        });
    }
    finish_oci_layout(out_dir, &layers, &spec.cmd)
}

/// Writes config, manifest, index and `oci-layout` for `layers` (bottom first), whose
/// blobs are already in `out_dir/blobs/sha256`.
pub fn finish_oci_layout(
    out_dir: &Path,
    layers: &[LayerBlob],
    cmd: &[String],
) -> Result<BuiltImage> {
    let blobs = out_dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let put = |bytes: &[u8]| -> Result<String> {
        let d = sha256(bytes);
        fs::write(blobs.join(&d["sha256:".len()..]), bytes)?;
        Ok(d)
    };
    let mut descs = Vec::new();
    for l in layers {
        let media = l.compression.media_type();
        descs.push(
            DescriptorBuilder::default()
                .media_type(media)
                .digest(l.digest.parse::<oci_spec::image::Digest>()?)
                .size(l.size)
                .build()?,
        );
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(ConfigBuilder::default().cmd(cmd.to_vec()).build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids.clone())
                .build()?,
        )
        .build()?;
    let config_bytes = config.to_string()?.into_bytes();
    let config_digest = put(&config_bytes)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(config_digest.parse::<oci_spec::image::Digest>()?)
                .size(config_bytes.len() as u64)
                .build()?,
        )
        .layers(descs)
        .build()?;
    let manifest_bytes = manifest.to_string()?.into_bytes();
    let manifest_digest = put(&manifest_bytes)?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(manifest_digest.parse::<oci_spec::image::Digest>()?)
            .size(manifest_bytes.len() as u64)
            .build()?])
        .build()?;
    fs::write(out_dir.join("index.json"), index.to_string()?)?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;
    fs::write(out_dir.join("oci-layout"), serde_json::to_vec(&layout)?)?;
    Ok(BuiltImage {
        layout_dir: out_dir.to_path_buf(),
        manifest_digest,
        layer_diff_ids: diff_ids,
        layer_digests: layers.iter().map(|l| l.digest.clone()).collect(),
    })
}

/// Deterministic, incompressible-looking bytes.
pub fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A set of generated regular files for benchmark layers: `count` files named
/// `<dir>/dNNN/fNNNNNNN` (at most [`FILES_PER_DIR`] per directory), sizes drawn from
/// `min_size..=max_size` (skewed towards small with `skew` > 1, as in a distribution's
/// tree: many small files, a few large ones), deterministic content.
///
/// The content of file `i` depends only on `seed`, `i` and its size, so two layers that
/// list the same set differ only where their metadata (`mtime`) or other sets differ:
/// the near-duplicates two independent builds of one image make.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileSet {
    /// Directory the files go in (relative, no trailing slash).
    pub dir: String,
    /// Number of files.
    pub count: u64,
    /// Smallest file size.
    pub min_size: u64,
    /// Largest file size.
    pub max_size: u64,
    /// 1 draws sizes uniformly; k > 1 draws `min * (max/min)^(u^k)`.
    pub skew: u32,
    /// Seed of sizes and content.
    pub seed: u64,
    /// Modification time of every entry.
    pub mtime: u64,
    /// Half of every 4 KiB block repeats a pattern (gzip gets about 2:1, as on typical
    /// binaries and text); otherwise the content does not compress.
    pub compressible: bool,
}

/// Files per directory of a [`FileSet`], so a million files do not share one directory.
pub const FILES_PER_DIR: u64 = 1000;

/// xorshift64*: a fast deterministic generator for sizes and content.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl FileSet {
    /// Size of file `i`.
    pub fn size_of(&self, i: u64) -> u64 {
        let mut r = Rng::new(self.seed ^ (i << 20) ^ 0x5157);
        let u = r.unit();
        if self.skew <= 1 || self.min_size == 0 {
            self.min_size + ((self.max_size - self.min_size + 1) as f64 * u) as u64
        } else {
            let ratio = self.max_size as f64 / self.min_size as f64;
            ((self.min_size as f64) * ratio.powf(u.powi(self.skew as i32))) as u64
        }
    }

    /// Sum of all file sizes.
    pub fn total_bytes(&self) -> u64 {
        (0..self.count).map(|i| self.size_of(i)).sum()
    }

    fn path_of(&self, i: u64) -> String {
        format!("{}/d{:03}/f{:07}", self.dir, i / FILES_PER_DIR, i)
    }
}

/// The content of one generated file, produced as it is read.
struct Content {
    rng: Rng,
    /// Random bytes not yet used from the last word.
    word: u64,
    have: u32,
    left: u64,
    /// Bytes produced so far.
    pos: u64,
    compressible: bool,
}

impl Content {
    fn new(seed: u64, size: u64, compressible: bool) -> Content {
        Content {
            rng: Rng::new(seed),
            word: 0,
            have: 0,
            left: size,
            pos: 0,
            compressible,
        }
    }
}

/// What the compressible half of each block repeats.
const PATTERN: &[u8] =
    b"cas-snapshotter benchmark content, deterministic and partly compressible. ";

impl std::io::Read for Content {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            let in_block = (self.pos % 4096) as usize;
            *b = if self.compressible && in_block >= 2048 {
                PATTERN[in_block % PATTERN.len()]
            } else {
                if self.have == 0 {
                    self.word = self.rng.next();
                    self.have = 8;
                }
                self.have -= 1;
                (self.word >> (8 * self.have)) as u8
            };
            self.pos += 1;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn gen_header(kind: tar::EntryType, mode: u32, mtime: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(size);
    h
}

/// Writes a layer of generated files (every set, in order, directories first) as a blob
/// into `blobs` (a layout's `blobs/sha256`), streaming: memory stays small for a layer
/// of a million files or of gigabytes.
pub fn write_files_layer(
    sets: &[FileSet],
    compression: Compression,
    blobs: &Path,
) -> Result<LayerBlob> {
    let (blob, sink) = crate::rootfs::BlobWriter::create(blobs, compression)?;
    let mut tar = tar::Builder::new(sink);
    let mut dirs = BTreeSet::new();
    for set in sets {
        for i in 0..set.count {
            let path = set.path_of(i);
            let parts: Vec<&str> = path.split('/').collect();
            for k in 1..parts.len() {
                let d = parts[..k].join("/");
                if dirs.insert(d.clone()) {
                    let mut h = gen_header(tar::EntryType::Directory, 0o755, set.mtime, 0);
                    tar.append_data(&mut h, format!("{d}/"), std::io::empty())?;
                }
            }
            let size = set.size_of(i);
            let seed = set.seed.wrapping_add(i.wrapping_mul(0x1_0000_0001));
            let content = Content::new(seed, size, set.compressible);
            let mut h = gen_header(tar::EntryType::Regular, 0o644, set.mtime, size);
            tar.append_data(&mut h, &path, content)?;
        }
    }
    blob.finish(tar.into_inner()?)
}

fn dir(path: &str, meta: Meta) -> Entry {
    Entry::Dir {
        path: path.into(),
        meta,
    }
}
fn file(path: &str, meta: Meta, data: impl Into<Vec<u8>>) -> Entry {
    Entry::File {
        path: path.into(),
        meta,
        data: data.into(),
    }
}
fn symlink(path: &str, target: &str) -> Entry {
    Entry::Symlink {
        path: path.into(),
        target: target.into(),
        meta: Meta::new(0o777).at(1_600_000_100),
    }
}

/// Adds a directory entry for every ancestor of every entry that has none, so each
/// layer sets the times of every directory it touches (as image builders do).
fn with_parent_dirs(entries: Vec<Entry>) -> Vec<Entry> {
    let mut have: BTreeSet<String> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Dir { path, .. } => Some(path.clone()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for e in entries {
        let path = match &e {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Hardlink { path, .. }
            | Entry::Whiteout { path } => path.clone(),
            Entry::Opaque { dir } => format!("{dir}/x"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let p = parts[..i].join("/");
            if have.insert(p.clone()) {
                out.push(dir(&p, Meta::new(0o755).at(1_600_000_000 + i as u64)));
            }
        }
        out.push(e);
    }
    out
}

/// The base image's first layer; the app image shares it byte for byte.
fn base_layer(busybox: &[u8]) -> LayerSpec {
    let big = pseudo_random(2 << 20, 1);
    let long = format!(
        "data/deep/{}/{}",
        "d".repeat(60),
        "long-file-name-".repeat(6)
    );
    let mut e = vec![
        dir("bin", Meta::new(0o755)),
        file("bin/busybox", Meta::new(0o755), busybox.to_vec()),
    ];
    for applet in [
        "sh",
        "cat",
        "ls",
        "stat",
        "echo",
        "head",
        "wc",
        "sha256sum",
        "readlink",
        "find",
    ] {
        e.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    e.extend([
        dir("etc", Meta::new(0o755).at(1_600_000_200)),
        file("etc/fixture-release", Meta::new(0o644), "cas-snapshotter fixture base, layer 1\n"),
        file("etc/passwd", Meta::new(0o644), "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
        file("etc/group", Meta::new(0o644), "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"),
        dir("tmp", Meta::new(0o1777)),
        dir("home", Meta::new(0o755)),
        dir("home/user", Meta::new(0o700).owner(1000, 1000).at(1_600_000_300)),
        file("home/user/notes", Meta::new(0o600).owner(1000, 1000), "private\n"),
        dir("data", Meta::new(0o755).at(1_600_000_400).xattr("user.dir", b"yes")),
        file("data/empty", Meta::new(0o644), ""),
        file("data/small", Meta::new(0o644).at(1_600_000_500).xattr("user.fixture", b"hello"), "small file\n"),
        file("data/big", Meta::new(0o644), big.clone()),
        file("data/big-dup", Meta::new(0o640).owner(1000, 1000), big),
        file("data/zeros", Meta::new(0o644), vec![0u8; 4 << 20]),
        file("data/setuid", Meta::new(0o4755), "#!/bin/sh\n"),
        file("data/setgid", Meta::new(0o2755), "#!/bin/sh\necho g\n"),
        file("data/noperm", Meta::new(0o000), "nobody may read\n"),
        file("data/nobody", Meta::new(0o644).owner(65534, 65534), "owned by nobody\n"),
        file("data/hl-a", Meta::new(0o644), "three names, one inode\n"),
        Entry::Hardlink { path: "data/hl-b".into(), target: "data/hl-a".into() },
        dir("opt", Meta::new(0o755)),
        Entry::Hardlink { path: "opt/hl-c".into(), target: "data/hl-a".into() },
        symlink("data/rel", "small"),
        symlink("data/abs", "/etc/fixture-release"),
        symlink("data/dangling", "does/not/exist"),
        symlink("data/dirlink", "../opt"),
        file("data/a name with spaces ü", Meta::new(0o644), "unicode\n"),
        file(&long, Meta::new(0o644), "long path\n"),
        file("data/doomed", Meta::new(0o644), "whited out by layer 2\n"),
        dir("opq", Meta::new(0o755)),
        file("opq/old1", Meta::new(0o644), "hidden by the opaque dir of layer 3\n"),
        file("opq/old2", Meta::new(0o644), "hidden too\n"),
        file("replace-me-file", Meta::new(0o644), "becomes a directory\n"),
        dir("replace-me-dir", Meta::new(0o755)),
        file("replace-me-dir/child", Meta::new(0o644), "goes with its directory\n"),
    ]);
    LayerSpec {
        entries: with_parent_dirs(e),
        compression: Compression::Gzip,
    }
}

/// The main fixture: three layers with whiteouts, an opaque directory, files replaced by
/// directories and back, hardlinks, symlinks, xattrs, set-id and odd modes, non-root
/// owners, fixed times, long and unicode names, and duplicate content within and across
/// layers.
pub fn build_base_image(out_dir: &Path, busybox: &Path) -> Result<BuiltImage> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let l2 = vec![
        dir("etc", Meta::new(0o755).at(1_600_001_000)),
        file(
            "etc/fixture-release",
            Meta::new(0o644).at(1_600_001_001),
            BASE_RELEASE,
        ),
        dir(
            "data",
            Meta::new(0o755).at(1_600_001_100).xattr("user.dir", b"yes"),
        ),
        Entry::Whiteout {
            path: "data/doomed".into(),
        },
        file(
            "data/small",
            Meta::new(0o600)
                .at(1_600_001_200)
                .xattr("user.fixture", b"changed"),
            "small file\n",
        ),
        dir("replace-me-file", Meta::new(0o750).at(1_600_001_300)),
        file(
            "replace-me-file/inside",
            Meta::new(0o644),
            "now a directory\n",
        ),
        file(
            "replace-me-dir",
            Meta::new(0o644).at(1_600_001_400),
            "now a file\n",
        ),
    ];
    let l3 = vec![
        dir("opq", Meta::new(0o711).at(1_600_002_000)),
        Entry::Opaque { dir: "opq".into() },
        file("opq/new1", Meta::new(0o644), "only file left in opq\n"),
        dir("etc", Meta::new(0o755).at(1_600_002_100)),
        file(
            "etc/layer3",
            Meta::new(0o444).owner(1000, 65534).at(1_234_567_890),
            "from layer three\n",
        ),
        dir(
            "data",
            Meta::new(0o755).at(1_600_002_200).xattr("user.dir", b"yes"),
        ),
        file(
            "data/big-again",
            Meta::new(0o644),
            pseudo_random(2 << 20, 1),
        ),
    ];
    let spec = ImageSpec {
        layers: vec![
            base_layer(&busybox),
            LayerSpec {
                entries: with_parent_dirs(l2),
                compression: Compression::Gzip,
            },
            LayerSpec {
                entries: with_parent_dirs(l3),
                compression: Compression::None,
            },
        ],
        cmd: vec!["/bin/sh".into()],
    };
    write_oci_layout(&spec, out_dir)
}

/// A second image on the base image's first layer (same digest), with its own app layer
/// that repeats content of the base layer.
pub fn build_app_image(out_dir: &Path, busybox: &Path) -> Result<BuiltImage> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let app = vec![
        dir("etc", Meta::new(0o755).at(1_600_010_000)),
        file("etc/fixture-release", Meta::new(0o644), APP_RELEASE),
        dir("app", Meta::new(0o755).at(1_600_010_100)),
        file("app/run.sh", Meta::new(0o755), "#!/bin/sh\necho app\n"),
        file("app/payload", Meta::new(0o644), pseudo_random(2 << 20, 1)),
        file("app/unique", Meta::new(0o644), pseudo_random(1 << 20, 7)),
    ];
    let spec = ImageSpec {
        layers: vec![
            base_layer(&busybox),
            LayerSpec {
                entries: with_parent_dirs(app),
                compression: Compression::Gzip,
            },
        ],
        cmd: vec!["/app/run.sh".into()],
    };
    write_oci_layout(&spec, out_dir)
}

/// The command of [`build_pause_image`]: waits until SIGTERM, then exits 0.
pub const PAUSE_CMD: &str = "trap 'exit 0' TERM; sleep 2147483647 & wait";

/// A sandbox ("pause") image for the CRI plugin: one layer with busybox (`sh`, `sleep`),
/// whose command holds the pod until it is stopped.
pub fn build_pause_image(out_dir: &Path, busybox: &Path) -> Result<BuiltImage> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut entries = vec![
        dir("bin", Meta::new(0o755)),
        file("bin/busybox", Meta::new(0o755), busybox),
    ];
    for applet in ["sh", "sleep"] {
        entries.push(symlink(&format!("bin/{applet}"), "busybox"));
    }
    let spec = ImageSpec {
        layers: vec![LayerSpec {
            entries,
            compression: Compression::Gzip,
        }],
        cmd: vec!["/bin/sh".into(), "-c".into(), PAUSE_CMD.into()],
    };
    write_oci_layout(&spec, out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_deterministic_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join("bb");
        fs::write(&bb, b"\x7fELF fake busybox").unwrap();
        let a = build_base_image(&dir.path().join("a"), &bb).unwrap();
        let b = build_base_image(&dir.path().join("b"), &bb).unwrap();
        let app = build_app_image(&dir.path().join("app"), &bb).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.layer_digests.len(), 3);
        assert_eq!(app.layer_digests[0], a.layer_digests[0]);
        assert_ne!(app.layer_digests[1], a.layer_digests[1]);
        assert!(a.layout_dir.join("index.json").is_file());
    }

    #[test]
    fn generated_layers_are_deterministic_and_near_duplicates_share_content() {
        let dir = tempfile::tempdir().unwrap();
        let set = FileSet {
            dir: "usr".into(),
            count: 1200,
            min_size: 10,
            max_size: 20_000,
            skew: 3,
            seed: 1,
            mtime: 1_600_000_000,
            compressible: true,
        };
        let blobs = dir.path().join("blobs");
        let a = write_files_layer(std::slice::from_ref(&set), Compression::Gzip, &blobs).unwrap();
        let b = write_files_layer(std::slice::from_ref(&set), Compression::Gzip, &blobs).unwrap();
        assert_eq!(a.digest, b.digest);
        let later = FileSet {
            mtime: 1_700_000_000,
            ..set.clone()
        };
        let z = write_files_layer(&[later], Compression::Zstd, &blobs).unwrap();
        assert_ne!(z.diff_id, a.diff_id);
        // Same files, same content: only the times differ.
        let tar = |d: &str, zstd: bool| {
            let raw = fs::read(blobs.join(&d["sha256:".len()..])).unwrap();
            let mut out = Vec::new();
            if zstd {
                out = zstd::decode_all(raw.as_slice()).unwrap();
            } else {
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(raw.as_slice()),
                    &mut out,
                )
                .unwrap();
            }
            let mut files = Vec::new();
            for e in tar::Archive::new(out.as_slice()).entries().unwrap() {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                files.push((e.path().unwrap().display().to_string(), data));
            }
            files
        };
        let (fa, fz) = (tar(&a.digest, false), tar(&z.digest, true));
        assert_eq!(fa, fz);
        assert_eq!(fa.iter().filter(|(p, _)| p.contains("/f")).count(), 1200);
        let sum: u64 = fa.iter().map(|(_, d)| d.len() as u64).sum();
        assert_eq!(sum, set.total_bytes());
        assert!(fa.iter().any(|(p, _)| p == "usr/d001/f0001000"));
    }

    #[test]
    fn tar_has_whiteouts_xattrs_and_long_names() {
        let layer = base_layer(b"bb");
        let tar = layer_tar(&layer).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        let mut saw_xattr = false;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for x in exts {
                    saw_xattr |= x.unwrap().key().unwrap() == "SCHILY.xattr.user.fixture";
                }
            }
            names.push(e.path().unwrap().display().to_string());
        }
        assert!(saw_xattr);
        assert!(names.iter().any(|n| n.len() > 100), "no long name");
        let l2 = whiteout_path("data/doomed", ".wh.");
        assert_eq!(l2, "data/.wh.doomed");
    }
}
