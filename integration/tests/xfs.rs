//! The store on XFS, where the journal writes each commit record with one
//! `pwritev2(RWF_ATOMIC | RWF_DSYNC)` block: the daemon must choose that backend, and a
//! `kill -9` right after a pull must lose nothing (the records are replayed at start).
//! The filesystem is made by the test on a loop file. Needs root and mkfs.xfs; skips
//! otherwise, and says so when the kernel reports no atomic write units.

use anyhow::Result;
use cas_integration::fixture::{build_app_image, build_base_image, APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{
    busybox_path, loop_devices_available, require_root, retry_unavailable, workspace_bin,
    Containerd, Daemon, FsKind, LoopFs, Registry,
};
use cas_integration::registry::push_layout;

/// `ctr images pull` into cas, retried while containerd redials a restarted daemon.
fn pull(containerd: &Containerd, image: &str) -> Result<()> {
    retry_unavailable(50, std::time::Duration::from_millis(200), || {
        containerd.pull("cas", image)
    })
    .map(|_| ())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn atomic_journal_on_xfs_survives_kill9() -> Result<()> {
    if !require_root() || !loop_devices_available() {
        return Ok(());
    }
    if std::process::Command::new("mkfs.xfs")
        .arg("-V")
        .output()
        .is_err()
    {
        cas_integration::harness::skip("mkfs.xfs is not installed (xfsprogs)");
        return Ok(());
    }
    let dir = tempfile::Builder::new().prefix("cas-xfs-").tempdir()?;
    let d = dir.path();
    let busybox = busybox_path();
    let base = build_base_image(&d.join("img-base"), &busybox)?;
    let app = build_app_image(&d.join("img-app"), &busybox)?;
    let registry = Registry::start(&d.join("registry"))?;
    push_layout(&base.layout_dir, &registry.addr, "xfs/base", "1")?;
    push_layout(&app.layout_dir, &registry.addr, "xfs/app", "1")?;
    let base_ref = format!("{}/xfs/base:1", registry.addr);
    let app_ref = format!("{}/xfs/app:1", registry.addr);

    let xfs = LoopFs::new(d, 1024, FsKind::Xfs)?;
    let store = xfs.mnt.join("store");
    let mut daemon = Daemon::start(
        &workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?,
        &store,
        &d.join("cas.sock"),
        &d.join("cas-snapshotter.log"),
        None,
    )?;
    let containerd = Containerd::start(&d.join("containerd"), &daemon.sock)?;
    let atomic = daemon.log().contains("atomic writes (RWF_ATOMIC");
    if !atomic {
        eprintln!("note: this kernel's XFS reports no atomic write units; the rename journal runs");
    }

    pull(&containerd, &base_ref)?;
    pull(&containerd, &app_ref)?;
    // No shutdown checkpoint: everything since start lives in the journal only.
    daemon.kill9();
    daemon.restart()?;
    let log = daemon.log();
    for l in log.lines().filter(|l| l.contains("journal")) {
        println!("{l}");
    }
    assert!(log.contains("recovery: journal replayed"), "{log}");
    if atomic {
        assert!(
            log.lines()
                .any(|l| l.contains("journal replayed") && !l.contains("records=0")),
            "the commits must come back from the journal:\n{log}"
        );
    }
    for (image, release) in [(&base_ref, BASE_RELEASE), (&app_ref, APP_RELEASE)] {
        pull(&containerd, image)?; // a no-op when every layer is there
        let out = containerd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "cas",
            image,
            "xfs-run",
            "cat",
            "/etc/fixture-release",
        ])?;
        assert_eq!(out, release);
    }
    let casctl = workspace_bin("casctl", "CASCTL_BIN")?;
    let out = std::process::Command::new(&casctl)
        .arg("--root")
        .arg(&store)
        .args(["stats", "--json"])
        .output()?;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let journal = stats["journal"].as_str().unwrap_or_default().to_string();
    println!("stats: journal = {journal}");
    assert_eq!(journal.contains("RWF_ATOMIC"), atomic, "{stats}");
    let out = std::process::Command::new(casctl)
        .arg("--root")
        .arg(&store)
        .args(["fsck", "--verify-objects"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(containerd);
    daemon.stop()?;
    Ok(())
}
