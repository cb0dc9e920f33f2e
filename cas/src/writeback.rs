//! Early writeback: the disk takes a layer's data while its files are still being hashed
//! or written, so that the `syncfs` that makes the layer durable has little left.
//!
//! Left alone, the kernel writes dirty pages back after 30 seconds or once a share of
//! memory is dirty: a layer's bytes would all wait for its final `syncfs`, and the disk
//! would idle while the CPU hashes and decompresses. A [`Writeback`] runs one `syncfs` of
//! the store's filesystem on a thread of its own whenever it is started and none is
//! running. Writeback is I/O and hashing is CPU, so the two overlap. The final `syncfs`
//! stays the caller's: it is what makes the layer durable, and it waits for the tail.
//!
//! The thread holds nothing of its caller's but an open directory. Dropping a
//! [`Writeback`] waits for the `syncfs` running, so that no thread of an apply or an
//! ingest that returned (or failed) still holds the store's filesystem open. Each
//! `syncfs` forces the filesystem's log as well: small layers should not start one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Runs `syncfs` on a thread of its own, one at a time (see the module docs).
#[derive(Debug)]
pub struct Writeback {
    dir: Arc<File>,
    running: Option<JoinHandle<()>>,
    /// Bytes reported through [`Writeback::wrote`] since the last `syncfs` started.
    dirty: u64,
    /// Bytes from which [`Writeback::wrote`] starts one.
    step: u64,
}

impl Writeback {
    /// A writeback of the filesystem holding `dir`, started by [`Writeback::wrote`] once
    /// `step` bytes are dirty; `None` if `dir` cannot be opened (writeback is an
    /// optimisation, the final `syncfs` reports errors).
    pub fn new(dir: &Path, step: u64) -> Option<Writeback> {
        let dir = File::open(dir).ok()?;
        Some(Writeback {
            dir: Arc::new(dir),
            running: None,
            dirty: 0,
            step,
        })
    }

    /// Starts a `syncfs` unless one is running; returns whether it did.
    pub fn start(&mut self) -> bool {
        if self.running.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let dir = self.dir.clone();
        self.running = std::thread::Builder::new()
            .name("layer-flush".into())
            .spawn(move || {
                let _ = nix::unistd::syncfs(dir.as_raw_fd());
            })
            .ok();
        self.dirty = 0;
        self.running.is_some()
    }

    /// Waits for the `syncfs` running, if any (the final one then has only the rest to
    /// write). Its error, if any, is the final one's to report.
    pub fn wait(&mut self) {
        if let Some(t) = self.running.take() {
            let _ = t.join();
        }
    }

    /// Counts `bytes` more written, and starts a `syncfs` once [`Writeback::new`]'s step
    /// is reached and none is running.
    pub fn wrote(&mut self, bytes: u64) {
        self.dirty += bytes;
        if self.dirty >= self.step {
            self.start();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writeback::new(dir.path(), 100).unwrap();
        w.wrote(60);
        assert!(w.running.is_none(), "below the step");
        w.wrote(60);
        assert!(w.running.is_some(), "the step reached");
        assert_eq!(w.dirty, 0);
        w.wait();
        assert!(w.running.is_none());
        assert!(w.start(), "a finished one does not hold the next");
        w.wait();
    }

    #[test]
    fn a_missing_directory_gives_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Writeback::new(&dir.path().join("missing"), 1).is_none());
    }
}
