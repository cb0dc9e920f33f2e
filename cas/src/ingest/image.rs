//! Ingest at Commit into one EROFS image ([`crate::erofs`]): the layer tree containerd's
//! applier (or a container) wrote is read once and described by an image, instead of
//! being rewritten in place as stubs.
//!
//! For every entry of the layer (`snapshots/<id>/fs`), in name order:
//!
//! * a regular file is hashed and its own inode published as the object (or dropped
//!   when the content is stored already: the dedup), then described in the image as a
//!   metadata-only file redirecting to the object; further names of a hardlinked inode
//!   become hardlinks in the image; a metadata-only copy-up takes its object from the
//!   layer below, as in a stub tree (see the module docs of [`super`]);
//! * directories, symlinks, devices, FIFOs, sockets and whiteouts are described as they
//!   are, with their owners, modes, times and own xattrs; overlayfs' opaque marker
//!   (`trusted.overlay.opaque`, set by overlayfs on the upper directory) is kept, every
//!   other `trusted.overlay.*` xattr is dropped.
//!
//! Nothing in the tree is changed but the published inodes (normalised as objects), so
//! times need no restoring. Then the image is written (temp file, rename), one `syncfs`
//! makes it and the objects durable, and the manifest comes last. A large layer's
//! writeback starts as soon as the tree is walked, on a thread of its own, so that it
//! runs while the files are hashed and that last flush has little left. The tree
//! itself is moved away and deleted by the Commit once its record is durable, and the
//! image mounted in its place ([`crate::snapshots`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{copied_up_object, walk_error, IngestStats};
use crate::digest::Digest;
use crate::erofs::{Attrs, Image, Leaf};
use crate::error::CasError;
use crate::manifest::{ManifestEntry, ManifestWriter};
use crate::objects::{ObjectStore, Publish};
use crate::stub::{listed_xattrs, ListedXattrs, XATTR_METACOPY};
use crate::sys::At;
use crate::unpack::XATTR_OPAQUE;
use crate::writeback::Writeback;

/// Extended attributes: names and values.
type Xattrs = Vec<(std::ffi::OsString, Vec<u8>)>;

/// The object a file reads from, and its size; `None` for an empty file.
type Content = Option<(Digest, u64)>;

fn attrs(md: &fs::Metadata, xattrs: Xattrs) -> Attrs {
    Attrs {
        xattrs: xattrs
            .into_iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v))
            .collect(),
        ..Attrs::from(md)
    }
}

/// Ingests the layer tree at `fs_dir` into `store` as the image `image`, writing its
/// manifest to `manifest`; `lowers` are the layers the snapshot was mounted over,
/// topmost first (empty for a parentless snapshot).
pub fn ingest_layer_image(
    store: &ObjectStore,
    fs_dir: &Path,
    lowers: &[PathBuf],
    manifest: &Path,
    image: &Path,
) -> Result<IngestStats, CasError> {
    let mut stats = IngestStats::default();
    let mut writer = ManifestWriter::create(manifest)?;
    let root_md = fs::symlink_metadata(fs_dir).map_err(CasError::io("stat", fs_dir))?;
    let mut img = Image::new(attrs(&root_md, Vec::new()));
    // (dev, ino) of a hardlinked file -> its first name in the image, digest and size
    let mut linked: HashMap<(u64, u64), (PathBuf, Content)> = HashMap::new();

    let hashing = Instant::now();
    let entries = walk(fs_dir)?;
    let mut flushing = early_flush(fs_dir, &entries);
    let mut hashed = hash_files(store, &entries, !lowers.is_empty());
    stats.times.hash = hashing.elapsed();

    for (path, md) in entries {
        let path = path.as_path();
        let rel = path.strip_prefix(fs_dir).unwrap_or(path).to_path_buf();
        let ft = md.file_type();
        // a file published ahead of the walk: its inode is the object now, so its
        // metadata and xattrs are the ones read before (the first name of a hardlinked
        // inode takes them; the others become links to it below)
        let prepared = if ft.is_file() {
            hashed.remove(&(md.dev(), md.ino())).transpose()?
        } else {
            None
        };
        let listed = match prepared {
            Some(_) => ListedXattrs::default(),
            None => listed_xattrs(At::Path(path), path)?,
        };
        // overlayfs' own xattrs, which the image does not take from the layer
        let overlay = listed.overlay_private() as u64;
        let opaque_listed = listed.has(XATTR_OPAQUE);
        let metacopy = listed.has(XATTR_METACOPY);
        let mut xattrs = listed.own;
        if ft.is_dir() {
            let opaque = store
                .sys()
                .trusted_xattr(path, XATTR_OPAQUE)
                .map_err(CasError::io("getxattr", path))?;
            let mut a = attrs(&md, std::mem::take(&mut xattrs));
            if opaque.as_deref() == Some(b"y") {
                a.xattrs
                    .push((XATTR_OPAQUE.as_bytes().to_vec(), b"y".to_vec()));
            }
            // the opaque marker is kept (above), the others dropped
            stats.dropped_overlay_xattrs += overlay - u64::from(opaque_listed);
            img.dir(&rel, a).map_err(CasError::from)?;
            continue;
        }
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(CasError::io("readlink", path))?;
            let leaf = Leaf::Symlink(target.as_os_str().as_bytes().to_vec());
            img.insert(&rel, attrs(&md, xattrs), leaf)
                .map_err(CasError::from)?;
            continue;
        }
        if !ft.is_file() {
            let rdev = md.rdev();
            let (major, minor) = (
                nix::sys::stat::major(rdev) as u32,
                nix::sys::stat::minor(rdev) as u32,
            );
            let leaf = if ft.is_char_device() {
                Leaf::CharDevice { major, minor }
            } else if ft.is_block_device() {
                Leaf::BlockDevice { major, minor }
            } else if ft.is_fifo() {
                Leaf::Fifo
            } else if ft.is_socket() {
                Leaf::Socket
            } else {
                continue;
            };
            stats.dropped_overlay_xattrs += overlay;
            img.insert(&rel, attrs(&md, xattrs), leaf)
                .map_err(CasError::from)?;
            continue;
        }
        let key = (md.dev(), md.ino());
        if let Some((first, content)) = linked.get(&key) {
            img.link(&rel, first).map_err(CasError::from)?;
            if let Some((digest, size)) = content {
                writer.push(&ManifestEntry {
                    path: rel,
                    digest: *digest,
                    size: *size,
                })?;
                stats.files += 1;
            }
            continue;
        }
        let size = md.size();
        let (md, xattrs, content) = if let Some(p) = prepared {
            if p.read != p.md.size() {
                return Err(changed_size(path));
            }
            stats.dropped_overlay_xattrs += p.overlay_xattrs;
            if p.publish == Publish::New {
                stats.new_objects += 1;
                stats.new_bytes += p.read;
            }
            (p.md, p.own, Some((p.digest, p.read)))
        } else if !lowers.is_empty() && size > 0 && metacopy {
            (
                md,
                xattrs,
                Some((copied_up_object(store, path, &rel, lowers)?, size)),
            )
        } else if size == 0 {
            stats.dropped_overlay_xattrs += overlay;
            (md, xattrs, None)
        } else {
            // the walk gave every other file with content to the hashing threads: this
            // one lost its copy-up marker since
            return Err(changed(path));
        };
        let leaf = Leaf::File {
            size: content.map_or(0, |(_, s)| s),
            object: content.map(|(d, _)| d),
        };
        img.insert(&rel, attrs(&md, xattrs), leaf)
            .map_err(CasError::from)?;
        if md.nlink() > 1 {
            linked.insert(key, (rel.clone(), content));
        }
        if let Some((digest, size)) = content {
            writer.push(&ManifestEntry {
                path: rel,
                digest,
                size,
            })?;
            stats.files += 1;
            stats.logical_bytes += size;
        }
    }
    let imaging = Instant::now();
    crate::erofs::write_image(&img, image)?;
    stats.times.image = imaging.elapsed();
    crate::crash_point!("ingest.before-syncfs");
    let syncing = Instant::now();
    if let Some(early) = flushing.as_mut() {
        early.wait();
    }
    // objects and image durable in one flush, before the manifest names them
    let root = File::open(fs_dir).map_err(CasError::io("open", fs_dir))?;
    nix::unistd::syncfs(root.as_raw_fd()).map_err(|e| CasError::io("syncfs", fs_dir)(e.into()))?;
    crate::crash_point!("ingest.before-manifest");
    writer.finish()?;
    stats.times.sync = syncing.elapsed();
    crate::crash_point!("ingest.after-manifest");
    Ok(stats)
}

/// File data from which a Commit starts the layer's writeback while it hashes.
const EARLY_FLUSH_BYTES: u64 = 8 << 20;
/// Files from which it does, whatever their bytes.
const EARLY_FLUSH_FILES: usize = 1_000;

/// Starts writing the layer's data back while it is hashed ([`Writeback`]) when it is
/// large: containerd's applier left every file dirty in the page cache, and the disk can
/// take them while the hashing threads read them. 50,000 small files took 1.4-1.5 s to
/// commit instead of 1.8-1.9 s, the final flush 0.05 s instead of 0.7 s. A small layer
/// gets no early flush, which would cost it a second log force.
fn early_flush(fs_dir: &Path, entries: &[(PathBuf, fs::Metadata)]) -> Option<Writeback> {
    let files = entries.iter().filter(|(_, md)| md.is_file());
    let bytes: u64 = files.clone().map(|(_, md)| md.len()).sum();
    if bytes < EARLY_FLUSH_BYTES && files.count() < EARLY_FLUSH_FILES {
        return None;
    }
    let mut flush = Writeback::new(fs_dir, u64::MAX)?;
    flush.start();
    Some(flush)
}

/// Every entry of the layer below `fs_dir`, in name order (parents before their
/// entries), with its metadata: read once, before any file is published, for both the
/// hashing and the image.
fn walk(fs_dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, CasError> {
    let mut entries = Vec::new();
    for entry in walkdir::WalkDir::new(fs_dir)
        .min_depth(1)
        .follow_links(false)
        .same_file_system(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(walk_error(fs_dir))?;
        let md = entry.metadata().map_err(|e| walk_error(fs_dir)(e))?;
        entries.push((entry.into_path(), md));
    }
    Ok(entries)
}

/// A file hashed and published ahead of the walk that builds the image.
struct Prepared {
    /// Its metadata as the layer had it, before its inode became the object.
    md: fs::Metadata,
    /// Its own xattrs as the layer had them (overlayfs' left out).
    own: Xattrs,
    /// How many of its xattrs were overlayfs' (dropped).
    overlay_xattrs: u64,
    digest: Digest,
    /// The bytes read: the file changed while it was read when this is not its size
    /// (then it was not published).
    read: u64,
    publish: Publish,
}

/// Files hashed and published ahead of the walk that builds the image, by inode.
type Hashed = HashMap<(u64, u64), Result<Prepared, CasError>>;

fn changed_size(path: &Path) -> CasError {
    CasError::Hostile {
        path: path.to_path_buf(),
        reason: "file changed size while the layer was being committed",
    }
}

fn changed(path: &Path) -> CasError {
    CasError::Hostile {
        path: path.to_path_buf(),
        reason: "file changed while the layer was being committed",
    }
}

/// Reads what the image needs of the file at `path` (metadata, own xattrs), hashes it
/// and publishes its inode as the object, all through one open file; `None` for a
/// metadata-only copy-up when `copy_ups` may exist (its object is the layer below's).
fn prepare(
    store: &ObjectStore,
    path: &Path,
    md: fs::Metadata,
    copy_ups: bool,
) -> Result<Option<Prepared>, CasError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(CasError::io("open", path))?;
    let xattrs = listed_xattrs(At::File(&file), path)?;
    if copy_ups && xattrs.has(XATTR_METACOPY) {
        return Ok(None);
    }
    let (digest, read) = Digest::of_reader(&file).map_err(CasError::io("read", path))?;
    let publish = if read == md.size() {
        let p = store.publish_in_place(path, &file, &md, &xattrs.all, &digest)?;
        if p == Publish::New {
            crate::crash_point!("ingest.object-published");
        }
        p
    } else {
        Publish::Existing
    };
    Ok(Some(Prepared {
        md,
        overlay_xattrs: xattrs.overlay_private() as u64,
        own: xattrs.own,
        digest,
        read,
        publish,
    }))
}

/// The layer's files that become objects (regular, not empty, one name per inode, not a
/// metadata-only copy-up when `copy_ups` may exist), hashed and published on every
/// core: reading and hashing containerd's applier's output, and the metadata calls
/// that make each new file an object (a `chmod`, a `link`, often a `chown`), are an
/// ingest's largest costs after the sync.
fn hash_files(store: &ObjectStore, entries: &[(PathBuf, fs::Metadata)], copy_ups: bool) -> Hashed {
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (path, md) in entries {
        if !md.file_type().is_file() || md.len() == 0 || !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        files.push((path, md));
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(files.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(HashMap::with_capacity(files.len()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((path, md)) = files.get(i) else {
                    return;
                };
                let key = (md.dev(), md.ino());
                let p = match prepare(store, path, (*md).clone(), copy_ups) {
                    Ok(None) => continue, // a copy-up: the walk takes its object
                    Ok(Some(p)) => Ok(p),
                    Err(e) => Err(e),
                };
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, p);
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}
