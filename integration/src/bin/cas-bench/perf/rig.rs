//! The benchmark's rig: one containerd with both snapshotters on a fresh XFS loop
//! filesystem, a registry and our daemon, and the timed step (a pull) with what it
//! measures around it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use cas_integration::harness::{
    workspace_bin, Containerd, ContainerdBin, ContainerdVersion, Daemon, LoopFs, Registry,
};

use crate::images::Image;

use super::*;

pub(super) struct Rig {
    // Drop order: containerd, daemon, registry, then the filesystem.
    pub(super) containerd: Containerd,
    pub(super) daemon: Daemon,
    pub(super) registry: Registry,
    pub(super) fs: LoopFs,
    pub(super) dev: String,
    pub(super) images: BTreeMap<String, Image>,
    /// Pass `--local` to `ctr images pull` (containerd 2.x).
    pub(super) local: bool,
}

impl Rig {
    pub(super) fn reference(&self, image: &str) -> String {
        format!("{}/bench/{image}:1", self.registry.addr)
    }

    pub(super) fn remove_all_images(&self) -> Result<()> {
        let list = self.containerd.ctr(&["images", "ls", "-q"])?;
        for r in list.lines().filter(|l| !l.trim().is_empty()) {
            self.containerd.ctr(&["images", "rm", "--sync", r.trim()])?;
        }
        for sn in SNAPSHOTTERS {
            let left = self
                .containerd
                .ctr(&["snapshots", "--snapshotter", sn, "ls"])?;
            if left.lines().count() > 1 {
                bail!("{sn} still holds snapshots after removing every image:\n{left}");
            }
        }
        Ok(())
    }

    /// Best effort after a failed pull: every image, then whatever snapshots `sn` still
    /// holds (children before parents, so a few passes).
    fn remove_leftovers(&self, sn: &str) {
        if let Ok(list) = self.containerd.ctr(&["images", "ls", "-q"]) {
            for r in list.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.containerd.ctr(&["images", "rm", "--sync", r.trim()]);
            }
        }
        for _ in 0..8 {
            let Ok(list) = self
                .containerd
                .ctr(&["snapshots", "--snapshotter", sn, "ls"])
            else {
                return;
            };
            let keys: Vec<&str> = list
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            if keys.is_empty() {
                return;
            }
            for k in keys.iter().rev() {
                let _ = self
                    .containerd
                    .ctr(&["snapshots", "--snapshotter", sn, "rm", k]);
            }
        }
    }

    fn fetch(&self, image: &str) -> Result<()> {
        self.containerd
            .ctr(&["content", "fetch", "--plain-http", &self.reference(image)])
            .map(drop)
    }

    pub(super) fn pull(&self, sn: &str, image: &str) -> Result<()> {
        let reference = self.reference(image);
        let mut args = vec!["images", "pull", "--plain-http"];
        if self.local {
            args.push("--local");
        }
        args.extend(["--snapshotter", sn, &reference]);
        self.containerd
            .ctr(&args)
            .with_context(|| format!("pulling {image} into {sn}"))
            .map(drop)
    }

    /// How the timed pulls unpack, for the report and the console. On containerd 2.x with
    /// `cas-diff` declared, first tries a transfer-service pull of the smallest image into
    /// `cas`: until the daemon serves Diff it fails ("not implemented"), and the bench
    /// pulls with `--local` instead, through the diff service and its fallback to walking.
    pub(super) fn choose_unpack_path(&mut self) -> Result<String> {
        let c = &self.containerd;
        let ours = if c.differ {
            "`cas-diff` first, containerd's walking differ when it answers Unimplemented"
        } else {
            "containerd's walking differ"
        };
        if c.version.major < 2 {
            // 1.6 has no transfer service (nor --local); 1.7's ctr unpacks itself unless
            // --local=false.
            if self.local {
                println!(
                    "bench: --local ignored: containerd {}'s ctr unpacks itself",
                    c.version
                );
                self.local = false;
            }
            return Ok(format!(
                "`ctr images pull`, unpacked by the client through containerd's diff service \
                 (cas: {ours}; overlayfs: walking)"
            ));
        }
        if self.local {
            return Ok(format!(
                "`ctr images pull --local` (chosen with --local), unpacked by the client through \
                 containerd's diff service (cas: {ours}; overlayfs: walking)"
            ));
        }
        if !c.differ {
            return Ok(
                "`ctr images pull` through the transfer service (walking differ for both)".into(),
            );
        }
        let probe = self
            .images
            .iter()
            .min_by_key(|(_, img)| img.layers.iter().map(|l| l.blob.size).sum::<u64>())
            .map(|(name, _)| name.clone())
            .context("no images")?;
        let tried = self.fetch(&probe).and_then(|()| self.pull("cas", &probe));
        if tried.is_err() {
            self.remove_leftovers("cas");
        }
        self.remove_all_images()?;
        match tried {
            Ok(()) => Ok(
                "`ctr images pull` through the transfer service (cas: `cas-diff`; overlayfs: walking)"
                    .into(),
            ),
            Err(e) if format!("{e:#}").contains("not implemented") => {
                println!(
                    "bench: containerd {}'s transfer service cannot unpack into cas through cas-diff: \
                     the daemon does not serve Diff yet ({}). Pulling with `ctr images pull --local` \
                     instead (both snapshotters; cas-diff is tried first, then walking). \
                     CONTAINERD=1.7 measures the same path with 1.7's ctr.",
                    c.version,
                    format!("{e:#}").lines().next().unwrap_or_default()
                );
                self.local = true;
                Ok(format!(
                    "`ctr images pull --local`, unpacked by the client through containerd's diff \
                     service (cas: {ours}; overlayfs: walking): the transfer service's pull into cas \
                     through `cas-diff` failed, the daemon does not serve Diff yet"
                ))
            }
            Err(e) => Err(e.context(format!(
                "probe pull of {probe} into cas through the transfer service\n{}",
                self.containerd.log()
            ))),
        }
    }

    pub(super) fn measure(&self, case: &Case, sn: &'static str, run: usize) -> Result<Sample> {
        self.remove_all_images()?;
        for img in &case.setup {
            self.fetch(img)?;
            self.pull(sn, img)?;
        }
        if !case.cold {
            for img in &case.targets {
                self.fetch(img)?;
            }
        }
        drop_caches()?;
        let dpid = self.daemon.pid().context("daemon not running")?;
        let cpid = self.containerd.pid().context("containerd not running")?;
        for p in [dpid, cpid] {
            fs::write(format!("/proc/{p}/clear_refs"), "5")?;
        }
        let (dcpu, ccpu) = (cpu_secs(dpid)?, cpu_secs(cpid)?);
        let load1 = load1()?;
        let sectors = sectors_written(&self.dev)?;
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let pulls: Vec<_> = case
                .targets
                .iter()
                .map(|img| s.spawn(move || self.pull(sn, img)))
                .collect();
            for p in pulls {
                p.join()
                    .map_err(|_| anyhow::anyhow!("pull thread panicked"))??;
            }
            Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        nix::unistd::sync();
        let synced_secs = t.elapsed().as_secs_f64();
        Ok(Sample {
            case: case.id.clone(),
            sn,
            run,
            secs,
            synced_secs,
            written: (sectors_written(&self.dev)? - sectors) * 512,
            daemon_hwm_kib: hwm_kib(dpid)?,
            daemon_rss_after_kib: status_kib(dpid, "VmRSS:")?,
            containerd_hwm_kib: hwm_kib(cpid)?,
            daemon_cpu: cpu_secs(dpid)? - dcpu,
            containerd_cpu: cpu_secs(cpid)? - ccpu,
            load1,
        })
    }

    /// Layers a case's timed step applies (those its setup did not already unpack).
    pub(super) fn applied(&self, case: &Case) -> Vec<&crate::images::Layer> {
        let present: HashSet<&str> = case
            .setup
            .iter()
            .flat_map(|i| self.images[i].layers.iter().map(|l| l.blob.digest.as_str()))
            .collect();
        case.targets
            .iter()
            .flat_map(|i| self.images[i].layers.iter())
            .filter(|l| !present.contains(l.blob.digest.as_str()))
            .collect()
    }
}

/// The containerd that `--containerd` names, or `2` when cached, else the system's.
pub(super) fn select_containerd(arg: Option<&str>) -> Result<ContainerdBin> {
    if let Some(a) = arg {
        let bin = ContainerdBin::from_arg(a);
        if !bin.present() {
            bail!(
                "no containerd and ctr in {} (scripts/containerd-versions.sh, or make deps, \
                 fetches 1.7 and 2)",
                bin.dir().unwrap_or_default().display()
            );
        }
        return Ok(bin);
    }
    let two = ContainerdBin::Cached("2".into());
    if two.present() {
        return Ok(two);
    }
    println!(
        "bench: no cached containerd 2 in {} (scripts/containerd-versions.sh, or make deps): \
         using the system's containerd; on 1.6 both snapshotters unpack with the walking differ \
         (the cas-diff fast path needs >= {})",
        two.dir().unwrap_or_default().display(),
        ContainerdVersion::PROXY_DIFFER
    );
    Ok(ContainerdBin::System)
}

/// `casctl stats`' count of how the daemon's layers came in (one-pass applies by
/// `cas-diff`, or containerd's applier and an ingest at Commit), in words.
pub(super) fn cas_layer_paths(store: &Path) -> String {
    let out = workspace_bin("casctl", "CASCTL_BIN").and_then(|bin| {
        Ok(Command::new(bin)
            .arg("--root")
            .arg(store)
            .args(["stats", "--json"])
            .output()?)
    });
    let stats: Option<serde_json::Value> = out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    let Some(p) = stats
        .as_ref()
        .map(|s| &s["ingest_paths"])
        .filter(|p| p.is_object())
    else {
        return "unknown (no `casctl stats` from the daemon)".into();
    };
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    format!(
        "{} applied in one pass by `cas-diff`, {} written by containerd's applier and ingested \
         at commit ({} handed back by `cas-diff` as Unimplemented, {} failed)",
        n("fast_path_applies"),
        n("commit_ingests"),
        n("fallback_applies"),
        n("failed_applies")
    )
}

/// `given`, created if missing, or else a new directory in /var/tmp named `prefix…`,
/// removed when the returned guard drops.
pub fn work_dir(
    given: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(w) => {
            fs::create_dir_all(w)?;
            Ok((w.to_path_buf(), None))
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/var/tmp")?;
            Ok((tmp.path().to_path_buf(), Some(tmp)))
        }
    }
}
