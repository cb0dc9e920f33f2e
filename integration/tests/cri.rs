//! Kubernetes end to end (issue 8): containerd 2.x's CRI plugin with `snapshotter = "cas"`,
//! driven over the CRI API as kubelet drives it. The sandbox ("pause") image is our own
//! fixture, pinned in the config and pulled through cas like the workload image; pods use
//! the node's network namespace, so no CNI plugin is involved. Needs root and the cached
//! containerd 2.x (`scripts/containerd-versions.sh`); skips otherwise.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cas_integration::cri::api;
use cas_integration::cri::CriClient;
use cas_integration::fixture::BASE_RELEASE;
use cas_integration::harness::{
    idmap_runc, require_root, skip, ContainerdOptions, Rig, RigOptions,
};

const K8S_NAMESPACE: &str = "k8s.io";

/// The node's network, pid and ipc namespaces for the pod: no CNI.
fn node_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Pod as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A pod `name` logging to `log_dir`, in these namespaces.
fn pod_config(
    name: &str,
    log_dir: &str,
    namespaces: api::NamespaceOption,
) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // no hostname: the pod shares the node's UTS namespace with its network
        log_directory: log_dir.into(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sum of `ctr snapshots usage` over our snapshots in the k8s.io namespace: (bytes, inodes).
fn cas_usage(rig: &Rig) -> Result<(u64, u64)> {
    let list = rig.containerd.ctr(&[
        "--namespace",
        K8S_NAMESPACE,
        "snapshots",
        "--snapshotter",
        "cas",
        "ls",
    ])?;
    let (mut bytes, mut inodes) = (0, 0);
    for key in list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        let out = rig.containerd.ctr(&[
            "--namespace",
            K8S_NAMESPACE,
            "snapshots",
            "--snapshotter",
            "cas",
            "usage",
            "-b",
            key,
        ])?;
        let row = out.lines().nth(1).context("no usage row")?;
        let cols: Vec<&str> = row.split_whitespace().collect();
        bytes += cols.get(1).context("no size")?.parse::<u64>()?;
        inodes += cols.get(2).context("no inodes")?.parse::<u64>()?;
    }
    Ok((bytes, inodes))
}

async fn wait_exited(cri: &mut CriClient, id: &str) -> Result<api::ContainerStatus> {
    let start = Instant::now();
    loop {
        let st = cri
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no container status")?;
        if st.state == api::ContainerState::ContainerExited as i32 {
            return Ok(st);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("container {id} still not exited: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs pod `name` in `namespaces` with one container `name` running `sh -c script`
/// (not started yet), logging to `<log_dir>/<name>.log`; returns (pod, container).
async fn pod_with_container(
    cri: &mut CriClient,
    name: &str,
    log_dir: &str,
    image: &api::ImageSpec,
    script: &str,
    namespaces: api::NamespaceOption,
) -> Result<(String, String)> {
    let sandbox = pod_config(name, log_dir, namespaces.clone());
    let pod = cri
        .runtime
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let container = cri
        .runtime
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(api::ContainerConfig {
                metadata: Some(api::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(image.clone()),
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                log_path: format!("{name}.log"),
                linux: Some(api::LinuxContainerConfig {
                    security_context: Some(api::LinuxContainerSecurityContext {
                        namespace_options: Some(namespaces),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        })
        .await
        .with_context(|| format!("CreateContainer in {name}"))?
        .into_inner()
        .container_id;
    Ok((pod, container))
}

/// What container `name` wrote to stdout (CRI's log format: `<time> stdout F <line>`).
fn log_lines(log_dir: &str, name: &str) -> Result<Vec<String>> {
    let log = std::fs::read_to_string(std::path::Path::new(log_dir).join(format!("{name}.log")))?;
    Ok(log
        .lines()
        .filter_map(|l| l.split_once(" stdout F ").map(|(_, text)| text.to_string()))
        .collect())
}

/// Stops and removes a container and its pod, as kubelet does.
async fn remove_pod(cri: &mut CriClient, pod: String, container: String) -> Result<()> {
    cri.runtime
        .stop_container(api::StopContainerRequest {
            container_id: container.clone(),
            timeout: 5,
        })
        .await
        .context("StopContainer")?;
    cri.runtime
        .remove_container(api::RemoveContainerRequest {
            container_id: container,
        })
        .await
        .context("RemoveContainer")?;
    cri.runtime
        .stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("StopPodSandbox")?;
    cri.runtime
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}

async fn cri_flow(rig: &Rig) -> Result<()> {
    let mut cri = CriClient::connect(&rig.containerd.sock).await?;
    let version = cri
        .runtime
        .version(api::VersionRequest::default())
        .await?
        .into_inner();
    eprintln!(
        "CRI: {} {} (API {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );

    // Pull the workload image through CRI.
    let image = api::ImageSpec {
        image: rig.base_ref.clone(),
        ..Default::default()
    };
    let pulled = cri
        .images
        .pull_image(api::PullImageRequest {
            image: Some(image.clone()),
            ..Default::default()
        })
        .await
        .context("PullImage")?
        .into_inner()
        .image_ref;
    eprintln!("pulled {} as {pulled}", rig.base_ref);
    let listed = cri
        .images
        .list_images(api::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    assert!(
        listed.iter().any(|i| i.repo_tags.contains(&rig.base_ref)),
        "{listed:?}"
    );

    // A pod on the node's network; its sandbox image is pulled through cas too. Its
    // container prints and exits.
    let log_dir = rig.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir)?;
    let log_dir = log_dir.to_str().context("log dir")?;
    let script = "cat /etc/fixture-release; echo hello from cas";
    let (pod, container) = pod_with_container(
        &mut cri,
        "hello",
        log_dir,
        &image,
        script,
        node_namespaces(),
    )
    .await?;
    cri.runtime
        .start_container(api::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .context("StartContainer")?;
    let status = wait_exited(&mut cri, &container).await?;
    assert_eq!(status.exit_code, 0, "{status:?}");
    assert_eq!(
        log_lines(log_dir, "hello")?,
        [BASE_RELEASE.trim_end(), "hello from cas"]
    );

    // Everything the pod runs on is ours: the images' layers are committed cas snapshots.
    let snaps = rig.containerd.ctr(&[
        "--namespace",
        K8S_NAMESPACE,
        "snapshots",
        "--snapshotter",
        "cas",
        "ls",
    ])?;
    // base: 3 layers; pause: 1; plus the container's and the sandbox's active snapshots
    assert!(snaps.lines().count() > 4 + 2, "{snaps}");

    // Stop and remove, as kubelet does.
    remove_pod(&mut cri, pod, container).await?;
    let pods = cri
        .runtime
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");

    // ImageFsInfo is what kubelet's image GC reads: CRI sums our Usage over the
    // snapshots it saw (every stats_collect_period), so it must come to what our
    // snapshots report now, and cover the bytes the store holds.
    let expected = cas_usage(rig)?;
    let start = Instant::now();
    let fs = loop {
        let info = cri
            .images
            .image_fs_info(api::ImageFsInfoRequest {})
            .await?
            .into_inner();
        let fs = info
            .image_filesystems
            .first()
            .cloned()
            .context("no image filesystem")?;
        let used = (
            fs.used_bytes.as_ref().map_or(0, |u| u.value),
            fs.inodes_used.as_ref().map_or(0, |u| u.value),
        );
        if used == expected {
            break fs;
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "ImageFsInfo says {used:?}, our snapshots' Usage adds up to {expected:?}: {info:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (code, stats) = rig.casctl(&["stats", "--json"])?;
    assert_eq!(code, 0, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let physical = stats["physical_bytes"].as_u64().context("physical_bytes")?;
    let used = fs.used_bytes.map_or(0, |u| u.value);
    eprintln!(
        "ImageFsInfo: {used} bytes, {} inodes at {:?}; store objects {physical} bytes",
        expected.1,
        fs.fs_id.as_ref().map(|f| &f.mountpoint)
    );
    assert!(
        used >= physical,
        "ImageFsInfo {used} < objects {physical}: {stats}"
    );
    // kubelet reads the image filesystem's capacity at this mountpoint: it must be our
    // store's (exported as the proxy plugin's root), not a directory under containerd's
    let mountpoint = fs.fs_id.map(|f| f.mountpoint).unwrap_or_default();
    assert_eq!(
        std::path::Path::new(&mountpoint),
        rig.daemon.root,
        "ImageFsInfo's mountpoint"
    );
    Ok(())
}

fn cri_rig(containerd: ContainerdOptions) -> Result<Option<Rig>> {
    if !require_root() || !containerd.bin.available() {
        return Ok(None);
    }
    Ok(Some(Rig::start_with(RigOptions {
        containerd,
        cri: true,
        ..RigOptions::default()
    })?))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn cri_pulls_runs_a_pod_and_reports_image_fs_usage() -> Result<()> {
    let Some(rig) = cri_rig(ContainerdOptions::cached("2"))? else {
        return Ok(());
    };
    block_on(cri_flow(&rig))?.map_err(|e| e.context(rig.logs()))
}

/// The same with `cas-diff` as the transfer service's differ for cas, which CRI pulls
/// through on 2.1: every layer of the pod's images is applied in one pass.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn cri_with_our_differ() -> Result<()> {
    let Some(rig) = cri_rig(ContainerdOptions::cached("2").differ(true))? else {
        return Ok(());
    };
    block_on(cri_flow(&rig))?.map_err(|e| e.context(rig.logs()))?;
    let (code, stats) = rig.casctl(&["stats", "--json"])?;
    assert_eq!(code, 0, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let paths = &stats["ingest_paths"];
    assert!(
        paths["fast_path_applies"].as_u64().unwrap_or(0) > 0
            && paths["commit_ingests"].as_u64() == Some(0),
        "CRI pulls did not go through cas-diff: {stats}\n{}",
        rig.logs()
    );
    Ok(())
}

/// A user namespace for a pod, container root at `host`.
/// A user-namespaced pod cannot share the node's network namespace: it gets one of
/// its own with a loopback interface only (the rig's CNI configuration).
fn pod_userns(host: u32) -> api::NamespaceOption {
    let m = vec![api::IdMapping {
        host_id: host,
        container_id: 0,
        length: 65_536,
    }];
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        userns_options: Some(api::UserNamespace {
            mode: api::NamespaceMode::Pod as i32,
            uids: m.clone(),
            gids: m,
        }),
        ..node_namespaces()
    }
}

/// What a container reports of its user namespace and of the image's owners.
const USERNS_PROBE: &str = "tr -s ' ' < /proc/self/uid_map | sed 's/^ //'; \
    stat -c '%u:%g' / /etc/fixture-release /home/user/notes; \
    cat /data/small; echo written > /etc/written && cat /etc/written";

fn committed_and_objects(rig: &Rig) -> Result<(u64, u64)> {
    let stats = rig.stats()?;
    Ok((
        stats["committed"].as_u64().context("committed")?,
        stats["objects"].as_u64().context("objects")?,
    ))
}

async fn userns_flow(rig: &Rig) -> Result<()> {
    let mut cri = CriClient::connect(&rig.containerd.sock).await?;
    let image = api::ImageSpec {
        image: rig.base_ref.clone(),
        ..Default::default()
    };
    for i in [
        rig.base_ref.clone(),
        rig.pause_ref.clone().context("pause")?,
    ] {
        cri.images
            .pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: i,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("PullImage")?;
    }
    let before = committed_and_objects(rig)?;
    let log_dir = rig.dir.path().join("userns-logs");
    std::fs::create_dir_all(&log_dir)?;
    let log_dir = log_dir.to_str().context("log dir")?;

    // Two pods with different mappings at once, as kubelet gives every pod its own.
    let mut running = Vec::new();
    for (name, host) in [("userns-a", 100_000u32), ("userns-b", 200_000)] {
        let (pod, container) = pod_with_container(
            &mut cri,
            name,
            log_dir,
            &image,
            USERNS_PROBE,
            pod_userns(host),
        )
        .await?;
        running.push((name, host, pod, container));
    }
    for (_, _, _, c) in &running {
        cri.runtime
            .start_container(api::StartContainerRequest {
                container_id: c.clone(),
            })
            .await
            .context("StartContainer")?;
    }
    for (name, host, _, c) in &running {
        let status = wait_exited(&mut cri, c).await?;
        assert_eq!(status.exit_code, 0, "{status:?}");
        let uid_map = format!("0 {host} 65536");
        assert_eq!(
            log_lines(log_dir, name)?,
            [
                uid_map.as_str(),
                "0:0",
                "0:0",
                "1000:1000",
                "small file",
                "written"
            ],
            "{status:?}"
        );
    }
    assert!(
        !rig.id_mapped_clones().is_empty(),
        "the pods' snapshots are served by ID-mapped clones"
    );
    assert_eq!(
        committed_and_objects(rig)?,
        before,
        "no copy of the image per pod"
    );

    for (_, _, pod, c) in running {
        remove_pod(&mut cri, pod, c).await?;
    }
    // The pods' snapshots go at containerd's next GC, which it paces (after a collection
    // of d seconds the next waits d / 0.02, its pause threshold) and may have run while
    // the second pod was still going: a lease deleted with `--sync` runs one now, as
    // kubelet's next image GC or pod removal would.
    let start = Instant::now();
    let mut collected = None;
    while !rig.id_mapped_clones().is_empty() {
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "clones still mounted after the pods went: {:?}",
                rig.id_mapped_clones()
            );
        }
        if collected.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
            sync_gc(rig)?;
            collected = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed_and_objects(rig)?, before);
    Ok(())
}

/// Runs containerd's garbage collection now: a lease created and deleted with `--sync`.
fn sync_gc(rig: &Rig) -> Result<()> {
    let id = "cas-test-gc";
    let ctr = |args: &[&str]| {
        let mut all = vec!["--namespace", K8S_NAMESPACE, "leases"];
        all.extend_from_slice(args);
        rig.containerd.ctr(&all)
    };
    ctr(&["create", "--id", id])?;
    ctr(&["delete", "--sync", id])?;
    Ok(())
}

/// Pods with user namespaces (`hostUsers: false`), two mappings at once: CRI hands each
/// container's mapping to Prepare (we declare `remap-ids`), the containers see the
/// image's owners, and the store holds no copy of the image per pod.
#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn cri_user_namespaced_pods_share_the_layers() -> Result<()> {
    if require_root() && idmap_runc().is_none() {
        skip("user-namespaced pods need a runc that ID-maps mounts (make deps fetches one)");
        return Ok(());
    }
    let Some(rig) = cri_rig(ContainerdOptions::cached("2").differ(true))? else {
        return Ok(());
    };
    block_on(userns_flow(&rig))?.map_err(|e| e.context(rig.logs()))
}

/// Store bytes on disk: objects and layer images (`casctl stats`).
fn store_bytes(rig: &Rig) -> Result<u64> {
    let stats = rig.stats()?;
    Ok(stats["physical_bytes"].as_u64().context("physical_bytes")?
        + stats["image_bytes"].as_u64().context("image_bytes")?)
}

/// ImageFsInfo's used bytes once CRI's periodic sum of our Usage has caught up with the
/// snapshots there are now.
async fn image_fs_used(cri: &mut CriClient, rig: &Rig) -> Result<u64> {
    let want = cas_usage(rig)?.0;
    let start = Instant::now();
    loop {
        let info = cri
            .images
            .image_fs_info(api::ImageFsInfoRequest {})
            .await?
            .into_inner();
        let used = info
            .image_filesystems
            .first()
            .and_then(|f| f.used_bytes.as_ref())
            .map_or(0, |u| u.value);
        if used == want {
            return Ok(used);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("ImageFsInfo says {used}, our snapshots' Usage adds up to {want}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What kubelet's image GC sees when it removes an image, against what the store frees.
/// kubelet counts the CRI `size` of each image it removes as freed (containerd reports
/// the image's compressed blobs, shared layers included); the store frees the image's
/// unique bytes (`casctl images`, `cas_image_unique_bytes`); kubelet's next pass reads
/// the filesystem again, so it removes more images when fewer bytes came back than it
/// counted.
async fn image_gc_flow(rig: &Rig) -> Result<()> {
    let mut cri = CriClient::connect(&rig.containerd.sock).await?;
    for i in [&rig.base_ref, &rig.app_ref] {
        cri.images
            .pull_image(api::PullImageRequest {
                image: Some(api::ImageSpec {
                    image: i.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("PullImage")?;
    }
    let listed = cri
        .images
        .list_images(api::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    let app = listed
        .iter()
        .find(|i| i.repo_tags.contains(&rig.app_ref))
        .context("app image listed")?;
    let (code, out) = rig.casctl(&["images", "--json"])?;
    anyhow::ensure!(code == 0, "{out}");
    let images: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    // the app image is the chain of two layers
    let app_usage = images
        .iter()
        .find(|i| i["layers"].as_u64() == Some(2))
        .context("the app's chain")?;
    let unique = app_usage["unique_bytes"].as_u64().context("unique_bytes")?;
    let before = (store_bytes(rig)?, image_fs_used(&mut cri, rig).await?);
    cri.images
        .remove_image(api::RemoveImageRequest {
            image: Some(api::ImageSpec {
                image: app.id.clone(),
                ..Default::default()
            }),
        })
        .await
        .context("RemoveImage")?;
    // containerd's GC removes the app's own layer and asks us to clean up; the objects
    // only it had go with it
    let start = Instant::now();
    let after = loop {
        let after = store_bytes(rig)?;
        if before.0 - after >= unique {
            break after;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "removing the app image freed {} of its {unique} unique bytes",
                before.0 - after
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let freed = before.0 - after;
    let after = (after, image_fs_used(&mut cri, rig).await?);
    eprintln!(
        "image GC: kubelet counts {} bytes (CRI size of the app image); the store freed {freed} \
         (casctl images: {unique} unique); ImageFsInfo fell by {}",
        app.size,
        before.1 as i64 - after.1 as i64
    );
    assert_eq!(
        freed, unique,
        "the store frees exactly the image's unique bytes"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn cri_image_removal_frees_the_images_unique_bytes() -> Result<()> {
    let Some(rig) = cri_rig(ContainerdOptions::cached("2").differ(true))? else {
        return Ok(());
    };
    block_on(image_gc_flow(&rig))?.map_err(|e| e.context(rig.logs()))
}
