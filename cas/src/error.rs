//! Errors of the store.

use std::io;
use std::path::PathBuf;

use ringio::IoError;

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A layer entry would make the store unsafe (e.g. an entry outside the layer).
    #[error("{path}: {reason}")]
    Hostile {
        /// The offending entry.
        path: PathBuf,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A durable publish (temp + fsync + rename) failed.
    #[error(transparent)]
    Durable(#[from] ringio::durable::DurableError),
    /// The commit journal failed.
    #[error(transparent)]
    Journal(ringio::journal::JournalError),
    /// The layout (version or mode marker) failed.
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    /// A manifest line could not be parsed.
    #[error("manifest {path} line {line}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl CasError {
    /// Builds a closure that wraps an [`io::Error`] with its operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CasError {
        let path = path.into();
        move |source| CasError::Io(IoError { op, path, source })
    }

    /// Whether the cause is a name that exists already (`EEXIST`).
    pub fn is_already_exists(&self) -> bool {
        matches!(self, CasError::Io(e) if e.kind() == io::ErrorKind::AlreadyExists)
    }

    /// Whether the underlying cause is a full disk.
    pub fn is_enospc(&self) -> bool {
        use ringio::journal::JournalError;
        match self {
            CasError::Io(e) | CasError::Journal(JournalError::Io(e)) => e.is_enospc(),
            CasError::Durable(ringio::durable::DurableError::Io(e)) => e.is_enospc(),
            CasError::Layout(crate::layout::LayoutError::Io(e)) => e.is_enospc(),
            _ => false,
        }
    }
}
