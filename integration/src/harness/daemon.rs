//! Our daemon, started from the workspace binary with its own root and socket, restarted
//! and killed as the crash tests need.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use super::*;

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

impl Drop for Daemon {
    /// A killed daemon leaves its layers' images mounted (the next start on the root
    /// reuses them); a test's root goes with the test, so they are detached here.
    fn drop(&mut self) {
        self.proc.kill9();
        unmount_below(&self.root);
    }
}
