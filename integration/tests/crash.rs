//! Crash loop: pulls, runs, removes and GC against a real containerd while the daemon is
//! `kill -9`ed at random moments. After every restart the store must check clean and every
//! image containerd still has must run. `CAS_CRASH_ITERATIONS` sets the count (default 20;
//! `make crash-test N=500` for a long run). Needs root; skips otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use cas_integration::fixture::{APP_RELEASE, BASE_RELEASE};
use cas_integration::harness::{require_root, Rig};

/// A small deterministic generator, seeded per run (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[test]
#[ignore = "needs root, containerd, runc and a registry (make e2e runs it)"]
fn kill9_at_random_moments_loses_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let iterations: u32 = std::env::var("CAS_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("CAS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("crash loop: {iterations} iterations, CAS_CRASH_SEED={seed}");
    let mut rng = Lcg(seed);
    let mut rig = Rig::start()?;
    let images = [
        (rig.base_ref.clone(), BASE_RELEASE),
        (rig.app_ref.clone(), APP_RELEASE),
    ];
    let mut survived = 0;
    for i in 0..iterations {
        let busy = AtomicBool::new(true);
        let delay = Duration::from_millis(rng.next(1500));
        let op = rng.next(4);
        std::thread::scope(|s| {
            let rig = &rig;
            let busy = &busy;
            let images = &images;
            s.spawn(move || {
                // errors are expected: the daemon dies under these requests
                while busy.load(Ordering::Relaxed) {
                    let (image, _) = &images[(op % 2) as usize];
                    let _ = match op {
                        0 | 1 => rig.pull("cas", image),
                        2 => rig
                            .containerd
                            .ctr(&["images", "rm", "--sync", image])
                            .map(|_| ()),
                        _ => rig.casctl(&["gc"]).map(|_| ()),
                    };
                    if op >= 2 {
                        let _ = rig.pull("cas", image);
                    }
                }
            });
            std::thread::sleep(delay);
            if let Some(pid) = rig.daemon.pid() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            busy.store(false, Ordering::Relaxed);
        });
        rig.daemon.restart()?; // reaps the killed process and starts a new one
        rig.wait_reconnected()?;
        let (code, out) = rig.casctl(&["fsck"])?;
        assert_eq!(
            code,
            0,
            "iteration {i} (seed {seed}): fsck after kill -9:\n{out}\n{}",
            rig.logs()
        );
        // every image containerd lists runs, with its own bytes
        let listed = rig.containerd.ctr(&["images", "ls", "-q"])?;
        for (image, release) in &images {
            if listed.lines().any(|l| l == image) {
                // a pull cut short leaves the image without all its layers: finish it
                rig.pull_after_restart("cas", image)?;
                // its bytes, read through a mount of the image
                let mnt = rig.mount("cas", image, &format!("crash-{i}"))?;
                let on_disk = std::fs::read_to_string(mnt.target.join("etc/fixture-release"))?;
                drop(mnt);
                assert_eq!(&on_disk, release, "iteration {i} (seed {seed})");
                // and it runs; ctr can lose the output of a container that exits at once,
                // so an empty answer is asked again
                let mut out = String::new();
                for attempt in 0..3 {
                    out = rig.run(
                        image,
                        &format!("crash-{i}-{attempt}"),
                        &["cat", "/etc/fixture-release"],
                    )?;
                    if !out.is_empty() {
                        break;
                    }
                }
                assert_eq!(&out, release, "iteration {i} (seed {seed})");
            }
        }
        survived += 1;
    }
    // in the end, collect garbage: nothing referenced may go, the store stays clean
    let (code, _) = rig.casctl(&["gc"])?;
    assert_eq!(code, 0);
    let (code, out) = rig.casctl(&["fsck", "--verify-objects"])?;
    assert_eq!(code, 0, "{out}");
    println!("crash loop: survived {survived} of {iterations} kill -9s (seed {seed})");
    Ok(())
}
