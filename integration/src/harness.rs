//! Real processes for end-to-end tests: a local OCI registry, our daemon, and a private
//! containerd configured with `[proxy_plugins.cas]`. Each owns its process and cleans up
//! on drop (processes killed, mounts under its directory detached), so a failing test
//! leaves nothing running. Nothing is mocked; only loopback and files under a temporary
//! directory are used, and a system containerd is never touched.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fixture::{self, BuiltImage};
use crate::registry::push_layout;

/// Whether the tests can run here (root: they mount and run containerd). Prints why not.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: end-to-end tests need root (mounts, containerd, runc)");
    false
}

/// A workspace binary: `$<ENV>` if set, else `target/{debug,release}/<name>`.
pub fn workspace_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["debug", "release"] {
        let p = ws.join("target").join(profile).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not built (cargo build --workspace), or set {env}")
}

/// The static busybox put into fixture images (`CAS_BUSYBOX` overrides).
pub fn busybox_path() -> PathBuf {
    PathBuf::from(std::env::var("CAS_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A child process with its log file.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout`; returns how long it took to exit.
    fn stop(&mut self, timeout: Duration) -> Result<Duration> {
        let Some(mut c) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let start = Instant::now();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM)?;
        while start.elapsed() < timeout {
            if c.try_wait()?.is_some() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("did not exit within {timeout:?} of SIGTERM")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Debian's `docker-registry` (Distribution 2.8) on a free loopback port.
pub struct Registry {
    proc: Proc,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Registry {
    /// Starts a registry storing under `dir`.
    pub fn start(dir: &Path) -> Result<Registry> {
        fs::create_dir_all(dir.join("storage"))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let cfg = dir.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("storage").display()
            ),
        )?;
        let mut proc = Proc::spawn(
            Command::new("docker-registry").arg("serve").arg(&cfg),
            &dir.join("registry.log"),
        )?;
        let url = format!("http://{addr}/v2/");
        let up = wait_until("the registry", Duration::from_secs(15), || {
            ureq::get(&url).call().is_ok()
        });
        if up.is_err() || !proc.alive() {
            bail!("registry did not start:\n{}", proc.log_tail());
        }
        Ok(Registry { proc, addr })
    }

    /// The log so far (for failure messages).
    pub fn log(&self) -> String {
        self.proc.log_tail()
    }
}

/// Our daemon on a store root and socket.
pub struct Daemon {
    proc: Proc,
    bin: PathBuf,
    /// Store root.
    pub root: PathBuf,
    /// Snapshots API socket.
    pub sock: PathBuf,
    log: PathBuf,
    config: Option<PathBuf>,
}

impl Daemon {
    /// Starts `bin --root root --address sock [--config config]` and waits for the
    /// socket to answer.
    pub fn start(
        bin: &Path,
        root: &Path,
        sock: &Path,
        log: &Path,
        config: Option<&Path>,
    ) -> Result<Daemon> {
        let proc = Self::spawn(bin, root, sock, log, config)?;
        Ok(Daemon {
            proc,
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
            config: config.map(Path::to_path_buf),
        })
    }

    fn spawn(
        bin: &Path,
        root: &Path,
        sock: &Path,
        log: &Path,
        config: Option<&Path>,
    ) -> Result<Proc> {
        Self::spawn_env(bin, root, sock, log, config, &[])
    }

    fn spawn_env(
        bin: &Path,
        root: &Path,
        sock: &Path,
        log: &Path,
        config: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let mut cmd = Command::new(bin);
        cmd.arg("--root")
            .arg(root)
            .arg("--address")
            .arg(sock)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut proc = Proc::spawn(&mut cmd, log)?;
        let s = sock.to_path_buf();
        let up = wait_until("the snapshotter socket", Duration::from_secs(15), || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        });
        if up.is_err() || !proc.alive() {
            bail!("cas-snapshotter did not start:\n{}", proc.log_tail());
        }
        Ok(proc)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again on the same root and socket.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        self.proc = Self::spawn(
            &self.bin,
            &self.root,
            &self.sock,
            &self.log,
            self.config.as_deref(),
        )?;
        Ok(())
    }

    /// Like [`Daemon::restart`], with extra environment (e.g. `FAILPOINTS`).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.proc.kill9();
        self.proc = Self::spawn_env(
            &self.bin,
            &self.root,
            &self.sock,
            &self.log,
            self.config.as_deref(),
            env,
        )?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// SIGTERM; returns how long the daemon took to exit (error past 10 s).
    pub fn stop(&mut self) -> Result<Duration> {
        self.proc.stop(Duration::from_secs(10))
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<i32> {
        self.proc.pid().map(|p| p.as_raw())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.proc.log_tail()
    }
}

/// Whether this machine can attach a loop device (`losetup -f`); prints why not.
pub fn loop_devices_available() -> bool {
    match Command::new("losetup").arg("-f").output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "skipped: no loop device available (losetup -f: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: losetup not found ({e}); install util-linux");
            false
        }
    }
}

/// Which filesystem a [`LoopFs`] gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext4 with no blocks reserved for root (so fills are exact).
    Ext4,
    /// XFS (atomic writes on recent kernels).
    Xfs,
}

/// A filesystem on a loop file made by a test, mounted at `mnt` and unmounted (with
/// everything below it) on drop.
pub struct LoopFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem in `dir/store.img` and mounts it at `dir/store-fs`.
    pub fn new(dir: &Path, size_mib: u64, kind: FsKind) -> Result<LoopFs> {
        let img = dir.join("store.img");
        let mnt = dir.join("store-fs");
        fs::create_dir_all(&mnt)?;
        fs::File::create(&img)?.set_len(size_mib << 20)?;
        let mut mkfs = match kind {
            FsKind::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-m", "0"]);
                c
            }
            FsKind::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", "-f"]);
                c
            }
        };
        let out = mkfs
            .arg(&img)
            .output()
            .with_context(|| format!("running {mkfs:?}"))?;
        if !out.status.success() {
            bail!("{mkfs:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()?;
        if !out.status.success() {
            bail!(
                "mounting {}: {}",
                img.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(LoopFs { mnt })
    }

    /// The block device under it (`loop3`), for its `/sys/block/<dev>/stat`.
    pub fn device(&self) -> Result<String> {
        let out = Command::new("findmnt")
            .args(["-no", "SOURCE", "--mountpoint"])
            .arg(&self.mnt)
            .output()?;
        let src = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match src.strip_prefix("/dev/") {
            Some(dev) if out.status.success() => Ok(dev.to_string()),
            _ => bail!("no block device mounted at {}", self.mnt.display()),
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        unmount_below(&self.mnt);
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// How [`Containerd::start_with`] runs containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Directory holding `containerd` and `ctr` (default: both from `PATH`, the
    /// distribution's 1.6 on Debian 12).
    pub bin_dir: Option<PathBuf>,
    /// Also register our daemon's socket as the diff plugin `cas-diff` and make the
    /// diff service try it first (`default = ["cas-diff", "walking"]`). Only for
    /// containerd >= 1.7.4: 1.6 panics at start on a `type = "diff"` proxy plugin.
    pub cas_diff: bool,
}

impl ContainerdOptions {
    /// The `containerd` binary these options run.
    pub fn containerd_bin(&self) -> PathBuf {
        self.bin("containerd")
    }

    /// The `ctr` binary that goes with it.
    pub fn ctr_bin(&self) -> PathBuf {
        self.bin("ctr")
    }

    fn bin(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// A private containerd (the distribution's, 1.6 on Debian 12, unless
/// [`ContainerdOptions::bin_dir`] names another).
pub struct Containerd {
    proc: Proc,
    ctr: PathBuf,
    /// Its working directory (root, state, sockets, config).
    pub dir: PathBuf,
    /// Its gRPC socket.
    pub sock: PathBuf,
}

impl Containerd {
    /// Starts containerd under `dir` with our snapshotter at `snapshotter_sock`.
    pub fn start(dir: &Path, snapshotter_sock: &Path) -> Result<Containerd> {
        Self::start_with(dir, snapshotter_sock, &ContainerdOptions::default())
    }

    /// Like [`Containerd::start`], with another binary or our differ.
    pub fn start_with(
        dir: &Path,
        snapshotter_sock: &Path,
        opts: &ContainerdOptions,
    ) -> Result<Containerd> {
        fs::create_dir_all(dir)?;
        let sock = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        fs::write(
            &cfg,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[proxy_plugins]
  [proxy_plugins.cas]
    type = "snapshot"
    address = "{snap}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{diff}"#,
                d = dir.display(),
                sock = sock.display(),
                snap = snapshotter_sock.display(),
                diff = if opts.cas_diff {
                    format!(
                        r#"[proxy_plugins.cas-diff]
  type = "diff"
  address = "{}"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["cas-diff", "walking"]
"#,
                        snapshotter_sock.display()
                    )
                } else {
                    String::new()
                }
            ),
        )?;
        let proc = Proc::spawn(
            Command::new(opts.containerd_bin())
                .arg("--config")
                .arg(&cfg),
            &dir.join("containerd.log"),
        )?;
        let mut c = Containerd {
            proc,
            ctr: opts.ctr_bin(),
            dir: dir.to_path_buf(),
            sock,
        };
        let up = wait_until("containerd", Duration::from_secs(30), || {
            c.ctr(&["version"]).is_ok()
        });
        if up.is_err() || !c.proc.alive() {
            bail!("containerd did not start:\n{}", c.proc.log_tail());
        }
        Ok(c)
    }

    /// Runs `ctr --address <sock> args…`; stdout on success, stderr in the error.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out: Output = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.sock)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.proc.log_tail()
    }

    /// containerd's pid.
    pub fn pid(&self) -> Option<i32> {
        self.proc.pid().map(|p| p.as_raw())
    }
}

/// Detaches every mount below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Kills runc shims that serve the containerd at `sock`.
fn kill_shims(sock: &Path) {
    let needle = sock.display().to_string();
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("containerd-shim") && cmd.contains(&needle) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.proc.stop(Duration::from_secs(5));
        kill_shims(&self.sock);
        unmount_below(&self.dir);
    }
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
    /// Everything lives here.
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Builds the fixtures and starts everything.
    pub fn start() -> Result<Rig> {
        Self::start_with_config(None)
    }

    /// Like [`Rig::start`], with this text as the daemon's config file.
    pub fn start_with_config(config: Option<&str>) -> Result<Rig> {
        let dir = tempfile::Builder::new().prefix("cas-e2e-").tempdir()?;
        let d = dir.path();
        let busybox = busybox_path();
        let base = fixture::build_base_image(&d.join("img-base"), &busybox)?;
        let app = fixture::build_app_image(&d.join("img-app"), &busybox)?;
        let registry = Registry::start(&d.join("registry"))?;
        push_layout(&base.layout_dir, &registry.addr, "fixture/base", "1")?;
        push_layout(&app.layout_dir, &registry.addr, "fixture/app", "1")?;
        let bin = workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?;
        let cfg = match config {
            Some(text) => {
                fs::write(d.join("config.toml"), text)?;
                Some(d.join("config.toml"))
            }
            None => None,
        };
        let daemon = Daemon::start(
            &bin,
            &d.join("store"),
            &d.join("cas.sock"),
            &d.join("cas-snapshotter.log"),
            cfg.as_deref(),
        )?;
        let containerd = Containerd::start(&d.join("containerd"), &daemon.sock)?;
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

    /// `ctr images pull --plain-http --snapshotter <sn> <image>`.
    pub fn pull(&self, snapshotter: &str, image: &str) -> Result<()> {
        self.containerd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            image,
        ])?;
        Ok(())
    }

    /// Like [`Rig::pull`], retrying while containerd's connection to a restarted
    /// snapshotter is still coming back (`unavailable`), as a user would.
    pub fn pull_after_restart(&self, snapshotter: &str, image: &str) -> Result<()> {
        let mut last = None;
        for _ in 0..10 {
            match self.pull(snapshotter, image) {
                Ok(()) => return Ok(()),
                Err(e) if e.to_string().contains("unavailable") => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("pull kept failing")))
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

    /// `ctr run --rm --snapshotter cas <image> <id> <args…>`; returns stdout.
    pub fn run(&self, image: &str, id: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["run", "--rm", "--snapshotter", "cas", image, id];
        a.extend_from_slice(args);
        self.containerd.ctr(&a)
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
