//! zstd:chunked variants of fixture images, for the partial-pull tests.
//!
//! [`convert`] rewrites every layer of an OCI image layout as zstd:chunked with
//! `remote::encode` (the layout containers/storage writes, tar-split included or not)
//! and puts the zstd:chunked annotations on the layer descriptors. A layer may be
//! changed on the way (`tweak`), for near-duplicate images: independent builds of the
//! same files, whose blobs and diffIDs differ while nearly every file is the same.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use remote::encode::{encode, Options};
use serde_json::{json, Value};

use crate::compression::{Compression, LayerCompression};
use crate::fixture::BuiltImage;
use crate::layers::sha256;

fn blob_path(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Writes `src`'s image to `dst` with zstd:chunked layers (each layer's tar passed
/// through `tweak(index, tar)` first).
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: Options,
    tweak: impl Fn(usize, Vec<u8>) -> Result<Vec<u8>>,
) -> Result<BuiltImage> {
    let blobs = dst.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<String> {
        let d = sha256(bytes);
        fs::write(blob_path(dst, &d), bytes)?;
        Ok(d)
    };
    let index: Value = serde_json::from_slice(&fs::read(src.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let mut manifest: Value = serde_json::from_slice(&fs::read(blob_path(src, mdigest))?)?;
    let cdigest = manifest["config"]["digest"].as_str().context("no config")?;
    let mut config: Value = serde_json::from_slice(&fs::read(blob_path(src, cdigest))?)?;
    let mut diff_ids = Vec::new();
    let mut digests = Vec::new();
    let layers = manifest["layers"].as_array_mut().context("no layers")?;
    for (i, layer) in layers.iter_mut().enumerate() {
        let digest = layer["digest"].as_str().context("layer digest")?;
        let media = layer["mediaType"].as_str().context("layer media type")?;
        let blob = fs::read(blob_path(src, digest))?;
        let tar = tweak(i, Compression::of_media_type(media)?.decompress(&blob)?)?;
        let enc = encode(&tar, opts)?;
        let d = put(&enc.blob)?;
        *layer = json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": d,
            "size": enc.blob.len(),
            "annotations": enc.annotations,
        });
        diff_ids.push(format!("sha256:{}", enc.diff_id.hex()));
        digests.push(d);
    }
    config["rootfs"]["diff_ids"] = json!(diff_ids);
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = put(&config_bytes)?;
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config_bytes.len());
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put(&manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
        }],
    });
    fs::write(dst.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dst.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(BuiltImage {
        layout_dir: dst.to_path_buf(),
        manifest_digest,
        layer_diff_ids: diff_ids,
        layer_digests: digests,
    })
}

/// The layer `tar` with one more file at its end: another build of the same layer
/// (every other file the same, the blob and the diffID different).
pub fn with_extra_file(tar: Vec<u8>, path: &str, content: &[u8]) -> Result<Vec<u8>> {
    let mut archive = tar::Archive::new(&tar[..]);
    let mut out = tar::Builder::new(Vec::new());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let mut header = entry.header().clone();
        let path_bytes = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        if let Some(pax) = entry.pax_extensions()? {
            let exts: Vec<(String, Vec<u8>)> = pax
                .filter_map(|e| e.ok())
                .filter_map(|e| Some((e.key().ok()?.to_string(), e.value_bytes().to_vec())))
                .filter(|(k, _)| k.starts_with("SCHILY.xattr."))
                .collect();
            if !exts.is_empty() {
                out.append_pax_extensions(exts.iter().map(|(k, v)| (k.as_str(), &v[..])))?;
            }
        }
        let p = String::from_utf8_lossy(&path_bytes).into_owned();
        match link {
            Some(l) => out.append_link(&mut header, &p, String::from_utf8_lossy(&l).as_ref())?,
            None => out.append_data(&mut header, &p, &data[..])?,
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    out.append_data(&mut h, path, content)?;
    Ok(out.into_inner()?)
}
