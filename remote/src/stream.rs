//! The uncompressed tar stream of a layer, assembled from the store and the registry.
//!
//! A partial pull does not build a layer tree of its own: it hands the store the same
//! tar stream a full pull would decompress, and the store's one unpack path
//! (`cas::unpack`, with every name rule, whiteout and hardlink check of the tar path)
//! makes the layer from it. So the tree is the full pull's by construction.
//!
//! Each regular file's content comes either from the store (its digest is an object:
//! nothing is fetched) or from the blob range the TOC gives it, fetched by the caller
//! and decompressed here ([`Piece`]s, in blob order). Fetched content is checked
//! against the file's digest before a byte of it is passed on, and a file may not
//! decompress to more than its size.
//!
//! The bytes around the contents come from the layer's tar-split when it has one:
//! then the stream is the original archive byte for byte, and its sha256 is the
//! layer's diffID, which the caller compares with the image config. Without a
//! tar-split they are headers written from the TOC (pax where ustar cannot say it),
//! and the stream is a different archive of the same tree.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use cas::Digest;
use sha2::{Digest as _, Sha256};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::tarsplit::Item;
use crate::toc::{Entry, EntryType, Toc};

/// Bytes of decompressed content produced per step.
const OUT_CHUNK: usize = 256 << 10;

/// Where the store's objects are read.
pub trait ObjectSource: Send {
    /// Opens the object `digest`.
    fn open(&self, digest: &Digest) -> io::Result<File>;
}

/// Compressed bytes of the blob from `offset`, as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Where the bytes start in the blob.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The fetched pieces, in blob order; an error ends the stream.
pub type Pieces = Box<dyn Iterator<Item = io::Result<Piece>> + Send>;

/// Why the stream could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// Fetched content does not match the file's digest.
    #[error("the fetched content of {name:?} does not match its digest: expected {expected}, got {actual}")]
    ContentDigest {
        /// The file.
        name: String,
        /// Its digest in the TOC.
        expected: Digest,
        /// The digest of what was fetched.
        actual: Digest,
    },
    /// Content of the wrong size (fetched, or a stored object).
    #[error("the content of {name:?} is {actual} bytes where the TOC says {expected}")]
    ContentSize {
        /// The file.
        name: String,
        /// Its size in the TOC.
        expected: u64,
        /// What was there (at least).
        actual: u64,
    },
    /// Fetched content does not decompress.
    #[error("the fetched content of {name:?} does not decompress: {reason}")]
    Decompress {
        /// The file.
        name: String,
        /// The decoder's error.
        reason: String,
    },
    /// A stored object could not be read (collected since the plan, or damaged).
    #[error("object {digest} of {name:?} cannot be read: {reason}")]
    Object {
        /// The file.
        name: String,
        /// The object.
        digest: Digest,
        /// The error.
        reason: String,
    },
    /// The fetch failed or ended early.
    #[error("fetching the layer's ranges: {0}")]
    Fetch(String),
    /// The tar-split and the TOC disagree.
    #[error("the tar-split does not match the TOC: {0}")]
    TarSplit(String),
}

/// The first failure of a stream, for the caller to report once the consumer of the
/// stream has given up (it sees only an I/O error).
pub type FailureSlot = Arc<Mutex<Option<AssembleError>>>;

/// What a layer needs fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per TOC entry: whether its content is fetched (false: read from the store, or
    /// no content).
    pub fetch: Vec<bool>,
    /// The byte ranges to request, in blob order: the fetched files' ranges, merged
    /// where close, split where long.
    pub requests: Vec<(u64, u64)>,
    /// Regular files with content.
    pub files: u64,
    /// Of them, the ones fetched.
    pub fetched_files: u64,
    /// Compressed bytes requested.
    pub fetched_bytes: u64,
    /// Uncompressed bytes read from the store instead.
    pub stored_bytes: u64,
}

/// How ranges become requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    /// Ranges at most this far apart are one request (the bytes between are fetched
    /// and dropped).
    pub max_gap: u64,
    /// No request is longer (longer ranges are split).
    pub max_request: u64,
}

impl Default for Coalesce {
    fn default() -> Self {
        Coalesce {
            max_gap: 16 << 10,
            max_request: 4 << 20,
        }
    }
}

/// Decides, file by file, what is read from the store (`stored` says whether an
/// object exists) and what is fetched.
pub fn plan(toc: &Toc, stored: impl Fn(&Digest) -> bool, how: Coalesce) -> Plan {
    let mut p = Plan {
        fetch: vec![false; toc.entries.len()],
        ..Plan::default()
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, e) in toc.entries.iter().enumerate() {
        let (Some(d), Some((start, end))) = (e.digest, e.range) else {
            continue;
        };
        p.files += 1;
        if stored(&d) {
            p.stored_bytes += e.size;
            continue;
        }
        p.fetch[i] = true;
        p.fetched_files += 1;
        match ranges.last_mut() {
            Some(last) if start - last.1 <= how.max_gap && end - last.0 <= how.max_request => {
                last.1 = end
            }
            _ => ranges.push((start, end)),
        }
    }
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let to = end.min(at + how.max_request.max(1));
            p.requests.push((at, to));
            p.fetched_bytes += to - at;
            at = to;
        }
    }
    p
}

/// What the stream is made of.
enum Step {
    Bytes(Vec<u8>),
    File(usize),
}

/// The steps of a stream rebuilt from a tar-split: the original archive.
fn steps_from_tar_split(toc: &Toc, items: Vec<Item>) -> Result<VecDeque<Step>, AssembleError> {
    let by_name: HashMap<&str, usize> = toc
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.range.is_some())
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let mut steps = VecDeque::with_capacity(items.len());
    let mut used = 0usize;
    for item in items {
        match item {
            Item::Segment(b) if b.is_empty() => {}
            Item::Segment(b) => steps.push_back(Step::Bytes(b)),
            Item::File { size: 0, .. } => {}
            Item::File { name, size } => {
                let key = name.trim_start_matches("./").trim_start_matches('/');
                let key = key.trim_end_matches('/');
                let Some(&i) = by_name.get(key) else {
                    return Err(AssembleError::TarSplit(format!(
                        "file {name:?} has content in the tar-split but none in the TOC"
                    )));
                };
                if toc.entries[i].size != size {
                    return Err(AssembleError::TarSplit(format!(
                        "file {name:?} is {size} bytes in the tar-split and {} in the TOC",
                        toc.entries[i].size
                    )));
                }
                used += 1;
                steps.push_back(Step::File(i));
            }
        }
    }
    if used != by_name.len() {
        return Err(AssembleError::TarSplit(format!(
            "{} files with content in the TOC, {used} in the tar-split",
            by_name.len()
        )));
    }
    Ok(steps)
}

/// The steps of a stream written from the TOC alone.
fn steps_from_toc(toc: &Toc) -> VecDeque<Step> {
    let mut steps = VecDeque::with_capacity(toc.entries.len() * 3 + 1);
    for (i, e) in toc.entries.iter().enumerate() {
        steps.push_back(Step::Bytes(header(e)));
        if e.range.is_some() {
            steps.push_back(Step::File(i));
            let pad = (512 - e.size % 512) % 512;
            if pad > 0 {
                steps.push_back(Step::Bytes(vec![0; pad as usize]));
            }
        }
    }
    steps.push_back(Step::Bytes(
        toc.trailer.clone().unwrap_or_else(|| vec![0; 1024]),
    ));
    steps
}

/// One pax record: `<len> <key>=<value>\n`, the length counting itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len.to_string().len() + rest > len {
        len += 1;
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The header (a pax header first where needed) of a TOC entry.
fn header(e: &Entry) -> Vec<u8> {
    let name = if e.kind == EntryType::Dir {
        format!("{}/", e.name)
    } else {
        e.name.clone()
    };
    let mut pax = Vec::new();
    let fits = |s: &str| s.len() <= 100 && s.is_ascii();
    if !fits(&name) {
        pax_record(&mut pax, "path", name.as_bytes());
    }
    if !fits(&e.link_name) {
        pax_record(&mut pax, "linkpath", e.link_name.as_bytes());
    }
    let time = |(s, ns): (i64, u32)| {
        if ns == 0 {
            s.to_string()
        } else {
            format!("{s}.{ns:09}")
        }
    };
    let (secs, nanos) = e.mtime.unwrap_or((0, 0));
    if nanos != 0 || secs < 0 {
        pax_record(&mut pax, "mtime", time((secs, nanos)).as_bytes());
    }
    if let Some(a) = e.atime {
        pax_record(&mut pax, "atime", time(a).as_bytes());
    }
    for (id, key) in [(e.uid, "uid"), (e.gid, "gid")] {
        if u64::from(id) > 0o7777777 {
            pax_record(&mut pax, key, id.to_string().as_bytes());
        }
    }
    if e.size > 0o77777777777 {
        pax_record(&mut pax, "size", e.size.to_string().as_bytes());
    }
    for (k, v) in &e.xattrs {
        pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
    }
    let mut out = Vec::with_capacity(1024 + pax.len());
    if !pax.is_empty() {
        let mut h = tar::Header::new_ustar();
        raw_name(&mut h, "././@PaxHeader");
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(pax.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        let pad = (512 - pax.len() % 512) % 512;
        out.extend_from_slice(&pax);
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    let mut h = tar::Header::new_ustar();
    raw_name(&mut h, &name);
    if let Some(u) = h.as_ustar_mut() {
        let l = e.link_name.as_bytes();
        let n = l.len().min(100);
        u.linkname[..n].copy_from_slice(&l[..n]);
    }
    h.set_entry_type(match e.kind {
        EntryType::Reg => tar::EntryType::Regular,
        EntryType::Dir => tar::EntryType::Directory,
        EntryType::Symlink => tar::EntryType::Symlink,
        EntryType::Hardlink => tar::EntryType::Link,
        EntryType::Char => tar::EntryType::Char,
        EntryType::Block => tar::EntryType::Block,
        EntryType::Fifo => tar::EntryType::Fifo,
    });
    h.set_mode(e.mode);
    h.set_uid(u64::from(e.uid).min(0o7777777));
    h.set_gid(u64::from(e.gid).min(0o7777777));
    h.set_mtime(secs.max(0) as u64);
    h.set_size(if e.kind == EntryType::Reg {
        e.size.min(0o77777777777)
    } else {
        0
    });
    if matches!(e.kind, EntryType::Char | EntryType::Block) {
        let _ = h.set_device_major(e.device.0);
        let _ = h.set_device_minor(e.device.1);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out
}

/// The first 100 bytes of `name` as the header's name (pax carries the whole).
fn raw_name(h: &mut tar::Header, name: &str) {
    let b = name.as_bytes();
    let n = b.len().min(100);
    h.as_old_mut().name = [0; 100];
    h.as_old_mut().name[..n].copy_from_slice(&b[..n]);
}

/// The fetched pieces, read as ranges of the blob.
struct Cursor {
    pieces: Pieces,
    current: Option<Piece>,
}

impl Cursor {
    /// Bytes of the blob from `pos` (before `end`), as many as the current piece has.
    fn slice(&mut self, pos: u64, end: u64) -> Result<&[u8], AssembleError> {
        loop {
            if let Some(p) = &self.current {
                let p_end = p.offset + p.bytes.len() as u64;
                if pos >= p.offset && pos < p_end {
                    break;
                }
                if pos < p.offset {
                    return Err(AssembleError::Fetch(format!(
                        "byte {pos} was not fetched (the next piece starts at {})",
                        p.offset
                    )));
                }
                self.current = None;
            }
            match self.pieces.next() {
                Some(Ok(p)) => self.current = Some(p),
                Some(Err(e)) => return Err(AssembleError::Fetch(e.to_string())),
                None => {
                    return Err(AssembleError::Fetch(format!(
                        "the fetched ranges ended before byte {pos}"
                    )))
                }
            }
        }
        let p = self.current.as_ref().expect("a piece holds pos");
        let from = (pos - p.offset) as usize;
        let to = (end.min(p.offset + p.bytes.len() as u64) - p.offset) as usize;
        Ok(&p.bytes[from..to])
    }
}

/// A file whose content is being produced.
enum Current {
    Object {
        file: File,
        left: u64,
        entry: usize,
    },
    Fetched {
        decoder: Box<Decoder<'static>>,
        pos: u64,
        end: u64,
        hasher: Sha256,
        produced: u64,
        entry: usize,
    },
    /// eStargz: chunk by chunk, each gzip member decoded whole (chunks are small).
    Gzip {
        next_chunk: usize,
        hasher: Sha256,
        produced: u64,
        entry: usize,
    },
}

/// Largest eStargz chunk accepted, compressed or not (the format's default is 4 MiB).
pub const MAX_GZIP_CHUNK: u64 = 64 << 20;

/// Whether what `hasher` has seen is `e`'s content.
fn check_digest(e: &Entry, hasher: &mut Sha256) -> Result<(), AssembleError> {
    let actual = Digest::from_bytes(std::mem::take(hasher).finalize().into());
    let expected = e.digest.expect("planned");
    if actual != expected {
        return Err(AssembleError::ContentDigest {
            name: e.name.clone(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// The layer's tar stream (see the module docs).
pub struct LayerStream<S: ObjectSource> {
    toc: Toc,
    fetch: Vec<bool>,
    steps: VecDeque<Step>,
    objects: S,
    cursor: Cursor,
    current: Option<Current>,
    buf: Vec<u8>,
    at: usize,
    scratch: Vec<u8>,
    failure: FailureSlot,
}

impl<S: ObjectSource> LayerStream<S> {
    /// The stream of `toc`'s layer, around `tar_split` when there is one; `plan`
    /// says which contents come from `pieces` and which from `objects`.
    pub fn new(
        toc: Toc,
        tar_split: Option<Vec<Item>>,
        plan: &Plan,
        objects: S,
        pieces: Pieces,
    ) -> Result<LayerStream<S>, AssembleError> {
        let steps = match tar_split {
            Some(items) => steps_from_tar_split(&toc, items)?,
            None => steps_from_toc(&toc),
        };
        Ok(LayerStream {
            fetch: plan.fetch.clone(),
            toc,
            steps,
            objects,
            cursor: Cursor {
                pieces,
                current: None,
            },
            current: None,
            buf: Vec::new(),
            at: 0,
            scratch: vec![0; OUT_CHUNK],
            failure: FailureSlot::default(),
        })
    }

    /// Where the stream's first failure is kept.
    pub fn failure(&self) -> FailureSlot {
        self.failure.clone()
    }

    fn fail(&self, e: AssembleError) -> io::Error {
        let msg = e.to_string();
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    fn open(&mut self, i: usize) -> Result<Current, AssembleError> {
        let e = &self.toc.entries[i];
        let (digest, (start, end)) = (e.digest.expect("planned"), e.range.expect("planned"));
        if self.fetch[i] && self.toc.frames == crate::toc::Frames::Gzip {
            return Ok(Current::Gzip {
                next_chunk: 0,
                hasher: Sha256::new(),
                produced: 0,
                entry: i,
            });
        }
        if self.fetch[i] {
            let decoder = Decoder::new().map_err(|err| AssembleError::Decompress {
                name: e.name.clone(),
                reason: err.to_string(),
            })?;
            return Ok(Current::Fetched {
                decoder: Box::new(decoder),
                pos: start,
                end,
                hasher: Sha256::new(),
                produced: 0,
                entry: i,
            });
        }
        let file = self
            .objects
            .open(&digest)
            .map_err(|err| AssembleError::Object {
                name: e.name.clone(),
                digest,
                reason: err.to_string(),
            })?;
        Ok(Current::Object {
            file,
            left: e.size,
            entry: i,
        })
    }

    /// Produces the next bytes of the current file into `buf`; `Ok(false)` when the
    /// file is done.
    fn produce(&mut self) -> Result<bool, AssembleError> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(false);
        };
        match cur {
            Current::Object { file, left, entry } => {
                if *left == 0 {
                    return Ok(false);
                }
                let want = (*left).min(OUT_CHUNK as u64) as usize;
                let e = &self.toc.entries[*entry];
                let n =
                    file.read(&mut self.scratch[..want])
                        .map_err(|err| AssembleError::Object {
                            name: e.name.clone(),
                            digest: e.digest.expect("planned"),
                            reason: err.to_string(),
                        })?;
                if n == 0 {
                    return Err(AssembleError::ContentSize {
                        name: e.name.clone(),
                        expected: e.size,
                        actual: e.size - *left,
                    });
                }
                *left -= n as u64;
                self.buf.extend_from_slice(&self.scratch[..n]);
                Ok(true)
            }
            Current::Gzip {
                next_chunk,
                hasher,
                produced,
                entry,
            } => {
                let e = &self.toc.entries[*entry];
                let Some(c) = e.chunks.get(*next_chunk).copied() else {
                    return check_digest(e, hasher).map(|()| false);
                };
                if c.end - c.start > MAX_GZIP_CHUNK || c.size > MAX_GZIP_CHUNK {
                    return Err(AssembleError::Decompress {
                        name: e.name.clone(),
                        reason: format!("a chunk of {} bytes is larger than allowed", c.size),
                    });
                }
                let mut compressed = Vec::with_capacity((c.end - c.start) as usize);
                let mut pos = c.start;
                while pos < c.end {
                    let part = self.cursor.slice(pos, c.end)?;
                    compressed.extend_from_slice(part);
                    pos += part.len() as u64;
                }
                let mut content = Vec::with_capacity(c.size as usize);
                flate2::read::MultiGzDecoder::new(&compressed[..])
                    .take(c.size)
                    .read_to_end(&mut content)
                    .map_err(|err| AssembleError::Decompress {
                        name: e.name.clone(),
                        reason: err.to_string(),
                    })?;
                if content.len() as u64 != c.size {
                    return Err(AssembleError::ContentSize {
                        name: e.name.clone(),
                        expected: e.size,
                        actual: *produced + content.len() as u64,
                    });
                }
                *produced += c.size;
                *next_chunk += 1;
                hasher.update(&content);
                self.buf.extend_from_slice(&content);
                Ok(true)
            }
            Current::Fetched {
                decoder,
                pos,
                end,
                hasher,
                produced,
                entry,
            } => {
                let e = &self.toc.entries[*entry];
                let dec_err = |err: io::Error| AssembleError::Decompress {
                    name: e.name.clone(),
                    reason: err.to_string(),
                };
                let written = if *pos < *end {
                    let input = self.cursor.slice(*pos, *end)?;
                    let mut inb = InBuffer::around(input);
                    let mut outb = OutBuffer::around(&mut self.scratch[..]);
                    decoder.run(&mut inb, &mut outb).map_err(dec_err)?;
                    *pos += inb.pos() as u64;
                    outb.pos()
                } else {
                    let mut inb = InBuffer::around(&[]);
                    let mut outb = OutBuffer::around(&mut self.scratch[..]);
                    decoder.run(&mut inb, &mut outb).map_err(dec_err)?;
                    outb.pos()
                };
                if *produced + written as u64 > e.size {
                    return Err(AssembleError::ContentSize {
                        name: e.name.clone(),
                        expected: e.size,
                        actual: *produced + written as u64,
                    });
                }
                *produced += written as u64;
                hasher.update(&self.scratch[..written]);
                self.buf.extend_from_slice(&self.scratch[..written]);
                if written > 0 || *pos < *end {
                    return Ok(true);
                }
                // input consumed and nothing more comes out: the file is complete
                if *produced != e.size {
                    return Err(AssembleError::ContentSize {
                        name: e.name.clone(),
                        expected: e.size,
                        actual: *produced,
                    });
                }
                check_digest(e, hasher).map(|()| false)
            }
        }
    }
}

impl<S: ObjectSource> Read for LayerStream<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.at);
                out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.buf.clear();
            self.at = 0;
            if self.current.is_some() {
                match self.produce() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.current = None;
                        continue;
                    }
                    Err(e) => return Err(self.fail(e)),
                }
            }
            match self.steps.pop_front() {
                None => return Ok(0),
                Some(Step::Bytes(b)) => {
                    self.buf = b;
                }
                Some(Step::File(i)) => match self.open(i) {
                    Ok(c) => self.current = Some(c),
                    Err(e) => return Err(self.fail(e)),
                },
            }
        }
    }
}
