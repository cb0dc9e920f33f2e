//! The daemon's error type and its one mapping to gRPC status codes.
//!
//! containerd's proxy client turns the status code back into its `errdefs` errors, and
//! callers branch on them (an `AlreadyExists` on Prepare during a pull means "another
//! pull is unpacking this layer", a `NotFound` on Stat means "unpack it"). So every
//! variant maps to the code containerd's own snapshotters return for the same case,
//! explicitly, in [`From<SnapshotError> for tonic::Status`]; only genuine internal
//! failures become `Internal`.

use std::io;
use std::path::PathBuf;

/// Everything a Snapshots request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot has this key or name.
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    /// A snapshot with this key or name already exists.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The snapshot exists but is in the wrong state for the call.
    #[error("snapshot {key:?}: {reason}")]
    FailedPrecondition {
        /// The snapshot.
        key: String,
        /// What is wrong (e.g. "not active", "has children").
        reason: &'static str,
    },
    /// The request itself is malformed (empty key, immutable field path, bad filter).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The metadata index failed.
    #[error(transparent)]
    Index(cas::index::IndexError),
    /// The store failed (ingest, objects, manifests).
    #[error(transparent)]
    Store(#[from] cas::CasError),
    /// A filesystem operation on the store failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel cannot serve stubs (found by the start-up probe).
    #[error(transparent)]
    Unsupported(#[from] crate::probe::ProbeError),
    /// The configured mount mode cannot serve the store's layers.
    #[error("the store holds {stored:?} layers, which mount_mode {requested:?} cannot serve")]
    ModeMismatch {
        /// What the store was created with.
        stored: cas::StoreMode,
        /// What the configuration asks for.
        requested: config::MountMode,
    },
    /// The store's layout markers failed.
    #[error(transparent)]
    Layout(#[from] cas::LayoutError),
    /// A layer could not be applied (see `cas::unpack`).
    #[error("applying the layer: {0}")]
    Unpack(cas::unpack::UnpackError),
    /// The Diff service cannot apply this request here; containerd falls back to its
    /// own applier (`Unimplemented`).
    #[error("not applied by cas-diff: {0}")]
    NotApplicable(String),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<cas::index::IndexError> for SnapshotError {
    fn from(e: cas::index::IndexError) -> Self {
        match e {
            cas::index::IndexError::NotFound(key) => SnapshotError::NotFound(key),
            other => SnapshotError::Index(other),
        }
    }
}

impl SnapshotError {
    /// Builds a closure that wraps an [`io::Error`] with its operation and path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io { op, path, source }
    }
}

/// The one place where errors become gRPC codes.
impl From<SnapshotError> for tonic::Status {
    fn from(err: SnapshotError) -> Self {
        let msg = err.to_string();
        match err {
            SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapshotError::FailedPrecondition { .. } => tonic::Status::failed_precondition(msg),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapshotError::Io { ref source, .. }
                if source.raw_os_error() == Some(nix::libc::ENOSPC) =>
            {
                tonic::Status::resource_exhausted(format!("the store's filesystem is full: {msg}"))
            }
            SnapshotError::Store(ref e) if e.is_enospc() => {
                tonic::Status::resource_exhausted(format!("the store's filesystem is full: {msg}"))
            }
            SnapshotError::Store(cas::CasError::Hostile { .. }) => {
                tonic::Status::invalid_argument(msg)
            }
            SnapshotError::NotApplicable(_) => tonic::Status::unimplemented(msg),
            SnapshotError::Unpack(ref e) => {
                use cas::unpack::UnpackError as U;
                match e {
                    _ if e.is_enospc() => tonic::Status::resource_exhausted(format!(
                        "the store's filesystem is full: {msg}"
                    )),
                    U::BlobDigest { .. } => tonic::Status::data_loss(msg),
                    U::Decompress { .. } | U::Tar(_) | U::Store(cas::CasError::Hostile { .. }) => {
                        tonic::Status::invalid_argument(msg)
                    }
                    U::Expansion { .. } => tonic::Status::resource_exhausted(msg),
                    U::Read(_) => tonic::Status::unavailable(msg),
                    U::Store(_) | U::Pool(_) => {
                        tracing::error!(error = %msg, "internal error");
                        tonic::Status::internal(msg)
                    }
                }
            }
            SnapshotError::Index(_)
            | SnapshotError::Store(_)
            | SnapshotError::Io { .. }
            | SnapshotError::Unsupported(_)
            | SnapshotError::ModeMismatch { .. }
            | SnapshotError::Layout(_)
            | SnapshotError::Task(_) => {
                tracing::error!(error = %msg, "internal error");
                tonic::Status::internal(msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_match_containerd_errdefs() {
        let code = |e: SnapshotError| tonic::Status::from(e).code();
        assert_eq!(code(SnapshotError::NotFound("k".into())), Code::NotFound);
        assert_eq!(
            code(SnapshotError::AlreadyExists("k".into())),
            Code::AlreadyExists
        );
        assert_eq!(
            code(SnapshotError::FailedPrecondition {
                key: "k".into(),
                reason: "not active"
            }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(SnapshotError::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        let enospc = io::Error::from_raw_os_error(nix::libc::ENOSPC);
        assert_eq!(
            code(SnapshotError::io("mkdir", "/x")(enospc)),
            Code::ResourceExhausted
        );
        let eio = io::Error::from_raw_os_error(nix::libc::EIO);
        assert_eq!(code(SnapshotError::io("mkdir", "/x")(eio)), Code::Internal);
    }
}
