//! Store-wide operations behind `casctl`: statistics, consistency checks, index rebuild.
//!
//! Each takes the layout and (except the rebuild) the open index, so the daemon can run
//! them under its own locks while it serves, and `casctl` can run them directly when no
//! daemon holds the store.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::CasError;
use crate::gc::{list_aliases, list_objects};
use crate::index::{read_info, Kind, MetaStore, INFO_FILE};
use crate::journal::Stop;
use crate::layout::{remove_tree, Layout};
use crate::manifest::read_manifest;
use crate::stub::{stub_target, StubTarget};

/// Name of a committed layer's manifest inside `snapshots/<id>/`.
pub const MANIFEST_FILE: &str = "manifest";

/// What the store holds, and what deduplication saves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Snapshots of every kind.
    pub snapshots: u64,
    /// Committed layers.
    pub committed: u64,
    /// Objects in `cas/objects`.
    pub objects: u64,
    /// Bytes of those objects: what the store really keeps for file contents.
    pub physical_bytes: u64,
    /// Bytes of every committed layer's regular files, as a snapshotter without
    /// deduplication would store them.
    pub logical_bytes: u64,
    /// `logical_bytes - physical_bytes`.
    pub saved_bytes: i64,
    /// `saved_bytes / logical_bytes`, in percent (0 for an empty store).
    pub savings_percent: f64,
    /// Objects that no committed snapshot references (collected by the next GC).
    pub unreferenced_objects: u64,
    /// Their bytes.
    pub unreferenced_bytes: u64,
    /// How commit records are made durable (filled in by the running daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    /// How layers came in since the daemon started (filled in by the running daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_paths: Option<IngestPaths>,
}

/// How layers came in since the daemon started: the Diff service's one-pass applies, or
/// containerd's applier followed by an ingest at Commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IngestPaths {
    /// Layers applied by the Diff service in one pass.
    pub fast_path_applies: u64,
    /// Applies handed back to containerd's applier (`Unimplemented`).
    pub fallback_applies: u64,
    /// Applies that failed.
    pub failed_applies: u64,
    /// Layers written by containerd's applier and ingested at Commit.
    pub commit_ingests: u64,
    /// Blobs the Diff service read from containerd's content directory.
    #[serde(default)]
    pub blobs_from_content_dir: u64,
    /// Blobs it streamed through containerd's Content API (the directory not readable).
    #[serde(default)]
    pub blobs_from_content_api: u64,
    /// The I/O workers' backend (`io_uring` or `threads`).
    pub io_backend: Option<String>,
}

/// Computes [`Stats`].
pub fn stats(layout: &Layout, meta: &MetaStore) -> Result<Stats, CasError> {
    let mut s = Stats::default();
    for (_, rec) in meta.all()? {
        s.snapshots += 1;
        if rec.kind == Kind::Committed {
            s.committed += 1;
            s.logical_bytes += rec.logical_bytes;
        }
    }
    for (digest, path) in list_objects(layout)? {
        let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
        s.objects += 1;
        s.physical_bytes += size;
        let referenced = match digest {
            Some(d) => meta.ref_count(&d)? > 0,
            None => false,
        };
        if !referenced {
            s.unreferenced_objects += 1;
            s.unreferenced_bytes += size;
        }
    }
    s.saved_bytes = s.logical_bytes as i64 - s.physical_bytes as i64;
    if s.logical_bytes > 0 {
        s.savings_percent = s.saved_bytes as f64 * 100.0 / s.logical_bytes as f64;
    }
    Ok(s)
}

/// One inconsistency found by [`fsck`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// A file in `cas/objects` whose name is not a digest.
    StrayObjectFile {
        /// The file.
        path: PathBuf,
    },
    /// An object whose bytes do not hash to its name.
    ObjectCorrupt {
        /// Its name.
        digest: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// A manifest names an object that is not in the store.
    ObjectMissing {
        /// The object.
        digest: String,
        /// The snapshot whose manifest names it.
        snapshot: String,
    },
    /// A committed snapshot has no readable manifest.
    ManifestUnreadable {
        /// The snapshot.
        snapshot: String,
        /// Why.
        error: String,
    },
    /// A manifest entry and the stub at its path disagree.
    StubMismatch {
        /// The snapshot.
        snapshot: String,
        /// The path inside the layer.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// A record names a directory that does not exist.
    SnapshotDirMissing {
        /// The snapshot.
        snapshot: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A record and its `info` mirror disagree (or the mirror is missing).
    InfoMismatch {
        /// The snapshot.
        snapshot: String,
        /// What disagrees.
        reason: String,
    },
    /// An alias that is not a second name of its object (left by a crash; GC removes
    /// it).
    StrayAlias {
        /// The alias.
        path: PathBuf,
    },
    /// A directory under `snapshots/` that no record names.
    OrphanSnapshotDir {
        /// The directory.
        dir: PathBuf,
    },
    /// The index's reference count for an object differs from the manifests.
    RefcountMismatch {
        /// The object.
        digest: String,
        /// What the index says.
        index: u64,
        /// How many committed manifests name it.
        manifests: u64,
    },
}

/// The result of [`fsck`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FsckReport {
    /// Objects looked at.
    pub objects: u64,
    /// Objects whose bytes were hashed (`verify_objects`).
    pub objects_verified: u64,
    /// Short second names of objects ([`crate::Digest::alias`]) looked at.
    #[serde(default)]
    pub aliases: u64,
    /// Snapshots looked at.
    pub snapshots: u64,
    /// Manifest entries checked against their stubs.
    pub files: u64,
    /// Objects no snapshot references (not an inconsistency: garbage for the next GC).
    pub unreferenced_objects: u64,
    /// Every inconsistency found.
    pub problems: Vec<Problem>,
}

/// Checks objects, stubs, manifests, mirrors and the index against each other.
/// With `verify_objects`, every object's bytes are hashed too.
pub fn fsck(
    layout: &Layout,
    meta: &MetaStore,
    verify_objects: bool,
) -> Result<FsckReport, CasError> {
    let mut r = FsckReport::default();
    let mut present = std::collections::HashSet::new();
    for (digest, path) in list_objects(layout)? {
        r.objects += 1;
        let Some(d) = digest else {
            r.problems.push(Problem::StrayObjectFile { path });
            continue;
        };
        present.insert(d);
        if verify_objects {
            let f = fs::File::open(&path).map_err(CasError::io("open", &path))?;
            let (actual, _) = Digest::of_reader(f).map_err(CasError::io("read", &path))?;
            r.objects_verified += 1;
            if actual != d {
                r.problems.push(Problem::ObjectCorrupt {
                    digest: d.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
    }

    // Aliases: each must be a second name of the object whose alias it is.
    let objects = crate::objects::ObjectStore::new(layout);
    let mut by_alias: HashMap<String, Vec<Digest>> = HashMap::new();
    for d in &present {
        by_alias.entry(d.alias()).or_default().push(*d);
    }
    for (alias, path) in list_aliases(layout)? {
        r.aliases += 1;
        let target = StubTarget::Alias(alias.clone());
        let mut owned = false;
        for d in by_alias.get(&alias).into_iter().flatten() {
            owned |= objects.target_is(&target, d)?;
        }
        if !owned {
            r.problems.push(Problem::StrayAlias { path });
        }
    }

    let stubs = layout.mode()? != Some(crate::layout::StoreMode::Materialised);
    let mut counted: HashMap<Digest, u64> = HashMap::new();
    let mut live_dirs = std::collections::HashSet::new();
    for (key, rec) in meta.all()? {
        r.snapshots += 1;
        let dir = layout.snapshot_dir(rec.id);
        live_dirs.insert(rec.id.to_string());
        if !dir.is_dir() {
            r.problems
                .push(Problem::SnapshotDirMissing { snapshot: key, dir });
            continue;
        }
        match read_info(&dir) {
            Ok(info) if info.key == key && info.record == rec => {}
            Ok(info) if info.key != key => r.problems.push(Problem::InfoMismatch {
                snapshot: key.clone(),
                reason: format!("info names key {:?}", info.key),
            }),
            Ok(_) => r.problems.push(Problem::InfoMismatch {
                snapshot: key.clone(),
                reason: "info record differs from the index".into(),
            }),
            Err(e) => r.problems.push(Problem::InfoMismatch {
                snapshot: key.clone(),
                reason: e.to_string(),
            }),
        }
        if rec.kind != Kind::Committed {
            continue;
        }
        let entries = match read_manifest(&dir.join(MANIFEST_FILE)) {
            Ok(e) => e,
            Err(e) => {
                r.problems.push(Problem::ManifestUnreadable {
                    snapshot: key,
                    error: e.to_string(),
                });
                continue;
            }
        };
        let mut mine = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    r.problems.push(Problem::ManifestUnreadable {
                        snapshot: key.clone(),
                        error: e.to_string(),
                    });
                    break;
                }
            };
            r.files += 1;
            mine.insert(entry.digest);
            if !present.contains(&entry.digest) {
                r.problems.push(Problem::ObjectMissing {
                    digest: entry.digest.to_string(),
                    snapshot: key.clone(),
                });
            }
            let stub = dir.join("fs").join(&entry.path);
            let reason = match fs::symlink_metadata(&stub) {
                Err(e) => Some(format!("stub unreadable: {e}")),
                Ok(md) if !md.is_file() => Some("not a regular file".to_string()),
                Ok(md) if md.len() != entry.size => Some(format!(
                    "stub size {} but manifest says {}",
                    md.len(),
                    entry.size
                )),
                Ok(_) if !stubs => None,
                Ok(_) => match stub_target(&stub)? {
                    Some(t) if objects.target_is(&t, &entry.digest)? => None,
                    Some(t) => Some(format!("stub points at {t:?}")),
                    None => Some("not a stub (no metacopy/redirect)".to_string()),
                },
            };
            if let Some(reason) = reason {
                r.problems.push(Problem::StubMismatch {
                    snapshot: key.clone(),
                    path: entry.path,
                    reason,
                });
            }
        }
        for d in mine {
            *counted.entry(d).or_default() += 1;
        }
    }

    let mut indexed: BTreeMap<Digest, u64> = meta.refs()?.into_iter().collect();
    for (d, n) in &counted {
        let i = indexed.remove(d).unwrap_or(0);
        if i != *n {
            r.problems.push(Problem::RefcountMismatch {
                digest: d.to_string(),
                index: i,
                manifests: *n,
            });
        }
    }
    for (d, i) in indexed {
        r.problems.push(Problem::RefcountMismatch {
            digest: d.to_string(),
            index: i,
            manifests: 0,
        });
    }
    r.unreferenced_objects = present.iter().filter(|d| !counted.contains_key(d)).count() as u64;

    let sdir = layout.snapshots_dir();
    for e in fs::read_dir(&sdir).map_err(CasError::io("read dir", &sdir))? {
        let e = e.map_err(CasError::io("read dir", &sdir))?;
        if !live_dirs.contains(e.file_name().to_string_lossy().as_ref()) {
            r.problems
                .push(Problem::OrphanSnapshotDir { dir: e.path() });
        }
    }
    r.problems.sort();
    Ok(r)
}

/// What a rebuild found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RebuildStats {
    /// Snapshot records restored from `info` files.
    pub snapshots: u64,
    /// Objects with references restored from manifests.
    pub referenced_objects: u64,
    /// Directories under `snapshots/` without a readable `info` (left for the sweep).
    pub skipped_dirs: u64,
}

/// Rebuilds `index/` from the `info` mirrors and manifests. Nothing may hold the index
/// open. The old index is kept as `index.old` until the new one is complete.
pub fn rebuild_index(layout: &Layout) -> Result<RebuildStats, CasError> {
    let index = layout.index_dir();
    let fresh = layout.root().join("index.new");
    let old = layout.root().join("index.old");
    for d in [&fresh, &old] {
        remove_tree(d)?;
    }
    let mut stats = RebuildStats::default();
    {
        let meta = MetaStore::open(&fresh)?;
        let mut counts: HashMap<Digest, u64> = HashMap::new();
        let mut max_id = 0;
        let sdir = layout.snapshots_dir();
        let mut infos = Vec::new();
        for e in fs::read_dir(&sdir).map_err(CasError::io("read dir", &sdir))? {
            let dir = e.map_err(CasError::io("read dir", &sdir))?.path();
            if !dir.join(INFO_FILE).is_file() {
                stats.skipped_dirs += 1;
                continue;
            }
            let info = read_info(&dir)?;
            max_id = max_id.max(info.record.id);
            if info.record.kind == Kind::Committed {
                let mut mine = std::collections::BTreeSet::new();
                for entry in read_manifest(&dir.join(MANIFEST_FILE))? {
                    mine.insert(entry?.digest);
                }
                for d in mine {
                    *counts.entry(d).or_default() += 1;
                }
            }
            infos.push(info);
        }
        for info in &infos {
            meta.insert(&info.key, &info.record)?;
            stats.snapshots += 1;
        }
        meta.set_refs(&counts)?;
        stats.referenced_objects = counts.len() as u64;
        meta.reserve_ids_through(max_id)?;
        meta.flush_blocking()?;
    }
    if index.exists() {
        fs::rename(&index, &old).map_err(CasError::io("rename", &index))?;
    }
    fs::rename(&fresh, &index).map_err(CasError::io("rename", &fresh))?;
    ringio::durable::fsync_dir(layout.root())?;
    let _ = fs::remove_dir_all(&old);
    Ok(stats)
}

/// The admin socket of a running daemon, under the store root.
pub fn admin_socket(layout: &Layout) -> PathBuf {
    layout.root().join(ADMIN_SOCKET)
}

/// File name of the daemon's admin socket in the store root.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// A request on the admin socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AdminRequest {
    /// [`stats`].
    Stats,
    /// [`fsck`].
    Fsck {
        /// Hash every object.
        verify_objects: bool,
    },
    /// Garbage collection.
    Gc,
}

/// The answer to an [`AdminRequest`] (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminResponse {
    /// Statistics.
    Stats(Stats),
    /// An fsck report.
    Fsck(FsckReport),
    /// What a collection did.
    Gc(crate::gc::GcStats),
    /// The request failed.
    Error(String),
}

/// Whether `path` looks like a store root (has the layout marker).
pub fn is_store(path: &Path) -> bool {
    path.join("layout").is_file()
}

/// What [`reconcile`] repaired.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReconcileStats {
    /// Snapshots whose record matched their `info` mirror.
    pub consistent: u64,
    /// Index records brought forward to their mirror (a Commit or label Update whose
    /// mirror was written when the process died).
    pub rolled_forward: u64,
    /// Records whose mirror was already deleted (a Remove that was under way): removed.
    pub removes_completed: u64,
    /// Directories whose record never reached the index (a Prepare or View that was never
    /// answered): removed.
    pub creates_rolled_back: u64,
}

/// Brings the index in line with the `info` mirrors after an unclean stop.
///
/// Every change writes the mirror before the index (made durable by its journal record
/// or by itself), and deletes it first on Remove, so the mirror is the newer truth
/// wherever the two disagree: records are rolled
/// forward to it, records without a mirror are removed, and directories whose record never
/// landed are deleted (containerd was never answered for them). Reference counts follow
/// the manifests of the records that change. Nothing may mutate the index meanwhile.
///
/// Which snapshots are compared depends on how the daemon stopped ([`Stop`]): after a
/// clean stop records and mirrors agreed, so only the directory names are compared with
/// the records (any difference, such as a directory added or removed by hand, falls
/// back to comparing every mirror); after a crash, the snapshots the replayed journal
/// records name and those whose directory and record do not both exist; otherwise all.
pub fn reconcile(
    layout: &Layout,
    meta: &MetaStore,
    stop: &Stop,
) -> Result<ReconcileStats, CasError> {
    let mut stats = ReconcileStats::default();
    let mut by_id: HashMap<u64, (String, crate::index::Record)> = meta
        .all()?
        .into_iter()
        .map(|(k, r)| (r.id, (k, r)))
        .collect();
    let sdir = layout.snapshots_dir();
    let mut dirs = Vec::new();
    for e in fs::read_dir(&sdir).map_err(CasError::io("read dir", &sdir))? {
        let dir = e.map_err(CasError::io("read dir", &sdir))?.path();
        if let Some(id) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
        {
            dirs.push((id, dir)); // others are temporary directories: swept by the caller
        }
    }
    let names_agree =
        || dirs.len() == by_id.len() && dirs.iter().all(|(id, _)| by_id.contains_key(id));
    match stop {
        Stop::Clean if names_agree() => {
            stats.consistent = dirs.len() as u64;
            return Ok(stats);
        }
        Stop::Clean => tracing::warn!(
            records = by_id.len(),
            directories = dirs.len(),
            "snapshot directories changed while the daemon was stopped: checking every info file"
        ),
        Stop::Crash { changed } => {
            // the others agreed at the last checkpoint and have not changed since
            dirs.retain(|(id, _)| {
                let compare = changed.contains(id) || !by_id.contains_key(id);
                if !compare {
                    by_id.remove(id);
                    stats.consistent += 1;
                }
                compare
            });
        }
        Stop::Unknown => {}
    }
    let objects_of = |dir: &Path, rec: &crate::index::Record| -> Result<Vec<Digest>, CasError> {
        if rec.kind != Kind::Committed {
            return Ok(Vec::new());
        }
        let mut set = std::collections::BTreeSet::new();
        for e in read_manifest(&dir.join(MANIFEST_FILE))? {
            set.insert(e?.digest);
        }
        Ok(set.into_iter().collect())
    };
    for ((id, dir), info) in dirs.iter().zip(read_infos(&dirs)) {
        let (id, dir) = (*id, dir.as_path());
        match (by_id.remove(&id), info?) {
            (Some((key, rec)), Some(info)) if info.key == key && info.record == rec => {
                stats.consistent += 1
            }
            (Some((key, rec)), Some(info)) => {
                // commit (key -> name, references taken) or a label update
                let objects = if rec.kind != Kind::Committed {
                    objects_of(dir, &info.record)?
                } else {
                    Vec::new()
                };
                meta.rename(&key, &info.key, &info.record, &objects)?;
                stats.rolled_forward += 1;
            }
            (Some((key, rec)), None) => {
                let objects = objects_of(dir, &rec)?;
                meta.delete(&key, &rec, &objects)?;
                remove_tree(dir)?;
                stats.removes_completed += 1;
            }
            (None, _) => {
                remove_tree(dir)?;
                stats.creates_rolled_back += 1;
            }
        }
    }
    // records whose directory is gone entirely: a Remove that got as far as the directory
    for (_, (key, rec)) in by_id {
        meta.delete(&key, &rec, &[])?;
        stats.removes_completed += 1;
    }
    meta.flush_blocking()?;
    Ok(stats)
}

/// Threads reading `info` mirrors at once: after a reboot every read is a disk read,
/// and many in flight finish far sooner than one after another.
const INFO_READERS: usize = 16;

/// The `info` mirror of every directory (`None` where it has none), read in parallel.
fn read_infos(dirs: &[(u64, PathBuf)]) -> Vec<Result<Option<crate::index::InfoFile>, CasError>> {
    let read = |dir: &Path| match read_info(dir) {
        Err(CasError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        r => r.map(Some),
    };
    if dirs.len() < 2 * INFO_READERS {
        return dirs.iter().map(|(_, d)| read(d)).collect();
    }
    let chunk = dirs.len().div_ceil(INFO_READERS);
    std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|(_, d)| read(d)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{write_info, DiskUsage, Record};
    use crate::manifest::{ManifestEntry, ManifestWriter};
    use std::time::SystemTime;

    fn rec(id: u64, kind: Kind) -> Record {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + id);
        Record {
            id,
            kind,
            parent: None,
            labels: Default::default(),
            created: now,
            updated: now,
            usage: DiskUsage::default(),
            logical_bytes: 0,
        }
    }

    fn snapshot(layout: &Layout, meta: &MetaStore, key: &str, r: &Record) -> PathBuf {
        let dir = layout.snapshot_dir(r.id);
        fs::create_dir_all(dir.join("fs")).unwrap();
        write_info(&dir, key, r).unwrap();
        meta.insert(key, r).unwrap();
        dir
    }

    #[test]
    fn after_a_crash_only_the_journaled_snapshots_and_odd_names_are_compared() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(tmp.path()).unwrap();
        let meta = MetaStore::open(&layout.index_dir()).unwrap();
        snapshot(&layout, &meta, "a", &rec(1, Kind::Active));
        let b = snapshot(&layout, &meta, "b", &rec(2, Kind::Active));
        // b's label change reached its mirror, not the index
        let mut changed = rec(2, Kind::Active);
        changed.labels.insert("l".into(), "v".into());
        write_info(&b, "b", &changed).unwrap();
        // a Prepare whose record never reached the index
        let orphan = layout.snapshot_dir(3);
        fs::create_dir_all(orphan.join("fs")).unwrap();
        write_info(&orphan, "never", &rec(3, Kind::Active)).unwrap();
        let crash = |ids: &[u64]| Stop::Crash {
            changed: ids.iter().copied().collect(),
        };
        let stats = reconcile(&layout, &meta, &crash(&[2])).unwrap();
        assert_eq!(
            stats,
            ReconcileStats {
                consistent: 1,
                rolled_forward: 1,
                removes_completed: 0,
                creates_rolled_back: 1
            }
        );
        assert_eq!(meta.get("b").unwrap().unwrap().labels, changed.labels);
        assert!(!orphan.exists());
        // nothing journaled: nothing read
        let stats = reconcile(&layout, &meta, &crash(&[])).unwrap();
        assert_eq!(stats.consistent, 2);
    }

    #[test]
    fn clean_stop_compares_names_and_falls_back_on_a_difference() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(tmp.path()).unwrap();
        let meta = MetaStore::open(&layout.index_dir()).unwrap();
        snapshot(&layout, &meta, "a", &rec(1, Kind::Active));
        let b = snapshot(&layout, &meta, "b", &rec(2, Kind::Active));
        // agreed at the clean stop: the mirrors are not read (an unreadable one passes)
        fs::write(b.join(INFO_FILE), b"not json").unwrap();
        let stats = reconcile(&layout, &meta, &Stop::Clean).unwrap();
        assert_eq!(stats.consistent, 2);
        // a directory removed while stopped: every mirror is compared, the record goes
        crate::index::write_info(&b, "b", &rec(2, Kind::Active)).unwrap();
        remove_tree(&b).unwrap();
        let stats = reconcile(&layout, &meta, &Stop::Clean).unwrap();
        assert_eq!((stats.consistent, stats.removes_completed), (1, 1));
        assert_eq!(meta.all().unwrap().len(), 1);
    }

    #[test]
    fn reconcile_repairs_each_interrupted_operation() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(tmp.path()).unwrap();
        let meta = MetaStore::open(&layout.index_dir()).unwrap();
        let digest = Digest::of(b"x");

        // untouched
        snapshot(&layout, &meta, "ok", &rec(1, Kind::Active));
        // a Commit that wrote its mirror (and manifest) but not the index
        let dir = snapshot(&layout, &meta, "active", &rec(2, Kind::Active));
        let mut w = ManifestWriter::create(&dir.join(MANIFEST_FILE)).unwrap();
        w.push(&ManifestEntry {
            path: "f".into(),
            digest,
            size: 1,
        })
        .unwrap();
        w.finish().unwrap();
        write_info(&dir, "layer", &rec(2, Kind::Committed)).unwrap();
        // a Remove that deleted the mirror only
        let gone = snapshot(&layout, &meta, "doomed", &rec(3, Kind::Active));
        fs::remove_file(gone.join(INFO_FILE)).unwrap();
        // a Prepare whose record never landed
        let orphan = layout.snapshot_dir(4);
        fs::create_dir_all(orphan.join("fs")).unwrap();
        write_info(&orphan, "never", &rec(4, Kind::Active)).unwrap();

        let stats = reconcile(&layout, &meta, &Stop::Unknown).unwrap();
        assert_eq!(
            stats,
            ReconcileStats {
                consistent: 1,
                rolled_forward: 1,
                removes_completed: 1,
                creates_rolled_back: 1
            }
        );
        let keys: Vec<_> = meta
            .all()
            .unwrap()
            .into_iter()
            .map(|(k, r)| (k, r.kind))
            .collect();
        assert_eq!(
            keys,
            [
                ("layer".to_string(), Kind::Committed),
                ("ok".to_string(), Kind::Active)
            ]
        );
        assert_eq!(meta.ref_count(&digest).unwrap(), 1);
        assert!(!gone.exists() && !orphan.exists());
        let again = reconcile(&layout, &meta, &Stop::Unknown).unwrap();
        assert_eq!(again.consistent, 2);
        // the synthetic manifest names an object and a stub that do not exist; everything
        // else (mirrors, reference counts, directories) must now agree
        let problems = fsck(&layout, &meta, false).unwrap().problems;
        assert!(
            problems.iter().all(|p| matches!(
                p,
                Problem::ObjectMissing { .. } | Problem::StubMismatch { .. }
            )),
            "{problems:?}"
        );
    }
}
