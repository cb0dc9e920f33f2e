//! The object directory: one immutable file per distinct content.
//!
//! An object is published by hard-linking an inode that already holds the bytes (the
//! layer's own file, on the same filesystem) under `cas/tmp`, normalising its metadata
//! there (mode 0444, owner root, no xattrs: metadata lives in stubs, never in objects),
//! then linking it under `objects/ab/cdef…`. `link(2)` refuses to replace, so two
//! commits racing on the same content both succeed and exactly one inode wins
//! ("already exists" is success): inserts are idempotent.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::Digest;
use crate::error::CasError;
use crate::layout::Layout;

/// Mode of every object: readable, never writable (overlayfs copies up before writes).
pub const OBJECT_MODE: u32 = 0o444;

/// Whether files on the filesystem of `path` can share extents (XFS, btrfs): a copy
/// with `copy_file_range(2)` there is a reflink and costs no data blocks.
pub fn reflink_capable(path: &Path) -> bool {
    use nix::sys::statfs::{statfs, BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC};
    statfs(path)
        .map(|s| s.filesystem_type() == XFS_SUPER_MAGIC || s.filesystem_type() == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Whether a publish added content or found it already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// The object is new: the inode now belongs to the store.
    New,
    /// The store already had this content; the source was left alone.
    Existing,
}

/// The `cas/objects` directory.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    objects: PathBuf,
    tmp: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ObjectStore {
    /// The object store of `layout`.
    pub fn new(layout: &Layout) -> ObjectStore {
        ObjectStore {
            objects: layout.objects_dir(),
            tmp: layout.tmp_dir(),
        }
    }

    /// The objects directory (overlayfs' data-only lower layer).
    pub fn dir(&self) -> &Path {
        &self.objects
    }

    /// Where the object for `digest` lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.objects.join(digest.object_relpath())
    }

    /// Whether the object exists.
    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok()
    }

    /// Publishes the inode at `src` (which must hold exactly the bytes of `digest`) as
    /// that object, unless the object already exists. In stub mode the inode's metadata
    /// is normalised first (it then belongs to the store alone); in materialised mode
    /// (`normalise == false`) the layer keeps the inode as its file and the object is a
    /// second name of it.
    pub fn ensure_from_inode(
        &self,
        src: &Path,
        digest: &Digest,
        normalise: bool,
    ) -> Result<Publish, CasError> {
        let dst = self.path(digest);
        if fs::symlink_metadata(&dst).is_ok() {
            return Ok(Publish::Existing);
        }
        let tmp = self.tmp.join(format!(
            "{}.{}.{}",
            digest.hex(),
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::hard_link(src, &tmp).map_err(CasError::io("link", &tmp))?;
        let result = if normalise {
            self.normalise(&tmp).and_then(|_| self.link(&tmp, &dst))
        } else {
            self.link(&tmp, &dst)
        };
        let _ = fs::remove_file(&tmp);
        result
    }

    fn normalise(&self, tmp: &Path) -> Result<(), CasError> {
        nix::unistd::chown(tmp, Some(0.into()), Some(0.into()))
            .map_err(|e| CasError::io("chown", tmp)(e.into()))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(OBJECT_MODE))
            .map_err(CasError::io("chmod", tmp))?;
        for name in xattr::list(tmp).map_err(CasError::io("listxattr", tmp))? {
            xattr::remove(tmp, &name).map_err(CasError::io("removexattr", tmp))?;
        }
        Ok(())
    }

    fn link(&self, tmp: &Path, dst: &Path) -> Result<Publish, CasError> {
        if let Some(fan) = dst.parent() {
            match fs::create_dir(fan) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(CasError::io("mkdir", fan)(e))
                }
                _ => {}
            }
        }
        match fs::hard_link(tmp, dst) {
            Ok(()) => Ok(Publish::New),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Publish::Existing),
            Err(e) => Err(CasError::io("link", dst)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn publish_is_idempotent_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("root")).unwrap();
        let store = ObjectStore::new(&layout);
        let a = dir.path().join("root/a");
        let b = dir.path().join("root/b");
        fs::write(&a, b"same").unwrap();
        fs::write(&b, b"same").unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o4755)).unwrap();
        let d = Digest::of(b"same");
        assert_eq!(store.ensure_from_inode(&a, &d, true).unwrap(), Publish::New);
        assert_eq!(
            store.ensure_from_inode(&b, &d, true).unwrap(),
            Publish::Existing
        );
        let md = fs::metadata(store.path(&d)).unwrap();
        assert_eq!(md.mode() & 0o7777, OBJECT_MODE);
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"same");
        assert_eq!(
            fs::read_dir(layout.tmp_dir()).unwrap().count(),
            0,
            "tmp not swept"
        );
        assert!(store.contains(&d));
    }
}
