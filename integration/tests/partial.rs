//! Partial pulls of zstd:chunked layers: containerd 2.x's transfer service passes the
//! layers' labels to Prepare (`enable_remote_snapshot_annotations`), the daemon builds
//! each layer from its TOC, fetching only the files the store lacks, and answers
//! `AlreadyExists`: containerd neither downloads nor applies the blob.
//!
//! Images: the fixtures converted by our zstd:chunked writer (with a tar-split, so the
//! rebuilt archive is checked against the diffID), a near-duplicate of the base (another
//! build of the same files), and the base converted by Debian's skopeo (no tar-split:
//! TOC-verified only where the configuration accepts it, a full pull otherwise).
//! Every tree is compared with overlayfs's full pull of the same image. Needs root.

use std::process::Command;

use anyhow::{bail, Result};
use cas_integration::chunked::{convert, with_extra_file};
use cas_integration::fixture::BASE_RELEASE;
use cas_integration::harness::{require_root, ContainerdOptions, Rig, RigOptions};
use cas_integration::registry::push_layout;
use remote::encode::Options;

fn rig(verify: &str) -> Result<Option<Rig>> {
    let mut containerd = ContainerdOptions::cached("2");
    if !require_root() || !containerd.bin.available() {
        return Ok(None);
    }
    containerd.remote_snapshot_annotations = true;
    let rig = Rig::start_with(RigOptions {
        containerd,
        daemon_config: Some(format!(
            "[remote]\nverify = \"{verify}\"\nconfig_path = \"{{containerd}}/certs.d\"\n"
        )),
        ..RigOptions::default()
    })?;
    Ok(Some(rig))
}

fn partial(rig: &Rig) -> Result<(u64, u64, u64, u64)> {
    let s = rig.stats()?;
    let p = &s["ingest_paths"];
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    Ok((
        n("partial_layers"),
        n("partial_fallbacks"),
        n("partial_fetched_bytes"),
        n("partial_layer_bytes"),
    ))
}

fn skopeo_zstd_chunked(rig: &Rig, layout: &std::path::Path, name: &str) -> Result<String> {
    let dst = format!("docker://{}/{name}:1", rig.registry.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(["--dest-compress-format", "zstd:chunked"])
        .arg(format!("oci:{}", layout.display()))
        .arg(&dst)
        .output()?;
    if !out.status.success() {
        bail!("skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!("{}/{name}:1", rig.registry.addr))
}

#[test]
#[ignore = "needs root, containerd 2.x, runc, skopeo and a registry (make e2e runs it)"]
fn zstd_chunked_layers_are_pulled_file_by_file_and_match_overlayfs() -> Result<()> {
    let Some(rig) = rig("toc")? else {
        return Ok(());
    };
    let d = rig.dir.path();
    let reg = &rig.registry.addr;
    let base = convert(
        &rig.base.layout_dir,
        &d.join("zc-base"),
        Options::default(),
        |_, t| Ok(t),
    )?;
    push_layout(&base.layout_dir, reg, "chunked/base", "1")?;
    let near = convert(
        &rig.base.layout_dir,
        &d.join("zc-near"),
        Options::default(),
        |_, t| with_extra_file(t, "etc/rebuilt", b"another build\n"),
    )?;
    push_layout(&near.layout_dir, reg, "chunked/near", "1")?;
    let base_ref = format!("{reg}/chunked/base:1");
    let near_ref = format!("{reg}/chunked/near:1");

    // a first pull: every file fetched, no blob through containerd
    rig.pull("cas", &base_ref)
        .map_err(|e| e.context(rig.logs()))?;
    let (layers, fallbacks, fetched, layer_bytes) = partial(&rig)?;
    assert_eq!(
        (layers, fallbacks),
        (base.layer_digests.len() as u64, 0),
        "{}",
        rig.logs()
    );
    assert!(fetched > 0 && layer_bytes > 0);
    rig.pull("overlayfs", &base_ref)?;
    rig.assert_same_tree(&base_ref, "zc-base")?;
    assert_eq!(
        rig.run(&base_ref, "zc-release", &["cat", "/etc/fixture-release"])?,
        BASE_RELEASE
    );

    // a near-duplicate: only the TOC, the tar-split and the one new file
    rig.pull("cas", &near_ref)
        .map_err(|e| e.context(rig.logs()))?;
    let (layers2, fallbacks2, fetched2, layer_bytes2) = partial(&rig)?;
    assert_eq!(fallbacks2, 0, "{}", rig.logs());
    assert!(layers2 > layers);
    let (f, l) = (fetched2 - fetched, layer_bytes2 - layer_bytes);
    eprintln!("first pull: fetched {fetched} of {layer_bytes} bytes; near-duplicate: {f} of {l}");
    assert!(
        f * 20 < l,
        "near-duplicate fetched {f} of {l} bytes\n{}",
        rig.logs()
    );
    rig.pull("overlayfs", &near_ref)?;
    rig.assert_same_tree(&near_ref, "zc-near")?;

    // an independent producer without a tar-split, TOC-verified here: the app image,
    // whose base layer is the base's (the same chain ID: nothing to pull)
    let sk = skopeo_zstd_chunked(&rig, &rig.app.layout_dir, "skopeo/app")?;
    rig.pull("cas", &sk).map_err(|e| e.context(rig.logs()))?;
    let (layers3, fallbacks3, _, _) = partial(&rig)?;
    assert_eq!(fallbacks3, 0, "{}", rig.logs());
    assert!(layers3 > layers2);
    rig.pull("overlayfs", &sk)?;
    rig.assert_same_tree(&sk, "skopeo-app")?;
    assert_eq!(
        rig.run(&sk, "zc-app", &["sh", "-c", "/app/run.sh"])?,
        "app\n"
    );

    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    let (code, out) = rig.casctl(&["stats"])?;
    assert_eq!(code, 0);
    assert!(out.contains("partial pulls:"), "{out}");
    Ok(())
}

#[test]
#[ignore = "needs root, containerd 2.x, runc, skopeo and a registry (make e2e runs it)"]
fn without_a_tar_split_the_default_is_a_full_pull() -> Result<()> {
    let Some(rig) = rig("diff-id")? else {
        return Ok(());
    };
    let sk = skopeo_zstd_chunked(&rig, &rig.base.layout_dir, "skopeo/base")?;
    rig.pull("cas", &sk).map_err(|e| e.context(rig.logs()))?;
    let (layers, fallbacks, _, _) = partial(&rig)?;
    assert_eq!(layers, 0);
    assert!(fallbacks > 0, "{}", rig.logs());
    assert!(rig.logs().contains("no tar-split"), "{}", rig.logs());
    rig.pull("overlayfs", &sk)?;
    rig.assert_same_tree(&sk, "skopeo-full")?;
    let (code, out) = rig.casctl(&["fsck"])?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}
