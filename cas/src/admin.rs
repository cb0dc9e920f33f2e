//! Store-wide operations behind `casctl`: statistics, index rebuild, and the admin
//! socket's requests (the consistency check is [`crate::fsck`]).
//!
//! Each takes the layout and (except the rebuild) the open index, so the daemon can run
//! them under its own locks while it serves, and `casctl` can run them directly when no
//! daemon holds the store.

use std::collections::HashMap;
use std::fs;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::CasError;
use crate::fsck::FsckReport;
use crate::gc::for_each_object;
use crate::index::{read_info, Counters, Kind, MetaStore};
use crate::layout::{remove_tree, Layout};
use crate::layout::{INFO_FILE, MANIFEST_FILE};
use crate::parts::{Parts, Spill, Spilled};

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
    /// unclean stop or a failed ingest): the next GC looks at every object and makes
    /// them candidates.
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
    for item in meta.refs_in(0..256) {
        let (d, _) = item?;
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
pub(crate) struct Reporter<'a> {
    f: &'a mut dyn FnMut(&Progress),
    last: Option<std::time::Instant>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(f: &'a mut dyn FnMut(&Progress)) -> Reporter<'a> {
        Reporter { f, last: None }
    }

    pub(crate) fn tick(&mut self, phase: &str, done: u64, total: Option<u64>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.report(phase, done, total);
    }

    pub(crate) fn done(&mut self, phase: &str, done: u64) {
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
        let mut manifest_bytes = 0;
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
                manifest_bytes += fs::metadata(dir.join(MANIFEST_FILE)).map_or(0, |m| m.len());
            }
            infos.push((info, dir));
        }
        progress.done("snapshots", infos.len() as u64 + stats.skipped_dirs);
        // a manifest line (digest, size, path) takes 68 bytes at least: an upper bound
        // on the objects, for parts of bounded size
        let parts = Parts::for_objects(manifest_bytes / 68);
        let mut spill = Spill::new(parts, crate::parts::spill_dir(layout, "rebuild"))?;
        for (info, dir) in &infos {
            meta.insert(&info.key, &info.record)?;
            stats.snapshots += 1;
            if info.record.kind == Kind::Committed {
                for (d, size) in crate::manifest::distinct_objects(&dir.join(MANIFEST_FILE))? {
                    spill.push(Spilled {
                        digest: *d.as_bytes(),
                        size,
                        tag: 0,
                    })?;
                }
            }
        }
        let part_count = parts.count() as u64;
        spill.for_each_part(|p, entries| {
            progress.tick("references", p as u64, Some(part_count));
            let mut counts: HashMap<Digest, u64> = HashMap::new();
            for e in entries {
                let n = counts
                    .entry(Digest::from_bytes(e.digest))
                    .or_insert_with(|| {
                        counters.referenced_objects += 1;
                        counters.referenced_bytes += e.size;
                        0
                    });
                *n += 1;
            }
            meta.set_refs(&counts)?;
            stats.referenced_objects += counts.len() as u64;
            Ok(())
        })?;
        progress.done("references", part_count);
        meta.set_counters(&counters, &[])?;
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
    /// [`crate::fsck::fsck`].
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
