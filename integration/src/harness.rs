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

/// Set by `make test`: every test must run, so a test that cannot run here fails.
pub const REQUIRE_ALL: &str = "CAS_REQUIRE_ALL_TESTS";

/// Says why a test cannot run here and lets it pass as skipped; under
/// [`REQUIRE_ALL`] it fails instead.
pub fn skip(why: &str) {
    assert!(
        std::env::var_os(REQUIRE_ALL).is_none(),
        "required test cannot run: {why}"
    );
    eprintln!("skipped: {why}");
}

/// Whether the tests can run here (root: they mount and run containerd); see [`skip`].
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip("end-to-end tests need root (mounts, containerd, runc)");
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

    /// The log file (every start on this root appends to it).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// Whether this machine can attach a loop device (`losetup -f`); prints why not.
pub fn loop_devices_available() -> bool {
    match Command::new("losetup").arg("-f").output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip(&format!(
                "no loop device available (losetup -f: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            false
        }
        Err(e) => {
            skip(&format!("losetup not found ({e}); install util-linux"));
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

/// Where `scripts/containerd-versions.sh` unpacks containerd releases
/// (`$CAS_CONTAINERD_CACHE`, default `/var/cache/cas-snapshotter/containerd`).
pub fn containerd_cache() -> PathBuf {
    PathBuf::from(
        std::env::var("CAS_CONTAINERD_CACHE")
            .unwrap_or_else(|_| "/var/cache/cas-snapshotter/containerd".into()),
    )
}

/// Which containerd binaries a test runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerdBin {
    /// The distribution's `containerd` and `ctr` on `PATH` (1.6 on Debian 12).
    System,
    /// A release series unpacked by `scripts/containerd-versions.sh`:
    /// `<cache>/<series>/usr/bin` (series `1.7` or `2`).
    Cached(String),
    /// Another directory holding `containerd`, `ctr` and the shim (a build of one's own).
    Dir(PathBuf),
}

impl ContainerdBin {
    /// From a command-line word: `1.6` or `system` for the system's, a path (with a `/`)
    /// for [`ContainerdBin::Dir`], anything else a cached series (`1.7`, `2`).
    pub fn from_arg(arg: &str) -> ContainerdBin {
        match arg {
            "1.6" | "system" => ContainerdBin::System,
            a if a.contains('/') => ContainerdBin::Dir(PathBuf::from(a)),
            series => ContainerdBin::Cached(series.to_string()),
        }
    }

    /// The directory holding `containerd`, `ctr` and the shims; `None` for the system's.
    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            ContainerdBin::System => None,
            ContainerdBin::Cached(series) => {
                Some(containerd_cache().join(series).join("usr").join("bin"))
            }
            ContainerdBin::Dir(dir) => Some(dir.clone()),
        }
    }

    fn program(&self, name: &str) -> PathBuf {
        match self.dir() {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// Whether the binaries are there (a cached series may not have been fetched).
    pub fn present(&self) -> bool {
        self.dir()
            .is_none_or(|d| d.join("containerd").is_file() && d.join("ctr").is_file())
    }

    /// Like [`ContainerdBin::present`], and prints why not (a test's "skipped").
    pub fn available(&self) -> bool {
        if self.present() {
            return true;
        }
        let dir = self.dir().unwrap_or_default();
        let hint = match self {
            ContainerdBin::Cached(_) => " (run scripts/containerd-versions.sh, or make deps)",
            _ => "",
        };
        skip(&format!("no containerd in {}{hint}", dir.display()));
        false
    }

    /// `containerd --version`, parsed.
    pub fn version(&self) -> Result<ContainerdVersion> {
        let out = Command::new(self.program("containerd"))
            .arg("--version")
            .output()
            .with_context(|| {
                format!("running {} --version", self.program("containerd").display())
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        ContainerdVersion::parse(&text)
            .with_context(|| format!("no version in `containerd --version`: {text}"))
    }
}

/// A containerd release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerdVersion {
    /// 1, 2, …
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Patch release.
    pub patch: u32,
}

impl ContainerdVersion {
    /// The first proxy-differ release: 1.6 panics at start on a `type = "diff"` entry.
    pub const PROXY_DIFFER: ContainerdVersion = ContainerdVersion {
        major: 1,
        minor: 7,
        patch: 4,
    };

    /// The first release with the transfer service.
    pub const TRANSFER: ContainerdVersion = ContainerdVersion {
        major: 1,
        minor: 7,
        patch: 0,
    };

    /// From `containerd --version`: `containerd github.com/containerd/containerd/v2 2.1.9+unknown`
    /// or Debian's `… 1.7.24~ds1 1.7.24~ds1-6+deb13u1`.
    pub fn parse(text: &str) -> Option<ContainerdVersion> {
        let word = text.split_whitespace().nth(2)?;
        let word = word.trim_start_matches('v');
        let mut nums = word
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|n| n.parse::<u32>().ok());
        Some(ContainerdVersion {
            major: nums.next()??,
            minor: nums.next()??,
            patch: nums.next().flatten().unwrap_or(0),
        })
    }

    /// Whether its config file is version 3 (containerd 2.x) rather than 2.
    pub fn config_v3(self) -> bool {
        self.major >= 2
    }
}

impl std::fmt::Display for ContainerdBin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContainerdBin::System => write!(f, "the system's"),
            ContainerdBin::Cached(series) => write!(f, "cached series {series}"),
            ContainerdBin::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The CRI plugin, for Kubernetes' view of the snapshotter (containerd 2.x only).
#[derive(Debug, Clone)]
pub struct CriOptions {
    /// The pinned sandbox ("pause") image, pulled through our snapshotter like any other.
    pub sandbox_image: String,
}

/// How a test's containerd is set up.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// Which binaries.
    pub bin: ContainerdBin,
    /// Whether to declare our differ (`[proxy_plugins.cas-diff]`, first in the diff
    /// service's order and, on 2.x, the transfer service's differ for `cas`). Ignored
    /// before 1.7.4, which does not know proxy differs.
    pub with_differ: bool,
    /// The CRI plugin (disabled when `None`).
    pub cri: Option<CriOptions>,
    /// Registries (`host:port`) that containerd itself (the transfer service, CRI) reaches
    /// over plain HTTP; `ctr --plain-http` covers only pulls that ctr does itself.
    pub plain_http_registries: Vec<String>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            bin: ContainerdBin::System,
            with_differ: false,
            cri: None,
            plain_http_registries: Vec::new(),
        }
    }
}

impl ContainerdOptions {
    /// A cached release series (`1.7`, `2`), no differ, no CRI.
    pub fn cached(series: &str) -> ContainerdOptions {
        Self::with_bin(ContainerdBin::Cached(series.to_string()))
    }

    /// These binaries, no differ, no CRI.
    pub fn with_bin(bin: ContainerdBin) -> ContainerdOptions {
        ContainerdOptions {
            bin,
            ..ContainerdOptions::default()
        }
    }

    /// With or without our differ.
    pub fn differ(mut self, with_differ: bool) -> ContainerdOptions {
        self.with_differ = with_differ;
        self
    }

    /// With the CRI plugin.
    pub fn cri(mut self, cri: CriOptions) -> ContainerdOptions {
        self.cri = Some(cri);
        self
    }
}

/// The daemon's `[differ]` section for a containerd started by [`Containerd::start_with`]
/// in `containerd_dir`: blobs are read from its content store, or through its socket.
pub fn differ_config(containerd_dir: &Path) -> String {
    differ_section(
        &containerd_dir.join("root/io.containerd.content.v1.content"),
        containerd_dir,
    )
}

/// The daemon's `[differ]` section: blobs read from `content_dir`, or through the socket
/// of the containerd started in `containerd_dir`.
fn differ_section(content_dir: &Path, containerd_dir: &Path) -> String {
    format!(
        "\n[differ]\ncontent_dir = \"{}\"\ncontainerd_address = \"{}\"\n",
        content_dir.display(),
        containerd_dir.join("containerd.sock").display()
    )
}

/// Paths a containerd config names.
#[derive(Debug, Clone)]
pub struct ContainerdPaths {
    /// Working directory: root, state, opt, debug socket, hosts, CNI config.
    pub dir: PathBuf,
    /// containerd's gRPC socket.
    pub sock: PathBuf,
    /// Our daemon's socket (Snapshots, and Diff for `cas-diff`).
    pub snapshotter_sock: PathBuf,
}

/// Whether a config for `version` with `opts` declares `cas-diff`.
pub fn differ_declared(version: ContainerdVersion, opts: &ContainerdOptions) -> bool {
    opts.with_differ && version >= ContainerdVersion::PROXY_DIFFER
}

/// The config file for `version`: config version 2 up to 1.7, 3 from 2.0. containerd 1.6
/// never gets a `type = "diff"` entry (it panics at start on one).
pub fn containerd_config(
    version: ContainerdVersion,
    opts: &ContainerdOptions,
    paths: &ContainerdPaths,
) -> Result<String> {
    let d = paths.dir.display();
    let sock = paths.sock.display();
    let snap = paths.snapshotter_sock.display();
    let differ = differ_declared(version, opts);
    let v3 = version.config_v3();
    if opts.cri.is_some() && !v3 {
        bail!("the harness configures CRI for containerd 2.x only (this is {version})");
    }
    // Plugin names are quoted with ' in version 3 (as `containerd config default` writes
    // them) and " in version 2; both are TOML.
    let q = if v3 { '\'' } else { '"' };
    let plugin = |id: &str| format!("plugins.{q}{id}{q}");
    let mut disabled = vec!["io.containerd.nri.v1.nri"];
    if opts.cri.is_none() {
        disabled.extend([
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
            "io.containerd.podsandbox.controller.v1.podsandbox",
        ]);
    }
    let mut c = format!(
        r#"version = {cv}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [{disabled}]
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
"#,
        cv = if v3 { 3 } else { 2 },
        disabled = disabled
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if differ {
        c += &format!(
            r#"  [proxy_plugins.cas-diff]
    type = "diff"
    address = "{snap}"
"#
        );
    }
    c += &format!(
        r#"[{opt}]
  path = "{d}/opt"
"#,
        opt = plugin("io.containerd.internal.v1.opt")
    );
    if differ {
        // Clients that unpack themselves (ctr --local, ctr on 1.7, CRI on 1.7) go through
        // the diff service, which tries each differ in turn and moves on when one answers
        // NotImplemented.
        c += &format!(
            "[{}]\n  default = [\"cas-diff\", \"walking\"]\n",
            plugin("io.containerd.service.v1.diff-service")
        );
    }
    if version >= ContainerdVersion::TRANSFER {
        // The transfer service (ctr pull and CRI on 2.x; `ctr pull --local=false` on 1.7)
        // unpacks with one differ per snapshotter and platform, and fails when it fails: no
        // fallback. Name a differ for every entry, because a proxy differ claims the host
        // platform and two matching differs are chosen between at random.
        let t = plugin("io.containerd.transfer.v1.local");
        c += &format!("[{t}]\n  config_path = \"{d}/certs.d\"\n");
        for (sn, df) in [
            ("cas", if differ { "cas-diff" } else { "walking" }),
            ("overlayfs", "walking"),
        ] {
            c += &format!(
                "  [[{t}.unpack_config]]\n    platform = \"linux\"\n    snapshotter = \"{sn}\"\n    differ = \"{df}\"\n"
            );
        }
    }
    if let Some(cri) = &opts.cri {
        let images = plugin("io.containerd.cri.v1.images");
        let runtime = plugin("io.containerd.cri.v1.runtime");
        let grpc = plugin("io.containerd.grpc.v1.cri");
        c += &format!(
            r#"[{images}]
  snapshotter = "cas"
  # seconds between CRI's passes over snapshot Usage (ImageFsInfo); 10 by default
  stats_collect_period = 1
  [{images}.pinned_images]
    sandbox = "{sandbox}"
  [{images}.registry]
    config_path = "{d}/certs.d"
[{runtime}]
  # Containers may not lower their oom_score_adj below containerd's: the sandbox asks for
  # -998, which needs CAP_SYS_RESOURCE, and test machines (containers) may lack it.
  restrict_oom_score_adj = true
  [{runtime}.cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/net.d"
  [{runtime}.containerd.runtimes.runc.options]
    Root = "{d}/runc"
[{grpc}]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            sandbox = cri.sandbox_image,
        );
    }
    Ok(c)
}

/// `hosts.toml` files under `dir/certs.d` that send pulls from these registries over
/// plain HTTP (the transfer service and CRI read them; `ctr --plain-http` does not need them).
fn write_plain_http_hosts(dir: &Path, registries: &[String]) -> Result<()> {
    for r in registries {
        let d = dir.join("certs.d").join(r);
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    Ok(())
}

/// A private containerd: the distribution's (1.6 on Debian 12) or a cached release.
pub struct Containerd {
    proc: Proc,
    bin: ContainerdBin,
    /// Its release.
    pub version: ContainerdVersion,
    /// Whether its config declares `cas-diff`.
    pub differ: bool,
    /// Its working directory (root, state, sockets, config).
    pub dir: PathBuf,
    /// Its gRPC socket.
    pub sock: PathBuf,
}

impl Containerd {
    /// Starts the system's containerd under `dir` with our snapshotter at `snapshotter_sock`.
    pub fn start(dir: &Path, snapshotter_sock: &Path) -> Result<Containerd> {
        Self::start_with(dir, snapshotter_sock, &ContainerdOptions::default())
    }

    /// Starts containerd as `opts` says, under `dir`, with our daemon at `snapshotter_sock`.
    pub fn start_with(
        dir: &Path,
        snapshotter_sock: &Path,
        opts: &ContainerdOptions,
    ) -> Result<Containerd> {
        fs::create_dir_all(dir)?;
        let version = opts.bin.version()?;
        let paths = ContainerdPaths {
            dir: dir.to_path_buf(),
            sock: dir.join("containerd.sock"),
            snapshotter_sock: snapshotter_sock.to_path_buf(),
        };
        let cfg = dir.join("config.toml");
        fs::write(&cfg, containerd_config(version, opts, &paths)?)?;
        write_plain_http_hosts(dir, &opts.plain_http_registries)?;
        if opts.cri.is_some() {
            fs::create_dir_all(dir.join("cni/net.d"))?;
            fs::create_dir_all(dir.join("cni/bin"))?;
        }
        let mut cmd = Command::new(opts.bin.program("containerd"));
        cmd.arg("--config").arg(&cfg);
        if let Some(bin_dir) = opts.bin.dir() {
            // containerd finds its shim on PATH first: the release's, not the system's.
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", bin_dir.display()));
        }
        let proc = Proc::spawn(&mut cmd, &dir.join("containerd.log"))?;
        let mut c = Containerd {
            proc,
            bin: opts.bin.clone(),
            version,
            differ: differ_declared(version, opts),
            dir: dir.to_path_buf(),
            sock: paths.sock,
        };
        let up = wait_until("containerd", Duration::from_secs(30), || {
            c.ctr(&["version"]).is_ok()
        });
        if up.is_err() || !c.proc.alive() {
            bail!("containerd {version} did not start:\n{}", c.proc.log_tail());
        }
        Ok(c)
    }

    /// Runs `ctr --address <sock> args…` (the ctr of the same release); stdout on
    /// success, stderr in the error.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out: Output = Command::new(self.bin.program("ctr"))
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

    /// The whole log (for looking for a message).
    pub fn full_log(&self) -> String {
        fs::read_to_string(&self.proc.log).unwrap_or_default()
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
            });
            Some(r)
        } else {
            None
        };
        let bin = workspace_bin("cas-snapshotter", "CAS_SNAPSHOTTER_BIN")?;
        // The differ reads blobs from this test's containerd, never the host's.
        let ctrd = d.join("containerd");
        let mut text = opts.daemon_config.clone().unwrap_or_default();
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
        self.daemon.restart_with_env(&[("FAILPOINTS", &armed)])?;
        self.wait_reconnected()?;
        // After a restart containerd redials with a backoff, so a step that finds the
        // daemon alive but unreachable (`unavailable`) is tried again.
        'steps: for step in 0..3 {
            for _ in 0..100 {
                if !self.daemon.alive() {
                    break 'steps;
                }
                let r = match step {
                    0 => self.pull("cas", image),
                    1 => self
                        .containerd
                        .ctr(&["images", "rm", "--sync", image])
                        .map(|_| ()),
                    _ => self.casctl(&["gc"]).map(|_| ()),
                };
                match r {
                    Err(e) if e.to_string().contains("unavailable") => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => break,
                }
            }
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
        let mut a = vec!["run", "--rm", "--snapshotter", "cas", image, &id];
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> ContainerdVersion {
        ContainerdVersion {
            major,
            minor,
            patch,
        }
    }

    fn paths() -> ContainerdPaths {
        ContainerdPaths {
            dir: "/t/ctrd".into(),
            sock: "/t/ctrd/containerd.sock".into(),
            snapshotter_sock: "/t/cas.sock".into(),
        }
    }

    fn render(version: ContainerdVersion, opts: &ContainerdOptions) -> toml::Table {
        let text = containerd_config(version, opts, &paths()).unwrap();
        text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn versions_parse_from_containerd_output() {
        let debian17 =
            "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n";
        assert_eq!(ContainerdVersion::parse(debian17), Some(v(1, 7, 24)));
        let v2 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n";
        assert_eq!(ContainerdVersion::parse(v2), Some(v(2, 1, 9)));
        let upstream = "containerd github.com/containerd/containerd v1.6.20 2806fc1\n";
        assert_eq!(ContainerdVersion::parse(upstream), Some(v(1, 6, 20)));
        assert_eq!(ContainerdVersion::parse("nothing"), None);
    }

    #[test]
    fn containerd_binaries_from_a_word() {
        assert_eq!(ContainerdBin::from_arg("1.6"), ContainerdBin::System);
        assert_eq!(ContainerdBin::from_arg("system"), ContainerdBin::System);
        assert_eq!(
            ContainerdBin::from_arg("2"),
            ContainerdBin::Cached("2".into())
        );
        assert_eq!(
            ContainerdBin::from_arg("./build/bin"),
            ContainerdBin::Dir("./build/bin".into())
        );
        assert!(ContainerdBin::System.present());
    }

    #[test]
    fn containerd_1_6_never_gets_a_diff_entry() {
        let opts = ContainerdOptions::default().differ(true);
        let text = containerd_config(v(1, 6, 20), &opts, &paths()).unwrap();
        assert!(!text.contains("\"diff\""), "{text}");
        assert!(!text.contains("cas-diff"), "{text}");
        let c = render(v(1, 7, 3), &opts);
        assert!(c["proxy_plugins"].get("cas-diff").is_none());
        assert_eq!(c["version"].as_integer(), Some(2));
    }

    #[test]
    fn containerd_1_7_puts_our_differ_first() {
        let c = render(v(1, 7, 24), &ContainerdOptions::default().differ(true));
        assert_eq!(c["version"].as_integer(), Some(2));
        let diff = &c["proxy_plugins"]["cas-diff"];
        assert_eq!(diff["type"].as_str(), Some("diff"));
        assert_eq!(diff["address"].as_str(), Some("/t/cas.sock"));
        let order = &c["plugins"]["io.containerd.service.v1.diff-service"]["default"];
        assert_eq!(order.as_array().unwrap().len(), 2);
        assert_eq!(order[0].as_str(), Some("cas-diff"));
        assert_eq!(order[1].as_str(), Some("walking"));
        let unpack = &c["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"];
        assert_eq!(unpack[0]["differ"].as_str(), Some("cas-diff"));
        assert_eq!(unpack[1]["differ"].as_str(), Some("walking"));
        let c = render(v(1, 6, 20), &ContainerdOptions::default());
        assert!(c["plugins"]
            .get("io.containerd.transfer.v1.local")
            .is_none());
    }

    #[test]
    fn containerd_2_names_a_differ_for_every_unpack() {
        for with_differ in [true, false] {
            let c = render(
                v(2, 1, 9),
                &ContainerdOptions::default().differ(with_differ),
            );
            assert_eq!(c["version"].as_integer(), Some(3));
            assert_eq!(c["proxy_plugins"].get("cas-diff").is_some(), with_differ);
            let unpack = c["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
                .as_array()
                .unwrap();
            let pairs: Vec<(&str, &str)> = unpack
                .iter()
                .map(|u| {
                    (
                        u["snapshotter"].as_str().unwrap(),
                        u["differ"].as_str().unwrap(),
                    )
                })
                .collect();
            let ours = if with_differ { "cas-diff" } else { "walking" };
            assert_eq!(pairs, [("cas", ours), ("overlayfs", "walking")]);
            let disabled = c["disabled_plugins"].as_array().unwrap();
            assert!(disabled
                .iter()
                .any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri")));
        }
    }

    #[test]
    fn cri_uses_our_snapshotter_and_sandbox_image() {
        let opts = ContainerdOptions::default().cri(CriOptions {
            sandbox_image: "127.0.0.1:5000/fixture/pause:1".into(),
        });
        let c = render(v(2, 1, 9), &opts);
        let images = &c["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["snapshotter"].as_str(), Some("cas"));
        assert_eq!(
            images["pinned_images"]["sandbox"].as_str(),
            Some("127.0.0.1:5000/fixture/pause:1")
        );
        let disabled = c["disabled_plugins"].as_array().unwrap();
        assert!(!disabled
            .iter()
            .any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri")));
        assert!(containerd_config(v(1, 7, 24), &opts, &paths()).is_err());
    }
}
