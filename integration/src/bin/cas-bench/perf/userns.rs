//! User-namespaced container starts: `ctr run -d --uidmap/--gidmap` with a mapping
//! never used before, as kubelet gives every `hostUsers: false` pod one, on an image
//! already pulled into both snapshotters.
//!
//! Four ways, interleaved, the order rotated every run:
//! * *overlayfs, ID-mapped*: `--remap-labels`; containerd's overlayfs declares
//!   `remap-ids` and containerd's mount code ID-maps its lower directories;
//! * *cas, ID-mapped*: `--remap-labels`; our daemon mounts ID-mapped clones of the
//!   shared layers;
//! * *cas, chown* and *overlayfs, chown*: without `--remap-labels`, containerd's client
//!   chowns a copy of the image (a new snapshot, every file chowned, committed) first.
//!
//! Each start is timed from `ctr run -d` to its return (the container's task started,
//! running `sleep`); what the filesystem holds more while it runs (bytes and inodes,
//! `statfs` after `sync`) is what every further pod with a mapping of its own costs. The
//! container is then deleted, and containerd's GC run to the end (collecting a chowned
//! copy) before the next start.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::*;

/// One way of starting a user-namespaced container.
#[derive(Debug, Clone, Copy)]
pub(super) struct Way {
    /// The snapshotter.
    pub(super) sn: &'static str,
    /// `--remap-labels`: the mapping goes to the snapshotter.
    pub(super) labels: bool,
}

impl Way {
    fn name(&self) -> String {
        format!(
            "{}, {}",
            self.sn,
            if self.labels { "ID-mapped" } else { "chown" }
        )
    }
}

const WAYS: [Way; 4] = [
    Way {
        sn: "overlayfs",
        labels: true,
    },
    Way {
        sn: "cas",
        labels: true,
    },
    Way {
        sn: "overlayfs",
        labels: false,
    },
    Way {
        sn: "cas",
        labels: false,
    },
];

/// The starts of one way.
#[derive(Debug, Clone)]
pub(super) struct Starts {
    pub(super) way: Way,
    pub(super) secs: Vec<f64>,
    /// Bytes and inodes each started container added to the filesystem.
    pub(super) bytes: Vec<i64>,
    pub(super) inodes: Vec<i64>,
}

/// Used bytes and inodes of the filesystem at `dir`, after a `sync`.
fn used(dir: &std::path::Path) -> Result<(i64, i64)> {
    nix::unistd::sync();
    let s = nix::sys::statvfs::statvfs(dir)?;
    let bytes = (s.blocks() - s.blocks_free()) as i64 * s.fragment_size() as i64;
    let inodes = (s.files() - s.files_free()) as i64;
    Ok((bytes, inodes))
}

/// Snapshots `sn` holds in the default namespace.
fn snapshots(rig: &Rig, sn: &str) -> Result<usize> {
    Ok(rig
        .containerd
        .ctr(&["snapshots", "--snapshotter", sn, "ls"])?
        .lines()
        .skip(1)
        .count())
}

/// Runs containerd's GC to the end (a lease deleted with `--sync`), then waits until
/// each snapshotter holds `want` snapshots again: what an earlier start left (a chowned
/// copy) is gone before the next is measured.
fn settle(rig: &Rig, want: &[(&str, usize)]) -> Result<()> {
    let c = &rig.containerd;
    c.ctr(&["leases", "create", "--id", "cas-bench-gc"])?;
    c.ctr(&["leases", "delete", "--sync", "cas-bench-gc"])?;
    let start = Instant::now();
    for (sn, n) in want {
        while snapshots(rig, sn)? > *n {
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("{sn} still holds more than {n} snapshots after GC");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Times `runs` starts of each way on `image`.
pub(super) fn measure(rig: &Rig, image: &str, runs: usize) -> Result<Vec<Starts>> {
    rig.remove_all_images()?;
    for sn in SNAPSHOTTERS {
        rig.pull(sn, image)?;
    }
    let reference = rig.reference(image);
    let baseline: Vec<(&str, usize)> = SNAPSHOTTERS
        .iter()
        .map(|sn| Ok((*sn, snapshots(rig, sn)?)))
        .collect::<Result<_>>()?;
    let mut out: Vec<Starts> = WAYS
        .iter()
        .map(|w| Starts {
            way: *w,
            secs: Vec::new(),
            bytes: Vec::new(),
            inodes: Vec::new(),
        })
        .collect();
    let mut next_host = 1_000_000u32;
    for run in 0..runs {
        for k in 0..WAYS.len() {
            let i = (k + run) % WAYS.len();
            let way = WAYS[i];
            let host = next_host;
            next_host += 65_536;
            let map = format!("0:{host}:65536");
            let id = format!("userns-{run}-{i}");
            let mut args = vec![
                "run",
                "-d",
                "--snapshotter",
                way.sn,
                "--uidmap",
                &map,
                "--gidmap",
                &map,
            ];
            if way.labels {
                args.push("--remap-labels");
            }
            args.extend([reference.as_str(), id.as_str(), "sleep", "600"]);
            settle(rig, &baseline)?;
            let before = used(&rig.fs.mnt)?;
            drop_caches()?;
            let t = Instant::now();
            rig.containerd
                .ctr(&args)
                .with_context(|| format!("ctr run as {}", way.name()))?;
            let secs = t.elapsed().as_secs_f64();
            let running = used(&rig.fs.mnt)?;
            rig.containerd.ctr(&["task", "delete", "--force", &id])?;
            rig.containerd.ctr(&["containers", "delete", &id])?;
            println!(
                "userns       {:<22} run {}: {secs:>6.3}s, while running {:>8.1} KiB and {:>5} inodes more",
                way.name(),
                run + 1,
                (running.0 - before.0) as f64 / 1024.0,
                running.1 - before.1,
            );
            let after = running;
            let s = &mut out[i];
            s.secs.push(secs);
            s.bytes.push(after.0 - before.0);
            s.inodes.push(after.1 - before.1);
        }
    }
    rig.remove_all_images()?;
    Ok(out)
}

fn median_i(v: &[i64]) -> i64 {
    summary(v.iter().map(|x| *x as f64).collect()).0 as i64
}

/// The report's section.
pub(super) fn render(image: &str, starts: &[Starts]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## User-namespaced container starts (a new mapping each)\n\n\
         `ctr run -d --uidmap/--gidmap 0:<new>:65536` of `{image}` (pulled into both snapshotters \
         first) until its task runs, caches dropped before each start; *ID-mapped* passes \
         `--remap-labels` (the snapshotter maps: containerd's ID-mapped lower directories for \
         overlayfs, our ID-mapped layer clones for cas), *chown* lets containerd chown a copy of \
         the image first. *added* is what the filesystem holds more while the container runs \
         (`statfs` after `sync`): every further pod with a mapping of its own costs as much. \
         Medians of the runs; ratio to overlayfs ID-mapped.\n"
    );
    let _ = writeln!(
        s,
        "| way | start, median (min-max) | ratio | added per container: bytes | inodes |\n|---|---:|---:|---:|---:|"
    );
    let base = starts
        .iter()
        .find(|x| x.way.sn == "overlayfs" && x.way.labels)
        .map(|x| summary(x.secs.clone()).0);
    for x in starts {
        let (med, min, max) = summary(x.secs.clone());
        let ratio = base.map_or(f64::NAN, |b| med / b);
        let _ = writeln!(
            s,
            "| {} | {med:.3} s ({min:.3}-{max:.3}) | {ratio:.2} | {:.1} KiB | {} |",
            x.way.name(),
            median_i(&x.bytes) as f64 / 1024.0,
            median_i(&x.inodes)
        );
    }
    s
}

/// The CSV rows: `userns,<way>,<run>,<secs>,<bytes>,<inodes>`.
pub(super) fn csv(starts: &[Starts], out: &mut String) {
    for x in starts {
        for (run, secs) in x.secs.iter().enumerate() {
            let _ = writeln!(
                out,
                "userns,{},{},{secs:.4},{},{}",
                x.way.name(),
                run + 1,
                x.bytes[run],
                x.inodes[run]
            );
        }
    }
}
