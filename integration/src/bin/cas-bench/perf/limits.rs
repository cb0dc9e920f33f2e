//! The physical limits a case is held against, measured in the same run: single-core
//! decompression of the same blobs, `fio` on the same filesystem, and containerd's own
//! Snapshots API benchmark (the in-repository conformance harness).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::*;

/// A physical-limit measurement: name, values (MB/s).
pub struct Limit {
    pub name: String,
    pub what: String,
    pub mbps: Vec<f64>,
}

/// Decompresses `blob` with `tool` (`gzip`, `pigz`, `zstd`; `cat` for a plain tar) on
/// one core into a pipe that is counted and discarded: (seconds, bytes out).
pub fn time_decompress(tool: &str, blob: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let mut child = Command::new(tool)
        .args(decompress_args(tool))
        .arg(blob)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool} (make deps)"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match out.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    if !child.wait()?.success() {
        bail!("{tool} -dc {} failed", blob.display());
    }
    Ok((t.elapsed().as_secs_f64(), n))
}

/// The arguments that make `tool` write `blob` decompressed to stdout.
pub fn decompress_args(tool: &str) -> &'static [&'static str] {
    if tool == "cat" {
        &[]
    } else {
        &["-dc"]
    }
}

/// `fio` sequential write then read of `mib` MiB in `dir`; MB/s of each.
pub(super) fn fio(dir: &Path, mib: u64) -> Result<(f64, f64)> {
    fs::create_dir_all(dir)?;
    let file = dir.join("seq");
    let run = |rw: &str| -> Result<f64> {
        let out = Command::new("fio")
            .args([
                "--name=seq",
                &format!("--rw={rw}"),
                "--bs=1M",
                &format!("--size={mib}M"),
                "--ioengine=psync",
                "--end_fsync=1",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", file.display()))
            .output()
            .context("running fio (make deps)")?;
        if !out.status.success() {
            bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let key = if rw == "write" { "write" } else { "read" };
        let bw = v["jobs"][0][key]["bw_bytes"]
            .as_f64()
            .context("fio printed no bandwidth")?;
        Ok(bw / 1e6)
    };
    let w = run("write")?;
    drop_caches()?;
    let r = run("read")?;
    fs::remove_file(&file)?;
    Ok((w, r))
}

/// The Snapshots API benchmark of the conformance harness: containerd's benchsuite
/// against containerd's overlayfs served over gRPC (`ref`) and against our daemon.
/// Returns (label, metric, ms per layer) for every count.
pub(super) fn snapshots_api(
    run_sh: &Path,
    daemon_bin: &Path,
    cache: &Path,
    tmp: &Path,
    quick: bool,
    runs: usize,
    log: &Path,
) -> Result<Vec<(String, String, f64)>> {
    fs::create_dir_all(tmp)?;
    let out = Command::new("bash")
        .arg(run_sh)
        .arg("bench")
        .arg("ref")
        .arg(format!(
            "{} --root {{root}} --address {{sock}}",
            daemon_bin.display()
        ))
        .env("LABELS", "overlayfs,cas")
        .env("BENCHTIME", if quick { "2x" } else { "10x" })
        .env("COUNT", runs.to_string())
        .env("BUILD", cache.join("conf-build"))
        .env("CONF_TMP", tmp)
        .output()
        .context("running the conformance harness")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(
        log,
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )?;
    if !out.status.success() {
        bail!(
            "run.sh bench failed (see {}):\n{}",
            log.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_benchsuite(&text))
}

/// Layers per iteration of containerd's benchsuite.
pub(super) const BENCHSUITE_LAYERS: f64 = 16.0;

/// `BenchmarkProxy/<label>/run-2  N  T ns/op …` and `BenchmarkProxy/<label>/prepare …`
/// lines into (label, metric, ms per layer).
pub(super) fn parse_benchsuite(text: &str) -> Vec<(String, String, f64)> {
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != "ns/op" {
            continue;
        }
        let Some(name) = f[0].strip_prefix("BenchmarkProxy/") else {
            continue;
        };
        let mut parts = name.splitn(2, '/');
        let (Some(label), Some(metric)) = (parts.next(), parts.next()) else {
            continue;
        };
        let metric = if metric.starts_with("run") {
            "total"
        } else {
            metric
        };
        if let Ok(ns) = f[2].parse::<f64>() {
            v.push((
                label.to_string(),
                metric.to_string(),
                ns / 1e6 / BENCHSUITE_LAYERS,
            ));
        }
    }
    v
}
