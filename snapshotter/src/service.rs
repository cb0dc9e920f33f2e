//! The Snapshots service: containerd's snapshotter contract on top of the store.
//!
//! A snapshot is a directory `snapshots/<id>` (`fs`, and `work` while active) plus a
//! record in the index. At Commit the layer is ingested into the CAS: every regular file
//! becomes a metadata stub whose bytes live in `cas/objects`, and the layer's manifest is
//! written (see `cas::ingest`). Mounts then name the CAS as overlayfs' data-only lower
//! layer (see [`crate::mounts`]).
//!
//! Ordering rules, which are what keeps a `kill -9` at any instant harmless:
//!
//! * **Create** (Prepare/View): build `snapshots/new-<id>` (`fs`, and `work` for active
//!   snapshots), rename it to `snapshots/<id>`, then insert the record and flush the
//!   index, then answer. A crash before the record leaves an orphan directory, which
//!   start-up and Cleanup sweep.
//! * **Commit**: ingest (objects published and synced, manifest written), then rewrite
//!   the record (key → name) and take the references on its objects in one batch,
//!   flush, answer. A crash before the batch leaves an active snapshot (containerd
//!   removes and redoes it) and objects nobody references yet (GC takes them).
//! * **Remove**: delete the record and drop its references in one batch (refused while
//!   children exist), flush, then delete the directory. A crash in between leaves an
//!   orphan directory, swept later.
//!
//! Concurrency: index mutations are serialised by one writer lock; reads (Stat, Mounts,
//! Walk) take none. Ingests hold the GC lock shared from before they look objects up
//! until their references are in the index; GC holds it exclusively, so it never
//! deletes an object an ingest has just decided to reuse.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use cas::gc::GcStats;
use cas::index::{DiskUsage, Kind, MetaStore, Record};
use cas::journal::{Change, CommitLog, Stop};
use cas::objects::ObjectStore;
use cas::unpack::{Applied, Limits, UnpackStats};
use cas::{Digest, Layout, StoreMode};
use config::{JournalKind, MountMode};
use containerd_snapshots::{api::types::Mount, Info, Snapshotter, Usage};
use ringio::journal::JournalMode;
use tokio::sync::{Mutex, RwLock};
use tracing::{debug, info, instrument, warn};

use crate::error::SnapshotError;
use crate::filter::FilterSet;
use crate::mounts::{MountPlanner, OverlayFeatures, Plan};

/// Prefix of directories being built by Prepare/View, before their rename.
const NEW_PREFIX: &str = "new-";
use cas::admin::MANIFEST_FILE as MANIFEST;

/// The snapshotter.
pub struct CasSnapshotter {
    mode: StoreMode,
    layout: Layout,
    meta: MetaStore,
    store: ObjectStore,
    planner: MountPlanner,
    writer: Mutex<()>,
    gc_lock: RwLock<()>,
    /// Ids of active snapshots being ingested by a Commit or applied into right now.
    committing: std::sync::Mutex<HashSet<u64>>,
    /// What the Diff service's applies did, by snapshot id, until their Commit.
    applied: std::sync::Mutex<HashMap<u64, UnpackStats>>,
    /// Commit records (see `cas::journal`).
    log: CommitLog,
    /// What `/metrics` exports.
    metrics: Arc<crate::metrics::Metrics>,
}

/// Marks an active snapshot as being committed; unmarks it when dropped.
struct CommitGuard<'a> {
    set: &'a std::sync::Mutex<HashSet<u64>>,
    id: u64,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.id);
        }
    }
}

fn to_info(key: String, rec: Record) -> Info {
    Info {
        kind: match rec.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: key,
        parent: rec.parent.unwrap_or_default(),
        labels: rec.labels.into_iter().collect(),
        created_at: rec.created,
        updated_at: rec.updated,
    }
}

fn check_key(what: &str, key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    Ok(())
}

/// Disk usage of a tree the way containerd's `fs.DiskUsage` counts it: allocated
/// blocks, each inode once, the root included.
pub fn disk_usage(root: &Path) -> Result<DiskUsage, SnapshotError> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.map_err(|e| SnapshotError::Io {
            op: "walk",
            path: e.path().unwrap_or(root).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("filesystem loop")),
        })?;
        let md = entry
            .metadata()
            .map_err(|e| SnapshotError::io("stat", entry.path())(io::Error::other(e)))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += md.blocks() as i64 * 512;
            usage.inodes += 1;
        }
    }
    Ok(usage)
}

/// The distinct objects a committed layer's manifest names.
fn manifest_objects(manifest: &Path) -> Result<Vec<Digest>, SnapshotError> {
    let mut set = BTreeSet::new();
    for entry in cas::manifest::read_manifest(manifest)? {
        set.insert(entry?.digest);
    }
    Ok(set.into_iter().collect())
}

/// Removes a directory tree; a tree that is already gone is fine.
fn remove_tree(path: &Path) -> Result<(), SnapshotError> {
    Ok(cas::layout::remove_tree(path)?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(f).await?
}

impl CasSnapshotter {
    /// Opens the store at `layout`, sweeping directories no record points to and
    /// leftovers of interrupted writes.
    ///
    /// The index is rebuilt from the snapshots' `info` files and manifests when it
    /// cannot be opened, or when it is missing while snapshots exist.
    pub fn open(layout: Layout, requested: MountMode) -> Result<CasSnapshotter, SnapshotError> {
        Self::open_with(layout, requested, JournalKind::Auto)
    }

    /// [`CasSnapshotter::open`] with the journal backend chosen by config.
    pub fn open_with(
        layout: Layout,
        requested: MountMode,
        journal: JournalKind,
    ) -> Result<CasSnapshotter, SnapshotError> {
        let started = std::time::Instant::now();
        let mode = match journal {
            JournalKind::Auto => JournalMode::Auto,
            JournalKind::Rename => JournalMode::ForceRename,
        };
        let log = CommitLog::open(&layout, mode)?;
        let clean = log.take_clean_stop()?;
        let replayed = log.replay()?;
        let stop = log.stop(clean, &replayed);
        info!(
            stop = match &stop {
                Stop::Clean => "clean",
                Stop::Crash { .. } => "crash",
                Stop::Unknown => "unknown",
            },
            backend = %log.backend(),
            records = replayed.records,
            mirrors_written = replayed.written,
            mirrors_deleted = replayed.deleted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery: journal replayed"
        );
        let index = layout.index_dir();
        let has_snapshots = fs::read_dir(layout.snapshots_dir())
            .map_err(SnapshotError::io("read dir", layout.snapshots_dir()))?
            .next()
            .is_some();
        if has_snapshots && !index.join("db").exists() {
            warn!(index = %index.display(), "index missing; rebuilding it from the snapshots' info files and manifests");
            Self::rebuild(&layout)?;
        }
        let meta = match MetaStore::open(&index) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "index cannot be opened; rebuilding it from the snapshots' info files and manifests");
                Self::rebuild(&layout)?;
                MetaStore::open(&index)?
            }
        };
        let started = std::time::Instant::now();
        let fixed = cas::admin::reconcile(&layout, &meta, &stop)?;
        // index and mirrors agree now: retire the replayed records with both durable
        log.checkpoint(&meta)?;
        log.mark_journaled()?;
        info!(
            consistent = fixed.consistent,
            rolled_forward = fixed.rolled_forward,
            removes_completed = fixed.removes_completed,
            creates_rolled_back = fixed.creates_rolled_back,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery: index reconciled with the snapshots' info files"
        );
        let mode = Self::choose_mode(&layout, requested)?;
        let features = OverlayFeatures::probe();
        info!(index_off = features.index_param, ?mode, "store mode chosen");
        let planner =
            MountPlanner::new(layout.snapshots_dir(), layout.objects_dir(), features, mode);
        let sn = CasSnapshotter {
            mode,
            store: ObjectStore::new(&layout),
            layout,
            meta,
            planner,
            writer: Mutex::new(()),
            gc_lock: RwLock::new(()),
            committing: std::sync::Mutex::new(HashSet::new()),
            applied: std::sync::Mutex::new(HashMap::new()),
            log,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        };
        let swept = sn.sweep_orphans()? + cas::gc::sweep_tmp(&sn.layout)?;
        if swept > 0 {
            info!(swept, "removed leftovers of interrupted operations");
        }
        sn.metrics.recovered_in(started.elapsed());
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery done"
        );
        Ok(sn)
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The store's mode: the one it was created with, else the configured one, where
    /// `auto` means stubs when the start-up probe shows the kernel can serve them.
    fn choose_mode(layout: &Layout, requested: MountMode) -> Result<StoreMode, SnapshotError> {
        let stored = layout.mode()?;
        let mismatch = |stored: StoreMode| SnapshotError::ModeMismatch { stored, requested };
        let probe = || crate::probe::probe_data_only_lowers(&layout.tmp_dir());
        let mode = match (stored, requested) {
            (Some(StoreMode::Stubs), MountMode::Materialised) => {
                return Err(mismatch(StoreMode::Stubs))
            }
            (Some(StoreMode::Materialised), MountMode::DataOnly) => {
                return Err(mismatch(StoreMode::Materialised))
            }
            (Some(StoreMode::Stubs), _) | (None, MountMode::DataOnly) => {
                probe()?;
                StoreMode::Stubs
            }
            (Some(StoreMode::Materialised), _) | (None, MountMode::Materialised) => {
                StoreMode::Materialised
            }
            (None, MountMode::Auto) => match probe() {
                Ok(()) => StoreMode::Stubs,
                Err(e) => {
                    warn!(error = %e, "overlayfs cannot serve stubs here: layers are stored materialised (dedup only through hardlinks and reflinks)");
                    StoreMode::Materialised
                }
            },
        };
        if stored.is_none() {
            layout.set_mode(mode)?;
        }
        if mode == StoreMode::Stubs {
            info!("overlayfs probed: stubs are served from the CAS as a data-only lower layer");
        }
        Ok(mode)
    }

    fn rebuild(layout: &Layout) -> Result<(), SnapshotError> {
        let started = std::time::Instant::now();
        let stats = cas::admin::rebuild_index(layout)?;
        info!(
            snapshots = stats.snapshots,
            referenced_objects = stats.referenced_objects,
            skipped_dirs = stats.skipped_dirs,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "index rebuilt"
        );
        Ok(())
    }

    /// Removes every directory under `snapshots/` that no record names. Returns how many.
    fn sweep_orphans(&self) -> Result<u64, SnapshotError> {
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
            let name = entry.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                continue;
            }
            remove_tree(&entry.path())?;
            swept += 1;
        }
        Ok(swept)
    }

    /// Makes sure the flattened tree a plan relies on exists.
    async fn ensure_flat(&self, plan: &Plan, parents: &[u64]) -> Result<(), SnapshotError> {
        let Some(top) = plan.flat else {
            return Ok(());
        };
        let out = self.planner.flat_dir(top);
        if out.is_dir() {
            return Ok(());
        }
        let _w = self.writer.lock().await;
        if out.is_dir() {
            return Ok(());
        }
        // The parent's own flat tree, when it has one, already merges the rest of the
        // chain: merging one layer over it keeps each flatten proportional to the tree.
        let layers: Vec<_> = match parents.get(1).map(|p| self.planner.flat_dir(*p)) {
            Some(below) if below.is_dir() => vec![self.planner.fs_dir(top), below],
            _ => parents.iter().map(|p| self.planner.fs_dir(*p)).collect(),
        };
        let tmp = self.planner.snapshot_dir(top).join("flat.tmp");
        let started = std::time::Instant::now();
        blocking(move || {
            remove_tree(&tmp)?;
            Ok(cas::flatten::flatten(&layers, &tmp, &out)?)
        })
        .await?;
        info!(
            snapshot = top,
            layers = parents.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flattened a deep chain"
        );
        Ok(())
    }

    async fn mounts_for(
        &self,
        kind: Kind,
        id: u64,
        parents: &[u64],
    ) -> Result<Vec<Mount>, SnapshotError> {
        let plan = self.planner.plan(kind, id, parents);
        self.ensure_flat(&plan, parents).await?;
        Ok(plan.mounts)
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        check_key("key", &key)?;
        let (id, parent_ids) = {
            let _w = self.writer.lock().await;
            if self.meta.get(&key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key));
            }
            let parent = (!parent.is_empty()).then_some(parent);
            let mut parent_ids = Vec::new();
            let mut owner = None;
            if let Some(p) = &parent {
                let prec = self.meta.require(p)?;
                if prec.kind != Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition {
                        key: p.clone(),
                        reason: "parent is not committed",
                    });
                }
                parent_ids.push(prec.id);
                parent_ids.extend(self.meta.parent_ids(&prec)?);
                let pfs = self.planner.fs_dir(prec.id);
                let md = fs::metadata(&pfs).map_err(SnapshotError::io("stat", &pfs))?;
                owner = Some((md.uid(), md.gid()));
            }
            let id = self.meta.next_id()?;
            let tmp = self
                .layout
                .snapshots_dir()
                .join(format!("{NEW_PREFIX}{id}"));
            let dir = self.layout.snapshot_dir(id);
            let build = || -> Result<(), SnapshotError> {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&tmp)
                    .map_err(SnapshotError::io("mkdir", &tmp))?;
                let fsdir = tmp.join("fs");
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&fsdir)
                    .map_err(SnapshotError::io("mkdir", &fsdir))?;
                if let Some((uid, gid)) = owner {
                    nix::unistd::chown(&fsdir, Some(uid.into()), Some(gid.into()))
                        .map_err(|e| SnapshotError::io("chown", &fsdir)(e.into()))?;
                }
                if kind == Kind::Active {
                    let work = tmp.join("work");
                    fs::DirBuilder::new()
                        .mode(0o711)
                        .create(&work)
                        .map_err(SnapshotError::io("mkdir", &work))?;
                }
                fs::rename(&tmp, &dir).map_err(SnapshotError::io("rename", &dir))
            };
            if let Err(e) = build() {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
            cas::crash_point!("create.after-dir");
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind,
                parent,
                labels: labels.into_iter().collect(),
                created: now,
                updated: now,
                usage: DiskUsage::default(),
                logical_bytes: 0,
            };
            let stored = async {
                let flush = self.record_put(id, &key, &rec)?;
                cas::crash_point!("create.after-info");
                self.meta.insert(&key, &rec)?;
                if flush {
                    self.meta.flush().await?;
                }
                Ok::<(), SnapshotError>(())
            }
            .await;
            if let Err(e) = stored {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
            debug!(%key, id, ?kind, "created");
            (id, parent_ids)
        };
        self.mounts_for(kind, id, &parent_ids).await
    }

    /// Makes every journaled change durable in the index and mirrors and retires the
    /// records (at shutdown; also done every few hundred records).
    pub async fn checkpoint(&self) -> Result<(), SnapshotError> {
        let _w = self.writer.lock().await;
        self.log.checkpoint(&self.meta)?;
        Ok(())
    }

    /// Journals `change`, which must fit in a journal block (a Delete or a Dirty does).
    fn record(&self, change: &Change) -> Result<(), SnapshotError> {
        Ok(self.log.record_small(change, &self.meta)?)
    }

    /// Makes snapshot `id`'s new record durable ahead of the index: a journal record
    /// and the `info` mirror written lazily; or, for a record too large for a journal
    /// block, a Dirty record and a durable mirror, in which case it returns `true` and
    /// the caller must flush the index after changing it.
    fn record_put(&self, id: u64, key: &str, rec: &Record) -> Result<bool, SnapshotError> {
        let dir = self.layout.snapshot_dir(id);
        let change = Change::Put {
            id,
            key: key.to_string(),
            record: rec.clone(),
        };
        if self.log.record(&change, &self.meta)? {
            cas::journal::write_info_lazy(&dir, key, rec)?;
            Ok(false)
        } else {
            self.record(&Change::Dirty { id })?;
            cas::index::write_info(&dir, key, rec)?;
            Ok(true)
        }
    }

    /// The last step of a clean shutdown: a checkpoint and the clean-stop marker, so the
    /// next start need not read every snapshot's `info` mirror. Call last, once the
    /// server stopped answering: a change after it would not be seen at the next start.
    pub async fn shutdown(&self) -> Result<(), SnapshotError> {
        let _w = self.writer.lock().await;
        self.log.mark_clean_stop(&self.meta)?;
        Ok(())
    }

    /// Collects objects no committed snapshot references. Waits for running ingests and
    /// holds new ones off while it runs.
    pub async fn gc(&self) -> Result<GcStats, SnapshotError> {
        let _g = self.gc_lock.write().await;
        let _w = self.writer.lock().await;
        let started = std::time::Instant::now();
        let (layout, meta) = (self.layout.clone(), self.meta.clone());
        let stats = blocking(move || Ok(cas::gc::collect(&layout, &meta)?)).await?;
        info!(
            removed = stats.removed,
            freed_bytes = stats.freed_bytes,
            scanned = stats.scanned,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "garbage collected"
        );
        self.metrics.collected(stats.removed, stats.freed_bytes);
        Ok(stats)
    }

    /// Store statistics (`casctl stats`).
    pub async fn stats(&self) -> Result<cas::admin::Stats, SnapshotError> {
        let (layout, meta) = (self.layout.clone(), self.meta.clone());
        let mut s = blocking(move || Ok(cas::admin::stats(&layout, &meta)?)).await?;
        s.journal = Some(self.log.backend().to_string());
        let c = self.metrics.apply_counts();
        s.ingest_paths = Some(cas::admin::IngestPaths {
            fast_path_applies: c.fast,
            fallback_applies: c.fallback,
            failed_applies: c.failed,
            commit_ingests: c.commit_ingests,
            blobs_from_content_dir: c.blobs_from_content_dir,
            blobs_from_content_api: c.blobs_from_content_api,
            io_backend: self.metrics.ring_backend().map(str::to_string),
        });
        Ok(s)
    }

    /// Consistency check (`casctl fsck`), with ingests and index changes held off so
    /// it sees one consistent state.
    pub async fn fsck(
        &self,
        verify_objects: bool,
    ) -> Result<cas::admin::FsckReport, SnapshotError> {
        let _g = self.gc_lock.write().await;
        let _w = self.writer.lock().await;
        let (layout, meta) = (self.layout.clone(), self.meta.clone());
        blocking(move || Ok(cas::admin::fsck(&layout, &meta, verify_objects)?)).await
    }

    /// The store layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stub trees an active snapshot `id` over `parents` is mounted on, topmost
    /// first: the chain's flattened tree when it has one.
    fn lower_trees(&self, id: u64, parents: &[u64]) -> Vec<std::path::PathBuf> {
        match self.planner.plan(Kind::Active, id, parents).flat {
            Some(top) => vec![self.planner.flat_dir(top)],
            None => parents.iter().map(|p| self.planner.fs_dir(*p)).collect(),
        }
    }

    /// The store's mode.
    pub fn mode(&self) -> StoreMode {
        self.mode
    }

    /// Marks `id` busy (Commit or Apply) until the guard drops; a second one is refused.
    fn busy(&self, key: &str, id: u64) -> Result<CommitGuard<'_>, SnapshotError> {
        let newly = self
            .committing
            .lock()
            .map(|mut s| s.insert(id))
            .unwrap_or(false);
        if !newly {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "a commit or apply of this snapshot is already in progress",
            });
        }
        Ok(CommitGuard {
            set: &self.committing,
            id,
        })
    }

    /// The active snapshot whose layer directory (`snapshots/<id>/fs`) is `fs_dir`:
    /// its key and record, or `None` when the directory is not one of ours.
    pub fn active_by_fs_dir(
        &self,
        fs_dir: &Path,
    ) -> Result<Option<(String, Record)>, SnapshotError> {
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
        if fs.as_os_str() != "fs" {
            return Ok(None);
        }
        let Ok(info) = cas::index::read_info(&self.layout.snapshot_dir(id)) else {
            return Ok(None);
        };
        match self.meta.get(&info.key)? {
            Some(rec) if rec.id == id && rec.kind == Kind::Active => Ok(Some((info.key, rec))),
            _ => Ok(None),
        }
    }

    /// Applies a layer blob into the active snapshot `key` in one pass (the Diff
    /// service's fast path, see `cas::unpack`). Objects are published now and kept by
    /// the snapshot's manifest until its Commit references them. On failure the layer
    /// directory is emptied and the objects this apply added are collected again.
    pub async fn apply_blob(
        &self,
        key: &str,
        blob: Box<dyn std::io::Read + Send>,
        blob_size: u64,
        blob_digest: Option<Digest>,
        limits: Limits,
        pool: &ringio::Pool,
    ) -> Result<Applied, SnapshotError> {
        let rec = self.meta.require(key)?;
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "layers can only be applied to active snapshots",
            });
        }
        let _busy = self.busy(key, rec.id)?;
        let dir = self.layout.snapshot_dir(rec.id);
        if dir.join(MANIFEST).exists() {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "a layer was already applied to this snapshot",
            });
        }
        let parents = self.meta.parent_ids(&rec)?;
        let lowers = self.lower_trees(rec.id, &parents);
        let store = self.store.clone();
        let tmp = self.layout.tmp_dir();
        let pool = pool.clone();
        let fsdir = dir.join("fs");
        let started = std::time::Instant::now();
        let result = {
            // Shared GC lock from the first object lookup until the manifest keeps them.
            let _g = self.gc_lock.read().await;
            let fsdir = fsdir.clone();
            tokio::task::spawn_blocking(move || {
                let manifest = dir.join(MANIFEST);
                let target = cas::unpack::Target {
                    store: &store,
                    tmp_dir: &tmp,
                    fs_dir: &fsdir,
                    lowers: &lowers,
                    manifest: &manifest,
                    pool: &pool,
                };
                cas::unpack::apply_blob(blob, blob_size, blob_digest, limits, &target)
            })
            .await?
        };
        match result {
            Ok(applied) => {
                if let Ok(mut m) = self.applied.lock() {
                    m.insert(rec.id, applied.stats.clone());
                }
                self.metrics.applied(&applied);
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
                    sync_ms = applied.times.sync.as_millis() as u64,
                    "layer applied"
                );
                Ok(applied)
            }
            Err(failure) => {
                warn!(%key, id = rec.id, error = %failure.error, "layer apply failed; nothing of it is kept");
                self.metrics.apply_failed();
                let emptied = blocking(move || {
                    for e in fs::read_dir(&fsdir).map_err(SnapshotError::io("read dir", &fsdir))? {
                        let e = e.map_err(SnapshotError::io("read dir", &fsdir))?;
                        remove_tree(&e.path())?;
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = emptied {
                    warn!(%key, error = %e, "could not empty the layer after a failed apply");
                }
                if !failure.new_objects.is_empty() {
                    let _g = self.gc_lock.write().await;
                    let (layout, meta) = (self.layout.clone(), self.meta.clone());
                    let objects = failure.new_objects;
                    let stats =
                        blocking(move || Ok(cas::gc::collect_objects(&layout, &meta, &objects)?))
                            .await?;
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
    fn applied_stats(
        &self,
        id: u64,
        fsdir: &Path,
        manifest: &Path,
    ) -> Result<UnpackStats, SnapshotError> {
        if let Some(s) = self.applied.lock().ok().and_then(|mut m| m.remove(&id)) {
            return Ok(s);
        }
        let mut stats = UnpackStats::default();
        let mut inodes = HashSet::new();
        for entry in cas::manifest::read_manifest(manifest)? {
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

#[tonic::async_trait]
impl Snapshotter for CasSnapshotter {
    type Error = SnapshotError;

    #[instrument(skip(self), level = "debug")]
    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let rec = self.meta.require(&key)?;
        Ok(to_info(key, rec))
    }

    #[instrument(skip(self, info), fields(key = %info.name), level = "debug")]
    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let key = info.name;
        let _w = self.writer.lock().await;
        let mut rec = self.meta.require(&key)?;
        let new: BTreeMap<String, String> = info.labels.into_iter().collect();
        match fieldpaths.filter(|p| !p.is_empty()) {
            None => rec.labels = new,
            Some(paths) => {
                for path in paths {
                    if path == "labels" {
                        rec.labels = new.clone();
                    } else if let Some(label) = path.strip_prefix("labels.") {
                        match new.get(label) {
                            Some(v) => rec.labels.insert(label.to_string(), v.clone()),
                            None => rec.labels.remove(label),
                        };
                    } else {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "cannot update field {path:?} of snapshot {key:?}: only labels are mutable"
                        )));
                    }
                }
            }
        }
        rec.updated = SystemTime::now();
        let flush = self.record_put(rec.id, &key, &rec)?;
        self.meta.put(&key, &rec)?;
        if flush {
            self.meta.flush().await?;
        }
        Ok(to_info(key, rec))
    }

    /// Usage of a committed layer is what it added to the disk: its own tree (stubs,
    /// directories, symlinks: metadata only) plus the bytes of the objects it was first
    /// to store. Summed over all snapshots this equals the store's physical usage at
    /// the time each layer was committed, which is what image-fs accounting needs;
    /// the bytes of content shared with earlier layers are not counted again.
    #[instrument(skip(self), level = "debug")]
    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let rec = self.meta.require(&key)?;
        let usage = match rec.kind {
            Kind::Active => {
                let fsdir = self.planner.fs_dir(rec.id);
                blocking(move || disk_usage(&fsdir)).await?
            }
            _ => rec.usage,
        };
        Ok(Usage {
            size: usage.size,
            inodes: usage.inodes,
        })
    }

    #[instrument(skip(self), level = "debug")]
    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let rec = self.meta.require(&key)?;
        if rec.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "mounts are only available for active snapshots and views",
            });
        }
        let parents = self.meta.parent_ids(&rec)?;
        self.mounts_for(rec.kind, rec.id, &parents).await
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::Active, key, parent, labels).await
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, labels).await
    }

    #[instrument(skip(self, labels), level = "debug")]
    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        check_key("name", &name)?;
        let rec = self.meta.require(&key)?;
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "only active snapshots can be committed",
            });
        }
        if self.meta.get(&name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(name));
        }
        // One ingest per snapshot: a second Commit of the same key must not walk the tree
        // the first one is rewriting.
        let _c = self.busy(&key, rec.id)?;
        // Shared GC lock from before the first object lookup until the references land.
        let _g = self.gc_lock.read().await;
        let dir = self.layout.snapshot_dir(rec.id);
        let parents = self.meta.parent_ids(&rec)?;
        let lowers = self.lower_trees(rec.id, &parents);
        let store = self.store.clone();
        let tmp = self.layout.tmp_dir();
        let mode = self.mode;
        let started = std::time::Instant::now();
        // A layer the Diff service applied is already stubs + objects + manifest.
        let applied = dir.join(MANIFEST).exists() && mode == StoreMode::Stubs;
        let pre = if applied {
            Some(self.applied_stats(rec.id, &dir.join("fs"), &dir.join(MANIFEST))?)
        } else {
            None
        };
        let (stats, usage, objects) = blocking(move || {
            let fsdir = dir.join("fs");
            let manifest = dir.join(MANIFEST);
            let stats = match pre {
                Some(s) => cas::ingest::IngestStats {
                    files: s.files,
                    logical_bytes: s.logical_bytes,
                    new_objects: s.new_objects,
                    new_bytes: s.new_bytes,
                    dropped_overlay_xattrs: s.skipped_xattrs,
                },
                None => cas::ingest::ingest_layer(&store, &tmp, &fsdir, &lowers, &manifest, mode)?,
            };
            let mut usage = disk_usage(&fsdir)?;
            if mode == StoreMode::Stubs {
                // materialised layers already hold their new objects' inodes
                usage.size += stats.new_bytes as i64;
                usage.inodes += stats.new_objects as i64;
            }
            let objects = manifest_objects(&manifest)?;
            Ok((stats, usage, objects))
        })
        .await?;
        cas::crash_point!("commit.after-ingest");

        let _w = self.writer.lock().await;
        let mut rec = self.meta.require(&key)?;
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key,
                reason: "only active snapshots can be committed",
            });
        }
        if self.meta.get(&name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(name));
        }
        let now = SystemTime::now();
        rec.kind = Kind::Committed;
        rec.labels = labels.into_iter().collect();
        rec.created = now;
        rec.updated = now;
        rec.usage = usage;
        rec.logical_bytes = stats.logical_bytes;
        // The Commit is durable once its record is: one journal write. Mirror and index
        // follow without flushes; a checkpoint or the replay at start makes them durable.
        let change = Change::Put {
            id: rec.id,
            key: name.clone(),
            record: rec.clone(),
        };
        let sdir = self.layout.snapshot_dir(rec.id);
        if self.log.record(&change, &self.meta)? {
            cas::crash_point!("commit.after-record");
            cas::journal::write_info_lazy(&sdir, &name, &rec)?;
            cas::crash_point!("commit.after-info");
            self.meta.rename(&key, &name, &rec, &objects)?;
        } else {
            self.record(&Change::Dirty { id: rec.id })?;
            cas::index::write_info(&sdir, &name, &rec)?;
            cas::crash_point!("commit.after-info");
            self.meta.rename(&key, &name, &rec, &objects)?;
            self.meta.flush().await?;
        }
        cas::crash_point!("commit.after-index");
        if !applied {
            self.metrics.ingested(stats.logical_bytes, stats.new_bytes);
        }
        let work = self.planner.work_dir(rec.id);
        let _ = fs::remove_dir_all(&work);
        info!(
            %key, %name, id = rec.id,
            files = stats.files,
            logical_bytes = stats.logical_bytes,
            new_objects = stats.new_objects,
            new_bytes = stats.new_bytes,
            dropped_overlay_xattrs = stats.dropped_overlay_xattrs,
            applied,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "committed"
        );
        Ok(())
    }

    #[instrument(skip(self), level = "debug")]
    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let mut orphaned = Vec::new();
        let dir = {
            let _w = self.writer.lock().await;
            let rec = self.meta.require(&key)?;
            if self.meta.has_children(&key)? {
                return Err(SnapshotError::FailedPrecondition {
                    key,
                    reason: "cannot remove a snapshot that has children",
                });
            }
            let dir = self.layout.snapshot_dir(rec.id);
            let manifest = dir.join(MANIFEST);
            let objects = if rec.kind == Kind::Committed {
                blocking(move || manifest_objects(&manifest)).await?
            } else if rec.kind == Kind::Active && manifest.exists() {
                // applied but never committed (a failed pull): its objects are garbage
                // unless something else keeps them; collected below
                orphaned = blocking(move || manifest_objects(&manifest)).await?;
                Vec::new()
            } else {
                Vec::new()
            };
            if let Ok(mut m) = self.applied.lock() {
                m.remove(&rec.id);
            }
            // The journal record makes the Remove durable; the mirror goes next, before
            // the index: a rebuild after a crash here must not revive it.
            self.record(&Change::Delete { id: rec.id })?;
            let info = dir.join(cas::index::INFO_FILE);
            match fs::remove_file(&info) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SnapshotError::io("remove", &info)(e))
                }
                _ => {}
            }
            cas::crash_point!("remove.after-info");
            self.meta.delete(&key, &rec, &objects)?;
            // Durable before the directory (and its manifest, which the references
            // were counted from) leaves `snapshots/`.
            self.meta.flush().await?;
            cas::crash_point!("remove.after-index");
            // Out of `snapshots/` while still under the lock, so no reader (fsck, the
            // orphan sweep) sees a directory without a record; deleted outside it. A
            // crash leaves it in `cas/tmp`, which is swept at start and by GC.
            let trash = self.layout.tmp_dir().join(format!("removed-{}", rec.id));
            match fs::rename(&dir, &trash) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SnapshotError::io("rename", &dir)(e))
                }
                _ => {}
            }
            cas::crash_point!("remove.after-rename");
            trash
        };
        blocking(move || remove_tree(&dir)).await?;
        if !orphaned.is_empty() {
            let _g = self.gc_lock.write().await;
            let (layout, meta) = (self.layout.clone(), self.meta.clone());
            let stats =
                blocking(move || Ok(cas::gc::collect_objects(&layout, &meta, &orphaned)?)).await?;
            debug!(%key, removed = stats.removed, "objects of an uncommitted applied layer collected");
        }
        debug!(%key, "removed");
        Ok(())
    }

    /// containerd calls Cleanup after its own garbage collection removed snapshots:
    /// sweep directories without records, then collect objects nothing references.
    async fn clear(&self) -> Result<(), Self::Error> {
        {
            let _w = self.writer.lock().await;
            let swept = self.sweep_orphans()?;
            if swept > 0 {
                info!(
                    swept,
                    "cleanup removed snapshot directories without metadata"
                );
            }
        }
        self.gc().await?;
        // A quiet moment after containerd's own GC: retire the journal's records too.
        self.checkpoint().await?;
        Ok(())
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

    #[instrument(skip(self), level = "debug")]
    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let filter = FilterSet::parse(&filters)
            .map_err(|e| SnapshotError::InvalidArgument(e.to_string()))?;
        let mut out = Vec::new();
        for (key, rec) in self.meta.all()? {
            let matched = filter.matches(|path| match path.first().map(String::as_str) {
                Some("kind") => Some(rec.kind.as_str().to_string()),
                Some("name") => Some(key.clone()),
                Some("parent") => Some(rec.parent.clone().unwrap_or_default()),
                Some("labels") if path.len() > 1 => rec.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            });
            if matched {
                out.push(Ok(to_info(key, rec)));
            }
        }
        Ok(futures::stream::iter(out))
    }
}

/// Shared handle served by tonic.
pub type Shared = Arc<CasSnapshotter>;
