//! The core end-to-end flow on newer containerd releases: 1.7 (config version 2, the diff
//! service tries `cas-diff` first) and 2.x (config version 3, `ctr` pulls through the
//! transfer service). Their binaries come from `scripts/containerd-versions.sh` (run by
//! `make deps`); a test skips, saying so, when they were not fetched. Needs root.

use anyhow::Result;
use cas_integration::fixture::{APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{require_root, ContainerdOptions, Rig, RigOptions};

fn rig_on(containerd: ContainerdOptions) -> Result<Option<Rig>> {
    if !require_root() || !containerd.bin.available() {
        return Ok(None);
    }
    let rig = Rig::start_with(RigOptions {
        containerd,
        ..RigOptions::default()
    })?;
    eprintln!(
        "containerd {} (cas-diff declared: {})",
        rig.containerd.version, rig.containerd.differ
    );
    Ok(Some(rig))
}

/// Which way layers came into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Applied by `cas-diff` in one pass.
    FastPath,
    /// Written by containerd's applier, ingested at Commit.
    Commit,
}

/// Pull both fixtures with cas and with overlayfs, compare the trees, run containers,
/// and check the shared content is stored once and that the layers came in by `path`.
fn core_flow(rig: &Rig, path: Path) -> Result<()> {
    for image in [&rig.base_ref, &rig.app_ref] {
        rig.pull("cas", image).map_err(|e| e.context(rig.logs()))?;
        rig.pull("overlayfs", image)?;
    }
    rig.assert_same_tree(&rig.base_ref, "base")?;
    rig.assert_same_tree(&rig.app_ref, "app")?;
    assert_eq!(
        rig.run(&rig.base_ref, "v-release", &["cat", "/etc/fixture-release"])?,
        BASE_RELEASE
    );
    assert_eq!(
        rig.run(
            &rig.app_ref,
            "v-app",
            &["sh", "-c", "cat /etc/fixture-release; /app/run.sh"]
        )?,
        format!("{APP_RELEASE}app\n")
    );
    let (code, stats) = rig.casctl(&["stats", "--json"])?;
    assert_eq!(code, 0, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let logical = stats["logical_bytes"].as_u64().unwrap_or(0);
    let physical = stats["physical_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(physical < logical, "no dedup: {stats}");
    let paths = &stats["ingest_paths"];
    let fast = paths["fast_path_applies"].as_u64().unwrap_or(0);
    let ingested = paths["commit_ingests"].as_u64().unwrap_or(0);
    let layers = stats["committed"].as_u64().unwrap_or(0);
    match path {
        Path::FastPath => assert!(
            fast >= layers && fast > 0 && ingested == 0 && paths["failed_applies"] == 0,
            "expected every layer through cas-diff: {stats}\n{}",
            rig.logs()
        ),
        Path::Commit => assert!(fast == 0 && ingested >= layers, "{stats}"),
    }
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    Ok(())
}

/// containerd 1.7 with `cas-diff` first in the diff service's order: every layer is
/// applied by our differ in one pass.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn containerd_1_7_pulls_runs_and_matches_overlayfs() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("1.7").differ(true))? else {
        return Ok(());
    };
    assert!(rig.containerd.differ);
    core_flow(&rig, Path::FastPath)
}

/// containerd 1.7 without our differ: containerd's applier writes the layers and Commit
/// ingests them.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn containerd_1_7_without_our_differ() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("1.7"))? else {
        return Ok(());
    };
    core_flow(&rig, Path::Commit)
}

/// containerd 2.x, ctr through the transfer service, which unpacks `cas` with the walking
/// differ here.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn containerd_2_pulls_runs_and_matches_overlayfs() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("2"))? else {
        return Ok(());
    };
    core_flow(&rig, Path::Commit)
}

/// containerd 2.x with `cas-diff` declared: the transfer service's differ for `cas` (no
/// fallback there) and first in the diff service's order (`ctr pull --local`). Both pull
/// paths apply every layer in one pass.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn containerd_2_with_our_differ() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("2").differ(true))? else {
        return Ok(());
    };
    assert!(rig.containerd.differ);
    rig.containerd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--local",
        "--snapshotter",
        "cas",
        &rig.base_ref,
    ])?;
    rig.pull("overlayfs", &rig.base_ref)?;
    rig.assert_same_tree(&rig.base_ref, "base-local")?;
    core_flow(&rig, Path::FastPath)
}
