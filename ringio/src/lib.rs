//! `ringio` owns every raw system call of cas-snapshotter.
//!
//! The rest of the workspace is `#![forbid(unsafe_code)]`; what it needs from the kernel
//! beyond `std` comes through this crate. Its planned shape (see the design map):
//!
//! * io_uring worker threads, one tokio-uring runtime, ring and registered fixed-buffer
//!   pool each, fed through bounded channels so producers wait instead of queueing;
//! * the layer-unpack write pipeline and fixed-buffer reads of blobs and objects;
//! * atomic writes: `pwritev2(RWF_ATOMIC)` where `statx` reports an atomic unit,
//!   otherwise temp file + fsync + rename + directory fsync;
//! * a plain-syscall fallback with the same API where io_uring is unavailable.
//!
//! Today it provides the I/O pool ([`pool`]: blob reads and new-file writes on io_uring
//! worker threads, or on plain threads where io_uring is unavailable), the durable-publish
//! primitives of the fallback path
//! ([`durable`]) and the commit journal ([`journal`]): one record per metadata change,
//! written as one `pwritev2(RWF_ATOMIC | RWF_DSYNC)` block where the filesystem reports
//! atomic write units, otherwise as a temp file + fsync + rename. [`idmap`] makes
//! ID-mapped clones of layers, [`loopdev`] serves a layer image as a read-only block
//! device where the kernel mounts EROFS only from one, [`memory`] hands the allocator's free
//! memory back to the kernel after a large request, and [`process`] waits for a child with
//! its peak memory (for the benchmarks).
//!
//! Every `unsafe` block carries a `// SAFETY:` comment naming the invariant and who
//! upholds it; buffers handed to the kernel are never touched until their completion.

pub mod durable;
pub mod error;
pub mod idmap;
pub mod journal;
pub mod loopdev;
pub mod memory;
pub mod pool;
pub mod process;

pub use error::IoError;
pub use pool::{
    probe_io_uring, Backend, BackendChoice, Linked, Pool, PoolConfig, PoolError, PoolStats, Ticket,
    UringUnavailable, DEFAULT_SMALL_WRITES,
};
