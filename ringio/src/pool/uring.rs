//! The io_uring backend of the pool: worker threads with one tokio-uring runtime each.
//!
//! See the parent module for the threading model and buffer ownership. This file holds
//! the probe ([`probe`]), the worker thread ([`start_worker`]) and the three operations
//! a worker runs as tasks: a read ahead of its consumer, a write of in-memory chunks and
//! a write of a stream of chunks.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle as TaskHandle;
use tokio_uring::buf::fixed::{FixedBuf, FixedBufPool};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::fs::{File, OpenOptions};

use super::{
    finish, io_err, Command, Counters, Linked, Names, PoolError, ReadCommand, UringUnavailable,
};

/// Where the kernel says whether io_uring may be used: 0 allowed, 1 only for privileged
/// processes (or members of `kernel.io_uring_group`), 2 disabled for everyone.
const DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Submission queue entries of a worker's ring. A worker's operations in flight are
/// bounded by its write permits and its buffers times a small depth, well under this;
/// when they are not, tokio-uring submits and retries, so this is a batch size, not a limit.
const RING_ENTRIES: u32 = 256;

/// Bytes the probe reads through a registered buffer.
const PROBE_BYTES: usize = 64;

/// Probes io_uring once per process and returns the cached answer.
pub(super) fn probe() -> Result<(), UringUnavailable> {
    static PROBE: OnceLock<Result<(), UringUnavailable>> = OnceLock::new();
    PROBE.get_or_init(run_probe).clone()
}

fn run_probe() -> Result<(), UringUnavailable> {
    // A missing or unreadable sysctl (kernels before 6.6) says nothing: the ring decides.
    if let Ok(text) = std::fs::read_to_string(DISABLED_SYSCTL) {
        if let Ok(value) = text.trim().parse::<u32>() {
            if value >= 2 {
                return Err(UringUnavailable::Disabled(value));
            }
        }
    }
    // A thread of its own: tokio-uring's `block_on` panics inside another runtime, and
    // `Pool::start` may be called from async code.
    let probe = std::thread::Builder::new()
        .name("ringio-probe".into())
        .spawn(probe_ring)
        .map_err(|e| UringUnavailable::Setup(Arc::new(e)))?;
    probe
        .join()
        .unwrap_or(Err(UringUnavailable::Panicked("probe")))
}

/// Starts a ring and completes a no-op, an open, a fixed-buffer read and a close on it.
fn probe_ring() -> Result<(), UringUnavailable> {
    let failed = |op: &'static str| {
        move |e: io::Error| UringUnavailable::Probe {
            op,
            source: Arc::new(e),
        }
    };
    let mut builder = tokio_uring::builder();
    builder.entries(8);
    let rt =
        tokio_uring::Runtime::new(&builder).map_err(|e| UringUnavailable::Setup(Arc::new(e)))?;
    rt.block_on(async {
        tokio_uring::no_op().await.map_err(failed("no-op"))?;
        let bufs = FixedBufPool::new([vec![1u8; PROBE_BYTES]]);
        bufs.register().map_err(failed("register buffers"))?;
        let file = File::open("/dev/zero").await.map_err(failed("open"))?;
        let buf = bufs
            .try_next(PROBE_BYTES)
            .ok_or_else(|| failed("register buffers")(io::Error::other("no buffer")))?;
        let (res, buf) = file.read_fixed_at(buf, 0).await;
        let n = res.map_err(failed("read_fixed"))?;
        if n != PROBE_BYTES || buf.iter().any(|&b| b != 0) {
            return Err(failed("read_fixed")(io::Error::other(
                "read of /dev/zero returned other bytes",
            )));
        }
        drop(buf);
        file.close().await.map_err(failed("close"))?;
        Ok(())
    })
}

/// What a worker needs to know of the pool's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct WorkerConfig {
    /// Registered buffers of the worker.
    pub buffers: usize,
    /// Bytes of each buffer.
    pub buffer_size: usize,
    /// Write commands that run at once on the worker.
    pub queue_depth: usize,
}

impl WorkerConfig {
    /// Reads or writes one file keeps in flight: half the worker's buffers, so a second
    /// file read on the same worker always finds buffers too.
    fn depth(&self) -> usize {
        (self.buffers / 2).max(1)
    }
}

/// Spawns worker `n`. It reports on `ready` whether its ring and buffers are set up,
/// then serves `commands` (writes) and `reads` until both channels are closed and every
/// task it started has finished.
pub(super) fn start_worker(
    n: usize,
    config: WorkerConfig,
    commands: async_channel::Receiver<Command>,
    reads: async_channel::Receiver<ReadCommand>,
    counters: Arc<Counters>,
    ready: mpsc::Sender<(usize, io::Result<()>)>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("ringio-uring-{n}"))
        .spawn(move || {
            let mut builder = tokio_uring::builder();
            builder.entries(RING_ENTRIES);
            let rt = match tokio_uring::Runtime::new(&builder) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send((n, Err(e)));
                    return;
                }
            };
            rt.block_on(async move {
                // Fully initialised buffers: copies into them and reads out of them are
                // plain slice operations, and each read's length is tracked by the task.
                let bufs = FixedBufPool::new(
                    std::iter::repeat_with(|| vec![0u8; config.buffer_size]).take(config.buffers),
                );
                if let Err(e) = bufs.register() {
                    let _ = ready.send((n, Err(e)));
                    return;
                }
                if ready.send((n, Ok(()))).is_err() {
                    return;
                }
                drop(ready);
                let worker = Rc::new(Worker {
                    bufs,
                    config,
                    counters,
                });
                serve(worker, commands, reads).await;
            });
        })
}

/// The state a worker's tasks share (all on the worker's thread).
struct Worker {
    bufs: FixedBufPool<Vec<u8>>,
    config: WorkerConfig,
    counters: Arc<Counters>,
}

/// Counts a worker's running tasks, so it can wait for all of them at shutdown.
#[derive(Clone, Default)]
struct Tasks(Rc<TaskCount>);

#[derive(Default)]
struct TaskCount {
    running: Cell<usize>,
    idle: Notify,
}

/// Held by a running task; dropping it (also when the task panics) counts the task out.
struct TaskGuard(Rc<TaskCount>);

impl Tasks {
    fn enter(&self) -> TaskGuard {
        self.0.running.set(self.0.running.get() + 1);
        TaskGuard(self.0.clone())
    }

    async fn idle(&self) {
        while self.0.running.get() > 0 {
            self.0.idle.notified().await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let left = self.0.running.get() - 1;
        self.0.running.set(left);
        if left == 0 {
            self.0.idle.notify_one();
        }
    }
}

/// The worker's main task: reads and writes arrive on separate channels so a read never
/// waits for a write permit (a producer may hold a stream open while it reads a blob).
async fn serve(
    worker: Rc<Worker>,
    commands: async_channel::Receiver<Command>,
    reads: async_channel::Receiver<ReadCommand>,
) {
    let tasks = Tasks::default();
    let read_loop = {
        let worker = worker.clone();
        let tasks = tasks.clone();
        tokio_uring::spawn(async move {
            while let Ok(cmd) = reads.recv().await {
                let guard = tasks.enter();
                let worker = worker.clone();
                tokio_uring::spawn(async move {
                    worker.read(cmd).await;
                    drop(guard);
                });
            }
        })
    };
    // At most `queue_depth` writes run at once; the next command stays in the channel
    // (where producers see the backpressure) until one of them finishes.
    let permits = Arc::new(Semaphore::new(worker.config.queue_depth));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let Ok(cmd) = commands.recv().await else {
            break;
        };
        let guard = tasks.enter();
        let worker = worker.clone();
        tokio_uring::spawn(async move {
            worker.run(cmd).await;
            drop(permit);
            drop(guard);
        });
    }
    let _ = read_loop.await;
    tasks.idle().await;
}

/// Where the chunks of a write come from.
enum Source {
    /// All in memory ([`Command::Write`]).
    Chunks(std::vec::IntoIter<Vec<u8>>),
    /// From a [`super::StreamWriter`], until it finishes.
    Stream(async_channel::Receiver<Vec<u8>>),
}

impl Source {
    async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Source::Chunks(chunks) => chunks.next(),
            Source::Stream(rx) => rx.recv().await.ok(),
        }
    }
}

/// The result of a spawned operation task; a panic in it becomes an error.
async fn joined<T>(task: TaskHandle<io::Result<T>>) -> io::Result<T> {
    task.await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

impl Worker {
    async fn run(&self, cmd: Command) {
        let (res, done) = match cmd {
            Command::Write {
                path,
                names,
                mode,
                chunks,
                done,
            } => (
                self.write(
                    &path,
                    names.as_ref(),
                    mode,
                    Source::Chunks(chunks.into_iter()),
                )
                .await,
                done,
            ),
            Command::Stream {
                path,
                mode,
                data,
                done,
            } => (
                self.write(&path, None, mode, Source::Stream(data)).await,
                done,
            ),
        };
        finish(&self.counters, &res);
        let _ = done.try_send(res);
    }

    /// Creates `path` exclusively through the ring and writes the chunks of `source` at
    /// their offsets, `depth` writes in flight, each owning its chunk until it completes.
    async fn write(
        &self,
        path: &Path,
        names: Option<&Names>,
        mode: u32,
        mut source: Source,
    ) -> Result<Linked, PoolError> {
        let mut opts = OpenOptions::new();
        match names {
            // an unnamed file in the directory `path`, linked once written
            Some(_) => opts.write(true).custom_flags(libc::O_TMPFILE),
            None => opts.write(true).create_new(true),
        };
        let file = opts
            .mode(mode)
            .open(path)
            .await
            .map_err(io_err("create", path))?;
        let file = Rc::new(file);
        let depth = self.config.depth();
        let mut in_flight: VecDeque<TaskHandle<io::Result<()>>> = VecDeque::new();
        let mut failed: Option<io::Error> = None;
        let mut off = 0u64;
        'chunks: while let Some(chunk) = source.next().await {
            // Collect the writes that completed, and wait while `depth` are out.
            while in_flight.len() >= depth || in_flight.front().is_some_and(|t| t.is_finished()) {
                let Some(task) = in_flight.pop_front() else {
                    break;
                };
                if let Err(e) = joined(task).await {
                    failed = Some(e);
                    break 'chunks;
                }
            }
            if chunk.is_empty() {
                continue;
            }
            let len = chunk.len() as u64;
            let file = file.clone();
            in_flight.push_back(tokio_uring::spawn(async move {
                let (res, _chunk) = file.write_all_at(chunk, off).await;
                res
            }));
            off += len;
        }
        // A failed write ends the stream: the producer's next chunk sees the pool stopped
        // and its `finish` returns this error.
        drop(source);
        for task in in_flight {
            if let Err(e) = joined(task).await {
                failed.get_or_insert(e);
            }
        }
        let mut second_name = false;
        if failed.is_none() {
            if let Some(names) = names {
                // metadata calls like open and close; done before the close gives the fd up
                second_name = super::link_names(file.as_raw_fd(), names)?;
            }
        }
        let closed = match Rc::try_unwrap(file) {
            Ok(file) => file.close().await,
            Err(_) => Ok(()),
        };
        if let Some(e) = failed {
            return Err(io_err("write", path)(e));
        }
        closed.map_err(io_err("close", path))?;
        Ok(Linked {
            bytes: off,
            second_name,
        })
    }

    /// Reads `cmd.file` from start to end into registered buffers, `depth` reads ahead,
    /// and hands copies of the buffers to the consumer in order.
    async fn read(&self, cmd: ReadCommand) {
        let ReadCommand {
            file,
            path,
            size_hint,
            chunks: tx,
        } = cmd;
        let size = self.config.buffer_size;
        let depth = self.config.depth();
        let file = Rc::new(File::from_std(file));
        let mut in_flight: VecDeque<TaskHandle<io::Result<Vec<u8>>>> = VecDeque::new();
        let mut next_off = 0u64;
        let mut end = false;
        let mut mark_end = true;
        loop {
            // Up to the size seen at open, reads go out `depth` at a time; past it (a file
            // that grew) one at a time until one comes back short.
            while !end && in_flight.len() < depth && (next_off < size_hint || in_flight.is_empty())
            {
                // Wait for a buffer only when this read holds none: buffers are held only
                // by operations in flight, which complete whatever their parent does.
                let buf = if in_flight.is_empty() {
                    self.bufs.next(size).await
                } else {
                    match self.bufs.try_next(size) {
                        Some(buf) => buf,
                        None => break,
                    }
                };
                in_flight.push_back(tokio_uring::spawn(read_range(file.clone(), buf, next_off)));
                next_off += size as u64;
            }
            let Some(task) = in_flight.pop_front() else {
                break;
            };
            let chunk = match joined(task).await {
                Ok(chunk) => chunk,
                Err(e) => {
                    let e = io::Error::new(e.kind(), io_err("read", &path)(e));
                    let _ = tx.send(Err(e)).await;
                    mark_end = false;
                    break;
                }
            };
            if end {
                // Past a short read: the file changed while it was read; its end stands.
                continue;
            }
            end = chunk.len() < size;
            if chunk.is_empty() {
                continue;
            }
            self.counters
                .bytes_read
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if tx.send(Ok(chunk)).await.is_err() {
                // The reader was dropped.
                mark_end = false;
                break;
            }
        }
        // Reads still out complete on their own; waiting for them keeps the file open
        // no longer than this task and lets the worker's shutdown see everything done.
        for task in in_flight {
            let _ = task.await;
        }
        if mark_end {
            // An empty chunk marks the end, so a reader tells it from a stopped pool.
            let _ = tx.send(Ok(Vec::new())).await;
        }
        if let Ok(file) = Rc::try_unwrap(file) {
            let _ = file.close().await;
        }
    }
}

/// Reads `[off, off + buf.len())` into `buf` (repeating short reads until end of file)
/// and returns a copy of the bytes read; `buf` goes back to the pool when this returns.
async fn read_range(file: Rc<File>, buf: FixedBuf, off: u64) -> io::Result<Vec<u8>> {
    let cap = buf.len();
    let mut buf = buf;
    let mut filled = 0usize;
    while filled < cap {
        let (res, slice) = file
            .read_fixed_at(buf.slice(filled..), off + filled as u64)
            .await;
        buf = slice.into_inner();
        match res {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf[..filled].to_vec())
}
