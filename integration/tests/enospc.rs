//! A full disk: the store lives on a small ext4 filesystem on a loop file made by the
//! test, which a filler file leaves with little room. A pull of an image too big for it
//! must fail with a clear error and leave the store consistent; once the filler is gone,
//! the same pull succeeds and the image runs.
//!
//! Two fills hit the two places a layer needs space: few free blocks stop containerd's
//! applier writing the files into our active snapshot; few free inodes let the files in
//! but stop our Commit, whose stubs are new inodes. Needs root; skips otherwise.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use cas_integration::compression::Compression;
use cas_integration::fixture::{
    pseudo_random, write_oci_layout, Entry, ImageSpec, LayerSpec, Meta,
};
use cas_integration::harness::{
    busybox_path, loop_devices_available, require_root, retry_unavailable, workspace_bin,
    Containerd, Daemon, FsKind, LoopFs, Registry,
};
use cas_integration::registry::push_layout;

const SMALL_FILES: usize = 1500;

/// How full a fill leaves the filesystem.
#[derive(Debug, Clone, Copy)]
enum Free {
    Bytes(u64),
    Inodes(u64),
}

/// busybox, one 20 MiB file and many small distinct files.
fn big_image(out: &Path) -> Result<()> {
    let busybox = fs::read(busybox_path())?;
    let mut entries = vec![
        Entry::Dir {
            path: "bin".into(),
            meta: Meta::new(0o755),
        },
        Entry::File {
            path: "bin/busybox".into(),
            meta: Meta::new(0o755),
            data: busybox,
        },
        Entry::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
            meta: Meta::new(0o777),
        },
        Entry::Symlink {
            path: "bin/cat".into(),
            target: "busybox".into(),
            meta: Meta::new(0o777),
        },
        Entry::Dir {
            path: "data".into(),
            meta: Meta::new(0o755),
        },
        Entry::File {
            path: "data/big".into(),
            meta: Meta::new(0o644),
            data: pseudo_random(20 << 20, 11),
        },
        Entry::Dir {
            path: "data/small".into(),
            meta: Meta::new(0o755),
        },
    ];
    for i in 0..SMALL_FILES {
        entries.push(Entry::File {
            path: format!("data/small/f{i:04}"),
            meta: Meta::new(0o644),
            data: format!("small file {i}\n").into_bytes(),
        });
    }
    let spec = ImageSpec {
        layers: vec![LayerSpec {
            entries,
            compression: Compression::Gzip,
        }],
        cmd: vec!["/bin/sh".into()],
    };
    write_oci_layout(&spec, out)?;
    Ok(())
}

/// Bytes available on the loop filesystem.
fn available(lfs: &LoopFs) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(&lfs.mnt)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Leaves about `free` bytes, or `free` inodes, available, with filler files.
fn fill_to(lfs: &LoopFs, free: Free) -> Result<()> {
    let filler = lfs.mnt.join("filler");
    fs::create_dir_all(&filler)?;
    match free {
        Free::Bytes(bytes) => {
            let size = available(lfs)?.saturating_sub(bytes);
            run(Command::new("fallocate")
                .arg("-l")
                .arg(size.to_string())
                .arg(filler.join("blocks")))
        }
        Free::Inodes(inodes) => {
            let st = nix::sys::statvfs::statvfs(&lfs.mnt)?;
            let n = (st.files_available() as u64).saturating_sub(inodes);
            for i in 0..n {
                fs::File::create(filler.join(format!("i{i}")))?;
            }
            Ok(())
        }
    }
}

fn unfill(lfs: &LoopFs) -> Result<()> {
    fs::remove_dir_all(lfs.mnt.join("filler")).context("removing the fillers")
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `ctr images pull` into cas, retried while containerd redials a restarted daemon.
fn pull(containerd: &Containerd, image: &str) -> Result<String> {
    retry_unavailable(50, std::time::Duration::from_millis(200), || {
        containerd.pull("cas", image)
    })
}

fn casctl(root: &Path, args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(workspace_bin("casctl", "CASCTL_BIN")?)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn a_full_disk_fails_the_pull_cleanly_and_the_retry_succeeds() -> Result<()> {
    if !require_root() || !loop_devices_available() {
        return Ok(());
    }
    // 8 MiB free: the applier runs out of blocks writing the layer. 800 inodes free: it
    // runs out of inodes writing the layer's ~1500 files.
    full_disk("auto", &[Free::Bytes(8 << 20), Free::Inodes(800)])?;
    // Where layers are stub trees, 2200 inodes free: the layer's files fit, the Commit's
    // stubs (one new inode each, the files' own inodes become the objects) do not. (An
    // image takes one inode per layer.)
    full_disk("stubs", &[Free::Inodes(2200)])
}

/// The scenario with `layer_metadata` and each of `frees` in turn.
fn full_disk(layer_metadata: &str, frees: &[Free]) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("cas-enospc-").tempdir()?;
    let d = dir.path();
    big_image(&d.join("img"))?;
    let registry = Registry::start(&d.join("registry"))?;
    push_layout(&d.join("img"), &registry.addr, "enospc/big", "1")?;
    let image = format!("{}/enospc/big:1", registry.addr);
    let loopfs = LoopFs::new(d, 160, FsKind::Ext4)?;
    let store = loopfs.mnt.join("store");
    let config = d.join("cas-snapshotter.toml");
    fs::write(
        &config,
        format!("[store]\nlayer_metadata = \"{layer_metadata}\"\n"),
    )?;
    let mut daemon = Daemon::start(
        &workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?,
        &store,
        &d.join("cas.sock"),
        &d.join("cas-snapshotter.log"),
        Some(&config),
    )?;
    let containerd = Containerd::start(&d.join("containerd"), &daemon.sock)?;
    let logs = |daemon: &Daemon| {
        format!(
            "--- cas-snapshotter ---\n{}\n--- containerd ---\n{}",
            daemon.log(),
            containerd.log()
        )
    };

    for &free in frees {
        fill_to(&loopfs, free)?;
        let err = match pull(&containerd, &image) {
            Ok(_) => bail!("the pull with {free:?} free succeeded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.to_lowercase().contains("no space left on device"),
            "with {free:?} free the pull must say the disk is full:\n{err}\n{}",
            logs(&daemon)
        );
        println!(
            "{free:?} free: pull failed: {}",
            err.lines()
                .find(|l| l.to_lowercase().contains("no space"))
                .unwrap_or_default()
        );
        let (code, out) = casctl(&store, &["fsck"])?;
        assert_eq!(
            code,
            0,
            "fsck with a full disk ({free:?} free):\n{out}\n{}",
            logs(&daemon)
        );

        // Space comes back: the same pull succeeds, through the same daemon and after a
        // restart alike.
        unfill(&loopfs)?;
        pull(&containerd, &image)?;
        let out = containerd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "cas",
            &image,
            "enospc",
            "cat",
            "/data/small/f1234",
        ])?;
        assert_eq!(out, "small file 1234\n");
        let (code, out) = casctl(&store, &["fsck", "--verify-objects"])?;
        assert_eq!(code, 0, "{out}");
        containerd.ctr(&["images", "rm", "--sync", &image])?;
        let (code, out) = casctl(&store, &["gc"])?;
        assert_eq!(code, 0, "{out}");
        daemon.restart()?;
    }
    drop(containerd);
    daemon.stop()?;
    Ok(())
}
