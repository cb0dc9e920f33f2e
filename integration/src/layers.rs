//! Variants of images for the fast path's tests: the fixture's layers re-encoded as
//! zstd or plain tar, and layers that must be refused (a gzip stream that is itself
//! broken, a wrong diffID in the config, a decompression bomb).
//!
//! Everything works on OCI image layouts (`index.json`, `blobs/sha256`): an image is
//! read back from a layout as its layers' blobs and its config, changed, and written
//! to a new layout with recomputed digests, config and manifest, ready for
//! [`crate::registry::push_layout`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::compression::{Compression, LayerCompression};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A layer blob with what the manifest and the config say about it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The blob as pushed.
    pub blob: Vec<u8>,
    /// Its media type.
    pub media_type: String,
    /// The config's diffID for it (normally the digest of the uncompressed tar).
    pub diff_id: String,
    /// The descriptor's annotations (zstd:chunked's TOC position, for one).
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Layer {
    /// The blob's digest (`sha256:…`).
    pub fn digest(&self) -> String {
        sha256(&self.blob)
    }

    /// A layer of `tar` compressed as `c`.
    pub fn encode(tar: &[u8], c: Compression) -> Result<Layer> {
        Ok(Layer {
            blob: c.compress(tar)?,
            media_type: c.media_type().to_string(),
            diff_id: sha256(tar),
            annotations: Default::default(),
        })
    }

    /// The uncompressed tar of this layer.
    pub fn tar(&self) -> Result<Vec<u8>> {
        Compression::of_media_type(&self.media_type)?.decompress(&self.blob)
    }

    /// The same layer compressed as `c`.
    pub fn reencode(&self, c: Compression) -> Result<Layer> {
        Layer::encode(&self.tar()?, c)
    }

    /// The same blob with a diffID in the config that is not its tar's.
    pub fn with_wrong_diff_id(mut self) -> Layer {
        self.diff_id = sha256(format!("not the tar of {}", self.diff_id).as_bytes());
        self
    }
}

/// A tar of regular files (mode 0644, root-owned), with their parent directories.
pub fn files_tar(files: &[(&str, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, data) in files {
        let mut parent = Path::new(path).parent();
        let mut missing = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if dirs.insert(p.to_path_buf()) {
                missing.push(p.to_path_buf());
            }
            parent = p.parent();
        }
        for d in missing.into_iter().rev() {
            let mut h = header(tar::EntryType::Directory, 0, 0o755);
            b.append_data(&mut h, format!("{}/", d.display()), std::io::empty())?;
        }
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, path, data.as_slice())?;
    }
    Ok(b.into_inner()?)
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// `len` bytes that no other test data shares and that do not compress.
pub fn unique_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A gzip layer of `tar` whose compressed stream is cut short: its digest is that of
/// the bytes pushed, so only decompressing it shows that it is broken.
pub fn truncated_gzip(tar: &[u8]) -> Result<Layer> {
    let good = Layer::encode(tar, Compression::Gzip)?;
    let mut blob = good.blob;
    blob.truncate(blob.len() / 2);
    Ok(Layer {
        blob,
        media_type: Compression::Gzip.media_type().to_string(),
        diff_id: good.diff_id,
        annotations: Default::default(),
    })
}

/// A zstd layer holding one file of `len` zeros at `path`: a few kilobytes that expand
/// to `len` bytes. Encoded as a stream, so the zeros are never in memory at once.
pub fn zero_bomb(path: &str, len: u64) -> Result<Layer> {
    let mut h = header(tar::EntryType::Regular, len, 0o644);
    h.set_path(path)?;
    h.set_cksum();
    let mut enc = zstd::Encoder::new(Vec::new(), 3)?;
    let mut hasher = Sha256::new();
    let mut put = |enc: &mut zstd::Encoder<'_, Vec<u8>>, bytes: &[u8]| -> Result<()> {
        hasher.update(bytes);
        enc.write_all(bytes)?;
        Ok(())
    };
    put(&mut enc, h.as_bytes())?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        put(&mut enc, &zeros[..n])?;
        left -= n as u64;
    }
    // padding to the 512-byte record, then the two zero records that end a tar
    let pad = (512 - (len % 512) as usize) % 512;
    put(&mut enc, &vec![0u8; pad + 1024])?;
    let blob = enc.finish()?;
    Ok(Layer {
        blob,
        media_type: Compression::Zstd.media_type().to_string(),
        diff_id: format!("sha256:{}", hex::encode(hasher.finalize())),
        annotations: Default::default(),
    })
}

/// An image read from, or written to, an OCI layout.
#[derive(Debug, Clone)]
pub struct Image {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// The config (its `rootfs.diff_ids` are rewritten from the layers on write).
    pub config: Value,
}

/// Where [`Image::write`] put an image.
#[derive(Debug, Clone)]
pub struct Written {
    /// The layout directory.
    pub layout_dir: PathBuf,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// Blob digests, bottom first.
    pub layer_digests: Vec<String>,
    /// The config's diffIDs, bottom first.
    pub diff_ids: Vec<String>,
}

impl Image {
    /// Reads the (single) image of the layout at `dir`.
    pub fn read(dir: &Path) -> Result<Image> {
        let blob = |d: &str| -> Result<Vec<u8>> {
            let p = dir
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"));
            fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
        let mdigest = index["manifests"][0]["digest"]
            .as_str()
            .context("index.json names no manifest")?;
        let manifest: Value = serde_json::from_slice(&blob(mdigest)?)?;
        let config: Value = serde_json::from_slice(&blob(
            manifest["config"]["digest"]
                .as_str()
                .context("manifest without config")?,
        )?)?;
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .context("config without diff_ids")?;
        let mut layers = Vec::new();
        for (i, l) in manifest["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .enumerate()
        {
            layers.push(Layer {
                blob: blob(l["digest"].as_str().context("layer without digest")?)?,
                media_type: l["mediaType"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| Compression::Gzip.media_type().to_string()),
                diff_id: diff_ids
                    .get(i)
                    .and_then(Value::as_str)
                    .context("fewer diff_ids than layers")?
                    .to_string(),
                annotations: l["annotations"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(Image { layers, config })
    }

    /// The same image with every layer encoded as `enc`.
    pub fn reencode(&self, enc: Compression) -> Result<Image> {
        Ok(Image {
            layers: self
                .layers
                .iter()
                .map(|l| l.reencode(enc))
                .collect::<Result<_>>()?,
            config: self.config.clone(),
        })
    }

    /// Writes the image as an OCI layout in `out` (created).
    pub fn write(&self, out: &Path) -> Result<Written> {
        let blobs = out.join("blobs/sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let put = |bytes: &[u8]| -> Result<String> {
            let d = sha256(bytes);
            fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes)?;
            Ok(d)
        };
        let mut descs = Vec::new();
        for l in &self.layers {
            let digest = put(&l.blob)?;
            let mut desc = json!({
                "mediaType": l.media_type,
                "digest": digest,
                "size": l.blob.len(),
            });
            if !l.annotations.is_empty() {
                desc["annotations"] = json!(l.annotations);
            }
            descs.push(desc);
        }
        let diff_ids: Vec<String> = self.layers.iter().map(|l| l.diff_id.clone()).collect();
        let mut config = self.config.clone();
        config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = put(&config_bytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_bytes.len(),
            },
            "layers": descs,
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest_digest = put(&manifest_bytes)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_bytes.len(),
            }],
        });
        fs::write(out.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Written {
            layout_dir: out.to_path_buf(),
            manifest_digest,
            layer_digests: self.layers.iter().map(Layer::digest).collect(),
            diff_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reencoded_layers_keep_their_diff_ids() {
        let tar = files_tar(&[("a/b/c", b"hello".to_vec()), ("d", unique_bytes(3000, 1))]).unwrap();
        let gz = Layer::encode(&tar, Compression::Gzip).unwrap();
        for enc in [Compression::Zstd, Compression::None, Compression::Gzip] {
            let l = gz.reencode(enc).unwrap();
            assert_eq!(l.diff_id, gz.diff_id);
            assert_eq!(l.media_type, enc.media_type().to_string());
            assert_eq!(l.tar().unwrap(), tar);
        }
        assert_eq!(
            Layer::encode(&tar, Compression::None).unwrap().digest(),
            gz.diff_id
        );
        assert_ne!(gz.clone().with_wrong_diff_id().diff_id, gz.diff_id);
    }

    #[test]
    fn a_bomb_is_small_and_a_valid_tar() {
        let bomb = zero_bomb("zeros", 8 << 20).unwrap();
        assert!(bomb.blob.len() < 64 << 10, "{}", bomb.blob.len());
        let tar = bomb.tar().unwrap();
        assert_eq!(sha256(&tar), bomb.diff_id);
        let mut a = tar::Archive::new(&tar[..]);
        let mut entries = a.entries().unwrap();
        let e = entries.next().unwrap().unwrap();
        assert_eq!(e.header().size().unwrap(), 8 << 20);
        assert!(entries.next().is_none());
    }

    #[test]
    fn a_truncated_gzip_does_not_decompress() {
        let tar = files_tar(&[("x", unique_bytes(100_000, 2))]).unwrap();
        let l = truncated_gzip(&tar).unwrap();
        assert!(l.tar().is_err());
    }

    #[test]
    fn images_round_trip_through_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        let tar = files_tar(&[("f", b"x".to_vec())]).unwrap();
        let img = Image {
            layers: vec![Layer::encode(&tar, Compression::Zstd).unwrap()],
            config: json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]}}),
        };
        let w = img.write(&dir.path().join("a")).unwrap();
        let back = Image::read(&w.layout_dir).unwrap();
        assert_eq!(
            back.layers[0].media_type,
            Compression::Zstd.media_type().to_string()
        );
        assert_eq!(back.layers[0].diff_id, sha256(&tar));
        assert_eq!(back.config["config"]["Cmd"][0], "sh");
        let w2 = back.write(&dir.path().join("b")).unwrap();
        assert_eq!(w.manifest_digest, w2.manifest_digest);
    }
}
