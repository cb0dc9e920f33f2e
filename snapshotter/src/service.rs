//! The Snapshots service: containerd's snapshotter contract on top of [`MetaStore`] and
//! the store's directories.
//!
//! Ordering rules, which are what keeps a `kill -9` at any instant harmless:
//!
//! * **Create** (Prepare/View): build `snapshots/new-<id>` (`fs`, and `work` for active
//!   snapshots), rename it to `snapshots/<id>`, then insert the record and flush the
//!   index, then answer. A crash before the record leaves an orphan directory, which
//!   start-up and Cleanup sweep.
//! * **Commit**: measure usage, then rewrite the record (key → name) in one batch, flush,
//!   answer. The directory does not move.
//! * **Remove**: delete the record (refused while children exist), flush, then delete the
//!   directory. A crash in between leaves an orphan directory, swept later.
//!
//! Mutations are serialised by one writer lock; reads (Stat, Mounts, Walk) take no lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use cas::Layout;
use containerd_snapshots::{api::types::Mount, Info, Snapshotter, Usage};
use tokio::sync::Mutex;
use tracing::{debug, info, instrument, warn};

use crate::error::SnapshotError;
use crate::filter::FilterSet;
use crate::meta::{DiskUsage, Kind, MetaStore, Record};
use crate::mounts::{MountPlanner, OverlayFeatures};

/// Prefix of directories being built by Prepare/View, before their rename.
const NEW_PREFIX: &str = "new-";

/// The snapshotter.
pub struct CasSnapshotter {
    layout: Layout,
    meta: MetaStore,
    planner: MountPlanner,
    writer: Mutex<()>,
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

impl CasSnapshotter {
    /// Opens the store at `layout`, sweeping directories no record points to.
    pub fn open(layout: Layout) -> Result<CasSnapshotter, SnapshotError> {
        let meta = MetaStore::open(&layout.index_dir())?;
        let features = OverlayFeatures::probe();
        info!(index_off = features.index_param, "overlay features probed");
        let planner = MountPlanner::new(layout.snapshots_dir(), features);
        let sn = CasSnapshotter {
            layout,
            meta,
            planner,
            writer: Mutex::new(()),
        };
        let swept = sn.sweep_orphans()?;
        if swept > 0 {
            info!(swept, "removed snapshot directories without metadata");
        }
        Ok(sn)
    }

    /// Removes every directory under `snapshots/` that no record names. Returns how many.
    fn sweep_orphans(&self) -> Result<usize, SnapshotError> {
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

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        check_key("key", &key)?;
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
        if !self.planner.lowerdir_fits_after_compaction(&parent_ids) {
            warn!(%key, depth = parent_ids.len(), "lowerdir may exceed one page even after compaction");
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
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind,
            parent,
            labels: labels.into_iter().collect(),
            created: now,
            updated: now,
            usage: DiskUsage::default(),
        };
        let stored = self.meta.insert(&key, &rec);
        let stored = match stored {
            Ok(()) => self.meta.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        debug!(%key, id, ?kind, "created");
        Ok(self.planner.plan(kind, id, &parent_ids))
    }
}

/// Removes a directory tree; a tree that is already gone is fine.
fn remove_tree(path: &Path) -> Result<(), SnapshotError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SnapshotError::io("remove", path)(e)),
        _ => Ok(()),
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
        self.meta.put(&key, &rec)?;
        self.meta.flush().await?;
        Ok(to_info(key, rec))
    }

    #[instrument(skip(self), level = "debug")]
    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let rec = self.meta.require(&key)?;
        let usage = match rec.kind {
            Kind::Active => {
                let fsdir = self.planner.fs_dir(rec.id);
                tokio::task::spawn_blocking(move || disk_usage(&fsdir)).await??
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
        Ok(self.planner.plan(rec.kind, rec.id, &parents))
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
        let fsdir = self.planner.fs_dir(rec.id);
        let usage = tokio::task::spawn_blocking(move || disk_usage(&fsdir)).await??;

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
        self.meta.rename(&key, &name, &rec)?;
        self.meta.flush().await?;
        info!(%key, %name, id = rec.id, size = usage.size, inodes = usage.inodes, "committed");
        Ok(())
    }

    #[instrument(skip(self), level = "debug")]
    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let dir: PathBuf = {
            let _w = self.writer.lock().await;
            let rec = self.meta.require(&key)?;
            if self.meta.has_children(&key)? {
                return Err(SnapshotError::FailedPrecondition {
                    key,
                    reason: "cannot remove a snapshot that has children",
                });
            }
            self.meta.delete(&key, &rec)?;
            self.meta.flush().await?;
            self.layout.snapshot_dir(rec.id)
        };
        tokio::task::spawn_blocking(move || remove_tree(&dir)).await??;
        debug!(%key, "removed");
        Ok(())
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        let _w = self.writer.lock().await;
        let swept = self.sweep_orphans()?;
        if swept > 0 {
            info!(
                swept,
                "cleanup removed snapshot directories without metadata"
            );
        }
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
