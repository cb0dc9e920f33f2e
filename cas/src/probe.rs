//! Start-up probe: does this kernel serve stubs from a data-only lower layer?
//!
//! Decided by doing it, not by version numbers: a scratch overlay mount
//! `metacopy=on,lowerdir=<stub>::<data>` in `cas/tmp`, whose one stub must read back the
//! bytes of its object. Kernels before 6.5 reject the `::` syntax; a kernel built without
//! metacopy, or a seccomp or LSM policy, can fail the mount or the read. The daemon
//! refuses to start rather than hand containerd mounts that cannot work.

use std::fs;
use std::io;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

fn run(dir: &Path) -> Result<(), ProbeError> {
    let setup = |source| ProbeError::Setup {
        dir: dir.display().to_string(),
        source,
    };
    let digest = crate::Digest::of(PROBE_DATA);
    let (stubs, data, mnt) = (dir.join("stubs"), dir.join("data"), dir.join("mnt"));
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
    let options = format!(
        "metacopy=on,lowerdir={}::{}",
        stubs.display(),
        data.display()
    );
    mount(
        Some("overlay"),
        &mnt,
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
