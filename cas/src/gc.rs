//! Garbage collection: delete objects no committed snapshot references.
//!
//! Two ways: [`collect_batch`] takes the index's GC candidates (the objects whose last
//! reference went) a batch at a time, so its cost is the garbage's and a concurrent
//! Commit waits at most one batch; [`collect`] scans every object and deletes what
//! nothing keeps under one hold, for `casctl gc` offline.
//!
//! After an unclean stop (or a failure between an ingest's objects and their
//! references) objects may be unreferenced without being candidates. A daemon then
//! makes them candidates before it collects: [`objects_in_fan`] lists one fan-out
//! directory at a time and [`MetaStore::unreferenced`] picks out the objects without
//! references, neither holding anything; [`MetaStore::adopt_unreferenced`] then looks
//! at those again and adds them, in chunks, each under the index's writer lock only. A
//! Commit waits for one chunk at most, not for a scan of the store (90 s at five
//! million objects on a cold cache); the candidates are then complete, and collected in
//! batches as ever.
//!
//! An object is garbage when the index holds no reference count for it and no active
//! snapshot's manifest names it. (An active snapshot has a manifest once the Diff
//! service applied a layer into it: its objects are published at Apply and referenced
//! at Commit, a separate call; in between, that manifest is what keeps them. A daemon
//! keeps those manifests' objects in memory, [`PendingLayers`], so that a batch's cost
//! does not grow with the snapshots; the full scan and fsck read them from the store.)
//! The caller must exclude every ingest for the duration of [`collect`] (the daemon
//! holds its GC lock in write mode; ingests hold it in read mode from before they look
//! an object up until their references are recorded, or their manifest is among the
//! [`PendingLayers`]). Without that, an ingest could find an object, decide
//! not to store its bytes again, and lose the object to a concurrent collection before
//! its reference lands.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use crate::index::Kind;
use crate::manifest::read_manifest;

use crate::digest::Digest;
use crate::error::CasError;
use crate::index::MetaStore;
use crate::layout::Layout;
use crate::objects::ObjectStore;
use crate::stub::StubTarget;

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcStats {
    /// Objects examined.
    pub scanned: u64,
    /// Objects deleted.
    pub removed: u64,
    /// Bytes freed by deleting them.
    pub freed_bytes: u64,
    /// Leftover temporary files removed from `cas/tmp`.
    pub tmp_removed: u64,
}

/// An entry of the objects directory, as [`walk_objects`] gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectFile {
    /// An object (`ab/cdef…`).
    Object(Digest),
    /// An alias: its name relative to the objects directory, `ab/<20 characters>` in
    /// the object's fan-out directory or a legacy alias at the top ([`Digest::alias`],
    /// [`Digest::legacy_alias`]).
    Alias(String),
    /// A file whose name is neither.
    Stray,
}

/// Calls `f` with every file of the objects directory, what it is and its path, one
/// directory entry at a time (memory does not grow with the store). `f` may delete the
/// file it is given.
pub fn walk_objects(
    layout: &Layout,
    mut f: impl FnMut(ObjectFile, std::path::PathBuf) -> Result<(), CasError>,
) -> Result<(), CasError> {
    let dir = layout.objects_dir();
    for fan in fs::read_dir(&dir).map_err(CasError::io("read dir", &dir))? {
        let fan = fan.map_err(CasError::io("read dir", &dir))?;
        let fan_name = fan.file_name().to_string_lossy().into_owned();
        if fan.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            for_each_in_fan(&fan_name, &fan.path(), &mut f)?;
        } else if crate::digest::is_legacy_alias_name(&fan_name) {
            f(ObjectFile::Alias(fan_name), fan.path())?;
        } else {
            f(ObjectFile::Stray, fan.path())?;
        }
    }
    Ok(())
}

/// Calls `f` with every file of the fan-out directory `fan_name` (at `fan_path`), what
/// it is and its path.
fn for_each_in_fan(
    fan_name: &str,
    fan_path: &Path,
    f: &mut impl FnMut(ObjectFile, std::path::PathBuf) -> Result<(), CasError>,
) -> Result<(), CasError> {
    for obj in fs::read_dir(fan_path).map_err(CasError::io("read dir", fan_path))? {
        let obj = obj.map_err(CasError::io("read dir", fan_path))?;
        let name = obj.file_name().to_string_lossy().into_owned();
        let what = if crate::digest::is_fan_alias_name(&name) {
            let alias = format!("{fan_name}/{name}");
            match crate::digest::alias_prefix(&alias) {
                Some(_) => ObjectFile::Alias(alias),
                None => ObjectFile::Stray,
            }
        } else {
            match format!("{fan_name}{name}").parse() {
                Ok(d) => ObjectFile::Object(d),
                Err(_) => ObjectFile::Stray,
            }
        };
        f(what, obj.path())?;
    }
    Ok(())
}

/// Calls `f` with every object file: its digest (or `None` for a name that is neither
/// an object's nor an alias's) and path, as [`walk_objects`] finds them (aliases are
/// left out). `f` may delete the file it is given.
pub fn for_each_object(
    layout: &Layout,
    mut f: impl FnMut(Option<Digest>, std::path::PathBuf) -> Result<(), CasError>,
) -> Result<(), CasError> {
    walk_objects(layout, |what, path| match what {
        ObjectFile::Object(d) => f(Some(d), path),
        ObjectFile::Stray => f(None, path),
        ObjectFile::Alias(_) => Ok(()),
    })
}

/// Every object file, as [`for_each_object`] visits them, in one list.
pub fn list_objects(
    layout: &Layout,
) -> Result<Vec<(Option<Digest>, std::path::PathBuf)>, CasError> {
    let mut out = Vec::new();
    for_each_object(layout, |d, p| {
        out.push((d, p));
        Ok(())
    })?;
    Ok(out)
}

/// Whether the top of the objects directory holds a legacy alias.
fn has_legacy_aliases(layout: &Layout) -> Result<bool, CasError> {
    let dir = layout.objects_dir();
    for e in fs::read_dir(&dir).map_err(CasError::io("read dir", &dir))? {
        let e = e.map_err(CasError::io("read dir", &dir))?;
        if crate::digest::is_legacy_alias_name(&e.file_name().to_string_lossy())
            && !e.path().is_dir()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every alias (see [`ObjectFile::Alias`]): its name and path.
pub fn list_aliases(layout: &Layout) -> Result<Vec<(String, std::path::PathBuf)>, CasError> {
    let mut out = Vec::new();
    walk_objects(layout, |what, path| {
        if let ObjectFile::Alias(name) = what {
            out.push((name, path));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with the digest of every object whose first byte is in `first` (the
/// fan-out directories of a [`crate::parts::Parts`] part); names that are not digests
/// are skipped ([`for_each_object`] reports them).
pub fn for_each_object_in(
    layout: &Layout,
    first: std::ops::Range<u16>,
    mut f: impl FnMut(Digest) -> Result<(), CasError>,
) -> Result<(), CasError> {
    let dir = layout.objects_dir();
    for b in first {
        let fan = format!("{b:02x}");
        let fan_path = dir.join(&fan);
        if !fan_path.is_dir() {
            continue;
        }
        for_each_in_fan(&fan, &fan_path, &mut |what, _| match what {
            ObjectFile::Object(d) => f(d),
            ObjectFile::Alias(_) | ObjectFile::Stray => Ok(()),
        })?;
    }
    Ok(())
}

/// The objects of the fan-out directory of digests starting with byte `first`, in
/// digest order (names only: nothing is `stat`ed).
pub fn objects_in_fan(layout: &Layout, first: u8) -> Result<Vec<Digest>, CasError> {
    let mut out = Vec::new();
    for_each_object_in(layout, u16::from(first)..u16::from(first) + 1, |d| {
        out.push(d);
        Ok(())
    })?;
    out.sort_unstable();
    Ok(out)
}

/// `digests` with the sizes of their object files (what
/// [`MetaStore::adopt_unreferenced`] takes); an object deleted meanwhile is left out.
pub fn with_sizes(layout: &Layout, digests: &[Digest]) -> Result<Vec<(Digest, u64)>, CasError> {
    let objects = ObjectStore::new(layout);
    let mut out = Vec::with_capacity(digests.len());
    for d in digests {
        let path = objects.path(d);
        match fs::symlink_metadata(&path) {
            Ok(md) => out.push((*d, md.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CasError::io("stat", &path)(e)),
        }
    }
    Ok(out)
}

/// Removes everything in `cas/tmp` (call only when no ingest runs: at start, or under
/// the GC lock). Returns how many entries it removed.
pub fn sweep_tmp(layout: &Layout) -> Result<u64, CasError> {
    let (mut n, trees) = sweep_tmp_files(layout, &|_| false)?;
    for tree in trees {
        crate::layout::remove_tree(&tree)?;
        n += 1;
    }
    Ok(n)
}

/// The part of a sweep of `cas/tmp` that needs the GC lock: removes the files there (what
/// an ingest or apply writes in `cas/tmp` are files, and none runs while the GC lock is
/// held exclusively) and returns the directories, for the caller to delete once it has
/// let the lock go. Those are trees a Remove or a Commit moved there to delete, which no
/// ingest reads or writes; `busy` names the ones whose deleter is still at work, which
/// are left to it. Returns how many files it removed.
pub fn sweep_tmp_files(
    layout: &Layout,
    busy: &dyn Fn(&Path) -> bool,
) -> Result<(u64, Vec<std::path::PathBuf>), CasError> {
    let dir = layout.tmp_dir();
    let (mut n, mut trees) = (0, Vec::new());
    for e in fs::read_dir(&dir).map_err(CasError::io("read dir", &dir))? {
        let e = e.map_err(CasError::io("read dir", &dir))?;
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if !busy(&p) {
                trees.push(p);
            }
            continue;
        }
        match fs::remove_file(&p) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CasError::io("remove", &p)(e)),
        }
    }
    Ok((n, trees))
}

/// Objects named by the manifests of active snapshots (applied but not yet committed),
/// read from the store.
pub fn pending_objects(layout: &Layout, meta: &MetaStore) -> Result<HashSet<Digest>, CasError> {
    Ok(pending_layers(layout, meta)?
        .into_iter()
        .flat_map(|(_, objects)| objects)
        .collect())
}

/// The distinct objects of each active snapshot that has a manifest (a layer applied
/// and not committed yet), by snapshot id, read from the store.
fn pending_layers(
    layout: &Layout,
    meta: &MetaStore,
) -> Result<Vec<(u64, HashSet<Digest>)>, CasError> {
    let mut out = Vec::new();
    for (_, rec) in meta.all()? {
        if rec.kind != Kind::Active {
            continue;
        }
        let manifest = layout.manifest(rec.id);
        if !manifest.exists() {
            continue;
        }
        out.push((rec.id, manifest_objects(&manifest)?));
    }
    Ok(out)
}

fn manifest_objects(manifest: &Path) -> Result<HashSet<Digest>, CasError> {
    let mut objects = HashSet::new();
    for entry in read_manifest(manifest)? {
        objects.insert(entry?.digest);
    }
    Ok(objects)
}

/// What keeps objects between a layer's Apply and its Commit, in memory: the distinct
/// objects of each applied layer's manifest, by snapshot id. A collection's batch asks
/// it instead of reading every record and every such manifest again (a cost of the
/// snapshots' number, paid once per batch). The owner keeps it true: loaded at open
/// ([`PendingLayers::load`]), a layer added before its apply lets the GC lock go, and
/// taken away once its Commit's references landed or it was removed.
#[derive(Debug, Default)]
pub struct PendingLayers(std::sync::Mutex<HashMap<u64, HashSet<Digest>>>);

impl PendingLayers {
    /// The applied layers the store holds now (at open).
    pub fn load(layout: &Layout, meta: &MetaStore) -> Result<PendingLayers, CasError> {
        Ok(PendingLayers(std::sync::Mutex::new(
            pending_layers(layout, meta)?.into_iter().collect(),
        )))
    }

    fn layers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashSet<Digest>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Snapshot `id`'s layer was applied: its manifest's objects are kept.
    pub fn add(&self, id: u64, manifest: &Path) -> Result<(), CasError> {
        let objects = manifest_objects(manifest)?;
        self.layers().insert(id, objects);
        Ok(())
    }

    /// Snapshot `id`'s layer was committed (its references landed) or removed.
    pub fn remove(&self, id: u64) {
        self.layers().remove(&id);
    }

    /// How many applied layers there are.
    pub fn len(&self) -> usize {
        self.layers().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with a test of whether an applied layer names an object.
    pub fn with<T>(&self, f: impl FnOnce(&dyn Fn(&Digest) -> bool) -> T) -> T {
        let layers = self.layers();
        f(&|d| layers.values().any(|objects| objects.contains(d)))
    }
}

/// Whether nothing keeps `d`: no reference count, and `pending` (the applied layers'
/// manifests) does not name it.
fn is_garbage(
    meta: &MetaStore,
    pending: &dyn Fn(&Digest) -> bool,
    d: &Digest,
) -> Result<bool, CasError> {
    let n = meta
        .ref_count(d)
        .map_err(|e| CasError::io("read index", d.hex())(io::Error::other(e)))?;
    Ok(n == 0 && !pending(d))
}

/// Deletes one object (its alias first). Returns the bytes freed, if it was there.
fn remove_object(objects: &ObjectStore, d: &Digest, path: &Path) -> Result<Option<u64>, CasError> {
    let size = fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
    crate::crash_point!("gc.before-delete");
    // The alias first: a crash in between leaves an unreferenced object (the next GC
    // takes it), never an alias without its object.
    objects.remove_alias(d)?;
    match fs::remove_file(path) {
        Ok(()) => {
            crate::crash_point!("gc.after-delete");
            Ok(Some(size))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CasError::io("remove", path)(e)),
    }
}

/// Deletes those of `digests` that nothing keeps, in order, stopping early once
/// `deadline` has passed (after one at least); returns what it did (`scanned`: how many
/// it went through) and the fan-out directories it deleted from.
fn delete_garbage(
    layout: &Layout,
    meta: &MetaStore,
    digests: &[Digest],
    pending: &dyn Fn(&Digest) -> bool,
    deadline: Option<Instant>,
) -> Result<(GcStats, std::collections::BTreeSet<std::path::PathBuf>), CasError> {
    let objects = ObjectStore::new(layout);
    let mut stats = GcStats::default();
    let mut fans = std::collections::BTreeSet::new();
    for d in digests {
        if stats.scanned > 0 && deadline.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        stats.scanned += 1;
        if !is_garbage(meta, pending, d)? {
            continue;
        }
        let path = objects.path(d);
        if let Some(size) = remove_object(&objects, d, &path)? {
            stats.removed += 1;
            stats.freed_bytes += size;
            if let Some(fan) = path.parent() {
                fans.insert(fan.to_path_buf());
            }
        }
    }
    Ok((stats, fans))
}

/// Deletes those of `candidates` that nothing keeps (after a failed or abandoned apply:
/// the objects it published); `pending` names what the applied layers keep (see
/// [`PendingLayers`]). Same locking contract as [`collect`].
pub fn collect_objects(
    layout: &Layout,
    meta: &MetaStore,
    candidates: &[Digest],
    pending: &dyn Fn(&Digest) -> bool,
) -> Result<GcStats, CasError> {
    Ok(delete_garbage(layout, meta, candidates, pending, None)?.0)
}

/// Deletes the garbage among `batch` (GC candidates, see [`crate::index`]) and forgets
/// them all as candidates: one step of a collection proportional to the garbage. An
/// object referenced again, or named by an applied layer's manifest, is kept (the
/// latter is collected with its layer if that is removed uncommitted). Once `deadline`
/// has passed it stops, and the rest of `batch` stays candidates for the next one
/// (`scanned` says how many it took). `pending` names what the applied layers keep
/// (see [`PendingLayers`]). Same locking contract as [`collect`], for the duration of
/// the batch.
pub fn collect_batch(
    layout: &Layout,
    meta: &MetaStore,
    batch: &[Digest],
    pending: &dyn Fn(&Digest) -> bool,
    deadline: Instant,
) -> Result<GcStats, CasError> {
    let (stats, fans) = delete_garbage(layout, meta, batch, pending, Some(deadline))?;
    // A crash before this leaves candidates whose objects are gone: the next batch
    // finds nothing to delete and forgets them.
    crate::crash_point!("gc.before-forget");
    meta.drop_candidates(&batch[..stats.scanned as usize])
        .map_err(|e| CasError::io("write index", layout.index_dir())(io::Error::other(e)))?;
    for fan in fans {
        // ENOTEMPTY is the common case and fine
        let _ = fs::remove_dir(&fan);
    }
    Ok(stats)
}

/// Removes the aliases that are not a second name of an object they can name: legacy
/// ones against `kept` (the objects that stay, by legacy alias), the others against the
/// objects of their own fan-out directory, one directory at a time.
fn sweep_aliases(
    layout: &Layout,
    objects: &ObjectStore,
    kept: &HashMap<String, Vec<Digest>>,
    stats: &mut GcStats,
) -> Result<(), CasError> {
    let mut check = |alias: &str, owners: &[Digest], path: &Path| -> Result<(), CasError> {
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CasError::io("stat", path)(e)),
        };
        if md.nlink() > 1 {
            let target = StubTarget::Alias(alias.to_string());
            let mut owned = false;
            for d in owners {
                owned |= objects.target_is(&target, d)?;
            }
            if owned {
                return Ok(());
            }
        }
        match fs::remove_file(path) {
            Ok(()) => {
                stats.removed += 1;
                if md.nlink() == 1 {
                    stats.freed_bytes += md.len();
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CasError::io("remove", path)(e)),
        }
    };
    let dir = layout.objects_dir();
    for fan in fs::read_dir(&dir).map_err(CasError::io("read dir", &dir))? {
        let fan = fan.map_err(CasError::io("read dir", &dir))?;
        let name = fan.file_name().to_string_lossy().into_owned();
        if !fan.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if crate::digest::is_legacy_alias_name(&name) {
                let owners = kept.get(&name).map_or(&[][..], |v| v.as_slice());
                check(&name, owners, &fan.path())?;
            }
            continue;
        }
        let (mut digests, mut aliases) = (Vec::new(), Vec::new());
        for_each_in_fan(&name, &fan.path(), &mut |what, path| {
            match what {
                ObjectFile::Object(d) => digests.push(d),
                ObjectFile::Alias(alias) => aliases.push((alias, path)),
                ObjectFile::Stray => {}
            }
            Ok(())
        })?;
        if aliases.is_empty() {
            continue;
        }
        let mut owners: HashMap<String, Vec<Digest>> = HashMap::new();
        for d in digests {
            owners.entry(d.alias()).or_default().push(d);
        }
        for (alias, path) in aliases {
            let of = owners.get(&alias).map_or(&[][..], |v| v.as_slice());
            check(&alias, of, &path)?;
        }
    }
    Ok(())
}

/// Deletes unreferenced objects, scanning every object (`casctl gc` on a stopped store).
/// See the module docs for the locking contract. It also removes stray aliases, and
/// leaves the candidates complete and the index's counters recounted
/// ([`crate::admin::recount`]), durably.
pub fn collect(layout: &Layout, meta: &MetaStore) -> Result<GcStats, CasError> {
    let objects = ObjectStore::new(layout);
    // legacy alias -> the objects that stay and could own it
    // (a crafted prefix collision gives two objects one alias name: the alias is the
    // inode of whichever took it first)
    let mut kept: HashMap<String, Vec<Digest>> = HashMap::new();
    let mut stats = GcStats {
        tmp_removed: sweep_tmp(layout)?,
        ..GcStats::default()
    };
    let pending = pending_objects(layout, meta)?;
    let pending = |d: &Digest| pending.contains(d);
    // the owners of legacy aliases are needed only where there are some (aliases in
    // the fan-out directories are checked a directory at a time, below)
    let legacy = has_legacy_aliases(layout)?;
    for_each_object(layout, |digest, path| {
        stats.scanned += 1;
        let garbage = match &digest {
            Some(d) => is_garbage(meta, &pending, d)?,
            None => true,
        };
        if !garbage {
            if let (Some(d), true) = (digest, legacy) {
                kept.entry(d.legacy_alias()).or_default().push(d);
            }
            return Ok(());
        }
        let freed = match &digest {
            Some(d) => remove_object(&objects, d, &path)?,
            None => match fs::remove_file(&path) {
                Ok(()) => Some(0),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(CasError::io("remove", &path)(e)),
            },
        };
        if let Some(size) = freed {
            stats.removed += 1;
            stats.freed_bytes += size;
        }
        Ok(())
    })?;
    // Aliases whose object is gone (one link left: the alias itself) or that name
    // another object; both only after a crash or by hand.
    sweep_aliases(layout, &objects, &kept, &mut stats)?;
    // Every unreferenced object is gone (or kept by an applied layer, as a batch keeps
    // it): no candidate is left to collect, and nothing unreferenced is left that is not
    // a candidate.
    meta.clear_candidates()
        .and_then(|()| meta.set_candidates_complete(true))
        .map_err(|e| CasError::io("write index", layout.index_dir())(io::Error::other(e)))?;
    crate::admin::recount(layout, meta)?;
    // Fan-out directories left empty go too, so an emptied store is the bare layout.
    let dir = layout.objects_dir();
    for fan in fs::read_dir(&dir).map_err(CasError::io("read dir", &dir))? {
        let fan = fan.map_err(CasError::io("read dir", &dir))?.path();
        if fan.is_dir() {
            // ENOTEMPTY is the common case and fine
            let _ = fs::remove_dir(&fan);
        }
    }
    Ok(stats)
}
