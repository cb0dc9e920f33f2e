//! A committed layer's manifest: which object backs each regular file.
//!
//! Text, one line per stub, compressed as one zstd frame (with its checksum), so it can
//! be read with standard tools (`zstdcat manifest`):
//!
//! ```text
//! cas-manifest v1
//! <sha256 hex> <size> <path relative to fs/, %XX-escaped>
//! ```
//!
//! Bytes of the path that are control characters, space, `%`, or not ASCII are written as
//! `%XX`, so any Linux file name round-trips. Hardlinked names each get a line. The file
//! is written to a temporary name, fsynced and renamed into place, so a reader never sees
//! a partial manifest. Reading streams line by line: memory stays bounded.
//!
//! Compression: the digests are random, but the sizes and paths are not, and a layer's
//! manifest is a third of the metadata it adds to the store besides its image. zstd's
//! fastest level takes a Debian base's manifest (5,217 lines) from 569 KB to 231 KB,
//! its slowest only to 216 KB. Manifests written before (layout versions 1 to 4) are
//! the same text uncompressed; a reader takes both, told apart by zstd's magic number.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::error::CasError;

const HEADER: &str = "cas-manifest v1";
/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// zstd's level for manifests: its fastest, as good as any here (see the module docs).
const LEVEL: i32 = 1;

/// One regular file of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Path relative to the layer root.
    pub path: PathBuf,
    /// The object holding its bytes.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

fn escape(path: &Path, out: &mut Vec<u8>) {
    for &b in path.as_os_str().as_bytes() {
        if b <= b' ' || b >= 0x7f || b == b'%' {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
}

fn unescape(s: &str) -> Option<PathBuf> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(OsStr::from_bytes(&out)))
}

/// Writes a manifest durably.
pub struct ManifestWriter {
    out: zstd::stream::write::Encoder<'static, BufWriter<File>>,
    tmp: PathBuf,
    target: PathBuf,
    line: Vec<u8>,
}

impl ManifestWriter {
    /// Starts writing the manifest that will end up at `target`.
    pub fn create(target: &Path) -> Result<ManifestWriter, CasError> {
        let tmp = target.with_extension("tmp");
        let file = File::create(&tmp).map_err(CasError::io("create", &tmp))?;
        let mut out = zstd::stream::write::Encoder::new(BufWriter::new(file), LEVEL)
            .map_err(CasError::io("compress", &tmp))?;
        out.include_checksum(true)
            .map_err(CasError::io("compress", &tmp))?;
        let mut w = ManifestWriter {
            out,
            tmp,
            target: target.to_path_buf(),
            line: Vec::new(),
        };
        writeln!(w.out, "{HEADER}").map_err(CasError::io("write", &w.tmp))?;
        Ok(w)
    }

    /// Appends one entry.
    pub fn push(&mut self, entry: &ManifestEntry) -> Result<(), CasError> {
        self.line.clear();
        self.line
            .extend_from_slice(format!("{} {} ", entry.digest.hex(), entry.size).as_bytes());
        escape(&entry.path, &mut self.line);
        self.line.push(b'\n');
        self.out
            .write_all(&self.line)
            .map_err(CasError::io("write", &self.tmp))
    }

    /// Flushes, fsyncs and renames the manifest into place.
    pub fn finish(self) -> Result<(), CasError> {
        let file = self
            .out
            .finish()
            .map_err(CasError::io("write", &self.tmp))?
            .into_inner()
            .map_err(|e| CasError::io("write", &self.tmp)(e.into_error()))?;
        file.sync_all().map_err(CasError::io("fsync", &self.tmp))?;
        fs::rename(&self.tmp, &self.target).map_err(CasError::io("rename", &self.target))?;
        if let Some(dir) = self.target.parent() {
            ringio::durable::fsync_dir(dir)?;
        }
        Ok(())
    }
}

impl ManifestWriter {
    /// Drops the manifest being written: nothing appears at the target.
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The distinct objects the manifest at `path` names, with their sizes, sorted by digest
/// (the order the index takes and drops references in).
pub fn distinct_objects(path: &Path) -> Result<Vec<(crate::Digest, u64)>, CasError> {
    let mut set = std::collections::BTreeMap::new();
    for entry in read_manifest(path)? {
        let entry = entry?;
        set.insert(entry.digest, entry.size);
    }
    Ok(set.into_iter().collect())
}

/// Streams the entries of the manifest at `path`.
pub fn read_manifest(
    path: &Path,
) -> Result<impl Iterator<Item = Result<ManifestEntry, CasError>>, CasError> {
    let file = File::open(path).map_err(CasError::io("open", path))?;
    let mut raw = BufReader::new(file);
    let start = raw.fill_buf().map_err(CasError::io("read", path))?;
    let text: Box<dyn BufRead + Send> = if start.starts_with(&ZSTD_MAGIC) {
        let decoder = zstd::stream::read::Decoder::with_buffer(raw)
            .map_err(CasError::io("decompress", path))?;
        Box::new(BufReader::new(decoder))
    } else {
        Box::new(raw)
    };
    let path = path.to_path_buf();
    let mut lines = text.lines().enumerate();
    let bad = |path: &Path, line: usize, reason: String| CasError::Manifest {
        path: path.to_path_buf(),
        line,
        reason,
    };
    match lines.next() {
        Some((_, Ok(h))) if h == HEADER => {}
        Some((_, Ok(h))) => return Err(bad(&path, 1, format!("unknown header {h:?}"))),
        Some((_, Err(e))) => return Err(CasError::io("read", &path)(e)),
        None => return Err(bad(&path, 1, "empty file".into())),
    }
    Ok(lines.map(move |(i, line)| {
        let n = i + 1;
        let line = line.map_err(CasError::io("read", &path))?;
        let mut parts = line.splitn(3, ' ');
        let (Some(d), Some(s), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(&path, n, "expected `<digest> <size> <path>`".into()));
        };
        let digest = d.parse().map_err(|e| bad(&path, n, format!("{e}")))?;
        let size = s
            .parse()
            .map_err(|_| bad(&path, n, format!("bad size {s:?}")))?;
        let p = unescape(p).ok_or_else(|| bad(&path, n, format!("bad escape in {p:?}")))?;
        Ok(ManifestEntry {
            path: p,
            digest,
            size,
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("manifest");
        let names: Vec<PathBuf> = vec![
            "etc/passwd".into(),
            "a b/c%d".into(),
            "new\nline".into(),
            PathBuf::from(OsStr::from_bytes(b"bin/\xff\xfe")),
            "ünï/cødé".into(),
        ];
        let mut w = ManifestWriter::create(&target).unwrap();
        for (i, p) in names.iter().enumerate() {
            w.push(&ManifestEntry {
                path: p.clone(),
                digest: Digest::of(p.as_os_str().as_bytes()),
                size: i as u64,
            })
            .unwrap();
        }
        w.finish().unwrap();
        assert!(!target.with_extension("tmp").exists());
        // one zstd frame holding the text
        let raw = fs::read(&target).unwrap();
        assert!(raw.starts_with(&ZSTD_MAGIC));
        let text = zstd::decode_all(&raw[..]).unwrap();
        assert!(text.starts_with(format!("{HEADER}\n").as_bytes()));
        assert_eq!(
            text.iter().filter(|&&b| b == b'\n').count(),
            names.len() + 1
        );
        let back: Vec<_> = read_manifest(&target)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(back.len(), names.len());
        for (i, e) in back.iter().enumerate() {
            assert_eq!(e.path, names[i]);
            assert_eq!(e.size, i as u64);
            assert_eq!(e.digest, Digest::of(names[i].as_os_str().as_bytes()));
        }
    }

    /// Layout versions 1 to 4 wrote the same text uncompressed.
    #[test]
    fn uncompressed_manifests_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let d = Digest::of(b"x");
        fs::write(
            &p,
            format!("{HEADER}\n{} 1 etc/a%20b\n{} 1 c\n", d.hex(), d.hex()),
        )
        .unwrap();
        let back: Vec<_> = read_manifest(&p).unwrap().map(Result::unwrap).collect();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].path, PathBuf::from("etc/a b"));
        assert_eq!(back[1].digest, d);
        assert_eq!(distinct_objects(&p).unwrap(), vec![(d, 1)]);
    }

    /// A damaged compressed manifest is an error, never a shorter list: the frame's
    /// checksum covers every byte.
    #[test]
    fn a_damaged_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let mut w = ManifestWriter::create(&p).unwrap();
        for i in 0..200u64 {
            let path = PathBuf::from(format!("usr/lib/file-{i}"));
            w.push(&ManifestEntry {
                digest: Digest::of(path.as_os_str().as_bytes()),
                path,
                size: i,
            })
            .unwrap();
        }
        w.finish().unwrap();
        let good = fs::read(&p).unwrap();
        for at in [good.len() / 2, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&p, &bad).unwrap();
            let read = read_manifest(&p).and_then(|it| it.collect::<Result<Vec<_>, _>>());
            assert!(
                read.is_err(),
                "byte {at} flipped, read {:?}",
                read.map(|v| v.len())
            );
        }
        // and cut short
        fs::write(&p, &good[..good.len() - 10]).unwrap();
        let read = read_manifest(&p).and_then(|it| it.collect::<Result<Vec<_>, _>>());
        assert!(read.is_err());
    }

    #[test]
    fn reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        fs::write(&p, "cas-manifest v1\nnot-a-digest 1 x\n").unwrap();
        let err = read_manifest(&p).unwrap().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        fs::write(&p, "something else\n").unwrap();
        assert!(read_manifest(&p).is_err());
    }
}
