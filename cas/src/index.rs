//! The index: snapshot metadata and object reference counts in sled (`<root>/index`).
//!
//! Keys of the single `snapshots` tree:
//!
//! ```text
//! 'S' <key>                                 -> JSON Record  (the snapshot)
//! 'C' <u32 BE len(parent)> <parent> <child> -> ''           (parent has this child)
//! 'B' <first 2 bytes of a sha256>          -> entries      (references: see below)
//! 'N'                                       -> u64 BE       (last snapshot id handed out)
//! 'P' <u64 BE id> <direction>               -> u64 BE       (reference chunks applied)
//! 'G' <32-byte sha256>                      -> u64 BE       (a GC candidate: its last reference went; its size)
//! 'T'                                       -> ''           (the candidates are complete)
//! 'K'                                       -> 4 x u64 BE   (the object counters)
//! ```
//!
//! References are kept by bucket: the objects whose digests share their first two bytes
//! share one entry, whose value is theirs in digest order, 38 bytes each (the other 30
//! bytes of the digest, then a `u64` BE count of the committed snapshots using the
//! object; an object no snapshot uses has none). sled keeps a page-table entry in memory
//! for every page of the tree whatever its cache, and a leaf page holds at most 16 keys:
//! with a key per object, the daemon's memory grew with the store by about 40 bytes per
//! object (55 MiB after opening a store of a million, 168 MiB at five million). With
//! 65,536 buckets the keys stay few however many objects there are; a reference change
//! rewrites one bucket (38 bytes per object in it: about 3 KiB at five million
//! objects). Measured (`cas-bench scale`): the RSS right after the open is 18, 20, 21
//! and 22 MiB at ten thousand, a hundred thousand, a million and five million objects,
//! and filling the five-million-object store took 611-642 s against 806-847 s with a
//! key per object. Indexes from before buckets (`'R' <sha256> -> u64 BE` per object) are
//! moved into them when opened ([`MetaStore::open_with_cache`]), a batch of whole
//! buckets at a time, so an interrupted move goes on at the next open.
//!
//! The counters ([`Counters`]) are what makes the store's figures constant-time: the
//! objects and bytes committed layers reference, and the GC candidates and their bytes,
//! changed in the same batch as the `R` and `G` entries they count (sizes come from the
//! manifests, and a candidate keeps its size in its `G` entry). A store whose index
//! predates them has no `K` entry until [`crate::admin::ensure_counters`] counts them once;
//! until then no change touches them. `casctl fsck` checks them against a scan.
//!
//! GC candidates make a collection proportional to the garbage, not to the store
//! ([`crate::gc::collect_batch`]): the batch that drops an object's last reference
//! also adds its `G` entry, and the one that references it again removes it. They are
//! *complete* (`T`) when every unreferenced object is a candidate, which a crash can break
//! (an ingest's objects published before its references); the daemon clears `T` at
//! every start after an unclean stop, and its next collection restores it by adding the
//! unreferenced objects as candidates a chunk at a time
//! ([`MetaStore::adopt_unreferenced`]), or a full collection does
//! ([`crate::gc::collect`]).
//!
//! Every record is mirrored in `snapshots/<id>/info` ([`write_info`]), written durably
//! *before* the index changes; with the manifests, those files are what
//! [`crate::admin::rebuild_index`] rebuilds the index from.
//!
//! One tree, so every mutation is one `apply_batch`: a record, its child edge and the
//! reference counts of its objects change together or not at all.
//!
//! Except for layers of many objects: sled holds a batch's every update in memory
//! until it lands, about 4 KiB per key, so one batch for a layer of 100,000 files took
//! the daemon past 400 MiB. References are then taken (or dropped) in chunks of
//! [`REF_CHUNK`] objects, each batch also recording in a `P` entry how many objects of
//! this snapshot are in; the last chunk goes with the record change and removes the
//! entry. A crash between chunks leaves the record unchanged and its mirror ahead of
//! it, so the reconcile at start calls the same rename or delete again, with the same
//! objects in the same order (a manifest's digests, sorted), and the call resumes after
//! the chunks already applied: no reference is counted twice or lost. Callers serialise
//! mutations (the daemon holds one writer lock, which is also what makes the
//! read-modify-write of counts safe) and [`MetaStore::flush`] before they answer, so what
//! containerd was told survives a `kill -9`. An object with no `R` entry is referenced by
//! no committed snapshot and may be collected. Snapshot ids come from sled's persistent monotonic counter and are never
//! reused, which is what lets directories be created *before* their record (an orphan
//! directory after a crash is swept, never mistaken for a live snapshot).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::layout::INFO_FILE;

const RECORD: u8 = b'S';
const CHILD: u8 = b'C';
/// Per-object references, as indexes from before buckets kept them.
const LEGACY_REF: u8 = b'R';
const REF_BUCKET: u8 = b'B';
/// Bytes of one object's entry in its bucket: the digest past the bucket's two bytes,
/// then its count.
const BUCKET_ENTRY: usize = 30 + 8;
/// References written into buckets per batch when they are moved in from an index of
/// before buckets or set by a rebuild (whole buckets: a little more).
const BUCKET_BATCH: usize = 4096;
const NEXT_ID: &[u8] = b"N";
const PROGRESS: u8 = b'P';
const CANDIDATE: u8 = b'G';
const CANDIDATES_COMPLETE: &[u8] = b"T";
const COUNTERS: &[u8] = b"K";
/// Objects whose references one batch changes; see the module docs. sled's memory for
/// one batch grows faster than its size: 100,000 references set in batches of 4,096 took
/// the process to 312 MiB, in batches of 256 to 41 MiB, in the same time (1.1 s).
pub const REF_CHUNK: usize = 256;
/// The chunk size of `P` entries written before they counted objects.
const LEGACY_REF_CHUNK: u64 = 4096;
/// Flags a `P` entry's count as objects rather than chunks.
const PROGRESS_OBJECTS: u64 = 1 << 63;
/// sled's page cache unless configured (`[store] index_cache_mib`). sled's own default
/// (1 GiB) lets the daemon's memory grow with every object ever referenced; the index is
/// read mostly by key, from the kernel's page cache when not from this one. Measured
/// (`cas-bench scale`, 300,000 objects): 8 MiB keeps the process at 78 MiB against 104
/// MiB with 32, for the same request latencies and fill time.
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// No snapshot has this key.
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    /// sled failed.
    #[error("metadata index: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded (index corruption).
    #[error("metadata record of {key:?} is corrupt: {source}")]
    Corrupt {
        /// The snapshot whose record failed to decode.
        key: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A read-only view of a committed parent; cannot be committed.
    View,
    /// A writable snapshot being built (by an unpack or a container).
    Active,
    /// An immutable layer that others may use as parent.
    Committed,
}

impl Kind {
    /// containerd's filter value for this kind (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot's own tree (not its parents').
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Bytes allocated (512-byte blocks × 512), each inode counted once.
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// A snapshot's metadata record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Directory name under `snapshots/`; never reused.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Key of the (committed) parent, if any.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: SystemTime,
    /// Last change of labels (equal to `created` until the first update).
    pub updated: SystemTime,
    /// Usage recorded at commit time (committed snapshots only).
    pub usage: DiskUsage,
    /// Bytes of the layer's regular files, each inode once: what a non-deduplicating
    /// snapshotter stores for this layer (committed snapshots only).
    #[serde(default)]
    pub logical_bytes: u64,
}

/// The objects the index accounts for (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Objects at least one committed snapshot references.
    pub referenced_objects: u64,
    /// Their bytes.
    pub referenced_bytes: u64,
    /// GC candidates: objects whose last reference went, until a collection takes them.
    pub candidate_objects: u64,
    /// Their bytes.
    pub candidate_bytes: u64,
}

impl Counters {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let fields = [
            self.referenced_objects,
            self.referenced_bytes,
            self.candidate_objects,
            self.candidate_bytes,
        ];
        for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Counters> {
        let bytes = <&[u8; 32]>::try_from(bytes).ok()?;
        let f = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Some(Counters {
            referenced_objects: f(0),
            referenced_bytes: f(1),
            candidate_objects: f(2),
            candidate_bytes: f(3),
        })
    }

    fn add_candidate(&mut self, size: u64) {
        self.candidate_objects += 1;
        self.candidate_bytes += size;
    }

    fn drop_candidate(&mut self, size: u64) {
        self.candidate_objects = self.candidate_objects.saturating_sub(1);
        self.candidate_bytes = self.candidate_bytes.saturating_sub(size);
    }
}

fn be_u64(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

/// The metadata index (a cheap handle; clones share the database).
#[derive(Clone)]
pub struct MetaStore {
    db: sled::Db,
    tree: sled::Tree,
    /// How many times this process marked the candidates incomplete; a scan that
    /// restores them marks them complete only if none came meanwhile
    /// ([`MetaStore::complete_candidates_since`]).
    incomplete_marks: std::sync::Arc<std::sync::Mutex<u64>>,
}

fn record_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(RECORD);
    k.extend_from_slice(key.as_bytes());
    k
}

fn child_prefix(parent: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + parent.len());
    k.push(CHILD);
    k.extend_from_slice(&(parent.len() as u32).to_be_bytes());
    k.extend_from_slice(parent.as_bytes());
    k
}

fn child_key(parent: &str, child: &str) -> Vec<u8> {
    let mut k = child_prefix(parent);
    k.extend_from_slice(child.as_bytes());
    k
}

/// The `P` entry of snapshot `id`'s references being taken (`+1`) or dropped (`-1`).
fn progress_key(id: u64, delta: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(PROGRESS);
    k.extend_from_slice(&id.to_be_bytes());
    k.push(if delta > 0 { b'+' } else { b'-' });
    k
}

fn candidate_key(d: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(CANDIDATE);
    k.extend_from_slice(d.as_bytes());
    k
}

/// The key of the bucket holding `d`'s references.
fn bucket_key(d: &Digest) -> [u8; 3] {
    let b = d.as_bytes();
    [REF_BUCKET, b[0], b[1]]
}

/// One bucket of references: entries of [`BUCKET_ENTRY`] bytes in digest order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Bucket(Vec<u8>);

impl Bucket {
    /// A bucket's value as stored (a torn tail, which sled's atomic writes never leave,
    /// is ignored).
    fn decode(v: &[u8]) -> Bucket {
        Bucket(v[..v.len() - v.len() % BUCKET_ENTRY].to_vec())
    }

    fn len(&self) -> usize {
        self.0.len() / BUCKET_ENTRY
    }

    fn suffix(&self, i: usize) -> &[u8] {
        &self.0[i * BUCKET_ENTRY..i * BUCKET_ENTRY + 30]
    }

    /// Where `d` is (`Ok`) or would go (`Err`).
    fn find(&self, d: &Digest) -> Result<usize, usize> {
        let want = &d.as_bytes()[2..];
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.suffix(mid).cmp(want) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    fn get(&self, d: &Digest) -> u64 {
        match self.find(d) {
            Ok(i) => be_u64(&self.0[i * BUCKET_ENTRY + 30..(i + 1) * BUCKET_ENTRY]),
            Err(_) => 0,
        }
    }

    /// Sets `d`'s count; 0 removes its entry.
    fn set(&mut self, d: &Digest, n: u64) {
        match (self.find(d), n) {
            (Ok(i), 0) => {
                self.0.drain(i * BUCKET_ENTRY..(i + 1) * BUCKET_ENTRY);
            }
            (Ok(i), n) => {
                self.0[i * BUCKET_ENTRY + 30..(i + 1) * BUCKET_ENTRY]
                    .copy_from_slice(&n.to_be_bytes());
            }
            (Err(_), 0) => {}
            (Err(i), n) => {
                let at = i * BUCKET_ENTRY;
                let mut entry = [0u8; BUCKET_ENTRY];
                entry[..30].copy_from_slice(&d.as_bytes()[2..]);
                entry[30..].copy_from_slice(&n.to_be_bytes());
                self.0.splice(at..at, entry);
            }
        }
    }

    /// Its objects and their counts, in digest order; `key` is the bucket's.
    fn entries(&self, key: &[u8]) -> impl Iterator<Item = (Digest, u64)> + '_ {
        let (a, b) = (key.get(1).copied(), key.get(2).copied());
        self.0.chunks_exact(BUCKET_ENTRY).filter_map(move |e| {
            let mut d = [0u8; 32];
            d[0] = a?;
            d[1] = b?;
            d[2..].copy_from_slice(&e[..30]);
            Some((Digest::from_bytes(d), be_u64(&e[30..])))
        })
    }

    /// Puts the bucket in `batch` (removes it when empty).
    fn write(self, batch: &mut sled::Batch, key: [u8; 3]) {
        if self.0.is_empty() {
            batch.remove(&key[..]);
        } else {
            batch.insert(&key[..], self.0);
        }
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, IndexError> {
    serde_json::from_slice(bytes).map_err(|source| IndexError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode(rec: &Record) -> Vec<u8> {
    // Serialising plain data (strings, integers, SystemTime after the epoch) cannot fail.
    serde_json::to_vec(rec).unwrap_or_default()
}

impl MetaStore {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> Result<MetaStore, IndexError> {
        MetaStore::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the index in `dir` with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<MetaStore, IndexError> {
        let config = sled::Config::new().path(dir).cache_capacity(cache_bytes);
        // A handle just dropped (a reopen in the same process) lets go of sled's file
        // lock from its background threads, a moment later: wait for it, briefly.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if tries < 50 && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        let tree = db.open_tree("snapshots")?;
        if tree.is_empty() {
            // a new index counts from zero; an old one waits for its first count
            tree.insert(COUNTERS, &Counters::default().encode())?;
        }
        let meta = MetaStore {
            db,
            tree,
            incomplete_marks: Default::default(),
        };
        let started = std::time::Instant::now();
        let moved = meta.migrate_legacy_refs()?;
        if moved > 0 {
            tracing::info!(
                objects = moved,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index: references moved into buckets"
            );
        }
        Ok(meta)
    }

    /// Moves per-object references (indexes from before buckets) into buckets, whole
    /// buckets per batch, each batch removing the entries it moved; returns how many.
    fn migrate_legacy_refs(&self) -> Result<u64, IndexError> {
        let mut moved = 0u64;
        loop {
            let mut batch = sled::Batch::default();
            let mut buckets: BTreeMap<[u8; 3], Bucket> = BTreeMap::new();
            let mut n = 0usize;
            for item in self.tree.range([LEGACY_REF]..[LEGACY_REF + 1]) {
                let (k, v) = item?;
                let Ok(d) = <[u8; 32]>::try_from(&k[1..]).map(Digest::from_bytes) else {
                    // not a reference entry: nothing reads it
                    batch.remove(k);
                    continue;
                };
                let key = bucket_key(&d);
                if n >= BUCKET_BATCH && !buckets.contains_key(&key) {
                    break;
                }
                self.cached(&mut buckets, key)?.set(&d, be_u64(&v));
                batch.remove(k);
                n += 1;
            }
            if n == 0 && buckets.is_empty() {
                // malformed leftovers only, if anything
                self.tree.apply_batch(batch)?;
                break;
            }
            for (key, b) in buckets {
                b.write(&mut batch, key);
            }
            self.tree.apply_batch(batch)?;
            moved += n as u64;
        }
        if moved > 0 {
            self.db.flush()?;
        }
        Ok(moved)
    }

    /// The bucket at `key` as `buckets` holds it, read into it first if it does not.
    fn cached<'a>(
        &self,
        buckets: &'a mut BTreeMap<[u8; 3], Bucket>,
        key: [u8; 3],
    ) -> Result<&'a mut Bucket, IndexError> {
        use std::collections::btree_map::Entry;
        Ok(match buckets.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(self.bucket(&key)?),
        })
    }

    /// The bucket at `key` (empty when there is none).
    fn bucket(&self, key: &[u8; 3]) -> Result<Bucket, IndexError> {
        Ok(self
            .tree
            .get(key)?
            .map(|v| Bucket::decode(&v))
            .unwrap_or_default())
    }

    /// The object counters, or `None` for an index that predates them (see the module
    /// docs).
    pub fn counters(&self) -> Result<Option<Counters>, IndexError> {
        Ok(self.tree.get(COUNTERS)?.and_then(|v| Counters::decode(&v)))
    }

    /// Sets the counters (after counting them from a scan) and the sizes the GC
    /// candidates carry.
    pub fn set_counters(
        &self,
        counters: &Counters,
        candidate_sizes: &[(Digest, u64)],
    ) -> Result<(), IndexError> {
        for c in candidate_sizes.chunks(REF_CHUNK) {
            let mut batch = sled::Batch::default();
            for (d, size) in c {
                batch.insert(candidate_key(d), &size.to_be_bytes());
            }
            self.tree.apply_batch(batch)?;
        }
        self.tree.insert(COUNTERS, &counters.encode())?;
        Ok(())
    }

    /// Drops the counters, as an index from before them has none (tests).
    #[cfg(test)]
    pub(crate) fn forget_counters(&self) -> Result<(), IndexError> {
        self.tree.remove(COUNTERS)?;
        Ok(())
    }

    /// Every GC candidate and the size its entry records.
    pub fn candidate_sizes(&self) -> Result<Vec<(Digest, u64)>, IndexError> {
        self.candidate_entries().collect()
    }

    /// The GC candidates' entries in digest order: each digest and its recorded size.
    fn candidate_entries(&self) -> impl Iterator<Item = Result<(Digest, u64), IndexError>> + '_ {
        self.candidates_in(0..256)
    }

    /// The GC candidates whose digest's first byte is in `first` (see
    /// [`crate::parts::Parts::first_bytes`]), in digest order, with their recorded sizes.
    pub fn candidates_in(
        &self,
        first: std::ops::Range<u16>,
    ) -> impl Iterator<Item = Result<(Digest, u64), IndexError>> + '_ {
        self.digest_entries(CANDIDATE, first)
    }

    /// The reference counts of the objects whose digest's first byte is in `first`, in
    /// digest order.
    pub fn refs_in(
        &self,
        first: std::ops::Range<u16>,
    ) -> impl Iterator<Item = Result<(Digest, u64), IndexError>> + '_ {
        self.by_first_byte(REF_BUCKET, first)
            .flat_map(|item| match item {
                Err(e) => vec![Err(e.into())],
                Ok((k, v)) => Bucket::decode(&v).entries(&k).map(Ok).collect(),
            })
    }

    /// The entries of kind `prefix` whose key's next byte (a digest's first) is in
    /// `first`, in key order.
    fn by_first_byte(
        &self,
        prefix: u8,
        first: std::ops::Range<u16>,
    ) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + '_ {
        let start = vec![prefix, first.start.min(255) as u8];
        let end = match first.end {
            256.. => vec![prefix + 1],
            e => vec![prefix, e as u8],
        };
        let empty = first.is_empty();
        self.tree.range(start..end).filter(move |_| !empty)
    }

    /// The entries of kind `prefix` (keyed by a digest, holding a big-endian `u64`)
    /// whose digest's first byte is in `first`.
    fn digest_entries(
        &self,
        prefix: u8,
        first: std::ops::Range<u16>,
    ) -> impl Iterator<Item = Result<(Digest, u64), IndexError>> + '_ {
        self.by_first_byte(prefix, first)
            .filter_map(|item| match item {
                Err(e) => Some(Err(e.into())),
                Ok((k, v)) => <[u8; 32]>::try_from(&k[1..])
                    .ok()
                    .map(|d| Ok((Digest::from_bytes(d), be_u64(&v)))),
            })
    }

    /// A fresh snapshot id (never 0).
    pub fn next_id(&self) -> Result<u64, IndexError> {
        let v = self.tree.update_and_fetch(NEXT_ID, |old| {
            let n = old
                .and_then(|o| <[u8; 8]>::try_from(o).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1))
    }

    /// Makes every id up to `id` count as handed out.
    pub fn reserve_ids_through(&self, id: u64) -> Result<(), IndexError> {
        self.tree.update_and_fetch(NEXT_ID, |old| {
            let n = old
                .and_then(|o| <[u8; 8]>::try_from(o).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some(n.max(id).to_be_bytes().to_vec())
        })?;
        Ok(())
    }

    /// The record of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Record>, IndexError> {
        match self.tree.get(record_key(key))? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The record of `key`, or `NotFound`.
    pub fn require(&self, key: &str) -> Result<Record, IndexError> {
        self.get(key)?
            .ok_or_else(|| IndexError::NotFound(key.to_string()))
    }

    /// Whether any snapshot names `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool, IndexError> {
        Ok(self
            .tree
            .scan_prefix(child_prefix(key))
            .next()
            .transpose()?
            .is_some())
    }

    /// The ids of `rec`'s ancestors, immediate parent first.
    pub fn parent_ids(&self, rec: &Record) -> Result<Vec<u64>, IndexError> {
        let mut ids = Vec::new();
        let mut next = rec.parent.clone();
        while let Some(key) = next {
            let parent = self.require(&key)?;
            ids.push(parent.id);
            next = parent.parent;
        }
        Ok(ids)
    }

    /// Inserts a new snapshot and its parent edge.
    pub fn insert(&self, key: &str, rec: &Record) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        batch.insert(record_key(key), encode(rec));
        if let Some(parent) = &rec.parent {
            batch.insert(child_key(parent, key), &[]);
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Replaces the record of an existing `key` (labels update).
    pub fn put(&self, key: &str, rec: &Record) -> Result<(), IndexError> {
        self.tree.insert(record_key(key), encode(rec))?;
        Ok(())
    }

    /// Moves the snapshot at `old` to `new` with record `rec` (Commit: key → name) and
    /// takes one reference on each of `objects` (distinct digests, with their sizes).
    pub fn rename(
        &self,
        old: &str,
        new: &str,
        rec: &Record,
        objects: &[(Digest, u64)],
    ) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        batch.remove(record_key(old));
        batch.insert(record_key(new), encode(rec));
        if let Some(parent) = &rec.parent {
            batch.remove(child_key(parent, old));
            batch.insert(child_key(parent, new), &[]);
        }
        self.change_refs(rec.id, batch, objects, 1, REF_CHUNK, None)
    }

    /// Deletes `key`'s record and parent edge and drops its references on `objects`.
    pub fn delete(
        &self,
        key: &str,
        rec: &Record,
        objects: &[(Digest, u64)],
    ) -> Result<(), IndexError> {
        let mut batch = sled::Batch::default();
        batch.remove(record_key(key));
        if let Some(parent) = &rec.parent {
            batch.remove(child_key(parent, key));
        }
        // a Commit that failed between chunks and is never retried: its entry goes too
        batch.remove(progress_key(rec.id, 1));
        self.change_refs(rec.id, batch, objects, -1, REF_CHUNK, None)
    }

    /// Applies `last` (a record change of snapshot `id`) with `delta` on the references
    /// of `objects`: in one batch when they fit in one chunk of `chunk`, else chunk by
    /// chunk, resuming after the chunks a `P` entry says are in (see the module docs).
    /// `stop_after` ends the call after that many chunk batches, as a crash would (tests).
    fn change_refs(
        &self,
        id: u64,
        mut last: sled::Batch,
        objects: &[(Digest, u64)],
        delta: i64,
        chunk: usize,
        stop_after: Option<usize>,
    ) -> Result<(), IndexError> {
        let progress = progress_key(id, delta);
        // how many of `objects` an interrupted call already took: an entry counts them
        // (flagged), or, written by an older version, its chunks of the size it used
        let done = match self
            .tree
            .get(&progress)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
        {
            None => 0,
            Some(v) if v & PROGRESS_OBJECTS != 0 => v & !PROGRESS_OBJECTS,
            Some(chunks) => chunks.saturating_mul(LEGACY_REF_CHUNK),
        };
        let done = (done as usize).min(objects.len());
        let chunks: Vec<&[(Digest, u64)]> = objects[done..].chunks(chunk.max(1)).collect();
        let Some((final_chunk, earlier)) = chunks.split_last() else {
            last.remove(progress);
            return Ok(self.tree.apply_batch(last)?);
        };
        let mut taken = done;
        for (n, c) in earlier.iter().enumerate() {
            if stop_after == Some(n) {
                return Ok(());
            }
            let mut batch = sled::Batch::default();
            self.adjust_refs(&mut batch, c, delta)?;
            taken += c.len();
            batch.insert(
                progress.clone(),
                &(taken as u64 | PROGRESS_OBJECTS).to_be_bytes(),
            );
            self.tree.apply_batch(batch)?;
        }
        self.adjust_refs(&mut last, final_chunk, delta)?;
        last.remove(progress);
        Ok(self.tree.apply_batch(last)?)
    }

    /// Adds `delta` to the references of `objects` in `batch`, with the candidates and
    /// counters that follow.
    fn adjust_refs(
        &self,
        batch: &mut sled::Batch,
        objects: &[(Digest, u64)],
        delta: i64,
    ) -> Result<(), IndexError> {
        let mut counters = self.counters()?;
        let mut buckets: BTreeMap<[u8; 3], Bucket> = BTreeMap::new();
        for (d, size) in objects {
            let bucket = self.cached(&mut buckets, bucket_key(d))?;
            let old = bucket.get(d) as i64;
            let n = old + delta;
            if n > 0 {
                bucket.set(d, n as u64);
                if n == 1 && delta > 0 {
                    // referenced again before a collection took it
                    let was = self.tree.get(candidate_key(d))?;
                    batch.remove(candidate_key(d));
                    if let Some(c) = counters.as_mut() {
                        if let Some(v) = was {
                            c.drop_candidate(be_u64(&v));
                        }
                        c.referenced_objects += 1;
                        c.referenced_bytes += size;
                    }
                }
            } else {
                bucket.set(d, 0);
                let was = self.tree.get(candidate_key(d))?;
                batch.insert(candidate_key(d), &size.to_be_bytes());
                if let Some(c) = counters.as_mut() {
                    if old > 0 {
                        c.referenced_objects = c.referenced_objects.saturating_sub(1);
                        c.referenced_bytes = c.referenced_bytes.saturating_sub(*size);
                    }
                    if let Some(v) = was {
                        c.drop_candidate(be_u64(&v));
                    }
                    c.add_candidate(*size);
                }
            }
        }
        for (key, b) in buckets {
            b.write(batch, key);
        }
        if let Some(c) = counters {
            batch.insert(COUNTERS, &c.encode());
        }
        Ok(())
    }

    /// Up to `limit` GC candidates, in digest order.
    pub fn candidates(&self, limit: usize) -> Result<Vec<Digest>, IndexError> {
        self.candidate_entries()
            .take(limit)
            .map(|e| e.map(|(d, _)| d))
            .collect()
    }

    /// Forgets these candidates (collected, or kept by something).
    pub fn drop_candidates(&self, done: &[Digest]) -> Result<(), IndexError> {
        let mut counters = self.counters()?;
        let mut batch = sled::Batch::default();
        for d in done {
            if let Some(v) = self.tree.get(candidate_key(d))? {
                batch.remove(candidate_key(d));
                if let Some(c) = counters.as_mut() {
                    c.drop_candidate(be_u64(&v));
                }
            }
        }
        if let Some(c) = counters {
            batch.insert(COUNTERS, &c.encode());
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Those of `digests` that no committed snapshot references and that are not GC
    /// candidates (each bucket read once however many of them it holds).
    pub fn unreferenced(&self, digests: &[Digest]) -> Result<Vec<Digest>, IndexError> {
        let mut buckets: BTreeMap<[u8; 3], Bucket> = BTreeMap::new();
        let mut out = Vec::new();
        for d in digests {
            if self.nobodys(&mut buckets, d)? {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// Whether `d` has no reference and no candidate entry (its bucket read through
    /// `buckets`).
    fn nobodys(
        &self,
        buckets: &mut BTreeMap<[u8; 3], Bucket>,
        d: &Digest,
    ) -> Result<bool, IndexError> {
        Ok(self.cached(buckets, bucket_key(d))?.get(d) == 0
            && !self.tree.contains_key(candidate_key(d))?)
    }

    /// Makes GC candidates of those of `objects` (digest, size) that no committed
    /// snapshot references and that are not candidates yet, in one batch, with the
    /// counters; returns how many it added. This is how the candidates become complete
    /// again without a collection under one long hold (see [`crate::gc`]): an object an
    /// ingest is about to reference is safe as a candidate, since a collection checks
    /// its references again and the Commit that references it removes the entry. The
    /// caller serialises it with every other index change (the daemon's writer lock).
    pub fn adopt_unreferenced(&self, objects: &[(Digest, u64)]) -> Result<u64, IndexError> {
        let mut counters = self.counters()?;
        let mut buckets: BTreeMap<[u8; 3], Bucket> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        let mut adopted = 0;
        for (d, size) in objects {
            if !self.nobodys(&mut buckets, d)? {
                continue;
            }
            batch.insert(candidate_key(d), &size.to_be_bytes());
            if let Some(c) = counters.as_mut() {
                c.add_candidate(*size);
            }
            adopted += 1;
        }
        if adopted > 0 {
            if let Some(c) = counters {
                batch.insert(COUNTERS, &c.encode());
            }
            self.tree.apply_batch(batch)?;
        }
        Ok(adopted)
    }

    /// Forgets every candidate (after a full scan collected every unreferenced object).
    pub fn clear_candidates(&self) -> Result<(), IndexError> {
        loop {
            let batch = self.candidates(REF_CHUNK)?;
            if batch.is_empty() {
                return Ok(());
            }
            self.drop_candidates(&batch)?;
        }
    }

    /// Whether every unreferenced object is a candidate (see the module docs).
    pub fn candidates_complete(&self) -> Result<bool, IndexError> {
        Ok(self.tree.contains_key(CANDIDATES_COMPLETE)?)
    }

    /// Marks the candidates complete (after a full scan) or not (after a crash, or a
    /// failure that may leave unreferenced objects behind).
    pub fn set_candidates_complete(&self, complete: bool) -> Result<(), IndexError> {
        let mut marks = self.marks();
        if complete {
            self.tree.insert(CANDIDATES_COMPLETE, &[])?;
        } else {
            *marks += 1;
            self.tree.remove(CANDIDATES_COMPLETE)?;
        }
        Ok(())
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, u64> {
        self.incomplete_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// How many times this process has marked the candidates incomplete: what a scan
    /// that restores them reads before it begins.
    pub fn incomplete_marks(&self) -> u64 {
        *self.marks()
    }

    /// Marks the candidates complete unless they were marked incomplete since `marks`
    /// ([`MetaStore::incomplete_marks`] when the scan began: a failure meanwhile may have
    /// left an unreferenced object where the scan had already been). Returns whether it
    /// did.
    pub fn complete_candidates_since(&self, marks: u64) -> Result<bool, IndexError> {
        let now = self.marks();
        if *now != marks {
            return Ok(false);
        }
        self.tree.insert(CANDIDATES_COMPLETE, &[])?;
        Ok(true)
    }

    /// How many committed snapshots reference the object `d`.
    pub fn ref_count(&self, d: &Digest) -> Result<u64, IndexError> {
        Ok(self.bucket(&bucket_key(d))?.get(d))
    }

    /// Every referenced object and its count.
    pub fn refs(&self) -> Result<Vec<(Digest, u64)>, IndexError> {
        self.refs_in(0..256).collect()
    }

    /// Sets reference counts wholesale (index rebuild).
    pub fn set_refs(
        &self,
        counts: &std::collections::HashMap<Digest, u64>,
    ) -> Result<(), IndexError> {
        // a fresh index, renamed into place once complete: no need for one batch
        let mut buckets: BTreeMap<[u8; 3], Bucket> = BTreeMap::new();
        for (d, n) in counts {
            self.cached(&mut buckets, bucket_key(d))?.set(d, *n);
        }
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for (key, b) in buckets {
            in_batch += b.len();
            b.write(&mut batch, key);
            if in_batch >= BUCKET_BATCH {
                self.tree.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes every applied mutation durable, from synchronous code.
    pub fn flush_blocking(&self) -> Result<(), IndexError> {
        self.db.flush()?;
        Ok(())
    }

    /// Every snapshot, in key order.
    pub fn all(&self) -> Result<Vec<(String, Record)>, IndexError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([RECORD]) {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k[1..]).into_owned();
            let rec = decode(&key, &v)?;
            out.push((key, rec));
        }
        Ok(out)
    }

    /// Makes every applied mutation durable.
    pub async fn flush(&self) -> Result<(), IndexError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// The on-disk mirror of a record: `snapshots/<id>/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoFile {
    /// The snapshot's key (or name, once committed).
    pub key: String,
    /// Its record.
    pub record: Record,
}

/// Durably writes the mirror of `rec` into `snapshot_dir`.
pub fn write_info(snapshot_dir: &Path, key: &str, rec: &Record) -> Result<(), crate::CasError> {
    let info = InfoFile {
        key: key.to_string(),
        record: rec.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&info).unwrap_or_default();
    ringio::durable::replace_file(&snapshot_dir.join(INFO_FILE), &bytes)?;
    Ok(())
}

/// Reads the mirror in `snapshot_dir`.
pub fn read_info(snapshot_dir: &Path) -> Result<InfoFile, crate::CasError> {
    let path = snapshot_dir.join(INFO_FILE);
    let bytes = std::fs::read(&path).map_err(crate::CasError::io("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| crate::CasError::Manifest {
        path,
        line: e.line(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, kind: Kind, parent: Option<&str>) -> Record {
        let now = SystemTime::now();
        Record {
            id,
            kind,
            parent: parent.map(str::to_string),
            labels: BTreeMap::new(),
            created: now,
            updated: now,
            usage: DiskUsage::default(),
            logical_bytes: 0,
        }
    }

    #[test]
    fn insert_rename_delete_keep_child_edges() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        m.insert("base", &rec(1, Kind::Committed, None)).unwrap();
        m.insert("act", &rec(2, Kind::Active, Some("base")))
            .unwrap();
        assert!(m.has_children("base").unwrap());
        // a key that is a prefix of another must not see its children
        m.insert("bas", &rec(3, Kind::Committed, None)).unwrap();
        assert!(!m.has_children("bas").unwrap());

        let mut c = m.require("act").unwrap();
        c.kind = Kind::Committed;
        let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));
        m.rename("act", "layer", &c, &[(x, 1), (y, 1)]).unwrap();
        assert_eq!(m.ref_count(&x).unwrap(), 1);
        assert!(m.get("act").unwrap().is_none());
        assert_eq!(m.parent_ids(&m.require("layer").unwrap()).unwrap(), vec![1]);
        assert!(m.has_children("base").unwrap());

        m.delete("layer", &c, &[(x, 1)]).unwrap();
        assert_eq!(m.ref_count(&x).unwrap(), 0);
        assert_eq!(m.refs().unwrap(), vec![(y, 1)]);
        assert!(!m.has_children("base").unwrap());
        let keys: Vec<_> = m.all().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["bas", "base"]);
    }

    #[test]
    fn references_in_chunks_resume_after_a_crash_between_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let objects: Vec<(Digest, u64)> = (0u32..10)
            .map(|i| (Digest::of(&i.to_be_bytes()), 4))
            .collect();
        let shared = objects[7];
        m.insert("other", &rec(1, Kind::Committed, None)).unwrap();
        m.change_refs(1, sled::Batch::default(), &[shared], 1, 3, None)
            .unwrap();
        m.insert("act", &rec(2, Kind::Active, None)).unwrap();
        let mut c = m.require("act").unwrap();
        c.kind = Kind::Committed;
        let commit = |stop| {
            let mut b = sled::Batch::default();
            b.remove(record_key("act"));
            b.insert(record_key("layer"), encode(&c));
            m.change_refs(2, b, &objects, 1, 3, stop)
        };
        // a crash after two of the four batches: record unchanged, 6 references in
        commit(Some(2)).unwrap();
        assert!(m.get("act").unwrap().is_some() && m.get("layer").unwrap().is_none());
        assert_eq!(m.refs().unwrap().iter().map(|(_, n)| n).sum::<u64>(), 1 + 6);
        // the call again (the reconcile at start) resumes: every object once
        commit(None).unwrap();
        assert!(m.get("act").unwrap().is_none() && m.get("layer").unwrap().is_some());
        for (d, _) in &objects {
            let want = if (*d, 4) == shared { 2 } else { 1 };
            assert_eq!(m.ref_count(d).unwrap(), want, "{d}");
        }
        assert!(m.tree.scan_prefix([PROGRESS]).next().is_none());
        // a remove interrupted after one batch, then completed
        let remove = |stop| {
            let mut b = sled::Batch::default();
            b.remove(record_key("layer"));
            m.change_refs(2, b, &objects, -1, 3, stop)
        };
        remove(Some(1)).unwrap();
        assert!(m.get("layer").unwrap().is_some());
        remove(None).unwrap();
        assert!(m.get("layer").unwrap().is_none());
        assert_eq!(m.refs().unwrap(), vec![(shared.0, 1)]);
        assert!(m.tree.scan_prefix([PROGRESS]).next().is_none());
        // resumed chunks count every object once
        let c = m.counters().unwrap().unwrap();
        assert_eq!((c.referenced_objects, c.referenced_bytes), (1, 4));
        assert_eq!((c.candidate_objects, c.candidate_bytes), (9, 36));
    }

    /// A `P` entry an older version wrote counts chunks of 4,096 objects: a call with
    /// today's chunks resumes after them.
    #[test]
    fn references_resume_after_chunks_an_older_version_counted() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let objects: Vec<(Digest, u64)> = (0u32..5000)
            .map(|i| (Digest::of(&i.to_be_bytes()), 1))
            .collect();
        m.insert("act", &rec(1, Kind::Active, None)).unwrap();
        // what the older version left: its first chunk in, and the entry saying so
        let mut b = sled::Batch::default();
        m.adjust_refs(&mut b, &objects[..4096], 1).unwrap();
        b.insert(progress_key(1, 1), &1u64.to_be_bytes());
        m.tree.apply_batch(b).unwrap();
        let mut c = m.require("act").unwrap();
        c.kind = Kind::Committed;
        m.rename("act", "layer", &c, &objects).unwrap();
        assert!(objects.iter().all(|(d, _)| m.ref_count(d).unwrap() == 1));
        assert_eq!(m.counters().unwrap().unwrap().referenced_objects, 5000);
        assert!(m.tree.scan_prefix([PROGRESS]).next().is_none());
    }

    /// The counters follow references and candidates through every change: a commit,
    /// a remove, a reference taken again before a collection, a collection.
    #[test]
    fn counters_follow_references_and_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let counters = || m.counters().unwrap().unwrap();
        assert_eq!(counters(), Counters::default());
        let (x, y, z) = (Digest::of(b"x"), Digest::of(b"y"), Digest::of(b"z"));
        let layer = |key: &str, id: u64, objects: &[(Digest, u64)]| {
            m.insert(&format!("{key}-act"), &rec(id, Kind::Active, None))
                .unwrap();
            let c = rec(id, Kind::Committed, None);
            m.rename(&format!("{key}-act"), key, &c, objects).unwrap();
            c
        };
        let a = layer("a", 1, &[(x, 10), (y, 20)]);
        let b = layer("b", 2, &[(y, 20), (z, 30)]);
        let want = |r, rb, c, cb| Counters {
            referenced_objects: r,
            referenced_bytes: rb,
            candidate_objects: c,
            candidate_bytes: cb,
        };
        assert_eq!(counters(), want(3, 60, 0, 0));
        m.delete("a", &a, &[(x, 10), (y, 20)]).unwrap();
        assert_eq!(
            counters(),
            want(2, 50, 1, 10),
            "x is a candidate, y still held"
        );
        layer("c", 3, &[(x, 10)]);
        assert_eq!(counters(), want(3, 60, 0, 0), "x referenced again");
        m.delete("b", &b, &[(y, 20), (z, 30)]).unwrap();
        assert_eq!(counters(), want(1, 10, 2, 50));
        assert_eq!(m.candidate_sizes().unwrap().len(), 2);
        m.drop_candidates(&[y, Digest::of(b"never a candidate")])
            .unwrap();
        assert_eq!(counters(), want(1, 10, 1, 30));
        m.clear_candidates().unwrap();
        assert_eq!(counters(), want(1, 10, 0, 0));
    }

    /// A digest whose first two bytes are `a`, `b` and whose rest is `rest`.
    fn digest_in(a: u8, b: u8, rest: u8) -> Digest {
        let mut d = [rest; 32];
        d[0] = a;
        d[1] = b;
        Digest::from_bytes(d)
    }

    /// Objects that share a bucket keep their own counts in it, in digest order, and an
    /// emptied bucket goes.
    #[test]
    fn objects_sharing_a_bucket_keep_their_own_counts() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        // three in bucket (1, 2), inserted out of order; one each in (1, 3) and (0, 0)
        let (p, q, r) = (digest_in(1, 2, 9), digest_in(1, 2, 3), digest_in(1, 2, 6));
        let (s, t) = (digest_in(1, 3, 0), digest_in(0, 0, 0xff));
        let one = |d: Digest| (d, 1u64);
        let layer = |objects: &[(Digest, u64)], delta: i64| {
            let mut b = sled::Batch::default();
            m.adjust_refs(&mut b, objects, delta).unwrap();
            m.tree.apply_batch(b).unwrap();
        };
        layer(&[one(p), one(q), one(s)], 1);
        layer(&[one(r), one(p), one(t)], 1);
        assert_eq!(
            m.refs().unwrap(),
            vec![(t, 1), (q, 1), (r, 1), (p, 2), (s, 1)],
            "digest order, across and within buckets"
        );
        assert_eq!(m.refs_in(1..2).count(), 4);
        assert_eq!(m.refs_in(0..1).count(), 1);
        assert_eq!(m.refs_in(2..256).count(), 0);
        assert_eq!(m.refs_in(1..1).count(), 0);
        assert_eq!(m.tree.scan_prefix([REF_BUCKET]).count(), 3, "three buckets");
        layer(&[one(p), one(q), one(s)], -1);
        assert_eq!((m.ref_count(&p).unwrap(), m.ref_count(&q).unwrap()), (1, 0));
        layer(&[one(r), one(p), one(t)], -1);
        assert!(m.refs().unwrap().is_empty());
        assert_eq!(
            m.tree.scan_prefix([REF_BUCKET]).count(),
            0,
            "no empty bucket"
        );
        let c = m.counters().unwrap().unwrap();
        assert_eq!((c.referenced_objects, c.candidate_objects), (0, 5));
    }

    /// An index from before buckets has its references moved into them at open, all of
    /// them, also when a move was interrupted (some buckets written, the rest not).
    #[test]
    fn per_object_references_move_into_buckets_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Vec<(Digest, u64)> = (0u32..(BUCKET_BATCH as u32 * 2 + 100))
            .map(|i| (Digest::of(&i.to_be_bytes()), u64::from(i % 3 + 1)))
            .collect();
        let legacy = |m: &MetaStore, objects: &[(Digest, u64)]| {
            let mut b = sled::Batch::default();
            for (d, n) in objects {
                let mut k = vec![LEGACY_REF];
                k.extend_from_slice(d.as_bytes());
                b.insert(k, &n.to_be_bytes());
            }
            m.tree.apply_batch(b).unwrap();
        };
        {
            let m = MetaStore::open(dir.path()).unwrap();
            legacy(&m, &objects);
            m.flush_blocking().unwrap();
        }
        let m = MetaStore::open(dir.path()).unwrap();
        let mut want = objects.clone();
        want.sort();
        assert_eq!(m.refs().unwrap(), want);
        assert_eq!(m.tree.scan_prefix([LEGACY_REF]).count(), 0);
        for (d, n) in &objects[..50] {
            assert_eq!(m.ref_count(d).unwrap(), *n);
        }
        // an interrupted move: the first half of the buckets moved, the rest not
        let half = 0x80u8;
        let (moved, left): (Vec<_>, Vec<_>) =
            objects.iter().partition(|(d, _)| d.as_bytes()[0] < half);
        let mut b = sled::Batch::default();
        for (k, _) in m.tree.scan_prefix([REF_BUCKET]).flatten() {
            if k[1] >= half {
                b.remove(k);
            }
        }
        m.tree.apply_batch(b).unwrap();
        legacy(&m, &left);
        drop(m);
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.refs().unwrap(), want);
        assert_eq!(m.tree.scan_prefix([LEGACY_REF]).count(), 0);
        assert!(!moved.is_empty() && !left.is_empty());
    }

    /// An index that predates the counters has none, and no change invents them.
    #[test]
    fn an_index_without_counters_stays_without_until_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = MetaStore::open(dir.path()).unwrap();
            m.insert("old", &rec(7, Kind::View, None)).unwrap();
            m.tree.remove(COUNTERS).unwrap();
            m.flush_blocking().unwrap();
        }
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.counters().unwrap(), None);
        m.insert("a-act", &rec(1, Kind::Active, None)).unwrap();
        let x = Digest::of(b"x");
        m.rename("a-act", "a", &rec(1, Kind::Committed, None), &[(x, 1)])
            .unwrap();
        assert_eq!(m.counters().unwrap(), None);
        let c = Counters {
            referenced_objects: 1,
            referenced_bytes: 1,
            ..Counters::default()
        };
        m.set_counters(&c, &[]).unwrap();
        assert_eq!(m.counters().unwrap(), Some(c));
    }

    #[test]
    fn ids_are_unique_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let m = MetaStore::open(dir.path()).unwrap();
            m.next_id().unwrap()
        };
        let m = MetaStore::open(dir.path()).unwrap();
        assert!(m.next_id().unwrap() > first);
        m.reserve_ids_through(100).unwrap();
        assert_eq!(m.next_id().unwrap(), 101);
        m.reserve_ids_through(5).unwrap();
        assert_eq!(m.next_id().unwrap(), 102);
    }

    #[test]
    fn missing_key_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        assert!(matches!(m.require("nope"), Err(IndexError::NotFound(_))));
    }
}
