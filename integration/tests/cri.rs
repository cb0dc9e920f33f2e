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
use cas_integration::harness::{require_root, ContainerdOptions, Rig, RigOptions};

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

fn sandbox_config(log_dir: &str) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: "cas-e2e".into(),
            uid: "cas-e2e-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // no hostname: the pod shares the node's UTS namespace with its network
        log_directory: log_dir.into(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(node_namespaces()),
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

    // A pod on the node's network; its sandbox image is pulled through cas too.
    let log_dir = rig.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir)?;
    let sandbox = sandbox_config(log_dir.to_str().context("log dir")?);
    let pod = cri
        .runtime
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;

    // A container that prints and exits.
    let container = cri
        .runtime
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(api::ContainerConfig {
                metadata: Some(api::ContainerMetadata {
                    name: "hello".into(),
                    attempt: 0,
                }),
                image: Some(image),
                command: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "cat /etc/fixture-release; echo hello from cas".into(),
                ],
                log_path: "hello.log".into(),
                linux: Some(api::LinuxContainerConfig {
                    security_context: Some(api::LinuxContainerSecurityContext {
                        namespace_options: Some(node_namespaces()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(api::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .context("StartContainer")?;
    let status = wait_exited(&mut cri, &container).await?;
    assert_eq!(status.exit_code, 0, "{status:?}");

    // CRI's log format: `<time> stdout F <line>`.
    let log = std::fs::read_to_string(log_dir.join("hello.log"))?;
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once(" stdout F ").map(|(_, text)| text))
        .collect();
    assert_eq!(
        lines,
        [BASE_RELEASE.trim_end(), "hello from cas"],
        "log:\n{log}"
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
