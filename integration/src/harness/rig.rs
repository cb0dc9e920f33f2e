//! A rig: registry, daemon and containerd together, with the steps the tests share
//! (push, pull, run, mount, compare with overlayfs, crash at a point).

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::fixture::{self, BuiltImage};
use crate::registry::push_layout;

use super::*;

/// How a [`Rig`] is set up.
#[derive(Debug, Clone, Default)]
pub struct RigOptions {
    /// Text of the daemon's config file.
    pub daemon_config: Option<String>,
    /// Which containerd and how (its `cri` is filled in when [`RigOptions::cri`] is set).
    pub containerd: ContainerdOptions,
    /// Enable the CRI plugin, with our pause image pushed as `fixture/pause:1`.
    pub cri: bool,
    /// The daemon's `[differ] content_dir` (when `daemon_config` has no `[differ]`):
    /// default the rig containerd's content store; elsewhere, the differ must stream
    /// blobs through containerd's Content API.
    pub content_dir: Option<PathBuf>,
}

/// Registry + daemon + containerd under one temporary directory, with the fixture
/// images pushed as `fixture/base:1` and `fixture/app:1`.
pub struct Rig {
    // Fields drop in order: containerd before the daemon, the directory last.
    /// containerd.
    pub containerd: Containerd,
    /// cas-snapshotter.
    pub daemon: Daemon,
    /// The registry.
    pub registry: Registry,
    /// The base fixture.
    pub base: BuiltImage,
    /// The app fixture (shares the base's first layer).
    pub app: BuiltImage,
    /// Reference of the base image in the registry.
    pub base_ref: String,
    /// Reference of the app image.
    pub app_ref: String,
    /// Reference of the sandbox image, when CRI is on.
    pub pause_ref: Option<String>,
    /// Everything lives here.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Builds the fixtures and starts everything.
    pub fn start() -> Result<Rig> {
        Self::start_with(RigOptions::default())
    }

    /// Like [`Rig::start`], with this text as the daemon's config file.
    pub fn start_with_config(config: Option<&str>) -> Result<Rig> {
        Self::start_with(RigOptions {
            daemon_config: config.map(str::to_string),
            ..RigOptions::default()
        })
    }

    /// Builds the fixtures and starts everything as `opts` says.
    pub fn start_with(opts: RigOptions) -> Result<Rig> {
        let dir = tempfile::Builder::new().prefix("cas-e2e-").tempdir()?;
        let d = dir.path();
        let busybox = busybox_path();
        let base = fixture::build_base_image(&d.join("img-base"), &busybox)?;
        let app = fixture::build_app_image(&d.join("img-app"), &busybox)?;
        let registry = Registry::start(&d.join("registry"))?;
        push_layout(&base.layout_dir, &registry.addr, "fixture/base", "1")?;
        push_layout(&app.layout_dir, &registry.addr, "fixture/app", "1")?;
        let mut copts = opts.containerd.clone();
        copts.plain_http_registries.push(registry.addr.clone());
        let pause_ref = if opts.cri {
            let pause = fixture::build_pause_image(&d.join("img-pause"), &busybox)?;
            push_layout(&pause.layout_dir, &registry.addr, "fixture/pause", "1")?;
            let r = format!("{}/fixture/pause:1", registry.addr);
            copts.cri = Some(CriOptions {
                sandbox_image: r.clone(),
                runc: idmap_runc(),
            });
            Some(r)
        } else {
            None
        };
        let bin = workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?;
        // The differ reads blobs from this test's containerd, never the host's.
        let ctrd = d.join("containerd");
        // `{containerd}` in the daemon's config: this rig's containerd directory (its
        // `certs.d` holds the registries' hosts.toml)
        let mut text = opts
            .daemon_config
            .clone()
            .unwrap_or_default()
            .replace("{containerd}", &ctrd.display().to_string());
        if !text.contains("[differ]") {
            text += &match &opts.content_dir {
                Some(dir) => differ_section(dir, &ctrd),
                None => differ_config(&ctrd),
            };
        }
        fs::write(d.join("config.toml"), text)?;
        let cfg = Some(d.join("config.toml"));
        let daemon = Daemon::start(
            &bin,
            &d.join("store"),
            &d.join("cas.sock"),
            &d.join("cas-snapshotter.log"),
            cfg.as_deref(),
        )?;
        copts.snapshotter_root = Some(daemon.root.clone());
        let containerd = Containerd::start_with(&ctrd, &daemon.sock, &copts)?;
        let base_ref = format!("{}/fixture/base:1", registry.addr);
        let app_ref = format!("{}/fixture/app:1", registry.addr);
        Ok(Rig {
            containerd,
            daemon,
            registry,
            base,
            app,
            base_ref,
            app_ref,
            pause_ref,
            dir,
        })
    }

    /// Waits until containerd reaches the snapshotter again after a restart (its gRPC
    /// client redials with a backoff of up to a few seconds).
    pub fn wait_reconnected(&self) -> Result<()> {
        wait_until(
            "containerd to reconnect to cas-snapshotter",
            Duration::from_secs(20),
            || {
                self.containerd
                    .ctr(&["snapshots", "--snapshotter", "cas", "ls"])
                    .is_ok()
            },
        )
    }

    /// Crashes the daemon at crash point `point` (see the `cas` crate): from a store
    /// without `image` (removed, and a `casctl gc`), the daemon is restarted with the
    /// point armed (`FAILPOINTS=<point>=return`) and driven through a pull of `image`,
    /// its removal and a GC until it kills itself there. A point only a checkpoint
    /// reaches is reached by a clean stop. Then the daemon is started again, unarmed,
    /// and containerd has reconnected. Fails if the point was never reached.
    pub fn crash_at(&mut self, point: &str, image: &str) -> Result<()> {
        let _ = self.containerd.ctr(&["images", "rm", "--sync", image]);
        let (code, out) = self.casctl(&["gc"])?;
        if code != 0 {
            bail!("casctl gc before arming {point}: {out}");
        }
        let armed = format!("{point}=return");
        // a clean stop, so the armed daemon trusts its GC candidates (after an unclean
        // one its first GC looks at every object first)
        self.daemon.stop()?;
        self.daemon.restart_with_env(&[("FAILPOINTS", &armed)])?;
        self.wait_reconnected()?;
        // After a restart containerd redials with a backoff, so a step that finds the
        // daemon alive but unreachable (`unavailable`) is tried again.
        for step in 0..3 {
            if !self.daemon.alive() {
                break;
            }
            // whatever the step answers, the daemon's death is what is waited for
            let _ = retry_unavailable(100, Duration::from_millis(100), || {
                if !self.daemon.alive() {
                    return Ok(());
                }
                match step {
                    0 => self.pull("cas", image),
                    1 => self
                        .containerd
                        .ctr(&["images", "rm", "--sync", image])
                        .map(|_| ()),
                    _ => self.casctl(&["gc"]).map(|_| ()),
                }
            });
        }
        if point.starts_with("journal.") && self.daemon.alive() {
            // checkpoints run every few dozen records and at shutdown: stop it
            let _ = self.daemon.stop();
        }
        std::thread::sleep(Duration::from_millis(200));
        if self.daemon.alive() {
            bail!("crash point {point} was never reached:\n{}", self.logs());
        }
        self.daemon.restart()?;
        self.wait_reconnected()
    }

    /// `ctr images pull --plain-http --snapshotter <sn> <image>`.
    pub fn pull(&self, snapshotter: &str, image: &str) -> Result<()> {
        self.containerd.pull(snapshotter, image).map(|_| ())
    }

    /// Like [`Rig::pull`], retrying while containerd's connection to a restarted
    /// snapshotter is still coming back (`unavailable`), as a user would.
    pub fn pull_after_restart(&self, snapshotter: &str, image: &str) -> Result<()> {
        retry_unavailable(10, Duration::from_millis(500), || {
            self.pull(snapshotter, image)
        })
    }

    /// Mounts `image` unpacked by `snapshotter` read-only at a new directory named `name`.
    pub fn mount(&self, snapshotter: &str, image: &str, name: &str) -> Result<ImageMount<'_>> {
        let target = self.dir.path().join("mnt").join(name);
        fs::create_dir_all(&target)?;
        self.containerd.ctr(&[
            "images",
            "mount",
            "--snapshotter",
            snapshotter,
            image,
            target.to_str().unwrap_or_default(),
        ])?;
        Ok(ImageMount { rig: self, target })
    }

    /// Mounts `image` as unpacked by our snapshotter and by containerd's overlayfs (at
    /// directories named `<name>-cas` and `<name>-overlayfs`) and fails, naming every
    /// difference and with every component's log, unless the two trees are the same.
    pub fn assert_same_tree(&self, image: &str, name: &str) -> Result<()> {
        let ours = self.mount("cas", image, &format!("{name}-cas"))?;
        let theirs = self.mount("overlayfs", image, &format!("{name}-overlayfs"))?;
        let diffs = crate::treecmp::compare_trees(
            &ours.target,
            &theirs.target,
            &crate::treecmp::CompareOptions::default(),
        )?;
        if !diffs.is_empty() {
            bail!(
                "containerd {}: {image}: cas differs from overlayfs:\n{}\n{}",
                self.containerd.version,
                diffs
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.logs()
            );
        }
        Ok(())
    }

    /// `ctr run --rm --snapshotter cas <image> <id>-<rig> <args…>`; returns stdout.
    pub fn run(&self, image: &str, id: &str, args: &[&str]) -> Result<String> {
        self.run_with(image, id, &[], args)
    }

    /// [`Rig::run`] with more `ctr run` flags (`--uidmap`, `--remap-labels`, …).
    pub fn run_with(&self, image: &str, id: &str, flags: &[&str], args: &[&str]) -> Result<String> {
        // runc keeps `ctr run`'s containers in one directory per namespace for every
        // containerd on the machine: the id gets this rig's own suffix, so tests running
        // at once (and other test runs) never share one.
        let rig = self
            .dir
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let id = format!("{id}-{}", rig.trim_start_matches('.'));
        let mut a = vec!["run", "--rm", "--snapshotter", "cas"];
        a.extend_from_slice(flags);
        a.extend_from_slice(&[image, &id]);
        a.extend_from_slice(args);
        self.containerd.ctr(&a)
    }

    /// `casctl stats --json`, parsed.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let (code, out) = self.casctl(&["stats", "--json"])?;
        anyhow::ensure!(code == 0, "casctl stats: {out}");
        Ok(serde_json::from_str(&out)?)
    }

    /// `casctl fsck --json`, parsed, whatever it found (its exit status says whether it
    /// found problems; the report says which).
    pub fn fsck_report(&self) -> Result<serde_json::Value> {
        let (_, out) = self.casctl(&["fsck", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("casctl fsck --json: {out}"))
    }

    /// The ID-mapped clones of layers mounted in the store (`snapshots/<id>/mapped/…`).
    pub fn id_mapped_clones(&self) -> Vec<String> {
        mounts_below(&self.daemon.root.join("snapshots"))
            .into_iter()
            .filter(|m| m.contains("/mapped/"))
            .collect()
    }

    /// Runs `casctl --root <store> args…`; returns (exit code, stdout).
    pub fn casctl(&self, args: &[&str]) -> Result<(i32, String)> {
        let bin = workspace_bin("casctl", "CASCTL_BIN")?;
        let out = Command::new(bin)
            .arg("--root")
            .arg(&self.daemon.root)
            .args(args)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Logs of every component, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- cas-snapshotter ---\n{}\n--- containerd ---\n{}\n--- registry ---\n{}",
            self.daemon.log(),
            self.containerd.log(),
            self.registry.log()
        )
    }
}

/// An image mounted by `ctr images mount`; unmounted (and its snapshot removed) on drop.
pub struct ImageMount<'a> {
    rig: &'a Rig,
    /// Where it is mounted.
    pub target: PathBuf,
}

impl Drop for ImageMount<'_> {
    fn drop(&mut self) {
        let t = self.target.to_str().unwrap_or_default().to_string();
        if self
            .rig
            .containerd
            .ctr(&["images", "unmount", "--rm", &t])
            .is_err()
        {
            unmount_below(&self.target);
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
