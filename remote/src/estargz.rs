//! eStargz layers: a gzip tar whose files' contents start gzip members of their own,
//! with the TOC as the archive's last entry.
//!
//! The blob ends with a 51-byte footer, an empty gzip member whose extra field holds
//! the TOC member's offset (`%016x` then `STARGZ`; 47 bytes in the legacy stargz
//! footer). That member is a tar of one entry, `stargz.index.json` (the TOC, JSON),
//! and the end-of-archive blocks. Its digest, the sha256 of the JSON, is the layer
//! annotation `containerd.io/snapshot/stargz/toc.digest`, which containerd passes to
//! Prepare as a label. eStargz has no tar-split: a layer is checked against its TOC.
//!
//! A full pull unpacks the TOC entry too (`/stargz.index.json`), and the landmark
//! files (`.prefetch.landmark`, `.no.prefetch.landmark`) are ordinary entries: the
//! stream keeps the TOC member's tar as its own end ([`crate::toc::Toc::trailer`]), so
//! the tree is the full pull's.

use std::io::Read;

use cas::Digest;

use crate::toc::{Frames, Toc, TocError, MAX_TOC_BYTES};

/// The layer annotation (and Prepare label) with the TOC's digest.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The footer's size.
pub const FOOTER_SIZE: u64 = 51;
/// The legacy stargz footer's size.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// The name of the TOC's entry.
pub const TOC_NAME: &str = "stargz.index.json";

fn bad(reason: impl Into<String>) -> TocError {
    TocError::Decompress {
        what: "eStargz footer",
        reason: reason.into(),
    }
}

/// The TOC member's offset and the footer's size, from the blob's last
/// [`FOOTER_SIZE`] bytes (`tail`; fewer for a tiny blob).
pub fn toc_offset(tail: &[u8]) -> Result<(u64, u64), TocError> {
    let parse = |f: &[u8], hex_at: usize| -> Option<u64> {
        if f.len() < hex_at + 22 || f[0..3] != [0x1f, 0x8b, 0x08] || f[3] & 0x04 == 0 {
            return None;
        }
        let hex = std::str::from_utf8(&f[hex_at..hex_at + 16]).ok()?;
        if &f[hex_at + 16..hex_at + 22] != b"STARGZ" {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    };
    if tail.len() as u64 >= FOOTER_SIZE {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if f[12..14] == *b"SG" {
            if let Some(o) = parse(f, 16) {
                return Ok((o, FOOTER_SIZE));
            }
        }
    }
    if tail.len() as u64 >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if let Some(o) = parse(f, 12) {
            return Ok((o, LEGACY_FOOTER_SIZE));
        }
    }
    Err(bad("no eStargz footer at the end of the blob"))
}

/// Reads the TOC member (the blob's bytes from the TOC's offset to the footer),
/// checks the JSON against `expected` and parses it; the member's tar becomes the
/// stream's end.
pub fn parse_toc_member(
    member: &[u8],
    expected: &Digest,
    toc_offset: u64,
) -> Result<Toc, TocError> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(member)
        .take(MAX_TOC_BYTES + (64 << 10))
        .read_to_end(&mut tar)
        .map_err(|e| TocError::Decompress {
            what: "TOC",
            reason: e.to_string(),
        })?;
    let mut json = None;
    let mut archive = tar::Archive::new(&tar[..]);
    let entries = archive.entries().map_err(|e| TocError::Decompress {
        what: "TOC",
        reason: e.to_string(),
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|e| TocError::Decompress {
            what: "TOC",
            reason: e.to_string(),
        })?;
        if entry.path_bytes().as_ref() == TOC_NAME.as_bytes() {
            let mut j = Vec::new();
            entry
                .read_to_end(&mut j)
                .map_err(|e| TocError::Decompress {
                    what: "TOC",
                    reason: e.to_string(),
                })?;
            json = Some(j);
        }
    }
    let json = json.ok_or_else(|| TocError::Decompress {
        what: "TOC",
        reason: format!("the TOC member holds no {TOC_NAME}"),
    })?;
    let actual = Digest::of(&json);
    if actual != *expected {
        return Err(TocError::Digest {
            what: "TOC",
            expected: *expected,
            actual,
        });
    }
    let mut toc = Toc::parse_as(&json, toc_offset, Frames::Gzip)?;
    toc.trailer = Some(tar);
    Ok(toc)
}
