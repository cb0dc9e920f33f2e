//! ID-mapped mounts: the kernel calls behind a user-namespaced container's view of a
//! layer, without a copy of the layer.
//!
//! An ID-mapped mount (`mount_setattr(MOUNT_ATTR_IDMAP)`, Linux 5.12+) shows a tree with
//! its owners translated through a user namespace's mapping: a file owned by 0 on disk
//! appears owned by the namespace's host ID for 0. The namespace only lends its mapping;
//! nothing runs in it. Making one takes three steps, which [`UserNs::new`] and
//! [`clone_idmapped`] wrap:
//!
//! 1. a user namespace with the mapping: a forked child `unshare(CLONE_NEWUSER)`s, the
//!    parent writes its `uid_map` and `gid_map`, opens `/proc/<pid>/ns/user` and lets the
//!    child go (the namespace lives as long as the descriptor);
//! 2. `open_tree(OPEN_TREE_CLONE)` of the source: a detached copy of its mount;
//! 3. `mount_setattr` on the copy with the namespace's descriptor, then `move_mount` to
//!    the target.
//!
//! overlayfs accepts ID-mapped lower layers (Linux 5.19+) next to unmapped ones, which
//! is what a store needs: its layers mapped, its data-only object layer as it is.

// The calls have no wrapper in `nix`; each block names its invariant.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One range of a mapping: IDs `inside..inside+count` in the namespace are
/// `outside..outside+count` on the host (a line of `/proc/<pid>/uid_map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdRange {
    /// First ID inside the namespace (the container's).
    pub inside: u32,
    /// First ID outside (the host's).
    pub outside: u32,
    /// How many IDs.
    pub count: u32,
}

/// A user namespace held open by its descriptor, carrying a mapping.
#[derive(Debug)]
pub struct UserNs(OwnedFd);

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn map_text(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect()
}

impl UserNs {
    /// A new user namespace whose `uid_map` and `gid_map` are `uids` and `gids`.
    /// Needs `CAP_SETUID`/`CAP_SETGID` over the host IDs named (root has them).
    pub fn new(uids: &[IdRange], gids: &[IdRange]) -> io::Result<UserNs> {
        let (ready_r, ready_w) = nix::unistd::pipe()?;
        let (hold_r, hold_w) = nix::unistd::pipe()?;
        // SAFETY: the child only makes raw system calls (unshare, write, read, _exit):
        // async-signal-safe, so forking a multithreaded process is sound. It allocates
        // nothing and touches no lock another thread could hold, and it never returns
        // into Rust code: every path ends in `_exit`.
        let fork = unsafe { nix::unistd::fork() }?;
        let child = match fork {
            nix::unistd::ForkResult::Child => {
                // SAFETY: see above; the fds are this process's own copies of the pipes.
                unsafe {
                    let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                        1
                    } else {
                        0
                    };
                    libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
                    libc::close(hold_w.as_raw_fd());
                    let mut b = 0u8;
                    // Wait until the parent has the namespace (EOF), then go.
                    libc::read(hold_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
                    libc::_exit(0);
                }
            }
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(ready_w);
        drop(hold_r);
        let result = (|| {
            let mut ok = [0u8; 1];
            let n = File::from(ready_r).read(&mut ok)?;
            if n != 1 || ok[0] != 1 {
                return Err(io::Error::other(
                    "unshare(CLONE_NEWUSER) failed in the child",
                ));
            }
            let proc = format!("/proc/{}", child.as_raw());
            for (file, ranges) in [("uid_map", uids), ("gid_map", gids)] {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("{proc}/{file}"))?
                    .write_all(map_text(ranges).as_bytes())?;
            }
            Ok(UserNs(OwnedFd::from(File::open(format!(
                "{proc}/ns/user"
            ))?)))
        })();
        drop(hold_w);
        let _ = nix::sys::wait::waitpid(child, None);
        result
    }
}

/// Clones the mount at (or the tree below) `source`, ID-mapped through `ns` and
/// read-only, and attaches the clone at `target` (an existing directory).
pub fn clone_idmapped(source: &Path, target: &Path, ns: &UserNs) -> io::Result<()> {
    let src = cpath(source)?;
    let dst = cpath(target)?;
    // SAFETY: `src` is a NUL-terminated path that outlives the call; the flags are
    // open_tree(2)'s. A non-negative result is a new descriptor that we own.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `tree` is the descriptor open_tree just returned, owned by no one else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: ns.0.as_raw_fd() as u64,
    };
    // SAFETY: `tree` is an open detached mount; the empty path with AT_EMPTY_PATH names
    // it; `attr` is a valid `mount_attr` of the size passed, read only during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; `dst` is a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is the root of a mount (`statx`'s `STATX_ATTR_MOUNT_ROOT`, Linux 5.8+),
/// whatever the filesystem: how a directory that may hold an ID-mapped clone of a layer
/// tells whether it does.
pub fn is_mount_root(path: &Path) -> io::Result<bool> {
    let p = cpath(path)?;
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is NUL-terminated and outlives the call; `st` is a valid, writable
    // `statx` the kernel fills.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            p.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut st,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(st.stx_attributes_mask & bit != 0 && st.stx_attributes & bit != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn map_lines_as_the_kernel_reads_them() {
        let r = [
            IdRange {
                inside: 0,
                outside: 100_000,
                count: 65_536,
            },
            IdRange {
                inside: 65_536,
                outside: 300_000,
                count: 1,
            },
        ];
        assert_eq!(map_text(&r), "0 100000 65536\n65536 300000 1\n");
    }

    #[test]
    fn a_plain_directory_is_no_mount_root_and_slash_is() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_root(d.path()).unwrap());
        assert!(is_mount_root(Path::new("/")).unwrap());
        assert!(is_mount_root(&d.path().join("missing")).is_err());
    }

    #[test]
    #[ignore = "needs root: user namespaces with host mappings and mounts (make unit runs it)"]
    fn an_idmapped_clone_shows_the_mapped_owners() {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        nix::unistd::chown(&src.join("f"), Some(7.into()), Some(8.into())).unwrap();
        let range = |outside| IdRange {
            inside: 0,
            outside,
            count: 65_536,
        };
        let ns = UserNs::new(&[range(100_000)], &[range(200_000)]).unwrap();
        clone_idmapped(&src, &dst, &ns).unwrap();
        let md = std::fs::metadata(dst.join("f"));
        let mounted = is_mount_root(&dst).unwrap();
        let _ = nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH);
        let md = md.unwrap();
        assert!(mounted);
        assert_eq!((md.uid(), md.gid()), (100_007, 200_008));
        // read-only: the mapping is for reading lower layers
        assert!(!is_mount_root(&dst).unwrap());
    }
}
