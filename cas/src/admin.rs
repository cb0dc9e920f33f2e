//! Store-wide operations behind `casctl`: statistics, consistency checks, index rebuild.
//!
//! Each takes the layout and (except the rebuild) the open index, so the daemon can run
//! them under its own locks while it serves, and `casctl` can run them directly when no
//! daemon holds the store.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::CasError;
use crate::gc::{for_each_object, list_aliases};
use crate::index::{read_info, Counters, Kind, MetaStore};
use crate::layout::{remove_tree, Layout};
use crate::layout::{FS_DIR, INFO_FILE, MANIFEST_FILE};
use crate::manifest::read_manifest;
use crate::stub::{stub_target, StubTarget};

/// What the store holds, and what deduplication saves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Snapshots of every kind.
    pub snapshots: u64,
    /// Committed layers.
    pub committed: u64,
    /// Committed layers whose metadata is one EROFS image (the others are stub trees).
    #[serde(default)]
    pub image_layers: u64,
    /// Bytes of those images.
    #[serde(default)]
    pub image_bytes: u64,
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
    /// Whether the object figures come from the index's counters (constant time) rather
    /// than a scan of every object. Counted objects are those committed layers reference
    /// and the GC candidates: a layer being applied counts from its Commit.
    #[serde(default)]
    pub counted: bool,
    /// Whether unreferenced objects may exist that the counters do not hold (left by an
    /// unclean stop or a failed ingest): the next GC scans every object and takes them.
    #[serde(default)]
    pub uncounted_garbage: bool,
    /// What new layers become (filled in by the running daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_layers: Option<String>,
    /// How user-namespaced (ID-mapped) snapshots are served (filled in by the running
    /// daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_mapped_snapshots: Option<String>,
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
    /// Layers pulled partially (only their missing files fetched).
    #[serde(default)]
    pub partial_layers: u64,
    /// Of them, the ones whose rebuilt archive was checked against the diffID.
    #[serde(default)]
    pub partial_diff_id_verified: u64,
    /// And the ones checked against their TOC alone (`[remote] verify = "toc"`).
    #[serde(default)]
    pub partial_toc_verified: u64,
    /// Layers with a TOC that were pulled in full instead (see the log for why).
    #[serde(default)]
    pub partial_fallbacks: u64,
    /// Bytes the partial pulls fetched from registries.
    #[serde(default)]
    pub partial_fetched_bytes: u64,
    /// Compressed bytes of those layers (what full pulls would have fetched).
    #[serde(default)]
    pub partial_layer_bytes: u64,
    /// The I/O workers' backend (`io_uring` or `threads`).
    pub io_backend: Option<String>,
    /// Where the Diff service reads layer blobs from now, or why it cannot (`None`:
    /// the Diff service is off).
    #[serde(default)]
    pub blob_source: Option<String>,
}

/// Computes [`Stats`]: from the records and the index's counters, in time proportional
/// to the snapshots; with a scan of every object where the index has no counters yet.
pub fn stats(layout: &Layout, meta: &MetaStore) -> Result<Stats, CasError> {
    let mut s = Stats::default();
    for (_, rec) in meta.all()? {
        s.snapshots += 1;
        if rec.kind == Kind::Committed {
            s.committed += 1;
            s.logical_bytes += rec.logical_bytes;
            if let Ok(md) = fs::metadata(layout.image_file(rec.id)) {
                s.image_layers += 1;
                s.image_bytes += md.len();
            }
        }
    }
    match meta.counters()? {
        Some(c) => {
            s.counted = true;
            s.uncounted_garbage = !meta.candidates_complete()?;
            s.objects = c.referenced_objects + c.candidate_objects;
            s.physical_bytes = c.referenced_bytes + c.candidate_bytes;
            s.unreferenced_objects = c.candidate_objects;
            s.unreferenced_bytes = c.candidate_bytes;
        }
        None => {
            for_each_object(layout, |digest, path| {
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
                Ok(())
            })?;
        }
    }
    s.saved_bytes = s.logical_bytes as i64 - s.physical_bytes as i64;
    if s.logical_bytes > 0 {
        s.savings_percent = s.saved_bytes as f64 * 100.0 / s.logical_bytes as f64;
    }
    Ok(s)
}

/// The index's counters as a scan finds them: every referenced object's size from its
/// file, every GC candidate's from its object (0 where the object is gone). Returns the
/// candidates with those sizes too.
pub fn count_objects(
    layout: &Layout,
    meta: &MetaStore,
) -> Result<(Counters, Vec<(Digest, u64)>), CasError> {
    let objects = crate::objects::ObjectStore::new(layout);
    let size = |d: &Digest| fs::symlink_metadata(objects.path(d)).map_or(0, |m| m.len());
    let mut c = Counters::default();
    for (d, _) in meta.refs()? {
        c.referenced_objects += 1;
        c.referenced_bytes += size(&d);
    }
    let candidates: Vec<(Digest, u64)> = meta
        .candidates(usize::MAX)?
        .into_iter()
        .map(|d| (d, size(&d)))
        .collect();
    for (_, n) in &candidates {
        c.candidate_objects += 1;
        c.candidate_bytes += n;
    }
    Ok((c, candidates))
}

/// Sets the index's counters to what [`count_objects`] finds (after a full collection,
/// or where the index has none). The caller holds every index change off.
pub fn recount(layout: &Layout, meta: &MetaStore) -> Result<Counters, CasError> {
    let (c, candidates) = count_objects(layout, meta)?;
    meta.set_counters(&c, &candidates)?;
    meta.flush_blocking()?;
    Ok(c)
}

/// Counts the index's counters once where the index predates them (a store made by an
/// older version). Returns what it counted, or `None` when the counters were there.
pub fn ensure_counters(layout: &Layout, meta: &MetaStore) -> Result<Option<Counters>, CasError> {
    if meta.counters()?.is_some() {
        return Ok(None);
    }
    recount(layout, meta).map(Some)
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
    /// One of the index's counters differs from what a scan counts (recounted by every
    /// full collection: `casctl gc` with the daemon stopped, or the daemon's first GC
    /// after an unclean stop).
    CounterMismatch {
        /// The counter.
        counter: String,
        /// What the index says.
        index: u64,
        /// What the scan counts.
        scan: u64,
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
    /// Of them, those no GC candidate names while the index says its candidates are
    /// complete (see [`crate::index`]): objects only a full scan collects (the first GC
    /// after an unclean stop, or `casctl gc` with the daemon stopped). Expected only
    /// after a crash the daemon has not been restarted from; not a problem.
    #[serde(default)]
    pub untracked_garbage: u64,
    /// Every inconsistency found.
    pub problems: Vec<Problem>,
}

/// How far a store-wide operation has come (`casctl` draws it as a progress bar).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// What it goes through: `objects` or `snapshots`.
    pub phase: String,
    /// How many of them it has been through.
    pub done: u64,
    /// How many there are, where known (the index's counters, for objects).
    pub total: Option<u64>,
}

/// Hands [`Progress`] to a callback ten times a second at most, and at each phase's end.
struct Reporter<'a> {
    f: &'a mut dyn FnMut(&Progress),
    last: Option<std::time::Instant>,
}

impl<'a> Reporter<'a> {
    fn new(f: &'a mut dyn FnMut(&Progress)) -> Reporter<'a> {
        Reporter { f, last: None }
    }

    fn tick(&mut self, phase: &str, done: u64, total: Option<u64>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.report(phase, done, total);
    }

    fn done(&mut self, phase: &str, done: u64) {
        self.report(phase, done, Some(done));
        self.last = None;
    }

    fn report(&mut self, phase: &str, done: u64, total: Option<u64>) {
        (self.f)(&Progress {
            phase: phase.to_string(),
            done,
            total: total.map(|t| t.max(done)),
        });
    }
}

/// Checks objects, stubs, manifests, mirrors and the index against each other.
/// With `verify_objects`, every object's bytes are hashed too.
pub fn fsck(
    layout: &Layout,
    meta: &MetaStore,
    verify_objects: bool,
) -> Result<FsckReport, CasError> {
    fsck_with_progress(layout, meta, verify_objects, &mut |_| {})
}

/// [`fsck`], telling `progress` how far it has come.
pub fn fsck_with_progress(
    layout: &Layout,
    meta: &MetaStore,
    verify_objects: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FsckReport, CasError> {
    let mut progress = Reporter::new(progress);
    let counters = meta.counters()?;
    let objects_total = counters.map(|c| c.referenced_objects + c.candidate_objects);
    let mut r = FsckReport::default();
    let mut present = std::collections::HashSet::new();
    for_each_object(layout, |digest, path| {
        r.objects += 1;
        progress.tick("objects", r.objects, objects_total);
        let Some(d) = digest else {
            r.problems.push(Problem::StrayObjectFile { path });
            return Ok(());
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
        Ok(())
    })?;
    progress.done("objects", r.objects);

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
    // each committed manifest's object sizes, which the counters add up
    let mut sizes: HashMap<Digest, u64> = HashMap::new();
    let mut live_dirs = std::collections::HashSet::new();
    let records = meta.all()?;
    let snapshots_total = Some(records.len() as u64);
    for (key, rec) in records {
        progress.tick("snapshots", r.snapshots, snapshots_total);
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
        // an image layer is read through its mount: made for the check when the daemon
        // is not running, and undone after it
        let image_mount = if crate::erofs::mount::has_image(layout, rec.id)
            && !crate::erofs::mount::is_mounted(&dir.join(FS_DIR))
        {
            match crate::erofs::mount::ensure_mounted(objects.sys(), layout, rec.id) {
                Ok(_) => Some(dir.join(FS_DIR)),
                Err(e) => {
                    r.problems.push(Problem::StubMismatch {
                        snapshot: key.clone(),
                        path: PathBuf::from(crate::layout::IMAGE_FILE),
                        reason: format!("the layer's image does not mount: {e}"),
                    });
                    continue;
                }
            }
        } else {
            None
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
            sizes.insert(entry.digest, entry.size);
            if !present.contains(&entry.digest) {
                r.problems.push(Problem::ObjectMissing {
                    digest: entry.digest.to_string(),
                    snapshot: key.clone(),
                });
            }
            let stub = dir.join(FS_DIR).join(&entry.path);
            let reason = match fs::symlink_metadata(&stub) {
                Err(e) => Some(format!("stub unreadable: {e}")),
                Ok(md) if !md.is_file() => Some("not a regular file".to_string()),
                Ok(md) if md.len() != entry.size => Some(format!(
                    "stub size {} but manifest says {}",
                    md.len(),
                    entry.size
                )),
                Ok(_) if !stubs => None,
                Ok(_) => match stub_target(objects.sys(), &stub)? {
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
        if let Some(at) = image_mount {
            crate::erofs::mount::unmount(objects.sys(), &at)?;
        }
    }

    progress.done("snapshots", r.snapshots);
    let refs = meta.refs()?;
    let mut indexed: BTreeMap<Digest, u64> = refs.iter().copied().collect();
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
    let candidates = meta.candidate_sizes()?;
    if let Some(have) = counters {
        // the index's references at the sizes the manifests give (a missing object is
        // its own problem), and its candidates at the sizes their entries record (a
        // crash between deleting an object and forgetting it leaves one until the next
        // batch)
        let referenced_bytes: u64 =
            refs.iter()
                .map(|(d, _)| {
                    sizes.get(d).copied().unwrap_or_else(|| {
                        fs::symlink_metadata(objects.path(d)).map_or(0, |m| m.len())
                    })
                })
                .sum();
        let candidate_bytes: u64 = candidates.iter().map(|(_, n)| n).sum();
        for (counter, index, scan) in [
            (
                "referenced_objects",
                have.referenced_objects,
                refs.len() as u64,
            ),
            ("referenced_bytes", have.referenced_bytes, referenced_bytes),
            (
                "candidate_objects",
                have.candidate_objects,
                candidates.len() as u64,
            ),
            ("candidate_bytes", have.candidate_bytes, candidate_bytes),
        ] {
            if index != scan {
                r.problems.push(Problem::CounterMismatch {
                    counter: counter.to_string(),
                    index,
                    scan,
                });
            }
        }
    }
    r.unreferenced_objects = present.iter().filter(|d| !counted.contains_key(d)).count() as u64;
    if meta.candidates_complete()? {
        let candidates: std::collections::HashSet<Digest> =
            candidates.iter().map(|(d, _)| *d).collect();
        let pending = crate::gc::pending_objects(layout, meta)?;
        r.untracked_garbage = present
            .iter()
            .filter(|d| !counted.contains_key(d) && !candidates.contains(d) && !pending.contains(d))
            .count() as u64;
    }

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
    rebuild_index_with_progress(layout, &mut |_| {})
}

/// [`rebuild_index`], telling `progress` how far it has come.
pub fn rebuild_index_with_progress(
    layout: &Layout,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RebuildStats, CasError> {
    let mut progress = Reporter::new(progress);
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
        // the counters of the references taken, at the manifests' sizes as every Commit
        // takes them (a fresh index has no candidates)
        let mut counters = Counters::default();
        let mut max_id = 0;
        let sdir = layout.snapshots_dir();
        let mut infos = Vec::new();
        let dirs = fs::read_dir(&sdir)
            .map_err(CasError::io("read dir", &sdir))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(CasError::io("read dir", &sdir))?;
        let total = Some(dirs.len() as u64);
        for (n, e) in dirs.into_iter().enumerate() {
            progress.tick("snapshots", n as u64, total);
            let dir = e.path();
            if !dir.join(INFO_FILE).is_file() {
                stats.skipped_dirs += 1;
                continue;
            }
            let info = read_info(&dir)?;
            max_id = max_id.max(info.record.id);
            if info.record.kind == Kind::Committed {
                for (d, size) in crate::manifest::distinct_objects(&dir.join(MANIFEST_FILE))? {
                    let n = counts.entry(d).or_insert_with(|| {
                        counters.referenced_objects += 1;
                        counters.referenced_bytes += size;
                        0
                    });
                    *n += 1;
                }
            }
            infos.push(info);
        }
        progress.done("snapshots", infos.len() as u64 + stats.skipped_dirs);
        for info in &infos {
            meta.insert(&info.key, &info.record)?;
            stats.snapshots += 1;
        }
        meta.set_refs(&counts)?;
        meta.set_counters(&counters, &[])?;
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
    /// What each image holds alone and shares ([`crate::sharing`]).
    Images,
}

/// The answer to an [`AdminRequest`] (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminResponse {
    /// Statistics.
    Stats(Box<Stats>),
    /// An fsck report.
    Fsck(FsckReport),
    /// What a collection did.
    Gc(crate::gc::GcStats),
    /// Each image's unique and shared bytes.
    Images(Vec<crate::sharing::ChainUsage>),
    /// How far the request has come (lines before the answer; none, or several).
    Progress(Progress),
    /// The request failed.
    Error(String),
}
