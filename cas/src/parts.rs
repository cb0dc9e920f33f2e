//! Digest-range parts, so that what a store-wide pass holds per object is one part's.
//!
//! `casctl fsck` and `casctl rebuild-index` need, for every object, what the manifests
//! say of it (how many committed layers name it, at which size) next to what the object
//! files and the index say. Held for the whole store at once that is about 100 bytes per
//! object: a gigabyte at ten million. Instead the objects are split into [`Parts`] by
//! the first bits of their digest (one part up to [`PART_OBJECTS`]; a part is a run of
//! the object fan-out directories and a range of the index's sorted keys), the pass
//! through the manifests writes each entry to its part ([`Spill`]: in memory for a store
//! of one part, otherwise a file per part under `cas/tmp`), and the checks then run a
//! part at a time.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::CasError;

/// Objects one part is sized for: about 15 MiB of sets and maps at a time (`casctl
/// fsck` at a million objects peaked at 159 MiB with parts four times this size).
pub const PART_OBJECTS: u64 = 1 << 16;

/// A split of the digest space into `1 << bits` ranges of the digest's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    bits: u32,
}

impl Parts {
    /// As many parts as `objects` need for each to hold about [`PART_OBJECTS`] (at most
    /// 256: one per fan-out directory).
    pub fn for_objects(objects: u64) -> Parts {
        let want = objects.div_ceil(PART_OBJECTS).max(1);
        Parts {
            bits: want.next_power_of_two().trailing_zeros().min(8),
        }
    }

    /// `1 << bits` parts (at most 256).
    pub fn with_bits(bits: u32) -> Parts {
        Parts { bits: bits.min(8) }
    }

    /// How many parts there are.
    pub fn count(&self) -> usize {
        1 << self.bits
    }

    /// The part of the digest whose first byte is `first`.
    pub fn of_byte(&self, first: u8) -> usize {
        match self.bits {
            0 => 0,
            b => (first >> (8 - b)) as usize,
        }
    }

    /// The part of `d`.
    pub fn of(&self, d: &Digest) -> usize {
        self.of_byte(d.as_bytes()[0])
    }

    /// The first bytes of the digests in part `p` (as `u16`, so the last range can end
    /// at 256).
    pub fn first_bytes(&self, p: usize) -> Range<u16> {
        let width = 256u16 >> self.bits;
        (p as u16 * width)..((p as u16 + 1) * width)
    }
}

/// One entry written to a part: a digest, a size and a tag the writer gives meaning to
/// (fsck: the snapshot's ordinal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spilled {
    /// The digest (or, for a tag that says so, a prefix of one, zero-padded).
    pub digest: [u8; 32],
    /// A size.
    pub size: u64,
    /// The writer's tag.
    pub tag: u32,
}

const RECORD: usize = 32 + 8 + 4;

impl Spilled {
    fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[..32].copy_from_slice(&self.digest);
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b[40..].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    fn decode(b: &[u8; RECORD]) -> Spilled {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[..32]);
        Spilled {
            digest,
            size: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
            tag: u32::from_le_bytes(b[40..].try_into().expect("4 bytes")),
        }
    }
}

/// Entries written part by part and read back a part at a time: in memory when there
/// is one part, otherwise in one file per part in a directory of its own, removed when
/// the spill is dropped (or, after a crash, by the next sweep of `cas/tmp`).
pub struct Spill {
    parts: Parts,
    store: Store,
}

enum Store {
    Memory(Vec<Spilled>),
    Files {
        dir: PathBuf,
        writers: Vec<BufWriter<File>>,
    },
}

impl Spill {
    /// A spill into `parts`; its files, if it needs any, go in a new directory `dir`.
    pub fn new(parts: Parts, dir: PathBuf) -> Result<Spill, CasError> {
        let store = if parts.count() == 1 {
            Store::Memory(Vec::new())
        } else {
            fs::create_dir(&dir).map_err(CasError::io("mkdir", &dir))?;
            let mut writers = Vec::with_capacity(parts.count());
            for p in 0..parts.count() {
                let path = part_file(&dir, p);
                let f = File::create(&path).map_err(CasError::io("create", &path))?;
                writers.push(BufWriter::with_capacity(16 << 10, f));
            }
            Store::Files { dir, writers }
        };
        Ok(Spill { parts, store })
    }

    /// The split it writes into.
    pub fn parts(&self) -> Parts {
        self.parts
    }

    /// Adds `e` to the part of its first byte.
    pub fn push(&mut self, e: Spilled) -> Result<(), CasError> {
        match &mut self.store {
            Store::Memory(v) => v.push(e),
            Store::Files { dir, writers } => {
                let p = self.parts.of_byte(e.digest[0]);
                writers[p]
                    .write_all(&e.encode())
                    .map_err(CasError::io("write", part_file(dir, p)))?;
            }
        }
        Ok(())
    }

    /// Calls `f` with each part's entries in turn (in the order they were pushed), the
    /// parts in digest order.
    pub fn for_each_part(
        mut self,
        mut f: impl FnMut(usize, Vec<Spilled>) -> Result<(), CasError>,
    ) -> Result<(), CasError> {
        match &mut self.store {
            Store::Memory(v) => f(0, std::mem::take(v)),
            Store::Files { dir, writers } => {
                for (p, w) in writers.iter_mut().enumerate() {
                    w.flush()
                        .map_err(CasError::io("write", part_file(dir, p)))?;
                }
                for p in 0..writers.len() {
                    let path = part_file(dir, p);
                    f(p, read_part(&path).map_err(CasError::io("read", &path))?)?;
                }
                Ok(())
            }
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Store::Files { dir, writers } = &mut self.store {
            writers.clear();
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A new name under `cas/tmp` for a spill of `what` (a directory the sweeps of
/// `cas/tmp` remove if a crash leaves it).
pub fn spill_dir(layout: &crate::layout::Layout, what: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    layout.tmp_dir().join(format!(
        "{what}-spill.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

fn part_file(dir: &Path, p: usize) -> PathBuf {
    dir.join(format!("part-{p:03}"))
}

fn read_part(path: &Path) -> io::Result<Vec<Spilled>> {
    let len = fs::metadata(path)?.len() as usize;
    let mut r = BufReader::with_capacity(64 << 10, File::open(path)?);
    let mut out = Vec::with_capacity(len / RECORD);
    let mut b = [0u8; RECORD];
    for _ in 0..len / RECORD {
        r.read_exact(&mut b)?;
        out.push(Spilled::decode(&b));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_digest_space_in_order() {
        assert_eq!(Parts::for_objects(0).count(), 1);
        assert_eq!(Parts::for_objects(PART_OBJECTS).count(), 1);
        assert_eq!(Parts::for_objects(PART_OBJECTS + 1).count(), 2);
        assert_eq!(Parts::for_objects(5_000_000).count(), 128);
        assert_eq!(Parts::for_objects(u64::MAX).count(), 256);
        for n in [1, 2, 32, 256] {
            let parts = Parts {
                bits: (n as u32).trailing_zeros(),
            };
            let mut next = 0u16;
            for p in 0..parts.count() {
                let r = parts.first_bytes(p);
                assert_eq!(r.start, next);
                for b in r.clone() {
                    assert_eq!(parts.of_byte(b as u8), p);
                }
                next = r.end;
            }
            assert_eq!(next, 256);
        }
    }

    #[test]
    fn a_spill_gives_each_part_its_entries_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for parts in [Parts { bits: 0 }, Parts { bits: 3 }] {
            let at = dir.path().join("spill");
            let mut s = Spill::new(parts, at.clone()).unwrap();
            let entries: Vec<Spilled> = (0..=255u8)
                .map(|b| Spilled {
                    digest: [b; 32],
                    size: b as u64 * 1000,
                    tag: b as u32 + 7,
                })
                .collect();
            for e in entries.iter().rev() {
                s.push(*e).unwrap();
            }
            let mut seen = Vec::new();
            s.for_each_part(|p, got| {
                for e in &got {
                    assert_eq!(parts.of_byte(e.digest[0]), p);
                }
                seen.extend(got.into_iter().rev());
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, entries);
            assert!(!at.exists());
        }
    }
}
