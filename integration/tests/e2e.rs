//! End-to-end: a real containerd 1.6 (Debian's) with runc and a local registry, pulling
//! our fixture images through cas-snapshotter, checked against containerd's own
//! overlayfs snapshotter in the same containerd. Needs root; skips otherwise.

use anyhow::Result;
use cas_integration::fixture::{APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{require_root, Rig};

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn pull_run_and_compare_with_overlayfs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    for image in [&rig.base_ref, &rig.app_ref] {
        rig.pull("cas", image)?;
        rig.pull("overlayfs", image)?;
    }
    rig.assert_same_tree(&rig.base_ref, "base")?;
    rig.assert_same_tree(&rig.app_ref, "app")?;

    let out = rig.run(
        &rig.base_ref,
        "e2e-release",
        &["cat", "/etc/fixture-release"],
    )?;
    assert_eq!(out, BASE_RELEASE);
    let out = rig.run(
        &rig.app_ref,
        "e2e-app",
        &["sh", "-c", "cat /etc/fixture-release; /app/run.sh"],
    )?;
    assert_eq!(out, format!("{APP_RELEASE}app\n"));

    // The shared base layer is stored once, and the app layer's copy of data/big too.
    let (code, stats) = rig.casctl(&["stats", "--json"])?;
    assert_eq!(code, 0, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let (logical, physical) = (
        stats["logical_bytes"].as_u64().unwrap(),
        stats["physical_bytes"].as_u64().unwrap(),
    );
    assert!(physical < logical, "no dedup: {stats}");
    Ok(())
}

/// Kernels that mount EROFS only from a block device (before Linux 6.12) get their
/// layer images through loop devices: the same trees as overlayfs, before and after a
/// restart, and no device left behind once the images are gone.
#[test]
#[ignore = "needs root, containerd, runc, a registry and loop devices (make e2e runs it)"]
fn layer_images_through_loop_devices_serve_and_release_them() -> Result<()> {
    use cas_integration::harness::{erofs_mounts_below, loop_devices_below, wait_until};
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::start_with_config(Some("[store]\nimage_mounts = \"loop\"\n"))?;
    assert_eq!(rig.stats()?["new_layers"], "EROFS images", "{}", rig.logs());
    let log = rig.daemon.log();
    let said = log
        .lines()
        .find(|l| l.contains("mounted through loop devices"));
    println!(
        "{}",
        said.unwrap_or_else(|| panic!("no word of loop devices:\n{log}"))
    );
    for image in [&rig.base_ref, &rig.app_ref] {
        rig.pull("cas", image)?;
        rig.pull("overlayfs", image)?;
    }
    rig.assert_same_tree(&rig.base_ref, "base")?;
    rig.assert_same_tree(&rig.app_ref, "app")?;
    let snapshots = rig.daemon.root.join("snapshots");
    let mounts = erofs_mounts_below(&snapshots);
    assert!(mounts.len() >= 2, "{mounts:?}\n{}", rig.logs());
    for (point, source) in &mounts {
        assert!(source.starts_with("/dev/loop"), "{point} from {source}");
    }
    let devices = loop_devices_below(&snapshots);
    assert_eq!(devices.len(), mounts.len(), "{devices:?} for {mounts:?}");

    // a restart detaches the images; the next use mounts them through new devices
    rig.daemon.stop()?;
    rig.daemon.restart()?;
    rig.wait_reconnected()?;
    let out = rig.run(
        &rig.app_ref,
        "e2e-loop",
        &["sh", "-c", "cat /etc/fixture-release; /app/run.sh"],
    )?;
    assert_eq!(out, format!("{APP_RELEASE}app\n"));
    let mounts = erofs_mounts_below(&snapshots);
    assert!(!mounts.is_empty(), "{}", rig.logs());
    assert!(
        mounts.iter().all(|(_, s)| s.starts_with("/dev/loop")),
        "{mounts:?}"
    );
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}");

    rig.containerd
        .ctr(&["images", "rm", "--sync", &rig.base_ref, &rig.app_ref])?;
    wait_until(
        "containerd to remove the snapshots",
        std::time::Duration::from_secs(10),
        || {
            rig.containerd
                .ctr(&["snapshots", "--snapshotter", "cas", "ls"])
                .is_ok_and(|l| l.lines().count() <= 1)
        },
    )?;
    // autoclear: each device goes with its image's last mount
    wait_until(
        "the loop devices to be released",
        std::time::Duration::from_secs(10),
        || loop_devices_below(&rig.daemon.root).is_empty(),
    )
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", loop_devices_below(&rig.daemon.root)))?;
    assert!(erofs_mounts_below(&rig.daemon.root).is_empty());
    Ok(())
}

/// Kernels without data-only lower layers get a materialised store; it must serve the
/// same trees.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn materialised_store_matches_overlayfs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start_with_config(Some("[store]\nmount_mode = \"materialised\"\n"))?;
    for image in [&rig.base_ref, &rig.app_ref] {
        rig.pull("cas", image)?;
        rig.pull("overlayfs", image)?;
    }
    rig.assert_same_tree(&rig.base_ref, "base")?;
    rig.assert_same_tree(&rig.app_ref, "app")?;
    assert_eq!(
        rig.run(&rig.base_ref, "e2e-mat", &["cat", "/etc/fixture-release"])?,
        BASE_RELEASE
    );
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn copy_up_leaves_the_cas_untouched() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    rig.pull("cas", &rig.base_ref)?;
    let before = rig.run(&rig.base_ref, "e2e-sum1", &["sha256sum", "/data/big"])?;
    // A container rewrites, appends to and chmods files that come from the image…
    rig.run(
        &rig.base_ref,
        "e2e-writer",
        &["sh", "-c", "echo overwritten > /data/big; echo more >> /data/big-dup; chmod 600 /data/big-again; cat /data/big"],
    )?;
    // …and a second container of the same image still sees the original bytes.
    let after = rig.run(
        &rig.base_ref,
        "e2e-sum2",
        &["sha256sum", "/data/big", "/data/big-dup", "/data/big-again"],
    )?;
    let sums: Vec<&str> = after
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(sums.len(), 3, "{after}");
    assert!(sums.iter().all(|s| *s == sums[0]), "{after}");
    assert_eq!(before.split_whitespace().next(), Some(sums[0]));
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    Ok(())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn removing_images_leaves_only_the_empty_layout() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    rig.pull("cas", &rig.base_ref)?;
    rig.pull("cas", &rig.app_ref)?;
    rig.containerd
        .ctr(&["images", "rm", "--sync", &rig.base_ref, &rig.app_ref])?;
    // containerd's GC removes the snapshots and then calls our Cleanup
    let mut left = String::new();
    for _ in 0..100 {
        left = rig
            .containerd
            .ctr(&["snapshots", "--snapshotter", "cas", "ls"])?;
        if left.lines().count() <= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(left.lines().count() <= 1, "snapshots left:\n{left}");
    let root = &rig.daemon.root;
    let mut found = Vec::new();
    for e in walkdir::WalkDir::new(root).min_depth(1) {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_path_buf();
        if rel.starts_with("index") {
            continue;
        }
        found.push(rel.display().to_string());
    }
    found.sort();
    assert_eq!(
        found,
        [
            "admin.sock",
            "cas",
            "cas/objects",
            "cas/tmp",
            "journal",
            "journal/journal.d",
            "journal/journal.d/checkpoint",
            "layout",
            "mode",
            "records-journaled",
            "snapshots"
        ],
        "{}",
        rig.logs()
    );
    Ok(())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn kill9_between_pulls_keeps_the_first_image() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::start()?;
    rig.pull("cas", &rig.base_ref)?;
    rig.daemon.kill9();
    rig.daemon.restart()?;
    rig.wait_reconnected()?;
    rig.pull_after_restart("cas", &rig.app_ref)?;
    assert_eq!(
        rig.run(
            &rig.base_ref,
            "e2e-after-kill",
            &["cat", "/etc/fixture-release"]
        )?,
        BASE_RELEASE
    );
    rig.pull("overlayfs", &rig.base_ref)?;
    rig.assert_same_tree(&rig.base_ref, "base-after-kill")?;
    let (code, out) = rig.casctl(&["fsck"])?;
    assert_eq!(code, 0, "{out}");
    // and a clean stop is quick, and leaves the marker that spares the next start a
    // read of every snapshot's info file
    let took = rig.daemon.stop()?;
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert!(rig.daemon.root.join("clean-stop").is_file());
    rig.daemon.restart()?;
    rig.wait_reconnected()?;
    let log = std::fs::read_to_string(rig.daemon.log_path())?;
    assert!(log.contains("stop=\"clean\""), "{log}");
    assert!(!rig.daemon.root.join("clean-stop").exists());
    assert_eq!(
        rig.run(
            &rig.app_ref,
            "e2e-after-clean-stop",
            &["cat", "/etc/fixture-release"]
        )?,
        APP_RELEASE
    );
    let (code, out) = rig.casctl(&["fsck"])?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn hostile_overlay_xattrs_in_a_layer_are_not_honoured() -> Result<()> {
    use cas_integration::compression::Compression;
    use cas_integration::fixture::{
        pseudo_random, write_oci_layout, Entry, ImageSpec, LayerSpec, Meta,
    };
    use sha2::{Digest, Sha256};
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    rig.pull("cas", &rig.base_ref)?; // puts data/big's object in the store
    let target = hex::encode(Sha256::digest(pseudo_random(2 << 20, 1)));
    let redirect = format!("/{}/{}", &target[..2], &target[2..]);
    let steal = Meta::new(0o644)
        .xattr("trusted.overlay.metacopy", b"")
        .xattr("trusted.overlay.redirect", redirect.as_bytes());
    let spec = ImageSpec {
        layers: vec![LayerSpec {
            entries: vec![
                Entry::Dir {
                    path: "bin".into(),
                    meta: Meta::new(0o755),
                },
                Entry::File {
                    path: "bin/busybox".into(),
                    meta: Meta::new(0o755),
                    data: std::fs::read(cas_integration::harness::busybox_path())?,
                },
                Entry::Symlink {
                    path: "bin/cat".into(),
                    target: "busybox".into(),
                    meta: Meta::new(0o777),
                },
                Entry::File {
                    path: "steal".into(),
                    meta: steal,
                    data: b"my own bytes\n".to_vec(),
                },
            ],
            compression: Compression::Gzip,
        }],
        cmd: vec!["/bin/cat".into(), "/steal".into()],
    };
    let built = write_oci_layout(&spec, &rig.dir.path().join("img-hostile"))?;
    cas_integration::registry::push_layout(
        &built.layout_dir,
        &rig.registry.addr,
        "fixture/hostile",
        "1",
    )?;
    let image = format!("{}/fixture/hostile:1", rig.registry.addr);
    rig.pull("cas", &image)?;
    rig.pull("overlayfs", &image)?;
    assert_eq!(
        rig.run(&image, "e2e-hostile", &["cat", "/steal"])?,
        "my own bytes\n"
    );
    rig.assert_same_tree(&image, "hostile")?;
    let (code, out) = rig.casctl(&["fsck"])?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

/// Two near-duplicate images pulled at once, run and removed, three times, while
/// `casctl gc` runs in a loop: no request fails, fsck is clean (the object counters
/// included), and the image pulled last reads as overlayfs's.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn casctl_gc_racing_pulls_and_removes_loses_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::start()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let gc = s.spawn(|| -> Result<u32> {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, out) = rig.casctl(&["gc"])?;
                anyhow::ensure!(code == 0, "casctl gc failed: {out}");
                runs += 1;
            }
            Ok(runs)
        });
        let work = (|| -> Result<()> {
            for _ in 0..3 {
                // the two images share their first layer: both pulls prepare, apply
                // and commit it at once, and one of them finds it made by the other
                let rig = &rig;
                std::thread::scope(|p| -> Result<()> {
                    let pulls = [rig.base_ref.as_str(), rig.app_ref.as_str()]
                        .map(|image| p.spawn(move || rig.pull("cas", image)));
                    for pull in pulls {
                        pull.join()
                            .map_err(|_| anyhow::anyhow!("pull thread panicked"))??;
                    }
                    Ok(())
                })?;
                rig.containerd
                    .ctr(&["images", "rm", "--sync", &rig.base_ref])?;
                assert_eq!(
                    rig.run(
                        &rig.app_ref,
                        "e2e-gc-race",
                        &["cat", "/etc/fixture-release"]
                    )?,
                    APP_RELEASE
                );
                rig.containerd
                    .ctr(&["images", "rm", "--sync", &rig.app_ref])?;
            }
            rig.pull("cas", &rig.base_ref)?;
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let runs = gc
            .join()
            .map_err(|_| anyhow::anyhow!("gc thread panicked"))??;
        work?;
        assert!(runs > 0);
        Ok(())
    })?;
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    rig.pull("overlayfs", &rig.base_ref)?;
    rig.assert_same_tree(&rig.base_ref, "base-after-gc-race")?;
    Ok(())
}

/// `GET /metrics` over plain HTTP/1.1; the body.
fn scrape(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text)
}

/// The value of the first sample line that starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn metrics_show_requests_ingest_store_and_gc() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let rig = Rig::start_with_config(Some(&format!("[metrics]\naddress = \"{addr}\"\n")))?;
    rig.pull("cas", &rig.base_ref)?;
    rig.pull("cas", &rig.app_ref)?;
    let (code, _) = rig.casctl(&["gc"])?;
    assert_eq!(code, 0);
    let text = scrape(&addr)?;
    let at_least = |series: &str, min: f64| {
        let v = sample(&text, series);
        assert!(
            v.is_some_and(|v| v >= min),
            "{series} = {v:?}, expected >= {min}:\n{text}"
        );
    };
    // base: 3 layers; app: its first layer is the base's, plus one of its own
    at_least("cas_ingested_layers_total", 4.0);
    at_least("cas_ingest_logical_bytes_total", 1.0);
    at_least(
        "cas_grpc_request_duration_seconds_count{method=\"Prepare\"}",
        4.0,
    );
    at_least(
        "cas_grpc_request_duration_seconds_count{method=\"Commit\"}",
        4.0,
    );
    at_least("cas_objects", 1.0);
    at_least("cas_physical_bytes", 1.0);
    at_least("cas_logical_bytes", 1.0);
    at_least("cas_savings_ratio", 0.01); // the shared layer and repeated content
    at_least("cas_gc_runs_total", 1.0);
    at_least("cas_recovery_seconds", 0.0);

    // Per image: the base (3 layers) and the app (the base's first layer and its own)
    // share that first layer; each has layers of its own to free.
    let (code, out) = rig.casctl(&["images", "--json"])?;
    assert_eq!(code, 0, "{out}");
    let images: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let mut layers: Vec<(u64, u64)> = images
        .iter()
        .map(|i| {
            (
                i["layers"].as_u64().unwrap_or(0),
                i["exclusive_layers"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    layers.sort();
    assert_eq!(layers, [(2, 1), (3, 2)], "{out}");
    for i in &images {
        assert!(i["shared_bytes"].as_u64() > Some(0), "{out}");
        assert!(i["unique_bytes"].as_u64() > Some(0), "{out}");
        let top = i["top"].as_str().unwrap_or_default();
        let series = format!("cas_image_unique_bytes{{image=\"{top}\"}}");
        assert_eq!(
            sample(&text, &series),
            i["unique_bytes"].as_f64(),
            "{series} in:\n{text}"
        );
    }
    Ok(())
}
