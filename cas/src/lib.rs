//! The store: everything cas-snapshotter keeps on disk under its root.
//!
//! ```text
//! <root>/
//!   layout               version marker of this layout (written once, durably)
//!   cas/objects/ab/cdef… one file per distinct content, named by sha256; immutable;
//!                        mode 0444, owner root, no xattrs; overlayfs' data-only lower layer
//!   cas/tmp/             in-flight object links and stubs, swept at start
//!   snapshots/<id>/fs    a layer tree; in committed layers regular files are stubs
//!   snapshots/<id>/work  overlay workdir of active snapshots
//!   snapshots/<id>/manifest  a committed layer's file list (authoritative)
//!   index/               sled: snapshot metadata and object refcounts (rebuildable)
//!   journal              commit intent records
//! ```
//!
//! Everything lives on one filesystem so that every publish is a `rename(2)` or
//! `link(2)`. Objects and manifests are the truth; `index/` is derived from them and can
//! be rebuilt.
//!
//! * [`layout`]: the directories above;
//! * [`digest`]: [`Digest`], an object's name;
//! * [`objects`]: publishing objects idempotently;
//! * [`stub`]: metadata stubs and the rule that layers never bring overlayfs xattrs;
//! * [`manifest`]: a layer's path → object list;
//! * [`ingest`]: a layer tree → stubs + objects + manifest, at Commit;
//! * [`index`]: snapshot records and object reference counts in sled;
//! * [`flatten`]: one stub tree standing in for a chain too deep for one mount option;
//! * [`gc`]: deleting objects no committed snapshot references;
//! * [`admin`]: statistics, fsck and index rebuild behind `casctl`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod digest;
pub mod error;
pub mod flatten;
pub mod gc;
pub mod index;
pub mod ingest;
pub mod layout;
pub mod manifest;
pub mod objects;
pub mod stub;

pub use digest::Digest;
pub use error::CasError;
pub use layout::{Layout, LayoutError, StoreMode};
