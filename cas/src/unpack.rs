//! The one-pass fast path: a compressed layer blob → stubs + objects + manifest.
//!
//! containerd's own applier writes every file of a layer into the snapshot, and Commit
//! then reads each one again to hash it ([`crate::ingest`]). Here the blob is read once:
//!
//! ```text
//!  decode thread                               unpack thread (the caller's)
//!  blob ─► sha256 (blob digest)                tar entries ─► per file: sha256
//!      ─► gunzip / unzstd                          ├─ known content: nothing written
//!      ─► sha256 (diffID) ─► chunks ═══bounded══►  ├─ new content: written by the I/O pool
//!                                                  │  (ringio) into cas/tmp, linked as object
//!                                                  ├─ stub / empty file ═══bounded══► stub threads
//!                                                  └─ dir / symlink / device / whiteout
//! ```
//!
//! Decompression and the diffID run on one thread, tar parsing, hashing and the store's
//! other metadata calls on another, stubs are made on the stub threads (see
//! `StubThreads` for the order they keep) and the bytes of new objects are written by
//! the I/O pool's workers, so every core is busy. The channel between the threads is bounded, and so
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
//! the store uses aliases and that name is free, see [`ObjectStore::plan_redirect`]),
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
//! (fsync + rename): a layer whose manifest exists is complete on disk.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::fchownat;
use ringio::pool::{Linked, Pool, PoolError, StreamWriter, Ticket};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::CasError;
use crate::manifest::{ManifestEntry, ManifestWriter};
use crate::objects::{ObjectStore, Publish, OBJECT_MODE};
use crate::stub::{create_empty, write_stub, FileMeta, XATTR_REDIRECT};

/// Files up to this size are hashed in memory before anything is written, so content
/// the store already holds costs no write at all.
pub const MEM_FILE_LIMIT: u64 = 16 << 20;
/// Bytes of new objects in flight before the unpack waits for their writes, publishes
/// them and writes their stubs: the bound on the memory an apply holds in file data.
pub const FLUSH_BYTES: u64 = 64 << 20;
/// Files in flight before the same.
const FLUSH_FILES: usize = 1024;
/// Stubs and empty files handed to the stub threads and not yet reported back.
const STUBS_IN_FLIGHT: usize = 256;
/// Size of the chunks passed from the decode thread to the unpack thread.
const CHUNK: usize = 256 << 10;
/// Chunks the channel between the two threads holds.
const CHANNEL_CHUNKS: usize = 16;
/// The overlayfs whiteout prefix of the OCI layer format.
const WHITEOUT: &[u8] = b".wh.";
/// The OCI opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of the AUFS metadata names the OCI format reserves (skipped).
const WHITEOUT_META: &[u8] = b".wh..wh.";
/// Symlinks followed while resolving one parent path inside the layer.
const MAX_SYMLINKS: usize = 255;
/// The xattr that makes an overlay upper directory opaque.
pub const XATTR_OPAQUE: &str = "trusted.overlay.opaque";

/// How a blob is compressed, told by its first bytes as containerd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Detects the compression from the blob's first bytes.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The name used in logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

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
        for n in 0..stub_threads() {
            let (jobs, done, fs_dir) = (&jobs, done_tx.clone(), target.fs_dir);
            let spawned = std::thread::Builder::new()
                .name(format!("layer-stubs-{n}"))
                .spawn_scoped(scope, move || stub_worker(fs_dir, jobs, done));
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

/// What the decode thread found.
struct Decoded {
    diff_id: Digest,
    uncompressed_size: u64,
    compression: Compression,
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The decode thread: blob → (hash) → decompress → (hash) → chunks on `tx`.
fn decode(
    blob: impl Read,
    blob_size: u64,
    blob_digest: Option<Digest>,
    limits: Limits,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
) -> Result<Decoded, UnpackError> {
    let mut raw = BufReader::with_capacity(
        CHUNK,
        Hashing {
            inner: blob,
            hasher: Sha256::new(),
            count: 0,
        },
    );
    let head = io::BufRead::fill_buf(&mut raw).map_err(UnpackError::Read)?;
    let compression = Compression::detect(head);
    let allowed = limits.allowed(blob_size);
    let fail = |tx: &mpsc::SyncSender<io::Result<Vec<u8>>>, e: UnpackError| {
        // Tell the unpack thread to stop; it reports the decoder's error.
        let _ = tx.send(Err(io::Error::other("layer stream failed")));
        e
    };
    let decompress_err = |source| UnpackError::Decompress {
        compression: compression.as_str(),
        source,
    };
    let mut diff = Sha256::new();
    let mut total = 0u64;
    let mut pump = |reader: &mut dyn Read| -> Result<(), UnpackError> {
        loop {
            let buf = read_chunk(reader).map_err(decompress_err)?;
            let filled = buf.len();
            if filled == 0 {
                return Ok(());
            }
            total += filled as u64;
            if total > allowed {
                return Err(UnpackError::Expansion {
                    limit: allowed,
                    blob_size,
                });
            }
            if compression != Compression::None {
                diff.update(&buf);
            }
            if tx.send(Ok(buf)).is_err() {
                // The unpack thread stopped (its own error); it reports that.
                return Ok(());
            }
        }
    };
    let (raw, pumped) = match compression {
        Compression::None => {
            let r = pump(&mut raw);
            (raw, r)
        }
        Compression::Gzip => {
            let mut d = flate2::bufread::MultiGzDecoder::new(raw);
            let r = pump(&mut d);
            (d.into_inner(), r)
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| fail(&tx, decompress_err(e)))?;
            let r = pump(&mut d);
            (d.finish(), r)
        }
    };
    if let Err(e) = pumped {
        let e = fail(&tx, e);
        // A stream that does not decompress may be a blob whose bytes were damaged after
        // it was fetched: then the digest is the cause to report (DataLoss, not a bad
        // image), so the rest of the blob is read to tell.
        if matches!(e, UnpackError::Decompress { .. }) {
            if let Some(expected) = blob_digest {
                let mut hashing = raw.into_inner();
                if io::copy(&mut hashing, &mut io::sink()).is_ok() {
                    let actual = Digest::from_bytes(hashing.hasher.finalize().into());
                    if expected != actual || hashing.count != blob_size {
                        return Err(UnpackError::BlobDigest {
                            expected,
                            actual,
                            size: hashing.count,
                        });
                    }
                }
            }
        }
        return Err(e);
    }
    // Whatever follows the compressed stream is part of the blob and of its digest.
    let mut hashing = raw.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| fail(&tx, UnpackError::Read(e)))?;
    let actual = Digest::from_bytes(hashing.hasher.finalize().into());
    if let Some(expected) = blob_digest {
        if expected != actual || hashing.count != blob_size {
            return Err(fail(
                &tx,
                UnpackError::BlobDigest {
                    expected,
                    actual,
                    size: hashing.count,
                },
            ));
        }
    }
    let diff_id = match compression {
        Compression::None => actual,
        _ => Digest::from_bytes(diff.finalize().into()),
    };
    Ok(Decoded {
        diff_id,
        uncompressed_size: total,
        compression,
    })
}

/// A blocking reader over chunks arriving on a bounded channel: the unpack thread's view
/// of the decoded stream, and of a blob streamed from elsewhere (an error on the channel
/// is returned by `read`; a closed channel is the end).
pub struct ChunkReader<'w> {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    /// Where the time spent waiting for a chunk is added, when measured.
    waited: Option<&'w mut std::time::Duration>,
}

impl ChunkReader<'static> {
    /// Reads what arrives on `rx`.
    pub fn new(rx: mpsc::Receiver<io::Result<Vec<u8>>>) -> ChunkReader<'static> {
        ChunkReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            waited: None,
        }
    }
}

impl ChunkReader<'_> {
    /// Adds the time `read` waits for a chunk to `waited`.
    pub fn timed(self, waited: &mut std::time::Duration) -> ChunkReader<'_> {
        ChunkReader {
            rx: self.rx,
            chunk: self.chunk,
            pos: self.pos,
            waited: Some(waited),
        }
    }

    fn recv(&mut self) -> Result<io::Result<Vec<u8>>, mpsc::RecvError> {
        match (&mut self.waited, self.rx.try_recv()) {
            (_, Ok(c)) => Ok(c),
            (_, Err(mpsc::TryRecvError::Disconnected)) => Err(mpsc::RecvError),
            (Some(w), Err(mpsc::TryRecvError::Empty)) => {
                let t = std::time::Instant::now();
                let r = self.rx.recv();
                **w += t.elapsed();
                r
            }
            (None, Err(mpsc::TryRecvError::Empty)) => self.rx.recv(),
        }
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.recv() {
                Ok(Ok(c)) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A new object being written (unnamed, then linked as the object) by the pool.
struct PendingObject {
    digest: Digest,
    size: u64,
    ticket: Ticket<Linked>,
    /// The redirect its stubs got.
    redirect: String,
}

/// Metadata of one tar entry, as it will be applied.
struct EntryMeta {
    meta: FileMeta,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

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
    /// Digests of `objects` and the redirect their stubs get.
    in_flight: HashMap<Digest, String>,
    /// The stubs (path, inode) written for objects of `objects` whose alias the pool is
    /// to link, in case it cannot (see [`Unpacker::drain`]).
    alias_stubs: HashMap<Digest, Vec<(PathBuf, u64)>>,
    pending_bytes: u64,
    /// Redirects of objects in place, by digest (bounded).
    redirects: HashMap<Digest, String>,
    new_objects: Vec<Digest>,
    /// Write waits and the final sync (the input wait is the reader's).
    times: ApplyTimes,
    /// Stubs and empty files being created by the stub threads.
    stubs: StubThreads,
}

fn tmp_name(dir: &Path) -> PathBuf {
    dir.join(format!(
        "apply.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Cleans a tar name lexically against the layer root, as `filepath.Clean("/" + name)`
/// does: `.` and empty components vanish, `..` never climbs above the root. Returns the
/// relative path (empty for the root itself).
pub fn clean_name(name: &[u8]) -> PathBuf {
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in name.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    let mut p = PathBuf::new();
    for c in out {
        p.push(std::ffi::OsStr::from_bytes(c));
    }
    p
}

impl<'a> Unpacker<'a> {
    fn new(t: &'a Target<'a>, stubs: StubThreads) -> Result<Unpacker<'a>, CasError> {
        Ok(Unpacker {
            t,
            manifest: Some(ManifestWriter::create(t.manifest)?),
            stats: UnpackStats::default(),
            recent: RecentFiles::default(),
            known_dirs: HashSet::new(),
            dirs: Vec::new(),
            objects: std::collections::VecDeque::new(),
            in_flight: HashMap::new(),
            alias_stubs: HashMap::new(),
            pending_bytes: 0,
            redirects: HashMap::new(),
            new_objects: Vec::new(),
            times: ApplyTimes::default(),
            stubs,
        })
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.t.fs_dir.join(rel)
    }

    /// Resolves `rel` (a cleaned parent path) inside the layer: symlinks in the layer
    /// are followed, but never out of it. Components that do not exist yet are kept.
    fn resolve_parent(&self, rel: &Path) -> Result<PathBuf, CasError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(rel.to_path_buf());
        }
        let mut todo: Vec<OsString> = rel
            .components()
            .rev()
            .map(|c| c.as_os_str().to_os_string())
            .collect();
        let mut done = PathBuf::new();
        let mut links = 0;
        while let Some(comp) = todo.pop() {
            if comp == ".." {
                done.pop();
                continue;
            }
            if comp == "." || comp.is_empty() {
                continue;
            }
            let next = done.join(&comp);
            match fs::symlink_metadata(self.abs(&next)) {
                Ok(md) if md.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(CasError::Hostile {
                            path: rel.to_path_buf(),
                            reason: "too many levels of symbolic links in the path",
                        });
                    }
                    let target = fs::read_link(self.abs(&next))
                        .map_err(CasError::io("readlink", self.abs(&next)))?;
                    if target.is_absolute() {
                        done = PathBuf::new();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::RootDir | Component::Prefix(_) => {}
                            other => todo.push(other.as_os_str().to_os_string()),
                        }
                    }
                }
                _ => done = next,
            }
        }
        Ok(done)
    }

    /// Makes sure every directory of `rel` exists, creating missing ones with the
    /// attributes the same directory has in the layers below.
    fn ensure_dirs(&mut self, rel: &Path) -> Result<(), CasError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            if self.known_dirs.contains(&cur) {
                continue;
            }
            let abs = self.abs(&cur);
            match fs::symlink_metadata(&abs) {
                Ok(md) if md.is_dir() => {
                    self.known_dirs.insert(cur.clone());
                    continue;
                }
                Ok(_) => {
                    return Err(CasError::Hostile {
                        path: cur.clone(),
                        reason: "a parent of an entry is not a directory",
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CasError::io("stat", abs)(e)),
            }
            let lower = self
                .t
                .lowers
                .iter()
                .map(|l| l.join(&cur))
                .find_map(|p| fs::symlink_metadata(p).ok().filter(|m| m.is_dir()));
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&abs)
                .map_err(CasError::io("mkdir", &abs))?;
            if let Some(md) = lower {
                let meta = FileMeta::from(&md);
                set_owner_mode(&abs, &meta)?;
                self.dirs.push((cur.clone(), meta));
            }
            // every directory of the layer is known, so that a file replacing one is
            // made on this thread (see `make_stub`)
            self.known_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// Removes whatever is at `rel`.
    fn clear(&mut self, rel: &Path, keep_dir: bool) -> Result<(), UnpackError> {
        // what is cleared may be, or hold, stubs still being created
        self.settle_stubs()?;
        let abs = self.abs(rel);
        if keep_dir && self.known_dirs.contains(rel) {
            return Ok(());
        }
        match fs::symlink_metadata(&abs) {
            Ok(md) if md.is_dir() && keep_dir => Ok(()),
            Ok(md) if md.is_dir() => {
                self.known_dirs.retain(|d| !d.starts_with(rel));
                Ok(crate::layout::remove_tree(&abs)?)
            }
            Ok(_) => fs::remove_file(&abs).map_err(|e| CasError::io("remove", &abs)(e).into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CasError::io("stat", abs)(e).into()),
        }
    }

    /// Makes the entry `rel` (not a directory) with `make`, replacing what an earlier
    /// entry left at that name. The layer starts empty, so the name is tried first and
    /// cleared only when it is taken: no lookup for the common case.
    fn replacing<T>(
        &mut self,
        rel: &Path,
        make: impl Fn(&Path) -> Result<T, CasError>,
    ) -> Result<T, UnpackError> {
        let abs = self.abs(rel);
        match make(&abs) {
            Err(e) if e.is_already_exists() => {
                self.clear(rel, false)?;
                Ok(make(&abs)?)
            }
            made => Ok(made?),
        }
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

    fn entry_meta(
        &mut self,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
    ) -> Result<EntryMeta, UnpackError> {
        let h = entry.header();
        let tar_err = UnpackError::Tar;
        let mode = h.mode().map_err(tar_err)? & 0o7777;
        let uid = h.uid().map_err(UnpackError::Tar)? as u32;
        let gid = h.gid().map_err(UnpackError::Tar)? as u32;
        let mut mtime = TimeSpec::new(h.mtime().map_err(UnpackError::Tar)? as i64, 0);
        let mut atime: Option<TimeSpec> = None;
        let size = entry.size();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Tar)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Tar)?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.starts_with(b"trusted.") {
                        self.stats.skipped_xattrs += 1;
                        tracing::debug!(xattr = %String::from_utf8_lossy(name), "skipping trusted.* xattr from the archive");
                        continue;
                    }
                    xattrs.push((
                        OsString::from_vec(name.to_vec()),
                        ext.value_bytes().to_vec(),
                    ));
                } else if key == b"mtime" {
                    if let Some(t) = pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                } else if key == b"atime" {
                    atime = pax_time(ext.value_bytes());
                }
            }
        }
        // containerd: atime is the later of the archive's atime and mtime.
        let atime = match atime {
            Some(a) if (a.tv_sec(), a.tv_nsec()) > (mtime.tv_sec(), mtime.tv_nsec()) => a,
            _ => mtime,
        };
        Ok(EntryMeta {
            meta: FileMeta {
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            },
            xattrs,
        })
    }

    fn entry(&mut self, mut entry: tar::Entry<'_, ChunkReader<'_>>) -> Result<(), UnpackError> {
        self.stats.entries += 1;
        let name = clean_name(&entry.path_bytes());
        let (Some(base), parent) = (name.file_name().map(|b| b.to_os_string()), name.parent())
        else {
            tracing::debug!("entry resolves to the layer root: ignored");
            return Ok(());
        };
        let parent = parent.unwrap_or(Path::new(""));
        if !parent.as_os_str().is_empty() && !self.known_dirs.contains(parent) {
            // resolving looks at what is on disk, which must be complete
            self.settle_stubs()?;
        }
        let parent = self.resolve_parent(parent)?;
        let base_bytes = base.as_bytes();
        let kind = entry.header().entry_type();
        let em = self.entry_meta(&mut entry)?;

        if base_bytes.starts_with(WHITEOUT) {
            self.ensure_dirs(&parent)?;
            if base_bytes == OPAQUE {
                let dir = self.abs(&parent);
                xattr::set(&dir, XATTR_OPAQUE, b"y").map_err(CasError::io("setxattr", &dir))?;
                return Ok(());
            }
            if base_bytes.starts_with(WHITEOUT_META) {
                tracing::debug!(name = %name.display(), "skipping reserved whiteout name");
                return Ok(());
            }
            let hidden = parent.join(std::ffi::OsStr::from_bytes(&base_bytes[WHITEOUT.len()..]));
            self.settle_stub(&hidden)?;
            self.replacing(&hidden, |abs| {
                mknod(abs, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| CasError::io("mknod", abs)(e.into()))
            })?;
            lchown(&self.abs(&hidden), em.meta.uid, em.meta.gid)?;
            return Ok(());
        }

        let rel = parent.join(&base);
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        self.ensure_dirs(&parent)?;
        let abs = self.abs(&rel);
        if !matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
        ) {
            // every entry but a regular file is made here, in order, so the earlier
            // entries it may replace or point at must be complete
            if kind == tar::EntryType::Link {
                self.settle_stubs()?;
            } else {
                self.settle_stub(&rel)?;
            }
        }
        match kind {
            tar::EntryType::Directory => {
                let mkdir = |abs: &Path| match fs::DirBuilder::new().mode(0o700).create(abs) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    made => made.map(|()| true).map_err(CasError::io("mkdir", abs)),
                };
                if !self.known_dirs.contains(&rel) && !mkdir(&abs)? {
                    // a directory stays (its metadata is replaced), anything else goes
                    self.clear(&rel, true)?;
                    mkdir(&abs)?;
                }
                set_owner_mode(&abs, &em.meta)?;
                for (n, v) in &em.xattrs {
                    xattr::set(&abs, n, v).map_err(CasError::io("setxattr", &abs))?;
                }
                self.known_dirs.insert(rel.clone());
                self.dirs.push((rel, em.meta));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.regular(&mut entry, rel, em)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| OsString::from_vec(b.into_owned()))
                    .unwrap_or_default();
                self.replacing(&rel, |abs| {
                    std::os::unix::fs::symlink(&target, abs).map_err(CasError::io("symlink", abs))
                })?;
                lchown(&abs, em.meta.uid, em.meta.gid)?;
                for (n, v) in &em.xattrs {
                    // user.* xattrs are not allowed on symlinks; containerd skips those too
                    if let Err(e) = xattr::set(&abs, n, v) {
                        tracing::debug!(path = %rel.display(), error = %e, "xattr on symlink skipped");
                    }
                }
                set_times(&abs, &em.meta)?;
            }
            tar::EntryType::Link => {
                // cleared first, as for every entry, so the target cannot be this name
                self.clear(&rel, false)?;
                let target = clean_name(&entry.link_name_bytes().unwrap_or_default());
                let target = match (target.file_name(), target.parent()) {
                    (Some(b), p) => self.resolve_parent(p.unwrap_or(Path::new("")))?.join(b),
                    (None, _) => target,
                };
                let tabs = self.abs(&target);
                match fs::symlink_metadata(&tabs) {
                    Ok(md) if !md.is_dir() => {}
                    _ => {
                        return Err(CasError::Hostile {
                            path: rel,
                            reason: "hardlink to an entry that is not earlier in the same layer",
                        }
                        .into())
                    }
                }
                fs::hard_link(&tabs, &abs).map_err(CasError::io("link", &abs))?;
                if let Some((digest, size, ino)) = self.linked_content(&tabs)? {
                    self.stats.files += 1;
                    self.push_manifest(&rel, digest, size)?;
                    if let Some(stubs) = self.alias_stubs.get_mut(&digest) {
                        stubs.push((rel, ino));
                    }
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (flag, dev) = match kind {
                    tar::EntryType::Char | tar::EntryType::Block => {
                        let h = entry.header();
                        let major = h.device_major().map_err(UnpackError::Tar)?.unwrap_or(0);
                        let minor = h.device_minor().map_err(UnpackError::Tar)?.unwrap_or(0);
                        let flag = if kind == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, nix::sys::stat::makedev(major.into(), minor.into()))
                    }
                    // a FIFO's device fields mean nothing (and are often blank)
                    _ => (SFlag::S_IFIFO, 0),
                };
                self.replacing(&rel, |abs| {
                    mknod(abs, flag, Mode::from_bits_truncate(0o600), dev)
                        .map_err(|e| CasError::io("mknod", abs)(e.into()))
                })?;
                lchown(&abs, em.meta.uid, em.meta.gid)?;
                fs::set_permissions(&abs, fs::Permissions::from_mode(em.meta.mode))
                    .map_err(CasError::io("chmod", &abs))?;
                for (n, v) in &em.xattrs {
                    xattr::set(&abs, n, v).map_err(CasError::io("setxattr", &abs))?;
                }
                set_times(&abs, &em.meta)?;
            }
            other => {
                tracing::debug!(path = %rel.display(), kind = ?other, "tar entry type skipped");
            }
        }
        Ok(())
    }

    /// The object, size and inode behind an existing file of this layer (a hardlink's
    /// target), or `None` when it is not a stub (an empty file, a device, a symlink).
    fn linked_content(&mut self, abs: &Path) -> Result<Option<(Digest, u64, u64)>, CasError> {
        let md = fs::symlink_metadata(abs).map_err(CasError::io("stat", abs))?;
        if let Some((digest, size)) = self.recent.get(md.ino()) {
            return Ok(Some((digest, size, md.ino())));
        }
        let Some(target) = crate::stub::stub_target(abs)? else {
            return Ok(None);
        };
        // An old target: name the object from the stub (an alias is read to be sure).
        Ok(self
            .t
            .store
            .resolve(&target)?
            .map(|d| (d, md.len(), md.ino())))
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

    /// A regular file: hash it, make sure its content is (or will be) an object, and
    /// write its stub.
    fn regular(
        &mut self,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
        rel: PathBuf,
        em: EntryMeta,
    ) -> Result<(), UnpackError> {
        let size = em.meta.size;
        if size == 0 {
            self.make_stub(StubJob {
                rel,
                meta: em.meta,
                xattrs: em.xattrs,
                content: None,
            })?;
            return Ok(());
        }
        let (digest, redirect) = if size <= MEM_FILE_LIMIT {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(UnpackError::Tar)?;
            if data.len() as u64 != size {
                return Err(UnpackError::Tar(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: entry shorter than its header says", rel.display()),
                )));
            }
            let digest = Digest::of(&data);
            let redirect = match self.known_redirect(&digest)? {
                Some(r) => r,
                None => self.write_object(digest, data)?,
            };
            (digest, redirect)
        } else {
            self.stream_object(entry, size)?
        };
        self.stats.files += 1;
        self.stats.logical_bytes += size;
        self.push_manifest(&rel, digest, size)?;
        // The stub goes in now: its redirect is a name, whether or not the object is
        // linked yet (nothing mounts the layer before its manifest exists).
        self.make_stub(StubJob {
            rel,
            meta: em.meta,
            xattrs: em.xattrs,
            content: Some((digest, redirect)),
        })?;
        if self.pending_bytes >= FLUSH_BYTES || self.objects.len() >= FLUSH_FILES {
            // The oldest half: the workers keep writing the rest meanwhile.
            self.drain(FLUSH_FILES / 2, FLUSH_BYTES / 2)?;
        }
        Ok(())
    }

    /// The redirect for content that is stored or on its way, `None` for new content.
    fn known_redirect(&mut self, digest: &Digest) -> Result<Option<String>, CasError> {
        if let Some(r) = self.remembered_redirect(digest) {
            return Ok(Some(r));
        }
        let r = self.t.store.stored_redirect(digest)?;
        if let Some(r) = &r {
            self.remember_redirect(*digest, r.clone());
        }
        Ok(r)
    }

    /// The redirect of content on its way or recently seen in place, without a lookup in
    /// the store.
    fn remembered_redirect(&self, digest: &Digest) -> Option<String> {
        self.in_flight
            .get(digest)
            .or_else(|| self.redirects.get(digest))
            .cloned()
    }

    fn remember_redirect(&mut self, digest: Digest, redirect: String) {
        if self.redirects.len() >= RECENT_FILES {
            // bounded memory: a miss only costs two lookups
            self.redirects.clear();
        }
        self.redirects.insert(digest, redirect);
    }

    /// Queues new content (in memory) for the pool, which links it as the object and,
    /// when one is planned, at its alias. Returns the redirect its stubs get.
    fn write_object(&mut self, digest: Digest, data: Vec<u8>) -> Result<String, UnpackError> {
        let size = data.len() as u64;
        let (redirect, alias) = self.t.store.plan_redirect(&digest);
        let dest = self.t.store.path(&digest);
        let waiting = std::time::Instant::now();
        let ticket = self.t.pool.write_linked(
            self.t.tmp_dir,
            &dest,
            alias.as_deref(),
            OBJECT_MODE,
            vec![data],
        );
        self.times.write_wait += waiting.elapsed();
        let ticket = ticket?;
        self.in_flight.insert(digest, redirect.clone());
        if alias.is_some() {
            self.alias_stubs.insert(digest, Vec::new());
        }
        self.pending_bytes += size;
        self.objects.push_back(PendingObject {
            digest,
            size,
            ticket,
            redirect: redirect.clone(),
        });
        Ok(redirect)
    }

    /// Streams a large entry to a temporary file while hashing it, and publishes it as
    /// its object (or drops it if the content is stored already). Returns the digest and
    /// the redirect its stubs get.
    fn stream_object(
        &mut self,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
        size: u64,
    ) -> Result<(Digest, String), UnpackError> {
        let tmp = tmp_name(self.t.tmp_dir);
        let mut stream = self.t.pool.create_stream(&tmp, OBJECT_MODE)?;
        let streamed = stream_file(entry, &mut stream, size);
        let finished = stream.finish();
        let digest = match (streamed, finished) {
            (Ok(d), Ok(_)) => d,
            (Err(e), _) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            (Ok(_), Err(e)) => {
                let _ = fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        if let Some(r) = self.remembered_redirect(&digest) {
            self.stats.discarded_bytes += size;
            fs::remove_file(&tmp).map_err(CasError::io("remove", &tmp))?;
            return Ok((digest, r));
        }
        let published = self.t.store.publish_written(&tmp, &digest);
        let _ = fs::remove_file(&tmp);
        match published? {
            Publish::New => {
                self.stats.new_objects += 1;
                self.stats.new_bytes += size;
                self.new_objects.push(digest);
            }
            Publish::Existing => self.stats.discarded_bytes += size,
        }
        let redirect = self.t.store.redirect_for(&digest)?;
        self.remember_redirect(digest, redirect.clone());
        Ok((digest, redirect))
    }

    /// Makes a stub (or an empty file): on a stub thread, or here when its name has
    /// a directory or a stub in the making, which the stub threads must not race.
    fn make_stub(&mut self, job: StubJob) -> Result<(), UnpackError> {
        if self.known_dirs.contains(&job.rel) || self.stubs.in_flight.contains(&job.rel) {
            self.settle_stubs()?;
            return self.make_stub_here(job);
        }
        // collect what is done, and wait while too much is out
        while let Ok(d) = self.stubs.done.try_recv() {
            self.stub_done(d)?;
        }
        while self.stubs.in_flight.len() >= STUBS_IN_FLIGHT {
            self.stub_wait()?;
        }
        let Some(jobs) = &self.stubs.jobs else {
            return self.make_stub_here(job);
        };
        self.stubs.in_flight.insert(job.rel.clone());
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            // no stub thread left (one panicked): make it here
            self.stubs.in_flight.remove(&job.rel);
            self.stubs.jobs = None;
            return self.make_stub_here(job);
        }
        Ok(())
    }

    /// Makes a stub on this thread, replacing what an earlier entry left at its name.
    fn make_stub_here(&mut self, job: StubJob) -> Result<(), UnpackError> {
        let ino = self.replacing(&job.rel, |abs| job.create(abs))?;
        self.stub_made(job, ino);
        Ok(())
    }

    /// Records a stub made: for hardlinks to it, and for alias corrections.
    fn stub_made(&mut self, job: StubJob, ino: u64) {
        if let Some((digest, _)) = job.content {
            self.recent.insert(ino, digest, job.meta.size);
            if let Some(stubs) = self.alias_stubs.get_mut(&digest) {
                stubs.push((job.rel, ino));
            }
        }
    }

    /// Takes a stub thread's report: a name that was taken is made here, replacing
    /// what is there (no later entry touched the name meanwhile: see [`Self::settle_stub`]).
    fn stub_done(&mut self, d: StubDone) -> Result<(), UnpackError> {
        self.stubs.in_flight.remove(&d.job.rel);
        match d.result {
            Ok(ino) => {
                self.stub_made(d.job, ino);
                Ok(())
            }
            Err(e) if e.is_already_exists() => self.make_stub_here(d.job),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for one stub thread report.
    fn stub_wait(&mut self) -> Result<(), UnpackError> {
        let waiting = std::time::Instant::now();
        let done = self.stubs.done.recv();
        self.times.stub_wait += waiting.elapsed();
        match done {
            Ok(d) => self.stub_done(d),
            Err(_) => Err(UnpackError::Read(io::Error::other(
                "the stub threads stopped",
            ))),
        }
    }

    /// Waits until every stub handed to the stub threads is made, reporting the first
    /// failure once all are back.
    fn settle_stubs(&mut self) -> Result<(), UnpackError> {
        let mut first_err = None;
        while !self.stubs.in_flight.is_empty() {
            if let Err(e) = self.stub_wait() {
                if matches!(&e, UnpackError::Read(_)) {
                    return Err(e);
                }
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Waits for the stub threads when one is making `rel`: before anything else is
    /// done at that name.
    fn settle_stub(&mut self, rel: &Path) -> Result<(), UnpackError> {
        if self.stubs.in_flight.contains(rel) {
            self.settle_stubs()?;
        }
        Ok(())
    }

    /// Waits for every write in flight.
    fn flush(&mut self) -> Result<(), UnpackError> {
        self.drain(0, 0)
    }

    /// Waits for the oldest writes in flight until at most `files` objects and `bytes`
    /// bytes are left. An object whose planned alias the pool could not link (taken in
    /// the meantime, or the object was published by someone else first) gets its
    /// redirect decided again, and its stubs are corrected if it changed.
    fn drain(&mut self, files: usize, bytes: u64) -> Result<(), UnpackError> {
        if !self.alias_stubs.is_empty() {
            // the stubs an alias correction may have to repoint must all be written
            self.settle_stubs()?;
        }
        let mut first_err: Option<UnpackError> = None;
        while self.objects.len() > files || (self.pending_bytes > bytes && !self.objects.is_empty())
        {
            let Some(o) = self.objects.pop_front() else {
                break;
            };
            self.pending_bytes = self.pending_bytes.saturating_sub(o.size);
            self.in_flight.remove(&o.digest);
            let stubs = self.alias_stubs.remove(&o.digest);
            let waiting = std::time::Instant::now();
            let waited = o.ticket.wait();
            self.times.write_wait += waiting.elapsed();
            let aliased = match waited {
                Ok(linked) => {
                    self.stats.new_objects += 1;
                    self.stats.new_bytes += o.size;
                    self.new_objects.push(o.digest);
                    linked.second_name
                }
                Err(e)
                    if e.os_error().map(io::Error::kind) == Some(io::ErrorKind::AlreadyExists) =>
                {
                    false
                }
                Err(e) => {
                    first_err.get_or_insert(e.into());
                    continue;
                }
            };
            if first_err.is_some() {
                continue;
            }
            let redirect = match stubs {
                Some(stubs) if !aliased => {
                    match self.settle_redirect(&o.digest, &o.redirect, &stubs) {
                        Ok(r) => r,
                        Err(e) => {
                            first_err = Some(e.into());
                            continue;
                        }
                    }
                }
                _ => o.redirect,
            };
            self.remember_redirect(o.digest, redirect);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Decides the redirect of a new object whose planned alias `planned` the pool did
    /// not link, and points the stubs written with `planned` at it if it differs.
    fn settle_redirect(
        &self,
        digest: &Digest,
        planned: &str,
        stubs: &[(PathBuf, u64)],
    ) -> Result<String, CasError> {
        let redirect = self.t.store.redirect_for(digest)?;
        if redirect != planned {
            tracing::debug!(%digest, "alias taken while the object was written: stubs corrected");
            for (rel, ino) in stubs {
                let abs = self.abs(rel);
                // only the stubs still there (a later entry may have replaced one)
                let same = fs::symlink_metadata(&abs).is_ok_and(|md| md.ino() == *ino)
                    && xattr::get(&abs, XATTR_REDIRECT)
                        .map_err(CasError::io("getxattr", &abs))?
                        .is_some_and(|v| v == planned.as_bytes());
                if same {
                    xattr::set(&abs, XATTR_REDIRECT, redirect.as_bytes())
                        .map_err(CasError::io("setxattr", &abs))?;
                }
            }
        }
        Ok(redirect)
    }

    /// Waits for what is in flight, restores directory metadata, syncs and writes the
    /// manifest.
    fn finish(&mut self) -> Result<(), UnpackError> {
        self.settle_stubs()?;
        self.stubs.jobs = None;
        self.flush()?;
        for (rel, meta) in self.dirs.iter().rev() {
            let abs = self.t.fs_dir.join(rel);
            set_times(&abs, meta)?;
        }
        crate::crash_point!("apply.before-syncfs");
        let syncing = std::time::Instant::now();
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
        self.in_flight.clear();
        self.alias_stubs.clear();
        if let Some(m) = self.manifest.take() {
            m.abandon();
        }
    }
}

/// A stub, or an empty file, for a stub thread to make.
struct StubJob {
    /// Its name in the layer.
    rel: PathBuf,
    meta: FileMeta,
    xattrs: Vec<(OsString, Vec<u8>)>,
    /// The object and the redirect of a stub; `None` for an empty file.
    content: Option<(Digest, String)>,
}

impl StubJob {
    /// Creates it at `abs` (which must not exist); returns its inode number.
    fn create(&self, abs: &Path) -> Result<u64, CasError> {
        match &self.content {
            Some((_, redirect)) => write_stub(abs, &self.meta, &self.xattrs, redirect),
            None => create_empty(abs, &self.meta, &self.xattrs),
        }
    }
}

/// A stub thread's report.
struct StubDone {
    job: StubJob,
    result: Result<u64, CasError>,
}

/// The unpack thread's end of the stub threads.
///
/// Creating a stub is five or six metadata transactions in the filesystem (create, the
/// two overlay xattrs, size, times; owner and mode when they differ) and no data, so
/// a layer of many small files is bound by the kernel's metadata work on the thread
/// that makes its stubs. The stub threads make regular files' stubs and empty files
/// on the other cores while the unpack thread goes on parsing and hashing. Everything
/// else (directories, links, devices, whiteouts, replacements) stays on the unpack
/// thread, in archive order: before making one, it waits for the stub in the making
/// at the same name, and for all of them before it clears a name, resolves a parent
/// path that is not a known directory, makes a hardlink, repoints stubs at another
/// name, or restores directory times.
struct StubThreads {
    /// Where jobs go; `None` once the layer is complete (the threads then end).
    jobs: Option<mpsc::SyncSender<StubJob>>,
    done: mpsc::Receiver<StubDone>,
    /// Names handed out and not reported back.
    in_flight: HashSet<PathBuf>,
}

impl StubThreads {
    /// No stub threads: every stub is made on the unpack thread.
    #[cfg(test)]
    fn none() -> StubThreads {
        StubThreads {
            jobs: None,
            done: mpsc::channel().1,
            in_flight: HashSet::new(),
        }
    }
}

/// How many stub threads an apply runs: one per core but the unpack thread's, at
/// least one, at most four (metadata transactions contend in the filesystem's log
/// beyond that).
fn stub_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, 4)
}

/// A stub thread: makes stubs until the job channel closes.
fn stub_worker(
    fs_dir: &Path,
    jobs: &std::sync::Mutex<mpsc::Receiver<StubJob>>,
    done: mpsc::Sender<StubDone>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let result = job.create(&fs_dir.join(&job.rel));
        if done.send(StubDone { job, result }).is_err() {
            return;
        }
    }
}

/// Hardlink targets remembered: tar writers put a hardlink right after (or close to) its
/// target, so the last few thousand files answer nearly every lookup with bounded memory;
/// an older target is looked up from its stub.
const RECENT_FILES: usize = 1 << 16;

/// The digests of the most recently written stubs, by inode, at most [`RECENT_FILES`].
#[derive(Default)]
struct RecentFiles {
    map: HashMap<u64, (Digest, u64)>,
    order: std::collections::VecDeque<u64>,
}

impl RecentFiles {
    fn insert(&mut self, ino: u64, digest: Digest, size: u64) {
        if self.map.insert(ino, (digest, size)).is_none() {
            self.order.push_back(ino);
        }
        while self.order.len() > RECENT_FILES {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn get(&self, ino: u64) -> Option<(Digest, u64)> {
        self.map.get(&ino).copied()
    }
}

/// Reads up to [`CHUNK`] bytes (fewer only at the end; empty at the end).
fn read_chunk(reader: &mut (impl Read + ?Sized)) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK];
    let mut filled = 0;
    while filled < CHUNK {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Streams a large entry into `stream` while hashing it.
fn stream_file(
    entry: &mut impl Read,
    stream: &mut StreamWriter,
    size: u64,
) -> Result<Digest, UnpackError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let buf = read_chunk(entry).map_err(UnpackError::Tar)?;
        let filled = buf.len();
        if filled == 0 {
            break;
        }
        hasher.update(&buf);
        total += filled as u64;
        stream.write(buf)?;
    }
    if total != size {
        return Err(UnpackError::Tar(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "entry shorter than its header says",
        )));
    }
    Ok(Digest::from_bytes(hasher.finalize().into()))
}

/// A PAX time (`1700000000.123456789`, possibly negative) as a timespec.
fn pax_time(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += c.to_digit(10)? as i64 * 10i64.pow(8 - i as u32);
    }
    if s.starts_with('-') && nanos > 0 {
        return Some(TimeSpec::new(secs - 1, 1_000_000_000 - nanos));
    }
    Some(TimeSpec::new(secs, nanos))
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), CasError> {
    fchownat(
        None,
        path,
        Some(uid.into()),
        Some(gid.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| CasError::io("chown", path)(e.into()))
}

fn set_owner_mode(path: &Path, meta: &FileMeta) -> Result<(), CasError> {
    lchown(path, meta.uid, meta.gid)?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
        .map_err(CasError::io("chmod", path))
}

fn set_times(path: &Path, meta: &FileMeta) -> Result<(), CasError> {
    utimensat(
        None,
        path,
        &meta.atime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| CasError::io("utimens", path)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_against_the_root() {
        assert_eq!(clean_name(b"./a/b"), PathBuf::from("a/b"));
        assert_eq!(clean_name(b"/a//b/"), PathBuf::from("a/b"));
        assert_eq!(clean_name(b"a/../../b"), PathBuf::from("b"));
        assert_eq!(clean_name(b"../../etc/passwd"), PathBuf::from("etc/passwd"));
        assert_eq!(clean_name(b"./"), PathBuf::from(""));
        assert_eq!(clean_name(b".."), PathBuf::from(""));
    }

    #[test]
    fn compression_is_told_by_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"usr/\0\0"), Compression::None);
        assert_eq!(Compression::detect(b""), Compression::None);
    }

    #[test]
    fn pax_times_parse() {
        let t = pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 500_000_000));
        let t = pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (12, 0));
        let t = pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 750_000_000));
        assert!(pax_time(b"x").is_none());
    }

    #[test]
    #[ignore = "needs root: trusted.* xattrs (make unit runs it)"]
    fn stubs_follow_the_redirect_when_a_planned_alias_is_taken() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root: trusted.* xattrs"
        );
        let dir = tempfile::tempdir().unwrap();
        let layout = crate::Layout::ensure(dir.path()).unwrap();
        let store = ObjectStore::new(&layout).with_aliases(true);
        let pool = Pool::start(&ringio::PoolConfig::default()).unwrap();
        let (fs_dir, manifest, tmp) = (
            dir.path().join("fs"),
            dir.path().join("manifest"),
            layout.tmp_dir(),
        );
        fs::create_dir(&fs_dir).unwrap();
        let target = Target {
            store: &store,
            tmp_dir: &tmp,
            fs_dir: &fs_dir,
            lowers: &[],
            manifest: &manifest,
            pool: &pool,
        };
        let mut u = Unpacker::new(&target, StubThreads::none()).unwrap();
        let meta = FileMeta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 4,
            atime: TimeSpec::new(0, 0),
            mtime: TimeSpec::new(0, 0),
        };
        let digest = Digest::of(b"data");
        let planned = u.write_object(digest, b"data".to_vec()).unwrap();
        assert_eq!(planned, format!("/{}", digest.alias()));
        let ino = write_stub(&fs_dir.join("s"), &meta, &[], &planned).unwrap();
        u.alias_stubs
            .get_mut(&digest)
            .unwrap()
            .push(("s".into(), ino));
        u.flush().unwrap();
        assert_eq!(u.stats.new_objects, 1);
        // As if another object had taken the alias before the pool linked it.
        let alias = store.alias_path(&digest.alias());
        fs::remove_file(&alias).unwrap();
        fs::write(&alias, b"other").unwrap();
        let settled = u
            .settle_redirect(&digest, &planned, &[("s".into(), ino)])
            .unwrap();
        assert_eq!(settled, digest.redirect());
        assert_eq!(
            crate::stub::stub_target(&fs_dir.join("s")).unwrap(),
            Some(crate::stub::StubTarget::Object(digest))
        );
        u.abandon();
    }

    #[test]
    fn limits_scale_with_the_blob() {
        let l = Limits {
            max_bytes: 10_000,
            max_ratio: 10,
            ratio_floor: 100,
        };
        assert_eq!(l.allowed(1), 100);
        assert_eq!(l.allowed(50), 500);
        assert_eq!(l.allowed(5_000), 10_000);
    }
}
