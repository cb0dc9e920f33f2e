//! Commit records: what makes a Commit (and a Remove) durable.
//!
//! A Commit's layer (objects, stubs, manifest) is made durable by the ingest's `syncfs`.
//! What remains is the snapshot's new record: before the journal, that took a durable
//! `info` mirror (temp file, fsync, rename, directory fsync) plus a flush of the sled
//! index, three device flushes per Commit. Now the record goes to the journal
//! (`<root>/journal`, [`ringio::journal`]): one `RWF_ATOMIC | RWF_DSYNC` block where the
//! filesystem supports atomic writes, one small file otherwise. The `info` mirror is then
//! written without fsync and the index without a flush; both become durable in batches
//! at a *checkpoint* (index flush, `syncfs`, then the journal's checkpoint block), every
//! [`CHECKPOINT_EVERY`] records and at shutdown.
//!
//! Every change of a snapshot's record goes through the journal: Prepare and View (a
//! new record), Update (labels), Commit and Remove. The mirror is written after the
//! record and before the index, so after a crash only the snapshots the records past
//! the checkpoint name can disagree with the index (plus directories whose record never
//! landed, and records whose directory went, both seen from the directory names).
//!
//! At start, [`CommitLog::replay`] rewrites the `info` mirror of every snapshot named by
//! a record past the checkpoint (the last record of a snapshot wins; a removal deletes
//! the mirror), the index is reconciled with the mirrors of those snapshots, and a
//! checkpoint makes both durable before the records are retired. A crash at any point
//! thus leaves either the old state or the new: a record that is in the journal is
//! applied, one that is not was never answered.
//!
//! A clean stop ends with a checkpoint and then a durable `<root>/clean-stop` marker:
//! index and mirrors agree and no record is pending. The next start takes the marker
//! away (durably, before anything can change) and, having had it, skips reading every
//! snapshot's mirror ([`crate::snapshots::reconcile`] with [`Stop::Clean`]): a restart of
//! the daemon costs the index open, not a read of every snapshot directory.
//!
//! Records hold the same JSON as the `info` mirror. One that does not fit in a journal
//! block (huge labels) takes the old path: durable mirror and index flush.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use crate::error::CasError;
use crate::index::{InfoFile, MetaStore, Record};
use crate::layout::Layout;
use crate::layout::{FS_DIR, INFO_FILE};
use ringio::journal::{Backend, Journal, JournalError, JournalMode};

/// Records between checkpoints. Fewer means more checkpoints (an index flush and a
/// `syncfs` each) and less to replay after a crash.
pub const CHECKPOINT_EVERY: u64 = 64;

/// One change to a snapshot's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// Snapshot `id` now has `record` under `key`.
    Put {
        /// The snapshot's directory number.
        id: u64,
        /// Its key or name.
        key: String,
        /// Its record.
        record: Record,
    },
    /// Snapshot `id` is gone.
    Delete {
        /// The snapshot's directory number.
        id: u64,
    },
    /// Snapshot `id`'s mirror and index are about to change outside the journal (its
    /// record is too large for a block): the replay only notes it, so that the
    /// reconcile after a crash compares that snapshot.
    Dirty {
        /// The snapshot's directory number.
        id: u64,
    },
}

impl Change {
    /// The snapshot it concerns.
    pub fn id(&self) -> u64 {
        match self {
            Change::Put { id, .. } | Change::Delete { id } | Change::Dirty { id } => *id,
        }
    }
}

/// What [`CommitLog::replay`] did at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replayed {
    /// Records past the checkpoint.
    pub records: u64,
    /// Mirrors rewritten.
    pub written: u64,
    /// Mirrors deleted.
    pub deleted: u64,
    /// Every snapshot a record past the checkpoint names.
    #[serde(skip)]
    pub changed: BTreeSet<u64>,
}

/// The marker a clean stop leaves in the store root.
const CLEAN_STOP_FILE: &str = "clean-stop";

/// The marker that says every change of a record since the last checkpoint is in the
/// journal (stores written before that was so lack it until their first start).
const JOURNALED_FILE: &str = "records-journaled";

/// How the daemon last stopped, as far as the store can tell at start: what the
/// reconcile with the `info` mirrors has to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A checkpoint and the clean-stop marker: index and mirrors agreed.
    Clean,
    /// A crash, with every change since the last checkpoint journaled: only the
    /// snapshots the replayed records name can disagree (and directories whose record
    /// never landed, or records whose directory went).
    Crash {
        /// The snapshots the replayed records name.
        changed: BTreeSet<u64>,
    },
    /// Nothing is known (a store from before changes were all journaled): compare all.
    Unknown,
}

/// The store's journal: appends and checkpoints, one at a time.
pub struct CommitLog {
    journal: std::sync::Mutex<Journal>,
    layout: Layout,
}

fn jerr(e: JournalError) -> CasError {
    CasError::Journal(e)
}

impl CommitLog {
    /// Opens the journal of `layout` (`<root>/journal`).
    pub fn open(layout: &Layout, mode: JournalMode) -> Result<CommitLog, CasError> {
        let journal = Journal::open(&layout.root().join("journal"), mode).map_err(jerr)?;
        Ok(CommitLog {
            journal: std::sync::Mutex::new(journal),
            layout: layout.clone(),
        })
    }

    /// The backend the journal runs on.
    pub fn backend(&self) -> Backend {
        self.lock().backend()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `change` durable. Returns `false`, writing nothing, when the record is too
    /// large for a journal block: the caller then makes the change durable itself. A
    /// full journal is checkpointed first (`meta` is flushed for that).
    pub fn record(&self, change: &Change, meta: &MetaStore) -> Result<bool, CasError> {
        let payload = serde_json::to_vec(change).map_err(|e| {
            CasError::Journal(JournalError::Io(ringio::IoError::at(
                "encode",
                self.layout.root().join("journal"),
            )(io::Error::other(e))))
        })?;
        let mut j = self.lock();
        if payload.len() > ringio::journal::MAX_PAYLOAD {
            return Ok(false);
        }
        if j.pending() >= CHECKPOINT_EVERY {
            self.checkpoint_locked(&mut j, meta)?;
        }
        match j.append(&payload) {
            Ok(_) => Ok(true),
            Err(JournalError::Full(_)) => {
                self.checkpoint_locked(&mut j, meta)?;
                j.append(&payload).map_err(jerr)?;
                Ok(true)
            }
            Err(e) => Err(jerr(e)),
        }
    }

    /// [`CommitLog::record`] for a change that always fits in a block (a Delete, a
    /// Dirty): one that does not is an error.
    pub fn record_small(&self, change: &Change, meta: &MetaStore) -> Result<(), CasError> {
        if self.record(change, meta)? {
            Ok(())
        } else {
            Err(jerr(JournalError::TooLarge(
                serde_json::to_vec(change).map_or(0, |v| v.len()),
            )))
        }
    }

    /// Makes everything the journal holds durable elsewhere (index flush, `syncfs` of
    /// the store for the mirrors), then retires the records.
    pub fn checkpoint(&self, meta: &MetaStore) -> Result<(), CasError> {
        let mut j = self.lock();
        self.checkpoint_locked(&mut j, meta)
    }

    fn checkpoint_locked(&self, j: &mut Journal, meta: &MetaStore) -> Result<(), CasError> {
        if j.pending() == 0 {
            return Ok(());
        }
        let last = j.checkpoint_seq() + j.pending();
        meta.flush_blocking()?;
        let root =
            fs::File::open(self.layout.root()).map_err(CasError::io("open", self.layout.root()))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| CasError::io("syncfs", self.layout.root())(e.into()))?;
        crate::crash_point!("journal.before-checkpoint");
        j.checkpoint(last).map_err(jerr)
    }

    /// Checkpoints and leaves the clean-stop marker. Call last, at shutdown, with
    /// nothing else changing the store.
    pub fn mark_clean_stop(&self, meta: &MetaStore) -> Result<(), CasError> {
        let mut j = self.lock();
        self.checkpoint_locked(&mut j, meta)?;
        meta.flush_blocking()?;
        let marker = self.layout.root().join(CLEAN_STOP_FILE);
        ringio::durable::replace_file(&marker, b"index and info mirrors agree\n")?;
        Ok(())
    }

    /// Whether the daemon stopped cleanly. Takes the clean-stop marker away, durably,
    /// so that a crash from here on is seen as one. Call at start, before anything
    /// changes.
    pub fn take_clean_stop(&self) -> Result<bool, CasError> {
        let marker = self.layout.root().join(CLEAN_STOP_FILE);
        match fs::remove_file(&marker) {
            Ok(()) => {
                ringio::durable::fsync_dir(self.layout.root())?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CasError::io("remove", &marker)(e)),
        }
    }

    /// What start must reconcile: after [`CommitLog::take_clean_stop`] and
    /// [`CommitLog::replay`].
    pub fn stop(&self, clean: bool, replayed: &Replayed) -> Stop {
        if clean && replayed.records == 0 {
            Stop::Clean
        } else if self.layout.root().join(JOURNALED_FILE).is_file() {
            Stop::Crash {
                changed: replayed.changed.clone(),
            }
        } else {
            Stop::Unknown
        }
    }

    /// After the first full reconcile at start: from now on every change of a record
    /// is journaled, and a crash needs only the replayed snapshots compared.
    pub fn mark_journaled(&self) -> Result<(), CasError> {
        let marker = self.layout.root().join(JOURNALED_FILE);
        if !marker.is_file() {
            ringio::durable::replace_file(&marker, b"every change of a record is journaled\n")?;
        }
        Ok(())
    }

    /// Brings the `info` mirrors up to date with the records past the checkpoint. Call
    /// at start, then reconcile the index, then [`CommitLog::checkpoint`]: a crash
    /// before that checkpoint replays the same records again.
    pub fn replay(&self) -> Result<Replayed, CasError> {
        let j = self.lock();
        let records = j.records().map_err(jerr)?;
        let mut out = Replayed {
            records: records.len() as u64,
            ..Replayed::default()
        };
        // the last change of each snapshot wins
        let mut last: BTreeMap<u64, Change> = BTreeMap::new();
        for (seq, payload) in records {
            match serde_json::from_slice::<Change>(&payload) {
                // a Dirty marks the snapshot; it does not undo an earlier change of it
                Ok(Change::Dirty { id }) => {
                    last.entry(id).or_insert(Change::Dirty { id });
                }
                Ok(c) => {
                    last.insert(c.id(), c);
                }
                Err(e) => tracing::warn!(seq, error = %e, "journal record not understood; skipped"),
            }
        }
        out.changed = last.keys().copied().collect();
        for (id, change) in last {
            let dir = self.layout.snapshot_dir(id);
            match change {
                Change::Dirty { .. } => {}
                Change::Put { key, record, .. } => {
                    if !dir.join(FS_DIR).is_dir() {
                        // removed since (its Delete record is older than a checkpoint
                        // that covered it, or the removal was never answered)
                        continue;
                    }
                    // After a process crash (not a power cut) the mirror usually
                    // already says this; otherwise it is written, durable with the
                    // syncfs below, one for all.
                    let current = crate::index::read_info(&dir).ok();
                    if current.as_ref().map(|i| (&i.key, &i.record)) != Some((&key, &record)) {
                        write_info_lazy(&dir, &key, &record)?;
                        out.written += 1;
                    }
                }
                Change::Delete { .. } => {
                    let info = dir.join(INFO_FILE);
                    match fs::remove_file(&info) {
                        Ok(()) => out.deleted += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(CasError::io("remove", &info)(e)),
                    }
                }
            }
        }
        // The records stay until the index agrees too: the caller reconciles and then
        // checkpoints, which makes these mirrors durable with the index.
        Ok(out)
    }
}

/// Writes a snapshot's `info` mirror without fsync (a journal record covers it).
pub fn write_info_lazy(
    snapshot_dir: &std::path::Path,
    key: &str,
    rec: &Record,
) -> Result<(), CasError> {
    let bytes = serde_json::to_vec_pretty(&InfoFile {
        key: key.to_string(),
        record: rec.clone(),
    })
    .map_err(|e| CasError::io("encode", snapshot_dir)(io::Error::other(e)))?;
    let tmp = snapshot_dir.join(format!(".{INFO_FILE}.tmp-{}", std::process::id()));
    fs::write(&tmp, &bytes).map_err(CasError::io("write", &tmp))?;
    fs::rename(&tmp, snapshot_dir.join(INFO_FILE)).map_err(CasError::io("rename", snapshot_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clean_stop_marker_is_taken_once() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::ensure(tmp.path()).unwrap();
        let meta = MetaStore::open(&layout.index_dir()).unwrap();
        let log = CommitLog::open(&layout, JournalMode::ForceRename).unwrap();
        assert!(!log.take_clean_stop().unwrap());
        log.mark_clean_stop(&meta).unwrap();
        assert!(log.take_clean_stop().unwrap());
        // taken: a crash from here on is an unclean stop
        assert!(!log.take_clean_stop().unwrap());
    }
}
