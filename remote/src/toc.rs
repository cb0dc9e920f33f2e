//! The table of contents of a zstd:chunked layer, as containers/storage writes it.
//!
//! A zstd:chunked blob is an ordinary `tar+zstd` layer whose frames are cut so that
//! every regular file's content is a run of complete zstd frames of its own, at
//! `[offset, endOffset)` in the blob. After the tar stream come zstd skippable frames
//! that decoders ignore: the TOC (zstd-compressed JSON), the tar-split of the
//! uncompressed tar (see [`crate::tarsplit`]) when the producer wrote one, and a footer.
//! The layer descriptor's annotations say where the TOC is and what its digest is:
//!
//! ```text
//! io.github.containers.zstd-chunked.manifest-position  offset:length:uncompressed:1
//! io.github.containers.zstd-chunked.manifest-checksum  sha256 of the compressed TOC
//! io.github.containers.zstd-chunked.tarsplit-position  offset:length:uncompressed
//! ```
//!
//! Producers before containers/storage 1.44 (Debian 12's skopeo among them) name the
//! first two `io.containers.zstd-chunked.*` and write no tar-split; both are read. The
//! tar-split's digest is the TOC's `tarSplitDigest` (containers/storage 1.54 on); a
//! tar-split without one is not trusted, as containers/storage itself does since 1.55.
//!
//! The TOC is checked before anything is built from it ([`Toc::parse`]): every name is
//! relative and stays inside the layer, a hardlink names an entry before it, a regular
//! file with content has a digest and a range inside the blob's data, and ranges do
//! not overlap. A TOC that breaks a rule is refused with the entry it names.

use std::collections::{BTreeMap, HashSet};

use base64::Engine as _;
use cas::Digest;
use serde::Deserialize;

/// The annotation prefixes of zstd:chunked, current first.
pub const ANNOTATION_PREFIXES: [&str; 2] = [
    "io.github.containers.zstd-chunked.",
    "io.containers.zstd-chunked.",
];

/// Upper bound on a TOC's uncompressed size (containers/storage's own limit).
pub const MAX_TOC_BYTES: u64 = 150 << 20;
/// Upper bound on a tar-split's uncompressed size.
pub const MAX_TAR_SPLIT_BYTES: u64 = 1 << 30;

/// Why a TOC or its annotations were refused.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    /// An annotation is malformed.
    #[error("annotation {key}: {reason} (value {value:?})")]
    Annotation {
        /// The annotation.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The TOC's bytes do not match the digest the manifest gives.
    #[error("the {what} does not match its digest: expected {expected}, read {actual}")]
    Digest {
        /// TOC or tar-split.
        what: &'static str,
        /// The digest the manifest (or the TOC) gives.
        expected: Digest,
        /// The digest of the bytes read.
        actual: Digest,
    },
    /// The TOC does not decompress, or is larger than allowed.
    #[error("the {what} does not decompress: {reason}")]
    Decompress {
        /// TOC or tar-split.
        what: &'static str,
        /// The decoder's error.
        reason: String,
    },
    /// The TOC is not the JSON it should be.
    #[error("the TOC is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// An entry breaks a rule.
    #[error("TOC entry {index} ({name:?}): {reason}")]
    Entry {
        /// Its position in the TOC.
        index: usize,
        /// Its name.
        name: String,
        /// The rule it breaks.
        reason: String,
    },
}

/// A byte range of the blob and the size it decompresses to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRange {
    /// Offset in the blob.
    pub offset: u64,
    /// Compressed length.
    pub length: u64,
    /// Uncompressed length.
    pub uncompressed: u64,
}

impl BlobRange {
    /// One past the range's last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Where a zstd:chunked layer's TOC and tar-split are, from its descriptor's
/// annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedLayer {
    /// The compressed TOC.
    pub toc: BlobRange,
    /// The digest of the compressed TOC.
    pub toc_digest: Digest,
    /// The compressed tar-split, when the producer wrote one.
    pub tar_split: Option<BlobRange>,
}

impl ChunkedLayer {
    /// Reads the annotations of a layer descriptor; `None` when it is not zstd:chunked.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<ChunkedLayer>, TocError> {
        for prefix in ANNOTATION_PREFIXES {
            let get = |name: &str| {
                let key = format!("{prefix}{name}");
                annotations.get(&key).map(|v| (key, v.as_str()))
            };
            let (Some(position), Some(checksum)) =
                (get("manifest-position"), get("manifest-checksum"))
            else {
                continue;
            };
            let toc = parse_position(&position.0, position.1, true)?;
            let toc_digest: Digest = checksum.1.parse().map_err(|_| TocError::Annotation {
                key: checksum.0.clone(),
                value: checksum.1.to_string(),
                reason: "not a sha256 digest",
            })?;
            if toc.uncompressed > MAX_TOC_BYTES {
                return Err(TocError::Annotation {
                    key: position.0,
                    value: position.1.to_string(),
                    reason: "the TOC is larger than 150 MiB",
                });
            }
            let tar_split = match get("tarsplit-position") {
                Some((key, value)) => Some(parse_position(&key, value, false)?),
                None => None,
            };
            return Ok(Some(ChunkedLayer {
                toc,
                toc_digest,
                tar_split,
            }));
        }
        Ok(None)
    }
}

/// `offset:length:uncompressed[:type]`; the manifest type must be 1 (CRFS JSON).
fn parse_position(key: &str, value: &str, with_type: bool) -> Result<BlobRange, TocError> {
    let bad = |reason| TocError::Annotation {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    let parts: Vec<&str> = value.split(':').collect();
    let want = if with_type { 4 } else { 3 };
    if parts.len() != want {
        return Err(bad("not offset:length:uncompressed-length[:type]"));
    }
    let n: Vec<u64> = parts
        .iter()
        .map(|p| p.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad("a field is not a number"))?;
    if with_type && n[3] != 1 {
        return Err(bad("manifest type is not 1 (the JSON TOC)"));
    }
    if n[1] == 0 || n[0].checked_add(n[1]).is_none() {
        return Err(bad("empty or overflowing range"));
    }
    Ok(BlobRange {
        offset: n[0],
        length: n[1],
        uncompressed: n[2],
    })
}

/// Checks `compressed` against `expected` and decompresses it (at most `limit` bytes).
pub fn decompress_verified(
    what: &'static str,
    compressed: &[u8],
    expected: &Digest,
    limit: u64,
) -> Result<Vec<u8>, TocError> {
    let actual = Digest::of(compressed);
    if actual != *expected {
        return Err(TocError::Digest {
            what,
            expected: *expected,
            actual,
        });
    }
    let mut out = Vec::new();
    let decoder =
        zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| TocError::Decompress {
            what,
            reason: e.to_string(),
        })?;
    use std::io::Read as _;
    decoder
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| TocError::Decompress {
            what,
            reason: e.to_string(),
        })?;
    if out.len() as u64 > limit {
        return Err(TocError::Decompress {
            what,
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(out)
}

/// The type of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    /// A regular file.
    Reg,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hardlink to an earlier entry.
    Hardlink,
    /// A character device (whiteouts are `.wh.` names, not devices).
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
}

/// One entry of the layer, as the TOC describes it (chunk entries folded into their
/// file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryType,
    /// Its name, relative, as archived (without a leading `/` or `./`).
    pub name: String,
    /// A link's target (a hardlink's is an earlier entry's name).
    pub link_name: String,
    /// Permission bits and setuid/setgid/sticky.
    pub mode: u32,
    /// Content bytes (regular files).
    pub size: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: Option<(i64, u32)>,
    /// Access time, when the archive recorded one.
    pub atime: Option<(i64, u32)>,
    /// Device numbers.
    pub device: (u32, u32),
    /// Extended attributes, decoded.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The content's digest (regular files with content).
    pub digest: Option<Digest>,
    /// The compressed range of the content in the blob (regular files with content):
    /// from its first chunk's start to its last chunk's end.
    pub range: Option<(u64, u64)>,
    /// The content's chunks, in order: each a compressed range that decompresses, on
    /// its own, to `size` bytes of the content (and, in eStargz, may go on beyond them).
    pub chunks: Vec<Chunk>,
}

/// One chunk of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First compressed byte in the blob.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Content bytes it holds.
    pub size: u64,
}

/// How the contents' ranges are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frames {
    /// zstd frames (zstd:chunked): a chunk is complete frames of its content alone.
    #[default]
    Zstd,
    /// gzip members (eStargz): a chunk's members start with its content.
    Gzip,
}

/// A checked TOC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toc {
    /// The entries in archive order.
    pub entries: Vec<Entry>,
    /// The digest of the compressed tar-split, when the producer recorded it.
    pub tar_split_digest: Option<Digest>,
    /// How contents are compressed.
    pub frames: Frames,
    /// The archive's last bytes, where the layer has its own (eStargz: the TOC's entry
    /// and the end-of-archive blocks); two zero blocks otherwise.
    pub trailer: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct RawToc {
    #[serde(default)]
    version: u32,
    #[serde(default)]
    entries: Vec<RawEntry>,
    #[serde(default, rename = "tarSplitDigest")]
    tar_split_digest: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(rename = "linkName")]
    link_name: String,
    mode: i64,
    size: i64,
    uid: i64,
    gid: i64,
    modtime: String,
    accesstime: String,
    #[serde(rename = "devMajor")]
    dev_major: i64,
    #[serde(rename = "devMinor")]
    dev_minor: i64,
    xattrs: BTreeMap<String, String>,
    digest: String,
    offset: i64,
    #[serde(rename = "endOffset")]
    end_offset: i64,
    #[serde(rename = "innerOffset")]
    inner_offset: i64,
    #[serde(rename = "chunkOffset")]
    chunk_offset: i64,
}

impl Toc {
    /// Parses and checks the TOC JSON of a zstd:chunked blob whose data (the tar
    /// stream's frames) ends at `data_end` (the TOC's own offset).
    pub fn parse(json: &[u8], data_end: u64) -> Result<Toc, TocError> {
        Self::parse_as(json, data_end, Frames::Zstd)
    }

    /// [`Toc::parse`] for contents compressed as `frames`. eStargz TOCs give each
    /// chunk's start alone: it ends where the next one starts (or at `data_end`).
    pub(crate) fn parse_as(json: &[u8], data_end: u64, frames: Frames) -> Result<Toc, TocError> {
        let raw: RawToc = serde_json::from_slice(json).map_err(TocError::Json)?;
        if raw.version != 1 {
            return Err(TocError::Entry {
                index: 0,
                name: String::new(),
                reason: format!("TOC version {} (only 1 is known)", raw.version),
            });
        }
        let tar_split_digest = match raw.tar_split_digest.as_str() {
            "" => None,
            d => Some(d.parse().map_err(|_| TocError::Entry {
                index: 0,
                name: String::new(),
                reason: format!("tarSplitDigest {d:?} is not a sha256 digest"),
            })?),
        };
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.entries.len());
        let mut names: HashSet<String> = HashSet::new();
        let mut last_end = 0u64;
        // eStargz: (entry, chunk start in the blob, chunk offset in the file, TOC index)
        let mut gz_starts: Vec<(usize, u64, u64, usize)> = Vec::new();
        for (index, e) in raw.entries.into_iter().enumerate() {
            let fail = |reason: String| TocError::Entry {
                index,
                name: e.name.clone(),
                reason,
            };
            let kind = match e.kind.as_str() {
                "chunk" => {
                    // a later chunk of the file before it: its range is inside the file's
                    match entries.last() {
                        Some(f) if f.kind == EntryType::Reg && normalise(&e.name) == f.name => {
                            if frames == Frames::Gzip && f.size > 0 {
                                if e.inner_offset != 0 {
                                    return Err(fail(
                                        "chunks that share a gzip member (innerOffset) are not supported".into(),
                                    ));
                                }
                                let (Ok(start), Ok(co)) =
                                    (u64::try_from(e.offset), u64::try_from(e.chunk_offset))
                                else {
                                    return Err(fail("negative chunk offset".into()));
                                };
                                gz_starts.push((entries.len() - 1, start, co, index));
                            }
                            continue;
                        }
                        _ => return Err(fail("a chunk that follows no file of its name".into())),
                    }
                }
                "reg" => EntryType::Reg,
                "dir" => EntryType::Dir,
                "symlink" => EntryType::Symlink,
                "hardlink" => EntryType::Hardlink,
                "char" => EntryType::Char,
                "block" => EntryType::Block,
                "fifo" => EntryType::Fifo,
                other => return Err(fail(format!("unknown entry type {other:?}"))),
            };
            let name = checked_name(&e.name).map_err(|r| fail(r.to_string()))?;
            let num = |v: i64, what: &str| -> Result<u64, TocError> {
                u64::try_from(v).map_err(|_| fail(format!("negative {what}")))
            };
            let id = |v: i64, what: &str| -> Result<u32, TocError> {
                u32::try_from(v).map_err(|_| fail(format!("{what} {v} out of range")))
            };
            let size = num(e.size, "size")?;
            let mode = u32::try_from(e.mode & 0o7777).unwrap_or(0);
            let link_name = match kind {
                EntryType::Hardlink => {
                    let target = checked_name(&e.link_name).map_err(|r| fail(r.to_string()))?;
                    if !names.contains(&target) {
                        return Err(fail(format!(
                            "hardlink to {:?}, which is not an earlier entry of the layer",
                            e.link_name
                        )));
                    }
                    target
                }
                EntryType::Symlink => {
                    if e.link_name.is_empty() || e.link_name.contains('\0') {
                        return Err(fail("symlink without a target".into()));
                    }
                    e.link_name.clone()
                }
                _ => String::new(),
            };
            let mut digest = None;
            let mut range = None;
            if kind == EntryType::Reg && size > 0 {
                let d: Digest = e.digest.parse().map_err(|_| {
                    fail(format!(
                        "regular file without a sha256 digest ({:?})",
                        e.digest
                    ))
                })?;
                if frames == Frames::Gzip {
                    if e.inner_offset != 0 {
                        return Err(fail(
                            "chunks that share a gzip member (innerOffset) are not supported"
                                .into(),
                        ));
                    }
                    gz_starts.push((entries.len(), num(e.offset, "offset")?, 0, index));
                }
                let (start, end) = match frames {
                    Frames::Zstd => (num(e.offset, "offset")?, num(e.end_offset, "endOffset")?),
                    // the end is known once the next start is
                    Frames::Gzip => (num(e.offset, "offset")?, data_end),
                };
                if start >= end || end > data_end {
                    return Err(fail(format!(
                        "content range {start}..{end} is not inside the blob's data (0..{data_end})"
                    )));
                }
                if start < last_end {
                    return Err(fail(format!(
                        "content range {start}..{end} overlaps the file before it"
                    )));
                }
                if frames == Frames::Zstd {
                    last_end = end;
                }
                digest = Some(d);
                range = Some((start, end));
            }
            let chunks = match range {
                Some((start, end)) => vec![Chunk { start, end, size }],
                None => Vec::new(),
            };
            let mut xattrs = Vec::with_capacity(e.xattrs.len());
            for (k, v) in &e.xattrs {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|_| fail(format!("xattr {k:?} is not base64")))?;
                if k.is_empty() || k.contains('\0') {
                    return Err(fail("xattr without a name".into()));
                }
                xattrs.push((k.clone(), value));
            }
            let time = |t: &str, what: &str| match t {
                "" => Ok(None),
                t => {
                    let parsed = chrono::DateTime::parse_from_rfc3339(t)
                        .map_err(|_| fail(format!("{what} {t:?} is not RFC 3339")))?;
                    Ok(Some((parsed.timestamp(), parsed.timestamp_subsec_nanos())))
                }
            };
            let mtime = time(&e.modtime, "modtime")?;
            let atime = time(&e.accesstime, "accesstime")?;
            names.insert(name.clone());
            entries.push(Entry {
                kind,
                name,
                link_name,
                mode,
                size,
                uid: id(e.uid, "uid")?,
                gid: id(e.gid, "gid")?,
                mtime,
                atime,
                device: (id(e.dev_major, "devMajor")?, id(e.dev_minor, "devMinor")?),
                xattrs,
                digest,
                range,
                chunks,
            });
        }
        if frames == Frames::Gzip {
            gzip_chunks(&mut entries, &gz_starts, data_end)?;
        }
        Ok(Toc {
            entries,
            tar_split_digest,
            frames,
            trailer: None,
        })
    }
}

/// The chunks of eStargz files from their starts: each ends where the next starts (the
/// last at `data_end`), and holds the file's bytes up to the next chunk's offset.
fn gzip_chunks(
    entries: &mut [Entry],
    starts: &[(usize, u64, u64, usize)],
    data_end: u64,
) -> Result<(), TocError> {
    for e in entries.iter_mut() {
        e.chunks.clear();
    }
    for (i, &(entry, start, chunk_offset, index)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map(|s| s.1).unwrap_or(data_end);
        let e = &mut entries[entry];
        let fail = |reason: String| TocError::Entry {
            index,
            name: e.name.clone(),
            reason,
        };
        if end <= start || end > data_end {
            return Err(fail(format!(
                "chunk at {start} does not end before the next one or the TOC ({end})"
            )));
        }
        let next_offset = match starts.get(i + 1) {
            Some(n) if n.0 == entry => n.2,
            _ => e.size,
        };
        let expected: u64 = e.chunks.iter().map(|c| c.size).sum();
        if chunk_offset != expected || next_offset <= chunk_offset {
            return Err(fail(format!(
                "chunk at file offset {chunk_offset} does not follow the one before it"
            )));
        }
        e.chunks.push(Chunk {
            start,
            end,
            size: next_offset - chunk_offset,
        });
        let first = e.chunks[0].start;
        e.range = Some((first, end));
    }
    for e in entries.iter() {
        if e.range.is_some() && e.chunks.iter().map(|c| c.size).sum::<u64>() != e.size {
            return Err(TocError::Entry {
                index: 0,
                name: e.name.clone(),
                reason: "its chunks do not add up to its size".into(),
            });
        }
    }
    Ok(())
}

/// The name without leading `/` or `./` and trailing `/`.
pub(crate) fn normalise(name: &str) -> String {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("./") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix('/') {
            n = rest;
        } else {
            break;
        }
    }
    n.trim_end_matches('/').to_string()
}

/// A name every component of which is plain: no `..`, no NUL, not the root.
pub(crate) fn checked_name(name: &str) -> Result<String, &'static str> {
    if name.contains('\0') {
        return Err("name contains a NUL byte");
    }
    let n = normalise(name);
    if n.is_empty() || n == "." {
        return Err("names the layer's root");
    }
    if n.split('/').any(|c| c == "..") {
        return Err("name climbs out of the layer (..)");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const D: &str = "sha256:aa24589ee4f7527d100b2264c544487149a6a7abfba58662d1f47c8f9ca4f509";

    #[test]
    fn both_generations_of_annotations_are_read_and_bad_ones_refused() {
        let old = ann(&[
            (
                "io.containers.zstd-chunked.manifest-position",
                "5258252:5721:29690:1",
            ),
            ("io.containers.zstd-chunked.manifest-checksum", D),
        ]);
        let l = ChunkedLayer::from_annotations(&old).unwrap().unwrap();
        assert_eq!(l.toc.offset, 5258252);
        assert_eq!(l.toc.end(), 5258252 + 5721);
        assert_eq!(l.tar_split, None);
        let new = ann(&[
            (
                "io.github.containers.zstd-chunked.manifest-position",
                "10:20:30:1",
            ),
            ("io.github.containers.zstd-chunked.manifest-checksum", D),
            (
                "io.github.containers.zstd-chunked.tarsplit-position",
                "30:5:50",
            ),
        ]);
        let l = ChunkedLayer::from_annotations(&new).unwrap().unwrap();
        assert_eq!(
            l.tar_split,
            Some(BlobRange {
                offset: 30,
                length: 5,
                uncompressed: 50
            })
        );
        assert!(ChunkedLayer::from_annotations(&ann(&[])).unwrap().is_none());
        for bad in ["1:2:3", "1:2:3:2", "a:2:3:1", "1:0:3:1"] {
            let a = ann(&[
                ("io.github.containers.zstd-chunked.manifest-position", bad),
                ("io.github.containers.zstd-chunked.manifest-checksum", D),
            ]);
            let e = ChunkedLayer::from_annotations(&a).unwrap_err();
            assert!(e.to_string().contains("manifest-position"), "{e}");
        }
    }

    fn toc(entries: &str) -> String {
        format!(r#"{{"version":1,"entries":[{entries}]}}"#)
    }

    #[test]
    fn a_toc_is_parsed_with_chunks_folded_into_their_file() {
        let d = D.trim_start_matches("sha256:");
        let json = toc(&format!(
            r#"{{"type":"dir","name":"./etc/","mode":493,"modtime":"2024-01-02T03:04:05.5Z"}},
               {{"type":"reg","name":"etc/a","mode":420,"size":9,"uid":1,"gid":2,"digest":"sha256:{d}","offset":10,"endOffset":20,
                 "xattrs":{{"user.k":"dg=="}}}},
               {{"type":"chunk","name":"etc/a","offset":15,"chunkOffset":4}},
               {{"type":"reg","name":"etc/empty"}},
               {{"type":"hardlink","name":"etc/b","linkName":"etc/a"}},
               {{"type":"symlink","name":"etc/c","linkName":"../x"}}"#
        ));
        let t = Toc::parse(json.as_bytes(), 100).unwrap();
        assert_eq!(t.entries.len(), 5);
        assert_eq!(t.entries[0].name, "etc");
        assert_eq!(t.entries[0].mtime, Some((1704164645, 500_000_000)));
        assert_eq!(t.entries[1].range, Some((10, 20)));
        assert_eq!(t.entries[1].xattrs, vec![("user.k".into(), b"v".to_vec())]);
        assert_eq!(t.entries[2].digest, None);
        assert_eq!(t.entries[3].link_name, "etc/a");
        assert_eq!(t.entries[4].link_name, "../x");
    }

    #[test]
    fn hostile_tocs_are_refused_naming_the_entry() {
        let d = D.trim_start_matches("sha256:");
        let reg = |name: &str, range: (i64, i64)| {
            format!(
                r#"{{"type":"reg","name":"{name}","size":1,"digest":"sha256:{d}","offset":{},"endOffset":{}}}"#,
                range.0, range.1
            )
        };
        let cases = [
            (reg("../etc/passwd", (1, 2)), "climbs out"),
            (reg("a/../../b", (1, 2)), "climbs out"),
            (reg("/", (1, 2)), "root"),
            (reg("a", (5, 200)), "not inside"),
            (reg("a", (5, 5)), "not inside"),
            (
                format!("{},{}", reg("a", (5, 9)), reg("b", (8, 10))),
                "overlaps",
            ),
            (
                r#"{"type":"hardlink","name":"a","linkName":"etc/shadow"}"#.to_string(),
                "not an earlier entry",
            ),
            (
                r#"{"type":"hardlink","name":"a","linkName":"../../x"}"#.to_string(),
                "climbs out",
            ),
            (
                r#"{"type":"reg","name":"a","size":3}"#.to_string(),
                "without a sha256",
            ),
            (r#"{"type":"chunk","name":"a"}"#.to_string(), "no file"),
            (
                r#"{"type":"sock","name":"a"}"#.to_string(),
                "unknown entry type",
            ),
            (
                r#"{"type":"reg","name":"a","uid":-1}"#.to_string(),
                "out of range",
            ),
        ];
        for (entries, want) in cases {
            let e = Toc::parse(toc(&entries).as_bytes(), 100).unwrap_err();
            assert!(e.to_string().contains(want), "{entries}: {e}");
        }
        assert!(matches!(
            Toc::parse(b"{\"version\":1,", 100),
            Err(TocError::Json(_))
        ));
    }

    #[test]
    fn a_toc_whose_bytes_do_not_match_the_manifest_is_refused() {
        let json = toc("");
        let z = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let good = Digest::of(&z);
        assert_eq!(
            decompress_verified("TOC", &z, &good, 1 << 20).unwrap(),
            json.as_bytes()
        );
        let e = decompress_verified("TOC", &z, &Digest::of(b"x"), 1 << 20).unwrap_err();
        assert!(matches!(e, TocError::Digest { .. }), "{e}");
        let e = decompress_verified("TOC", &z, &good, 4).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
