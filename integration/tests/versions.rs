//! The core end-to-end flow on newer containerd releases: 1.7 (config version 2, the diff
//! service tries `cas-diff` first) and 2.x (config version 3, `ctr` pulls through the
//! transfer service). Their binaries come from `scripts/containerd-versions.sh` (run by
//! `make deps`); a test skips, saying so, when they were not fetched. Needs root.

use anyhow::Result;
use cas_integration::fixture::{APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{require_root, ContainerdOptions, Rig, RigOptions};
use cas_integration::treecmp::{compare_trees, CompareOptions};

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

fn assert_same_tree(rig: &Rig, image: &str, name: &str) -> Result<()> {
    let ours = rig.mount("cas", image, &format!("{name}-cas"))?;
    let theirs = rig.mount("overlayfs", image, &format!("{name}-overlayfs"))?;
    let diffs = compare_trees(&ours.target, &theirs.target, &CompareOptions::default())?;
    assert!(
        diffs.is_empty(),
        "containerd {}: {image}: cas differs from overlayfs:\n{}\n{}",
        rig.containerd.version,
        diffs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        rig.logs()
    );
    Ok(())
}

/// Pull both fixtures with cas and with overlayfs, compare the trees, run containers,
/// and check the shared content is stored once.
fn core_flow(rig: &Rig) -> Result<()> {
    for image in [&rig.base_ref, &rig.app_ref] {
        rig.pull("cas", image).map_err(|e| e.context(rig.logs()))?;
        rig.pull("overlayfs", image)?;
    }
    assert_same_tree(rig, &rig.base_ref, "base")?;
    assert_same_tree(rig, &rig.app_ref, "app")?;
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
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    Ok(())
}

/// containerd 1.7 with `cas-diff` first in the diff service's order: until the daemon
/// serves Diff, each Apply answers Unimplemented and the diff service moves on to the
/// walking differ, so pulls work either way.
#[test]
fn containerd_1_7_pulls_runs_and_matches_overlayfs() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("1.7").differ(true))? else {
        return Ok(());
    };
    assert!(rig.containerd.differ);
    core_flow(&rig)
}

/// containerd 2.x, ctr through the transfer service, which unpacks `cas` with the walking
/// differ here.
#[test]
fn containerd_2_pulls_runs_and_matches_overlayfs() -> Result<()> {
    let Some(rig) = rig_on(ContainerdOptions::cached("2"))? else {
        return Ok(());
    };
    core_flow(&rig)
}

/// containerd 2.x with `cas-diff` declared: first in the diff service's order (clients
/// that unpack themselves, `ctr pull --local`) and the transfer service's differ for
/// `cas`. The diff service falls back to walking on Unimplemented; the transfer service
/// does not, so until the daemon serves Diff a transfer pull into cas fails
/// ("method Transfer not implemented…"), and the test says so instead of failing.
#[test]
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
    assert_same_tree(&rig, &rig.base_ref, "base-local")?;
    match rig.pull("cas", &rig.app_ref) {
        Ok(()) => core_flow(&rig),
        Err(e) if e.to_string().contains("not implemented") => {
            eprintln!(
                "skipped: the transfer service's pull through cas-diff: the daemon does not serve Diff ({})",
                e.to_string().lines().next().unwrap_or_default()
            );
            Ok(())
        }
        Err(e) => Err(e.context(rig.logs())),
    }
}
