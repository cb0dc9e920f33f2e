//! Tree operations: each tar entry carried out in the layer directory, in archive
//! order, as containerd's applier writes it into an overlay upper directory.
//!
//! An entry is classified first ([`super::names`]); then its parent is resolved inside
//! the layer (symlinks followed, never out of it) and made where missing, with the
//! attributes of the same directory in the layers below; then the entry replaces
//! whatever an earlier entry left at its name, unless both are directories. Regular
//! files go to [`super::writes`], hardlinks to [`super::hardlinks`].

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;

use super::names::{classify, EntryKind, Header, Operation};
use super::{ChunkReader, UnpackError, Unpacker, XATTR_OPAQUE};
use crate::erofs::Leaf;
use crate::error::CasError;
use crate::stub::FileMeta;
use crate::sys::At;

/// Symlinks followed while resolving one parent path inside the layer.
const MAX_SYMLINKS: usize = 255;

/// Metadata of one tar entry, as it will be applied.
pub(super) struct EntryMeta {
    pub(super) meta: FileMeta,
    pub(super) xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Unpacker<'_> {
    /// Carries out one tar entry.
    pub(super) fn entry(
        &mut self,
        mut entry: tar::Entry<'_, ChunkReader<'_>>,
    ) -> Result<(), UnpackError> {
        self.stats.entries += 1;
        let kind = entry.header().entry_type();
        let device = match kind {
            tar::EntryType::Char | tar::EntryType::Block => {
                let h = entry.header();
                (
                    h.device_major().map_err(UnpackError::Tar)?.unwrap_or(0),
                    h.device_minor().map_err(UnpackError::Tar)?.unwrap_or(0),
                )
            }
            _ => (0, 0),
        };
        // borrowed from the header only while classifying: no copy of every name
        let op = {
            let (name, link) = (entry.path_bytes(), entry.link_name_bytes());
            classify(&Header {
                name: &name,
                kind,
                link: link.as_deref(),
                device,
            })?
        };
        let parent = match &op {
            Operation::Root => {
                tracing::debug!("entry resolves to the layer root: ignored");
                return Ok(());
            }
            Operation::Opaque { parent }
            | Operation::Reserved { parent }
            | Operation::Whiteout { parent, .. }
            | Operation::Make { parent, .. } => parent,
        };
        if self.image.is_some() {
            let parent = self.image_resolve(parent)?;
            let em = self.entry_meta(&mut entry)?;
            self.image_ensure_dirs(&parent)?;
            return self.image_entry(op, parent, em, &mut entry);
        }
        if !parent.as_os_str().is_empty() && !self.known_dirs.contains(parent) {
            // resolving looks at what is on disk, which must be complete
            self.settle_stubs()?;
        }
        let parent = self.resolve_parent(parent)?;
        let em = self.entry_meta(&mut entry)?;
        self.ensure_dirs(&parent)?;
        match op {
            Operation::Root => Ok(()),
            Operation::Opaque { .. } => {
                let dir = self.abs(&parent);
                self.t
                    .store
                    .sys()
                    .set_trusted_xattr(At::Path(&dir), XATTR_OPAQUE, b"y")
                    .map_err(CasError::io("setxattr", &dir))?;
                Ok(())
            }
            Operation::Reserved { .. } => {
                tracing::debug!(dir = %parent.display(), "skipping a reserved whiteout name");
                Ok(())
            }
            Operation::Whiteout { name, .. } => self.whiteout(&parent.join(name), &em.meta),
            Operation::Make { name, kind, .. } => {
                let rel = parent.join(name);
                if kind != EntryKind::Regular {
                    // every entry but a regular file is made here, in order, so the
                    // earlier entries it may replace or point at must be complete
                    if matches!(kind, EntryKind::Hardlink(_)) {
                        self.settle_stubs()?;
                    } else {
                        self.settle_stub(&rel)?;
                    }
                }
                match kind {
                    EntryKind::Dir => self.directory(rel, em),
                    EntryKind::Regular => self.regular(&mut entry, rel, em),
                    EntryKind::Symlink(target) => self.symlink(&rel, &target, &em),
                    EntryKind::Hardlink(target) => self.hardlink(rel, &target),
                    EntryKind::Char(major, minor) => {
                        let dev = nix::sys::stat::makedev(major.into(), minor.into());
                        self.device(&rel, SFlag::S_IFCHR, dev, &em)
                    }
                    EntryKind::Block(major, minor) => {
                        let dev = nix::sys::stat::makedev(major.into(), minor.into());
                        self.device(&rel, SFlag::S_IFBLK, dev, &em)
                    }
                    EntryKind::Fifo => self.device(&rel, SFlag::S_IFIFO, 0, &em),
                    EntryKind::Other(other) => {
                        tracing::debug!(path = %rel.display(), kind = ?other, "tar entry type skipped");
                        Ok(())
                    }
                }
            }
        }
    }

    /// One entry, classified and with its parent made, into the layer's image.
    fn image_entry(
        &mut self,
        op: Operation,
        parent: PathBuf,
        em: EntryMeta,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
    ) -> Result<(), UnpackError> {
        match op {
            Operation::Root => Ok(()),
            Operation::Opaque { .. } => self.image_opaque(&parent),
            Operation::Reserved { .. } => {
                tracing::debug!(dir = %parent.display(), "skipping a reserved whiteout name");
                Ok(())
            }
            Operation::Whiteout { name, .. } => self.image_whiteout(&parent.join(name), &em.meta),
            Operation::Make { name, kind, .. } => {
                let rel = parent.join(name);
                match kind {
                    EntryKind::Dir => self.image_directory(&rel, &em),
                    EntryKind::Regular => self.regular(entry, rel, em),
                    EntryKind::Symlink(target) => self.image_symlink(&rel, &target, &em),
                    EntryKind::Hardlink(target) => self.image_hardlink(rel, &target),
                    EntryKind::Char(major, minor) => {
                        self.image_leaf(&rel, Leaf::CharDevice { major, minor }, &em)
                    }
                    EntryKind::Block(major, minor) => {
                        self.image_leaf(&rel, Leaf::BlockDevice { major, minor }, &em)
                    }
                    EntryKind::Fifo => self.image_leaf(&rel, Leaf::Fifo, &em),
                    EntryKind::Other(other) => {
                        tracing::debug!(path = %rel.display(), kind = ?other, "tar entry type skipped");
                        Ok(())
                    }
                }
            }
        }
    }

    /// A whiteout (character device 0/0) hiding `hidden` of the layers below.
    fn whiteout(&mut self, hidden: &Path, meta: &FileMeta) -> Result<(), UnpackError> {
        self.settle_stub(hidden)?;
        let sys = self.t.store.sys();
        self.replacing(hidden, |abs| {
            sys.mknod(abs, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(CasError::io("mknod", abs))
        })?;
        self.chown(&self.abs(hidden), meta)?;
        Ok(())
    }

    /// A directory: made, or merged with the one an earlier entry made (its metadata
    /// replaced); anything else at the name goes.
    fn directory(&mut self, rel: PathBuf, em: EntryMeta) -> Result<(), UnpackError> {
        let abs = self.abs(&rel);
        let mkdir = |abs: &Path| match fs::DirBuilder::new().mode(0o700).create(abs) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            made => made.map(|()| true).map_err(CasError::io("mkdir", abs)),
        };
        if !self.known_dirs.contains(&rel) && !mkdir(&abs)? {
            self.clear(&rel, true)?;
            mkdir(&abs)?;
        }
        self.set_owner_mode(&abs, &em.meta)?;
        for (n, v) in &em.xattrs {
            xattr::set(&abs, n, v).map_err(CasError::io("setxattr", &abs))?;
        }
        self.known_dirs.insert(rel.clone());
        self.dirs.push((rel, em.meta));
        Ok(())
    }

    /// A symlink, its target as archived.
    fn symlink(
        &mut self,
        rel: &Path,
        target: &OsString,
        em: &EntryMeta,
    ) -> Result<(), UnpackError> {
        self.replacing(rel, |abs| {
            std::os::unix::fs::symlink(target, abs).map_err(CasError::io("symlink", abs))
        })?;
        let abs = self.abs(rel);
        self.chown(&abs, &em.meta)?;
        for (n, v) in &em.xattrs {
            // user.* xattrs are not allowed on symlinks; containerd skips those too
            if let Err(e) = xattr::set(&abs, n, v) {
                tracing::debug!(path = %rel.display(), error = %e, "xattr on symlink skipped");
            }
        }
        self.set_times(&abs, &em.meta)?;
        Ok(())
    }

    /// A device node or a FIFO.
    fn device(
        &mut self,
        rel: &Path,
        flag: SFlag,
        dev: u64,
        em: &EntryMeta,
    ) -> Result<(), UnpackError> {
        let sys = self.t.store.sys();
        self.replacing(rel, |abs| {
            sys.mknod(abs, flag, Mode::from_bits_truncate(0o600), dev)
                .map_err(CasError::io("mknod", abs))
        })?;
        let abs = self.abs(rel);
        self.chown(&abs, &em.meta)?;
        fs::set_permissions(&abs, fs::Permissions::from_mode(em.meta.mode))
            .map_err(CasError::io("chmod", &abs))?;
        for (n, v) in &em.xattrs {
            xattr::set(&abs, n, v).map_err(CasError::io("setxattr", &abs))?;
        }
        self.set_times(&abs, &em.meta)?;
        Ok(())
    }

    /// The owner of `path` (a symlink itself).
    fn chown(&self, path: &Path, meta: &FileMeta) -> Result<(), CasError> {
        self.t
            .store
            .sys()
            .chown(At::Path(path), meta.uid, meta.gid)
            .map_err(CasError::io("chown", path))
    }

    /// Owner, then mode (a chown clears set-id bits).
    pub(super) fn set_owner_mode(&self, path: &Path, meta: &FileMeta) -> Result<(), CasError> {
        self.chown(path, meta)?;
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
            .map_err(CasError::io("chmod", path))
    }

    /// The times of `path` (a symlink itself).
    fn set_times(&self, path: &Path, meta: &FileMeta) -> Result<(), CasError> {
        meta.restore_times(self.t.store.sys(), At::Path(path), path)
    }

    fn entry_meta(
        &mut self,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
    ) -> Result<EntryMeta, UnpackError> {
        let h = entry.header();
        let tar_err = UnpackError::Tar;
        let mode = h.mode().map_err(tar_err)? & 0o7777;
        let uid = h.uid().map_err(UnpackError::Tar)? as u32;
        let gid = h.gid().map_err(UnpackError::Tar)? as u32;
        let mut mtime = TimeSpec::new(h.mtime().map_err(UnpackError::Tar)? as i64, 0);
        let mut atime: Option<TimeSpec> = None;
        let size = entry.size();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Tar)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Tar)?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.starts_with(b"trusted.") {
                        self.stats.skipped_xattrs += 1;
                        tracing::debug!(xattr = %String::from_utf8_lossy(name), "skipping trusted.* xattr from the archive");
                        continue;
                    }
                    xattrs.push((
                        OsString::from_vec(name.to_vec()),
                        ext.value_bytes().to_vec(),
                    ));
                } else if key == b"mtime" {
                    if let Some(t) = pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                } else if key == b"atime" {
                    atime = pax_time(ext.value_bytes());
                }
            }
        }
        // containerd: atime is the later of the archive's atime and mtime.
        let atime = match atime {
            Some(a) if (a.tv_sec(), a.tv_nsec()) > (mtime.tv_sec(), mtime.tv_nsec()) => a,
            _ => mtime,
        };
        Ok(EntryMeta {
            meta: FileMeta {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            },
            xattrs,
        })
    }

    /// Resolves `rel` (a cleaned parent path) inside the layer: symlinks in the layer
    /// are followed, but never out of it. Components that do not exist yet are kept.
    pub(super) fn resolve_parent(&self, rel: &Path) -> Result<PathBuf, CasError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(rel.to_path_buf());
        }
        resolve_inside(rel, |next| match fs::symlink_metadata(self.abs(next)) {
            Ok(md) if md.file_type().is_symlink() => fs::read_link(self.abs(next))
                .map(Some)
                .map_err(CasError::io("readlink", self.abs(next))),
            _ => Ok(None),
        })
    }

    /// Makes sure every directory of `rel` exists, creating missing ones with the
    /// attributes the same directory has in the layers below.
    pub(super) fn ensure_dirs(&mut self, rel: &Path) -> Result<(), CasError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            if self.known_dirs.contains(&cur) {
                continue;
            }
            let abs = self.abs(&cur);
            match fs::symlink_metadata(&abs) {
                Ok(md) if md.is_dir() => {
                    self.known_dirs.insert(cur.clone());
                    continue;
                }
                Ok(_) => {
                    return Err(CasError::Hostile {
                        path: cur.clone(),
                        reason: "a parent of an entry is not a directory",
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CasError::io("stat", abs)(e)),
            }
            let lower = self
                .t
                .lowers
                .iter()
                .map(|l| l.join(&cur))
                .find_map(|p| fs::symlink_metadata(p).ok().filter(|m| m.is_dir()));
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&abs)
                .map_err(CasError::io("mkdir", &abs))?;
            if let Some(md) = lower {
                let meta = FileMeta::from(&md);
                self.set_owner_mode(&abs, &meta)?;
                self.dirs.push((cur.clone(), meta));
            }
            // every directory of the layer is known, so that a file replacing one is
            // made on this thread (see `make_stub`)
            self.known_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// Removes whatever is at `rel`.
    pub(super) fn clear(&mut self, rel: &Path, keep_dir: bool) -> Result<(), UnpackError> {
        // what is cleared may be, or hold, stubs still being created
        self.settle_stubs()?;
        let abs = self.abs(rel);
        if keep_dir && self.known_dirs.contains(rel) {
            return Ok(());
        }
        match fs::symlink_metadata(&abs) {
            Ok(md) if md.is_dir() && keep_dir => Ok(()),
            Ok(md) if md.is_dir() => {
                self.known_dirs.retain(|d| !d.starts_with(rel));
                Ok(crate::layout::remove_tree(&abs)?)
            }
            Ok(_) => fs::remove_file(&abs).map_err(|e| CasError::io("remove", &abs)(e).into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CasError::io("stat", abs)(e).into()),
        }
    }

    /// Makes the entry `rel` (not a directory) with `make`, replacing what an earlier
    /// entry left at that name. The layer starts empty, so the name is tried first and
    /// cleared only when it is taken: no lookup for the common case.
    pub(super) fn replacing<T>(
        &mut self,
        rel: &Path,
        make: impl Fn(&Path) -> Result<T, CasError>,
    ) -> Result<T, UnpackError> {
        let abs = self.abs(rel);
        match make(&abs) {
            Err(e) if e.is_already_exists() => {
                self.clear(rel, false)?;
                Ok(make(&abs)?)
            }
            made => Ok(made?),
        }
    }
}

/// Resolves `rel` (a cleaned parent path) inside a layer whose entries `symlink`
/// describes (the target of the symlink at a path, `None` for anything else): symlinks
/// are followed, never out of the layer; components not there yet are kept.
pub(super) fn resolve_inside(
    rel: &Path,
    mut symlink: impl FnMut(&Path) -> Result<Option<PathBuf>, CasError>,
) -> Result<PathBuf, CasError> {
    let mut todo: Vec<OsString> = rel
        .components()
        .rev()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut done = PathBuf::new();
    let mut links = 0;
    while let Some(comp) = todo.pop() {
        if comp == ".." {
            done.pop();
            continue;
        }
        if comp == "." || comp.is_empty() {
            continue;
        }
        let next = done.join(&comp);
        match symlink(&next)? {
            Some(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(CasError::Hostile {
                        path: rel.to_path_buf(),
                        reason: "too many levels of symbolic links in the path",
                    });
                }
                if target.is_absolute() {
                    done = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::RootDir | Component::Prefix(_) => {}
                        other => todo.push(other.as_os_str().to_os_string()),
                    }
                }
            }
            None => done = next,
        }
    }
    Ok(done)
}

/// A PAX time (`1700000000.123456789`, possibly negative) as a timespec.
pub(super) fn pax_time(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += c.to_digit(10)? as i64 * 10i64.pow(8 - i as u32);
    }
    if s.starts_with('-') && nanos > 0 {
        return Some(TimeSpec::new(secs - 1, 1_000_000_000 - nanos));
    }
    Some(TimeSpec::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse() {
        let t = pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 500_000_000));
        let t = pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (12, 0));
        let t = pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 750_000_000));
        assert!(pax_time(b"x").is_none());
    }
}
