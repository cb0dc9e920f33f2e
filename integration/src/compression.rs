//! Layer compression for the images the tests and benchmarks build: the store's own
//! [`Compression`] (what the daemon detects in a blob), with what an image builder needs
//! of it: the OCI media type (from `oci-spec`), encoders, and the single-core
//! decompressor the benchmarks hold the fast path against.

use std::io::{Read, Write};

use anyhow::{bail, Result};
use flate2::write::GzEncoder;
use oci_spec::image::MediaType;

pub use cas::unpack::Compression;

/// zstd's own default level, what image builders use for `tar+zstd` layers.
const ZSTD_LEVEL: i32 = 3;

/// What building and reading layers needs of a [`Compression`].
pub trait LayerCompression: Sized {
    /// The OCI media type of a layer so compressed.
    fn media_type(self) -> MediaType;
    /// The compression of an OCI or Docker tar layer's media type.
    fn of_media_type(media: &str) -> Result<Self>;
    /// Compresses a whole tar in memory.
    fn compress(self, tar: &[u8]) -> Result<Vec<u8>>;
    /// Decompresses a whole blob in memory.
    fn decompress(self, blob: &[u8]) -> Result<Vec<u8>>;
    /// A compressing writer into `w`.
    fn encoder<W: Write>(self, w: W) -> Result<Encoder<W>>;
    /// The single-core command line tool that inflates such a blob (`cat` for a tar).
    fn decompressor(self) -> &'static str;
}

impl LayerCompression for Compression {
    fn media_type(self) -> MediaType {
        match self {
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
            Compression::None => MediaType::ImageLayer,
        }
    }

    fn of_media_type(media: &str) -> Result<Compression> {
        Ok(match MediaType::from(media) {
            MediaType::ImageLayerGzip => Compression::Gzip,
            MediaType::ImageLayerZstd => Compression::Zstd,
            MediaType::ImageLayer => Compression::None,
            _ if media.ends_with(".tar.gzip") => Compression::Gzip,
            _ if media.ends_with(".tar.zstd") => Compression::Zstd,
            _ if media.ends_with(".tar") => Compression::None,
            _ => bail!("not a tar layer: {media}"),
        })
    }

    fn compress(self, tar: &[u8]) -> Result<Vec<u8>> {
        let mut enc = self.encoder(Vec::with_capacity(tar.len() / 2))?;
        enc.write_all(tar)?;
        enc.finish()
    }

    fn decompress(self, blob: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Compression::Gzip => {
                flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut out)?;
            }
            Compression::Zstd => out = zstd::decode_all(blob)?,
            Compression::None => out = blob.to_vec(),
        }
        Ok(out)
    }

    fn encoder<W: Write>(self, w: W) -> Result<Encoder<W>> {
        Ok(match self {
            Compression::Gzip => Encoder::Gzip(GzEncoder::new(w, flate2::Compression::default())),
            Compression::Zstd => Encoder::Zstd(zstd::Encoder::new(w, ZSTD_LEVEL)?),
            Compression::None => Encoder::None(w),
        })
    }

    fn decompressor(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "cat",
        }
    }
}

/// A compressing writer for one of the [`Compression`]s.
pub enum Encoder<W: Write> {
    /// gzip at its default level.
    Gzip(GzEncoder<W>),
    /// zstd at its default level.
    Zstd(zstd::Encoder<'static, W>),
    /// The tar as it is.
    None(W),
}

impl<W: Write> Encoder<W> {
    /// Ends the stream; returns the writer.
    pub fn finish(self) -> Result<W> {
        Ok(match self {
            Encoder::Gzip(e) => e.finish()?,
            Encoder::Zstd(e) => e.finish()?,
            Encoder::None(w) => w,
        })
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_round_trip_and_blobs_decompress() {
        let tar = b"not really a tar, but bytes".repeat(100);
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let media = c.media_type().to_string();
            assert_eq!(Compression::of_media_type(&media).unwrap(), c, "{media}");
            let blob = c.compress(&tar).unwrap();
            assert_eq!(Compression::detect(&blob), c);
            assert_eq!(c.decompress(&blob).unwrap(), tar);
        }
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(
            Compression::of_media_type(docker).unwrap(),
            Compression::Gzip
        );
        assert!(Compression::of_media_type("application/vnd.oci.image.config.v1+json").is_err());
    }
}
