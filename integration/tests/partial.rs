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
use cas_integration::harness::{
    require_root, ContainerdOptions, Fault, RegistryProxy, Rig, RigOptions,
};
use cas_integration::registry::push_layout;
use remote::encode::Options;

fn rig(verify: &str) -> Result<Option<Rig>> {
    rig_with(verify, "{containerd}/certs.d", "")
}

/// A rig whose daemon reads its registries' `hosts.toml` from `hosts` (`{containerd}`:
/// the rig's containerd directory).
fn rig_with(verify: &str, hosts: &str, more: &str) -> Result<Option<Rig>> {
    let mut containerd = ContainerdOptions::cached("2");
    if !require_root() || !containerd.bin.available() {
        return Ok(None);
    }
    containerd.remote_snapshot_annotations = true;
    let rig = Rig::start_with(RigOptions {
        containerd,
        daemon_config: Some(format!(
            "[remote]\nverify = \"{verify}\"\nconfig_path = \"{hosts}\"\n{more}"
        )),
        ..RigOptions::default()
    })?;
    Ok(Some(rig))
}

/// Another build of the base image as zstd:chunked written with `opts`: each layer with
/// one more file, named after `repo`, where it is pushed (`<repo>:1`); its reference.
fn variant(rig: &Rig, repo: &str, opts: Options) -> Result<String> {
    let img = convert(
        &rig.base.layout_dir,
        &rig.dir.path().join(repo.replace('/', "-")),
        opts,
        |_, t| with_extra_file(t, "etc/case", repo.as_bytes()),
    )?;
    push_layout(&img.layout_dir, &rig.registry.addr, repo, "1")?;
    Ok(format!("{}/{repo}:1", rig.registry.addr))
}

/// Pulls the app image `r` (two layers) into cas, every layer partially and checked
/// against `verified` (`diff_id` or `toc`), then into overlayfs: the same tree, and the
/// app runs.
fn app_pulled_partially(rig: &Rig, r: &str, verified: &str, name: &str) -> Result<()> {
    rig.pull("cas", r).map_err(|e| e.context(rig.logs()))?;
    let (layers, fallbacks, fetched, layer_bytes) = partial(rig)?;
    assert!(layers >= 2 && fallbacks == 0, "{}", rig.logs());
    let s = rig.stats()?;
    let by = s["ingest_paths"][format!("partial_{verified}_verified")]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        by, layers,
        "not every layer checked against {verified}: {s}"
    );
    eprintln!("{name}: fetched {fetched} of {layer_bytes} bytes");
    rig.pull("overlayfs", r)?;
    rig.assert_same_tree(r, name)?;
    assert_eq!(
        rig.run(r, &format!("{name}-run"), &["sh", "-c", "/app/run.sh"])?,
        "app\n"
    );
    fsck_clean(rig, true)?;
    Ok(())
}

/// `casctl fsck` (`--verify-objects` when `verify`) finds nothing wrong.
fn fsck_clean(rig: &Rig, verify: bool) -> Result<()> {
    let mut args = vec!["fsck"];
    if verify {
        args.push("--verify-objects");
    }
    let (code, out) = rig.casctl(&args)?;
    assert_eq!(code, 0, "{out}\n{}", rig.logs());
    Ok(())
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
    skopeo_with("skopeo", rig, layout, name)
}

/// Unstable's skopeo, which `make deps` unpacks (its containers/storage writes a
/// tar-split); `None` when it is not there.
fn new_skopeo() -> Option<String> {
    let cache = std::env::var("CAS_SKOPEO_CACHE")
        .unwrap_or_else(|_| "/var/cache/cas-snapshotter/skopeo".into());
    let bin = std::path::Path::new(&cache).join("current/skopeo");
    bin.exists().then(|| bin.display().to_string())
}

fn skopeo_with(program: &str, rig: &Rig, layout: &std::path::Path, name: &str) -> Result<String> {
    let dst = format!("docker://{}/{name}:1", rig.registry.addr);
    let out = Command::new(program)
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
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
    let base_ref = format!("{reg}/chunked/base:1");
    let near_ref = variant(&rig, "chunked/near", Options::default())?;

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

    fsck_clean(&rig, true)?;
    let (code, out) = rig.casctl(&["stats"])?;
    assert_eq!(code, 0);
    assert!(out.contains("partial pulls:"), "{out}");
    // ours with a tar-split checked against the diffID, skopeo's against the TOC
    let s = rig.stats()?;
    let p = &s["ingest_paths"];
    let (by_diff_id, by_toc) = (
        p["partial_diff_id_verified"].as_u64().unwrap_or(0),
        p["partial_toc_verified"].as_u64().unwrap_or(0),
    );
    assert_eq!(by_diff_id + by_toc, layers3, "{s}");
    assert!(by_diff_id >= layers2 && by_toc >= 1, "{s}");
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
    fsck_clean(&rig, false)?;
    Ok(())
}

/// Bad layers, each pulled in full by containerd after the daemon refused it, saying
/// why: a TOC whose digest is not the manifest's, a file whose fetched bytes are not its
/// digest, names and hardlinks out of the layer, an archive rebuilt from a tar-split
/// that is not the diffID's. Nothing of them stays in the store.
#[test]
#[ignore = "needs root, containerd 2.x, runc and a registry (make e2e runs it)"]
fn bad_layers_fall_back_to_a_full_pull_and_leave_nothing() -> Result<()> {
    let Some(rig) = rig("diff-id")? else {
        return Ok(());
    };
    fn wrong_digest(toc: &mut serde_json::Value) {
        for e in toc["entries"].as_array_mut().unwrap() {
            if e["digest"].is_string() {
                e["digest"] = serde_json::json!(format!("sha256:{}", "ab".repeat(32)));
                return;
            }
        }
    }
    fn climbs_out(toc: &mut serde_json::Value) {
        for e in toc["entries"].as_array_mut().unwrap() {
            if e["type"] == "reg" {
                e["name"] = serde_json::json!("../escaped");
                return;
            }
        }
    }
    fn foreign_hardlink(toc: &mut serde_json::Value) {
        toc["entries"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(
                {"type": "hardlink", "name": "etc/stolen", "linkName": "etc/shadow-of-the-host"}
            ));
    }
    fn longer_archive(split: &mut Vec<u8>) {
        // one more zero block after the end of the archive: a valid tar, another digest
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let text = String::from_utf8(std::mem::take(split)).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let last = lines
            .iter()
            .rposition(|l| l.contains("\"type\":2"))
            .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&lines[last]).unwrap();
        let mut bytes = b64.decode(v["payload"].as_str().unwrap()).unwrap();
        bytes.extend_from_slice(&[0; 512]);
        v["payload"] = serde_json::json!(b64.encode(bytes));
        lines[last] = v.to_string();
        *split = (lines.join("\n") + "\n").into_bytes();
    }
    let with = |f: &dyn Fn(&mut Options)| {
        let mut o = Options::default();
        f(&mut o);
        o
    };
    let cases = [
        (
            "toc-checksum",
            with(&|o| o.wrong_toc_checksum = true),
            "toc",
        ),
        (
            "content-digest",
            with(&|o| o.mangle_toc = Some(wrong_digest)),
            "content",
        ),
        (
            "climbs-out",
            with(&|o| o.mangle_toc = Some(climbs_out)),
            "toc",
        ),
        (
            "foreign-hardlink",
            with(&|o| o.mangle_toc = Some(foreign_hardlink)),
            "toc",
        ),
        (
            "diff-id",
            with(&|o| o.mangle_tar_split = Some(longer_archive)),
            "diff_id",
        ),
    ];
    for (i, (name, opts, reason)) in cases.into_iter().enumerate() {
        let r = variant(&rig, &format!("bad/{name}"), opts)?;
        rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
        let (pulled, fallbacks, _, _) = partial(&rig)?;
        assert_eq!(pulled, 0, "{name}: {}", rig.logs());
        assert!(fallbacks > i as u64, "{name}: {}", rig.logs());
        let log = rig.daemon.log();
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "{name}: no fallback saying {reason}:\n{log}"
        );
        rig.pull("overlayfs", &r)?;
        rig.assert_same_tree(&r, name)?;
    }
    // no snapshot of a failed partial pull is left (their keys start `cas-remote/`)
    let mut left = Vec::new();
    for e in std::fs::read_dir(rig.daemon.root.join("snapshots"))? {
        let info = e?.path().join("info");
        if let Ok(text) = std::fs::read_to_string(&info) {
            if text.contains("cas-remote/") {
                left.push(text);
            }
        }
    }
    assert!(left.is_empty(), "{left:?}");
    let fsck = rig.fsck_report()?;
    assert_eq!(fsck["unreferenced_objects"], 0, "{fsck}");
    fsck_clean(&rig, false)?;
    Ok(())
}

/// Through a proxy that counts what the registry serves the daemon: a partial pull
/// costs the registry the bytes the daemon says it fetched (plus the manifest and the
/// config). Then the proxy misbehaves: ignores `Range` (the whole blob, `200`), drops
/// the connection halfway through a range, demands credentials the daemon lacks. Each
/// time the layer is pulled in full by containerd, the tree is overlayfs's, and the log
/// says why.
#[test]
#[ignore = "needs root, containerd 2.x, runc and a registry (make e2e runs it)"]
fn a_registry_that_misbehaves_means_a_full_pull() -> Result<()> {
    let Some(rig) = rig_with(
        "diff-id",
        "{containerd}/../daemon-certs.d",
        "docker_config = \"{containerd}/../docker/config.json\"\n",
    )?
    else {
        return Ok(());
    };
    let reg = rig.registry.addr.clone();
    let proxy = RegistryProxy::start(&reg)?;
    use base64::Engine as _;
    let docker = rig.dir.path().join("docker");
    std::fs::create_dir_all(&docker)?;
    let hosts = rig.dir.path().join("daemon-certs.d").join(&reg);
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"http://{}\"\n", proxy.addr),
    )?;
    let image = |name: &str| variant(&rig, &format!("proxy/{name}"), Options::default());

    // an image without TOCs (the gzip fixture, two layers): one manifest request for the
    // image, not one per layer (and the challenge before it, which oci-client asks
    // twice of an anonymous registry)
    rig.pull("cas", &rig.app_ref)
        .map_err(|e| e.context(rig.logs()))?;
    let (requests, _) = proxy.requests();
    assert!(
        requests <= 3,
        "{requests} requests for an image without TOCs"
    );
    let served_before = proxy.body_bytes();
    let (_, no_toc, _, _) = partial(&rig)?;
    assert_eq!(no_toc, 2, "{}", rig.logs());

    let ok = image("ok")?;
    rig.pull("cas", &ok).map_err(|e| e.context(rig.logs()))?;
    let (pulled, fallbacks, fetched, _) = partial(&rig)?;
    assert!(pulled > 0 && fallbacks == no_toc, "{}", rig.logs());
    let served = proxy.body_bytes() - served_before;
    eprintln!("the registry served {served} bytes; the daemon counted {fetched} fetched");
    assert!(
        served >= fetched && served < fetched + (64 << 10),
        "served {served}, fetched {fetched}"
    );
    assert!(proxy.requests().1 > 0);

    for (fault, name, reason, says) in [
        (
            Fault::IgnoreRange,
            "no-range",
            "registry_range",
            "200 OK with the whole blob",
        ),
        (
            Fault::DropMidRange,
            "dropped",
            "registry_range",
            "did not answer the range request",
        ),
        (Fault::RequireAuth, "auth", "registry", "Not authorized"),
    ] {
        proxy.set_fault(fault);
        let r = image(name)?;
        let before = partial(&rig)?;
        rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
        let after = partial(&rig)?;
        assert_eq!(
            after.0,
            before.0,
            "{name}: pulled partially\n{}",
            rig.logs()
        );
        assert!(after.1 > before.1, "{name}: {}", rig.logs());
        let log = rig.daemon.log();
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "{name}: no fallback saying {reason}:\n{log}"
        );
        assert!(
            log.contains(says),
            "{name}: the log does not say {says:?}:\n{log}"
        );
        rig.pull("overlayfs", &r)?;
        rig.assert_same_tree(&r, name)?;
    }
    // a registry that wants credentials, which the daemon's docker config.json has:
    // pulled partially (another proxy: another host, whose client never saw it open)
    let guarded = RegistryProxy::start(&reg)?;
    guarded.set_fault(Fault::RequireCredentials("puller", "s3cret"));
    std::fs::write(
        docker.join("config.json"),
        serde_json::json!({"auths": {guarded.addr.clone(): {
            "auth": base64::engine::general_purpose::STANDARD.encode("puller:s3cret")
        }}})
        .to_string(),
    )?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"http://{}\"\n", guarded.addr),
    )?;
    let r = image("with-credentials")?;
    let before = partial(&rig)?;
    rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
    let after = partial(&rig)?;
    assert!(after.0 > before.0 && after.1 == before.1, "{}", rig.logs());
    fsck_clean(&rig, false)?;
    Ok(())
}

/// Kubernetes: containerd 2.x's CRI pulls through the transfer service, which passes the
/// layers' labels when the export is set; containerd 1.7's CRI passes them with
/// `disable_snapshot_annotations = false`. A near-duplicate image pulled by kubelet's
/// PullImage fetches only what the node lacks.
#[test]
#[ignore = "needs root, containerd 2.x, runc and a registry (make e2e runs it)"]
fn cri_pulls_are_partial_on_containerd_2() -> Result<()> {
    cri_partial("2")
}

#[test]
#[ignore = "needs root, containerd 1.7, runc and a registry (make e2e runs it)"]
fn cri_pulls_are_partial_on_containerd_1_7() -> Result<()> {
    cri_partial("1.7")
}

fn cri_partial(series: &str) -> Result<()> {
    let mut containerd = ContainerdOptions::cached(series);
    if !require_root() || !containerd.bin.available() {
        return Ok(());
    }
    containerd.remote_snapshot_annotations = true;
    let rig = Rig::start_with(RigOptions {
        containerd,
        cri: true,
        daemon_config: Some("[remote]\nconfig_path = \"{containerd}/certs.d\"\n".into()),
        ..RigOptions::default()
    })?;
    let d = rig.dir.path();
    let reg = rig.registry.addr.clone();
    let base = convert(
        &rig.base.layout_dir,
        &d.join("cri-base"),
        Options::default(),
        |_, t| Ok(t),
    )?;
    push_layout(&base.layout_dir, &reg, "cri/base", "1")?;
    let near = variant(&rig, "cri/near", Options::default())?;
    let rt = tokio::runtime::Runtime::new()?;
    let pull = |image: String| -> Result<()> {
        rt.block_on(async {
            let mut cri = cas_integration::cri::CriClient::connect(&rig.containerd.sock).await?;
            cri.images
                .pull_image(cas_integration::cri::api::PullImageRequest {
                    image: Some(cas_integration::cri::api::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(())
        })
    };
    pull(format!("{reg}/cri/base:1")).map_err(|e| e.context(rig.logs()))?;
    let (layers, fallbacks, fetched, layer_bytes) = partial(&rig)?;
    assert_eq!(
        (layers, fallbacks),
        (base.layer_digests.len() as u64, 0),
        "{}",
        rig.logs()
    );
    pull(near).map_err(|e| e.context(rig.logs()))?;
    let (layers2, fallbacks2, fetched2, layer_bytes2) = partial(&rig)?;
    assert!(layers2 > layers && fallbacks2 == 0, "{}", rig.logs());
    let (f, l) = (fetched2 - fetched, layer_bytes2 - layer_bytes);
    assert!(f * 20 < l, "near-duplicate fetched {f} of {l} bytes");
    fsck_clean(&rig, false)?;
    Ok(())
}

/// eStargz from its own producer: `ctr-remote image convert --estargz --oci` (Debian's
/// stargz-snapshotter) on the app image, pushed back, pulled partially (TOC-verified)
/// and compared with overlayfs's full pull of the same image.
#[test]
#[ignore = "needs root, containerd 2.x, runc, ctr-remote and a registry (make e2e runs it)"]
fn estargz_layers_from_ctr_remote_are_pulled_partially() -> Result<()> {
    let Some(rig) = rig("toc")? else {
        return Ok(());
    };
    let reg = rig.registry.addr.clone();
    let src = rig.app_ref.clone();
    let dst = format!("{reg}/estargz/app:1");
    let ctr_remote = |args: &[&str]| -> Result<String> {
        let out = Command::new("ctr-remote")
            .arg("--address")
            .arg(&rig.containerd.sock)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr-remote {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    rig.containerd
        .ctr(&["content", "fetch", "--plain-http", &src])?;
    ctr_remote(&["images", "convert", "--estargz", "--oci", &src, &dst])?;
    ctr_remote(&["images", "push", "--plain-http", &dst])?;
    rig.containerd.ctr(&["images", "rm", &dst])?;
    app_pulled_partially(&rig, &dst, "toc", "estargz-app")?;
    Ok(())
}

/// containers/storage's own zstd:chunked with a tar-split (unstable's skopeo, from
/// `make deps`): pulled partially with the default verification, the archive rebuilt
/// from its tar-split matching the image's diffIDs, the tree overlayfs's.
#[test]
#[ignore = "needs root, containerd 2.x, runc, unstable's skopeo and a registry (make e2e runs it)"]
fn containers_storage_layers_with_a_tar_split_are_checked_against_the_diff_id() -> Result<()> {
    let Some(rig) = rig("diff-id")? else {
        return Ok(());
    };
    let Some(skopeo) = new_skopeo() else {
        cas_integration::harness::skip(
            "no skopeo in /var/cache/cas-snapshotter/skopeo (make deps)",
        );
        return Ok(());
    };
    let r = skopeo_with(&skopeo, &rig, &rig.app.layout_dir, "storage/app")?;
    app_pulled_partially(&rig, &r, "diff_id", "storage-app")
}

/// A mirror over HTTPS whose certificate is signed by a CA of the test's own: with the
/// CA in `hosts.toml` (`ca`), the layers come through the mirror, partially; without it
/// the certificate is refused and containerd pulls in full. A host listed before it that
/// is down is passed over.
#[test]
#[ignore = "needs root, containerd 2.x, runc, openssl and a registry (make e2e runs it)"]
fn an_https_mirror_with_its_ca_from_hosts_toml() -> Result<()> {
    let Some(rig) = rig_with("diff-id", "{containerd}/../daemon-certs.d", "")? else {
        return Ok(());
    };
    let d = rig.dir.path();
    let reg = rig.registry.addr.clone();
    let (tls, ca) =
        cas_integration::harness::Registry::start_tls_mirror(&d.join("registry"), &d.join("tls"))?;
    let hosts = d.join("daemon-certs.d").join(&reg);
    std::fs::create_dir_all(&hosts)?;
    let image = |name: &str| variant(&rig, &format!("tls/{name}"), Options::default());
    // without the CA: refused, a full pull
    std::fs::write(
        hosts.join("hosts.toml"),
        format!("server = \"https://{}\"\n", tls.addr),
    )?;
    let r = image("unknown-ca")?;
    rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
    let (pulled, fallbacks, _, _) = partial(&rig)?;
    assert!(pulled == 0 && fallbacks > 0, "{}", rig.logs());
    // with it: through the mirror, partially
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            tls.addr,
            ca.display()
        ),
    )?;
    let r = image("with-ca")?;
    rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
    let (pulled, _, _, _) = partial(&rig)?;
    assert!(pulled > 0, "{}\n{}", rig.logs(), tls.log());
    rig.pull("overlayfs", &r)?;
    rig.assert_same_tree(&r, "with-ca")?;
    // a mirror that is down, listed first: the next host (the server) serves
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n[host.\"http://127.0.0.1:9\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            tls.addr,
            ca.display()
        ),
    )?;
    let r = image("mirror-down")?;
    rig.pull("cas", &r).map_err(|e| e.context(rig.logs()))?;
    let (pulled2, _, _, _) = partial(&rig)?;
    assert!(pulled2 > pulled, "{}", rig.logs());
    Ok(())
}
