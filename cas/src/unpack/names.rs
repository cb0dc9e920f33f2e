//! Name rules: what a tar entry asks of the layer, decided from its header alone before
//! anything is written.
//!
//! Names are cleaned lexically against the layer root (`a/../../b` is `b`), as
//! containerd's applier does with `filepath.Clean("/" + name)`. The OCI whiteout names
//! are told apart here: `.wh..wh..opq` makes its directory opaque, other `.wh..wh.`
//! names are reserved and skipped, and `.wh.<name>` hides `<name>`, which must be a
//! plain name (`.wh..` would hide the directory above). What the parent directory
//! resolves to on disk (symlinks inside the layer) is decided later, when the
//! operation is carried out (the unpack's `tree` module).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::CasError;

/// The overlayfs whiteout prefix of the OCI layer format.
const WHITEOUT: &[u8] = b".wh.";
/// The OCI opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of the AUFS metadata names the OCI format reserves (skipped).
const WHITEOUT_META: &[u8] = b".wh..wh.";

/// Cleans a tar name lexically against the layer root, as `filepath.Clean("/" + name)`
/// does: `.` and empty components vanish, `..` never climbs above the root. Returns the
/// relative path (empty for the root itself).
pub fn clean_name(name: &[u8]) -> PathBuf {
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in name.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    let mut p = PathBuf::new();
    for c in out {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// What the header of one tar entry says, as far as the name rules care.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    /// The entry's name as archived.
    pub name: &'a [u8],
    /// Its type.
    pub kind: tar::EntryType,
    /// A link's target as archived.
    pub link: Option<&'a [u8]>,
    /// A device's major and minor numbers.
    pub device: (u32, u32),
}

/// What an entry at a name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (merged with one already there).
    Dir,
    /// A regular file: a stub of its content, or an empty file.
    Regular,
    /// A symlink to this target, kept as archived.
    Symlink(OsString),
    /// A hardlink to an earlier entry of the layer, named by its cleaned path.
    Hardlink(PathBuf),
    /// A character device.
    Char(u32, u32),
    /// A block device.
    Block(u32, u32),
    /// A FIFO.
    Fifo,
    /// A type the layer format has no use for here (GNU long-name records are read by
    /// the tar parser; a PAX global header, an unknown type): skipped.
    Other(tar::EntryType),
}

/// What a tar entry asks of the layer. `parent` is the cleaned parent path, relative
/// to the layer root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// The entry is the layer root itself: ignored.
    Root,
    /// `.wh..wh..opq`: the directory `parent` hides what the layers below hold in it.
    Opaque {
        /// The directory.
        parent: PathBuf,
    },
    /// Another `.wh..wh.` name: reserved by the format, skipped (its parent is made).
    Reserved {
        /// The parent directory.
        parent: PathBuf,
    },
    /// `.wh.<name>`: `name` of the layers below is hidden.
    Whiteout {
        /// The parent directory.
        parent: PathBuf,
        /// The hidden name.
        name: OsString,
    },
    /// An entry `name` in `parent`.
    Make {
        /// The parent directory.
        parent: PathBuf,
        /// The entry's name.
        name: OsString,
        /// What it is.
        kind: EntryKind,
    },
}

/// Classifies one entry. Fails only for names no layer may carry.
pub fn classify(h: &Header<'_>) -> Result<Operation, CasError> {
    let cleaned = clean_name(h.name);
    let Some(base) = cleaned.file_name() else {
        return Ok(Operation::Root);
    };
    let parent = cleaned.parent().map(PathBuf::from).unwrap_or_default();
    let base = base.as_bytes();
    if base.starts_with(WHITEOUT) {
        if base == OPAQUE {
            return Ok(Operation::Opaque { parent });
        }
        if base.starts_with(WHITEOUT_META) {
            return Ok(Operation::Reserved { parent });
        }
        let hidden = &base[WHITEOUT.len()..];
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(CasError::Hostile {
                path: cleaned,
                reason: "a whiteout must name an entry of its directory",
            });
        }
        return Ok(Operation::Whiteout {
            parent,
            name: OsStr::from_bytes(hidden).to_os_string(),
        });
    }
    use tar::EntryType as T;
    let kind = match h.kind {
        T::Directory => EntryKind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::Regular,
        T::Symlink => {
            EntryKind::Symlink(OsStr::from_bytes(h.link.unwrap_or_default()).to_os_string())
        }
        T::Link => EntryKind::Hardlink(clean_name(h.link.unwrap_or_default())),
        T::Char => EntryKind::Char(h.device.0, h.device.1),
        T::Block => EntryKind::Block(h.device.0, h.device.1),
        // a FIFO's device fields mean nothing (and are often blank)
        T::Fifo => EntryKind::Fifo,
        other => EntryKind::Other(other),
    };
    Ok(Operation::Make {
        parent,
        name: OsStr::from_bytes(base).to_os_string(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType as T;

    fn op(name: &str, kind: T) -> Operation {
        classify(&Header {
            name: name.as_bytes(),
            kind,
            link: None,
            device: (0, 0),
        })
        .unwrap()
    }

    fn make(parent: &str, name: &str, kind: EntryKind) -> Operation {
        Operation::Make {
            parent: parent.into(),
            name: name.into(),
            kind,
        }
    }

    #[test]
    fn names_are_cleaned_against_the_root() {
        assert_eq!(clean_name(b"a/b/c"), PathBuf::from("a/b/c"));
        assert_eq!(clean_name(b"./a//b/"), PathBuf::from("a/b"));
        assert_eq!(clean_name(b"../../etc/passwd"), PathBuf::from("etc/passwd"));
        assert_eq!(clean_name(b"a/../../b"), PathBuf::from("b"));
        assert_eq!(clean_name(b"/abs/path"), PathBuf::from("abs/path"));
        assert_eq!(clean_name(b"."), PathBuf::new());
        assert_eq!(clean_name(b".."), PathBuf::new());
    }

    #[test]
    fn entries_never_name_anything_outside_the_layer() {
        assert_eq!(
            op("../../etc/passwd", T::Regular),
            make("etc", "passwd", EntryKind::Regular)
        );
        assert_eq!(op("a/../../b", T::Directory), make("", "b", EntryKind::Dir));
        for root in ["", ".", "./", "..", "../..", "/", "a/.."] {
            assert_eq!(op(root, T::Directory), Operation::Root, "{root:?}");
        }
    }

    #[test]
    fn whiteouts_and_opaque_markers() {
        assert_eq!(
            op("etc/.wh.passwd", T::Regular),
            Operation::Whiteout {
                parent: "etc".into(),
                name: "passwd".into()
            }
        );
        assert_eq!(
            op("a/b/.wh..wh..opq", T::Regular),
            Operation::Opaque {
                parent: "a/b".into()
            }
        );
        assert_eq!(
            op(".wh..wh..opq", T::Regular),
            Operation::Opaque { parent: "".into() }
        );
        assert_eq!(
            op("x/.wh..wh.plnk", T::Regular),
            Operation::Reserved { parent: "x".into() }
        );
        // a whiteout hides a name of its own directory, never the directory or above
        for bad in [".wh.", "d/.wh..", "d/.wh..."] {
            let h = Header {
                name: bad.as_bytes(),
                kind: T::Regular,
                link: None,
                device: (0, 0),
            };
            assert!(
                matches!(classify(&h), Err(CasError::Hostile { .. })),
                "{bad:?} must be refused"
            );
        }
        // a whiteout's own type does not matter (writers use 0-byte files or devices)
        assert!(matches!(op("d/.wh.f", T::Char), Operation::Whiteout { .. }));
    }

    #[test]
    fn link_targets() {
        let h = |kind, link: &'static str| Header {
            name: b"d/l",
            kind,
            link: Some(link.as_bytes()),
            device: (0, 0),
        };
        // symlinks keep their target as archived: it is resolved at use, by the kernel
        assert_eq!(
            classify(&h(T::Symlink, "../../x")).unwrap(),
            make("d", "l", EntryKind::Symlink("../../x".into()))
        );
        // hardlinks name an entry of the layer, cleaned like every name
        assert_eq!(
            classify(&h(T::Link, "../../etc/shadow")).unwrap(),
            make("d", "l", EntryKind::Hardlink("etc/shadow".into()))
        );
    }

    #[test]
    fn entry_types() {
        let dev = |kind| {
            classify(&Header {
                name: b"dev/x",
                kind,
                link: None,
                device: (1, 3),
            })
            .unwrap()
        };
        assert_eq!(dev(T::Char), make("dev", "x", EntryKind::Char(1, 3)));
        assert_eq!(dev(T::Block), make("dev", "x", EntryKind::Block(1, 3)));
        assert_eq!(dev(T::Fifo), make("dev", "x", EntryKind::Fifo));
        for regular in [T::Regular, T::Continuous, T::GNUSparse] {
            assert_eq!(op("f", regular), make("", "f", EntryKind::Regular));
        }
        assert_eq!(
            op("v", T::XGlobalHeader),
            make("", "v", EntryKind::Other(T::XGlobalHeader))
        );
    }
}
