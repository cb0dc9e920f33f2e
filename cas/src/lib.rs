//! The store: everything cas-snapshotter keeps on disk under its root.
//!
//! ```text
//! <root>/
//!   layout               version marker of this layout (1: stub trees only; 2: images too)
//!   cas/objects/ab/cdef… one file per distinct content, named by sha256; immutable;
//!                        mode 0444, owner root, no xattrs; overlayfs' data-only lower layer
//!   cas/tmp/             in-flight object links and stubs, swept at start
//!   snapshots/<id>/fs    a layer tree; in committed layers regular files are stubs, or
//!                        the mount point of the layer's image
//!   snapshots/<id>/layer.erofs  a layer's metadata as one EROFS image (where it is one)
//!   snapshots/<id>/work  overlay workdir of active snapshots
//!   snapshots/<id>/mapped/<layer>  an ID-mapped snapshot's clones of its layers (mounts)
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
//! * [`erofs`]: a layer's metadata as one EROFS image, the alternative to a stub tree;
//! * [`manifest`]: a layer's path → object list;
//! * [`ingest`]: a layer tree → stubs (or an image) + objects + manifest, at Commit;
//! * [`unpack`]: a compressed layer blob → stubs (or an image) + objects + manifest in
//!   one pass (the differ's fast path);
//! * [`index`]: snapshot records and object reference counts in sled;
//! * [`journal`]: commit records, checkpoints and their replay at start;
//! * [`snapshots`]: the snapshot lifecycle (create, commit, remove, recovery at open),
//!   the one owner of the crash-ordered steps;
//! * [`mounts`]: which mounts containerd gets for a snapshot (pure, unit-tested);
//! * [`idmap`]: user-namespaced snapshots over ID-mapped clones of shared layers;
//! * [`probe`]: the start-up check that the kernel serves stubs from the CAS;
//! * [`sys`]: the calls that need root, behind a trait with a recording fake;
//! * [`flatten`]: one stub tree standing in for a chain too deep for one mount option;
//! * [`gc`]: deleting objects no committed snapshot references;
//! * [`admin`]: statistics, index rebuild and the admin socket's protocol behind `casctl`;
//! * [`fsck`]: the consistency check, a digest-range part at a time ([`parts`]);
//! * [`sharing`]: what each image holds alone and shares (what removing it frees);
//! * [`writeback`]: a layer's data written back while it is still hashed or written.
//!
//! ## Crash points
//! Every step of ingest, commit, remove and GC after which a crash leaves a different
//! state on disk is marked with [`crash_point!`]. Started with
//! `FAILPOINTS="<name>=return"` (the `fail` crate's syntax), the daemon kills itself
//! with `SIGKILL` when it reaches that point: no destructor runs and nothing is
//! flushed, exactly as after `kill -9` or a power cut of the process. The fault-injection
//! tests run a pull, a remove and a GC with each point armed, restart the daemon and
//! check the store with fsck. Without `FAILPOINTS` a point costs one read-locked lookup.
#![forbid(unsafe_code)]

/// Marks a step after which a crash must leave a recoverable store (see the crate
/// docs). Armed with `FAILPOINTS="<name>=return"`, the process `SIGKILL`s itself here.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::fail::fail_point!($name, |_| {
            ::tracing::error!(point = $name, "crash point reached: killing the process");
            $crate::crash_now()
        })
    };
}

#[doc(hidden)]
pub use fail;

/// Kills this process with `SIGKILL` (used by [`crash_point!`]).
#[doc(hidden)]
pub fn crash_now() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

pub mod admin;
pub mod digest;
pub mod erofs;
pub mod error;
pub mod flatten;
pub mod fsck;
pub mod gc;
pub mod idmap;
pub mod index;
pub mod ingest;
pub mod journal;
pub mod layout;
pub mod manifest;
pub mod mounts;
pub mod objects;
pub mod parts;
pub mod probe;
pub mod sharing;
pub mod snapshots;
pub mod stub;
pub mod sys;
pub mod unpack;
pub mod writeback;

pub use digest::Digest;
pub use error::CasError;
pub use layout::{Layout, LayoutError, StoreMode};
