//! Opening a store: journal replay, reconcile, checkpoint, sweep; and the choice of the
//! store's mode.
//!
//! Start-up repeats what a crash interrupted, in this order, each step idempotent so a
//! crash during recovery is recovered from the same way:
//!
//! 1. the clean-stop marker is taken (durably) and the journal's records past the
//!    checkpoint are replayed into the `info` mirrors ([`crate::journal`]);
//! 2. the index is rebuilt from mirrors and manifests when it is missing or cannot be
//!    opened ([`crate::admin::rebuild_index`]);
//! 3. the index is reconciled with the mirrors ([`reconcile`]): only directory names
//!    after a clean stop, the snapshots the replayed records name after a crash;
//! 4. a checkpoint makes index and mirrors durable and retires the records;
//! 5. the store's mode is chosen (and probed), directories no record names and
//!    leftovers in `cas/tmp` are swept.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    lock, OpenOptions, RequestedIdmap, RequestedLayers, RequestedMode, Result, SnapshotError,
    Snapshots,
};
use crate::digest::Digest;
use crate::erofs::mount::remove_snapshot_dir;
use crate::error::CasError;
use crate::index::{read_info, Kind, MetaStore};
use crate::journal::{CommitLog, Stop};
use crate::layout::{Layout, StoreMode, MANIFEST_FILE};

use crate::mounts::{MountPlanner, OverlayFeatures};
use crate::objects::ObjectStore;
use crate::sys::{ImageMounts, ImageSource, Syscalls};

impl Snapshots {
    /// Opens the store at `layout`, recovering from whatever stopped it last (see the
    /// module docs). `sys` makes the calls that need root: the kernel probe here, and
    /// everything the store writes afterwards.
    pub fn open(layout: Layout, opts: OpenOptions, sys: Arc<dyn Syscalls>) -> Result<Snapshots> {
        let started = std::time::Instant::now();
        let log = CommitLog::open(&layout, opts.journal)?;
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
        let cache = opts
            .index_cache_bytes
            .unwrap_or(crate::index::DEFAULT_CACHE_BYTES);
        let meta = open_index(&layout, cache)?;
        if !matches!(stop, Stop::Clean) {
            // an ingest may have published objects without their references
            meta.set_candidates_complete(false)?;
        }
        let reconciled = std::time::Instant::now();
        let fixed = reconcile(&layout, &meta, &stop, &*sys)?;
        // index and mirrors agree now: retire the replayed records with both durable
        log.checkpoint(&meta)?;
        log.mark_journaled()?;
        info!(
            consistent = fixed.consistent,
            rolled_forward = fixed.rolled_forward,
            removes_completed = fixed.removes_completed,
            creates_rolled_back = fixed.creates_rolled_back,
            elapsed_ms = reconciled.elapsed().as_millis() as u64,
            "recovery: index reconciled with the snapshots' info files"
        );
        let counting = std::time::Instant::now();
        if let Some(c) = crate::admin::ensure_counters(&layout, &meta)? {
            info!(
                referenced_objects = c.referenced_objects,
                candidates = c.candidate_objects,
                elapsed_ms = counting.elapsed().as_millis() as u64,
                "recovery: object counters counted (the index predates them)"
            );
        }
        let mode = choose_mode(&layout, opts.mode, &*sys)?;
        let images = choose_layers(&layout, mode, opts.layers, opts.image_mounts, &*sys)?;
        let idmap_unavailable = choose_idmap(
            &layout,
            mode,
            images.then_some(opts.image_mounts),
            opts.idmapped_layers,
            &*sys,
        );
        let features = OverlayFeatures::probe();
        info!(index_off = features.index_param, ?mode, "store mode chosen");
        let mut sn = Snapshots {
            mode,
            images,
            image_mounts: opts.image_mounts,
            idmap_unavailable,
            mounting: Default::default(),
            objects: ObjectStore::new(&layout).with_syscalls(sys),
            planner: MountPlanner::new(layout.clone(), features, mode),
            layout,
            meta,
            log,
            writer: Default::default(),
            gc_lock: Default::default(),
            waiting: Default::default(),
            busy: Default::default(),
            applied: Default::default(),
            recovered_in: Default::default(),
            deleting: Default::default(),
            pending: Default::default(),
        };
        if mode == StoreMode::Stubs && !images && sn.objects.aliases() {
            // stub trees that redirect by alias: aliases go in the fan-out directories
            sn.layout.allow_fan_aliases()?;
        }
        let swept = {
            let _w = lock(&sn.writer);
            sn.sweep_orphans()? + crate::gc::sweep_tmp(&sn.layout)?
        };
        if swept > 0 {
            info!(swept, "removed leftovers of interrupted operations");
        }
        // the layers applied before the stop and not committed: their manifests keep
        // their objects until containerd commits or removes them
        sn.pending = crate::gc::PendingLayers::load(&sn.layout, &sn.meta)?;
        let finished = sn.finish_swaps()?;
        if finished > 0 {
            info!(finished, "commits of image layers finished");
        }
        sn.recovered_in = started.elapsed();
        info!(
            elapsed_ms = sn.recovered_in.as_millis() as u64,
            "recovery done"
        );
        Ok(sn)
    }
}

/// Opens the index, rebuilding it from the snapshots' `info` files and manifests when
/// it cannot be opened, or when it is missing while snapshots exist.
fn open_index(layout: &Layout, cache: u64) -> Result<MetaStore> {
    let index = layout.index_dir();
    let sdir = layout.snapshots_dir();
    let has_snapshots = fs::read_dir(&sdir)
        .map_err(SnapshotError::io("read dir", &sdir))?
        .next()
        .is_some();
    if has_snapshots && !index.join("db").exists() {
        warn!(index = %index.display(), "index missing; rebuilding it from the snapshots' info files and manifests");
        rebuild(layout)?;
    }
    match MetaStore::open_with_cache(&index, cache) {
        Ok(m) => Ok(m),
        Err(e) => {
            warn!(error = %e, "index cannot be opened; rebuilding it from the snapshots' info files and manifests");
            rebuild(layout)?;
            Ok(MetaStore::open_with_cache(&index, cache)?)
        }
    }
}

fn rebuild(layout: &Layout) -> Result<()> {
    let started = std::time::Instant::now();
    let stats = crate::admin::rebuild_index(layout)?;
    info!(
        snapshots = stats.snapshots,
        referenced_objects = stats.referenced_objects,
        skipped_dirs = stats.skipped_dirs,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "index rebuilt"
    );
    Ok(())
}

/// The store's mode: the one it was created with, else the requested one, where
/// `auto` means stubs when the kernel probe shows it can serve them. A new store's
/// mode is recorded.
pub(super) fn choose_mode(
    layout: &Layout,
    requested: RequestedMode,
    sys: &dyn Syscalls,
) -> Result<StoreMode> {
    let stored = layout.mode()?;
    let mismatch = |stored: StoreMode| SnapshotError::ModeMismatch { stored, requested };
    let probe = || sys.probe_data_only_lowers(&layout.tmp_dir());
    let mode = match (stored, requested) {
        (Some(StoreMode::Stubs), RequestedMode::Materialised) => {
            return Err(mismatch(StoreMode::Stubs))
        }
        (Some(StoreMode::Materialised), RequestedMode::DataOnly) => {
            return Err(mismatch(StoreMode::Materialised))
        }
        (Some(StoreMode::Stubs), _) | (None, RequestedMode::DataOnly) => {
            probe()?;
            StoreMode::Stubs
        }
        (Some(StoreMode::Materialised), _) | (None, RequestedMode::Materialised) => {
            StoreMode::Materialised
        }
        (None, RequestedMode::Auto) => match probe() {
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

/// Why ID-mapped snapshots cannot be served by ID-mapped clones of their layers, or
/// `None` when they can: probed on a layer of the kind new layers are.
fn choose_idmap(
    layout: &Layout,
    mode: StoreMode,
    images: Option<ImageMounts>,
    wanted: RequestedIdmap,
    sys: &dyn Syscalls,
) -> Option<String> {
    let why = if wanted == RequestedIdmap::Off {
        Some("turned off: [store] idmapped_layers = \"off\"".to_string())
    } else {
        use crate::probe::ProbeLayer;
        let layer = match (mode, images) {
            (StoreMode::Stubs, Some(how)) => ProbeLayer::Image(how),
            (StoreMode::Stubs, None) => ProbeLayer::StubTree,
            (StoreMode::Materialised, _) => ProbeLayer::Plain,
        };
        let probed = sys.probe_idmapped_layers(&layout.tmp_dir(), layer);
        probed.err().map(|e| e.to_string())
    };
    match &why {
        None => info!("ID-mapped snapshots are served by ID-mapped clones of their layers (declare capabilities = [\"remap-ids\"] in containerd's [proxy_plugins] entry)"),
        Some(why) => warn!(reason = %why, "ID-mapped snapshots need layers containerd chowned (leave \"remap-ids\" out of containerd's capabilities for this snapshotter)"),
    }
    why
}

/// Whether new layers become EROFS images: where the store serves layers from the CAS
/// and the kernel mounts images from files (probed), unless stub trees are asked for.
/// A store that may hold images is marked so ([`Layout::allow_images`]).
pub(super) fn choose_layers(
    layout: &Layout,
    mode: StoreMode,
    requested: RequestedLayers,
    how: ImageMounts,
    sys: &dyn Syscalls,
) -> Result<bool> {
    let source = match (mode, requested) {
        (_, RequestedLayers::StubTrees) => None,
        (StoreMode::Materialised, RequestedLayers::Images) => {
            return Err(SnapshotError::ImagesNeedStubs(mode))
        }
        (StoreMode::Materialised, RequestedLayers::Auto) => None,
        (StoreMode::Stubs, RequestedLayers::Images) => {
            Some(sys.probe_layer_images(&layout.tmp_dir(), how)?)
        }
        (StoreMode::Stubs, RequestedLayers::Auto) => {
            match sys.probe_layer_images(&layout.tmp_dir(), how) {
                Ok(source) => Some(source),
                Err(e) => {
                    warn!(error = %e, "EROFS images cannot be mounted here: new layers are stub trees");
                    None
                }
            }
        }
    };
    let images = source.is_some();
    if let Some(source) = source {
        layout.allow_images()?;
        match source {
            ImageSource::File => info!(
                "new layers are EROFS images over the CAS (one file and one mount per layer)"
            ),
            ImageSource::Loop { direct_io } => info!(
                direct_io,
                asked = how == ImageMounts::Loop,
                "new layers are EROFS images over the CAS, mounted through loop devices (one file, one loop device and one mount per layer in use)"
            ),
        }
    } else if mode == StoreMode::Stubs {
        info!("new layers are stub trees over the CAS");
    }
    Ok(images)
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
    sys: &dyn Syscalls,
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
    let objects_of =
        |dir: &Path, rec: &crate::index::Record| -> Result<Vec<(Digest, u64)>, CasError> {
            if rec.kind != Kind::Committed {
                return Ok(Vec::new());
            }
            crate::manifest::distinct_objects(&dir.join(MANIFEST_FILE))
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
                remove_snapshot_dir(sys, dir)?;
                stats.removes_completed += 1;
            }
            (None, _) => {
                remove_snapshot_dir(sys, dir)?;
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
        Err(CasError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
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
    use crate::fsck::{fsck, Problem};
    use crate::index::{write_info, DiskUsage, Record};
    use crate::layout::INFO_FILE;
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
        let stats = reconcile(&layout, &meta, &crash(&[2]), &crate::sys::Host).unwrap();
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
        let stats = reconcile(&layout, &meta, &crash(&[]), &crate::sys::Host).unwrap();
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
        let stats = reconcile(&layout, &meta, &Stop::Clean, &crate::sys::Host).unwrap();
        assert_eq!(stats.consistent, 2);
        // a directory removed while stopped: every mirror is compared, the record goes
        crate::index::write_info(&b, "b", &rec(2, Kind::Active)).unwrap();
        crate::layout::remove_tree(&b).unwrap();
        let stats = reconcile(&layout, &meta, &Stop::Clean, &crate::sys::Host).unwrap();
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

        let stats = reconcile(&layout, &meta, &Stop::Unknown, &crate::sys::Host).unwrap();
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
        let again = reconcile(&layout, &meta, &Stop::Unknown, &crate::sys::Host).unwrap();
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
