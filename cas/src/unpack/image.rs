//! The layer as one EROFS image ([`crate::erofs`]) instead of a stub tree: every entry
//! goes into an in-memory [`Image`] on the unpack thread, in archive order, and the
//! image is written once at the end. The rules are the stub tree's (see the module
//! docs of [`super`]); only where an entry lands differs:
//!
//! * replacing is the image's own rule (an entry replaces what is at its name unless
//!   both are directories), so nothing is cleared first and no stub thread runs;
//! * times are the entries' own from the start (no directory times restored at the end);
//! * parents are resolved through the image's symlinks, and made with the attributes
//!   of the same directory in the layers below, as on disk;
//! * every file names its object by its full name (`/ab/cdef…`): xattrs in an image
//!   have no inode-size limit, so aliases are never needed.
//!
//! The image is written to a temporary name and renamed into place before the apply's
//! `syncfs`, which makes it durable with the objects, and before the manifest: a layer
//! whose manifest exists has its image on disk.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::tree::EntryMeta;
use super::{UnpackError, Unpacker, XATTR_OPAQUE};
use crate::digest::Digest;
use crate::erofs::{Attrs, Image, Leaf};
use crate::error::CasError;
use crate::objects::Redirect;
use crate::stub::FileMeta;

/// An entry's attributes in the image.
fn attrs(meta: &FileMeta, xattrs: &[(OsString, Vec<u8>)]) -> Attrs {
    Attrs {
        mode: meta.mode & 0o7777,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime.tv_sec(),
        mtime_nsec: meta.mtime.tv_nsec() as u32,
        xattrs: xattrs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.clone()))
            .collect(),
    }
}

/// The object a file of the image reads from.
pub(super) fn object_of(leaf: &Leaf) -> Option<(Digest, u64)> {
    match leaf {
        Leaf::File {
            size,
            object: Some(d),
        } => Some((*d, *size)),
        _ => None,
    }
}

/// The attributes of the layer's root: those of the (empty) layer directory, which
/// the image stands in for.
pub(super) fn root_attrs(fs_dir: &Path) -> Result<Attrs, CasError> {
    let md = fs::metadata(fs_dir).map_err(CasError::io("stat", fs_dir))?;
    Ok(Attrs::from(&md))
}

fn hostile(path: &Path, reason: &'static str) -> CasError {
    CasError::Hostile {
        path: path.to_path_buf(),
        reason,
    }
}

impl Unpacker<'_> {
    fn image(&mut self) -> &mut Image {
        self.image.as_mut().expect("image mode")
    }

    /// `.wh..wh..opq`: the directory `parent` hides the layers below.
    pub(super) fn image_opaque(&mut self, parent: &Path) -> Result<(), UnpackError> {
        let a = self.image().attrs_mut(parent).map_err(CasError::from)?;
        a.xattrs.retain(|(n, _)| n != XATTR_OPAQUE.as_bytes());
        a.xattrs
            .push((XATTR_OPAQUE.as_bytes().to_vec(), b"y".to_vec()));
        Ok(())
    }

    pub(super) fn image_whiteout(
        &mut self,
        hidden: &Path,
        meta: &FileMeta,
    ) -> Result<(), UnpackError> {
        let mut a = attrs(meta, &[]);
        a.mode = 0;
        self.image()
            .insert(hidden, a, Leaf::WHITEOUT)
            .map_err(CasError::from)?;
        Ok(())
    }

    pub(super) fn image_directory(
        &mut self,
        rel: &Path,
        em: &EntryMeta,
    ) -> Result<(), UnpackError> {
        let a = attrs(&em.meta, &em.xattrs);
        self.image().dir(rel, a).map_err(CasError::from)?;
        Ok(())
    }

    pub(super) fn image_symlink(
        &mut self,
        rel: &Path,
        target: &OsStr,
        em: &EntryMeta,
    ) -> Result<(), UnpackError> {
        // user.* xattrs are not allowed on symlinks (containerd skips them, as on disk)
        let xattrs: Vec<_> = em
            .xattrs
            .iter()
            .filter(|(n, _)| !n.as_bytes().starts_with(b"user."))
            .cloned()
            .collect();
        let mut a = attrs(&em.meta, &xattrs);
        a.mode = 0o777;
        let leaf = Leaf::Symlink(target.as_bytes().to_vec());
        self.image().insert(rel, a, leaf).map_err(CasError::from)?;
        Ok(())
    }

    pub(super) fn image_leaf(
        &mut self,
        rel: &Path,
        leaf: Leaf,
        em: &EntryMeta,
    ) -> Result<(), UnpackError> {
        let a = attrs(&em.meta, &em.xattrs);
        self.image().insert(rel, a, leaf).map_err(CasError::from)?;
        Ok(())
    }

    /// A regular file: its object by full name, or an empty file.
    pub(super) fn image_file(
        &mut self,
        rel: &Path,
        meta: &FileMeta,
        xattrs: &[(OsString, Vec<u8>)],
        content: Option<Redirect>,
    ) -> Result<(), UnpackError> {
        let leaf = Leaf::File {
            size: if content.is_some() { meta.size } else { 0 },
            object: content.map(|r| r.digest()),
        };
        let a = attrs(meta, xattrs);
        self.image().insert(rel, a, leaf).map_err(CasError::from)?;
        Ok(())
    }

    /// A hardlink `rel` to `target` (a cleaned name of the layer).
    pub(super) fn image_hardlink(
        &mut self,
        rel: PathBuf,
        target: &Path,
    ) -> Result<(), UnpackError> {
        let target = match (target.file_name(), target.parent()) {
            (Some(b), p) => self.image_resolve(p.unwrap_or(Path::new("")))?.join(b),
            (None, _) => target.to_path_buf(),
        };
        let Some(leaf) = self.image().leaf(&target) else {
            return Err(hostile(
                &rel,
                "hardlink to an entry that is not earlier in the same layer",
            )
            .into());
        };
        let content = object_of(leaf);
        if target == rel {
            return Ok(());
        }
        self.image().link(&rel, &target).map_err(CasError::from)?;
        if let Some((digest, size)) = content {
            self.stats.files += 1;
            self.push_manifest(&rel, digest, size)?;
        }
        Ok(())
    }

    /// Resolves `rel` (a cleaned parent path) inside the layer's image, symlinks
    /// followed but never out of the layer; components not there yet are kept.
    pub(super) fn image_resolve(&mut self, rel: &Path) -> Result<PathBuf, CasError> {
        let image = self.image();
        super::tree::resolve_inside(rel, |next| {
            Ok(match image.leaf(next) {
                Some(Leaf::Symlink(target)) => Some(PathBuf::from(OsStr::from_bytes(target))),
                _ => None,
            })
        })
    }

    /// Makes every missing directory of `rel`, with the attributes of the same
    /// directory in the layers below (0755, root and the current time otherwise).
    pub(super) fn image_ensure_dirs(&mut self, rel: &Path) -> Result<(), CasError> {
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            match self.image().kind(&cur) {
                Some(true) => continue,
                Some(false) => {
                    return Err(hostile(&cur, "a parent of an entry is not a directory"))
                }
                None => {}
            }
            let lower = self
                .t
                .lowers
                .iter()
                .map(|l| l.join(&cur))
                .find_map(|p| fs::symlink_metadata(p).ok().filter(|m| m.is_dir()));
            let a = match lower {
                Some(md) => Attrs::from(&md),
                None => {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    Attrs {
                        mtime: now.as_secs() as i64,
                        mtime_nsec: now.subsec_nanos(),
                        ..Attrs::implicit_dir()
                    }
                }
            };
            self.image().dir(&cur, a).map_err(CasError::from)?;
        }
        Ok(())
    }

    /// Writes the image at `at` (made durable by the apply's `syncfs`).
    pub(super) fn write_image(&mut self, at: &Path) -> Result<(), CasError> {
        self.stats.image_bytes = crate::erofs::write_image(self.image(), at)?;
        Ok(())
    }
}
