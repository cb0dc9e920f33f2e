//! The cas-snapshotter daemon: containerd's Snapshots and Diff services over a unix socket.
//!
//! containerd loads it as a proxy plugin (`[proxy_plugins.cas] type = "snapshot"`) and
//! sends every Prepare/View/Commit/Remove/Stat/Update/Usage/Walk/Cleanup of the `cas`
//! snapshotter here. This crate owns:
//!
//! * [`service`]: containerd's snapshotter contract (what a request may ask), forwarded
//!   to the store's snapshot lifecycle (`cas::snapshots`), which owns the crash-ordered
//!   steps, the mount plans and the recovery at start;
//! * [`convert`]: containerd's types to the store's and back (info, usage, mounts,
//!   Update's field paths, Walk's field lookup);
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
pub mod convert;
pub mod diff;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod ops;
pub mod remote;
pub mod server;
pub mod service;
