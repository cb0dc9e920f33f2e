//! The cas-snapshotter daemon: containerd's Snapshots and Diff services over a unix socket.
//!
//! containerd loads it as a proxy plugin (`[proxy_plugins.cas] type = "snapshot"`) and
//! sends every Prepare/View/Commit/Remove/Stat/Update/Usage/Walk/Cleanup of the `cas`
//! snapshotter here. This crate owns:
//!
//! * [`service`]: the containerd snapshotter contract (kinds, parents, labels, errors)
//!   over the store's directories, with crash-safe ordering of directory and metadata
//!   changes;
//! * snapshot metadata and refcounts live in `cas::index` (sled under `<root>/index`);
//! * [`mounts`]: mount planning, pure and unit-tested (the shapes of containerd's
//!   overlayfs snapshotter);
//! * [`probe`]: the start-up check that the kernel serves stubs from the CAS;
//! * [`filter`]: containerd's filter language for Walk;
//! * [`error`]: the one mapping from errors to gRPC status codes;
//! * [`server`]: socket handling and graceful shutdown;
//! * [`diff`]: the Diff service (`cas-diff`): layers applied in one pass;
//! * [`admin`]: the admin socket `casctl` talks to;
//! * [`ops`]: configuration reload on SIGHUP and scheduled GC;
//! * [`metrics`]: Prometheus text metrics.
//!
//! The on-disk layout belongs to the `cas` crate, raw syscalls to `ringio`, the
//! configuration to `config`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod diff;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod mounts;
pub mod ops;
pub mod probe;
pub mod server;
pub mod service;
