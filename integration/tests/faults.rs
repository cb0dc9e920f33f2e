//! Deterministic crash points: for every step of ingest, commit, create, remove, GC and
//! the journal's checkpoint after which the disk holds a different state, the daemon is started with that point
//! armed (`FAILPOINTS=<point>=return`, see the `cas` crate), driven through a pull, an
//! image removal and a GC until it kills itself there, and restarted. After each crash the
//! store must check clean with `casctl fsck`, and the image must pull again and run.
//! Needs root; skips otherwise.

use anyhow::Result;
use cas_integration::fixture::APP_RELEASE;
use cas_integration::harness::{require_root, Rig};

/// Every crash point, in the order a pull, a removal and a GC reach them, where layers
/// are EROFS images (the default where the kernel mounts them) or stub trees.
const POINTS: &[&str] = &[
    "create.after-dir",
    "create.after-info",
    "ingest.object-published",
    "ingest.before-syncfs",
    "ingest.before-manifest",
    "ingest.after-manifest",
    "commit.after-ingest",
    "commit.after-record",
    "commit.after-info",
    "commit.after-index",
    "commit.tree-moved",
    "remove.after-info",
    "remove.after-index",
    "remove.after-rename",
    "gc.before-delete",
    "gc.after-delete",
    "gc.before-forget",
    "journal.before-checkpoint",
];

/// The points only a stub tree has (and `commit.tree-moved`, which only an image has).
const STUB_TREE_POINTS: &[&str] = &["ingest.stub-in-place"];
const IMAGE_ONLY_POINTS: &[&str] = &["commit.tree-moved"];

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn every_crash_point_recovers_to_a_clean_store() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    let (_, out) = rig.casctl(&["stats", "--json"])?;
    let stats: serde_json::Value = serde_json::from_str(&out)?;
    let images = stats["new_layers"] == "EROFS images";
    let points: Vec<&str> = POINTS
        .iter()
        .copied()
        .filter(|p| images || !IMAGE_ONLY_POINTS.contains(p))
        .collect();
    crash_everywhere(rig, &points)?;
    if images {
        // the stub tree's own points, in a store that writes stub trees
        let rig = Rig::start_with_config(Some("[store]\nlayer_metadata = \"stubs\"\n"))?;
        crash_everywhere(rig, STUB_TREE_POINTS)?;
    } else {
        let rig = Rig::start()?;
        crash_everywhere(rig, STUB_TREE_POINTS)?;
    }
    Ok(())
}

/// Crashes `rig`'s daemon at each of `points` in turn; then removes the image and
/// checks that nothing is left.
fn crash_everywhere(mut rig: Rig, points: &[&str]) -> Result<()> {
    let image = rig.app_ref.clone();
    for point in points {
        // From a store without the image, so the pull stores everything anew.
        rig.crash_at(point, &image)?;
        let (code, out) = rig.casctl(&["fsck"])?;
        assert_eq!(
            code,
            0,
            "fsck after a crash at {point}:\n{out}\n{}",
            rig.logs()
        );
        rig.pull_after_restart("cas", &image)?;
        let out = rig.run(&image, "faults", &["cat", "/etc/fixture-release"])?;
        assert_eq!(out, APP_RELEASE, "after a crash at {point}");
        // Leave a store with the image and nothing else pending for the next point.
        let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
        assert_eq!(code, 0, "after a crash at {point}:\n{out}");
        println!("crash point {point}: recovered, fsck clean, image runs");
    }
    // Nothing a crash left behind survives a GC once the image is gone.
    rig.containerd.ctr(&["images", "rm", "--sync", &image])?;
    let (code, out) = rig.casctl(&["gc"])?;
    assert_eq!(code, 0, "{out}");
    let (_, out) = rig.casctl(&["stats", "--json"])?;
    let stats: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        stats["objects"], 0,
        "objects left after every crash point: {out}"
    );
    assert_eq!(
        stats["snapshots"], 0,
        "snapshots left after every crash point: {out}"
    );
    // the counters say what the index holds; the files say what the disk holds
    let report = rig.fsck_report()?;
    assert_eq!(
        report["objects"], 0,
        "object files left after every crash point: {report}"
    );
    let tmp = rig.daemon.root.join("cas/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp)?.count(),
        0,
        "temp files left in {}",
        tmp.display()
    );
    Ok(())
}
