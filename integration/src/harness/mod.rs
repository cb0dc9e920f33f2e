//! Real processes for end-to-end tests: a local OCI registry, our daemon, and a private
//! containerd configured with `[proxy_plugins.cas]`. Each owns its process and cleans up
//! on drop (processes killed, mounts under its directory detached), so a failing test
//! leaves nothing running. Nothing is mocked; only loopback and files under a temporary
//! directory are used, and a system containerd is never touched.
//!
//! * `process`: child processes ended on drop, waits, free ports;
//! * `oci_registry`: a local OCI registry;
//! * `daemon`: our daemon;
//! * `containerd`: containerd's binaries and a private containerd;
//! * `config`: what that containerd (and our differ) is configured with;
//! * `loopfs`: loop-device filesystems;
//! * `rig`: all of them together, and the steps the tests share.
//!
//! Everything is used through this module (`harness::Rig`, `harness::Containerd`, …).

mod config;
mod containerd;
mod daemon;
mod loopfs;
mod netns;
mod oci_registry;
mod process;
mod registry_proxy;
mod rig;

pub use config::*;
pub use containerd::*;
pub use daemon::*;
pub use loopfs::*;
pub use netns::*;
pub use oci_registry::*;
pub use process::*;
pub use registry_proxy::*;
pub use rig::*;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

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
