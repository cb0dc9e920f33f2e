//! The I/O pool: worker threads that read blobs and write new files for the store.
//!
//! ## Threading model
//! [`Pool::start`] spawns `workers` threads. With the **io_uring** backend each thread
//! runs its own current-thread tokio-uring runtime with its own ring and its own pool of
//! registered fixed buffers (`buffers` × `buffer_size` bytes, registered once when the
//! worker starts); every command becomes a task on that runtime, so one worker serves many
//! files at once. With the **threads** backend (io_uring unavailable: old kernel, seccomp,
//! `io_uring_disabled`, or forced by configuration) the same threads do plain
//! `pread`/`pwrite`, one command at a time, and each read gets a thread of its own. The
//! API and its results are the same for both; [`Pool::backend`] says which one runs and
//! [`Pool::fallback_reason`] why io_uring does not.
//!
//! Beside the io_uring workers run `workers` plain threads for small writes: a write from
//! memory of at most [`PoolConfig::small_writes`] bytes goes to them. Such a write is
//! mostly metadata (an `O_TMPFILE` open, a few KiB, a link, a close), and each of those
//! calls that can block is punted by the ring to a kernel worker thread and its
//! completion waited for: a plain call on a thread costs less. Applying layers of new
//! small files (`cas-bench engine`, XFS, 2 cores, three interleaved rounds of medians of
//! 3), every write through the ring against small ones on threads: 10,000 files of
//! 1.8 KB 0.83 s against 0.74 s, 50,000 files of 5 KB 3.70 s against 3.34 s.
//!
//! [`BackendChoice::Auto`] probes io_uring once per process ([`probe_io_uring`]):
//! `kernel.io_uring_disabled`, then a ring that completes a no-op, an open, a
//! fixed-buffer read and a close. If the probe fails, or a worker cannot set up its ring
//! or register its buffers, the pool logs why (`tracing::warn!`) and runs on threads.
//!
//! Work reaches a worker through bounded channels ([`async_channel`]: producers block in
//! plain threads or `spawn_blocking`, the io_uring workers await) of
//! [`PoolConfig::queue_depth`] commands: a producer faster than the disks waits (counted
//! in [`PoolStats::backpressure_waits`]) instead of queueing without limit. An io_uring
//! worker runs at most `queue_depth` writes at once and leaves further commands in its
//! channel, so memory stays bounded by `2 × workers × queue_depth` pending writes plus the
//! buffers in flight; the small-write threads (above) add `workers × (queue_depth + 1)`
//! writes of at most [`PoolConfig::small_writes`] bytes each. Reads have a channel of their own and take no write slot, so a
//! producer that holds a stream open can still read a blob.
//!
//! ## Operations
//! * [`Pool::read_file`]: a whole file read sequentially, a few buffers ahead of the
//!   consumer, handed out as a blocking [`std::io::Read`] ([`FileReader`]). The file is
//!   opened by the caller (so a missing file fails right there, with its path); an
//!   io_uring worker then keeps `max(1, buffers / 2)` `read_fixed_at`s in flight and copies
//!   each completed buffer into the chunk it hands over;
//! * [`Pool::write_file`]: a new file (`O_CREAT | O_EXCL`) written from memory, completed
//!   through a [`Ticket`];
//! * [`Pool::create_stream`]: a new file written from a sequence of chunks that are not
//!   all in memory at once ([`StreamWriter`]), for files too large to buffer.
//!
//! On io_uring, writes open the file through the ring and keep `max(1, buffers / 2)`
//! `write_all_at`s in flight at their offsets, each owning its chunk (`Vec<u8>`) until it
//! completes. Copying the chunks into registered buffers for `write_fixed_all_at` instead
//! was measured on 256 KiB chunks (4 streams of 64 MiB plus 64 files of 16 chunks,
//! interleaved, ext4): owned chunks were as fast or faster in every run (medians 2356,
//! 1782, 2473, 1088 MB/s against 2341, 1638, 1534, 923), since the copy costs more than
//! the page pinning it saves. So writes use no registered buffers and never wait for one,
//! and the registered buffers serve reads alone. Errors come back as [`PoolError::Io`] with the path
//! and the OS error (`EEXIST`, `ENOSPC`, ...).
//!
//! ## Measured here
//! `bench_backends` (an ignored test; `cargo test --release -p ringio bench_backends --
//! --ignored --nocapture`) on this project's machines (2 shared cores of an EPYC VM,
//! ext4, kernel 6.18, default [`PoolConfig`], busy with other builds, so the spread is
//! wide), two runs of medians of 3, threads / io_uring in MB/s: a 256 MiB file read cold
//! 670 / 460 and 1094 / 394, warm 922 / 556 and 1825 / 1442; 1000 files of 64 KiB 61 / 61
//! and 82 / 100; 4 streams of 64 MiB in 256 KiB chunks 883 / 1532 and 1469 / 2041. So
//! io_uring wins where several writes overlap, and loses on a single sequential read: on
//! this machine the kernel's copy from the page cache into a registered buffer costs
//! several times its copy into a plain user buffer (`perf`: 2 GiB read warm took 1.7 s of
//! CPU with `read_fixed_at`, 0.9 s with `read_at` into owned buffers, 0.6 s on threads).
//!
//! Nothing here fsyncs: the store makes a layer durable with one `syncfs` after all its
//! writes completed (see the `cas` crate).
//!
//! # Safety
//! This module has no `unsafe`: tokio-uring's safe API does the submissions. Its
//! contract, which the design relies on, is that an operation owns its buffer (a
//! `Vec<u8>` or a registered `FixedBuf`) and a clone of the file descriptor from
//! submission until the completion arrives, and returns the buffer with the result; a
//! dropped operation keeps both alive in the driver until the kernel is done with them.
//! So no buffer is touched or freed while the kernel may write into it or read from it.
//!
//! Buffer ownership, and why a read cannot starve the worker: a registered buffer is
//! held only by a read operation in flight, each running as a task of its own that copies
//! the bytes out and drops the buffer the moment its completion arrives, whatever its
//! parent task does. A read waits for a free buffer only when it has none in flight, so no
//! task holds buffers while it waits for more, and a slow consumer holds copies, never
//! registered buffers.
//!
//! ## Shutdown
//! Dropping the last [`Pool`] clone closes the channels; each worker runs what is queued,
//! waits for its tasks, and the drop joins the threads. A [`FileReader`] or
//! [`StreamWriter`] keeps the workers alive until it is dropped, so every [`Ticket`]
//! completes; if a worker dies, its tickets return [`PoolError::Stopped`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use async_channel::{Receiver, Sender, TrySendError};

use crate::error::IoError;

mod uring;

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring where it works, otherwise plain threads.
    #[default]
    Auto,
    /// Plain threads with `pread`/`pwrite`, whatever the kernel offers.
    Threads,
}

/// The backend a pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring: one ring and one registered buffer pool per worker.
    IoUring,
    /// Plain system calls on the worker threads.
    Threads,
}

impl Backend {
    /// The name used in logs, stats and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Threads => "threads",
        }
    }
}

/// Sizes of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Registered buffers per worker (io_uring) or read-ahead buffers per read.
    pub buffers: usize,
    /// Bytes of each buffer.
    pub buffer_size: usize,
    /// Commands a worker's channel holds before producers wait.
    pub queue_depth: usize,
    /// Writes from memory of at most this many bytes go to plain threads on the io_uring
    /// backend too (`workers` more threads; 0: none do). See the module docs.
    pub small_writes: usize,
    /// Which backend.
    pub backend: BackendChoice,
}

/// Default [`PoolConfig::small_writes`].
pub const DEFAULT_SMALL_WRITES: usize = 32 * 1024;

/// Default buffer size: large enough that a read is one request per 256 KiB of blob.
pub const DEFAULT_BUFFER_SIZE: usize = 256 * 1024;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: 2,
            buffers: 16,
            buffer_size: DEFAULT_BUFFER_SIZE,
            queue_depth: 64,
            small_writes: DEFAULT_SMALL_WRITES,
            backend: BackendChoice::Auto,
        }
    }
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A system call on a file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A worker thread could not be started.
    #[error("starting I/O worker: {0}")]
    Spawn(#[source] io::Error),
    /// The pool was shut down (or a worker died) before the operation completed.
    #[error("the I/O pool stopped")]
    Stopped,
    /// The configuration cannot work (zero workers, zero-sized buffers).
    #[error("invalid I/O pool configuration: {0}")]
    Config(&'static str),
}

/// Why a pool asked for [`BackendChoice::Auto`] runs on plain threads instead of io_uring
/// ([`Pool::fallback_reason`], [`probe_io_uring`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum UringUnavailable {
    /// `/proc/sys/kernel/io_uring_disabled` forbids io_uring to every process.
    #[error("io_uring is disabled (kernel.io_uring_disabled = {0})")]
    Disabled(u32),
    /// No ring could be set up: `ENOSYS` (a kernel without io_uring), `EPERM` (seccomp,
    /// or `io_uring_disabled = 1` for a process outside `io_uring_group`), `ENOMEM`, ...
    #[error("setting up an io_uring: {0}")]
    Setup(#[source] Arc<io::Error>),
    /// The ring came up but an operation of the probe failed (a filtered opcode, say).
    #[error("io_uring probe {op}: {source}")]
    Probe {
        /// The operation that failed (`no-op`, `register buffers`, `open`, `read_fixed`, ...).
        op: &'static str,
        /// What it returned.
        #[source]
        source: Arc<io::Error>,
    },
    /// A worker of this pool could not set up its ring or register its buffers
    /// (`ENOMEM` for the locked memory of `buffers` × `buffer_size`, for example).
    #[error("io_uring worker {worker}: {source}")]
    Worker {
        /// The worker's number.
        worker: usize,
        /// What failed.
        #[source]
        source: Arc<io::Error>,
    },
    /// The probe or a worker panicked while setting up.
    #[error("io_uring {0} panicked while starting")]
    Panicked(&'static str),
}

/// Whether io_uring works in this process: `kernel.io_uring_disabled`, then a ring that
/// completes a no-op, an open, a fixed-buffer read and a close. It runs once per process
/// (on a thread of its own, so it may be called from async code); later calls return
/// the cached answer.
pub fn probe_io_uring() -> Result<(), UringUnavailable> {
    uring::probe()
}

impl PoolError {
    /// The OS error behind this one, if any (ENOSPC, EEXIST, ...).
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            PoolError::Io(e) => Some(&e.source),
            _ => None,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| IoError::at_path(op, path)(source).into()
}

/// Counters of a pool since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The backend.
    pub backend: &'static str,
    /// Bytes read by [`Pool::read_file`].
    pub bytes_read: u64,
    /// Bytes written by [`Pool::write_file`] and [`StreamWriter`].
    pub bytes_written: u64,
    /// Files written.
    pub files_written: u64,
    /// Times a producer waited for room in a worker's queue.
    pub backpressure_waits: u64,
    /// Write commands (files and streams) queued or running now.
    pub queue_depth: u64,
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    files_written: AtomicU64,
    backpressure_waits: AtomicU64,
    queued: AtomicUsize,
}

/// Where a written `O_TMPFILE` gets its names ([`Pool::write_linked`]).
struct Names {
    /// The name it must get; "already exists" fails the write.
    dest: PathBuf,
    /// A second name, made after `dest` if it can be ([`Linked::second_name`]).
    second: Option<PathBuf>,
}

/// What a worker reports for a write.
type Done = mpsc::SyncSender<Result<Linked, PoolError>>;

/// A write command for a worker.
enum Command {
    /// Create `path` exclusively with `mode` and write `chunks` into it in order; with
    /// `names`, `path` is a directory: the file is an unnamed `O_TMPFILE` there, linked
    /// at its names once written (so no reader ever sees it partial).
    Write {
        path: PathBuf,
        names: Option<Names>,
        mode: u32,
        chunks: Vec<Vec<u8>>,
        done: Done,
    },
    /// Open a stream: create `path`; chunks follow on `data`.
    Stream {
        path: PathBuf,
        mode: u32,
        data: Receiver<Vec<u8>>,
        done: Done,
    },
}

/// A read for an io_uring worker: `file` (opened by the caller) from start to end.
struct ReadCommand {
    file: File,
    path: PathBuf,
    /// The size at open; reads past it go one at a time until end of file.
    size_hint: u64,
    chunks: Sender<Chunk>,
}

/// What a [`FileReader`] receives: the next bytes, an error, or (empty) the end.
type Chunk = io::Result<Vec<u8>>;

struct Inner {
    config: PoolConfig,
    backend: Backend,
    fallback: Option<UringUnavailable>,
    senders: Vec<Sender<Command>>,
    /// Read channels of the io_uring workers (empty on the threads backend).
    read_senders: Vec<Sender<ReadCommand>>,
    /// Channels of the threads that take small writes beside the io_uring workers (empty
    /// on the threads backend, where every write goes to `senders`).
    small_senders: Vec<Sender<Command>>,
    next: AtomicUsize,
    counters: Arc<Counters>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channels ends the workers once they ran what is queued. Every
        // handle that a task could be waiting on ([`FileReader`], [`StreamWriter`]) holds
        // this `Inner`, so nothing the workers wait for outlives this point: no hang.
        self.senders.clear();
        self.read_senders.clear();
        self.small_senders.clear();
        if let Ok(mut threads) = self.threads.lock() {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// A pool of I/O workers; cheap to clone, stopped when the last clone is dropped.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.inner.backend)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Pool {
    /// Starts the workers, choosing the backend (see the module docs).
    pub fn start(config: &PoolConfig) -> Result<Pool, PoolError> {
        if config.workers == 0 {
            return Err(PoolError::Config("workers must be at least 1"));
        }
        if config.buffers == 0 || config.buffer_size == 0 {
            return Err(PoolError::Config(
                "buffers and buffer_size must be non-zero",
            ));
        }
        if config.queue_depth == 0 {
            return Err(PoolError::Config("queue_depth must be at least 1"));
        }
        let counters = Arc::new(Counters::default());
        let mut fallback = None;
        if config.backend == BackendChoice::Auto {
            match uring::probe().and_then(|()| start_uring(config, &counters)) {
                Ok(mut workers) => {
                    if config.small_writes > 0 {
                        let small = match start_threads(config, &counters, "ringio-small") {
                            Ok(small) => small,
                            Err(e) => {
                                stop(workers.senders, workers.read_senders, workers.threads);
                                return Err(e);
                            }
                        };
                        workers.small_senders = small.senders;
                        workers.threads.extend(small.threads);
                    }
                    return Ok(Pool::assemble(
                        config,
                        Backend::IoUring,
                        None,
                        workers,
                        counters,
                    ));
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "io_uring unavailable: the I/O pool runs on plain threads");
                    fallback = Some(why);
                }
            }
        }
        let workers = start_threads(config, &counters, "ringio")?;
        Ok(Pool::assemble(
            config,
            Backend::Threads,
            fallback,
            workers,
            counters,
        ))
    }

    fn assemble(
        config: &PoolConfig,
        backend: Backend,
        fallback: Option<UringUnavailable>,
        workers: Workers,
        counters: Arc<Counters>,
    ) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                config: config.clone(),
                backend,
                fallback,
                senders: workers.senders,
                read_senders: workers.read_senders,
                small_senders: workers.small_senders,
                next: AtomicUsize::new(0),
                counters,
                threads: std::sync::Mutex::new(workers.threads),
            }),
        }
    }

    /// Why io_uring does not run although [`BackendChoice::Auto`] asked for it (also
    /// logged at start); `None` when it runs or [`BackendChoice::Threads`] was asked for.
    pub fn fallback_reason(&self) -> Option<&UringUnavailable> {
        self.inner.fallback.as_ref()
    }

    /// The backend that runs.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The configuration the pool was started with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Counters since start.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            backend: self.inner.backend.as_str(),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            files_written: c.files_written.load(Ordering::Relaxed),
            backpressure_waits: c.backpressure_waits.load(Ordering::Relaxed),
            queue_depth: c.queued.load(Ordering::Relaxed) as u64,
        }
    }

    /// The next worker's channel, round robin.
    fn pick<'a, T>(&self, senders: &'a [Sender<T>]) -> Result<&'a Sender<T>, PoolError> {
        if senders.is_empty() {
            return Err(PoolError::Stopped);
        }
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed) % senders.len();
        Ok(&senders[n])
    }

    /// Queues `msg` on `tx`, waiting (and counting the wait) while the queue is full.
    fn push<T>(&self, tx: &Sender<T>, msg: T) -> Result<(), PoolError> {
        let msg = match tx.try_send(msg) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(msg)) => msg,
            Err(TrySendError::Closed(_)) => return Err(PoolError::Stopped),
        };
        self.inner
            .counters
            .backpressure_waits
            .fetch_add(1, Ordering::Relaxed);
        tx.send_blocking(msg).map_err(|_| PoolError::Stopped)
    }

    fn send(&self, cmd: Command) -> Result<(), PoolError> {
        let small = match &cmd {
            Command::Write { chunks, .. } => {
                chunks.iter().map(Vec::len).sum::<usize>() <= self.inner.config.small_writes
            }
            Command::Stream { .. } => false,
        };
        let senders = if small && !self.inner.small_senders.is_empty() {
            &self.inner.small_senders
        } else {
            &self.inner.senders
        };
        let tx = self.pick(senders)?;
        self.inner.counters.queued.fetch_add(1, Ordering::Relaxed);
        self.push(tx, cmd).inspect_err(|_| {
            self.inner.counters.queued.fetch_sub(1, Ordering::Relaxed);
        })
    }

    /// Reads the file at `path` from start to end, `buffers` reads ahead of the consumer.
    pub fn read_file(&self, path: &Path) -> Result<FileReader, PoolError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let (tx, rx) = async_channel::bounded::<Chunk>(self.inner.config.buffers);
        match self.inner.backend {
            Backend::IoUring => {
                let size_hint = file.metadata().map_err(io_err("stat", path))?.len();
                let worker = self.pick(&self.inner.read_senders)?;
                self.push(
                    worker,
                    ReadCommand {
                        file,
                        path: path.to_path_buf(),
                        size_hint,
                        chunks: tx,
                    },
                )?;
            }
            Backend::Threads => {
                let size = self.inner.config.buffer_size;
                let counters = self.inner.counters.clone();
                let path = path.to_path_buf();
                std::thread::Builder::new()
                    .name("ringio-read".into())
                    .spawn(move || threads_read(&file, &path, size, &tx, &counters))
                    .map_err(PoolError::Spawn)?;
            }
        }
        Ok(FileReader {
            rx,
            current: Vec::new(),
            pos: 0,
            done: false,
            _pool: self.inner.clone(),
        })
    }

    /// Creates `path` (which must not exist) with `mode` and writes `chunks` into it, in
    /// order. The returned [`Ticket`] completes with the bytes written.
    pub fn write_file(
        &self,
        path: &Path,
        mode: u32,
        chunks: Vec<Vec<u8>>,
    ) -> Result<Ticket, PoolError> {
        let (done, rx) = mpsc::sync_channel(1);
        self.send(Command::Write {
            path: path.to_path_buf(),
            names: None,
            mode,
            chunks,
            done,
        })?;
        Ok(Ticket::new(rx, |l| l.bytes))
    }

    /// Writes `chunks` into a new unnamed file (`O_TMPFILE`) in `dir` with `mode` and
    /// then links it at `dest`, all on a worker: `dest` appears complete or not at all,
    /// and no temporary name is left to remove. If `dest` exists the ticket fails with
    /// [`io::ErrorKind::AlreadyExists`] (op `link`) and the written file vanishes.
    ///
    /// Once `dest` is linked, the file also gets the name `second` when one is given and
    /// it is free; [`Linked::second_name`] says whether `second` is this file afterwards
    /// (a `second` that cannot be made is not an error: the caller decides).
    pub fn write_linked(
        &self,
        dir: &Path,
        dest: &Path,
        second: Option<&Path>,
        mode: u32,
        chunks: Vec<Vec<u8>>,
    ) -> Result<Ticket<Linked>, PoolError> {
        let (done, rx) = mpsc::sync_channel(1);
        self.send(Command::Write {
            path: dir.to_path_buf(),
            names: Some(Names {
                dest: dest.to_path_buf(),
                second: second.map(Path::to_path_buf),
            }),
            mode,
            chunks,
            done,
        })?;
        Ok(Ticket::new(rx, |l| l))
    }

    /// Creates `path` (which must not exist) with `mode`, to be written chunk by chunk
    /// through the returned [`StreamWriter`].
    pub fn create_stream(&self, path: &Path, mode: u32) -> Result<StreamWriter, PoolError> {
        let (data_tx, data) = async_channel::bounded(self.inner.config.buffers);
        let (done, rx) = mpsc::sync_channel(1);
        self.send(Command::Stream {
            path: path.to_path_buf(),
            mode,
            data,
            done,
        })?;
        Ok(StreamWriter {
            tx: Some(data_tx),
            ticket: Ticket::new(rx, |l| l.bytes),
            _pool: self.inner.clone(),
        })
    }
}

/// What a [`Pool::write_linked`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linked {
    /// Bytes written.
    pub bytes: u64,
    /// Whether the second name asked for is this file now: linked by this write, or
    /// found to be a name of the same inode already. `false` when none was asked for,
    /// or the name is another file's or could not be made.
    pub second_name: bool,
}

/// The completion of a write: [`Ticket::wait`] returns what it did (the bytes written,
/// or a [`Linked`]) or the error.
#[derive(Debug)]
pub struct Ticket<T = u64> {
    rx: mpsc::Receiver<Result<Linked, PoolError>>,
    out: fn(Linked) -> T,
}

impl<T> Ticket<T> {
    fn new(rx: mpsc::Receiver<Result<Linked, PoolError>>, out: fn(Linked) -> T) -> Ticket<T> {
        Ticket { rx, out }
    }

    /// Blocks until the write completed.
    pub fn wait(self) -> Result<T, PoolError> {
        self.rx
            .recv()
            .unwrap_or(Err(PoolError::Stopped))
            .map(self.out)
    }
}

/// A file being written chunk by chunk (see [`Pool::create_stream`]).
///
/// It keeps the pool's workers running until it is finished or dropped.
pub struct StreamWriter {
    tx: Option<Sender<Vec<u8>>>,
    ticket: Ticket,
    // Last: dropped after `tx`, so the worker sees the stream end before the pool may
    // wait for that worker.
    _pool: Arc<Inner>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("open", &self.tx.is_some())
            .finish_non_exhaustive()
    }
}

impl StreamWriter {
    /// Queues the next chunk; blocks while the worker is `buffers` chunks behind.
    pub fn write(&mut self, chunk: Vec<u8>) -> Result<(), PoolError> {
        match &self.tx {
            Some(tx) => tx.send_blocking(chunk).map_err(|_| PoolError::Stopped),
            None => Err(PoolError::Stopped),
        }
    }

    /// Ends the stream and waits until every chunk is written; returns the bytes written.
    /// If a write failed, that error is returned here.
    pub fn finish(mut self) -> Result<u64, PoolError> {
        self.tx = None;
        self.ticket.wait()
    }
}

/// A file read ahead by the pool (see [`Pool::read_file`]).
///
/// A read error carries the [`io::ErrorKind`] of the OS error and names the file. It
/// keeps the pool's workers running until it is dropped.
pub struct FileReader {
    rx: Receiver<Chunk>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
    // Last: dropped after `rx`, so the reading task sees its reader gone before the pool
    // may wait for that task.
    _pool: Arc<Inner>,
}

impl std::fmt::Debug for FileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileReader")
            .field("buffered", &(self.current.len() - self.pos))
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv_blocking() {
                Ok(Ok(chunk)) if chunk.is_empty() => {
                    self.done = true;
                    return Ok(0);
                }
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    // The sender went away without marking the end: not a whole file.
                    self.done = true;
                    return Err(io::Error::other(PoolError::Stopped));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn create_new(path: &Path, mode: u32) -> Result<File, PoolError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))
}

fn write_all_at(file: &File, path: &Path, buf: &[u8], off: u64) -> Result<(), PoolError> {
    file.write_all_at(buf, off).map_err(io_err("write", path))
}

/// The channels and threads of a started backend.
struct Workers {
    senders: Vec<Sender<Command>>,
    read_senders: Vec<Sender<ReadCommand>>,
    small_senders: Vec<Sender<Command>>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts `config.workers` threads of the threads backend, named `<name>-<n>`.
fn start_threads(
    config: &PoolConfig,
    counters: &Arc<Counters>,
    name: &str,
) -> Result<Workers, PoolError> {
    let mut senders = Vec::with_capacity(config.workers);
    let mut threads = Vec::with_capacity(config.workers);
    for n in 0..config.workers {
        let (tx, rx) = async_channel::bounded(config.queue_depth);
        let c = counters.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{n}"))
            .spawn(move || threads_worker(rx, c));
        match spawned {
            Ok(t) => {
                senders.push(tx);
                threads.push(t);
            }
            Err(e) => {
                stop(senders, Vec::new(), threads);
                return Err(PoolError::Spawn(e));
            }
        }
    }
    Ok(Workers {
        senders,
        read_senders: Vec::new(),
        small_senders: Vec::new(),
        threads,
    })
}

/// Starts the io_uring workers and waits until each has its ring and buffers.
fn start_uring(config: &PoolConfig, counters: &Arc<Counters>) -> Result<Workers, UringUnavailable> {
    let wc = uring::WorkerConfig {
        buffers: config.buffers,
        buffer_size: config.buffer_size,
        queue_depth: config.queue_depth,
    };
    let (ready_tx, ready) = mpsc::channel();
    let mut senders = Vec::with_capacity(config.workers);
    let mut read_senders = Vec::with_capacity(config.workers);
    let mut threads = Vec::with_capacity(config.workers);
    for n in 0..config.workers {
        let (tx, rx) = async_channel::bounded(config.queue_depth);
        let (read_tx, read_rx) = async_channel::bounded(config.queue_depth);
        match uring::start_worker(n, wc, rx, read_rx, counters.clone(), ready_tx.clone()) {
            Ok(t) => {
                senders.push(tx);
                read_senders.push(read_tx);
                threads.push(t);
            }
            Err(e) => {
                stop(senders, read_senders, threads);
                return Err(UringUnavailable::Worker {
                    worker: n,
                    source: Arc::new(e),
                });
            }
        }
    }
    drop(ready_tx);
    for _ in 0..config.workers {
        let failure = match ready.recv() {
            Ok((_, Ok(()))) => continue,
            Ok((worker, Err(e))) => UringUnavailable::Worker {
                worker,
                source: Arc::new(e),
            },
            // Every sender is gone before all reported: a worker panicked.
            Err(_) => UringUnavailable::Panicked("worker"),
        };
        stop(senders, read_senders, threads);
        return Err(failure);
    }
    Ok(Workers {
        senders,
        read_senders,
        small_senders: Vec::new(),
        threads,
    })
}

/// Closes the channels of workers that started and waits for their threads.
fn stop(
    senders: Vec<Sender<Command>>,
    read_senders: Vec<Sender<ReadCommand>>,
    threads: Vec<JoinHandle<()>>,
) {
    drop(senders);
    drop(read_senders);
    for t in threads {
        let _ = t.join();
    }
}

/// The threads backend's read: `pread` of `size` bytes at a time into fresh chunks.
fn threads_read(file: &File, path: &Path, size: usize, tx: &Sender<Chunk>, counters: &Counters) {
    let mut off = 0u64;
    loop {
        let mut buf = vec![0u8; size];
        match file.read_at(&mut buf, off) {
            Ok(0) => {
                // The end marker; the reader may be gone already.
                let _ = tx.send_blocking(Ok(Vec::new()));
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                off += n as u64;
                counters.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                if tx.send_blocking(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let e = io::Error::new(e.kind(), io_err("read", path)(e));
                let _ = tx.send_blocking(Err(e));
                return;
            }
        }
    }
}

/// The threads backend: one command at a time, plain `pwrite`.
fn threads_worker(rx: Receiver<Command>, counters: Arc<Counters>) {
    while let Ok(cmd) = rx.recv_blocking() {
        match cmd {
            Command::Write {
                path,
                names,
                mode,
                chunks,
                done,
            } => {
                let res = (|| {
                    let file = match &names {
                        Some(_) => create_tmpfile(&path, mode)?,
                        None => create_new(&path, mode)?,
                    };
                    let mut off = 0u64;
                    for c in &chunks {
                        write_all_at(&file, &path, c, off)?;
                        off += c.len() as u64;
                    }
                    let second_name = match &names {
                        Some(names) => link_names(file.as_raw_fd(), names)?,
                        None => false,
                    };
                    Ok(Linked {
                        bytes: off,
                        second_name,
                    })
                })();
                finish(&counters, &res);
                let _ = done.try_send(res);
            }
            Command::Stream {
                path,
                mode,
                data,
                done,
            } => {
                let res = (|| {
                    let file = create_new(&path, mode)?;
                    let mut off = 0u64;
                    // An error ends the stream; the producer sees it at finish.
                    while let Ok(c) = data.recv_blocking() {
                        write_all_at(&file, &path, &c, off)?;
                        off += c.len() as u64;
                    }
                    Ok(Linked {
                        bytes: off,
                        second_name: false,
                    })
                })();
                finish(&counters, &res);
                let _ = done.try_send(res);
            }
        }
    }
}

/// An unnamed file in `dir` (`O_TMPFILE`), to be linked once written.
fn create_tmpfile(dir: &Path, mode: u32) -> Result<File, PoolError> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(mode)
        .open(dir)
        .map_err(io_err("create", dir))
}

/// Links the unnamed file open as `fd` at its names: `names.dest` (an error if that
/// fails), then `names.second` if there is one; returns whether the second name is this
/// file (see [`Linked::second_name`]).
fn link_names(fd: std::os::fd::RawFd, names: &Names) -> Result<bool, PoolError> {
    link_tmpfile(fd, &names.dest)?;
    let Some(second) = &names.second else {
        return Ok(false);
    };
    match link_tmpfile(fd, second) {
        Ok(()) => Ok(true),
        Err(e) if e.os_error().map(io::Error::kind) == Some(io::ErrorKind::AlreadyExists) => {
            let ours = nix::sys::stat::fstat(fd).map(|st| (st.st_dev, st.st_ino));
            let there = nix::sys::stat::lstat(second).map(|st| (st.st_dev, st.st_ino));
            Ok(matches!((ours, there), (Ok(a), Ok(b)) if a == b))
        }
        Err(e) => {
            tracing::debug!(error = %e, "second name not made");
            Ok(false)
        }
    }
}

/// Links the unnamed file open as `fd` at `dest` (through `/proc/self/fd`, which needs no
/// privilege), creating `dest`'s directory if it is missing.
fn link_tmpfile(fd: std::os::fd::RawFd, dest: &Path) -> Result<(), PoolError> {
    let proc = format!("/proc/self/fd/{fd}");
    let proc = Path::new(&proc);
    let link = || {
        nix::unistd::linkat(
            None,
            proc,
            None,
            dest,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )
        .map_err(io::Error::from)
    };
    match link() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dest.parent() {
                match std::fs::create_dir(parent) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(io_err("mkdir", parent)(e))
                    }
                    _ => {}
                }
            }
            link().map_err(io_err("link", dest))
        }
        r => r.map_err(io_err("link", dest)),
    }
}

fn finish(counters: &Counters, res: &Result<Linked, PoolError>) {
    counters.queued.fetch_sub(1, Ordering::Relaxed);
    if let Ok(l) = res {
        counters.bytes_written.fetch_add(l.bytes, Ordering::Relaxed);
        counters.files_written.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn small(backend: BackendChoice) -> PoolConfig {
        PoolConfig {
            workers: 2,
            buffers: 4,
            buffer_size: 4096,
            queue_depth: 2,
            small_writes: 0,
            backend,
        }
    }

    /// `kernel.io_uring_disabled` when it is not 0 (then Auto may run on threads).
    fn io_uring_disabled() -> Option<String> {
        let value = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
        let value = value.trim().to_string();
        (value != "0").then_some(value)
    }

    /// One pool per backend: forced threads, and Auto, which must be io_uring here.
    fn pools_with(config: PoolConfig) -> Vec<Pool> {
        [BackendChoice::Threads, BackendChoice::Auto]
            .into_iter()
            .map(|backend| {
                let pool = Pool::start(&PoolConfig {
                    backend,
                    ..config.clone()
                })
                .unwrap();
                match backend {
                    BackendChoice::Threads => assert_eq!(pool.backend(), Backend::Threads),
                    BackendChoice::Auto => match io_uring_disabled() {
                        None => assert_eq!(
                            pool.backend(),
                            Backend::IoUring,
                            "{:?}",
                            pool.fallback_reason()
                        ),
                        Some(v) => eprintln!(
                            "SKIP io_uring half: kernel.io_uring_disabled = {v}, Auto runs {}",
                            pool.backend().as_str()
                        ),
                    },
                }
                pool
            })
            .collect()
    }

    fn pools() -> Vec<Pool> {
        pools_with(small(BackendChoice::Auto))
    }

    /// Bytes that differ from one position to the next, so a misplaced chunk shows.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn read_all(pool: &Pool, path: &Path) -> Vec<u8> {
        let mut got = Vec::new();
        pool.read_file(path).unwrap().read_to_end(&mut got).unwrap();
        got
    }

    #[test]
    fn auto_runs_io_uring_where_the_kernel_allows_it() {
        let pool = Pool::start(&small(BackendChoice::Auto)).unwrap();
        if let Some(v) = io_uring_disabled() {
            eprintln!(
                "SKIP: kernel.io_uring_disabled = {v}; Auto runs {} because {:?}",
                pool.backend().as_str(),
                pool.fallback_reason()
            );
            return;
        }
        assert_eq!(probe_io_uring().map_err(|e| e.to_string()), Ok(()));
        assert_eq!(pool.backend(), Backend::IoUring);
        assert!(pool.fallback_reason().is_none());
        assert_eq!(pool.stats().backend, "io_uring");
        let forced = Pool::start(&small(BackendChoice::Threads)).unwrap();
        assert_eq!(forced.backend(), Backend::Threads);
        assert!(forced.fallback_reason().is_none());
    }

    #[test]
    fn reads_a_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(100_000, 1);
        let f = dir.path().join("f");
        std::fs::write(&f, &data).unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        for p in pools() {
            assert_eq!(read_all(&p, &f), data, "{:?}", p.backend());
            assert!(read_all(&p, &empty).is_empty());
            assert_eq!(p.stats().bytes_read, 100_000);
        }
    }

    #[test]
    fn reads_a_large_file_that_is_not_a_multiple_of_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(5 * 1024 * 1024 + 12_345, 2);
        let f = dir.path().join("large");
        std::fs::write(&f, &data).unwrap();
        let exact = dir.path().join("exact");
        std::fs::write(&exact, &data[..4 * 65_536]).unwrap();
        let config = PoolConfig {
            workers: 1,
            buffers: 4,
            buffer_size: 65_536,
            ..small(BackendChoice::Auto)
        };
        for p in pools_with(config) {
            assert!(read_all(&p, &f) == data, "{:?}", p.backend());
            assert!(
                read_all(&p, &exact) == data[..4 * 65_536],
                "{:?}",
                p.backend()
            );
        }
    }

    #[test]
    fn reads_many_files_at_once_on_one_worker_with_few_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(PathBuf, Vec<u8>)> = (0..8)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                let data = pattern(200_000 + i * 777, i as u32 + 10);
                std::fs::write(&path, &data).unwrap();
                (path, data)
            })
            .collect();
        let config = PoolConfig {
            workers: 1,
            buffers: 2,
            ..small(BackendChoice::Auto)
        };
        for p in pools_with(config) {
            let mut readers: Vec<FileReader> = files
                .iter()
                .map(|(path, _)| p.read_file(path).unwrap())
                .collect();
            let mut got = vec![Vec::new(); files.len()];
            let mut open = files.len();
            // Round robin, a little of each at a time: every reader waits on the others.
            while open > 0 {
                open = 0;
                for (r, out) in readers.iter_mut().zip(&mut got) {
                    let mut buf = [0u8; 10_000];
                    let n = r.read(&mut buf).unwrap();
                    out.extend_from_slice(&buf[..n]);
                    open += usize::from(n > 0);
                }
            }
            for ((_, data), got) in files.iter().zip(&got) {
                assert!(got == data, "{:?}", p.backend());
            }
        }
    }

    #[test]
    fn reading_a_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        for p in pools() {
            let err = p.read_file(&missing).unwrap_err();
            assert!(
                matches!(&err, PoolError::Io(IoError { op: "open", path, .. }) if *path == missing),
                "{err:?}"
            );
            assert_eq!(
                err.os_error().map(|e| e.kind()),
                Some(io::ErrorKind::NotFound)
            );
            assert!(err.to_string().contains(&*missing.to_string_lossy()));
        }
    }

    #[test]
    fn linked_writes_appear_whole_once_and_leave_no_name() {
        for p in pools() {
            let dir = tempfile::tempdir().unwrap();
            let tmp = dir.path().join("tmp");
            std::fs::create_dir(&tmp).unwrap();
            // the destination's directory is made when missing
            let dest = dir.path().join("ab/object");
            let t = p
                .write_linked(
                    &tmp,
                    &dest,
                    None,
                    0o444,
                    vec![b"con".to_vec(), b"tent".to_vec()],
                )
                .unwrap();
            let linked = t.wait().unwrap();
            assert_eq!(
                linked,
                Linked {
                    bytes: 7,
                    second_name: false
                },
                "{:?}",
                p.backend()
            );
            assert_eq!(std::fs::read(&dest).unwrap(), b"content");
            let md = std::fs::metadata(&dest).unwrap();
            assert_eq!(md.permissions().mode() & 0o777, 0o444);
            assert_eq!(md.nlink(), 1);
            let err = p
                .write_linked(&tmp, &dest, None, 0o444, vec![b"other".to_vec()])
                .unwrap()
                .wait()
                .unwrap_err();
            assert_eq!(
                err.os_error().map(|e| e.kind()),
                Some(io::ErrorKind::AlreadyExists)
            );
            assert_eq!(std::fs::read(&dest).unwrap(), b"content", "never replaced");
            assert!(
                std::fs::read_dir(&tmp).unwrap().next().is_none(),
                "no names left"
            );
            // a second name: made when free, refused (not an error) when another file's
            let (dest2, second) = (dir.path().join("cd/object"), dir.path().join("short"));
            let linked = p
                .write_linked(&tmp, &dest2, Some(&second), 0o444, vec![b"two".to_vec()])
                .unwrap()
                .wait()
                .unwrap();
            assert!(linked.second_name, "{:?}", p.backend());
            let (a, b) = (
                std::fs::metadata(&dest2).unwrap(),
                std::fs::metadata(&second).unwrap(),
            );
            assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
            let dest3 = dir.path().join("ef/object");
            let linked = p
                .write_linked(&tmp, &dest3, Some(&second), 0o444, vec![b"three".to_vec()])
                .unwrap()
                .wait()
                .unwrap();
            assert!(!linked.second_name);
            assert_eq!(std::fs::read(&dest3).unwrap(), b"three");
            assert_eq!(std::fs::read(&second).unwrap(), b"two", "never replaced");
        }
    }

    /// With `small_writes`, the io_uring backend hands small writes to plain threads of
    /// its own and the rest to the ring: both give the same files.
    #[test]
    fn small_writes_go_to_threads_beside_the_ring() {
        let config = PoolConfig {
            small_writes: 8,
            ..small(BackendChoice::Auto)
        };
        for p in pools_with(config) {
            let threads = || -> Vec<String> {
                std::fs::read_dir("/proc/self/task")
                    .unwrap()
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|c| c.starts_with("ringio-small-"))
                    .collect()
            };
            if p.backend() == Backend::IoUring {
                assert!(!threads().is_empty(), "small-write threads started");
            }
            let dir = tempfile::tempdir().unwrap();
            let tmp = dir.path().join("tmp");
            std::fs::create_dir(&tmp).unwrap();
            let tickets: Vec<_> = (0..32u32)
                .map(|i| {
                    let data = pattern(if i % 2 == 0 { 8 } else { 9 + i as usize * 100 }, i);
                    let dest = dir.path().join(format!("{:02x}/object{i}", i % 4));
                    let t = p.write_linked(&tmp, &dest, None, 0o444, vec![data.clone()]);
                    (dest, data, t.unwrap())
                })
                .collect();
            for (dest, data, t) in tickets {
                assert_eq!(t.wait().unwrap().bytes, data.len() as u64);
                assert_eq!(std::fs::read(&dest).unwrap(), data, "{:?}", p.backend());
            }
            assert_eq!(p.stats().files_written, 32);
        }
    }

    #[test]
    fn writes_files_and_streams_exclusively() {
        for p in pools() {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            let t = p
                .write_file(&a, 0o600, vec![b"hello ".to_vec(), b"world".to_vec()])
                .unwrap();
            assert_eq!(t.wait().unwrap(), 11);
            assert_eq!(std::fs::read(&a).unwrap(), b"hello world");
            assert_eq!(
                std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let b = dir.path().join("b");
            let mut s = p.create_stream(&b, 0o644).unwrap();
            for i in 0..50u8 {
                s.write(vec![i; 1000]).unwrap();
            }
            assert_eq!(s.finish().unwrap(), 50_000);
            let got = std::fs::read(&b).unwrap();
            assert_eq!(got.len(), 50_000);
            assert!(got
                .chunks(1000)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&x| x as usize == i)));
            let empty = dir.path().join("empty");
            assert_eq!(
                p.write_file(&empty, 0o644, vec![]).unwrap().wait().unwrap(),
                0
            );
            assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
            let st = p.stats();
            assert_eq!(st.files_written, 3, "{:?}", p.backend());
            assert_eq!(st.bytes_written, 50_011);
            assert_eq!(st.queue_depth, 0);
        }
    }

    #[test]
    fn a_stream_of_many_chunks_equals_its_input() {
        for p in pools() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("stream");
            let data = pattern(3_000_000, 3);
            let mut s = p.create_stream(&path, 0o644).unwrap();
            let mut rest = &data[..];
            let mut n = 0usize;
            while !rest.is_empty() {
                // Sizes from 0 to 9,000 bytes, so writes start anywhere in a page.
                let len = ((n * 7919) % 9001).min(rest.len());
                s.write(rest[..len].to_vec()).unwrap();
                rest = &rest[len..];
                n += 1;
            }
            assert!(n > 500);
            assert_eq!(s.finish().unwrap(), data.len() as u64);
            assert!(std::fs::read(&path).unwrap() == data, "{:?}", p.backend());
        }
    }

    #[test]
    fn an_existing_file_is_already_exists_with_its_path() {
        for p in pools() {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            std::fs::write(&a, b"old").unwrap();
            let err = p
                .write_file(&a, 0o600, vec![b"new".to_vec()])
                .unwrap()
                .wait()
                .unwrap_err();
            assert_eq!(
                err.os_error().map(|e| e.kind()),
                Some(io::ErrorKind::AlreadyExists),
                "{:?}: {err:?}",
                p.backend()
            );
            assert_eq!(
                err.os_error().and_then(|e| e.raw_os_error()),
                Some(libc::EEXIST)
            );
            assert!(matches!(&err, PoolError::Io(IoError { path, .. }) if *path == a));
            // A stream on an existing name: its chunks may find it stopped, and `finish`
            // says why.
            let mut s = p.create_stream(&a, 0o600).unwrap();
            for _ in 0..10 {
                if s.write(vec![1; 100]).is_err() {
                    break;
                }
            }
            let err = s.finish().unwrap_err();
            assert_eq!(
                err.os_error().map(|e| e.kind()),
                Some(io::ErrorKind::AlreadyExists)
            );
            assert_eq!(std::fs::read(&a).unwrap(), b"old");
            // A missing directory: NotFound, with the path.
            let nowhere = dir.path().join("no/such/dir");
            let err = p
                .write_file(&nowhere, 0o600, vec![])
                .unwrap()
                .wait()
                .unwrap_err();
            assert_eq!(
                err.os_error().map(|e| e.kind()),
                Some(io::ErrorKind::NotFound)
            );
            assert!(err.to_string().contains("no/such/dir"));
            assert_eq!(p.stats().files_written, 0);
            assert_eq!(p.stats().queue_depth, 0);
        }
    }

    #[test]
    fn a_full_queue_makes_producers_wait_and_counts_it() {
        let config = PoolConfig {
            workers: 1,
            queue_depth: 1,
            ..small(BackendChoice::Auto)
        };
        for p in pools_with(config) {
            let dir = tempfile::tempdir().unwrap();
            let chunk = pattern(65_536, 4);
            let tickets: Vec<(PathBuf, Ticket)> = (0..200)
                .map(|i| {
                    let path = dir.path().join(format!("f{i}"));
                    let t = p.write_file(&path, 0o644, vec![chunk.clone()]).unwrap();
                    (path, t)
                })
                .collect();
            for (path, t) in tickets {
                assert_eq!(t.wait().unwrap(), 65_536);
                assert!(std::fs::read(&path).unwrap() == chunk);
            }
            let st = p.stats();
            assert!(st.backpressure_waits > 0, "{:?}: {st:?}", p.backend());
            assert_eq!(st.files_written, 200);
            assert_eq!(st.queue_depth, 0);
        }
    }

    #[test]
    fn dropping_the_pool_drains_queued_writes() {
        for p in pools() {
            let backend = p.backend();
            let dir = tempfile::tempdir().unwrap();
            let tickets: Vec<(PathBuf, Ticket)> = (0..50)
                .map(|i| {
                    let path = dir.path().join(format!("f{i}"));
                    let t = p
                        .write_file(&path, 0o644, vec![vec![i as u8; 10_000]])
                        .unwrap();
                    (path, t)
                })
                .collect();
            drop(p);
            for (i, (path, t)) in tickets.into_iter().enumerate() {
                assert_eq!(t.wait().unwrap(), 10_000, "{backend:?}");
                assert_eq!(std::fs::read(&path).unwrap(), vec![i as u8; 10_000]);
            }
        }
    }

    #[test]
    fn readers_and_streams_outlive_their_pool() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(1_000_000, 5);
        let f = dir.path().join("f");
        std::fs::write(&f, &data).unwrap();
        for (i, p) in pools().into_iter().enumerate() {
            let backend = p.backend();
            let out = dir.path().join(format!("out{i}"));
            let mut s = p.create_stream(&out, 0o644).unwrap();
            let mut r = p.read_file(&f).unwrap();
            // A reader given up half way, then dropped: its task must not hold anything.
            let mut abandoned = p.read_file(&f).unwrap();
            abandoned.read_exact(&mut [0u8; 5000]).unwrap();
            drop(p);
            drop(abandoned);
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            assert!(got == data, "{backend:?}");
            for c in got.chunks(100_000) {
                s.write(c.to_vec()).unwrap();
            }
            assert_eq!(s.finish().unwrap(), 1_000_000);
            drop(r);
            assert!(std::fs::read(&out).unwrap() == data);
        }
    }

    #[test]
    fn a_worker_that_cannot_register_its_buffers_falls_back_to_threads() {
        if io_uring_disabled().is_some() {
            eprintln!("SKIP: kernel.io_uring_disabled is set; the probe fails first");
            return;
        }
        // The kernel refuses a registered buffer over 1 GiB (before pinning anything);
        // the allocation is zeroed lazily, so it costs address space, not memory, unless
        // the kernel does not overcommit.
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory");
        if overcommit.is_ok_and(|v| v.trim() == "2") {
            eprintln!("SKIP: vm.overcommit_memory = 2; a 1 GiB buffer would be committed");
            return;
        }
        let config = PoolConfig {
            workers: 1,
            buffers: 1,
            buffer_size: (1 << 30) + 4096,
            ..small(BackendChoice::Auto)
        };
        let pool = Pool::start(&config).unwrap();
        assert_eq!(pool.backend(), Backend::Threads);
        assert!(
            matches!(
                pool.fallback_reason(),
                Some(UringUnavailable::Worker { worker: 0, .. })
            ),
            "{:?}",
            pool.fallback_reason()
        );
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        assert_eq!(
            pool.write_file(&a, 0o644, vec![vec![7; 10]])
                .unwrap()
                .wait()
                .unwrap(),
            10
        );
    }

    /// A tmpfs of 64 KiB mounted on a temp dir for the test's life (needs root).
    struct TinyFs(tempfile::TempDir);

    impl TinyFs {
        fn mount() -> Option<TinyFs> {
            let dir = tempfile::tempdir().unwrap();
            let mounted = nix::mount::mount(
                Some("tmpfs"),
                dir.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=64k"),
            );
            match mounted {
                Ok(()) => Some(TinyFs(dir)),
                Err(e) => {
                    eprintln!("SKIP: cannot mount a small tmpfs for ENOSPC ({e}); needs root");
                    None
                }
            }
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn a_full_filesystem_fails_the_write_with_enospc_and_its_path() {
        for p in pools() {
            let Some(fs) = TinyFs::mount() else {
                return;
            };
            let path = fs.0.path().join("big");
            let err = p
                .write_file(&path, 0o644, vec![vec![1; 256 * 1024]; 4])
                .unwrap()
                .wait()
                .unwrap_err();
            assert_eq!(
                err.os_error().and_then(|e| e.raw_os_error()),
                Some(libc::ENOSPC),
                "{:?}: {err:?}",
                p.backend()
            );
            assert!(
                matches!(&err, PoolError::Io(IoError { op: "write", path: at, .. }) if *at == path)
            );
            let stream = fs.0.path().join("stream");
            let mut s = p.create_stream(&stream, 0o644).unwrap();
            for _ in 0..64 {
                // After the failure the worker stops taking chunks.
                if s.write(vec![2; 64 * 1024]).is_err() {
                    break;
                }
            }
            let err = s.finish().unwrap_err();
            assert_eq!(
                err.os_error().and_then(|e| e.raw_os_error()),
                Some(libc::ENOSPC),
                "{:?}: {err:?}",
                p.backend()
            );
            assert_eq!(p.stats().files_written, 0);
            assert_eq!(p.stats().queue_depth, 0);
        }
    }

    /// Throughput of both backends, for the numbers in the module docs:
    /// `cargo test --release -p ringio bench_backends -- --ignored --nocapture`
    /// (`RINGIO_BENCH_DIR` picks the filesystem; the default is the temp dir).
    #[test]
    #[ignore = "a benchmark: minutes of I/O"]
    fn bench_backends() {
        use std::time::Instant;
        const MIB: usize = 1024 * 1024;
        let base = std::env::var_os("RINGIO_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::tempdir_in(base).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, pattern(256 * MIB, 6)).unwrap();
        let evict = |path: &Path| {
            let f = File::open(path).unwrap();
            f.sync_all().unwrap();
            nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mbps = |bytes: usize, t: Instant| bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
        let small_file = pattern(64 * 1024, 7);
        let chunk = pattern(256 * 1024, 8);
        let pools = pools_with(PoolConfig::default());
        // Per backend: cold read, warm read, 1000 files, streams (MB/s of each run).
        let mut results = vec![[vec![], vec![], vec![], vec![]]; pools.len()];
        // Runs interleave the backends, so a change in the machine's load hits both.
        for run in 0..3 {
            for (p, r) in pools.iter().zip(&mut results) {
                evict(&big);
                let t = Instant::now();
                let n = std::io::copy(&mut p.read_file(&big).unwrap(), &mut io::sink()).unwrap();
                r[0].push(mbps(n as usize, t));
                let t = Instant::now();
                let n = std::io::copy(&mut p.read_file(&big).unwrap(), &mut io::sink()).unwrap();
                r[1].push(mbps(n as usize, t));

                let out = dir.path().join(format!("{}-{run}", p.backend().as_str()));
                std::fs::create_dir(&out).unwrap();
                let t = Instant::now();
                let tickets: Vec<Ticket> = (0..1000)
                    .map(|i| {
                        p.write_file(&out.join(i.to_string()), 0o644, vec![small_file.clone()])
                            .unwrap()
                    })
                    .collect();
                for t in tickets {
                    t.wait().unwrap();
                }
                r[2].push(mbps(1000 * small_file.len(), t));

                // 4 streams of 64 MiB in 256 KiB chunks, one producer thread each.
                let t = Instant::now();
                std::thread::scope(|s| {
                    for i in 0..4 {
                        let (p, out, chunk) = (p, &out, &chunk);
                        s.spawn(move || {
                            let mut w = p.create_stream(&out.join(format!("s{i}")), 0o644).unwrap();
                            for _ in 0..256 {
                                w.write(chunk.clone()).unwrap();
                            }
                            w.finish().unwrap();
                        });
                    }
                });
                r[3].push(mbps(4 * 64 * MIB, t));
                std::fs::remove_dir_all(&out).unwrap();
            }
        }
        for (p, [cold, warm, files, streams]) in pools.iter().zip(results) {
            eprintln!(
                "BENCH {:8} read 256 MiB cold {:5.0} MB/s, warm {:5.0} MB/s; \
                 write 1000 x 64 KiB {:5.0} MB/s; 4 streams x 64 MiB in 256 KiB chunks {:5.0} MB/s",
                p.backend().as_str(),
                median(cold),
                median(warm),
                median(files),
                median(streams)
            );
        }
    }
}
