//! zstd:chunked variants of fixture images, for the partial-pull tests.
//!
//! [`convert`] rewrites every layer of an OCI image layout as zstd:chunked with
//! `remote::encode` (the layout containers/storage writes, tar-split included or not)
//! and puts the zstd:chunked annotations on the layer descriptors. A layer may be
//! changed on the way (`tweak`), for near-duplicate images: independent builds of the
//! same files, whose blobs and diffIDs differ while nearly every file is the same.

use std::path::Path;

use anyhow::Result;
use remote::encode::{encode, Options};

use crate::compression::{Compression, LayerCompression};
use crate::layers::{Image, Layer, Written};

/// Writes `src`'s image to `dst` with zstd:chunked layers (each layer's tar passed
/// through `tweak(index, tar)` first).
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: Options,
    tweak: impl Fn(usize, Vec<u8>) -> Result<Vec<u8>>,
) -> Result<Written> {
    let mut image = Image::read(src)?;
    for (i, layer) in image.layers.iter_mut().enumerate() {
        let enc = encode(&tweak(i, layer.tar()?)?, opts)?;
        *layer = Layer {
            blob: enc.blob,
            media_type: Compression::Zstd.media_type().to_string(),
            diff_id: format!("sha256:{}", enc.diff_id.hex()),
            annotations: enc.annotations,
        };
    }
    image.write(dst)
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
