//! containerd's binaries (Debian's 1.6, or a release `make deps` cached) and a private
//! containerd process with its own root, state and sockets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;

/// Where `scripts/containerd-versions.sh` unpacks containerd releases
/// (`$CAS_CONTAINERD_CACHE`, default `/var/cache/cas-snapshotter/containerd`).
pub fn containerd_cache() -> PathBuf {
    PathBuf::from(
        std::env::var("CAS_CONTAINERD_CACHE")
            .unwrap_or_else(|_| "/var/cache/cas-snapshotter/containerd".into()),
    )
}

/// The runc that ID-maps mounts, where `scripts/containerd-versions.sh` unpacked one
/// (`$CAS_RUNC_CACHE/current/runc`, default under `/var/cache/cas-snapshotter/runc`):
/// containerd 2.x's CRI needs it for user-namespaced pods (Debian 12's runc 1.1 does not).
pub fn idmap_runc() -> Option<PathBuf> {
    let cache = std::env::var("CAS_RUNC_CACHE")
        .unwrap_or_else(|_| "/var/cache/cas-snapshotter/runc".into());
    let runc = Path::new(&cache).join("current/runc");
    runc.is_file().then_some(runc)
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
            // Pods in a network namespace of their own (user-namespaced pods need one)
            // get interfaces that never leave it (see the plugin).
            use std::os::unix::fs::PermissionsExt;
            for name in ["loopback", "netns-only"] {
                let bin = dir.join("cni/bin").join(name);
                fs::write(&bin, CNI_NETNS_ONLY)?;
                fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
            }
            fs::write(
                dir.join("cni/net.d/10-netns-only.conflist"),
                r#"{"cniVersion": "1.0.0", "name": "cas-e2e", "plugins": [{"type": "netns-only"}]}"#,
            )?;
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

    /// `ctr images pull --plain-http --snapshotter <sn> <image>`.
    pub fn pull(&self, snapshotter: &str, image: &str) -> Result<String> {
        self.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            image,
        ])
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

/// Kills runc shims that serve the containerd at `sock`.
pub(super) fn kill_shims(sock: &Path) {
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

/// The CNI plugin of the rig's pods: interfaces inside the pod's namespace only.
const CNI_NETNS_ONLY: &str = include_str!("cni-netns-only.sh");

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.proc.stop(Duration::from_secs(5));
        kill_shims(&self.sock);
        unmount_below(&self.dir);
    }
}
