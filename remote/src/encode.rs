//! A zstd:chunked writer, for the tests and benchmarks of partial pulls.
//!
//! It writes the layout containers/storage writes (see [`crate::toc`]): every regular
//! file's content in zstd frames of its own, the tar's other bytes in frames between
//! them, then the TOC, the tar-split and the 64-byte footer as skippable frames. The
//! annotations it returns are the ones a producer puts on the layer descriptor.
//! Large files are one run of frames, not content-defined chunks.

use std::collections::BTreeMap;
use std::io::{self, Read};

use base64::Engine as _;
use cas::Digest;
use serde_json::json;

/// The magic of a zstd skippable frame (little-endian).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// The footer's magic.
const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";

/// A written layer.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The blob.
    pub blob: Vec<u8>,
    /// The layer descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The digest of the uncompressed tar (the diffID).
    pub diff_id: Digest,
}

/// What to write besides the contents.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Write the tar-split (and its digest in the TOC).
    pub tar_split: bool,
    /// Use the annotation names of producers before containers/storage 1.44.
    pub old_annotations: bool,
    /// zstd level.
    pub level: i32,
    /// Changes the TOC before it is written (bad input for tests); the annotations
    /// describe what is written.
    pub mangle_toc: Option<fn(&mut serde_json::Value)>,
    /// Changes the tar-split before it is written.
    pub mangle_tar_split: Option<fn(&mut Vec<u8>)>,
    /// Gives the manifest a TOC checksum that is not the TOC's.
    pub wrong_toc_checksum: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tar_split: true,
            old_annotations: false,
            level: 3,
            mangle_toc: None,
            mangle_tar_split: None,
            wrong_toc_checksum: false,
        }
    }
}

fn skippable(out: &mut Vec<u8>, data: &[u8]) -> u64 {
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let at = out.len() as u64;
    out.extend_from_slice(data);
    at
}

fn frame(out: &mut Vec<u8>, data: &[u8], level: i32) -> io::Result<()> {
    if !data.is_empty() {
        out.extend_from_slice(&zstd::bulk::compress(data, level)?);
    }
    Ok(())
}

fn rfc3339(secs: i64, nanos: u32) -> String {
    chrono::DateTime::from_timestamp(secs, nanos)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Whose TOC an entry is written for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Producer {
    /// containers/storage: names as archived, times to the nanosecond.
    ZstdChunked,
    /// stargz: names without a trailing `/`, times to the second.
    Estargz,
}

/// The TOC entry of a tar entry (without its content fields) and its content size;
/// `None` for entries a TOC does not list (pax and GNU extension headers).
fn toc_entry(
    entry: &mut tar::Entry<'_, &[u8]>,
    producer: Producer,
) -> io::Result<Option<(serde_json::Value, u64)>> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let h = entry.header().clone();
    let mut name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if producer == Producer::Estargz {
        name = name.trim_end_matches('/').to_string();
    }
    let link = entry
        .link_name_bytes()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default();
    let mut mtime = (h.mtime()? as i64, 0u32);
    let mut xattrs = serde_json::Map::new();
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key().unwrap_or_default();
            if key == "mtime" && producer == Producer::ZstdChunked {
                let v = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                let (s, f) = v.split_once('.').unwrap_or((&v, ""));
                let nanos = format!("{f:0<9}");
                mtime = (s.parse().unwrap_or(0), nanos[..9].parse().unwrap_or(0));
            } else if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.insert(x.to_string(), json!(b64(ext.value_bytes())));
            }
        }
    }
    let kind = match h.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
        tar::EntryType::Directory => "dir",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hardlink",
        tar::EntryType::Char => "char",
        tar::EntryType::Block => "block",
        tar::EntryType::Fifo => "fifo",
        _ => return Ok(None),
    };
    let size = if kind == "reg" { h.size()? } else { 0 };
    let mut e = json!({
        "type": kind, "name": name, "mode": h.mode()?,
        "uid": h.uid()?, "gid": h.gid()?, "modtime": rfc3339(mtime.0, mtime.1),
    });
    if !link.is_empty() {
        e["linkName"] = json!(link);
    }
    if !xattrs.is_empty() {
        e["xattrs"] = serde_json::Value::Object(xattrs);
    }
    if kind == "char" || kind == "block" {
        e["devMajor"] = json!(h.device_major().ok().flatten().unwrap_or(0));
        e["devMinor"] = json!(h.device_minor().ok().flatten().unwrap_or(0));
    }
    Ok(Some((e, size)))
}

/// Writes the uncompressed layer `tar` as zstd:chunked.
pub fn encode(tar: &[u8], opts: Options) -> io::Result<Encoded> {
    let mut blob = Vec::new();
    let mut entries = Vec::new();
    let mut split = Vec::new();
    let mut cursor = 0usize;
    let mut position = 0u64;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let segment = |split: &mut Vec<u8>, bytes: &[u8], position: &mut u64| {
        let line = json!({"type": 2, "payload": b64(bytes), "position": *position});
        split.extend_from_slice(line.to_string().as_bytes());
        split.push(b'\n');
        *position += 1;
    };
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some((mut e, size)) = toc_entry(&mut entry, Producer::ZstdChunked)? else {
            continue;
        };
        let name = e["name"].as_str().unwrap_or_default().to_string();
        if size > 0 {
            let start = entry.raw_file_position() as usize;
            let mut content = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut content)?;
            frame(&mut blob, &tar[cursor..start], opts.level)?;
            segment(&mut split, &tar[cursor..start], &mut position);
            let offset = blob.len() as u64;
            frame(&mut blob, &content, opts.level)?;
            e["size"] = json!(size);
            e["digest"] = json!(format!("sha256:{}", Digest::of(&content).hex()));
            e["offset"] = json!(offset);
            e["endOffset"] = json!(blob.len() as u64);
            let line = json!({"type": 1, "name": name, "size": size,
                "payload": b64(&[0u8; 8]), "position": position});
            split.extend_from_slice(line.to_string().as_bytes());
            split.push(b'\n');
            position += 1;
            cursor = start + size as usize;
        } else {
            let line = json!({"type": 1, "name": name, "size": 0, "payload": null,
                "position": position});
            split.extend_from_slice(line.to_string().as_bytes());
            split.push(b'\n');
            position += 1;
        }
        entries.push(e);
    }
    frame(&mut blob, &tar[cursor..], opts.level)?;
    segment(&mut split, &tar[cursor..], &mut position);

    if let Some(m) = opts.mangle_tar_split {
        m(&mut split);
    }
    let split_z = zstd::bulk::compress(&split, opts.level)?;
    let mut toc = json!({"version": 1, "entries": entries});
    if let Some(m) = opts.mangle_toc {
        m(&mut toc);
    }
    if opts.tar_split {
        toc["tarSplitDigest"] = json!(format!("sha256:{}", Digest::of(&split_z).hex()));
    }
    let toc_json = toc.to_string();
    let toc_z = zstd::bulk::compress(toc_json.as_bytes(), opts.level)?;
    let toc_at = skippable(&mut blob, &toc_z);
    let split_at = if opts.tar_split {
        skippable(&mut blob, &split_z)
    } else {
        0
    };
    let mut footer = Vec::with_capacity(64);
    for v in [
        toc_at,
        toc_z.len() as u64,
        toc_json.len() as u64,
        1,
        split_at,
        if opts.tar_split {
            split_z.len() as u64
        } else {
            0
        },
        if opts.tar_split {
            split.len() as u64
        } else {
            0
        },
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(FOOTER_MAGIC);
    skippable(&mut blob, &footer);

    let prefix = if opts.old_annotations {
        crate::toc::ANNOTATION_PREFIXES[1]
    } else {
        crate::toc::ANNOTATION_PREFIXES[0]
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(
        format!("{prefix}manifest-position"),
        format!("{toc_at}:{}:{}:1", toc_z.len(), toc_json.len()),
    );
    annotations.insert(
        format!("{prefix}manifest-checksum"),
        format!(
            "sha256:{}",
            if opts.wrong_toc_checksum {
                Digest::of(b"another TOC").hex()
            } else {
                Digest::of(&toc_z).hex()
            }
        ),
    );
    if opts.tar_split {
        annotations.insert(
            format!("{prefix}tarsplit-position"),
            format!("{split_at}:{}:{}", split_z.len(), split.len()),
        );
    }
    Ok(Encoded {
        blob,
        annotations,
        diff_id: Digest::of_reader(tar)?.0,
    })
}

/// A written eStargz layer.
#[derive(Debug, Clone)]
pub struct EncodedEstargz {
    /// The blob.
    pub blob: Vec<u8>,
    /// The layer descriptor's annotations (the TOC digest).
    pub annotations: BTreeMap<String, String>,
    /// The digest of the uncompressed blob (the diffID).
    pub diff_id: Digest,
}

/// `data` as one gzip member (for tests that damage a layer).
pub fn gzip_member_for_tests(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    gzip_member(&mut v, data).expect("in memory");
    v
}

fn gzip_member(out: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    if data.is_empty() {
        return Ok(());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data)?;
    out.extend_from_slice(&gz.finish()?);
    Ok(())
}

/// Writes the uncompressed layer `tar` as eStargz (as the stargz-snapshotter's writer
/// lays it out): each chunk of at most `chunk_size` content bytes a gzip member of its
/// own, headers and padding in members between them, then the TOC entry's member and
/// the 51-byte footer.
pub fn encode_estargz(tar: &[u8], chunk_size: u64) -> io::Result<EncodedEstargz> {
    let mut blob = Vec::new();
    let mut entries = Vec::new();
    let mut cursor = 0usize;
    let mut end_of_entries = 0usize;
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some((mut e, size)) = toc_entry(&mut entry, Producer::Estargz)? else {
            continue;
        };
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let start = entry.raw_file_position() as usize;
        let mut content = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut content)?;
        if size == 0 {
            entries.push(e);
            end_of_entries = start;
            continue;
        }
        gzip_member(&mut blob, &tar[cursor..start])?;
        e["size"] = json!(size);
        e["digest"] = json!(format!("sha256:{}", Digest::of(&content).hex()));
        let mut chunk_entries = Vec::new();
        for (i, chunk) in content.chunks(chunk_size.max(1) as usize).enumerate() {
            let offset = blob.len() as u64;
            gzip_member(&mut blob, chunk)?;
            let chunk_offset = i as u64 * chunk_size;
            if i == 0 {
                e["offset"] = json!(offset);
                if content.len() as u64 > chunk_size {
                    e["chunkSize"] = json!(chunk.len());
                }
            } else {
                chunk_entries.push(json!({
                    "name": name, "type": "chunk", "offset": offset,
                    "chunkOffset": chunk_offset, "chunkSize": chunk.len(),
                }));
            }
        }
        entries.push(e);
        entries.extend(chunk_entries);
        cursor = start + size as usize;
        end_of_entries = cursor + ((512 - size as usize % 512) % 512);
    }
    // the entries' last bytes (headers of empty entries, padding); the end-of-archive
    // blocks come after the TOC entry
    gzip_member(&mut blob, &tar[cursor..end_of_entries.max(cursor)])?;
    let toc = json!({"version": 1, "entries": entries});
    let toc_json = serde_json::to_vec_pretty(&toc)?;
    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o444);
    h.set_size(toc_json.len() as u64);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    toc_tar.append_data(&mut h, crate::estargz::TOC_NAME, &toc_json[..])?;
    let toc_tar = toc_tar.into_inner()?;
    let toc_at = blob.len() as u64;
    gzip_member(&mut blob, &toc_tar)?;
    let mut footer = vec![
        0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_at:016x}STARGZ").as_bytes());
    footer.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    debug_assert_eq!(footer.len() as u64, crate::estargz::FOOTER_SIZE);
    blob.extend_from_slice(&footer);
    let mut uncompressed = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut uncompressed)?;
    let mut annotations = BTreeMap::new();
    annotations.insert(
        crate::estargz::TOC_DIGEST.to_string(),
        format!("sha256:{}", Digest::of(&toc_json).hex()),
    );
    Ok(EncodedEstargz {
        diff_id: Digest::of(&uncompressed),
        blob,
        annotations,
    })
}
