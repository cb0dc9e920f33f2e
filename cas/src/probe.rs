//! Start-up probes: does this kernel serve stubs from a data-only lower layer, and can
//! a layer be one EROFS image?
//!
//! Decided by doing it, not by version numbers: a scratch overlay mount
//! `metacopy=on,lowerdir=<stub>::<data>` in `cas/tmp`, whose one stub must read back the
//! bytes of its object. Kernels before 6.5 reject the `::` syntax; a kernel built without
//! metacopy, or a seccomp or LSM policy, can fail the mount or the read. The daemon
//! refuses to start rather than hand containerd mounts that cannot work.
//!
//! The image probe does the same with the stub in a one-file EROFS image, mounted from
//! its file (Linux 6.12+ with `CONFIG_EROFS_FS_BACKED_BY_FILE`) or, where the kernel
//! wants a block device, through a loop device; where both fail, layers stay stub trees.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::sys::{ImageMounts, ImageSource};

/// Bytes the probe's object holds.
const PROBE_DATA: &[u8] = b"cas-snapshotter data-only lower probe\n";

/// Why the kernel cannot serve stubs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Setting up the scratch trees failed.
    #[error("preparing the overlayfs probe in {dir}: {source}")]
    Setup {
        /// The scratch directory.
        dir: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the mount.
    #[error("overlayfs refused a data-only lower layer (needs Linux >= 6.5 with metacopy support; options {options}): {errno}")]
    Mount {
        /// The options tried.
        options: String,
        /// The kernel's answer.
        errno: nix::errno::Errno,
    },
    /// The kernel refused to mount an EROFS image, from its file and through a loop
    /// device.
    #[error(
        "mounting an EROFS image failed (needs EROFS, and Linux >= 6.12 or a loop device): {0}"
    )]
    ImageMount(#[source] io::Error),
    /// A layer could not be ID-mapped (no idmapped mounts for its filesystem, or no
    /// user namespaces).
    #[error("ID-mapping a layer failed (needs Linux >= 5.19 and idmapped mounts on the layer's filesystem): {0}")]
    Idmap(#[source] io::Error),
    /// An ID-mapped layer under overlayfs did not show the mapped owner.
    #[error("overlayfs over an ID-mapped layer showed owner {got}, not {want}")]
    Owner {
        /// The owner seen.
        got: u32,
        /// The one mapped.
        want: u32,
    },
    /// The mount worked but the stub did not read as its object.
    #[error("overlayfs mounted a data-only lower layer but a stub read back {got:?}")]
    Read {
        /// What came back.
        got: String,
    },
}

/// Runs the probe in a fresh directory under `scratch` (removed afterwards).
pub fn probe_data_only_lowers(scratch: &Path) -> Result<(), ProbeError> {
    let dir = scratch.join(format!("probe-{}", std::process::id()));
    let result = run(&dir);
    let _ = umount2(&dir.join("mnt"), MntFlags::MNT_DETACH);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Runs the image probe in a fresh directory under `scratch` (removed afterwards), the
/// image mounted as `how` says; what it was mounted from.
pub fn probe_layer_images(scratch: &Path, how: ImageMounts) -> Result<ImageSource, ProbeError> {
    let dir = scratch.join(format!("probe-images-{}", std::process::id()));
    let result = run_images(&dir, how);
    let _ = umount2(&dir.join("mnt"), MntFlags::MNT_DETACH);
    let _ = umount2(&dir.join("layer"), MntFlags::MNT_DETACH);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The kind of layer a probe mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeLayer {
    /// A one-file EROFS image over a data-only layer, mounted as new layers are.
    Image(ImageMounts),
    /// A one-stub tree over a data-only layer.
    StubTree,
    /// A tree holding the file itself (a materialised store's layers).
    Plain,
}

/// Runs the ID-mapping probe in a fresh directory under `scratch` (removed afterwards):
/// a one-file layer of the kind new layers are, ID-mapped (root to an unused host ID) and
/// mounted as an overlay's lower layer (over a data-only layer, but for a plain tree),
/// must show the mapped owner and read the file's bytes.
pub fn probe_idmapped_layers(scratch: &Path, layer: ProbeLayer) -> Result<(), ProbeError> {
    let dir = scratch.join(format!("probe-idmap-{}", std::process::id()));
    let result = run_idmapped(&dir, layer);
    for m in ["mnt", "mapped", "layer"] {
        let _ = umount2(&dir.join(m), MntFlags::MNT_DETACH);
    }
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The host ID the ID-mapping probe maps root to.
const PROBE_HOST_ID: u32 = 1_000_000;

fn run_idmapped(dir: &Path, kind: ProbeLayer) -> Result<(), ProbeError> {
    use std::os::unix::fs::MetadataExt;
    let setup = |source| ProbeError::Setup {
        dir: dir.display().to_string(),
        source,
    };
    let (layer, data) = match kind {
        ProbeLayer::Image(how) => image_layer(dir, how)?.0,
        ProbeLayer::StubTree => stub_layer(dir)?,
        ProbeLayer::Plain => {
            let layer = dir.join("layer");
            fs::create_dir_all(&layer).map_err(setup)?;
            fs::write(layer.join("file"), PROBE_DATA).map_err(setup)?;
            (layer, None)
        }
    };
    let (mapped, mnt) = (dir.join("mapped"), dir.join("mnt"));
    fs::create_dir_all(&mapped).map_err(setup)?;
    let range = [ringio::idmap::IdRange {
        inside: 0,
        outside: PROBE_HOST_ID,
        count: 1,
    }];
    let ns = ringio::idmap::UserNs::new(&range, &range).map_err(ProbeError::Idmap)?;
    ringio::idmap::clone_idmapped(&layer, &mapped, &ns).map_err(ProbeError::Idmap)?;
    read_through_overlay(&mapped, data.as_deref(), &mnt)?;
    let got = fs::metadata(mnt.join("file")).map_err(setup)?.uid();
    if got != PROBE_HOST_ID {
        return Err(ProbeError::Owner {
            got,
            want: PROBE_HOST_ID,
        });
    }
    Ok(())
}

fn run_images(dir: &Path, how: ImageMounts) -> Result<ImageSource, ProbeError> {
    let ((layer, data), source) = image_layer(dir, how)?;
    read_through_overlay(&layer, data.as_deref(), &dir.join("mnt"))?;
    Ok(source)
}

/// A layer and the data-only layer under it, if any.
type ProbeLayers = (PathBuf, Option<PathBuf>);

/// A one-file EROFS image mounted at `dir/layer` (as `how` says) whose file redirects to
/// an object in `dir/data`; returns both, and what the image was mounted from.
fn image_layer(dir: &Path, how: ImageMounts) -> Result<(ProbeLayers, ImageSource), ProbeError> {
    use crate::erofs::{Attrs, Image, Leaf};
    let setup = |source| ProbeError::Setup {
        dir: dir.display().to_string(),
        source,
    };
    let digest = crate::Digest::of(PROBE_DATA);
    let (layer, data, mnt) = (dir.join("layer"), dir.join("data"), dir.join("mnt"));
    let object = data.join(digest.object_relpath());
    for d in [
        &layer,
        &mnt,
        &object.parent().unwrap_or(&data).to_path_buf(),
    ] {
        fs::create_dir_all(d).map_err(setup)?;
    }
    fs::write(&object, PROBE_DATA).map_err(setup)?;
    let mut img = Image::new(Attrs::implicit_dir());
    let file = Leaf::File {
        size: PROBE_DATA.len() as u64,
        object: Some(digest),
    };
    img.insert(Path::new("file"), Attrs::implicit_dir(), file)
        .map_err(|e| setup(io::Error::other(e)))?;
    let image = dir.join("layer.erofs");
    let bytes = img.to_bytes().map_err(|e| setup(io::Error::other(e)))?;
    fs::write(&image, bytes).map_err(setup)?;
    let source = crate::sys::mount_erofs(&image, &layer, how).map_err(ProbeError::ImageMount)?;
    Ok(((layer, Some(data)), source))
}

fn run(dir: &Path) -> Result<(), ProbeError> {
    let (layer, data) = stub_layer(dir)?;
    read_through_overlay(&layer, data.as_deref(), &dir.join("mnt"))
}

/// A one-stub tree at `dir/layer` redirecting to an object in `dir/data`; returns both.
fn stub_layer(dir: &Path) -> Result<ProbeLayers, ProbeError> {
    let setup = |source| ProbeError::Setup {
        dir: dir.display().to_string(),
        source,
    };
    let digest = crate::Digest::of(PROBE_DATA);
    let (stubs, data, mnt) = (dir.join("layer"), dir.join("data"), dir.join("mnt"));
    let object = data.join(digest.object_relpath());
    for d in [
        &stubs,
        &mnt,
        &object.parent().unwrap_or(&data).to_path_buf(),
    ] {
        fs::create_dir_all(d).map_err(setup)?;
    }
    fs::write(&object, PROBE_DATA).map_err(setup)?;
    let stub = stubs.join("file");
    fs::File::create(&stub)
        .and_then(|f| f.set_len(PROBE_DATA.len() as u64))
        .map_err(setup)?;
    xattr::set(&stub, crate::stub::XATTR_METACOPY, b"").map_err(setup)?;
    xattr::set(
        &stub,
        crate::stub::XATTR_REDIRECT,
        digest.redirect().as_bytes(),
    )
    .map_err(setup)?;
    Ok((stubs, Some(data)))
}

/// Mounts `lower` (over the data-only `data`, if any) at `mnt` and reads the probe's
/// file.
fn read_through_overlay(lower: &Path, data: Option<&Path>, mnt: &Path) -> Result<(), ProbeError> {
    let setup = |source| ProbeError::Setup {
        dir: mnt.display().to_string(),
        source,
    };
    let options = match data {
        Some(data) => format!(
            "metacopy=on,lowerdir={}::{}",
            lower.display(),
            data.display()
        ),
        None => format!("lowerdir={}", lower.display()),
    };
    mount(
        Some("overlay"),
        mnt,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .map_err(|errno| ProbeError::Mount {
        options: options.clone(),
        errno,
    })?;
    let got = fs::read(mnt.join("file")).map_err(setup)?;
    if got != PROBE_DATA {
        return Err(ProbeError::Read {
            got: String::from_utf8_lossy(&got).into_owned(),
        });
    }
    Ok(())
}
