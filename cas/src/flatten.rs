//! Flattening a chain of committed layers into one stub tree, for chains too deep to
//! name in one mount option.
//!
//! A `lowerdir` of `N` layers plus the data-only `::<cas/objects>` must fit in one page,
//! and containerd cannot shorten it (its relative-path compaction does not understand
//! `::`). Stubs hold no data, so the merged tree of a whole chain is cheap to
//! materialise: [`flatten`] applies overlayfs' own merge rules to the chain and writes the
//! result as one layer, which then stands in for the whole chain.
//!
//! Merge rules (those of overlayfs for the layers containerd writes):
//! * the topmost layer that has a name decides what it is;
//! * a whiteout (character device 0/0) hides the name in every layer below;
//! * a directory merges with directories of the same name below it, down to and including
//!   the first one marked opaque (`trusted.overlay.opaque=y`), and stops at the first
//!   non-directory;
//! * files, symlinks and device nodes are copied as entries (a stub copy keeps its
//!   metacopy and redirect xattrs, so it still reads from the same object); names that
//!   share an inode in their layer share one in the flat tree.
//!
//! The tree is built under a temporary name and renamed into place, so a crash never
//! leaves a partial flat tree behind a name that looks complete.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::CasError;
use crate::stub::{is_overlay_private, FileMeta, XATTR_METACOPY, XATTR_REDIRECT};
use crate::sys::{At, Host, Syscalls};

const XATTR_OPAQUE: &str = "trusted.overlay.opaque";

fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(dir: &Path) -> Result<bool, CasError> {
    Ok(xattr::get(dir, XATTR_OPAQUE)
        .map_err(CasError::io("getxattr", dir))?
        .is_some_and(|v| v == b"y"))
}

struct Flattener {
    /// (dev, ino) of a source inode -> its copy in the flat tree.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories created, with the times to restore once they are complete.
    dir_times: Vec<(PathBuf, fs::Metadata)>,
}

/// Writes the merged tree of `layers` (topmost first) to `out`, building it at `tmp`
/// (same filesystem, must not exist).
pub fn flatten(layers: &[PathBuf], tmp: &Path, out: &Path) -> Result<(), CasError> {
    let mut f = Flattener {
        links: HashMap::new(),
        dir_times: Vec::new(),
    };
    let result = (|| {
        let top = layers.first().ok_or_else(|| CasError::Hostile {
            path: out.to_path_buf(),
            reason: "no layers to flatten",
        })?;
        let md = fs::symlink_metadata(top).map_err(CasError::io("stat", top))?;
        f.make_dir(top, &md, tmp)?;
        f.merge_dir(layers, tmp)?;
        for (dir, md) in f.dir_times.iter().rev() {
            set_times(dir, md)?;
        }
        fs::rename(tmp, out).map_err(CasError::io("rename", out))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(tmp);
    }
    result
}

fn set_times(path: &Path, md: &fs::Metadata) -> Result<(), CasError> {
    FileMeta::from(md).restore_times(&Host, At::Path(path), path)
}

fn set_owner(path: &Path, md: &fs::Metadata) -> Result<(), CasError> {
    Host.chown(At::Path(path), md.uid(), md.gid())
        .map_err(CasError::io("chown", path))
}

/// Copies xattrs from `src` to `dst`; overlayfs' own only where `keep_stub` (a stub's
/// metacopy and redirect, which were written by ingest).
fn copy_xattrs(src: &Path, dst: &Path, keep_stub: bool) -> Result<(), CasError> {
    for name in xattr::list(src).map_err(CasError::io("listxattr", src))? {
        let ours = name == XATTR_METACOPY || name == XATTR_REDIRECT;
        if is_overlay_private(&name) && !(keep_stub && ours) {
            continue;
        }
        if let Some(v) = xattr::get(src, &name).map_err(CasError::io("getxattr", src))? {
            xattr::set(dst, &name, &v).map_err(CasError::io("setxattr", dst))?;
        }
    }
    Ok(())
}

impl Flattener {
    fn make_dir(&mut self, src: &Path, md: &fs::Metadata, dst: &Path) -> Result<(), CasError> {
        fs::create_dir(dst).map_err(CasError::io("mkdir", dst))?;
        set_owner(dst, md)?;
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(CasError::io("chmod", dst))?;
        copy_xattrs(src, dst, false)?;
        self.dir_times.push((dst.to_path_buf(), md.clone()));
        Ok(())
    }

    /// Merges directories `srcs` (same relative path, topmost first, already cut at the
    /// first opaque one) into `dst`.
    fn merge_dir(&mut self, srcs: &[PathBuf], dst: &Path) -> Result<(), CasError> {
        let mut names = BTreeSet::<OsString>::new();
        for s in srcs {
            for e in fs::read_dir(s).map_err(CasError::io("read dir", s))? {
                names.insert(e.map_err(CasError::io("read dir", s))?.file_name());
            }
        }
        for name in names {
            // topmost layer with this name
            let mut found = None;
            for (i, s) in srcs.iter().enumerate() {
                let p = s.join(&name);
                match fs::symlink_metadata(&p) {
                    Ok(md) => {
                        found = Some((i, p, md));
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(CasError::io("stat", p)(e)),
                }
            }
            let Some((i, src, md)) = found else { continue };
            let target = dst.join(&name);
            if is_whiteout(&md) {
                continue;
            }
            if md.is_dir() {
                let mut below = vec![src.clone()];
                if !is_opaque(&src)? {
                    for s in &srcs[i + 1..] {
                        let p = s.join(&name);
                        match fs::symlink_metadata(&p) {
                            Ok(m) if m.is_dir() => {
                                let opaque = is_opaque(&p)?;
                                below.push(p);
                                if opaque {
                                    break;
                                }
                            }
                            Ok(_) => break,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(CasError::io("stat", p)(e)),
                        }
                    }
                }
                self.make_dir(&src, &md, &target)?;
                self.merge_dir(&below, &target)?;
            } else {
                self.copy_entry(&src, &md, &target)?;
            }
        }
        Ok(())
    }

    fn copy_entry(&mut self, src: &Path, md: &fs::Metadata, dst: &Path) -> Result<(), CasError> {
        let key = (md.dev(), md.ino());
        if md.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                return fs::hard_link(first, dst).map_err(CasError::io("link", dst));
            }
        }
        let ft = md.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(src).map_err(CasError::io("readlink", src))?;
            std::os::unix::fs::symlink(&target, dst).map_err(CasError::io("symlink", dst))?;
            set_owner(dst, md)?;
            copy_xattrs(src, dst, false)?;
            set_times(dst, md)?;
            return Ok(());
        }
        if ft.is_file() {
            let f = fs::File::create_new(dst).map_err(CasError::io("create", dst))?;
            f.set_len(md.size())
                .map_err(CasError::io("truncate", dst))?;
        } else {
            let kind = if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else if ft.is_block_device() {
                nix::sys::stat::SFlag::S_IFBLK
            } else if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else {
                nix::sys::stat::SFlag::S_IFSOCK
            };
            Host.mknod(
                dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                md.rdev(),
            )
            .map_err(CasError::io("mknod", dst))?;
        }
        set_owner(dst, md)?;
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(CasError::io("chmod", dst))?;
        copy_xattrs(src, dst, ft.is_file())?;
        set_times(dst, md)?;
        if md.nlink() > 1 {
            self.links.insert(key, dst.to_path_buf());
        }
        Ok(())
    }
}
