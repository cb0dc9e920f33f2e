//! The calls that need root, behind one seam.
//!
//! The store's rules (which mode a store gets, what a tar entry may do, how a stub is
//! made) are plain code; the few calls only root can make go through [`Syscalls`]: the
//! kernel probes (mounts), mounting (from their file or through a loop device) and
//! unmounting layer images, `mknod`, changing
//! owners, overlayfs' `trusted.*` xattrs, and restoring file times (the one way the
//! store does it). The daemon and `casctl` use
//! [`Host`], the real calls. Unit tests use a recording fake (`sys::fake::Recorder`,
//! built for tests only), so the rules are tested without root: it records every call,
//! makes a plain empty file where a device would be, keeps `trusted.*` xattrs as
//! `user.*` ones of the same file, and changes owners nowhere.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use xattr::FileExt;

use crate::probe::ProbeError;

/// What a call acts on: a path (a symlink itself, never its target) or an open file.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    /// A path, not followed if it is a symlink.
    Path(&'a Path),
    /// An open file.
    File(&'a File),
}

/// How layer images are mounted (`[store] image_mounts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageMounts {
    /// From the image file itself where the kernel can (Linux 6.12+); through a loop
    /// device where it says the source must be a block device (`ENOTBLK`).
    #[default]
    Auto,
    /// Always through a loop device.
    Loop,
}

/// What a layer image was mounted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    /// The image file itself (EROFS' file-backed mounts).
    File,
    /// A read-only loop device over the file, released by the kernel once the image is
    /// unmounted and no overlay holds it (see [`ringio::loopdev`]).
    Loop {
        /// Whether the device reads the file with direct I/O (one copy of the image in
        /// the page cache instead of two).
        direct_io: bool,
    },
}

/// The calls of the store that need root (or, for times, the owner).
pub trait Syscalls: Send + Sync + std::fmt::Debug {
    /// Whether this kernel's overlayfs serves stubs from a data-only lower layer: a
    /// scratch mount under `scratch` (see [`crate::probe`]).
    fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError>;

    /// Whether this kernel mounts a layer's EROFS image (as `how` says) and serves it
    /// as an overlayfs lower layer over the data-only one (see [`crate::probe`]); what
    /// the image was mounted from.
    fn probe_layer_images(
        &self,
        scratch: &Path,
        how: ImageMounts,
    ) -> Result<ImageSource, ProbeError>;

    /// Mounts the EROFS image `image` (a regular file) read-only at `at`, as `how`
    /// says; what it was mounted from.
    fn mount_image(&self, image: &Path, at: &Path, how: ImageMounts) -> io::Result<ImageSource>;

    /// Whether layers can be ID-mapped under overlayfs (see [`crate::idmap`]), tried in
    /// `scratch` on a layer of the kind new layers are.
    fn probe_idmapped_layers(
        &self,
        scratch: &Path,
        layer: crate::probe::ProbeLayer,
    ) -> Result<(), ProbeError>;

    /// Attaches an ID-mapped, read-only clone of each `source` at its `target`, through
    /// one user namespace carrying `map`.
    fn idmap_clones(
        &self,
        map: &crate::idmap::IdMapping,
        clones: &[crate::idmap::Clone],
    ) -> io::Result<()>;

    /// Detaches the mount at `at` (lazily: users of it keep it until they let go).
    fn unmount(&self, at: &Path) -> io::Result<()>;

    /// Makes a device node, a FIFO or a whiteout (a 0/0 character device) at `path`,
    /// which must not exist.
    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> io::Result<()>;

    /// Changes the owner.
    fn chown(&self, at: At<'_>, uid: u32, gid: u32) -> io::Result<()>;

    /// Sets one of overlayfs' `trusted.*` xattrs (metacopy, redirect, opaque).
    fn set_trusted_xattr(&self, at: At<'_>, name: &str, value: &[u8]) -> io::Result<()>;

    /// Reads one of overlayfs' `trusted.*` xattrs (`None` when the file has none).
    fn trusted_xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>>;

    /// Sets the access and modification times: last, since every other change of a
    /// file touches them.
    fn set_times(&self, at: At<'_>, atime: &TimeSpec, mtime: &TimeSpec) -> io::Result<()>;
}

/// The real calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Syscalls for Host {
    fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError> {
        crate::probe::probe_data_only_lowers(scratch)
    }

    fn probe_layer_images(
        &self,
        scratch: &Path,
        how: ImageMounts,
    ) -> Result<ImageSource, ProbeError> {
        crate::probe::probe_layer_images(scratch, how)
    }

    fn mount_image(&self, image: &Path, at: &Path, how: ImageMounts) -> io::Result<ImageSource> {
        mount_erofs(image, at, how)
    }

    fn probe_idmapped_layers(
        &self,
        scratch: &Path,
        layer: crate::probe::ProbeLayer,
    ) -> Result<(), ProbeError> {
        crate::probe::probe_idmapped_layers(scratch, layer)
    }

    fn idmap_clones(
        &self,
        map: &crate::idmap::IdMapping,
        clones: &[crate::idmap::Clone],
    ) -> io::Result<()> {
        let ns = ringio::idmap::UserNs::new(&map.uids, &map.gids)?;
        for c in clones {
            ringio::idmap::clone_idmapped(&c.source, &c.target, &ns)?;
        }
        Ok(())
    }

    fn unmount(&self, at: &Path) -> io::Result<()> {
        Ok(nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)?)
    }

    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> io::Result<()> {
        Ok(nix::sys::stat::mknod(path, kind, perm, dev)?)
    }

    fn chown(&self, at: At<'_>, uid: u32, gid: u32) -> io::Result<()> {
        let (uid, gid) = (Some(uid.into()), Some(gid.into()));
        match at {
            At::Path(p) => {
                nix::unistd::fchownat(None, p, uid, gid, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?
            }
            At::File(f) => nix::unistd::fchown(f.as_raw_fd(), uid, gid)?,
        }
        Ok(())
    }

    fn set_trusted_xattr(&self, at: At<'_>, name: &str, value: &[u8]) -> io::Result<()> {
        match at {
            At::Path(p) => xattr::set(p, name, value),
            At::File(f) => f.set_xattr(name, value),
        }
    }

    fn trusted_xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
        xattr::get(path, name)
    }

    fn set_times(&self, at: At<'_>, atime: &TimeSpec, mtime: &TimeSpec) -> io::Result<()> {
        match at {
            At::Path(p) => {
                nix::sys::stat::utimensat(None, p, atime, mtime, UtimensatFlags::NoFollowSymlink)?
            }
            At::File(f) => nix::sys::stat::futimens(f.as_raw_fd(), atime, mtime)?,
        }
        Ok(())
    }
}

/// The block size of a loop device under an image: EROFS' (the images are whole
/// blocks of it).
const LOOP_BLOCK_SIZE: u32 = crate::erofs::format::BLOCK_SIZE as u32;

/// Mounts the EROFS image `image` read-only at `at`: from the file, or through a loop
/// device (for `how` = [`ImageMounts::Loop`], or where the kernel refuses a regular file
/// with `ENOTBLK`: before Linux 6.12, or built without file-backed EROFS).
pub fn mount_erofs(image: &Path, at: &Path, how: ImageMounts) -> io::Result<ImageSource> {
    use nix::mount::MsFlags;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let mount =
        |source: &Path| nix::mount::mount(Some(source), at, Some("erofs"), flags, None::<&str>);
    if how == ImageMounts::Auto {
        match mount(image) {
            Ok(()) => return Ok(ImageSource::File),
            Err(nix::errno::Errno::ENOTBLK) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let file = File::open(image)?;
    let device = ringio::loopdev::LoopDevice::attach(&file, LOOP_BLOCK_SIZE)?;
    // the device stays attached while the mount holds it; dropping ours after the
    // mount (or after a failed one) leaves the kernel to detach it at the last close
    mount(device.path())?;
    Ok(ImageSource::Loop {
        direct_io: device.direct_io(),
    })
}

/// A recording fake of [`Syscalls`] for unit tests.
#[cfg(test)]
pub mod fake {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use nix::sys::stat::{Mode, SFlag};
    use nix::sys::time::TimeSpec;
    use xattr::FileExt;

    use super::{At, Host, Syscalls};
    use crate::probe::ProbeError;

    /// One call the fake received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// [`Syscalls::probe_data_only_lowers`] with this scratch directory.
        Probe(PathBuf),
        /// [`Syscalls::probe_layer_images`] with this scratch directory.
        ProbeImages(PathBuf),
        /// [`Syscalls::mknod`]: path, file type, device number.
        Mknod(PathBuf, SFlag, u64),
        /// [`Syscalls::chown`]: path, owner, group.
        Chown(PathBuf, u32, u32),
        /// [`Syscalls::set_trusted_xattr`]: path, name, value.
        SetTrusted(PathBuf, String, Vec<u8>),
    }

    /// Records calls; the probe succeeds when `data_only` is set.
    #[derive(Debug, Default)]
    pub struct Recorder {
        /// Whether the probe finds data-only lower layers.
        pub data_only: bool,
        /// Every call, in order.
        pub calls: Mutex<Vec<Call>>,
    }

    /// Where the fake keeps `trusted.<x>`: `user.trusted.<x>` of the same file.
    fn user_name(name: &str) -> String {
        format!("user.{name}")
    }

    /// The path of an open file, for the record.
    fn path_of(f: &File) -> PathBuf {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap_or_default()
    }

    fn path(at: At<'_>) -> PathBuf {
        match at {
            At::Path(p) => p.to_path_buf(),
            At::File(f) => path_of(f),
        }
    }

    impl Recorder {
        /// A fake kernel with (`true`) or without data-only lower layers.
        pub fn new(data_only: bool) -> Recorder {
            Recorder {
                data_only,
                calls: Mutex::default(),
            }
        }

        /// The calls so far.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn record(&self, call: Call) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl Syscalls for Recorder {
        fn probe_data_only_lowers(&self, scratch: &Path) -> Result<(), ProbeError> {
            self.record(Call::Probe(scratch.to_path_buf()));
            if self.data_only {
                Ok(())
            } else {
                Err(ProbeError::Mount {
                    options: "metacopy=on,lowerdir=stubs::data".into(),
                    errno: nix::errno::Errno::EINVAL,
                })
            }
        }

        /// The fake mounts nothing: layers on it are stub trees.
        fn probe_layer_images(
            &self,
            scratch: &Path,
            _how: super::ImageMounts,
        ) -> Result<super::ImageSource, ProbeError> {
            self.record(Call::ProbeImages(scratch.to_path_buf()));
            Err(ProbeError::Mount {
                options: "erofs".into(),
                errno: nix::errno::Errno::ENODEV,
            })
        }

        fn mount_image(
            &self,
            _image: &Path,
            _at: &Path,
            _how: super::ImageMounts,
        ) -> io::Result<super::ImageSource> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }

        /// Nor does it ID-map: mapped snapshots on it need chowned layers.
        fn probe_idmapped_layers(
            &self,
            _scratch: &Path,
            _layer: crate::probe::ProbeLayer,
        ) -> Result<(), ProbeError> {
            Err(ProbeError::Idmap(io::Error::from(
                io::ErrorKind::Unsupported,
            )))
        }

        fn idmap_clones(
            &self,
            _map: &crate::idmap::IdMapping,
            _clones: &[crate::idmap::Clone],
        ) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }

        fn unmount(&self, _at: &Path) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(nix::libc::EINVAL))
        }

        /// A plain empty file stands in for the node; the name is taken as by mknod.
        fn mknod(&self, path: &Path, kind: SFlag, _perm: Mode, dev: u64) -> io::Result<()> {
            OpenOptions::new().write(true).create_new(true).open(path)?;
            self.record(Call::Mknod(path.to_path_buf(), kind, dev));
            Ok(())
        }

        fn chown(&self, at: At<'_>, uid: u32, gid: u32) -> io::Result<()> {
            self.record(Call::Chown(path(at), uid, gid));
            Ok(())
        }

        fn set_trusted_xattr(&self, at: At<'_>, name: &str, value: &[u8]) -> io::Result<()> {
            match at {
                At::Path(p) => xattr::set(p, user_name(name), value)?,
                At::File(f) => f.set_xattr(user_name(name), value)?,
            }
            self.record(Call::SetTrusted(path(at), name.to_string(), value.to_vec()));
            Ok(())
        }

        fn trusted_xattr(&self, path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
            xattr::get(path, user_name(name))
        }

        fn set_times(&self, at: At<'_>, atime: &TimeSpec, mtime: &TimeSpec) -> io::Result<()> {
            Host.set_times(at, atime, mtime)
        }
    }
}
