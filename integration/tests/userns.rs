//! User-namespaced containers on containerd 2.x (`ctr run --uidmap/--gidmap`), our
//! snapshotter declared with `capabilities = ["remap-ids"]`. With `--remap-labels`
//! containerd hands the mapping to Prepare and the daemon mounts ID-mapped clones of
//! the shared layers: nothing is copied. Without it, containerd takes its chown path
//! (a chowned copy, committed as a layer of metadata only). Either way the container
//! sees the image's owners and bytes. Needs root.

use anyhow::{Context, Result};
use std::time::Duration;

use cas_integration::harness::{require_root, wait_until, ContainerdOptions, Rig, RigOptions};

/// What a container reports of its user namespace and of the image's owners.
const PROBE: &str = "cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //'; \
    stat -c '%u:%g' / /etc/fixture-release /home/user/notes; \
    cat /data/small; echo written > /etc/written && cat /etc/written; id -u";

/// With ID-mapped layers off (a kernel that cannot, forced here by the config): declared
/// `remap-ids` makes a mapped run fail, naming what to change, and leaves nothing
/// behind; without the capability containerd chowns a copy, and the container is right.
#[test]
#[ignore = "needs root, containerd 2.x, runc and a registry (make e2e runs it)"]
fn without_id_mapped_layers_containerd_chowns_a_copy() -> Result<()> {
    for declared in [true, false] {
        let containerd = ContainerdOptions {
            remap_ids: declared,
            ..ContainerdOptions::cached("2").differ(true)
        };
        if !require_root() || !containerd.bin.available() {
            return Ok(());
        }
        let rig = Rig::start_with(RigOptions {
            containerd,
            daemon_config: Some("[store]\nidmapped_layers = \"off\"\n".into()),
            ..RigOptions::default()
        })?;
        rig.pull("cas", &rig.base_ref)
            .map_err(|e| e.context(rig.logs()))?;
        let s = rig.stats()?;
        let how = s["id_mapped_snapshots"].as_str().unwrap_or_default();
        assert!(how.contains("chowned only"), "{how}");
        let (layers, objects) = (s["committed"].as_u64().unwrap_or(0), s["objects"].clone());
        let map = "0:100000:65536";
        let run = rig.run_with(
            &rig.base_ref,
            "userns-off",
            &["--uidmap", map, "--gidmap", map, "--remap-labels"],
            &["sh", "-c", PROBE],
        );
        let s = rig.stats()?;
        if declared {
            let e = run.expect_err("a mapped run over unmapped layers with ID-mapping off");
            assert!(format!("{e:#}").contains("remap-ids"), "{e:#}");
            assert_eq!(s["committed"].as_u64(), Some(layers), "{s}");
        } else {
            let out = run.map_err(|e| e.context(rig.logs()))?;
            assert_eq!(out, expect(100_000), "{}", rig.logs());
            assert_eq!(
                s["committed"].as_u64(),
                Some(layers + 1),
                "one chowned copy: {s}"
            );
        }
        assert_eq!(s["objects"], objects, "{s}");
        assert!(rig.id_mapped_clones().is_empty());
    }
    Ok(())
}

fn expect(host: u32) -> String {
    format!("0 {host} 65536\n0:0\n0:0\n1000:1000\nsmall file\nwritten\n0\n")
}

#[test]
#[ignore = "needs root, containerd 2.x, runc and a registry (make e2e runs it)"]
fn ctr_runs_user_namespaced_containers_on_shared_layers() -> Result<()> {
    let containerd = ContainerdOptions::cached("2").differ(true);
    if !require_root() || !containerd.bin.available() {
        return Ok(());
    }
    let rig = Rig::start_with(RigOptions {
        containerd,
        ..RigOptions::default()
    })?;
    rig.pull("cas", &rig.base_ref)
        .map_err(|e| e.context(rig.logs()))?;
    let s = rig.stats()?;
    let how = s["id_mapped_snapshots"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        how.contains("remap-ids"),
        "ID-mapped layers are not available: {how}"
    );
    let (layers, objects) = (s["committed"].clone(), s["objects"].clone());
    for (n, host) in [(1, 100_000u32), (2, 200_000)] {
        let map = format!("0:{host}:65536");
        let out = rig
            .run_with(
                &rig.base_ref,
                &format!("userns-labels-{n}"),
                &["--uidmap", &map, "--gidmap", &map, "--remap-labels"],
                &["sh", "-c", PROBE],
            )
            .map_err(|e| e.context(rig.logs()))?;
        assert_eq!(out, expect(host), "{}", rig.logs());
        let s = rig.stats()?;
        assert_eq!(
            (&s["committed"], &s["objects"]),
            (&layers, &objects),
            "an ID-mapped container adds no layer and no object: {s}"
        );
    }
    // The same tree, owners and bytes as overlayfs's ID-mapped mounts show.
    rig.pull("overlayfs", &rig.base_ref)?;
    let tree = "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -print \
        | sort | while read -r f; do stat -c '%n %u:%g %a %F' \"$f\"; \
        [ -f \"$f\" ] && [ ! -L \"$f\" ] && md5sum \"$f\"; done; true";
    let map = "0:400000:65536";
    let mut seen = Vec::new();
    // runc's state directory is the machine's: ids unique to this rig
    let suffix = rig
        .dir
        .path()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    for sn in ["cas", "overlayfs"] {
        let out = rig
            .containerd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                sn,
                "--uidmap",
                map,
                "--gidmap",
                map,
                "--remap-labels",
                &rig.base_ref,
                &format!("userns-tree-{sn}-{suffix}"),
                "sh",
                "-c",
                tree,
            ])
            .map_err(|e| e.context(rig.logs()))?;
        seen.push(out);
    }
    assert!(seen[0].lines().count() > 20, "{}", seen[0]);
    assert_eq!(seen[0], seen[1], "cas and overlayfs show different trees");

    // containerd removes a deleted container's snapshot in its next GC pass
    wait_until(
        "the containers' snapshots and their clones to go",
        Duration::from_secs(30),
        || rig.id_mapped_clones().is_empty(),
    )
    .map_err(|e| e.context(format!("{:?}", rig.id_mapped_clones())))?;

    // The chown path: containerd copies the layers' metadata, chowned, once per mapping.
    let map = "0:300000:65536";
    let out = rig
        .run_with(
            &rig.base_ref,
            "userns-chown",
            &["--uidmap", map, "--gidmap", map],
            &["sh", "-c", PROBE],
        )
        .map_err(|e| e.context(rig.logs()))?;
    assert_eq!(out, expect(300_000), "{}", rig.logs());
    let s = rig.stats()?;
    let added = s["committed"].as_u64().context("committed")? - layers.as_u64().unwrap_or(0);
    assert_eq!(added, 1, "the chowned copy is one layer: {s}");
    assert_eq!(
        s["objects"], objects,
        "the chowned copy is metadata only: {s}"
    );
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    Ok(())
}
