//! Durable publication without `RWF_ATOMIC`: temp file, fsync, rename, directory fsync.
//!
//! A reader (or a restart after a crash) sees either the old file or the complete new
//! one, never a prefix: the bytes are made durable in a temporary name in the same
//! directory first, the rename replaces the target atomically, and the directory fsync
//! makes the rename itself survive power loss.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::IoError;

/// Errors of the durable-publish helpers, each naming the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A system call on a path failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The target has no parent directory to hold the temporary file.
    #[error("{0} has no parent directory")]
    NoParent(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| IoError::at_path(op, path)(source).into()
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Replaces `target` with `contents` so that a crash leaves either the old file or the
/// new one. The temporary file lives next to the target (same filesystem, so the rename
/// is atomic) and is removed if anything fails before the rename.
pub fn replace_file(target: &Path, contents: &[u8]) -> Result<(), DurableError> {
    let dir = target
        .parent()
        .ok_or_else(|| DurableError::NoParent(target.to_path_buf()))?;
    let name = target
        .file_name()
        .ok_or_else(|| DurableError::NoParent(target.to_path_buf()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(contents).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, target).map_err(io_err("rename", target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_writes_and_overwrites_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        replace_file(&target, b"one").unwrap();
        replace_file(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");
    }

    #[test]
    fn replace_into_missing_dir_fails_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing/f");
        let err = replace_file(&target, b"x").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
