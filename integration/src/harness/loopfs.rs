//! Filesystems of their own for the tests that need one (XFS for RWF_ATOMIC, small ones
//! that fill up): a loop device over a file, detached on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::*;

/// Whether this machine can attach a loop device (`losetup -f`); prints why not.
pub fn loop_devices_available() -> bool {
    match Command::new("losetup").arg("-f").output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip(&format!(
                "no loop device available (losetup -f: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            false
        }
        Err(e) => {
            skip(&format!("losetup not found ({e}); install util-linux"));
            false
        }
    }
}

/// Which filesystem a [`LoopFs`] gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext4 with no blocks reserved for root (so fills are exact).
    Ext4,
    /// XFS (atomic writes on recent kernels).
    Xfs,
}

/// A filesystem on a loop file made by a test, mounted at `mnt` and unmounted (with
/// everything below it) on drop.
pub struct LoopFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem in `dir/store.img` and mounts it at `dir/store-fs`.
    pub fn new(dir: &Path, size_mib: u64, kind: FsKind) -> Result<LoopFs> {
        let img = dir.join("store.img");
        let mnt = dir.join("store-fs");
        fs::create_dir_all(&mnt)?;
        fs::File::create(&img)?.set_len(size_mib << 20)?;
        let mut mkfs = match kind {
            FsKind::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-m", "0"]);
                c
            }
            FsKind::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", "-f"]);
                c
            }
        };
        let out = mkfs
            .arg(&img)
            .output()
            .with_context(|| format!("running {mkfs:?}"))?;
        if !out.status.success() {
            bail!("{mkfs:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()?;
        if !out.status.success() {
            bail!(
                "mounting {}: {}",
                img.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(LoopFs { mnt })
    }

    /// The block device under it (`loop3`), for its `/sys/block/<dev>/stat`.
    pub fn device(&self) -> Result<String> {
        let out = Command::new("findmnt")
            .args(["-no", "SOURCE", "--mountpoint"])
            .arg(&self.mnt)
            .output()?;
        let src = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match src.strip_prefix("/dev/") {
            Some(dev) if out.status.success() => Ok(dev.to_string()),
            _ => bail!("no block device mounted at {}", self.mnt.display()),
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        unmount_below(&self.mnt);
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
