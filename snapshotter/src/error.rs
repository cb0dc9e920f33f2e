//! The daemon's error type and its one mapping to gRPC status codes.
//!
//! containerd's proxy client turns the status code back into its `errdefs` errors, and
//! callers branch on them (an `AlreadyExists` on Prepare during a pull means "another
//! pull is unpacking this layer", a `NotFound` on Stat means "unpack it"). So every
//! variant maps to the code containerd's own snapshotters return for the same case,
//! explicitly, in [`From<ServiceError> for tonic::Status`]; only genuine internal
//! failures become `Internal`.

use cas::snapshots::SnapshotError;
use cas::unpack::UnpackError;
use cas::CasError;

/// Everything a Snapshots or Diff request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store's snapshot lifecycle refused or failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The request itself is malformed (immutable field path, bad filter, bad descriptor).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The Diff service cannot apply this request here; containerd falls back to its
    /// own applier (`Unimplemented`).
    #[error("not applied by cas-diff: {0}")]
    NotApplicable(String),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<CasError> for ServiceError {
    fn from(e: CasError) -> Self {
        ServiceError::Snapshot(e.into())
    }
}

fn full(msg: &str) -> tonic::Status {
    tonic::Status::resource_exhausted(format!("the store's filesystem is full: {msg}"))
}

fn internal(msg: String) -> tonic::Status {
    tracing::error!(error = %msg, "internal error");
    tonic::Status::internal(msg)
}

/// The code of a store failure: a full disk is `ResourceExhausted`, a hostile layer
/// `InvalidArgument`, anything else internal.
fn store_status(e: &CasError, msg: String) -> tonic::Status {
    match e {
        _ if e.is_enospc() => full(&msg),
        CasError::Hostile { .. } => tonic::Status::invalid_argument(msg),
        _ => internal(msg),
    }
}

/// The one place where errors become gRPC codes.
impl From<ServiceError> for tonic::Status {
    fn from(err: ServiceError) -> Self {
        let msg = err.to_string();
        match err {
            ServiceError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            ServiceError::NotApplicable(_) => tonic::Status::unimplemented(msg),
            ServiceError::Task(_) => internal(msg),
            ServiceError::Snapshot(e) => match e {
                SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
                SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
                SnapshotError::FailedPrecondition { .. } => tonic::Status::failed_precondition(msg),
                SnapshotError::InvalidArgument(_) | SnapshotError::Mapping(_) => {
                    tonic::Status::invalid_argument(msg)
                }
                SnapshotError::IdmapUnavailable { .. } => tonic::Status::failed_precondition(msg),
                SnapshotError::Store(ref e) => store_status(e, msg),
                SnapshotError::Unpack(ref e) => match e {
                    _ if e.is_enospc() => full(&msg),
                    UnpackError::BlobDigest { .. } => tonic::Status::data_loss(msg),
                    UnpackError::Decompress { .. } | UnpackError::Tar(_) => {
                        tonic::Status::invalid_argument(msg)
                    }
                    UnpackError::Expansion { .. } => tonic::Status::resource_exhausted(msg),
                    UnpackError::Read(_) => tonic::Status::unavailable(msg),
                    UnpackError::Store(e) => store_status(e, msg),
                    UnpackError::Pool(_) => internal(msg),
                },
                SnapshotError::Unsupported(_)
                | SnapshotError::ModeMismatch { .. }
                | SnapshotError::ImagesNeedStubs(_) => internal(msg),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cas::index::IndexError;
    use std::io;
    use tonic::Code;

    fn code(e: impl Into<ServiceError>) -> Code {
        tonic::Status::from(e.into()).code()
    }

    fn io_err(errno: i32) -> CasError {
        CasError::io("mkdir", "/x")(io::Error::from_raw_os_error(errno))
    }

    /// Every variant that reaches containerd, with the code containerd's own
    /// snapshotters (and its diff service) use for the same case.
    #[test]
    fn codes_match_containerd_errdefs() {
        use SnapshotError as S;
        assert_eq!(code(S::NotFound("k".into())), Code::NotFound);
        assert_eq!(code(S::AlreadyExists("k".into())), Code::AlreadyExists);
        let busy = S::FailedPrecondition {
            key: "k".into(),
            reason: "not active",
        };
        assert_eq!(code(busy), Code::FailedPrecondition);
        assert_eq!(code(S::InvalidArgument("x".into())), Code::InvalidArgument);
        let incomplete = cas::idmap::MappingError::Incomplete {
            present: cas::idmap::UID_MAPPING_LABEL,
            missing: cas::idmap::GID_MAPPING_LABEL,
        };
        assert_eq!(code(S::Mapping(incomplete)), Code::InvalidArgument);
        let unmappable = S::IdmapUnavailable {
            key: "k".into(),
            reason: "off".into(),
        };
        assert_eq!(code(unmappable), Code::FailedPrecondition);
        assert_eq!(
            code(ServiceError::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(ServiceError::NotApplicable("x".into())),
            Code::Unimplemented
        );
        assert_eq!(code(io_err(nix::libc::ENOSPC)), Code::ResourceExhausted);
        // a full disk is a full disk whichever layer of the store met it
        let full =
            || ringio::IoError::at("write", "/x")(io::Error::from_raw_os_error(nix::libc::ENOSPC));
        let journal = CasError::Journal(ringio::journal::JournalError::Io(full()));
        assert_eq!(code(journal), Code::ResourceExhausted);
        let durable = CasError::Durable(ringio::durable::DurableError::Io(full()));
        assert_eq!(code(durable), Code::ResourceExhausted);
        let layout = CasError::Layout(cas::LayoutError::Io(full()));
        assert_eq!(code(layout), Code::ResourceExhausted);
        assert_eq!(code(io_err(nix::libc::EIO)), Code::Internal);
        let hostile = CasError::Hostile {
            path: "../x".into(),
            reason: "outside the layer",
        };
        assert_eq!(code(hostile), Code::InvalidArgument);
        let mismatch = S::ModeMismatch {
            stored: cas::StoreMode::Stubs,
            requested: cas::snapshots::RequestedMode::Materialised,
        };
        assert_eq!(code(mismatch), Code::Internal);
        assert_eq!(
            code(S::ImagesNeedStubs(cas::StoreMode::Materialised)),
            Code::Internal
        );
        let probe = cas::probe::ProbeError::Read { got: String::new() };
        assert_eq!(code(S::Unsupported(probe)), Code::Internal);
    }

    /// A blocking task that panicked is the daemon's own failure.
    #[test]
    fn a_failed_task_is_internal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let joined = rt.block_on(async { tokio::task::spawn_blocking(|| panic!("a bug")).await });
        let e = ServiceError::from(joined.unwrap_err());
        assert_eq!(code(e), Code::Internal);
    }

    #[test]
    fn unpack_failures_say_whose_fault_they_are() {
        use UnpackError as U;
        let unpack = |e: U| code(SnapshotError::Unpack(e));
        let d = cas::Digest::of(b"x");
        assert_eq!(
            unpack(U::BlobDigest {
                expected: d,
                actual: d,
                size: 1
            }),
            Code::DataLoss
        );
        assert_eq!(
            unpack(U::Decompress {
                compression: "gzip",
                source: io::Error::other("bad header")
            }),
            Code::InvalidArgument
        );
        assert_eq!(
            unpack(U::Expansion {
                limit: 1,
                blob_size: 1
            }),
            Code::ResourceExhausted
        );
        assert_eq!(
            unpack(U::Tar(io::Error::other("bad"))),
            Code::InvalidArgument
        );
        assert_eq!(unpack(U::Read(io::Error::other("gone"))), Code::Unavailable);
        assert_eq!(
            unpack(U::Store(io_err(nix::libc::ENOSPC))),
            Code::ResourceExhausted
        );
        assert_eq!(unpack(U::Store(io_err(nix::libc::EIO))), Code::Internal);
        assert_eq!(unpack(U::Pool(ringio::PoolError::Stopped)), Code::Internal);
    }

    /// A missing snapshot is `NotFound` however the store reports it.
    #[test]
    fn a_missing_record_is_not_found_however_it_arrives() {
        let via_index: SnapshotError = IndexError::NotFound("k".into()).into();
        assert_eq!(code(via_index), Code::NotFound);
        let via_store: SnapshotError = CasError::Index(IndexError::NotFound("k".into())).into();
        assert_eq!(code(via_store), Code::NotFound);
        assert_eq!(
            code(CasError::Index(IndexError::NotFound("k".into()))),
            Code::NotFound
        );
    }
}
