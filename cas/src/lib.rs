//! The store: everything cas-snapshotter keeps on disk under its root.
//!
//! ```text
//! <root>/
//!   layout               version marker of this layout (written once, durably)
//!   cas/objects/ab/cdef… one file per distinct content, named by sha256; immutable;
//!                        overlayfs' data-only lower layer
//!   cas/tmp/             in-flight object writes, swept at start
//!   snapshots/<id>/fs    a layer tree; in committed layers regular files become stubs
//!   snapshots/<id>/work  overlay workdir of active snapshots
//!   snapshots/<id>/manifest  a committed layer's file list (authoritative)
//!   index/               sled: snapshot metadata and object refcounts (rebuildable)
//!   journal              commit intent records
//! ```
//!
//! Everything lives on one filesystem so that every publish is a `rename(2)`.
//! Objects and manifests are the truth; `index/` is derived from them and can be
//! rebuilt. This crate currently owns the layout ([`Layout`]); ingest with dedup,
//! refcounts, GC, fsck and index rebuild grow here on top of it.
#![forbid(unsafe_code)]

pub mod layout;

pub use layout::{Layout, LayoutError};
