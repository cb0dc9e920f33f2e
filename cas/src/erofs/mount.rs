//! Layer images at their mount points: a layer whose metadata is an image
//! (`snapshots/<id>/layer.erofs`) is mounted read-only at its own `fs` directory, so
//! every mount the store plans (`lowerdir=<fs of each parent>::<objects>`) and every
//! reader of a layer tree (fsck, flattening, hardlink lookups) sees the same tree a
//! stub tree would show.
//!
//! Mounts are kernel state, not store state: an image is mounted when it is complete
//! (after an apply or an ingest) and, after a restart, when its tree is first needed (a
//! mount naming the layer, a child being made, an apply or ingest reading the layers
//! below), so a start mounts nothing however many layers the store holds; images are
//! detached at Remove (before the directory goes) and at shutdown. overlayfs holds a
//! private clone of each lower layer's mount, so detaching never disturbs a container
//! already running on the layer.
//!
//! Where the kernel mounts EROFS only from a block device (before Linux 6.12), or when
//! `[store] image_mounts = "loop"` says so, an image is mounted through a read-only loop
//! device over its file ([`crate::sys::ImageMounts`]). The device is set to autoclear:
//! the kernel releases it when the image's mount and every overlay's clone of it are
//! gone, so detaching works the same either way and nothing is left to clean up after
//! a crash.

use std::path::Path;

use crate::error::CasError;
use crate::layout::Layout;
use crate::sys::{ImageMounts, Syscalls};

/// `EROFS_SUPER_MAGIC_V1`, as `statfs(2)` reports it.
const EROFS_MAGIC: i64 = 0xE0F5_E1E2;

/// Whether an EROFS filesystem is mounted at `dir`.
// `f_type` is an `i64` here, narrower on some other targets
#[allow(clippy::unnecessary_cast)]
pub fn is_mounted(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type().0 as i64 == EROFS_MAGIC)
        .unwrap_or(false)
}

/// Whether snapshot `id`'s layer is an image.
pub fn has_image(layout: &Layout, id: u64) -> bool {
    layout.image_file(id).is_file()
}

/// Mounts snapshot `id`'s image at its `fs` (as `how` says) unless it is mounted
/// already. Returns whether it mounted it now.
pub fn ensure_mounted(
    sys: &dyn Syscalls,
    layout: &Layout,
    id: u64,
    how: ImageMounts,
) -> Result<bool, CasError> {
    let (image, at) = (layout.image_file(id), layout.fs_dir(id));
    if is_mounted(&at) {
        return Ok(false);
    }
    sys.mount_image(&image, &at, how)
        .map_err(CasError::io("mount -t erofs", &image))?;
    Ok(true)
}

/// Removes the snapshot directory `dir`, detaching first an image mounted at its `fs`
/// and the ID-mapped clones of layers it holds (a tree is never deleted through a
/// mount).
pub fn remove_snapshot_dir(sys: &dyn Syscalls, dir: &Path) -> Result<(), CasError> {
    crate::idmap::detach_clones(sys, &dir.join(crate::layout::MAPPED_DIR))?;
    unmount(sys, &dir.join(crate::layout::FS_DIR))?;
    crate::layout::remove_tree(dir)
}

/// Detaches whatever image is mounted at `fs_dir` (all of it, should a mount have been
/// made twice). Returns whether there was one.
pub fn unmount(sys: &dyn Syscalls, fs_dir: &Path) -> Result<bool, CasError> {
    let mut any = false;
    while is_mounted(fs_dir) {
        sys.unmount(fs_dir)
            .map_err(CasError::io("umount", fs_dir))?;
        any = true;
    }
    Ok(any)
}
