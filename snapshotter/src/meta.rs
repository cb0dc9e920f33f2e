//! Snapshot metadata in sled: one record per snapshot key, plus a parent→child index.
//!
//! Keys of the single `snapshots` tree:
//!
//! ```text
//! 'S' <key>                          -> JSON Record   (the snapshot)
//! 'C' <u32 BE len(parent)> <parent> <child> -> ''     (parent has this child)
//! ```
//!
//! Every mutation is one `apply_batch`, so a record and its child edge appear and
//! disappear together; callers serialise mutations (the service holds one writer lock)
//! and [`MetaStore::flush`] before they answer, so what containerd was told survives a
//! `kill -9`. Snapshot ids come from sled's persistent monotonic counter and are never
//! reused, which is what lets directories be created *before* their record (an orphan
//! directory after a crash is swept, never mistaken for a live snapshot).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;

const RECORD: u8 = b'S';
const CHILD: u8 = b'C';

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
}

/// The metadata index.
pub struct MetaStore {
    db: sled::Db,
    tree: sled::Tree,
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

fn decode(key: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|source| SnapshotError::Corrupt {
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
    pub fn open(dir: &Path) -> Result<MetaStore, SnapshotError> {
        let db = sled::Config::new().path(dir).open()?;
        let tree = db.open_tree("snapshots")?;
        Ok(MetaStore { db, tree })
    }

    /// A fresh snapshot id.
    pub fn next_id(&self) -> Result<u64, SnapshotError> {
        Ok(self.db.generate_id()?)
    }

    /// The record of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        match self.tree.get(record_key(key))? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The record of `key`, or `NotFound`.
    pub fn require(&self, key: &str) -> Result<Record, SnapshotError> {
        self.get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))
    }

    /// Whether any snapshot names `key` as its parent.
    pub fn has_children(&self, key: &str) -> Result<bool, SnapshotError> {
        Ok(self
            .tree
            .scan_prefix(child_prefix(key))
            .next()
            .transpose()?
            .is_some())
    }

    /// The ids of `rec`'s ancestors, immediate parent first.
    pub fn parent_ids(&self, rec: &Record) -> Result<Vec<u64>, SnapshotError> {
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
    pub fn insert(&self, key: &str, rec: &Record) -> Result<(), SnapshotError> {
        let mut batch = sled::Batch::default();
        batch.insert(record_key(key), encode(rec));
        if let Some(parent) = &rec.parent {
            batch.insert(child_key(parent, key), &[]);
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Replaces the record of an existing `key` (labels update).
    pub fn put(&self, key: &str, rec: &Record) -> Result<(), SnapshotError> {
        self.tree.insert(record_key(key), encode(rec))?;
        Ok(())
    }

    /// Moves the snapshot at `old` to `new` with record `rec` (Commit: key → name).
    pub fn rename(&self, old: &str, new: &str, rec: &Record) -> Result<(), SnapshotError> {
        let mut batch = sled::Batch::default();
        batch.remove(record_key(old));
        batch.insert(record_key(new), encode(rec));
        if let Some(parent) = &rec.parent {
            batch.remove(child_key(parent, old));
            batch.insert(child_key(parent, new), &[]);
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Deletes `key`'s record and parent edge.
    pub fn delete(&self, key: &str, rec: &Record) -> Result<(), SnapshotError> {
        let mut batch = sled::Batch::default();
        batch.remove(record_key(key));
        if let Some(parent) = &rec.parent {
            batch.remove(child_key(parent, key));
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Every snapshot, in key order.
    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
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
    pub async fn flush(&self) -> Result<(), SnapshotError> {
        self.db.flush_async().await?;
        Ok(())
    }
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
        m.rename("act", "layer", &c).unwrap();
        assert!(m.get("act").unwrap().is_none());
        assert_eq!(m.parent_ids(&m.require("layer").unwrap()).unwrap(), vec![1]);
        assert!(m.has_children("base").unwrap());

        m.delete("layer", &c).unwrap();
        assert!(!m.has_children("base").unwrap());
        let keys: Vec<_> = m.all().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["bas", "base"]);
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
    }

    #[test]
    fn missing_key_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        assert!(matches!(m.require("nope"), Err(SnapshotError::NotFound(_))));
    }
}
