//! SIGHUP: a valid new configuration changes the log level and starts scheduled GC; an
//! invalid one changes nothing and the daemon keeps serving; a setting that needs a
//! restart says so. Runs the real daemon binary. Needs root (the start-up overlay probe).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn wait_for(log: &Path, what: &str, after: usize) -> usize {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(pos) = text[after.min(text.len())..].find(what) {
            return after + pos + what.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what:?} not logged:\n{}",
        fs::read_to_string(log).unwrap_or_default()
    );
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
#[ignore = "needs root: the daemon probes overlayfs at start (make unit runs it)"]
fn sighup_applies_what_it_can_and_keeps_serving() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the daemon needs root (overlay probe)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("config.toml");
    let sock = d.join("s.sock");
    let base = format!(
        "root = \"{}\"\naddress = \"{}\"\n",
        d.join("root").display(),
        sock.display()
    );
    fs::write(&cfg, format!("{base}[log]\nlevel = \"info\"\n")).unwrap();
    let log = d.join("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cas-snapshotter"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut at = wait_for(&log, "serving containerd's Snapshots and Diff APIs", 0);

    // Valid: debug logging, GC every second, metrics on.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    fs::write(
        &cfg,
        format!(
            "{base}[log]\nlevel = \"debug\"\n[gc]\ninterval = \"1s\"\n[metrics]\naddress = \"{metrics}\"\n"
        ),
    )
    .unwrap();
    signal(&child, Signal::SIGHUP);
    at = wait_for(&log, "log level changed", at);
    at = wait_for(&log, "GC schedule changed", at);
    wait_for(&log, "serving metrics at /metrics", at);
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.contains("cas_recovery_seconds"), "{text}");
    }
    at = wait_for(&log, "scheduled garbage collection", at);
    at = wait_for(&log, "garbage collected", at);

    // Invalid: nothing changes, the daemon keeps serving.
    fs::write(&cfg, format!("{base}[gc]\nintervall = \"1s\"\n")).unwrap();
    signal(&child, Signal::SIGHUP);
    at = wait_for(&log, "keeping the previous configuration", at);
    assert!(child.try_wait().unwrap().is_none(), "the daemon exited");
    std::os::unix::net::UnixStream::connect(&sock).expect("still serving");
    // GC still runs on the old schedule
    at = wait_for(&log, "scheduled garbage collection", at);

    // A new root needs a restart; it is said, and the running one stays.
    let moved = base.replace("/root\"", "/elsewhere\"");
    fs::write(&cfg, format!("{moved}[gc]\ninterval = \"off\"\n")).unwrap();
    signal(&child, Signal::SIGHUP);
    at = wait_for(&log, "takes effect after a restart", at);
    wait_for(&log, "configuration reloaded", at);
    assert!(!d.join("elsewhere").exists());

    signal(&child, Signal::SIGTERM);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
