//! Paths of the on-disk layout and its creation.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ringio::IoError;

/// Removes a directory tree; one that is already gone is fine (idempotent cleanup).
pub fn remove_tree(path: &Path) -> Result<(), crate::CasError> {
    let mut last = None;
    // Another cleanup may be deleting the same tree: an entry vanishing under our walk
    // is retried, and a tree that is gone is done.
    for _ in 0..3 {
        let r = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Ok(md) if !md.is_dir() => fs::remove_file(path),
            _ => fs::remove_dir_all(path),
        };
        match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => last = Some(e),
            _ if !path.exists() => return Ok(()),
            _ => {}
        }
    }
    match last {
        Some(e) => Err(crate::CasError::io("remove", path)(e)),
        None => Ok(()),
    }
}

/// Version of the on-disk layout this code reads and writes, the highest of:
/// - 1: stub trees, aliases (if any) at the top of `cas/objects`;
/// - 2: layers may also be EROFS images ([`IMAGE_FILE`]), written when images are first
///   enabled on a root ([`Layout::allow_images`]), so that older binaries, which would
///   see an image layer as an empty directory, refuse it;
/// - 3: aliases may also be in the objects' fan-out directories
///   ([`crate::Digest::alias`]), written before the first one is made
///   ([`Layout::allow_fan_aliases`]), so that older binaries, whose GC would take them
///   for stray files, refuse it;
/// - 4: the index keeps references in buckets ([`crate::index`]), written when a root is
///   first opened by a build that does, before its index is, so that older binaries,
///   which would find no references and collect every object, refuse it;
/// - 5: manifests may be zstd-compressed ([`crate::manifest`]), written when a root is
///   first opened by a build that writes them so, so that older binaries, which could
///   not read them, refuse it.
///
/// A root is read at the version it has and moves up only when it needs to (to 5 at
/// once: every build since reads and writes its index in buckets, and compresses the
/// manifests it writes).
pub const LAYOUT_VERSION: u32 = COMPRESSED_MANIFESTS_VERSION;
/// The version of a root whose layers are all stub trees.
const STUB_TREES_VERSION: u32 = 1;
/// The version of a root that may hold image layers.
const IMAGES_VERSION: u32 = 2;
/// The version of a root that may hold aliases in the fan-out directories.
const FAN_ALIASES_VERSION: u32 = 3;
/// The version of a root whose manifests may be zstd-compressed.
const COMPRESSED_MANIFESTS_VERSION: u32 = 5;

/// File at the root holding [`LAYOUT_VERSION`].
pub const LAYOUT_FILE: &str = "layout";
/// `snapshots/<id>/fs`: the layer tree (an active snapshot's upper directory).
pub const FS_DIR: &str = "fs";
/// `snapshots/<id>/work`: overlayfs' work directory of an active snapshot.
pub const WORK_DIR: &str = "work";
/// `snapshots/<id>/flat`: the merged stub tree of a snapshot and its ancestors.
pub const FLAT_DIR: &str = "flat";
/// `snapshots/<id>/mapped`: an ID-mapped snapshot's clones of its layers, one
/// directory per layer ([`crate::idmap`]).
pub const MAPPED_DIR: &str = "mapped";
/// `snapshots/<id>/layer.erofs`: a committed layer's metadata as one EROFS image
/// ([`crate::erofs`]), mounted read-only at its `fs` while the daemon runs.
pub const IMAGE_FILE: &str = "layer.erofs";
/// `snapshots/<id>/manifest`: a layer's path → object list, written by ingest or apply.
pub const MANIFEST_FILE: &str = "manifest";
/// `snapshots/<id>/info`: the mirror of the snapshot's index record.
pub const INFO_FILE: &str = "info";
/// `<root>/admin.sock`: the socket `casctl` talks to the running daemon on.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// File at the root holding the store's [`StoreMode`], fixed when the first layer is served.
const MODE_FILE: &str = "mode";

/// How the store's committed layers hold their files. Fixed for the life of a store:
/// a layer ingested as stubs cannot be served without data-only lower layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// Metadata stubs served over `cas/objects` as overlayfs' data-only lower layer.
    Stubs,
    /// Real files: hardlinks of objects where metadata matches exactly, reflinked or own
    /// copies otherwise; mounts are plain overlayfs.
    Materialised,
}

impl StoreMode {
    fn name(self) -> &'static str {
        match self {
            StoreMode::Stubs => "stubs",
            StoreMode::Materialised => "materialised",
        }
    }
}

/// Errors creating or opening the layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A directory or file of the layout could not be created or read.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The root was written by an incompatible version.
    #[error(
        "{path}: unsupported layout version {found:?} (this build reads versions 1 to {LAYOUT_VERSION})"
    )]
    Version {
        /// The marker file.
        path: PathBuf,
        /// What it holds.
        found: String,
    },
    /// Writing the version marker failed.
    #[error(transparent)]
    Durable(#[from] ringio::durable::DurableError),
}

/// The directories under a store root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The paths of a store rooted at `root`, without touching the disk (for planning
    /// and tests; [`Layout::ensure`] opens a real store).
    pub fn at(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// Opens the layout at `root`, creating every directory (and the version marker) that
    /// is missing. Idempotent; refuses a root written by an incompatible version.
    pub fn ensure(root: &Path) -> Result<Layout, LayoutError> {
        let layout = Layout {
            root: root.to_path_buf(),
        };
        for dir in [
            layout.root.clone(),
            layout.objects_dir(),
            layout.tmp_dir(),
            layout.snapshots_dir(),
            layout.index_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(IoError::at("mkdir", &dir))?;
        }
        let marker = layout.root.join(LAYOUT_FILE);
        match fs::read_to_string(&marker) {
            Ok(found)
                if (STUB_TREES_VERSION..=LAYOUT_VERSION).any(|v| found.trim() == v.to_string()) => {
            }
            Ok(found) => {
                return Err(LayoutError::Version {
                    path: marker,
                    found,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                ringio::durable::replace_file(
                    &marker,
                    format!("{STUB_TREES_VERSION}\n").as_bytes(),
                )?;
            }
            Err(source) => return Err(IoError::at("read", marker)(source).into()),
        }
        layout.raise_version(COMPRESSED_MANIFESTS_VERSION)?;
        Ok(layout)
    }

    /// Marks the root as holding (or about to hold) image layers: version 2 at least,
    /// written durably before the first image is.
    pub fn allow_images(&self) -> Result<(), LayoutError> {
        self.raise_version(IMAGES_VERSION)
    }

    /// Marks the root as holding (or about to hold) aliases in the fan-out directories:
    /// version 3, written durably before the first one is.
    pub fn allow_fan_aliases(&self) -> Result<(), LayoutError> {
        self.raise_version(FAN_ALIASES_VERSION)
    }

    /// The version the root's marker holds.
    pub fn version(&self) -> Result<u32, LayoutError> {
        let marker = self.root.join(LAYOUT_FILE);
        let found = fs::read_to_string(&marker).map_err(IoError::at("read", &marker))?;
        found.trim().parse().map_err(|_| LayoutError::Version {
            path: marker,
            found,
        })
    }

    fn raise_version(&self, to: u32) -> Result<(), LayoutError> {
        if self.version()? < to {
            let marker = self.root.join(LAYOUT_FILE);
            ringio::durable::replace_file(&marker, format!("{to}\n").as_bytes())?;
        }
        Ok(())
    }

    /// The mode recorded for this store, if any. A store written before modes were
    /// recorded that already has snapshots holds stubs.
    pub fn mode(&self) -> Result<Option<StoreMode>, LayoutError> {
        let path = self.root.join(MODE_FILE);
        match fs::read_to_string(&path) {
            Ok(s) if s.trim() == "stubs" => Ok(Some(StoreMode::Stubs)),
            Ok(s) if s.trim() == "materialised" => Ok(Some(StoreMode::Materialised)),
            Ok(found) => Err(LayoutError::Version { path, found }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let populated = fs::read_dir(self.snapshots_dir())
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                Ok(populated.then_some(StoreMode::Stubs))
            }
            Err(source) => Err(IoError::at("read", path)(source).into()),
        }
    }

    /// Records the store's mode (durably).
    pub fn set_mode(&self, mode: StoreMode) -> Result<(), LayoutError> {
        ringio::durable::replace_file(
            &self.root.join(MODE_FILE),
            format!("{}\n", mode.name()).as_bytes(),
        )?;
        Ok(())
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `cas/objects`: the content-addressed objects.
    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("cas/objects")
    }
    /// `cas/tmp`: in-flight writes, swept at start.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("cas/tmp")
    }
    /// `snapshots`: one directory per snapshot id.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// `snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }
    /// `snapshots/<id>/fs`: the snapshot's layer tree.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(FS_DIR)
    }
    /// `snapshots/<id>/work`: the overlay workdir of an active snapshot.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(WORK_DIR)
    }
    /// `snapshots/<id>/flat`: the merged stub tree of `<id>` and all its ancestors.
    pub fn flat_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(FLAT_DIR)
    }
    /// `snapshots/<id>/mapped`: where an ID-mapped snapshot's layer clones are attached.
    pub fn mapped_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(MAPPED_DIR)
    }
    /// `snapshots/<id>/layer.erofs`: the layer's image, when it is one.
    pub fn image_file(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(IMAGE_FILE)
    }

    /// `snapshots/<id>/manifest`: the layer's path → object list.
    pub fn manifest(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join(MANIFEST_FILE)
    }
    /// `index`: the sled database.
    pub fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }
    /// `admin.sock`: the running daemon's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join(ADMIN_SOCKET)
    }
}

/// Whether `path` looks like a store root (it has the layout marker).
pub fn is_store(path: &Path) -> bool {
    path.join(LAYOUT_FILE).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_is_idempotent_and_creates_everything() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::ensure(dir.path()).unwrap();
        Layout::ensure(dir.path()).unwrap();
        for d in [
            l.objects_dir(),
            l.tmp_dir(),
            l.snapshots_dir(),
            l.index_dir(),
        ] {
            assert!(d.is_dir(), "{}", d.display());
        }
        assert_eq!(l.snapshot_dir(7), dir.path().join("snapshots/7"));
        assert_eq!(l.version().unwrap(), LAYOUT_VERSION);
    }

    /// A root of an older version moves to 5 when opened: its index is moved into
    /// buckets then, and the manifests written since are compressed, neither of which
    /// older builds can read.
    #[test]
    fn older_roots_move_to_the_bucketed_index_and_compressed_manifests() {
        for old in 1..COMPRESSED_MANIFESTS_VERSION {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(LAYOUT_FILE), format!("{old}\n")).unwrap();
            let l = Layout::ensure(dir.path()).unwrap();
            assert_eq!(l.version().unwrap(), COMPRESSED_MANIFESTS_VERSION);
        }
    }

    #[test]
    fn mode_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::ensure(dir.path()).unwrap();
        assert_eq!(l.mode().unwrap(), None);
        l.set_mode(StoreMode::Materialised).unwrap();
        assert_eq!(l.mode().unwrap(), Some(StoreMode::Materialised));
    }

    #[test]
    fn refuses_foreign_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LAYOUT_FILE), "99\n").unwrap();
        let err = Layout::ensure(dir.path()).unwrap_err();
        assert!(matches!(err, LayoutError::Version { .. }), "{err}");
    }
}
