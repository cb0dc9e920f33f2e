//! Test support for cas-snapshotter's end-to-end tests, and the fixture tools.
//!
//! * [`fixture`]: builds real OCI images (layouts) with every kind of tar entry a
//!   snapshotter must reproduce; `cas-fixture build` on the command line;
//! * [`chunked`]: zstd:chunked variants of the fixture images, for partial pulls;
//! * [`layers`]: variants of images for the fast path's tests (zstd and plain layers,
//!   broken streams, wrong diffIDs, decompression bombs);
//! * [`registry`]: pushes a layout to a registry (`cas-fixture push`);
//! * [`treecmp`]: compares two root filesystems entry by entry, metadata included
//!   (`cas-fixture compare`); the e2e tests hold our snapshotter's trees against
//!   containerd's overlayfs with it;
//! * [`rootfs`]: layers from directories (root filesystems and overlay upper dirs), for
//!   the benchmark images (`cas-bench`);
//! * [`harness`]: real registry, daemon and containerd processes (Debian's containerd 1.6
//!   or a cached 1.7 / 2.x release), cleaned up on drop;
//! * [`cri`]: a Kubernetes CRI client, as kubelet talks to containerd;
//! * [`compression`]: layer compression (the store's [`cas::unpack::Compression`] with
//!   media types, encoders and the decompressor the benchmarks compare with).
//!
//! The tests themselves live in `tests/` and need root: ignored in a plain `cargo test`,
//! run by `make e2e`.
#![forbid(unsafe_code)]

pub mod chunked;
pub mod compression;
pub mod cri;
pub mod fixture;
pub mod harness;
pub mod layers;
pub mod registry;
pub mod rootfs;
pub mod treecmp;
