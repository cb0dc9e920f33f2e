//! The stub threads: regular files' stubs and empty files are made on the other cores
//! while the unpack thread goes on parsing and hashing (see [`StubThreads`] for the
//! order they keep with the entries made on the unpack thread).

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::{UnpackError, Unpacker};
use crate::error::CasError;
use crate::objects::Redirect;
use crate::stub::{create_empty, write_stub, FileMeta};
use crate::sys::Syscalls;

/// Stubs and empty files handed to the stub threads and not yet reported back.
pub(super) const STUBS_IN_FLIGHT: usize = 256;

impl Unpacker<'_> {
    /// Makes a stub (or an empty file): on a stub thread, or here when its name has
    /// a directory or a stub in the making, which the stub threads must not race.
    pub(super) fn make_stub(&mut self, job: StubJob) -> Result<(), UnpackError> {
        if self.image.is_some() {
            return self.image_file(&job.rel, &job.meta, &job.xattrs, job.content);
        }
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
        let sys = self.t.store.sys();
        let ino = self.replacing(&job.rel, |abs| job.create(sys, abs))?;
        self.stub_made(job, ino);
        Ok(())
    }

    /// Records a stub made: for hardlinks to it, and for alias corrections.
    fn stub_made(&mut self, job: StubJob, ino: u64) {
        if let Some(redirect) = job.content {
            let digest = redirect.digest();
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
    pub(super) fn stub_wait(&mut self) -> Result<(), UnpackError> {
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
    pub(super) fn settle_stubs(&mut self) -> Result<(), UnpackError> {
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
    pub(super) fn settle_stub(&mut self, rel: &Path) -> Result<(), UnpackError> {
        if self.stubs.in_flight.contains(rel) {
            self.settle_stubs()?;
        }
        Ok(())
    }
}

/// A stub, or an empty file, for a stub thread to make.
pub(super) struct StubJob {
    /// Its name in the layer.
    pub(super) rel: PathBuf,
    pub(super) meta: FileMeta,
    pub(super) xattrs: Vec<(OsString, Vec<u8>)>,
    /// Where a stub's bytes are; `None` for an empty file.
    pub(super) content: Option<Redirect>,
}

impl StubJob {
    /// Creates it at `abs` (which must not exist); returns its inode number.
    pub(super) fn create(&self, sys: &dyn Syscalls, abs: &Path) -> Result<u64, CasError> {
        match &self.content {
            Some(redirect) => write_stub(sys, abs, &self.meta, &self.xattrs, redirect),
            None => create_empty(sys, abs, &self.meta, &self.xattrs),
        }
    }
}

/// A stub thread's report.
pub(super) struct StubDone {
    pub(super) job: StubJob,
    pub(super) result: Result<u64, CasError>,
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
pub(super) struct StubThreads {
    /// Where jobs go; `None` once the layer is complete (the threads then end).
    pub(super) jobs: Option<mpsc::SyncSender<StubJob>>,
    pub(super) done: mpsc::Receiver<StubDone>,
    /// Names handed out and not reported back.
    pub(super) in_flight: HashSet<PathBuf>,
}

impl StubThreads {
    /// No stub threads: every stub is made on the unpack thread.
    #[cfg(test)]
    pub(super) fn none() -> StubThreads {
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
pub(super) fn stub_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, 4)
}

/// A stub thread: makes stubs until the job channel closes.
pub(super) fn stub_worker(
    sys: &dyn Syscalls,
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
        let result = job.create(sys, &fs_dir.join(&job.rel));
        if done.send(StubDone { job, result }).is_err() {
            return;
        }
    }
}
