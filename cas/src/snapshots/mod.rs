//! The snapshot lifecycle: containerd's snapshots as the store keeps them.
//!
//! A snapshot is a directory `snapshots/<id>` (`fs`, and `work` while active) plus a
//! record in the index, mirrored in `snapshots/<id>/info`. At Commit the layer is
//! ingested into the CAS: every regular file's bytes go to `cas/objects`, the layer's
//! metadata becomes one EROFS image (`layer.erofs`, where the kernel mounts them; see
//! [`crate::erofs`]) or a tree of metadata stubs, and its manifest is written
//! ([`crate::ingest`]); a layer the Diff service applied ([`Snapshots::apply_blob`],
//! [`crate::unpack`]) is all of that already. An image is mounted at the layer's `fs`
//! ([`crate::erofs::mount`]), so mounts name every layer by its `fs` either way, over
//! the CAS as overlayfs' data-only lower layer ([`crate::mounts`]).
//!
//! [`Snapshots`] is the only code that changes snapshots. Its ordering rules are what
//! keeps a `kill -9` at any instant harmless (each step is a [`crate::crash_point!`]):
//!
//! * **Create** (Prepare/View): build `snapshots/new-<id>` (`fs`, and `work` for active
//!   snapshots), rename it to `snapshots/<id>` (`create.after-dir`), journal the record
//!   and write its mirror (`create.after-info`), then insert it into the index, then
//!   answer. A crash before the record leaves an orphan directory, which start-up and
//!   Cleanup sweep.
//! * **Commit**: ingest (objects published and synced, manifest written;
//!   `commit.after-ingest`), journal the record (key → name; `commit.after-record`),
//!   write the mirror (`commit.after-info`), then rename the record in the index and take
//!   the references on its objects (`commit.after-index`). A crash before the record
//!   leaves an active snapshot (containerd removes and redoes it) and objects nobody
//!   references yet (GC takes them); after it, recovery rolls the index forward. An
//!   image layer's tree is moved to `cas/tmp` and its image mounted last; a crash
//!   before that is finished at the next start.
//! * **Remove**: journal the deletion, delete the mirror (`remove.after-info`), delete
//!   the record and drop its references, flush (`remove.after-index`), then move the
//!   directory to `cas/tmp` (`remove.after-rename`) and delete it there. A crash in
//!   between leaves a directory without a record, swept later.
//! * **Open** ([`Snapshots::open`], see [`reconcile`]): replay the journal, reconcile the
//!   index with the mirrors the replayed records name, checkpoint, sweep.
//!
//! A record too large for one journal block (huge labels) takes the older durable path
//! instead: a small `Dirty` record, a durable mirror, and an index flush before the
//! answer.
//!
//! Concurrency: index mutations are serialised by one writer lock; reads (Stat, Mounts,
//! Walk) take none. Ingests and applies hold the GC lock shared from before they look
//! objects up until their references are in the index (or their manifest keeps them);
//! GC holds it exclusively, so it never deletes an object an ingest has just decided to
//! reuse. Every method blocks: the daemon calls them from blocking threads.

mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use crate::admin::Stats;
use crate::error::CasError;
use crate::fsck::FsckReport;
use crate::gc::GcStats;
use crate::index::{DiskUsage, IndexError, Kind, MetaStore, Record};
use crate::ingest::IngestStats;
use crate::journal::{Change, CommitLog};
use crate::layout::{remove_tree, Layout, StoreMode, FS_DIR, WORK_DIR};
use crate::mounts::{Mount, MountPlanner};
use crate::objects::ObjectStore;
use crate::probe::ProbeError;
use crate::unpack::{Applied, Limits, UnpackError, UnpackStats};
use crate::Digest;

pub use recovery::{reconcile, ReconcileStats};

/// GC candidates one batch of a collection takes at most, holding off commits and
/// applies (see [`GC_HOLD_MAX`]).
const GC_BATCH: usize = 256;
/// How long one batch goes on deleting before it lets the locks go (the rest of its
/// candidates are the next batch's). A Commit meanwhile waits for one batch and then
/// flushes its deletions in its own `syncfs`: at a million objects the longest Commit
/// during GC took 58 ms with 20 ms batches (27 waiting, 26 in `syncfs`) and 31 ms with
/// 5 ms batches (10 and 13), the collection 2.0 against 3.9 s (`cas-bench scale`). At
/// five million objects 5 ms batches made the collection last over a minute, when each
/// batch still read every record to find the applied layers' manifests (a cost of the
/// snapshots' number, which the Commit loop running meanwhile raised with every Commit;
/// they are kept in memory now, [`crate::gc::PendingLayers`]).
const GC_HOLD_MAX: Duration = Duration::from_millis(20);
/// How long a GC waits between two batches for waiting requests to take the locks.
const GC_YIELD_MAX: Duration = Duration::from_millis(50);

/// Prefix of directories being built by Prepare/View, before their rename.
const NEW_PREFIX: &str = "new-";

/// Everything a lifecycle call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot has this key or name.
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    /// A snapshot with this key or name already exists.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The snapshot exists but is in the wrong state for the call.
    #[error("snapshot {key:?}: {reason}")]
    FailedPrecondition {
        /// The snapshot.
        key: String,
        /// What is wrong (e.g. "not active", "has children").
        reason: &'static str,
    },
    /// The request itself is malformed (an empty key or name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store failed (directories, objects, manifests, journal, index).
    #[error(transparent)]
    Store(CasError),
    /// A layer could not be applied (see [`crate::unpack`]).
    #[error("applying the layer: {0}")]
    Unpack(UnpackError),
    /// A snapshot's ID-mapping labels are malformed or incomplete.
    #[error("invalid ID mapping: {0}")]
    Mapping(#[from] crate::idmap::MappingError),
    /// An ID-mapped snapshot over layers that need mapping, where the store cannot map
    /// them (containerd should have chowned a copy).
    #[error("snapshot {key:?} asks for an ID mapping, but layers cannot be ID-mapped here ({reason}); leave \"remap-ids\" out of the capabilities of this snapshotter in containerd's config so that containerd chowns a copy of the layers")]
    IdmapUnavailable {
        /// The snapshot.
        key: String,
        /// Why (the start-up probe's answer, or the configuration).
        reason: String,
    },
    /// The kernel cannot serve stubs (found by the start-up probe).
    #[error(transparent)]
    Unsupported(#[from] ProbeError),
    /// Layer images were asked for where the store cannot use them.
    #[error("layer_metadata = \"erofs\" needs a store that serves layers from the CAS (mount_mode data-only or auto), found {0:?}")]
    ImagesNeedStubs(StoreMode),
    /// The configured mount mode cannot serve the store's layers.
    #[error("the store holds {stored:?} layers, which mount_mode {requested:?} cannot serve")]
    ModeMismatch {
        /// What the store was created with.
        stored: StoreMode,
        /// What the configuration asks for.
        requested: RequestedMode,
    },
}

/// A missing record is [`SnapshotError::NotFound`] whichever way it arrives.
impl From<CasError> for SnapshotError {
    fn from(e: CasError) -> Self {
        match e {
            CasError::Index(IndexError::NotFound(key)) => SnapshotError::NotFound(key),
            other => SnapshotError::Store(other),
        }
    }
}

impl From<IndexError> for SnapshotError {
    fn from(e: IndexError) -> Self {
        CasError::Index(e).into()
    }
}

impl From<crate::LayoutError> for SnapshotError {
    fn from(e: crate::LayoutError) -> Self {
        CasError::Layout(e).into()
    }
}

impl SnapshotError {
    fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let f = CasError::io(op, path);
        move |e| SnapshotError::Store(f(e))
    }
}

/// Shorthand for lifecycle results.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// The mount mode a configuration asks for (`[store] mount_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestedMode {
    /// Stubs where the start-up probe shows the kernel can serve them, else materialised.
    #[default]
    Auto,
    /// Stubs, or refuse to start.
    DataOnly,
    /// Real files (what kernels without data-only lower layers get).
    Materialised,
}

/// How new layers keep their metadata (`[store] layer_metadata`), in a store that
/// serves layers from the CAS (see [`crate::erofs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestedLayers {
    /// One EROFS image per layer where the start-up probe shows the kernel mounts them,
    /// else stub trees.
    #[default]
    Auto,
    /// Images, or refuse to start.
    Images,
    /// Stub trees.
    StubTrees,
}

/// Whether ID-mapped snapshots are served by ID-mapped clones of their layers
/// (`[store] idmapped_layers`, see [`crate::idmap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestedIdmap {
    /// Where the kernel can (probed at open).
    #[default]
    Auto,
    /// Never: ID-mapped snapshots need layers containerd chowned.
    Off,
}

/// How [`Snapshots::open`] opens a store.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// The mount mode asked for; a store keeps the one it was created with.
    pub mode: RequestedMode,
    /// How new layers keep their metadata; a store reads both kinds whatever it writes.
    pub layers: RequestedLayers,
    /// Whether ID-mapped snapshots may be served by ID-mapped clones of their layers.
    pub idmapped_layers: RequestedIdmap,
    /// The journal backend.
    pub journal: ringio::journal::JournalMode,
    /// The index's page cache in bytes (`None`: [`crate::index::DEFAULT_CACHE_BYTES`]).
    pub index_cache_bytes: Option<u64>,
    /// How layer images are mounted: from their file where the kernel can, or always
    /// through a loop device.
    pub image_mounts: crate::sys::ImageMounts,
}

/// A change of a snapshot's labels (Update with or without field paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    /// All labels become these.
    Replace(BTreeMap<String, String>),
    /// One label gets this value.
    Set(String, String),
    /// One label goes.
    Unset(String),
}

/// What a Commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The snapshot's directory number.
    pub id: u64,
    /// The layer's files and what of them was new.
    pub stats: IngestStats,
    /// Whether the layer was applied by the Diff service (nothing was ingested now).
    pub applied: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// The store's snapshots: create, commit, remove, mounts, and the store-wide
/// operations (GC, stats, fsck, checkpoints) under the same locks.
pub struct Snapshots {
    mode: StoreMode,
    /// Whether the Diff service's applies write one EROFS image per layer.
    images: bool,
    /// How images are mounted.
    image_mounts: crate::sys::ImageMounts,
    /// Why ID-mapped snapshots cannot be served by clones of their layers, if so.
    idmap_unavailable: Option<String>,
    /// Serialises putting images in place (a Commit, Mounts of several children).
    mounting: Mutex<()>,
    layout: Layout,
    meta: MetaStore,
    objects: ObjectStore,
    planner: MountPlanner,
    /// Commit records (see [`crate::journal`]).
    log: CommitLog,
    /// Serialises index mutations.
    writer: Mutex<()>,
    /// Shared by ingests and applies, exclusive for GC and fsck.
    gc_lock: RwLock<()>,
    /// Requests waiting for `writer` or a shared `gc_lock` (see [`Snapshots::gc`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Ids of active snapshots being ingested by a Commit or applied into right now.
    busy: Mutex<HashSet<u64>>,
    /// What the Diff service's applies did, by snapshot id, until their Commit.
    applied: Mutex<HashMap<u64, UnpackStats>>,
    /// How long opening the store took (journal replay, reconcile, sweep).
    recovered_in: Duration,
    /// Trees in `cas/tmp` being deleted right now, which a GC's sweep leaves alone.
    deleting: Deleting,
    /// The objects of the layers applied and not committed yet, which GC keeps.
    pending: crate::gc::PendingLayers,
}

/// The trees in `cas/tmp` whose deletion is under way (a Remove's snapshot directory, a
/// Commit's ingested tree), so that a GC's sweep of `cas/tmp` neither deletes them a
/// second time nor waits for them.
#[derive(Clone, Default)]
struct Deleting(Arc<Mutex<HashSet<PathBuf>>>);

impl Deleting {
    /// Marks `path` as being deleted until the guard drops.
    fn track(&self, path: &Path) -> DeletingGuard {
        lock(&self.0).insert(path.to_path_buf());
        DeletingGuard {
            set: self.clone(),
            path: path.to_path_buf(),
        }
    }

    fn contains(&self, path: &Path) -> bool {
        lock(&self.0).contains(path)
    }
}

/// See [`Deleting::track`]; sent along with the tree to the thread that deletes it.
struct DeletingGuard {
    set: Deleting,
    path: PathBuf,
}

impl Drop for DeletingGuard {
    fn drop(&mut self) {
        lock(&self.set.0).remove(&self.path);
    }
}

/// Marks the index's GC candidates incomplete when dropped armed (see
/// [`MetaStore::set_candidates_complete`]): a Commit that fails after its ingest published
/// objects, before their references land. If the ingest got as far as the layer's
/// manifest, the snapshot is an applied layer from now on (a retried Commit takes it as
/// one), and its manifest keeps its objects as an apply's does.
struct ScanOnFailure<'a> {
    meta: &'a MetaStore,
    pending: &'a crate::gc::PendingLayers,
    id: u64,
    manifest: &'a Path,
    armed: bool,
}

impl ScanOnFailure<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ScanOnFailure<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = self.meta.set_candidates_complete(false) {
            warn!(error = %e, "could not mark the GC candidates incomplete");
        }
        if self.manifest.exists() {
            if let Err(e) = self.pending.add(self.id, self.manifest) {
                // the full collection the mark above asks for reads it from the store
                warn!(id = self.id, error = %e, "could not read the manifest of a failed Commit");
            }
        }
    }
}

/// Marks an active snapshot as being committed or applied into; unmarks it when dropped.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<u64>>,
    id: u64,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

/// Which lifecycle step a record change belongs to (for its crash points).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Create,
    Update,
    Commit,
}

impl Snapshots {
    /// The writer lock, for a request: counted in `waiting` while it waits, so a GC
    /// lets it in between two batches.
    fn write_lock(&self) -> MutexGuard<'_, ()> {
        match self.writer.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let _w = Waiting::on(&self.waiting);
                lock(&self.writer)
            }
        }
    }

    /// The GC lock shared, for an ingest or apply: counted in `waiting` like
    /// [`Snapshots::write_lock`].
    fn ingest_lock(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        match self.gc_lock.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let _w = Waiting::on(&self.waiting);
                self.gc_lock.read().unwrap_or_else(|p| p.into_inner())
            }
        }
    }
}

/// One request counted as waiting while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(n: &'a std::sync::atomic::AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A poisoned lock only means another request panicked; the data it guards (a set,
/// a map, nothing) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    Ok(())
}

/// Disk usage of a tree the way containerd's `fs.DiskUsage` counts it: allocated
/// blocks, each inode once, the root included.
pub fn disk_usage(root: &Path) -> Result<DiskUsage, CasError> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            CasError::io("walk", path)(
                e.into_io_error()
                    .unwrap_or_else(|| io::Error::other("filesystem loop")),
            )
        })?;
        let md = entry
            .metadata()
            .map_err(|e| CasError::io("stat", entry.path())(io::Error::other(e)))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += md.blocks() as i64 * 512;
            usage.inodes += 1;
        }
    }
    Ok(usage)
}

impl Snapshots {
    /// The store's mode.
    pub fn mode(&self) -> StoreMode {
        self.mode
    }

    /// The store layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How long opening the store took.
    pub fn recovered_in(&self) -> Duration {
        self.recovered_in
    }

    /// The record of `key`.
    pub fn stat(&self, key: &str) -> Result<Record> {
        Ok(self.meta.require(key)?)
    }

    /// Every snapshot, by key.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        Ok(self.meta.all()?)
    }

    /// Creates an active snapshot (Prepare) or a view (View) of `kind` over the
    /// committed `parent`, and returns its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        check_key("key", key)?;
        let mapping = crate::idmap::IdMapping::from_labels(&labels)?;
        if let Some(m) = &mapping {
            if m.host_root().is_none() {
                return Err(SnapshotError::InvalidArgument(format!(
                    "snapshot {key:?}: its ID mapping leaves the container's root (0) unmapped"
                )));
            }
        }
        let (id, parent_ids) = {
            let _w = self.write_lock();
            if self.meta.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            let mut parent_ids = Vec::new();
            let mut owner = None;
            if let Some(p) = parent {
                let prec = self.meta.require(p)?;
                if prec.kind != Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition {
                        key: p.to_string(),
                        reason: "parent is not committed",
                    });
                }
                parent_ids.push(prec.id);
                parent_ids.extend(self.meta.parent_ids(&prec)?);
                // the parent's own root, not the mount point an unmounted image hides
                self.mount_chain(&parent_ids[..1])?;
                let pfs = self.layout.fs_dir(prec.id);
                let md = fs::metadata(&pfs).map_err(SnapshotError::io("stat", &pfs))?;
                owner = Some((md.uid(), md.gid()));
                // refused before anything is made
                self.needs_clones(key, mapping.as_ref(), Some(&pfs))?;
            }
            // an ID-mapped container's root owns its upper directory
            if let Some(root) = mapping.as_ref().and_then(|m| m.host_root()) {
                owner = Some(root);
            }
            let id = self.meta.next_id()?;
            let dir = self.layout.snapshot_dir(id);
            self.build_dir(kind, id, owner)?;
            crate::crash_point!("create.after-dir");
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind,
                parent: parent.map(str::to_string),
                labels,
                created: now,
                updated: now,
                usage: DiskUsage::default(),
                logical_bytes: 0,
            };
            let stored = self
                .record_put(Step::Create, id, key, &rec)
                .and_then(|flush| {
                    self.meta.insert(key, &rec)?;
                    if flush {
                        self.meta.flush_blocking()?;
                    }
                    Ok(())
                });
            if let Err(e) = stored {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
            debug!(%key, id, ?kind, mapped = mapping.is_some(), "created");
            (id, parent_ids)
        };
        self.mounts_of(key, kind, id, &parent_ids, mapping.as_ref())
    }

    /// Whether a snapshot `key` with `mapping` over the layer tree `top` (its immediate
    /// parent's) needs ID-mapped clones of its layers; refused when it does and they
    /// cannot be made here.
    fn needs_clones(
        &self,
        key: &str,
        mapping: Option<&crate::idmap::IdMapping>,
        top: Option<&Path>,
    ) -> Result<bool> {
        let (Some(m), Some(top)) = (mapping, top) else {
            return Ok(false);
        };
        if !crate::idmap::needs_clones(m, top)? {
            return Ok(false);
        }
        match &self.idmap_unavailable {
            Some(reason) => Err(SnapshotError::IdmapUnavailable {
                key: key.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(true),
        }
    }

    /// Builds `snapshots/new-<id>` and renames it to `snapshots/<id>`; on failure
    /// nothing is left.
    fn build_dir(&self, kind: Kind, id: u64, owner: Option<(u32, u32)>) -> Result<()> {
        let tmp = self
            .layout
            .snapshots_dir()
            .join(format!("{NEW_PREFIX}{id}"));
        let dir = self.layout.snapshot_dir(id);
        let mkdir = |path: &Path, mode: u32| {
            fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(SnapshotError::io("mkdir", path))
        };
        let build = || -> Result<()> {
            mkdir(&tmp, 0o700)?;
            let fsdir = tmp.join(FS_DIR);
            mkdir(&fsdir, 0o755)?;
            if let Some((uid, gid)) = owner {
                self.objects
                    .sys()
                    .chown(crate::sys::At::Path(&fsdir), uid, gid)
                    .map_err(SnapshotError::io("chown", &fsdir))?;
            }
            if kind == Kind::Active {
                mkdir(&tmp.join(WORK_DIR), 0o711)?;
            }
            fs::rename(&tmp, &dir).map_err(SnapshotError::io("rename", &dir))
        };
        build().inspect_err(|_| {
            let _ = fs::remove_dir_all(&tmp);
        })
    }

    /// Whether the store holds the object `digest`.
    pub fn has_object(&self, digest: &Digest) -> bool {
        self.objects.contains(digest)
    }

    /// Opens the object `digest` for reading.
    pub fn open_object(&self, digest: &Digest) -> io::Result<fs::File> {
        fs::File::open(self.objects.path(digest))
    }

    /// Changes the labels of `key`; returns the new record.
    pub fn update_labels(&self, key: &str, changes: &[LabelChange]) -> Result<Record> {
        let _w = self.write_lock();
        let mut rec = self.meta.require(key)?;
        for change in changes {
            match change {
                LabelChange::Replace(all) => rec.labels = all.clone(),
                LabelChange::Set(k, v) => {
                    rec.labels.insert(k.clone(), v.clone());
                }
                LabelChange::Unset(k) => {
                    rec.labels.remove(k);
                }
            }
        }
        rec.updated = SystemTime::now();
        let flush = self.record_put(Step::Update, rec.id, key, &rec)?;
        self.meta.put(key, &rec)?;
        if flush {
            self.meta.flush_blocking()?;
        }
        Ok(rec)
    }

    /// Usage of `key`. A committed layer's is what it added to the disk: its own tree
    /// (stubs, directories, symlinks: metadata only) plus the bytes of the objects it was
    /// first to store. Summed over all snapshots this equals the store's physical usage
    /// at the time each layer was committed, which is what image-fs accounting needs;
    /// the bytes of content shared with earlier layers are not counted again. An active
    /// snapshot's is its upper directory's, as containerd counts it.
    pub fn usage(&self, key: &str) -> Result<DiskUsage> {
        let rec = self.meta.require(key)?;
        match rec.kind {
            Kind::Active => Ok(disk_usage(&self.layout.fs_dir(rec.id))?),
            _ => Ok(rec.usage),
        }
    }

    /// The mounts of the active snapshot or view `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self.meta.require(key)?;
        if rec.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "mounts are only available for active snapshots and views",
            });
        }
        let parents = self.meta.parent_ids(&rec)?;
        let mapping = crate::idmap::IdMapping::from_labels(&rec.labels)?;
        self.mounts_of(key, rec.kind, rec.id, &parents, mapping.as_ref())
    }

    /// The mounts of snapshot `id`, with what they name put in place first: the
    /// parents' images mounted, a deep chain's flattened tree, and an ID-mapped
    /// snapshot's clones of its layers (unless containerd chowned the layers itself).
    fn mounts_of(
        &self,
        key: &str,
        kind: Kind,
        id: u64,
        parents: &[u64],
        mapping: Option<&crate::idmap::IdMapping>,
    ) -> Result<Vec<Mount>> {
        self.mount_chain(parents)?;
        let top = parents.first().map(|p| self.layout.fs_dir(*p));
        let mapped = self.needs_clones(key, mapping, top.as_deref())?;
        let plan = self.planner.plan_for(kind, id, parents, mapped);
        if let Some(top) = plan.flat {
            self.ensure_flat(top, parents)?;
        }
        if let (Some(m), true) = (mapping, mapped) {
            let _m = lock(&self.mounting);
            crate::idmap::ensure_clones(self.objects.sys(), m, &plan.clones)?;
        }
        Ok(plan.mounts)
    }

    /// Makes sure the flattened tree of the chain `parents` (whose top is `top`) exists.
    fn ensure_flat(&self, top: u64, parents: &[u64]) -> Result<()> {
        let out = self.layout.flat_dir(top);
        if out.is_dir() {
            return Ok(());
        }
        let _w = self.write_lock();
        if out.is_dir() {
            return Ok(());
        }
        // The parent's own flat tree, when it has one, already merges the rest of the
        // chain: merging one layer over it keeps each flatten proportional to the tree.
        let layers: Vec<_> = match parents.get(1).map(|p| self.layout.flat_dir(*p)) {
            Some(below) if below.is_dir() => vec![self.layout.fs_dir(top), below],
            _ => parents.iter().map(|p| self.layout.fs_dir(*p)).collect(),
        };
        let tmp = self.layout.snapshot_dir(top).join("flat.tmp");
        let started = std::time::Instant::now();
        remove_tree(&tmp)?;
        crate::flatten::flatten(&layers, &tmp, &out)?;
        info!(
            snapshot = top,
            layers = parents.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flattened a deep chain"
        );
        Ok(())
    }

    /// Commits the active snapshot `key` as `name`: its layer is ingested (unless the
    /// Diff service applied it) and it becomes an immutable parent.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Committed> {
        check_key("name", name)?;
        let rec = self.meta.require(key)?;
        self.check_committable(name, key, &rec)?;
        // One ingest per snapshot: a second Commit of the same key must not walk the tree
        // the first one is rewriting.
        let _busy = self.busy(key, rec.id)?;
        // Shared GC lock from before the first object lookup until the references land.
        let _g = self.ingest_lock();
        let started = std::time::Instant::now();
        let fsdir = self.layout.fs_dir(rec.id);
        let manifest = self.layout.manifest(rec.id);
        // A layer the Diff service applied is already stubs + objects + manifest.
        let applied = manifest.exists() && self.mode == StoreMode::Stubs;
        let parents = self.meta.parent_ids(&rec)?;
        self.mount_chain(&parents)?;
        if applied
            && crate::erofs::mount::has_image(&self.layout, rec.id)
            && !has_entries(&fsdir).map_err(SnapshotError::io("read dir", &fsdir))?
        {
            // applied before a restart: its image is read through its mount
            self.mount_image(rec.id)?;
        }
        // From here until the references land, a failure leaves the objects the ingest
        // published unreferenced and nobody's GC candidates: the next GC scans.
        let unreferenced = ScanOnFailure {
            meta: &self.meta,
            pending: &self.pending,
            id: rec.id,
            manifest: &manifest,
            armed: true,
        };
        let stats = if applied {
            let s = self.applied_stats(rec.id, &fsdir, &manifest)?;
            IngestStats {
                files: s.files,
                logical_bytes: s.logical_bytes,
                new_objects: s.new_objects,
                new_bytes: s.new_bytes,
                dropped_overlay_xattrs: s.skipped_xattrs,
                times: Default::default(),
            }
        } else if self.images {
            let lowers = self.planner.lower_trees(rec.id, &parents);
            let image = self.layout.image_file(rec.id);
            crate::ingest::ingest_layer_image(&self.objects, &fsdir, &lowers, &manifest, &image)?
        } else {
            let lowers = self.planner.lower_trees(rec.id, &parents);
            crate::ingest::ingest_layer(
                &self.objects,
                &self.layout.tmp_dir(),
                &fsdir,
                &lowers,
                &manifest,
                self.mode,
            )?
        };
        let image = self.layout.image_file(rec.id);
        let mut usage = match fs::metadata(&image) {
            // an image layer is its image: one file, whatever it describes
            Ok(md) => DiskUsage {
                size: md.len() as i64,
                inodes: 1,
            },
            _ => disk_usage(&fsdir)?,
        };
        if self.mode == StoreMode::Stubs {
            // materialised layers already hold their new objects' inodes
            usage.size += stats.new_bytes as i64;
            usage.inodes += stats.new_objects as i64;
        }
        let objects = crate::manifest::distinct_objects(&manifest)?;
        crate::crash_point!("commit.after-ingest");

        let _w = self.write_lock();
        let mut rec = self.meta.require(key)?;
        self.check_committable(name, key, &rec)?;
        let now = SystemTime::now();
        rec.kind = Kind::Committed;
        rec.labels = labels;
        rec.created = now;
        rec.updated = now;
        rec.usage = usage;
        rec.logical_bytes = stats.logical_bytes;
        // The Commit is durable once its record is: one journal write. Mirror and index
        // follow without flushes; a checkpoint or the replay at start makes them durable.
        let flush = self.record_put(Step::Commit, rec.id, name, &rec)?;
        self.meta.rename(key, name, &rec, &objects)?;
        unreferenced.disarm();
        // referenced now: its manifest keeps nothing any more
        self.pending.remove(rec.id);
        if flush {
            self.meta.flush_blocking()?;
        }
        crate::crash_point!("commit.after-index");
        let _ = fs::remove_dir_all(self.layout.work_dir(rec.id));
        let swapping = std::time::Instant::now();
        if crate::erofs::mount::has_image(&self.layout, rec.id) {
            if let Err(e) = self.swap_in_image(rec.id) {
                // durable already: the next Mounts of a child, or the next start, mounts it
                warn!(%name, id = rec.id, error = %e, "the committed layer's image is not mounted yet");
            }
        }
        let swap = swapping.elapsed();
        let elapsed = started.elapsed();
        info!(
            %key, %name, id = rec.id,
            files = stats.files,
            logical_bytes = stats.logical_bytes,
            new_objects = stats.new_objects,
            new_bytes = stats.new_bytes,
            dropped_overlay_xattrs = stats.dropped_overlay_xattrs,
            applied,
            hash_ms = stats.times.hash.as_millis() as u64,
            image_ms = stats.times.image.as_millis() as u64,
            sync_ms = stats.times.sync.as_millis() as u64,
            swap_ms = swap.as_millis() as u64,
            elapsed_ms = elapsed.as_millis() as u64,
            "committed"
        );
        Ok(Committed {
            id: rec.id,
            stats,
            applied,
            elapsed,
        })
    }

    fn check_committable(&self, name: &str, key: &str, rec: &Record) -> Result<()> {
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "only active snapshots can be committed",
            });
        }
        if self.meta.get(name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        Ok(())
    }

    /// Removes `key` (refused while it has children). A layer applied but never
    /// committed takes the objects nothing else references with it.
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut orphaned = Vec::new();
        let deleting;
        let trash = {
            let _w = self.write_lock();
            let rec = self.meta.require(key)?;
            if self.meta.has_children(key)? {
                return Err(SnapshotError::FailedPrecondition {
                    key: key.to_string(),
                    reason: "cannot remove a snapshot that has children",
                });
            }
            let dir = self.layout.snapshot_dir(rec.id);
            let manifest = self.layout.manifest(rec.id);
            let objects = if rec.kind == Kind::Committed {
                crate::manifest::distinct_objects(&manifest)?
            } else {
                if rec.kind == Kind::Active && manifest.exists() {
                    // applied but never committed (a failed pull): its objects are
                    // garbage unless something else keeps them; collected below
                    orphaned = crate::manifest::distinct_objects(&manifest)?
                        .into_iter()
                        .map(|(d, _)| d)
                        .collect();
                }
                Vec::new()
            };
            lock(&self.applied).remove(&rec.id);
            self.pending.remove(rec.id);
            // The journal record makes the Remove durable; the mirror goes next, before
            // the index: a rebuild after a crash here must not revive it.
            self.log
                .record_small(&Change::Delete { id: rec.id }, &self.meta)?;
            let info = dir.join(crate::layout::INFO_FILE);
            match fs::remove_file(&info) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SnapshotError::io("remove", &info)(e))
                }
                _ => {}
            }
            crate::crash_point!("remove.after-info");
            self.meta.delete(key, &rec, &objects)?;
            // Durable before the directory (and its manifest, which the references
            // were counted from) leaves `snapshots/`.
            self.meta.flush_blocking()?;
            crate::crash_point!("remove.after-index");
            // Out of `snapshots/` while still under the lock, so no reader (fsck, the
            // orphan sweep) sees a directory without a record; deleted outside it. A
            // crash leaves it in `cas/tmp`, which is swept at start and by GC.
            let trash = self.layout.tmp_dir().join(format!("removed-{}", rec.id));
            deleting = self.deleting.track(&trash);
            crate::erofs::mount::unmount(self.objects.sys(), &self.layout.fs_dir(rec.id))?;
            crate::idmap::detach_clones(self.objects.sys(), &self.layout.mapped_dir(rec.id))?;
            match fs::rename(&dir, &trash) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SnapshotError::io("rename", &dir)(e))
                }
                _ => {}
            }
            crate::crash_point!("remove.after-rename");
            trash
        };
        remove_tree(&trash)?;
        drop(deleting);
        if !orphaned.is_empty() {
            let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let stats = self.pending.with(|pending| {
                crate::gc::collect_objects(&self.layout, &self.meta, &orphaned, pending)
            })?;
            debug!(%key, removed = stats.removed, "objects of an uncommitted applied layer collected");
        }
        debug!(%key, "removed");
        Ok(())
    }

    /// What containerd's Cleanup asks for after its own garbage collection removed
    /// snapshots: sweep directories without records, collect objects nothing
    /// references, and (a quiet moment) retire the journal's records.
    pub fn cleanup(&self) -> Result<GcStats> {
        {
            let _w = self.write_lock();
            let swept = self.sweep_orphans()?;
            if swept > 0 {
                info!(
                    swept,
                    "cleanup removed snapshot directories without metadata"
                );
            }
        }
        let stats = self.gc()?;
        self.checkpoint()?;
        Ok(stats)
    }

    /// Removes every directory under `snapshots/` that no record names. Returns how many.
    fn sweep_orphans(&self) -> Result<u64> {
        let live: HashSet<String> = self
            .meta
            .all()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let dir = self.layout.snapshots_dir();
        let mut swept = 0;
        for entry in fs::read_dir(&dir).map_err(SnapshotError::io("read dir", &dir))? {
            let entry = entry.map_err(SnapshotError::io("read dir", &dir))?;
            if live.contains(entry.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            crate::erofs::mount::remove_snapshot_dir(self.objects.sys(), &entry.path())?;
            swept += 1;
        }
        Ok(swept)
    }

    /// Makes every journaled change durable in the index and mirrors and retires the
    /// records (also done every [`crate::journal::CHECKPOINT_EVERY`] records).
    pub fn checkpoint(&self) -> Result<()> {
        let _w = self.write_lock();
        self.log.checkpoint(&self.meta)?;
        Ok(())
    }

    /// The last step of a clean shutdown: a checkpoint and the clean-stop marker, so the
    /// next start need not read every snapshot's `info` mirror. Call last, once nothing
    /// calls in any more: a change after it would not be seen at the next start.
    pub fn shutdown(&self) -> Result<()> {
        let _w = self.write_lock();
        self.log.mark_clean_stop(&self.meta)?;
        // no mount outlives the daemon; containers keep their overlays' own clones
        let (mut detached, mut clones) = (0, 0);
        for (_, rec) in self.meta.all()? {
            let sys = self.objects.sys();
            clones += crate::idmap::detach_clones(sys, &self.layout.mapped_dir(rec.id))?;
            if crate::erofs::mount::unmount(sys, &self.layout.fs_dir(rec.id))? {
                detached += 1;
            }
        }
        if detached + clones > 0 {
            info!(
                detached,
                clones, "layer images and ID-mapped clones unmounted"
            );
        }
        Ok(())
    }

    /// Puts committed snapshot `id`'s image in place of the tree it was ingested from:
    /// the tree is moved to `cas/tmp` and deleted, and the image mounted at `fs`.
    fn swap_in_image(&self, id: u64) -> Result<()> {
        let _m = lock(&self.mounting);
        let fs_dir = self.layout.fs_dir(id);
        if crate::erofs::mount::is_mounted(&fs_dir) {
            return Ok(());
        }
        let trash = self.layout.tmp_dir().join(format!("ingested-{id}"));
        let holds_entries = match has_entries(&fs_dir) {
            // moved away by a swap that stopped there
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            r => r.map_err(SnapshotError::io("read dir", &fs_dir))?,
        };
        let deleting = holds_entries.then(|| self.deleting.track(&trash));
        if holds_entries {
            remove_tree(&trash)?;
            fs::rename(&fs_dir, &trash).map_err(SnapshotError::io("rename", &fs_dir))?;
            crate::crash_point!("commit.tree-moved");
        }
        match fs::DirBuilder::new().mode(0o755).create(&fs_dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(SnapshotError::io("mkdir", &fs_dir)(e))
            }
            _ => {}
        }
        self.mount_image(id)?;
        if holds_entries {
            // one unlink per file, none of it needed for the answer: deleted meanwhile
            // (what is left of it at a crash, the sweep of `cas/tmp` at start takes)
            let spawned = std::thread::Builder::new()
                .name("ingested-tree".into())
                .spawn(move || {
                    let _deleting = deleting;
                    if let Err(e) = remove_tree(&trash) {
                        warn!(error = %e, "could not delete an ingested tree");
                    }
                });
            if let Err(e) = spawned {
                warn!(error = %e, "no thread to delete an ingested tree: it waits for the next sweep");
            }
        }
        Ok(())
    }

    /// Finishes at start the Commits that stopped before their ingested tree was
    /// swapped for the image. Images themselves are mounted when a layer's tree is first
    /// needed ([`Snapshots::mount_chain`]): a start mounts nothing else, however many
    /// layers the store holds.
    fn finish_swaps(&self) -> Result<u64> {
        let mut finished = 0;
        for (_, rec) in self.meta.all()? {
            if rec.kind != Kind::Committed || !crate::erofs::mount::has_image(&self.layout, rec.id)
            {
                continue;
            }
            let fs_dir = self.layout.fs_dir(rec.id);
            // a missing `fs` is a swap that stopped after moving the tree away
            let holds_tree = has_entries(&fs_dir).unwrap_or(true);
            if holds_tree && !crate::erofs::mount::is_mounted(&fs_dir) {
                self.swap_in_image(rec.id)?;
                finished += 1;
            }
        }
        Ok(finished)
    }

    /// Mounts snapshot `id`'s image at its `fs` unless it is mounted; whether it mounted
    /// it now.
    fn mount_image(&self, id: u64) -> std::result::Result<bool, crate::error::CasError> {
        crate::erofs::mount::ensure_mounted(self.objects.sys(), &self.layout, id, self.image_mounts)
    }

    /// Makes sure every image layer of `chain` (committed snapshots) is mounted at its
    /// `fs`: before a mount names them, an apply or ingest reads them, or a child is
    /// made. One `stat` and one `statfs` per layer when all are.
    fn mount_chain(&self, chain: &[u64]) -> Result<()> {
        for &p in chain {
            if crate::erofs::mount::has_image(&self.layout, p)
                && !crate::erofs::mount::is_mounted(&self.layout.fs_dir(p))
            {
                self.swap_in_image(p)?;
            }
        }
        Ok(())
    }

    /// Makes snapshot `id`'s new record durable ahead of the index: a journal record
    /// and the `info` mirror written lazily; or, for a record too large for a journal
    /// block, a Dirty record and a durable mirror, in which case it returns `true` and
    /// the caller must flush the index after changing it.
    fn record_put(&self, step: Step, id: u64, key: &str, rec: &Record) -> Result<bool> {
        let dir = self.layout.snapshot_dir(id);
        let change = Change::Put {
            id,
            key: key.to_string(),
            record: rec.clone(),
        };
        let flush = if self.log.record(&change, &self.meta)? {
            if step == Step::Commit {
                crate::crash_point!("commit.after-record");
            }
            crate::journal::write_info_lazy(&dir, key, rec)?;
            false
        } else {
            self.log.record_small(&Change::Dirty { id }, &self.meta)?;
            crate::index::write_info(&dir, key, rec)?;
            true
        };
        match step {
            Step::Create => crate::crash_point!("create.after-info"),
            Step::Commit => crate::crash_point!("commit.after-info"),
            Step::Update => {}
        }
        Ok(flush)
    }

    /// Collects objects no committed snapshot references: the index's GC candidates, a
    /// batch at a time (each batch waits for running ingests and holds new ones off).
    /// After an unclean stop, every unreferenced object is made a candidate first, a
    /// chunk at a time (see [`crate::gc`]).
    pub fn gc(&self) -> Result<GcStats> {
        let started = std::time::Instant::now();
        let mut stats = GcStats::default();
        if !self.meta.candidates_complete()? {
            stats.scanned += self.adopt_unreferenced()?;
        }
        let trees = {
            let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let (files, trees) =
                crate::gc::sweep_tmp_files(&self.layout, &|p| self.deleting.contains(p))?;
            stats.tmp_removed = files;
            trees
        };
        // trees a deletion left behind (an error, a thread that could not start): no
        // ingest touches them, so they go without holding anything off
        for tree in trees {
            let _deleting = self.deleting.track(&tree);
            remove_tree(&tree)?;
            stats.tmp_removed += 1;
        }
        let (mut batches, mut longest) = (0u64, std::time::Duration::ZERO);
        loop {
            // Commits and applies wait for one batch at most.
            let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let _w = lock(&self.writer);
            let held = std::time::Instant::now();
            let batch = self.meta.candidates(GC_BATCH)?;
            if batch.is_empty() {
                break;
            }
            let s = self.pending.with(|pending| {
                crate::gc::collect_batch(
                    &self.layout,
                    &self.meta,
                    &batch,
                    pending,
                    held + GC_HOLD_MAX,
                )
            })?;
            stats.scanned += s.scanned;
            stats.removed += s.removed;
            stats.freed_bytes += s.freed_bytes;
            batches += 1;
            longest = longest.max(held.elapsed());
            drop((_w, _g));
            // the requests waiting meanwhile go before the next batch
            self.let_waiting_in();
        }
        info!(
            removed = stats.removed,
            freed_bytes = stats.freed_bytes,
            candidates = stats.scanned,
            batches,
            longest_batch_ms = longest.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "garbage collected"
        );
        Ok(stats)
    }

    /// Makes every unreferenced object a GC candidate (after an unclean stop, or a
    /// failure that may have left some that are not), one fan-out directory listed at a
    /// time without any lock and its objects looked up in chunks under the writer lock
    /// (see [`crate::gc`]), then marks the candidates complete unless they were marked
    /// incomplete again meanwhile. Returns how many objects it looked at.
    fn adopt_unreferenced(&self) -> Result<u64> {
        let started = std::time::Instant::now();
        let marks = self.meta.incomplete_marks();
        let (mut scanned, mut adopted) = (0u64, 0u64);
        for first in 0..=u8::MAX {
            let objects = crate::gc::objects_in_fan(&self.layout, first)?;
            scanned += objects.len() as u64;
            // most objects are referenced: only the others are `stat`ed and looked at
            // again under the lock
            let unreferenced = self.meta.unreferenced(&objects)?;
            for chunk in unreferenced.chunks(GC_BATCH) {
                let sized = crate::gc::with_sizes(&self.layout, chunk)?;
                {
                    let _w = lock(&self.writer);
                    adopted += self.meta.adopt_unreferenced(&sized)?;
                }
                crate::crash_point!("gc.after-adopting-a-chunk");
                self.let_waiting_in();
            }
        }
        let complete = self.meta.complete_candidates_since(marks)?;
        info!(
            scanned,
            adopted,
            complete,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "GC candidates looked for among every object (complete: none is missing since)"
        );
        Ok(scanned)
    }

    /// Waits (at most [`GC_YIELD_MAX`]) until the requests that were waiting for the locks
    /// a GC step held have taken them: a lock released and taken again at once mostly
    /// stays with its thread (measured: Commits waited 7 batches).
    fn let_waiting_in(&self) {
        let yielded = std::time::Instant::now();
        while self.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0
            && yielded.elapsed() < GC_YIELD_MAX
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// What each image holds alone and shares (`casctl images`, the per-image metrics).
    pub fn chain_usage(&self) -> Result<Vec<crate::sharing::ChainUsage>> {
        Ok(crate::sharing::chain_usage(&self.layout, &self.meta)?)
    }

    /// Store statistics (`casctl stats`), with the journal's backend.
    pub fn stats(&self) -> Result<Stats> {
        let mut s = crate::admin::stats(&self.layout, &self.meta)?;
        s.journal = Some(self.log.backend().to_string());
        s.new_layers = Some(
            match (self.mode, self.images) {
                (StoreMode::Materialised, _) => "materialised trees",
                (_, true) => "EROFS images",
                (_, false) => "stub trees",
            }
            .to_string(),
        );
        s.id_mapped_snapshots = Some(match &self.idmap_unavailable {
            None => "ID-mapped clones of the shared layers (remap-ids)".to_string(),
            Some(why) => format!("on layers containerd chowned only ({why})"),
        });
        Ok(s)
    }

    /// Consistency check (`casctl fsck`), with ingests and index changes held off so
    /// it sees one consistent state.
    pub fn fsck(&self, verify_objects: bool) -> Result<FsckReport> {
        self.fsck_with_progress(verify_objects, &mut |_| {})
    }

    /// [`Snapshots::fsck`], telling `progress` how far it has come.
    pub fn fsck_with_progress(
        &self,
        verify_objects: bool,
        progress: &mut dyn FnMut(&crate::admin::Progress),
    ) -> Result<FsckReport> {
        let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let _w = lock(&self.writer);
        Ok(crate::fsck::check(
            &self.layout,
            &self.objects,
            &self.meta,
            verify_objects,
            progress,
            None,
        )?)
    }

    /// Marks `id` busy (Commit or Apply) until the guard drops; a second one is refused.
    fn busy(&self, key: &str, id: u64) -> Result<BusyGuard<'_>> {
        if !lock(&self.busy).insert(id) {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "a commit or apply of this snapshot is already in progress",
            });
        }
        Ok(BusyGuard {
            set: &self.busy,
            id,
        })
    }

    /// The active snapshot whose layer directory (`snapshots/<id>/fs`) is `fs_dir`:
    /// its key and record, or `None` when the directory is not one of ours.
    pub fn active_by_fs_dir(&self, fs_dir: &Path) -> Result<Option<(String, Record)>> {
        let Ok(rest) = fs_dir.strip_prefix(self.layout.snapshots_dir()) else {
            return Ok(None);
        };
        let mut parts = rest.components();
        let (Some(id), Some(fs), None) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        let Ok(id) = id.as_os_str().to_string_lossy().parse::<u64>() else {
            return Ok(None);
        };
        if fs.as_os_str() != FS_DIR {
            return Ok(None);
        }
        let Ok(info) = crate::index::read_info(&self.layout.snapshot_dir(id)) else {
            return Ok(None);
        };
        match self.meta.get(&info.key)? {
            Some(rec) if rec.id == id && rec.kind == Kind::Active => Ok(Some((info.key, rec))),
            _ => Ok(None),
        }
    }

    /// Applies a layer blob into the active snapshot `key` in one pass (the Diff
    /// service's fast path, see [`crate::unpack`]). Objects are published now and kept
    /// by the snapshot's manifest until its Commit references them. On failure the layer
    /// directory is emptied and the objects this apply added are collected again.
    pub fn apply_blob(
        &self,
        key: &str,
        blob: impl io::Read + Send,
        blob_size: u64,
        blob_digest: Option<Digest>,
        limits: Limits,
        pool: &ringio::Pool,
    ) -> Result<Applied> {
        let rec = self.meta.require(key)?;
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "layers can only be applied to active snapshots",
            });
        }
        let _busy = self.busy(key, rec.id)?;
        let manifest = self.layout.manifest(rec.id);
        if manifest.exists() {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "a layer was already applied to this snapshot",
            });
        }
        let parents = self.meta.parent_ids(&rec)?;
        self.mount_chain(&parents)?;
        let lowers = self.planner.lower_trees(rec.id, &parents);
        let fsdir = self.layout.fs_dir(rec.id);
        let image = self.layout.image_file(rec.id);
        let tmp = self.layout.tmp_dir();
        let started = std::time::Instant::now();
        let result = {
            // Shared GC lock from the first object lookup until the manifest keeps them.
            let _g = self.ingest_lock();
            let target = crate::unpack::Target {
                store: &self.objects,
                tmp_dir: &tmp,
                fs_dir: &fsdir,
                lowers: &lowers,
                manifest: &manifest,
                image: self.images.then_some(image.as_path()),
                pool,
            };
            let applied = crate::unpack::apply_blob(blob, blob_size, blob_digest, limits, &target);
            // the manifest keeps its objects from now on: GC knows it before this apply
            // lets the lock go
            match applied {
                Ok(applied) => match self.pending.add(rec.id, &manifest) {
                    Ok(()) => Ok(applied),
                    Err(e) => {
                        // unprotected now: without the manifest its new objects are
                        // nobody's, and the next collection looks at every object
                        let _ = fs::remove_file(&manifest);
                        if let Err(e) = self.meta.set_candidates_complete(false) {
                            warn!(error = %e, "could not mark the GC candidates incomplete");
                        }
                        Err(crate::unpack::ApplyFailure {
                            error: UnpackError::Store(e),
                            new_objects: Vec::new(),
                        })
                    }
                },
                failed => failed,
            }
        };
        // an image is of use once mounted: a mount that fails fails the apply
        let result = match result {
            Ok(applied) if self.images => match self.mount_image(rec.id) {
                Ok(_) => Ok(applied),
                Err(e) => {
                    let _ = fs::remove_file(&manifest);
                    self.pending.remove(rec.id);
                    Err(crate::unpack::ApplyFailure {
                        error: UnpackError::Store(e),
                        new_objects: Vec::new(),
                    })
                }
            },
            other => other,
        };
        match result {
            Ok(applied) => {
                lock(&self.applied).insert(rec.id, applied.stats.clone());
                info!(
                    %key, id = rec.id,
                    diff_id = %applied.diff_id,
                    compression = applied.compression.as_str(),
                    uncompressed_bytes = applied.uncompressed_size,
                    files = applied.stats.files,
                    logical_bytes = applied.stats.logical_bytes,
                    new_objects = applied.stats.new_objects,
                    new_bytes = applied.stats.new_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    input_wait_ms = applied.times.input_wait.as_millis() as u64,
                    write_wait_ms = applied.times.write_wait.as_millis() as u64,
                    stub_wait_ms = applied.times.stub_wait.as_millis() as u64,
                    image_bytes = applied.stats.image_bytes,
                    sync_ms = applied.times.sync.as_millis() as u64,
                    "layer applied"
                );
                Ok(applied)
            }
            Err(failure) => {
                warn!(%key, id = rec.id, error = %failure.error, "layer apply failed; nothing of it is kept");
                if let Err(e) = empty_dir(&fsdir) {
                    warn!(%key, error = %e, "could not empty the layer after a failed apply");
                }
                for f in [image.clone(), image.with_extension("tmp")] {
                    match fs::remove_file(&f) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            warn!(%key, error = %e, "could not remove the image of a failed apply")
                        }
                        _ => {}
                    }
                }
                if !failure.new_objects.is_empty() {
                    let _g = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
                    let stats = self.pending.with(|pending| {
                        crate::gc::collect_objects(
                            &self.layout,
                            &self.meta,
                            &failure.new_objects,
                            pending,
                        )
                    })?;
                    debug!(
                        removed = stats.removed,
                        "objects of the failed apply collected"
                    );
                }
                Err(SnapshotError::Unpack(failure.error))
            }
        }
    }

    /// The figures of a layer the Diff service applied into snapshot `id`: kept in
    /// memory from Apply to Commit, recomputed from its manifest after a restart.
    fn applied_stats(&self, id: u64, fsdir: &Path, manifest: &Path) -> Result<UnpackStats> {
        if let Some(s) = lock(&self.applied).remove(&id) {
            return Ok(s);
        }
        let mut stats = UnpackStats::default();
        let mut inodes = HashSet::new();
        for entry in crate::manifest::read_manifest(manifest)? {
            let entry = entry?;
            stats.files += 1;
            let p = fsdir.join(&entry.path);
            let md = fs::symlink_metadata(&p).map_err(SnapshotError::io("stat", &p))?;
            if inodes.insert(md.ino()) {
                stats.logical_bytes += entry.size;
            }
        }
        Ok(stats)
    }
}

/// Whether the directory `dir` holds anything.
fn has_entries(dir: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(dir)?.next().is_some())
}

/// Removes everything inside `dir`, keeping `dir`.
fn empty_dir(dir: &Path) -> Result<(), CasError> {
    for e in fs::read_dir(dir).map_err(CasError::io("read dir", dir))? {
        let e = e.map_err(CasError::io("read dir", dir))?;
        remove_tree(&e.path())?;
    }
    Ok(())
}
