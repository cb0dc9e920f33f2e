//! Decoding: the decode thread turns the blob into a stream of tar bytes in bounded
//! chunks (decompression, the blob's digest, the diffID, the expansion limits), and
//! [`ChunkReader`] is the unpack thread's end of it.

use std::io::{self, BufReader, Read};
use std::sync::mpsc;

use sha2::{Digest as _, Sha256};

use super::{Limits, UnpackError};
use crate::digest::Digest;

/// Size of the chunks passed from the decode thread to the unpack thread.
const CHUNK: usize = 256 << 10;
/// Chunks the channel to the unpack thread holds.
pub(super) const CHANNEL_CHUNKS: usize = 16;
/// Chunks the channel from the decode thread to the diffID thread holds: with the
/// unpack thread's, 24 chunks (6 MiB) of decoded tar at most are in flight. Splitting the
/// 16 of one channel into 12 and 4 instead made applies of the Debian base 5-10% slower.
const DIFF_CHUNKS: usize = CHANNEL_CHUNKS / 2;

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

/// What the decode thread found.
pub(super) struct Decoded {
    pub(super) diff_id: Digest,
    pub(super) uncompressed_size: u64,
    pub(super) compression: Compression,
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

/// The blob's reader: its bytes are hashed and counted as they are read.
type Raw<R> = BufReader<Hashing<R>>;

/// The decode thread: blob → (hash) → decompress → chunks on `tx`. The diffID of a
/// compressed blob is hashed on a thread of its own (`layer-diffid`) that passes the
/// chunks on: decompression is the critical path of an apply whose files are stored
/// already, and hashing 120 MB of tar takes 70 ms of it.
pub(super) fn decode(
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
    let expected = Expected {
        digest: blob_digest,
        size: blob_size,
        allowed: limits.allowed(blob_size),
    };
    if compression == Compression::None {
        // the blob is the tar: its digest is the diffID
        let (blob, size) = pump_blob(raw, compression, &expected, &tx)?;
        return Ok(Decoded {
            diff_id: blob,
            uncompressed_size: size,
            compression,
        });
    }
    let (stage_tx, stage_rx) = mpsc::sync_channel(DIFF_CHUNKS);
    std::thread::scope(|scope| {
        let stage = std::thread::Builder::new()
            .name("layer-diffid".into())
            .spawn_scoped(scope, move || diff_stage(stage_rx, tx))
            .map_err(UnpackError::Read)?;
        let pumped = pump_blob(raw, compression, &expected, &stage_tx);
        drop(stage_tx);
        let diff_id = stage
            .join()
            .map_err(|_| UnpackError::Read(io::Error::other("diffID thread panicked")))?;
        let (_, size) = pumped?;
        Ok(Decoded {
            diff_id,
            uncompressed_size: size,
            compression,
        })
    })
}

/// What the blob must be.
struct Expected {
    /// Its descriptor's digest, when it is to be checked.
    digest: Option<Digest>,
    /// Its descriptor's size.
    size: u64,
    /// The uncompressed bytes it may expand to ([`Limits::allowed`]).
    allowed: u64,
}

/// Hashes the tar stream's chunks and passes them on to the unpack thread; stops when
/// the decode thread is done or the unpack thread stopped. Returns the diffID.
fn diff_stage(
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
) -> Digest {
    let mut diff = Sha256::new();
    for chunk in rx {
        if let Ok(c) = &chunk {
            diff.update(c);
        }
        if tx.send(chunk).is_err() {
            // The unpack thread stopped (its own error); it reports that.
            break;
        }
    }
    Digest::from_bytes(diff.finalize().into())
}

/// Decompresses the blob in chunks onto `out`, checks it against `expected`, and
/// returns the blob's digest and the bytes it decompressed to.
fn pump_blob<R: Read>(
    mut raw: Raw<R>,
    compression: Compression,
    expected: &Expected,
    out: &mpsc::SyncSender<io::Result<Vec<u8>>>,
) -> Result<(Digest, u64), UnpackError> {
    let fail = |out: &mpsc::SyncSender<io::Result<Vec<u8>>>, e: UnpackError| {
        // Tell the unpack thread to stop; it reports the decoder's error.
        let _ = out.send(Err(io::Error::other("layer stream failed")));
        e
    };
    let decompress_err = |source| UnpackError::Decompress {
        compression: compression.as_str(),
        source,
    };
    let mut total = 0u64;
    let mut pump = |reader: &mut dyn Read| -> Result<(), UnpackError> {
        loop {
            let buf = read_chunk(reader).map_err(decompress_err)?;
            let filled = buf.len();
            if filled == 0 {
                return Ok(());
            }
            total += filled as u64;
            if total > expected.allowed {
                return Err(UnpackError::Expansion {
                    limit: expected.allowed,
                    blob_size: expected.size,
                });
            }
            if out.send(Ok(buf)).is_err() {
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
                .map_err(|e| fail(out, decompress_err(e)))?;
            let r = pump(&mut d);
            (d.finish(), r)
        }
    };
    if let Err(e) = pumped {
        let e = fail(out, e);
        // A stream that does not decompress may be a blob whose bytes were damaged after
        // it was fetched: then the digest is the cause to report (DataLoss, not a bad
        // image), so the rest of the blob is read to tell.
        if matches!(e, UnpackError::Decompress { .. }) {
            if let Some(expected_digest) = expected.digest {
                let mut hashing = raw.into_inner();
                if io::copy(&mut hashing, &mut io::sink()).is_ok() {
                    let actual = Digest::from_bytes(hashing.hasher.finalize().into());
                    if expected_digest != actual || hashing.count != expected.size {
                        return Err(UnpackError::BlobDigest {
                            expected: expected_digest,
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
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| fail(out, UnpackError::Read(e)))?;
    let actual = Digest::from_bytes(hashing.hasher.finalize().into());
    if let Some(expected_digest) = expected.digest {
        if expected_digest != actual || hashing.count != expected.size {
            return Err(fail(
                out,
                UnpackError::BlobDigest {
                    expected: expected_digest,
                    actual,
                    size: hashing.count,
                },
            ));
        }
    }
    Ok((actual, total))
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

/// Reads up to [`CHUNK`] bytes (fewer only at the end; empty at the end), into a buffer
/// that is not zeroed first.
pub(super) fn read_chunk(reader: &mut (impl Read + ?Sized)) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(CHUNK);
    reader.take(CHUNK as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
