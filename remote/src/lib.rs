//! Partial pulls: layers built from what the store holds and the missing files alone.
//!
//! A zstd:chunked layer says, in its table of contents, which files it holds, their
//! digests and where each one's compressed bytes are in the blob ([`toc`]). With it, a
//! pull needs from the registry only the TOC and the files whose content the store
//! lacks; everything else is read from the store. The layer itself is still made by
//! the store's one unpack path, from the tar stream a full pull would have
//! decompressed ([`stream`]): around the tar-split ([`tarsplit`]) that stream is the
//! original archive, so its digest is checked against the image's diffID.
//!
//! * [`toc`]: annotations, the TOC and its checks;
//! * [`estargz`]: eStargz layers (footer, TOC member);
//! * [`tarsplit`]: the archive's bytes other than contents;
//! * [`stream`]: which files are fetched ([`stream::plan`]) and the assembled stream;
//! * [`pull`]: the layer a Prepare's labels name, opened on its registry;
//! * [`registry`]: manifests and blob ranges from registries configured as containerd's;
//! * [`encode`]: a zstd:chunked writer for tests and benchmarks.

pub mod encode;
pub mod estargz;
pub mod pull;
pub mod registry;
pub mod stream;
pub mod tarsplit;
pub mod toc;

use toc::{ChunkedLayer, Toc, TocError};

/// A layer's TOC and, when it has a trusted one, its tar-split.
#[derive(Debug, Clone)]
pub struct LayerToc {
    /// The checked TOC.
    pub toc: Toc,
    /// The tar-split, when the layer has one and the TOC gives its digest.
    pub tar_split: Option<Vec<tarsplit::Item>>,
}

/// Why a layer's metadata was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The TOC or its annotations.
    #[error(transparent)]
    Toc(#[from] TocError),
    /// The tar-split.
    #[error(transparent)]
    TarSplit(#[from] tarsplit::TarSplitError),
}

impl LayerToc {
    /// Checks and reads the compressed TOC (`toc_z`, the blob's bytes at `meta.toc`)
    /// and, when the layer has one, the compressed tar-split (the bytes at
    /// `meta.tar_split`). A tar-split is used only when the TOC records its digest.
    pub fn from_parts(
        meta: &ChunkedLayer,
        toc_z: &[u8],
        tar_split_z: Option<&[u8]>,
    ) -> Result<LayerToc, LayerError> {
        let json = toc::decompress_verified("TOC", toc_z, &meta.toc_digest, toc::MAX_TOC_BYTES)?;
        let toc = Toc::parse(&json, meta.toc.offset)?;
        let tar_split = match (tar_split_z, toc.tar_split_digest) {
            (Some(z), Some(d)) => {
                let data = toc::decompress_verified("tar-split", z, &d, toc::MAX_TAR_SPLIT_BYTES)?;
                Some(tarsplit::parse(&data)?)
            }
            _ => None,
        };
        Ok(LayerToc { toc, tar_split })
    }

    /// Whether the layer's tar-split is used (the stream is then the original archive).
    pub fn has_tar_split(&self) -> bool {
        self.tar_split.is_some()
    }
}

#[cfg(test)]
mod tests;
