//! The object directory: one immutable file per distinct content.
//!
//! An object is published by hard-linking an inode that already holds the bytes (the
//! layer's own file, on the same filesystem) under `cas/tmp`, normalising its metadata
//! there (mode 0444, owner root, no xattrs: metadata lives in stubs, never in objects),
//! then linking it under `objects/ab/cdef…`. `link(2)` refuses to replace, so two
//! commits racing on the same content both succeed and exactly one inode wins
//! ("already exists" is success): inserts are idempotent.
//!
//! In stub mode, on a filesystem whose inodes cannot hold a stub's xattrs with the long
//! redirect (ext4's 256-byte inodes; probed once per store, [`ObjectStore::aliases`]),
//! each object also gets a short second name, its alias (`objects/ab/<20 base64url
//! chars>`, beside the object in its fan-out directory, see [`Digest::alias`]), which
//! stubs redirect to so that their xattrs fit in the inode. The alias is a hardlink of
//! the object: the same inode, the same page cache. It is made only if the name is free
//! or already this inode; otherwise stubs keep the long redirect. GC removes an alias
//! with its object. Stores written before layout version 3 hold their aliases at the top
//! of the objects directory ([`Digest::legacy_alias`]): stubs that name them are served
//! and checked as they are, an object's legacy alias goes with it, and new stubs of the
//! object get its new alias. Where the long redirect
//! fits (XFS's 512-byte inodes), no alias is made: it would cost every new object a
//! second link (about a third of an apply's CPU time per small file, measured on XFS).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::digest::Digest;
use crate::error::CasError;
use crate::layout::Layout;
use crate::stub::StubTarget;
use crate::sys::{At, Host, Syscalls};

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

/// Where a stub's `trusted.overlay.redirect` points in the objects directory: its
/// object's alias (`/ab/<20 characters>`, short enough for the stub's xattrs to fit in
/// an ext4 inode) or the object's full name (`/ab/cdef…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Redirect {
    /// The alias of this object.
    Alias(Digest),
    /// The full name of this object.
    Full(Digest),
}

impl Redirect {
    /// The object it names.
    pub fn digest(&self) -> Digest {
        match self {
            Redirect::Alias(d) | Redirect::Full(d) => *d,
        }
    }

    /// The xattr's value.
    pub fn value(&self) -> String {
        match self {
            Redirect::Alias(d) => format!("/{}", d.alias()),
            Redirect::Full(d) => d.redirect(),
        }
    }
}

impl std::fmt::Display for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.value())
    }
}

/// The `cas/objects` directory.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    objects: PathBuf,
    tmp: PathBuf,
    /// Whether stubs redirect to aliases: probed on first use, shared by clones.
    aliases: Arc<OnceLock<bool>>,
    /// The calls that need root, for everything written into the store.
    sys: Arc<dyn Syscalls>,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ObjectStore {
    /// The object store of `layout`.
    pub fn new(layout: &Layout) -> ObjectStore {
        ObjectStore {
            objects: layout.objects_dir(),
            tmp: layout.tmp_dir(),
            aliases: Arc::new(OnceLock::new()),
            sys: Arc::new(Host),
        }
    }

    /// This store with `sys` making the calls that need root, for it and for the
    /// stubs, layers and objects written into it (tests give a fake).
    pub fn with_syscalls(mut self, sys: Arc<dyn Syscalls>) -> ObjectStore {
        self.sys = sys;
        self
    }

    /// The calls that need root.
    pub fn sys(&self) -> &dyn Syscalls {
        &*self.sys
    }

    /// This store with aliases on or off whatever the filesystem (tests of both forms).
    #[cfg(test)]
    pub(crate) fn with_aliases(self, on: bool) -> ObjectStore {
        let _ = self.aliases.set(on);
        self
    }

    /// Whether stubs redirect to objects by alias: only where a stub with the long
    /// redirect does not fit in its inode. Probed once per store (the first call): an
    /// unnamed file in `cas/tmp` gets a stub's two xattrs with a long redirect, and if
    /// that takes a block of its own (`st_blocks > 0`), aliases are used. When the probe
    /// cannot run (no `trusted.*` xattrs without root), they are used too.
    pub fn aliases(&self) -> bool {
        *self.aliases.get_or_init(|| {
            let fits = long_redirect_fits(&*self.sys, &self.tmp);
            match &fits {
                Ok(true) => tracing::info!(
                    "stubs hold the long redirect in their inode: objects get no alias"
                ),
                Ok(false) => tracing::info!(
                    "stubs with the long redirect need an xattr block: objects get an alias"
                ),
                Err(e) => tracing::info!(error = %e, "alias probe failed: objects get an alias"),
            }
            !matches!(fits, Ok(true))
        })
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

    /// Publishes the inode of `file`, open from `src` (holding exactly the bytes of
    /// `digest`, with the metadata `md` and the xattrs named `xattrs`), as that object
    /// unless it exists, normalising the inode where it is, with no temporary name: for
    /// an inode whose path the caller gives up (an ingested tree that is deleted once its
    /// layer is an image). The object's name appears only once the inode is normalised.
    /// Every call but the object's own lookup goes through the open file, so the path is
    /// not walked again for each.
    pub fn publish_in_place(
        &self,
        src: &Path,
        file: &fs::File,
        md: &fs::Metadata,
        xattrs: &[std::ffi::OsString],
        digest: &Digest,
    ) -> Result<Publish, CasError> {
        use xattr::FileExt as _;
        let dst = self.path(digest);
        if fs::symlink_metadata(&dst).is_ok() {
            return Ok(Publish::Existing);
        }
        if (md.uid(), md.gid()) != (0, 0) {
            self.sys
                .chown(At::File(file), 0, 0)
                .map_err(CasError::io("chown", src))?;
        }
        file.set_permissions(fs::Permissions::from_mode(OBJECT_MODE))
            .map_err(CasError::io("chmod", src))?;
        for name in xattrs {
            file.remove_xattr(name)
                .map_err(CasError::io("removexattr", src))?;
        }
        self.link_open(file, src, &dst)
    }

    /// Links the inode of `file` (open from `src`) at `dst` without walking `src`
    /// (`linkat(AT_EMPTY_PATH)`, which needs `CAP_DAC_READ_SEARCH`; by path otherwise).
    fn link_open(&self, file: &fs::File, src: &Path, dst: &Path) -> Result<Publish, CasError> {
        use nix::errno::Errno;
        use std::os::fd::AsRawFd;
        let mut made_fan = false;
        loop {
            let linked = nix::unistd::linkat(
                Some(file.as_raw_fd()),
                Path::new(""),
                None,
                dst,
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            );
            match linked {
                Ok(()) => return Ok(Publish::New),
                Err(Errno::EEXIST) => return Ok(Publish::Existing),
                Err(Errno::ENOENT) if !made_fan => match dst.parent() {
                    Some(fan) if !fan.exists() => {
                        make_fan(fan)?;
                        made_fan = true;
                    }
                    // no right to link an open file
                    _ => return self.link(src, dst),
                },
                Err(Errno::ENOENT | Errno::EPERM) => return self.link(src, dst),
                Err(e) => return Err(CasError::io("link", dst)(e.into())),
            }
        }
    }

    /// Publishes `tmp`, a file this process wrote for the store (owner root, mode
    /// [`OBJECT_MODE`], no xattrs, holding exactly the bytes of `digest`), by linking it
    /// as the object; the caller removes `tmp` afterwards. "Already exists" is
    /// [`Publish::Existing`].
    pub fn publish_written(&self, tmp: &Path, digest: &Digest) -> Result<Publish, CasError> {
        self.link(tmp, &self.path(digest))
    }

    /// Path of an alias.
    pub fn alias_path(&self, alias: &str) -> PathBuf {
        self.objects.join(alias)
    }

    /// The redirect a stub of `digest` (an existing object) gets: its alias once the
    /// alias is this object's inode, otherwise the object's full name.
    pub fn redirect(&self, digest: &Digest) -> Result<Redirect, CasError> {
        if !self.aliases() {
            return Ok(Redirect::Full(*digest));
        }
        let object = self.path(digest);
        let at = self.alias_path(&digest.alias());
        let ok = match fs::hard_link(&object, &at) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => same_inode(&at, &object)?,
            Err(e) => return Err(CasError::io("link", at)(e)),
        };
        Ok(if ok {
            Redirect::Alias(*digest)
        } else {
            tracing::debug!(%digest, "alias taken by another object: long redirect");
            Redirect::Full(*digest)
        })
    }

    /// The redirect a stub of `digest` gets when the object is stored (`None` when it is
    /// not), as [`ObjectStore::redirect`] gives it, but looked up before anything is
    /// linked: an object whose alias is in place costs two `stat`s.
    pub fn stored(&self, digest: &Digest) -> Result<Option<Redirect>, CasError> {
        let object = self.path(digest);
        let omd = match fs::symlink_metadata(&object) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CasError::io("stat", object)(e)),
        };
        if !self.aliases() {
            return Ok(Some(Redirect::Full(*digest)));
        }
        let at = self.alias_path(&digest.alias());
        match fs::symlink_metadata(&at) {
            Ok(md) if (md.dev(), md.ino()) == (omd.dev(), omd.ino()) => {
                Ok(Some(Redirect::Alias(*digest)))
            }
            Ok(_) => {
                tracing::debug!(%digest, "alias taken by another object: long redirect");
                Ok(Some(Redirect::Full(*digest)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.redirect(digest).map(Some),
            Err(e) => Err(CasError::io("stat", at)(e)),
        }
    }

    /// How the stubs of `digest`, an object about to be written, will point at it: the
    /// redirect, and the alias the writer links the new object at (see
    /// [`ringio::Pool::write_linked`]). The alias is planned when its name is free now;
    /// if it is taken when the writer gets there (a concurrent publish), the writer says
    /// so and [`ObjectStore::redirect`] decides again.
    pub fn plan(&self, digest: &Digest) -> (Redirect, Option<PathBuf>) {
        if !self.aliases() {
            return (Redirect::Full(*digest), None);
        }
        let at = self.alias_path(&digest.alias());
        match fs::symlink_metadata(&at) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Redirect::Alias(*digest), Some(at)),
            _ => (Redirect::Full(*digest), None),
        }
    }

    /// Whether `target` is `digest`'s object: for an alias, by name and inode.
    pub fn target_is(&self, target: &StubTarget, digest: &Digest) -> Result<bool, CasError> {
        Ok(match target {
            StubTarget::Object(d) => d == digest,
            StubTarget::Alias(a) => {
                target.names(digest) && same_inode(&self.alias_path(a), &self.path(digest))?
            }
        })
    }

    /// The object a stub target names. An alias is resolved by hashing what it holds
    /// (used for the rare metadata-only copy-up), and must be that object's alias.
    pub fn resolve(&self, target: &StubTarget) -> Result<Option<Digest>, CasError> {
        match target {
            StubTarget::Object(d) => Ok(Some(*d)),
            StubTarget::Alias(a) => {
                let path = self.alias_path(a);
                let f = match fs::File::open(&path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    r => r.map_err(CasError::io("open", &path))?,
                };
                let (d, _) = Digest::of_reader(f).map_err(CasError::io("read", &path))?;
                Ok(self.target_is(target, &d)?.then_some(d))
            }
        }
    }

    /// Removes `digest`'s aliases, its alias and its legacy alias, where they are this
    /// object's (before the object goes).
    pub fn remove_alias(&self, digest: &Digest) -> Result<(), CasError> {
        let object = self.path(digest);
        let Some(inode) = inode_of(&object)? else {
            return Ok(());
        };
        for name in [digest.alias(), digest.legacy_alias()] {
            let at = self.alias_path(&name);
            if inode_of(&at)? == Some(inode) {
                match fs::remove_file(&at) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(CasError::io("remove", at)(e))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn normalise(&self, tmp: &Path) -> Result<(), CasError> {
        self.sys
            .chown(At::Path(tmp), 0, 0)
            .map_err(CasError::io("chown", tmp))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(OBJECT_MODE))
            .map_err(CasError::io("chmod", tmp))?;
        for name in xattr::list(tmp).map_err(CasError::io("listxattr", tmp))? {
            xattr::remove(tmp, &name).map_err(CasError::io("removexattr", tmp))?;
        }
        Ok(())
    }

    fn link(&self, tmp: &Path, dst: &Path) -> Result<Publish, CasError> {
        let mut made_fan = false;
        loop {
            match fs::hard_link(tmp, dst) {
                Ok(()) => return Ok(Publish::New),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Publish::Existing),
                Err(e) if e.kind() == io::ErrorKind::NotFound && !made_fan => {
                    let Some(fan) = dst.parent() else {
                        return Err(CasError::io("link", dst)(e));
                    };
                    make_fan(fan)?;
                    made_fan = true;
                }
                Err(e) => return Err(CasError::io("link", dst)(e)),
            }
        }
    }
}

/// Makes a fan-out directory, which the first object linked in it needs (a link that
/// finds it missing makes it; another may have made it meanwhile).
fn make_fan(fan: &Path) -> Result<(), CasError> {
    match fs::create_dir(fan) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(CasError::io("mkdir", fan)(e)),
        _ => Ok(()),
    }
}

/// Whether a stub's xattrs with the long redirect fit in an inode of the filesystem of
/// `tmp` (see [`ObjectStore::aliases`]).
fn long_redirect_fits(sys: &dyn Syscalls, tmp: &Path) -> io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_TMPFILE)
        .mode(0o600)
        .open(tmp)?;
    f.set_len(1 << 20)?;
    let probe = Digest::from_bytes([0xa5; 32]);
    sys.set_trusted_xattr(At::File(&f), crate::stub::XATTR_METACOPY, b"")?;
    let long = Redirect::Full(probe).value();
    sys.set_trusted_xattr(At::File(&f), crate::stub::XATTR_REDIRECT, long.as_bytes())?;
    Ok(f.metadata()?.blocks() == 0)
}

/// Whether two paths are one inode (`false` if either is missing).
fn same_inode(a: &Path, b: &Path) -> Result<bool, CasError> {
    Ok(match (inode_of(a)?, inode_of(b)?) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    })
}

/// The device and inode of `p`, if it exists.
fn inode_of(p: &Path) -> Result<Option<(u64, u64)>, CasError> {
    match fs::symlink_metadata(p) {
        Ok(md) => Ok(Some((md.dev(), md.ino()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CasError::io("stat", p)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, Recorder};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn publish_is_idempotent_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("root")).unwrap();
        let sys = Arc::new(Recorder::new(true));
        let store = ObjectStore::new(&layout).with_syscalls(sys.clone());
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
        // owned by root, the set-uid bit gone, before the object is linked
        assert!(
            matches!(&sys.calls()[..], [Call::Chown(_, 0, 0)]),
            "{:?}",
            sys.calls()
        );
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"same");
        assert_eq!(
            fs::read_dir(layout.tmp_dir()).unwrap().count(),
            0,
            "tmp not swept"
        );
        assert!(store.contains(&d));
    }

    /// An ingested file's own inode becomes the object: normalised through the open
    /// file, linked at its name (the fan-out directory made on the way); a second file
    /// of the same content is left as it is.
    #[test]
    fn publishing_in_place_normalises_the_open_file_and_links_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("root")).unwrap();
        let sys = Arc::new(Recorder::new(true));
        let store = ObjectStore::new(&layout).with_syscalls(sys.clone());
        let (a, b) = (dir.path().join("root/a"), dir.path().join("root/b"));
        fs::write(&a, b"in place").unwrap();
        fs::write(&b, b"in place").unwrap();
        for f in [&a, &b] {
            fs::set_permissions(f, fs::Permissions::from_mode(0o4755)).unwrap();
        }
        // user xattrs where the test's filesystem keeps them
        let xattrs: Vec<_> = if xattr::set(&a, "user.cas-test", b"v").is_ok() {
            vec!["user.cas-test".into()]
        } else {
            Vec::new()
        };
        let d = Digest::of(b"in place");
        assert!(!store.path(&d).parent().unwrap().exists());
        let publish = |path: &Path, xattrs: &[std::ffi::OsString]| {
            let f = fs::File::open(path).unwrap();
            let md = f.metadata().unwrap();
            store.publish_in_place(path, &f, &md, xattrs, &d).unwrap()
        };
        assert_eq!(publish(&a, &xattrs), Publish::New);
        let object = fs::symlink_metadata(store.path(&d)).unwrap();
        assert_eq!(object.ino(), fs::metadata(&a).unwrap().ino());
        assert_eq!(object.mode() & 0o7777, OBJECT_MODE);
        assert_eq!(xattr::list(store.path(&d)).unwrap().count(), 0);
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"in place");
        assert_eq!(publish(&b, &[]), Publish::Existing);
        assert_eq!(fs::metadata(&b).unwrap().mode() & 0o7777, 0o4755);
        assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
        // owned by root already: no chown
        assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    }

    #[test]
    fn aliases_are_the_object_or_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(&dir.path().join("root")).unwrap();
        let store = ObjectStore::new(&layout)
            .with_aliases(true)
            .with_syscalls(Arc::new(Recorder::new(true)));
        let publish = |bytes: &[u8]| {
            let f = dir.path().join("root/f");
            fs::write(&f, bytes).unwrap();
            let d = Digest::of(bytes);
            store.ensure_from_inode(&f, &d, true).unwrap();
            fs::remove_file(&f).unwrap();
            d
        };
        let d = publish(b"aliased");
        let r = store.redirect(&d).unwrap();
        assert_eq!(r, Redirect::Alias(d));
        assert_eq!(r.value(), format!("/{}", d.alias()));
        assert!(r.value().len() <= 24, "{r} must fit in an ext4 inode");
        assert_eq!(store.redirect(&d).unwrap(), r, "idempotent");
        let target = StubTarget::Alias(d.alias());
        assert_eq!(store.resolve(&target).unwrap(), Some(d));
        assert!(store.target_is(&target, &d).unwrap());

        // Another object squatting on the alias name (a prefix collision): the long
        // redirect is used and the squatter is never taken for the object.
        let e = publish(b"other");
        fs::remove_file(store.alias_path(&d.alias())).unwrap();
        fs::hard_link(store.path(&e), store.alias_path(&d.alias())).unwrap();
        assert_eq!(store.redirect(&d).unwrap(), Redirect::Full(d));
        assert!(!store.target_is(&target, &d).unwrap());
        assert_eq!(store.resolve(&target).unwrap(), None);
        store.remove_alias(&d).unwrap();
        assert!(
            store.alias_path(&d.alias()).exists(),
            "not d's alias: stays"
        );

        // An alias an earlier version made at the top names its object as before and
        // goes with it; new stubs get the alias in the fan-out directory.
        let f = publish(b"aliased by an earlier version");
        let legacy = StubTarget::Alias(f.legacy_alias());
        fs::hard_link(store.path(&f), store.alias_path(&f.legacy_alias())).unwrap();
        assert!(legacy.names(&f) && store.target_is(&legacy, &f).unwrap());
        assert_eq!(store.resolve(&legacy).unwrap(), Some(f));
        assert_eq!(store.stored(&f).unwrap(), Some(Redirect::Alias(f)));
        assert!(store.alias_path(&f.alias()).exists());
        store.remove_alias(&f).unwrap();
        assert!(!store.alias_path(&f.alias()).exists());
        assert!(!store.alias_path(&f.legacy_alias()).exists());
        assert!(store.contains(&f));
    }
}
