//! The I/O pool: worker threads that read blobs and write new files for the store.
//!
//! ## Threading model
//! [`Pool::start`] spawns `workers` threads. With the **io_uring** backend each thread
//! runs its own current-thread tokio-uring runtime with its own ring and its own pool of
//! registered fixed buffers (`buffers` × `buffer_size` bytes); with the **threads**
//! backend (io_uring unavailable: old kernel, seccomp, `io_uring_disabled`, or forced by
//! configuration) the same threads do plain `pread`/`pwrite`. The API and its results are
//! the same for both; [`Pool::backend`] says which one runs.
//!
//! Work reaches a worker through a bounded channel of [`PoolConfig::queue_depth`]
//! commands: a producer faster than the disks waits (counted in
//! [`PoolStats::backpressure_waits`]) instead of queueing without limit, so memory stays
//! bounded by `workers × queue_depth` pending writes plus the buffers in flight.
//!
//! ## Operations
//! * [`Pool::read_file`]: a whole file read sequentially, a few buffers ahead of the
//!   consumer, handed out as a blocking [`std::io::Read`] ([`FileReader`]);
//! * [`Pool::write_file`]: a new file (`O_CREAT | O_EXCL`) written from memory, completed
//!   through a [`Ticket`];
//! * [`Pool::create_stream`]: a new file written from a sequence of chunks that are not
//!   all in memory at once ([`StreamWriter`]), for files too large to buffer.
//!
//! Nothing here fsyncs: the store makes a layer durable with one `syncfs` after all its
//! writes completed (see the `cas` crate).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

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
    /// Which backend.
    pub backend: BackendChoice,
}

/// Default buffer size: large enough that a read is one request per 256 KiB of blob.
pub const DEFAULT_BUFFER_SIZE: usize = 256 * 1024;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: 2,
            buffers: 16,
            buffer_size: DEFAULT_BUFFER_SIZE,
            queue_depth: 64,
            backend: BackendChoice::Auto,
        }
    }
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A system call on `path` failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation (`open`, `read`, `write`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
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

impl PoolError {
    /// The OS error behind this one, if any (ENOSPC, EEXIST, ...).
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            PoolError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
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
    /// Commands queued or running now.
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

/// A command for a worker.
enum Command {
    /// Create `path` exclusively with `mode` and write `chunks` into it in order.
    Write {
        path: PathBuf,
        mode: u32,
        chunks: Vec<Vec<u8>>,
        done: mpsc::SyncSender<Result<u64, PoolError>>,
    },
    /// Open a stream: create `path`; chunks follow on `data`.
    Stream {
        path: PathBuf,
        mode: u32,
        data: mpsc::Receiver<Vec<u8>>,
        done: mpsc::SyncSender<Result<u64, PoolError>>,
    },
}

struct Inner {
    config: PoolConfig,
    backend: Backend,
    senders: Vec<mpsc::SyncSender<Command>>,
    next: AtomicUsize,
    counters: Arc<Counters>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.senders.clear();
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
        let backend = Backend::Threads;
        let counters = Arc::new(Counters::default());
        let mut senders = Vec::with_capacity(config.workers);
        let mut threads = Vec::with_capacity(config.workers);
        for n in 0..config.workers {
            let (tx, rx) = mpsc::sync_channel(config.queue_depth);
            let c = counters.clone();
            let t = std::thread::Builder::new()
                .name(format!("ringio-{n}"))
                .spawn(move || threads_worker(rx, c))
                .map_err(PoolError::Spawn)?;
            senders.push(tx);
            threads.push(t);
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                config: config.clone(),
                backend,
                senders,
                next: AtomicUsize::new(0),
                counters,
                threads: std::sync::Mutex::new(threads),
            }),
        })
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

    fn send(&self, cmd: Command) -> Result<(), PoolError> {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.senders.len();
        let tx = &self.inner.senders[n];
        self.inner.counters.queued.fetch_add(1, Ordering::Relaxed);
        let cmd = match tx.try_send(cmd) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(cmd)) => cmd,
            Err(mpsc::TrySendError::Disconnected(_)) => {
                self.inner.counters.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(PoolError::Stopped);
            }
        };
        self.inner
            .counters
            .backpressure_waits
            .fetch_add(1, Ordering::Relaxed);
        tx.send(cmd).map_err(|_| {
            self.inner.counters.queued.fetch_sub(1, Ordering::Relaxed);
            PoolError::Stopped
        })
    }

    /// Reads the file at `path` from start to end, `buffers` reads ahead of the consumer.
    pub fn read_file(&self, path: &Path) -> Result<FileReader, PoolError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(self.inner.config.buffers);
        let size = self.inner.config.buffer_size;
        let counters = self.inner.counters.clone();
        std::thread::Builder::new()
            .name("ringio-read".into())
            .spawn(move || {
                let mut off = 0u64;
                loop {
                    let mut buf = vec![0u8; size];
                    match file.read_at(&mut buf, off) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            off += n as u64;
                            counters.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                            if tx.send(Ok(buf)).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    }
                }
            })
            .map_err(PoolError::Spawn)?;
        Ok(FileReader {
            rx,
            current: Vec::new(),
            pos: 0,
            done: false,
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
            mode,
            chunks,
            done,
        })?;
        Ok(Ticket { rx })
    }

    /// Creates `path` (which must not exist) with `mode`, to be written chunk by chunk
    /// through the returned [`StreamWriter`].
    pub fn create_stream(&self, path: &Path, mode: u32) -> Result<StreamWriter, PoolError> {
        let (data_tx, data) = mpsc::sync_channel(self.inner.config.buffers);
        let (done, rx) = mpsc::sync_channel(1);
        self.send(Command::Stream {
            path: path.to_path_buf(),
            mode,
            data,
            done,
        })?;
        Ok(StreamWriter {
            tx: Some(data_tx),
            ticket: Ticket { rx },
        })
    }
}

/// The completion of a write: [`Ticket::wait`] returns the bytes written or the error.
#[derive(Debug)]
pub struct Ticket {
    rx: mpsc::Receiver<Result<u64, PoolError>>,
}

impl Ticket {
    /// Blocks until the write completed.
    pub fn wait(self) -> Result<u64, PoolError> {
        self.rx.recv().unwrap_or(Err(PoolError::Stopped))
    }
}

/// A file being written chunk by chunk (see [`Pool::create_stream`]).
#[derive(Debug)]
pub struct StreamWriter {
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    ticket: Ticket,
}

impl StreamWriter {
    /// Queues the next chunk; blocks while the worker is `buffers` chunks behind.
    pub fn write(&mut self, chunk: Vec<u8>) -> Result<(), PoolError> {
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| PoolError::Stopped),
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
#[derive(Debug)]
pub struct FileReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
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

/// The threads backend: one command at a time, plain `pwrite`.
fn threads_worker(rx: mpsc::Receiver<Command>, counters: Arc<Counters>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Write {
                path,
                mode,
                chunks,
                done,
            } => {
                let res = (|| {
                    let file = create_new(&path, mode)?;
                    let mut off = 0u64;
                    for c in &chunks {
                        write_all_at(&file, &path, c, off)?;
                        off += c.len() as u64;
                    }
                    Ok(off)
                })();
                finish(&counters, &res);
                let _ = done.send(res);
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
                    while let Ok(c) = data.recv() {
                        write_all_at(&file, &path, &c, off)?;
                        off += c.len() as u64;
                    }
                    Ok(off)
                })();
                finish(&counters, &res);
                let _ = done.send(res);
            }
        }
    }
}

fn finish(counters: &Counters, res: &Result<u64, PoolError>) {
    counters.queued.fetch_sub(1, Ordering::Relaxed);
    if let Ok(n) = res {
        counters.bytes_written.fetch_add(*n, Ordering::Relaxed);
        counters.files_written.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pool() -> Pool {
        Pool::start(&PoolConfig {
            workers: 2,
            buffers: 2,
            buffer_size: 4096,
            queue_depth: 2,
            backend: BackendChoice::Threads,
        })
        .unwrap()
    }

    #[test]
    fn reads_a_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let mut got = Vec::new();
        pool()
            .read_file(&dir.path().join("f"))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn writes_files_and_streams_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool();
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
        // exclusive: a second create of the same name fails with EEXIST
        let err = p.write_file(&a, 0o600, vec![]).unwrap().wait().unwrap_err();
        assert_eq!(
            err.os_error().map(|e| e.kind()),
            Some(io::ErrorKind::AlreadyExists)
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
        let st = p.stats();
        assert_eq!(st.files_written, 2);
        assert_eq!(st.bytes_written, 50_011);
        assert_eq!(st.queue_depth, 0);
    }
}
