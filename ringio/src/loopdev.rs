//! Loop devices: a regular file served as a read-only block device, for kernels whose
//! EROFS mounts only from a block device (before Linux 6.12, or built without
//! `CONFIG_EROFS_FS_BACKED_BY_FILE`).
//!
//! [`LoopDevice::attach`] configures a free device in one call, `LOOP_CONFIGURE`
//! (Linux 5.8+), as `losetup` does: the backing file, read-only, the block size and
//! *autoclear*, so the kernel detaches the file at the device's last close. The caller
//! mounts the device while it holds the [`LoopDevice`]; the filesystem then keeps the
//! device open, and once it is unmounted (and every overlay holding a clone of it has
//! gone) the device is free again without anyone detaching it. Dropping a `LoopDevice`
//! that nothing mounted detaches it at once.
//!
//! Direct I/O is asked for, so the device reads its file without a second copy of the
//! image in the page cache; a kernel or filesystem that refuses it gets the device
//! without it ([`LoopDevice::direct_io`] tells).

// The loop ioctls have no wrapper in `nix` or `libc`; each block names its invariant.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// `LOOP_CONFIGURE` (`<linux/loop.h>`).
const LOOP_CONFIGURE: u64 = 0x4C0A;
/// `LOOP_CTL_GET_FREE`.
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
/// `LO_FLAGS_READ_ONLY`.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_DIRECT_IO`.
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// How many free devices are tried when other processes take them first.
const ATTEMPTS: usize = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfigRaw {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfigRaw>() == 304);

impl LoopConfigRaw {
    fn new(fd: u32, block_size: u32, flags: u32) -> LoopConfigRaw {
        LoopConfigRaw {
            fd,
            block_size,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        }
    }
}

/// A loop device configured over a backing file, held open.
#[derive(Debug)]
pub struct LoopDevice {
    /// The device, held open: it stays attached while this is open or a mount holds it.
    file: File,
    path: PathBuf,
    direct_io: bool,
}

impl LoopDevice {
    /// Attaches `backing` (opened for reading) read-only and with autoclear to a free
    /// loop device, with logical blocks of `block_size` bytes (a power of two from 512
    /// to the page size; the backing file's size should be a multiple of it).
    ///
    /// Errors: the open of `/dev/loop-control` or of the device (`EACCES`/`EPERM`
    /// without the right to them, `ENOENT` without the loop driver), `LOOP_CTL_GET_FREE`
    /// (`ENODEV`/`ENOSPC` with no free device to be had), `EBUSY` when every device
    /// tried was taken first by another process, or `LOOP_CONFIGURE`'s own refusal
    /// (`EINVAL` for a block size the kernel does not take).
    pub fn attach(backing: &File, block_size: u32) -> io::Result<LoopDevice> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        let mut last = io::Error::from_raw_os_error(libc::EBUSY);
        for _ in 0..ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number
            // or -1 with errno; `control` is an open descriptor of the control device.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as libc::Ioctl) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let file = OpenOptions::new().read(true).open(&path)?;
            match configure(&file, backing, block_size) {
                Ok(asked_direct) => {
                    // older kernels turn direct I/O off without an error
                    let direct_io = asked_direct && sysfs(&path, "dio").as_deref() == Some("1");
                    return Ok(LoopDevice {
                        file,
                        path,
                        direct_io,
                    });
                }
                // Another process configured this device between the two calls.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The device node, `/dev/loop<N>`, to mount.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device reads its backing file with direct I/O.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }
}

impl AsFd for LoopDevice {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `LOOP_CONFIGURE` of `device` over `backing`, with direct I/O if the kernel takes it
/// (then again without: kernels refuse it with `EINVAL` for files that cannot do it).
/// Returns whether direct I/O was accepted.
fn configure(device: &File, backing: &File, block_size: u32) -> io::Result<bool> {
    let base = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
    let fd = backing.as_raw_fd() as u32;
    let mut last = None;
    for (flags, direct) in [(base | LO_FLAGS_DIRECT_IO, true), (base, false)] {
        let config = LoopConfigRaw::new(fd, block_size, flags);
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is
        // (layout asserted above), alive for the call; both descriptors are open.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE as libc::Ioctl,
                &config as *const LoopConfigRaw,
            )
        };
        if rc == 0 {
            return Ok(direct);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

/// The file the loop device `device` (`/dev/loop<N>`) is attached to, as sysfs tells;
/// `None` when it is attached to none.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    sysfs(device, "backing_file").map(|f| f.trim_end_matches(" (deleted)").into())
}

/// `/sys/block/loop<N>/loop/<what>` of the device `/dev/loop<N>`, trimmed.
fn sysfs(device: &Path, what: &str) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let v = std::fs::read_to_string(format!("/sys/block/{name}/loop/{what}")).ok()?;
    Some(v.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    #[ignore = "needs root and the loop driver (make unit runs it)"]
    fn a_file_attaches_read_only_and_goes_at_the_last_close() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("image");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let backing = File::open(&path).unwrap();
        let dev = LoopDevice::attach(&backing, 4096).unwrap();
        assert_eq!(
            backing_file(dev.path()).as_deref(),
            Some(path.as_path()),
            "{}",
            dev.path().display()
        );
        assert_eq!(sysfs(dev.path(), "autoclear").as_deref(), Some("1"));
        let name = dev
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let ro = std::fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap();
        assert_eq!(ro.trim(), "1");
        let bs = std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size"));
        assert_eq!(bs.unwrap().trim(), "4096");
        // The device reads the file's bytes.
        let mut buf = vec![0u8; 8192];
        nix::sys::uio::pread(dev.as_fd(), &mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(
            dev.direct_io(),
            sysfs(dev.path(), "dio").as_deref() == Some("1")
        );
        let device = dev.path().to_path_buf();
        drop(dev);
        // Autoclear: the last close detached the file (the kernel may take a moment).
        let detached = (0..100).any(|_| {
            let gone = backing_file(&device).as_deref() != Some(path.as_path());
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(detached, "/dev/{name} still holds {}", path.display());
    }
}
