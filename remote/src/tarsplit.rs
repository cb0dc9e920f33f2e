//! tar-split: the bytes of a tar stream other than its files' contents.
//!
//! vbatts/tar-split records a tar archive as newline-delimited JSON: segments
//! (`"type":2`, the raw bytes of headers, padding and the end-of-archive blocks, in
//! base64) and files (`"type":1`, a name and a size, whose content is elsewhere). The
//! segments and the contents, in order, are the archive byte for byte, so its sha256 is
//! the layer's diffID. zstd:chunked layers carry one, zstd-compressed, after their TOC.

use base64::Engine as _;
use serde::Deserialize;

/// One item of a tar-split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Raw archive bytes.
    Segment(Vec<u8>),
    /// A file's content: `size` bytes of the entry named `name`.
    File {
        /// The entry's name as archived.
        name: String,
        /// Its content's size.
        size: u64,
    },
}

/// Why a tar-split was refused.
#[derive(Debug, thiserror::Error)]
#[error("tar-split line {line}: {reason}")]
pub struct TarSplitError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Deserialize)]
struct RawItem {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    payload: Option<String>,
}

/// Parses a whole (decompressed) tar-split.
pub fn parse(data: &[u8]) -> Result<Vec<Item>, TarSplitError> {
    let mut items = Vec::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fail = |reason: String| TarSplitError {
            line: i + 1,
            reason,
        };
        let raw: RawItem = serde_json::from_slice(line).map_err(|e| fail(e.to_string()))?;
        let b64 = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| fail("payload is not base64".into()))
        };
        match raw.kind {
            1 => {
                let name = match (raw.name, raw.name_raw) {
                    (Some(n), _) if !n.is_empty() => n,
                    (_, Some(r)) => String::from_utf8(b64(&r)?)
                        .map_err(|_| fail("a name that is not UTF-8".into()))?,
                    _ => return Err(fail("a file without a name".into())),
                };
                let size = u64::try_from(raw.size).map_err(|_| fail("a negative size".into()))?;
                items.push(Item::File { name, size });
            }
            2 => {
                let bytes = match raw.payload {
                    Some(p) => b64(&p)?,
                    None => Vec::new(),
                };
                items.push(Item::Segment(bytes));
            }
            k => return Err(fail(format!("unknown item type {k}"))),
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_files_are_read_and_malformed_lines_refused() {
        let data = br#"{"type":2,"payload":"YWJj","position":0}
{"type":1,"name":"etc/a","size":3,"payload":"AAAAAAAAAAA=","position":1}
{"type":1,"name_raw":"ZXRjL2I=","size":0,"payload":null,"position":2}
{"type":2,"payload":null,"position":3}
"#;
        let items = parse(data).unwrap();
        assert_eq!(
            items,
            vec![
                Item::Segment(b"abc".to_vec()),
                Item::File {
                    name: "etc/a".into(),
                    size: 3
                },
                Item::File {
                    name: "etc/b".into(),
                    size: 0
                },
                Item::Segment(Vec::new()),
            ]
        );
        for (bad, want) in [
            (&br#"{"type":3}"#[..], "unknown item type"),
            (br#"{"type":1,"size":3}"#, "without a name"),
            (br#"{"type":1,"name":"a","size":-3}"#, "negative"),
            (br#"{"type":2,"payload":"!!"}"#, "base64"),
            (br#"{"type":2"#, "line 1"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
    }
}
