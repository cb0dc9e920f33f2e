//! The one I/O error of the workspace: a system call, the path it was applied to, and
//! what the kernel answered. Every crate's error enum wraps it (`Io(IoError)`) rather
//! than repeating the three fields, so callers ask one type whether a failure was a
//! full disk or a name that exists.

use std::io;
use std::path::{Path, PathBuf};

/// A system call on a path failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct IoError {
    /// The operation (`open`, `write`, `rename`, `mkdir`, …).
    pub op: &'static str,
    /// The path it was applied to.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// Wraps an [`io::Error`] of `op` on `path`: `map_err(IoError::at("open", p))`.
    pub fn at(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> IoError {
        let path = path.into();
        move |source| IoError { op, path, source }
    }

    /// The same, borrowing the path until an error happens.
    pub fn at_path<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IoError + 'a {
        move |source| IoError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// What kind of error the OS reported.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// Whether the filesystem is full (`ENOSPC`).
    pub fn is_enospc(&self) -> bool {
        self.source.raw_os_error() == Some(nix::libc::ENOSPC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_where_and_why() {
        let e = IoError::at("mkdir", "/x")(io::Error::from_raw_os_error(nix::libc::ENOSPC));
        assert!(e.is_enospc());
        assert!(e.to_string().starts_with("mkdir /x: "), "{e}");
        let e = IoError::at("link", "/y")(io::Error::from(io::ErrorKind::AlreadyExists));
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(!e.is_enospc());
    }
}
