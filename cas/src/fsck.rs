//! `casctl fsck`: objects, stubs and images, manifests, mirrors and the index checked
//! against each other, with memory bounded by one digest-range part (see
//! [`crate::parts`]), not by the store.
//!
//! Three passes:
//! 1. every object file, one directory entry at a time: names, and with
//!    `verify_objects` the bytes (nothing is kept);
//! 2. every snapshot: its `info` mirror against the record; for committed layers each
//!    manifest entry against its stub (or its image's inode), and the manifest's
//!    distinct objects spilled to their parts, as are the aliases;
//! 3. a part at a time: the part's object files (its fan-out directories), what the
//!    manifests said of them, and the index's reference counts and GC candidates in
//!    the part's key range, compared; the counters are summed across the parts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::admin::{Progress, Reporter};
use crate::digest::{Digest, ALIAS_BYTES};
use crate::error::CasError;
use crate::gc::{for_each_object, for_each_object_in, walk_objects, ObjectFile};
use crate::index::{read_info, Kind, MetaStore};
use crate::layout::{Layout, FS_DIR, MANIFEST_FILE};
use crate::manifest::read_manifest;
use crate::objects::ObjectStore;
use crate::parts::{Parts, Spill, Spilled};
use crate::stub::{stub_target, StubTarget};

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
    /// complete (see [`crate::index`]): objects only a scan of every object finds (the
    /// first GC after an unclean stop, or `casctl gc` with the daemon stopped). Expected only
    /// after a crash the daemon has not been restarted from; not a problem.
    #[serde(default)]
    pub untracked_garbage: u64,
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
    fsck_with_progress(layout, meta, verify_objects, &mut |_| {})
}

/// The tags of spilled aliases (the others are snapshot ordinals).
const ALIAS_TAG: u32 = u32::MAX;
const LEGACY_ALIAS_TAG: u32 = u32::MAX - 1;

/// [`fsck`], telling `progress` how far it has come (phases `objects`, `snapshots`,
/// `references`: the last counts parts).
pub fn fsck_with_progress(
    layout: &Layout,
    meta: &MetaStore,
    verify_objects: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FsckReport, CasError> {
    let objects = ObjectStore::new(layout);
    check(layout, &objects, meta, verify_objects, progress, None)
}

/// [`fsck_with_progress`] through `objects` (the store's object directory and its
/// system calls) in `parts` (default: as many as the objects need).
pub(crate) fn check(
    layout: &Layout,
    objects: &ObjectStore,
    meta: &MetaStore,
    verify_objects: bool,
    progress: &mut dyn FnMut(&Progress),
    parts: Option<Parts>,
) -> Result<FsckReport, CasError> {
    let mut progress = Reporter::new(progress);
    let counters = meta.counters()?;
    let objects_total = counters.map(|c| c.referenced_objects + c.candidate_objects);
    let mut r = FsckReport::default();

    // parts for the objects the counters know of (a store without counters is counted)
    let parts = match (parts, objects_total) {
        (Some(p), _) => p,
        (None, Some(n)) => Parts::for_objects(n),
        (None, None) => {
            let mut n = 0;
            for_each_object(layout, |_, _| {
                n += 1;
                Ok(())
            })?;
            Parts::for_objects(n)
        }
    };
    let mut spill = Spill::new(parts, crate::parts::spill_dir(layout, "fsck"))?;
    walk_objects(layout, |what, path| match what {
        ObjectFile::Stray => {
            r.objects += 1;
            r.problems.push(Problem::StrayObjectFile { path });
            Ok(())
        }
        ObjectFile::Object(d) => {
            r.objects += 1;
            progress.tick("objects", r.objects, objects_total);
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
        }
        // to the part of the objects it can name
        ObjectFile::Alias(name) => {
            r.aliases += 1;
            let Some(prefix) = crate::digest::alias_prefix(&name) else {
                r.problems.push(Problem::StrayAlias { path });
                return Ok(());
            };
            let mut digest = [0u8; 32];
            digest[..prefix.len()].copy_from_slice(&prefix);
            let tag = if prefix.len() == ALIAS_BYTES {
                ALIAS_TAG
            } else {
                LEGACY_ALIAS_TAG
            };
            spill.push(Spilled {
                digest,
                size: 0,
                tag,
            })
        }
    })?;
    progress.done("objects", r.objects);

    let keys = check_snapshots(layout, meta, objects, &mut spill, &mut r, &mut progress)?;

    // what keeps an unreferenced object (an applied layer's manifest) matters only where
    // the candidates are complete; it is what the layers being applied name
    let complete = meta.candidates_complete()?;
    let pending = if complete {
        crate::gc::pending_objects(layout, meta)?
    } else {
        HashSet::new()
    };
    let mut totals = Totals::default();
    let part_count = parts.count() as u64;
    spill.for_each_part(|p, entries| {
        progress.tick("references", p as u64, Some(part_count));
        let part = Part {
            layout,
            meta,
            objects,
            keys: &keys,
            first: parts.first_bytes(p),
            complete,
            pending: &pending,
        };
        part.check(entries, &mut r, &mut totals)
    })?;
    progress.done("references", part_count);

    if let Some(have) = counters {
        for (counter, index, scan) in [
            (
                "referenced_objects",
                have.referenced_objects,
                totals.referenced_objects,
            ),
            (
                "referenced_bytes",
                have.referenced_bytes,
                totals.referenced_bytes,
            ),
            (
                "candidate_objects",
                have.candidate_objects,
                totals.candidate_objects,
            ),
            (
                "candidate_bytes",
                have.candidate_bytes,
                totals.candidate_bytes,
            ),
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
    r.problems.sort();
    Ok(r)
}

/// Pass 2: every record against its directory and `info` mirror, every committed
/// manifest entry against its stub, and each committed manifest's distinct objects
/// spilled with the snapshot's ordinal. Returns the snapshots' keys by ordinal.
fn check_snapshots(
    layout: &Layout,
    meta: &MetaStore,
    objects: &ObjectStore,
    spill: &mut Spill,
    r: &mut FsckReport,
    progress: &mut Reporter<'_>,
) -> Result<Vec<String>, CasError> {
    let stubs = layout.mode()? != Some(crate::layout::StoreMode::Materialised);
    let mut keys = Vec::new();
    let mut live_dirs = HashSet::new();
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
            match crate::erofs::mount::ensure_mounted(
                objects.sys(),
                layout,
                rec.id,
                crate::sys::ImageMounts::Auto,
            ) {
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
        // this layer's objects, once each, at the size its entries give
        let mut mine = BTreeMap::new();
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
            mine.insert(entry.digest, entry.size);
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
        let ordinal = keys.len() as u32;
        keys.push(key);
        for (d, size) in mine {
            spill.push(Spilled {
                digest: *d.as_bytes(),
                size,
                tag: ordinal,
            })?;
        }
        if let Some(at) = image_mount {
            crate::erofs::mount::unmount(objects.sys(), &at)?;
        }
    }
    progress.done("snapshots", r.snapshots);

    let sdir = layout.snapshots_dir();
    for e in fs::read_dir(&sdir).map_err(CasError::io("read dir", &sdir))? {
        let e = e.map_err(CasError::io("read dir", &sdir))?;
        if !live_dirs.contains(e.file_name().to_string_lossy().as_ref()) {
            r.problems
                .push(Problem::OrphanSnapshotDir { dir: e.path() });
        }
    }
    Ok(keys)
}

/// What the parts add up to, for the counters' check.
#[derive(Default)]
struct Totals {
    referenced_objects: u64,
    referenced_bytes: u64,
    candidate_objects: u64,
    candidate_bytes: u64,
}

/// One part of pass 3.
struct Part<'a> {
    layout: &'a Layout,
    meta: &'a MetaStore,
    objects: &'a ObjectStore,
    keys: &'a [String],
    first: std::ops::Range<u16>,
    complete: bool,
    pending: &'a HashSet<Digest>,
}

/// What the committed manifests say of one object.
struct Named {
    /// How many committed layers name it.
    layers: u64,
    /// Its size, as the last of them gives it.
    size: u64,
    /// Whether the index has a reference count for it.
    indexed: bool,
}

impl Part<'_> {
    fn check(
        &self,
        entries: Vec<Spilled>,
        r: &mut FsckReport,
        totals: &mut Totals,
    ) -> Result<(), CasError> {
        let mut present = HashSet::new();
        for_each_object_in(self.layout, self.first.clone(), |d| {
            present.insert(d);
            Ok(())
        })?;

        let mut named: HashMap<Digest, Named> = HashMap::new();
        let mut aliases = Vec::new();
        for e in entries {
            if e.tag == ALIAS_TAG || e.tag == LEGACY_ALIAS_TAG {
                aliases.push(e);
                continue;
            }
            let d = Digest::from_bytes(e.digest);
            if !present.contains(&d) {
                r.problems.push(Problem::ObjectMissing {
                    digest: d.to_string(),
                    snapshot: self.keys[e.tag as usize].clone(),
                });
            }
            let n = named.entry(d).or_insert(Named {
                layers: 0,
                size: e.size,
                indexed: false,
            });
            n.layers += 1;
            n.size = e.size;
        }
        self.check_aliases(&present, &aliases, r)?;

        for item in self.meta.refs_in(self.first.clone()) {
            let (d, index) = item?;
            totals.referenced_objects += 1;
            let manifests = match named.get_mut(&d) {
                Some(n) => {
                    n.indexed = true;
                    totals.referenced_bytes += n.size;
                    n.layers
                }
                None => {
                    // at the object's own size (its absence is a problem of its own)
                    totals.referenced_bytes +=
                        fs::symlink_metadata(self.objects.path(&d)).map_or(0, |m| m.len());
                    0
                }
            };
            if index != manifests {
                r.problems.push(Problem::RefcountMismatch {
                    digest: d.to_string(),
                    index,
                    manifests,
                });
            }
        }
        for (d, n) in &named {
            if !n.indexed {
                r.problems.push(Problem::RefcountMismatch {
                    digest: d.to_string(),
                    index: 0,
                    manifests: n.layers,
                });
            }
        }

        // the candidates at the sizes their entries record (a crash between deleting an
        // object and forgetting it leaves one until the next batch)
        let mut candidates = HashSet::new();
        for item in self.meta.candidates_in(self.first.clone()) {
            let (d, size) = item?;
            totals.candidate_objects += 1;
            totals.candidate_bytes += size;
            if self.complete {
                candidates.insert(d);
            }
        }
        for d in present.iter().filter(|d| !named.contains_key(d)) {
            r.unreferenced_objects += 1;
            if self.complete && !candidates.contains(d) && !self.pending.contains(d) {
                r.untracked_garbage += 1;
            }
        }
        Ok(())
    }

    /// Each alias must be a second name of an object whose alias it is.
    fn check_aliases(
        &self,
        present: &HashSet<Digest>,
        aliases: &[Spilled],
        r: &mut FsckReport,
    ) -> Result<(), CasError> {
        if aliases.is_empty() {
            return Ok(());
        }
        let legacy = aliases.iter().any(|a| a.tag == LEGACY_ALIAS_TAG);
        let mut owners: HashMap<String, Vec<Digest>> = HashMap::new();
        for d in present {
            owners.entry(d.alias()).or_default().push(*d);
            if legacy {
                owners.entry(d.legacy_alias()).or_default().push(*d);
            }
        }
        for a in aliases {
            // the name, from the prefix it stands for
            let named = Digest::from_bytes(a.digest);
            let name = match a.tag {
                ALIAS_TAG => named.alias(),
                _ => named.legacy_alias(),
            };
            let target = StubTarget::Alias(name.clone());
            let mut owned = false;
            for d in owners.get(&name).into_iter().flatten() {
                owned |= self.objects.target_is(&target, d)?;
            }
            if !owned {
                r.problems.push(Problem::StrayAlias {
                    path: self.layout.objects_dir().join(name),
                });
            }
        }
        Ok(())
    }
}
