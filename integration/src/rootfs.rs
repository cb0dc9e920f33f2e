//! Layers from directories: a root filesystem, or the upper directory of an overlay
//! mount in which a build step ran (what `docker build` does for each `RUN`).
//!
//! The benchmark images are real Debian systems built by `debootstrap` and `apt`, so
//! their layers come from directories rather than from [`crate::fixture::Entry`] lists.
//! A layer is streamed: the tar goes through a digest (the config's diff_id), a gzip
//! encoder and a second digest (the blob's name) straight into the layout's
//! `blobs/sha256`, so memory stays small however big the tree is.
//!
//! Entries are written in name order, parents first, with the files' own mode, owner,
//! mtime (seconds, as image builders store it) and xattrs (PAX `SCHILY.xattr.*`).
//! Files sharing an inode become tar hardlinks. In an overlay upper directory
//! ([`DirKind::OverlayUpper`]) a 0/0 character device is a whiteout and becomes
//! `.wh.<name>`, and a directory with `trusted.overlay.opaque=y` gets a `.wh..wh..opq`
//! marker, as in containerd's own differ. `trusted.overlay.*` xattrs are never copied
//! into a layer.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::compression::{Compression, LayerCompression};
use crate::fixture::LayerBlob;

/// What a directory handed to [`write_dir_layer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// A complete root filesystem (a base layer).
    Rootfs,
    /// The upper directory of an overlay mount: whiteouts and opaque dirs are converted.
    OverlayUpper,
}

/// A writer that hashes what passes through it.
pub(crate) struct Hashing<W> {
    pub(crate) inner: W,
    pub(crate) hash: Sha256,
    pub(crate) len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        hash: Sha256::new(),
        len: 0,
    }
}

/// The stream a layer's tar is written into: hashed (the diffID), compressed, hashed
/// again (the blob's digest), buffered into a temporary file.
pub(crate) type TarSink = Hashing<crate::compression::Encoder<Hashing<BufWriter<File>>>>;

/// A layer blob being written into a layout's `blobs/sha256`, streaming: memory stays
/// small whatever the layer's size. [`BlobWriter::finish`] gives the blob its digest's
/// name.
pub(crate) struct BlobWriter {
    tmp: PathBuf,
    blobs: PathBuf,
    compression: Compression,
}

impl BlobWriter {
    /// A new blob in `blobs`, and the sink its tar goes into.
    pub(crate) fn create(blobs: &Path, compression: Compression) -> Result<(BlobWriter, TarSink)> {
        fs::create_dir_all(blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let tmp = blobs.join(format!(".layer-{}.tmp", std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let enc = compression.encoder(hashing(BufWriter::with_capacity(1 << 20, file)))?;
        let writer = BlobWriter {
            tmp,
            blobs: blobs.to_path_buf(),
            compression,
        };
        Ok((writer, hashing(enc)))
    }

    /// Ends the blob written into `sink`: synced, and named by its digest.
    pub(crate) fn finish(self, sink: TarSink) -> Result<LayerBlob> {
        let diff_id = format!("sha256:{}", hex::encode(sink.hash.finalize()));
        let blob_out = sink.inner.finish()?;
        let digest = format!("sha256:{}", hex::encode(blob_out.hash.finalize()));
        let size = blob_out.len;
        let file = blob_out.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&self.tmp, self.blobs.join(&digest["sha256:".len()..]))?;
        Ok(LayerBlob {
            digest,
            diff_id,
            size,
            compression: self.compression,
        })
    }
}

/// Writes the tree at `dir` as a gzip layer blob into `blobs` (a layout's
/// `blobs/sha256`) and returns its descriptor data.
pub fn write_dir_layer(dir: &Path, kind: DirKind, blobs: &Path) -> Result<LayerBlob> {
    write_dir_layer_as(dir, kind, blobs, Compression::Gzip)
}

/// [`write_dir_layer`] with another compression.
pub fn write_dir_layer_as(
    dir: &Path,
    kind: DirKind,
    blobs: &Path,
    compression: Compression,
) -> Result<LayerBlob> {
    let (blob, sink) = BlobWriter::create(blobs, compression)?;
    let mut tar = tar::Builder::new(sink);
    tar.follow_symlinks(false);
    append_tree(&mut tar, dir, kind).with_context(|| format!("archiving {}", dir.display()))?;
    blob.finish(tar.into_inner()?)
}

fn append_tree<W: Write>(tar: &mut tar::Builder<W>, root: &Path, kind: DirKind) -> Result<()> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root)?.to_path_buf();
        let md = fs::symlink_metadata(path)?;
        let ft = md.file_type();
        if kind == DirKind::OverlayUpper && ft.is_char_device() && md.rdev() == 0 {
            let name = rel.file_name().context("whiteout without a name")?;
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(name);
            let mut h = header(&md, tar::EntryType::Regular, 0);
            h.set_mode(0o644);
            tar.append_data(&mut h, rel.with_file_name(wh), io::empty())?;
            continue;
        }
        let xattrs = own_xattrs(path)?;
        if ft.is_file() && md.nlink() > 1 {
            if let Some(first) = links.get(&(md.dev(), md.ino())) {
                let mut h = header(&md, tar::EntryType::Link, 0);
                tar.append_link(&mut h, &rel, first)?;
                continue;
            }
            links.insert((md.dev(), md.ino()), rel.clone());
        }
        if !xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            tar.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        if ft.is_dir() {
            let mut h = header(&md, tar::EntryType::Directory, 0);
            tar.append_data(&mut h, &rel, io::empty())?;
            let opaque = xattr::get(path, "trusted.overlay.opaque")?;
            if kind == DirKind::OverlayUpper && opaque.as_deref() == Some(b"y") {
                let mut h = header(&md, tar::EntryType::Regular, 0);
                h.set_mode(0o644);
                tar.append_data(&mut h, rel.join(".wh..wh..opq"), io::empty())?;
            }
        } else if ft.is_file() {
            let mut h = header(&md, tar::EntryType::Regular, md.len());
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            tar.append_data(&mut h, &rel, f)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(path)?;
            let mut h = header(&md, tar::EntryType::Symlink, 0);
            tar.append_link(&mut h, &rel, target)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let mut h = header(&md, kind, 0);
            let rdev = md.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32)?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
            tar.append_data(&mut h, &rel, io::empty())?;
        } else if ft.is_fifo() {
            let mut h = header(&md, tar::EntryType::Fifo, 0);
            tar.append_data(&mut h, &rel, io::empty())?;
        }
        // Sockets are not part of an image (image builders skip them too).
    }
    Ok(())
}

fn header(md: &fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid().into());
    h.set_gid(md.gid().into());
    h.set_mtime(md.mtime().max(0) as u64);
    h.set_size(size);
    h
}

/// The entry's xattrs, without the overlay's own (`trusted.overlay.*`).
fn own_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path)? {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        if let Some(v) = xattr::get(path, &name)? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn entries(blob: &Path) -> Vec<(String, tar::EntryType, Option<String>)> {
        let gz = flate2::read::GzDecoder::new(File::open(blob).unwrap());
        let mut ar = tar::Archive::new(gz);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut sink = Vec::new();
                e.read_to_end(&mut sink).unwrap();
                (path, kind, link)
            })
            .collect()
    }

    #[test]
    fn rootfs_layer_keeps_hardlinks_symlinks_and_order() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("usr/bin")).unwrap();
        fs::write(src.path().join("usr/bin/a"), b"same").unwrap();
        fs::hard_link(src.path().join("usr/bin/a"), src.path().join("usr/bin/b")).unwrap();
        symlink("usr/bin", src.path().join("bin")).unwrap();
        let blob = write_dir_layer(src.path(), DirKind::Rootfs, out.path()).unwrap();
        let got = entries(&out.path().join(&blob.digest["sha256:".len()..]));
        let names: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(names, ["bin", "usr", "usr/bin", "usr/bin/a", "usr/bin/b"]);
        assert_eq!(got[0].1, tar::EntryType::Symlink);
        assert_eq!(got[4].1, tar::EntryType::Link);
        assert_eq!(got[4].2.as_deref(), Some("usr/bin/a"));
        assert_ne!(blob.digest, blob.diff_id);
        // The same tree gives the same layer.
        let again = write_dir_layer(src.path(), DirKind::Rootfs, out.path()).unwrap();
        assert_eq!(again.digest, blob.digest);
    }

    #[test]
    #[ignore = "needs root: whiteout devices and trusted xattrs (make e2e runs it)"]
    fn overlay_whiteouts_and_opaque_dirs_become_oci_markers() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root: whiteout devices"
        );
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("etc/opaque")).unwrap();
        xattr::set(
            src.path().join("etc/opaque"),
            "trusted.overlay.opaque",
            b"y",
        )
        .unwrap();
        nix::sys::stat::mknod(
            &src.path().join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        let blob = write_dir_layer(src.path(), DirKind::OverlayUpper, out.path()).unwrap();
        let got = entries(&out.path().join(&blob.digest["sha256:".len()..]));
        let names: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/.wh.gone",
                "etc/opaque",
                "etc/opaque/.wh..wh..opq"
            ]
        );
    }
}
