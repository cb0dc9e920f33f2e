//! Ingest at Commit: turn a layer tree into stubs + objects + manifest.
//!
//! For every regular file of the layer (`snapshots/<id>/fs`):
//!
//! 1. hash it (streaming, bounded memory);
//! 2. write a stub for it in `cas/tmp` (size, owner, mode, times, own xattrs,
//!    metacopy + redirect);
//! 3. publish the file's own inode as the object (`link`, or drop it when the content is
//!    already stored: that is the dedup);
//! 4. rename the stub over the file.
//!
//! Further names of a hardlinked inode become hardlinks of its stub, so hardlinks stay
//! hardlinks.
//!
//! Metadata-only copy-ups: mounts use `metacopy=on`, so a chmod, chown or xattr change
//! of a file from a lower layer leaves in the upper a file with `trusted.overlay.metacopy`
//! and no data, whose bytes are those of the same path (or of its `redirect`) in the
//! layers below. Such a file is trusted only when the snapshot has parents (then the
//! upper was only ever written through overlayfs or by containerd's applier, which
//! refuses `trusted.*` xattrs): its object is taken from the lower stub it copies. In a
//! parentless layer, which a client may have written through a plain bind mount, the
//! xattrs are dropped and the file is stored as the bytes it holds. Empty files stay plain files (there are no bytes to share). Directory times
//! are restored after their entries were replaced, so the layer reads exactly as before.
//! Each directory is read completely before any of its entries changes, so replacing
//! entries cannot confuse the walk. Any `trusted.overlay.*` xattr a file arrived with is
//! dropped (see [`crate::stub`]).
//!
//! Objects are made durable with one `syncfs` per layer, before the manifest is
//! published; never one fsync per file.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::Digest;
use crate::error::CasError;
use crate::layout::StoreMode;
use crate::manifest::{ManifestEntry, ManifestWriter};
use crate::objects::{reflink_capable, ObjectStore, Publish, Redirect};
use std::os::unix::ffi::OsStrExt;

use crate::stub::{
    apply_metadata, is_overlay_private, listed_xattrs, own_xattrs, stub_target, write_stub,
    FileMeta, XATTR_METACOPY, XATTR_REDIRECT,
};
use crate::sys::At;

mod image;
pub use image::ingest_layer_image;

/// What one ingest did; the figures behind dedup statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Regular files turned into stubs (each hardlinked name counted).
    pub files: u64,
    /// Their bytes, each inode once: what overlayfs would have stored.
    pub logical_bytes: u64,
    /// Objects this layer added to the store.
    pub new_objects: u64,
    /// Bytes of those objects.
    pub new_bytes: u64,
    /// `trusted.overlay.*` xattrs dropped from the layer's files.
    pub dropped_overlay_xattrs: u64,
    /// Where an ingest into an image spent its time (zero for a stub tree).
    pub times: IngestTimes,
}

/// Where an ingest into an image spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestTimes {
    /// Walking the tree, reading and hashing the files, and publishing them as objects
    /// (on every core).
    pub hash: std::time::Duration,
    /// Building and writing the image.
    pub image: std::time::Duration,
    /// The `syncfs` and the manifest.
    pub sync: std::time::Duration,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn tmp_name(store_tmp: &Path, what: &str) -> PathBuf {
    store_tmp.join(format!(
        "{what}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Ingests the layer tree at `fs_dir` into `store`, writing its manifest to `manifest`.
/// `tmp_dir` must be on the same filesystem (the store's `cas/tmp`). `lowers` are the
/// stub trees the snapshot was mounted over, topmost first (empty for a parentless
/// snapshot).
pub fn ingest_layer(
    store: &ObjectStore,
    tmp_dir: &Path,
    fs_dir: &Path,
    lowers: &[PathBuf],
    manifest: &Path,
    mode: StoreMode,
) -> Result<IngestStats, CasError> {
    let reflink = mode == StoreMode::Materialised && reflink_capable(fs_dir);
    let mut stats = IngestStats::default();
    let mut writer = ManifestWriter::create(manifest)?;
    // (dev, ino) of a hardlinked original -> (stub path, digest, size)
    let mut linked: HashMap<(u64, u64), (PathBuf, Digest, u64)> = HashMap::new();
    let mut dir_times: Vec<(PathBuf, FileMeta)> = Vec::new();
    // digest -> the redirect its stubs get (short alias, or the full path)
    let mut redirects: HashMap<Digest, Redirect> = HashMap::new();
    // materialised mode: (dev, ino) of the objects that already are one of this layer's
    // files, which no other file of the layer may become a link of
    let mut in_layer: HashSet<(u64, u64)> = HashSet::new();

    let walk = walkdir::WalkDir::new(fs_dir)
        .follow_links(false)
        .same_file_system(true)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry.map_err(walk_error(fs_dir))?;
        let path = entry.path();
        let md = fs::symlink_metadata(path).map_err(CasError::io("stat", path))?;
        let ft = md.file_type();
        if ft.is_dir() {
            if xattr::get(path, XATTR_REDIRECT)
                .map_err(CasError::io("getxattr", path))?
                .is_some()
            {
                // overlayfs never writes directory redirects here (no redirect_dir=on)
                xattr::remove(path, XATTR_REDIRECT).map_err(CasError::io("removexattr", path))?;
                stats.dropped_overlay_xattrs += 1;
            }
            dir_times.push((path.to_path_buf(), FileMeta::from(&md)));
            continue;
        }
        if !ft.is_file() {
            continue;
        }
        let rel = path.strip_prefix(fs_dir).unwrap_or(path).to_path_buf();
        let key = (md.dev(), md.ino());
        // Looked up whatever the link count is now: once the first name became a stub,
        // an original whose content was already stored is held by the other names alone
        // (nlink 1 for the last one). Files not yet visited are alive since before the
        // walk, so their inode numbers cannot be reused ones.
        if let Some((stub, digest, size)) = linked.get(&key) {
            let tmp = tmp_name(tmp_dir, "link");
            fs::hard_link(stub, &tmp).map_err(CasError::io("link", &tmp))?;
            fs::rename(&tmp, path).map_err(CasError::io("rename", path))?;
            writer.push(&ManifestEntry {
                path: rel,
                digest: *digest,
                size: *size,
            })?;
            stats.files += 1;
            continue;
        }
        let listed = listed_xattrs(At::Path(path), path)?;
        let overlay = listed.overlay_private() as u64;
        let metacopy = listed.has(XATTR_METACOPY);
        let (names, xattrs) = (listed.all, listed.own);
        // Which object holds the bytes, and whether this inode is to become it.
        let stubs = mode == StoreMode::Stubs;
        let (digest, publish) = if stubs && !lowers.is_empty() && md.size() > 0 && metacopy {
            (copied_up_object(store, path, &rel, lowers)?, false)
        } else {
            stats.dropped_overlay_xattrs += overlay;
            if overlay > 0 {
                strip_overlay_xattrs(path, &names)?;
            }
            if md.size() == 0 {
                continue;
            }
            let file = File::open(path).map_err(CasError::io("open", path))?;
            let (digest, size) = Digest::of_reader(&file).map_err(CasError::io("read", path))?;
            if size != md.size() {
                return Err(CasError::Hostile {
                    path: path.to_path_buf(),
                    reason: "file changed size while the layer was being committed",
                });
            }
            (digest, true)
        };
        let size = md.size();
        let tmp = tmp_name(tmp_dir, if stubs { "stub" } else { "copy" });
        let built = if stubs {
            let mut stub = || -> Result<(), CasError> {
                if publish && store.ensure_from_inode(path, &digest, true)? == Publish::New {
                    stats.new_objects += 1;
                    stats.new_bytes += size;
                    crate::crash_point!("ingest.object-published");
                }
                let redirect = match redirects.get(&digest) {
                    Some(r) => *r,
                    None => {
                        let r = store.redirect(&digest)?;
                        redirects.insert(digest, r);
                        r
                    }
                };
                write_stub(store.sys(), &tmp, &(&md).into(), &xattrs, &redirect)?;
                fs::rename(&tmp, path).map_err(CasError::io("rename", path))?;
                crate::crash_point!("ingest.stub-in-place");
                Ok(())
            };
            stub()
        } else {
            materialise(
                store,
                &tmp,
                path,
                &md,
                &xattrs,
                &digest,
                reflink,
                &mut in_layer,
                &mut stats,
            )
        };
        if let Err(e) = built {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if md.nlink() > 1 {
            linked.insert(key, (path.to_path_buf(), digest, size));
        }
        writer.push(&ManifestEntry {
            path: rel,
            digest,
            size,
        })?;
        stats.files += 1;
        stats.logical_bytes += size;
    }
    for (dir, meta) in dir_times.iter().rev() {
        meta.restore_times(store.sys(), At::Path(dir), dir)?;
    }
    crate::crash_point!("ingest.before-syncfs");
    let root = File::open(fs_dir).map_err(CasError::io("open", fs_dir))?;
    nix::unistd::syncfs(root.as_raw_fd()).map_err(|e| CasError::io("syncfs", fs_dir)(e.into()))?;
    crate::crash_point!("ingest.before-manifest");
    writer.finish()?;
    crate::crash_point!("ingest.after-manifest");
    Ok(stats)
}

/// Materialised mode: the layer keeps a real file. New content: the file's inode also
/// becomes the object. Known content: the file becomes a hardlink of the object when
/// every bit of metadata matches and the object is not already another file of this
/// layer (`in_layer`: two files the layer holds apart must not become one inode, which
/// its diff would then show as a hardlink), a reflink copy of it on filesystems that
/// share extents, and otherwise stays as it is.
#[allow(clippy::too_many_arguments)]
fn materialise(
    store: &ObjectStore,
    tmp: &Path,
    path: &Path,
    md: &fs::Metadata,
    xattrs: &[(std::ffi::OsString, Vec<u8>)],
    digest: &Digest,
    reflink: bool,
    in_layer: &mut HashSet<(u64, u64)>,
    stats: &mut IngestStats,
) -> Result<(), CasError> {
    if store.ensure_from_inode(path, digest, false)? == Publish::New {
        stats.new_objects += 1;
        stats.new_bytes += md.size();
        in_layer.insert((md.dev(), md.ino()));
        return Ok(());
    }
    let object = store.path(digest);
    let omd = fs::symlink_metadata(&object).map_err(CasError::io("stat", &object))?;
    let object_key = (omd.dev(), omd.ino());
    if object_key == (md.dev(), md.ino()) {
        in_layer.insert(object_key);
        return Ok(());
    }
    let same = !in_layer.contains(&object_key)
        && (
            omd.mode(),
            omd.uid(),
            omd.gid(),
            omd.mtime(),
            omd.mtime_nsec(),
        ) == (md.mode(), md.uid(), md.gid(), md.mtime(), md.mtime_nsec())
        && own_xattrs(&object)? == xattrs;
    if same {
        fs::hard_link(&object, tmp).map_err(CasError::io("link", tmp))?;
        in_layer.insert(object_key);
    } else if reflink {
        fs::copy(&object, tmp).map_err(CasError::io("copy", tmp))?;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(CasError::io("open", tmp))?;
        // the copy took the object's xattrs: replace them with the file's own
        for name in xattr::list(tmp).map_err(CasError::io("listxattr", tmp))? {
            xattr::remove(tmp, &name).map_err(CasError::io("removexattr", tmp))?;
        }
        apply_metadata(store.sys(), &f, tmp, &md.into(), xattrs)?;
    } else {
        return Ok(());
    }
    fs::rename(tmp, path).map_err(CasError::io("rename", path))
}

/// A walk's failure under `fs_dir` as the store reports it.
pub(crate) fn walk_error(fs_dir: &Path) -> impl Fn(walkdir::Error) -> CasError + '_ {
    move |e| {
        let path = e.path().unwrap_or(fs_dir).to_path_buf();
        CasError::io("walk", path)(
            e.into_io_error()
                .unwrap_or_else(|| std::io::Error::other("filesystem loop")),
        )
    }
}

/// The object behind a metadata-only copy-up at `rel`: the stub of the same path (or of
/// the path its `redirect` names) in the topmost lower layer that has it.
pub(crate) fn copied_up_object(
    store: &ObjectStore,
    path: &Path,
    rel: &Path,
    lowers: &[PathBuf],
) -> Result<Digest, CasError> {
    let origin = match xattr::get(path, XATTR_REDIRECT).map_err(CasError::io("getxattr", path))? {
        Some(r) => {
            let r = PathBuf::from(std::ffi::OsStr::from_bytes(&r));
            if r.is_absolute() {
                r.strip_prefix("/").unwrap_or(&r).to_path_buf()
            } else {
                rel.parent().unwrap_or(Path::new("")).join(r)
            }
        }
        None => rel.to_path_buf(),
    };
    if origin
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CasError::Hostile {
            path: path.to_path_buf(),
            reason: "metacopy redirect leaves the layer",
        });
    }
    for lower in lowers {
        let candidate = lower.join(&origin);
        match fs::symlink_metadata(&candidate) {
            Ok(md) if md.is_file() => {
                if let Some(t) = stub_target(store.sys(), &candidate)? {
                    if let Some(d) = store.resolve(&t)? {
                        return Ok(d);
                    }
                }
                break;
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CasError::io("stat", candidate)(e)),
        }
    }
    Err(CasError::Hostile {
        path: path.to_path_buf(),
        reason: "metadata-only copy-up whose data is in no lower layer",
    })
}

/// Removes overlayfs' own xattrs among `names` (those `path` was listed with).
fn strip_overlay_xattrs(path: &Path, names: &[std::ffi::OsString]) -> Result<(), CasError> {
    for name in names.iter().filter(|n| is_overlay_private(n)) {
        xattr::remove(path, name).map_err(CasError::io("removexattr", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    fn layer(root: &Path, name: &str, files: &[(&str, &[u8])], links: &[(&str, &str)]) -> PathBuf {
        let fs_dir = root.join(name);
        fs::create_dir_all(&fs_dir).unwrap();
        for (path, data) in files {
            fs::write(fs_dir.join(path), data).unwrap();
        }
        for (from, to) in links {
            fs::hard_link(fs_dir.join(from), fs_dir.join(to)).unwrap();
        }
        fs_dir
    }

    /// Ingests the parentless layer at `fs_dir` in `mode`, its manifest beside it.
    fn ingest(store: &ObjectStore, layout: &Layout, fs_dir: &Path, mode: StoreMode) -> IngestStats {
        let manifest = fs_dir.with_extension("manifest");
        ingest_layer(store, &layout.tmp_dir(), fs_dir, &[], &manifest, mode).unwrap()
    }

    /// A hardlinked file whose content is already stored: the original inode is not
    /// linked into the store, so after its first name became a stub the other name is
    /// its last link. It must still become a hardlink of the same stub, counted once.
    #[test]
    fn hardlinks_of_already_stored_content_stay_hardlinks() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("store")).unwrap();
        use crate::sys::Syscalls as _;
        let sys = std::sync::Arc::new(crate::sys::fake::Recorder::new(true));
        let store = ObjectStore::new(&layout).with_syscalls(sys.clone());
        let data: &[u8] = b"#!/usr/bin/perl shared between two images";
        for (n, name) in ["one", "two"].iter().enumerate() {
            let fs_dir = layer(dir.path(), name, &[("perl", data)], &[("perl", "perl5")]);
            let stats = ingest(&store, &layout, &fs_dir, StoreMode::Stubs);
            assert_eq!(stats.files, 2, "layer {name}");
            assert_eq!(stats.logical_bytes, data.len() as u64, "layer {name}");
            assert_eq!(stats.new_objects, u64::from(n == 0), "layer {name}");
            let a = fs::symlink_metadata(fs_dir.join("perl")).unwrap();
            let b = fs::symlink_metadata(fs_dir.join("perl5")).unwrap();
            assert_eq!(a.ino(), b.ino(), "layer {name}: names must share one stub");
            assert_eq!(a.nlink(), 2, "layer {name}");
            // the short alias redirect where the store uses aliases (it fits in an
            // ext4 inode next to metacopy), otherwise the object's full name
            let r = sys
                .trusted_xattr(&fs_dir.join("perl"), XATTR_REDIRECT)
                .unwrap()
                .unwrap();
            let d = Digest::of(data);
            let expect = match store.aliases() {
                true => Redirect::Alias(d),
                false => Redirect::Full(d),
            };
            assert_eq!(r, expect.value().into_bytes());
        }
    }

    /// Materialised mode: two files of one layer with the same bytes and the same
    /// metadata (created within one clock tick) stay two inodes, or the layer's diff
    /// would show a hardlink the layer never had. A later layer's copy of them may still
    /// become a link of the object, once.
    #[test]
    fn materialised_files_of_one_layer_never_become_one_inode() {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("store")).unwrap();
        let sys = std::sync::Arc::new(crate::sys::fake::Recorder::new(true));
        let store = ObjectStore::new(&layout).with_syscalls(sys);
        let data: &[u8] = b"bar\n";
        let when = TimeSpec::new(1_700_000_000, 0);
        let mut objects = Vec::new();
        for name in ["one", "two"] {
            let fs_dir = layer(dir.path(), name, &[("bar", data), ("foo", data)], &[]);
            for f in ["bar", "foo"] {
                utimensat(
                    None,
                    &fs_dir.join(f),
                    &when,
                    &when,
                    UtimensatFlags::NoFollowSymlink,
                )
                .unwrap();
            }
            let stats = ingest(&store, &layout, &fs_dir, StoreMode::Materialised);
            assert_eq!(stats.files, 2, "layer {name}");
            let bar = fs::symlink_metadata(fs_dir.join("bar")).unwrap();
            let foo = fs::symlink_metadata(fs_dir.join("foo")).unwrap();
            assert_ne!(bar.ino(), foo.ino(), "layer {name}: two files, two inodes");
            assert_eq!(fs::read(fs_dir.join("foo")).unwrap(), data);
            objects.push(fs::symlink_metadata(store.path(&Digest::of(data))).unwrap());
        }
        let object = &objects[1];
        let two = dir.path().join("two");
        let linked = ["bar", "foo"]
            .iter()
            .filter(|f| fs::symlink_metadata(two.join(f)).unwrap().ino() == object.ino())
            .count();
        assert_eq!(
            linked, 1,
            "layer two: one of its files links layer one's object"
        );
        let one = fs::symlink_metadata(dir.path().join("one/bar")).unwrap();
        assert_eq!(one.ino(), object.ino(), "the first file became the object");
    }
}
