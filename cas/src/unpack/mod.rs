//! The one-pass fast path: a compressed layer blob → stubs + objects + manifest.
//!
//! containerd's own applier writes every file of a layer into the snapshot, and Commit
//! then reads each one again to hash it ([`crate::ingest`]). Here the blob is read once:
//!
//! ```text
//!  decode thread            diffID thread       unpack thread (the caller's)
//!  blob ─► sha256 (blob digest)                tar entries ─► per file: sha256
//!      ─► gunzip / unzstd                          ├─ known content: nothing written
//!      ═══bounded══► sha256 (diffID) ═══bounded══► ├─ new content: written by the I/O pool
//!                                                  │  (ringio) into cas/tmp, linked as object
//!                                                  ├─ stub / empty file ═══bounded══► stub threads
//!                                                  └─ dir / symlink / device / whiteout
//! ```
//!
//! Decompression runs on one thread, the diffID on a second, tar parsing, hashing and
//! the store's other metadata calls on a third, stubs are made on the stub threads (see `stubs`
//! for the order they keep) and the bytes of new objects are written by the I/O pool's
//! workers, so every core is busy. The channel between the threads is bounded, and so
//! are the writes in flight ([`FLUSH_BYTES`]): memory does not grow with the layer.
//!
//! Only content the store does not hold is written. A file up to [`MEM_FILE_LIMIT`] is
//! hashed in memory before anything is written; a larger one is streamed to a temporary
//! file while it is hashed and dropped if its content turns out to be stored already
//! (its pages are usually still dirty in the page cache then and never reach the disk).
//!
//! ## Per-file cost
//! For layers of many small files the metadata calls are the cost, not the bytes, so
//! each file gets as few as possible. Its stub is written as soon as its entry is read:
//! the redirect is a name, decided before the object exists (the object's alias when
//! the store uses aliases and that name is free, see [`ObjectStore::plan`]),
//! and the pool links the new object at its names. If the alias is taken by the time the pool gets there, the
//! stubs written meanwhile are pointed at the object's full name. Names are created
//! first and cleared only when taken (the layer starts empty), and a stub or empty file
//! is created with its mode, so `chown`/`chmod` run only where they change something.
//!
//! ## Matching containerd's applier
//! The tree a layer unpacks to must be the one containerd's applier makes when it writes
//! the same tar straight into an overlay upper directory (its `OverlayConvertWhiteout`
//! path), so that both ingest paths give identical snapshots:
//!
//! * names are cleaned lexically against the layer root (`a/../../b` is `b`), and their
//!   parent directories are resolved inside the layer, symlinks included, never outside
//!   it; an entry resolving to the root itself is ignored;
//! * `.wh.<name>` becomes a whiteout (character device 0/0) and `.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` on its directory; other `.wh..wh.` names are skipped;
//! * an existing entry is replaced unless both are directories;
//! * missing parent directories are created with the attributes of the same directory in
//!   the layers below when one exists there (0755, root otherwise);
//! * `trusted.*` xattrs in the archive are skipped (containerd refuses them too), so a
//!   layer never brings overlayfs metadata of its own;
//! * hardlinks must point at an entry earlier in the same layer;
//! * directory times are restored after every entry has been written.
//!
//! Regular files become stubs exactly as at Commit (see [`crate::stub`]); empty files
//! stay plain files. Each path is in the manifest once per name, as at Commit.
//!
//! ## Failure
//! A corrupt or truncated blob, a malformed tar, a hostile entry or a layer expanding
//! beyond [`Limits`] fails the apply with an [`UnpackError`] saying which; a blob that
//! does not decompress and does not match its digest either is reported as corrupt
//! ([`UnpackError::BlobDigest`]): damaged bytes, not a bad image. Every write
//! in flight is waited for and the temporary files are removed; the objects this apply
//! published are returned in [`ApplyFailure`] so that the caller can collect them once
//! no other ingest can be about to reuse them. The layer directory itself is the
//! caller's to empty. Durability: one `syncfs` after the last write, then the manifest
//! (fsync + rename): a layer whose manifest exists is complete on disk. Once
//! [`WRITEBACK_BYTES`] of new objects are written, the store's writeback starts on a
//! thread of its own ([`crate::writeback`]), so that the disk takes them while the rest
//! is decompressed and that last `syncfs` has only the tail to wait for.
//!
//! ## Where each part lives
//! * `decode`: the decode and diffID threads (compression, blob digest, diffID, limits)
//!   and the chunk reader between the threads;
//! * [`names`]: the name rules, a pure classification of each entry before any write;
//! * `tree`: directories, parents resolved inside the layer, replacements, symlinks,
//!   devices, whiteouts and entry metadata;
//! * `writes`: new objects (in memory or streamed) and the redirects their stubs get;
//! * `stubs`: the stub threads;
//! * `hardlinks`: hardlinks inside the layer.

mod decode;
mod hardlinks;
mod image;
pub mod names;
mod stubs;
mod tree;
mod writes;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use ringio::pool::{Pool, PoolError};

use crate::digest::Digest;
use crate::error::CasError;
use crate::manifest::{ManifestEntry, ManifestWriter};
use crate::objects::ObjectStore;
use crate::stub::FileMeta;
use crate::sys::At;
use crate::writeback::Writeback;

pub use decode::{ChunkReader, Compression};
pub use names::clean_name;

use decode::{decode, CHANNEL_CHUNKS};
use hardlinks::RecentFiles;
use stubs::{stub_threads, stub_worker, StubDone, StubJob, StubThreads, STUBS_IN_FLIGHT};
use writes::{PendingObject, Redirects};

/// Files up to this size are hashed in memory before anything is written, so content
/// the store already holds costs no write at all.
pub const MEM_FILE_LIMIT: u64 = 16 << 20;
/// Bytes of new objects in flight before the unpack waits for their writes, publishes
/// them and writes their stubs: the bound on the memory an apply holds in file data.
pub const FLUSH_BYTES: u64 = 64 << 20;
/// Bytes of new objects written after which the store's writeback is started, on a
/// thread of its own ([`crate::writeback`]): the disk takes a large layer's objects while
/// the rest is decompressed and hashed, and the final `syncfs` waits for the tail only.
pub const WRITEBACK_BYTES: u64 = 16 << 20;
/// The xattr that makes an overlay upper directory opaque.
pub const XATTR_OPAQUE: &str = "trusted.overlay.opaque";

/// Limits on what a blob may expand to: a small blob that decompresses to more than
/// `max(blob size × max_ratio, ratio_floor)`, or any blob beyond `max_bytes`, is refused
/// (a decompression bomb must not fill the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed bytes allowed whatever the blob size.
    pub max_bytes: u64,
    /// Uncompressed bytes allowed per compressed byte.
    pub max_ratio: u64,
    /// Uncompressed bytes always allowed (small layers of zeros are legitimate).
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 256 << 30,
            max_ratio: 1000,
            ratio_floor: 1 << 30,
        }
    }
}

impl Limits {
    /// The uncompressed bytes a blob of `blob_size` bytes may expand to.
    pub fn allowed(&self, blob_size: u64) -> u64 {
        blob_size
            .saturating_mul(self.max_ratio)
            .max(self.ratio_floor)
            .min(self.max_bytes)
    }
}

/// Why an apply failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The blob could not be read.
    #[error("reading the layer blob: {0}")]
    Read(#[source] io::Error),
    /// The compressed stream is corrupt or truncated.
    #[error("the layer blob does not decompress ({compression}): {source}")]
    Decompress {
        /// The compression detected.
        compression: &'static str,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The blob's bytes do not match its descriptor's digest (or size).
    #[error("the layer blob is corrupt: expected {expected}, read {actual} ({size} bytes)")]
    BlobDigest {
        /// The descriptor's digest.
        expected: Digest,
        /// The digest of what was read.
        actual: Digest,
        /// Bytes read.
        size: u64,
    },
    /// The layer expands beyond [`Limits`].
    #[error("the layer expands beyond {limit} bytes (a {blob_size}-byte blob); refused as a decompression bomb")]
    Expansion {
        /// The uncompressed bytes allowed.
        limit: u64,
        /// The blob's size.
        blob_size: u64,
    },
    /// The tar stream is malformed.
    #[error("the layer is not a valid tar archive: {0}")]
    Tar(#[source] io::Error),
    /// The store failed, or an entry was refused ([`CasError::Hostile`]).
    #[error(transparent)]
    Store(#[from] CasError),
    /// The I/O pool failed a write.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl UnpackError {
    /// Whether the cause is a full disk.
    pub fn is_enospc(&self) -> bool {
        match self {
            UnpackError::Store(e) => e.is_enospc(),
            UnpackError::Pool(e) => {
                e.os_error().and_then(io::Error::raw_os_error) == Some(nix::libc::ENOSPC)
            }
            _ => false,
        }
    }
}

/// A failed apply and the objects it had already published (see the module docs).
#[derive(Debug)]
pub struct ApplyFailure {
    /// What went wrong.
    pub error: UnpackError,
    /// Objects this apply added to the store; nothing references them.
    pub new_objects: Vec<Digest>,
}

/// Where a layer is unpacked.
pub struct Target<'a> {
    /// The store's objects.
    pub store: &'a ObjectStore,
    /// `cas/tmp`, on the store's filesystem.
    pub tmp_dir: &'a Path,
    /// The layer's (empty) tree: the active snapshot's `fs`.
    pub fs_dir: &'a Path,
    /// The trees of the layers below, topmost first (for missing parent directories).
    pub lowers: &'a [PathBuf],
    /// Where the manifest goes; written last.
    pub manifest: &'a Path,
    /// Where the layer's EROFS image goes ([`crate::erofs`]); `None` for a stub tree
    /// in `fs_dir`. With an image, `fs_dir` stays empty (its attributes are the root's).
    pub image: Option<&'a Path>,
    /// Writes new objects.
    pub pool: &'a Pool,
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnpackStats {
    /// Tar entries processed.
    pub entries: u64,
    /// Regular files with content (each name counted).
    pub files: u64,
    /// Their bytes, each inode once: what a non-deduplicating snapshotter stores.
    pub logical_bytes: u64,
    /// Objects this layer added.
    pub new_objects: u64,
    /// Their bytes.
    pub new_bytes: u64,
    /// Bytes written for content that turned out to be stored already (large files).
    pub discarded_bytes: u64,
    /// `trusted.*` xattrs in the archive that were skipped.
    pub skipped_xattrs: u64,
    /// Bytes of the layer's image (0 for a stub tree).
    #[serde(default)]
    pub image_bytes: u64,
}

/// The result of a successful apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The digest of the uncompressed tar (the image config's diffID).
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The blob's compression.
    pub compression: Compression,
    /// What was done.
    pub stats: UnpackStats,
    /// Where the time went.
    pub times: ApplyTimes,
}

/// Where an apply's time went, as seen from the unpack thread: what it waited for; the
/// rest of the apply's time is tar parsing, hashing and the store's metadata calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyTimes {
    /// Waiting for decompressed data: the decode thread was the bottleneck.
    pub input_wait: std::time::Duration,
    /// Waiting for the I/O pool: to take a write (its queues full) or to finish one.
    pub write_wait: std::time::Duration,
    /// Waiting for the stub threads (too many stubs out, or an entry that must come
    /// after them).
    pub stub_wait: std::time::Duration,
    /// The `syncfs` and the manifest at the end.
    pub sync: std::time::Duration,
}

/// Applies the layer blob read from `blob` (`blob_size` bytes; its digest is checked when
/// `blob_digest` is given) to `target`. See the module docs.
pub fn apply_blob(
    blob: impl Read + Send,
    blob_size: u64,
    blob_digest: Option<Digest>,
    limits: Limits,
    target: &Target<'_>,
) -> Result<Applied, ApplyFailure> {
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(CHANNEL_CHUNKS);
    let (job_tx, job_rx) = mpsc::sync_channel::<StubJob>(STUBS_IN_FLIGHT);
    let (done_tx, done_rx) = mpsc::channel::<StubDone>();
    let jobs = std::sync::Mutex::new(job_rx);
    std::thread::scope(|scope| {
        let decoder = std::thread::Builder::new()
            .name("layer-decode".into())
            .spawn_scoped(scope, move || {
                decode(blob, blob_size, blob_digest, limits, tx)
            });
        let decoder = match decoder {
            Ok(d) => d,
            Err(e) => {
                return Err(ApplyFailure {
                    error: UnpackError::Read(e),
                    new_objects: Vec::new(),
                })
            }
        };
        // an image is built on this thread: no stubs to make
        let threads = if target.image.is_some() {
            0
        } else {
            stub_threads()
        };
        for n in 0..threads {
            let (jobs, done, fs_dir) = (&jobs, done_tx.clone(), target.fs_dir);
            let sys = target.store.sys();
            let spawned = std::thread::Builder::new()
                .name(format!("layer-stubs-{n}"))
                .spawn_scoped(scope, move || stub_worker(sys, fs_dir, jobs, done));
            if let Err(e) = spawned {
                return Err(ApplyFailure {
                    error: UnpackError::Read(e),
                    new_objects: Vec::new(),
                });
            }
        }
        drop(done_tx);
        let stubs = StubThreads {
            jobs: Some(job_tx),
            done: done_rx,
            in_flight: HashSet::new(),
        };
        let mut unpacker = Unpacker::new(target, stubs).map_err(|error| ApplyFailure {
            error: error.into(),
            new_objects: Vec::new(),
        })?;
        let mut input_wait = std::time::Duration::ZERO;
        let unpacked = unpacker.run(ChunkReader::new(rx).timed(&mut input_wait));
        // The decoder's verdict wins: a tar error caused by a corrupt stream is reported
        // as the corrupt stream.
        let decoded = decoder.join().unwrap_or_else(|_| {
            Err(UnpackError::Read(io::Error::other(
                "decode thread panicked",
            )))
        });
        let result = match (decoded, unpacked) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            (Ok(d), Ok(())) => unpacker.finish().map(|()| d),
        };
        match result {
            Ok(d) => Ok(Applied {
                diff_id: d.diff_id,
                uncompressed_size: d.uncompressed_size,
                compression: d.compression,
                stats: unpacker.stats.clone(),
                times: ApplyTimes {
                    input_wait,
                    ..unpacker.times
                },
            }),
            Err(error) => {
                unpacker.abandon();
                Err(ApplyFailure {
                    error,
                    new_objects: unpacker.new_objects.clone(),
                })
            }
        }
    })
}

/// The unpack thread's state: one per apply.
struct Unpacker<'a> {
    t: &'a Target<'a>,
    manifest: Option<ManifestWriter>,
    stats: UnpackStats,
    /// The digests of the layer's most recent regular files, for hardlinks to them.
    recent: RecentFiles,
    /// Directories of the layer known to exist as real directories (not symlinks): a
    /// parent found here needs no resolving and no creating.
    known_dirs: HashSet<PathBuf>,
    /// Directories and the metadata to restore once every entry is in.
    dirs: Vec<(PathBuf, FileMeta)>,
    objects: std::collections::VecDeque<PendingObject>,
    /// The redirects of objects being written and of objects recently seen in place.
    redirects: Redirects,
    /// The stubs (path, inode) written for objects of `objects` whose alias the pool is
    /// to link, in case it cannot (see [`Unpacker::drain`]).
    alias_stubs: HashMap<Digest, Vec<(PathBuf, u64)>>,
    pending_bytes: u64,
    new_objects: Vec<Digest>,
    /// Write waits and the final sync (the input wait is the reader's).
    times: ApplyTimes,
    /// Stubs and empty files being created by the stub threads.
    stubs: StubThreads,
    /// The layer being built, when it becomes an image rather than a stub tree.
    image: Option<crate::erofs::Image>,
    /// Starts the writeback of new objects as they are written.
    writeback: Option<Writeback>,
}

impl<'a> Unpacker<'a> {
    fn new(t: &'a Target<'a>, stubs: StubThreads) -> Result<Unpacker<'a>, CasError> {
        let image = match t.image {
            Some(_) => Some(crate::erofs::Image::new(image::root_attrs(t.fs_dir)?)),
            None => None,
        };
        Ok(Unpacker {
            image,
            t,
            manifest: Some(ManifestWriter::create(t.manifest)?),
            stats: UnpackStats::default(),
            recent: RecentFiles::default(),
            known_dirs: HashSet::new(),
            dirs: Vec::new(),
            objects: std::collections::VecDeque::new(),
            redirects: Redirects::default(),
            alias_stubs: HashMap::new(),
            pending_bytes: 0,
            new_objects: Vec::new(),
            times: ApplyTimes::default(),
            stubs,
            writeback: Writeback::new(t.tmp_dir, WRITEBACK_BYTES),
        })
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.t.fs_dir.join(rel)
    }

    fn run(&mut self, stream: ChunkReader<'_>) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(stream);
        {
            let entries = archive.entries().map_err(UnpackError::Tar)?;
            for entry in entries {
                let entry = entry.map_err(UnpackError::Tar)?;
                self.entry(entry)?;
            }
        }
        // The diffID covers the whole stream, padding after the end-of-archive included.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(UnpackError::Tar)?;
        Ok(())
    }

    fn push_manifest(&mut self, rel: &Path, digest: Digest, size: u64) -> Result<(), CasError> {
        if let Some(m) = self.manifest.as_mut() {
            m.push(&ManifestEntry {
                path: rel.to_path_buf(),
                digest,
                size,
            })?;
        }
        Ok(())
    }

    /// Waits for what is in flight, restores directory metadata, syncs and writes the
    /// manifest.
    fn finish(&mut self) -> Result<(), UnpackError> {
        self.settle_stubs()?;
        self.stubs.jobs = None;
        self.flush()?;
        if let Some(at) = self.t.image {
            self.write_image(at)?;
        }
        for (rel, meta) in self.dirs.iter().rev() {
            let abs = self.t.fs_dir.join(rel);
            meta.restore_times(self.t.store.sys(), At::Path(&abs), &abs)?;
        }
        crate::crash_point!("apply.before-syncfs");
        let syncing = std::time::Instant::now();
        if let Some(w) = self.writeback.as_mut() {
            w.wait();
        }
        let root = File::open(self.t.fs_dir).map_err(CasError::io("open", self.t.fs_dir))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| CasError::io("syncfs", self.t.fs_dir)(e.into()))?;
        if let Some(m) = self.manifest.take() {
            m.finish()?;
        }
        self.times.sync = syncing.elapsed();
        crate::crash_point!("apply.after-manifest");
        Ok(())
    }

    /// After a failure: waits for every write in flight.
    fn abandon(&mut self) {
        self.stubs.jobs = None;
        while !self.stubs.in_flight.is_empty() {
            match self.stubs.done.recv() {
                Ok(d) => {
                    self.stubs.in_flight.remove(&d.job.rel);
                }
                Err(_) => break,
            }
        }
        for o in std::mem::take(&mut self.objects) {
            if o.ticket.wait().is_ok() {
                // linked by the pool: an object nothing references yet
                self.new_objects.push(o.digest);
            }
        }
        self.redirects.clear_in_flight();
        self.alias_stubs.clear();
        if let Some(m) = self.manifest.take() {
            m.abandon();
        }
    }
}

#[cfg(test)]
mod tests;
