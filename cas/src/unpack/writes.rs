//! Object writes and redirects: a regular file's content becomes an object unless the
//! store holds it, and its stub gets a [`Redirect`] decided before the object exists.
//!
//! A file up to [`MEM_FILE_LIMIT`] is hashed in memory and, when new, queued on the I/O
//! pool, which links it as the object (and at its alias, when one is planned); a larger
//! one is streamed to a temporary file while it is hashed. At most [`FLUSH_BYTES`] and
//! [`FLUSH_FILES`] are in flight. [`Redirects`] remembers the redirects of objects on
//! their way and of objects recently seen, so a repeated file costs no lookup.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ringio::pool::{Linked, StreamWriter, Ticket};
use sha2::{Digest as _, Sha256};

use super::decode::read_chunk;
use super::hardlinks::RECENT_FILES;
use super::stubs::StubJob;
use super::tree::EntryMeta;
use super::{ChunkReader, UnpackError, Unpacker, FLUSH_BYTES, MEM_FILE_LIMIT};
use crate::digest::Digest;
use crate::error::CasError;
use crate::objects::{Publish, Redirect, OBJECT_MODE};
use crate::stub::XATTR_REDIRECT;
use crate::sys::At;

/// Files in flight before the unpack waits for the oldest half.
const FLUSH_FILES: usize = 1024;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A new object being written (unnamed, then linked as the object) by the pool.
pub(super) struct PendingObject {
    pub(super) digest: Digest,
    size: u64,
    pub(super) ticket: Ticket<Linked>,
    /// The redirect its stubs got.
    redirect: Redirect,
}

/// The redirects this apply already knows: of objects the pool is writing, and of
/// objects recently seen in place (bounded; a miss only costs the store's lookup).
#[derive(Default)]
pub(super) struct Redirects {
    in_flight: HashMap<Digest, Redirect>,
    recent: HashMap<Digest, Redirect>,
}

impl Redirects {
    /// The redirect of `digest`'s object, when it is on its way or was seen in place.
    pub(super) fn get(&self, digest: &Digest) -> Option<Redirect> {
        self.in_flight
            .get(digest)
            .or_else(|| self.recent.get(digest))
            .copied()
    }

    /// An object the pool is writing.
    fn writing(&mut self, r: Redirect) {
        self.in_flight.insert(r.digest(), r);
    }

    /// The pool is done with `digest`'s object (written, or failed).
    fn written(&mut self, digest: &Digest) {
        self.in_flight.remove(digest);
    }

    /// An object in place.
    fn remember(&mut self, r: Redirect) {
        if self.recent.len() >= RECENT_FILES {
            self.recent.clear();
        }
        self.recent.insert(r.digest(), r);
    }

    /// Nothing is on its way any more (an abandoned apply).
    pub(super) fn clear_in_flight(&mut self) {
        self.in_flight.clear();
    }
}

fn tmp_name(dir: &Path) -> PathBuf {
    dir.join(format!(
        "apply.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Unpacker<'_> {
    /// A regular file: hash it, make sure its content is (or will be) an object, and
    /// write its stub.
    pub(super) fn regular(
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
        let redirect = if size <= MEM_FILE_LIMIT {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(UnpackError::Tar)?;
            if data.len() as u64 != size {
                return Err(UnpackError::Tar(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: entry shorter than its header says", rel.display()),
                )));
            }
            let digest = Digest::of(&data);
            match self.redirect_of(&digest)? {
                Some(r) => r,
                None => self.write_object(digest, data)?,
            }
        } else {
            self.stream_object(entry, size)?
        };
        let digest = redirect.digest();
        self.stats.files += 1;
        self.stats.logical_bytes += size;
        self.push_manifest(&rel, digest, size)?;
        // The stub goes in now: its redirect is a name, whether or not the object is
        // linked yet (nothing mounts the layer before its manifest exists).
        self.make_stub(StubJob {
            rel,
            meta: em.meta,
            xattrs: em.xattrs,
            content: Some(redirect),
        })?;
        if self.pending_bytes >= FLUSH_BYTES || self.objects.len() >= FLUSH_FILES {
            // The oldest half: the workers keep writing the rest meanwhile.
            self.drain(FLUSH_FILES / 2, FLUSH_BYTES / 2)?;
        }
        Ok(())
    }

    /// The redirect for content that is stored or on its way, `None` for new content.
    fn redirect_of(&mut self, digest: &Digest) -> Result<Option<Redirect>, CasError> {
        if let Some(r) = self.redirects.get(digest) {
            return Ok(Some(r));
        }
        let r = self.t.store.stored(digest)?;
        if let Some(r) = r {
            self.redirects.remember(r);
        }
        Ok(r)
    }

    /// Queues new content (in memory) for the pool, which links it as the object and,
    /// when one is planned, at its alias. Returns the redirect its stubs get.
    pub(super) fn write_object(
        &mut self,
        digest: Digest,
        data: Vec<u8>,
    ) -> Result<Redirect, UnpackError> {
        let size = data.len() as u64;
        let (redirect, alias) = if self.image.is_some() {
            // an image names every object in full: no alias to link
            (Redirect::Full(digest), None)
        } else {
            self.t.store.plan(&digest)
        };
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
        self.redirects.writing(redirect);
        if alias.is_some() {
            self.alias_stubs.insert(digest, Vec::new());
        }
        self.pending_bytes += size;
        self.wrote(size);
        self.objects.push_back(PendingObject {
            digest,
            size,
            ticket,
            redirect,
        });
        Ok(redirect)
    }

    /// Streams a large entry to a temporary file while hashing it, and publishes it as
    /// its object (or drops it if the content is stored already). Returns the redirect
    /// its stubs get.
    fn stream_object(
        &mut self,
        entry: &mut tar::Entry<'_, ChunkReader<'_>>,
        size: u64,
    ) -> Result<Redirect, UnpackError> {
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
        if let Some(r) = self.redirects.get(&digest) {
            self.stats.discarded_bytes += size;
            fs::remove_file(&tmp).map_err(CasError::io("remove", &tmp))?;
            return Ok(r);
        }
        let published = self.t.store.publish_written(&tmp, &digest);
        let _ = fs::remove_file(&tmp);
        match published? {
            Publish::New => {
                self.stats.new_objects += 1;
                self.stats.new_bytes += size;
                self.new_objects.push(digest);
                self.wrote(size);
            }
            Publish::Existing => self.stats.discarded_bytes += size,
        }
        let redirect = self.t.store.redirect(&digest)?;
        self.redirects.remember(redirect);
        Ok(redirect)
    }

    /// Counts bytes of new objects handed to the pool or written, for the early
    /// writeback: the pool's workers write soon after, so a `syncfs` started then finds
    /// most of them in the page cache (and the next one the rest).
    fn wrote(&mut self, bytes: u64) {
        if let Some(w) = self.writeback.as_mut() {
            w.wrote(bytes);
        }
    }

    /// Waits for every write in flight.
    pub(super) fn flush(&mut self) -> Result<(), UnpackError> {
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
            self.redirects.written(&o.digest);
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
            self.redirects.remember(redirect);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Decides the redirect of a new object whose planned alias `planned` the pool did
    /// not link, and points the stubs written with `planned` at it if it differs.
    pub(super) fn settle_redirect(
        &self,
        digest: &Digest,
        planned: &Redirect,
        stubs: &[(PathBuf, u64)],
    ) -> Result<Redirect, CasError> {
        let redirect = self.t.store.redirect(digest)?;
        if redirect != *planned {
            tracing::debug!(%digest, "alias taken while the object was written: stubs corrected");
            for (rel, ino) in stubs {
                let abs = self.abs(rel);
                // only the stubs still there (a later entry may have replaced one)
                let sys = self.t.store.sys();
                let same = fs::symlink_metadata(&abs).is_ok_and(|md| md.ino() == *ino)
                    && sys
                        .trusted_xattr(&abs, XATTR_REDIRECT)
                        .map_err(CasError::io("getxattr", &abs))?
                        .is_some_and(|v| v == planned.value().as_bytes());
                if same {
                    sys.set_trusted_xattr(
                        At::Path(&abs),
                        XATTR_REDIRECT,
                        redirect.value().as_bytes(),
                    )
                    .map_err(CasError::io("setxattr", &abs))?;
                }
            }
        }
        Ok(redirect)
    }
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
