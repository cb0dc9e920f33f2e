//! `bench/report.md` and `bench.csv`: medians, ranges and ratios of every case, the
//! limits, and the sections of the other benchmarks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;

use super::*;

/// The report's sections on the Snapshots API and on durability.
pub(super) struct ApiSections<'a> {
    /// containerd's benchsuite: (label, metric, ms per layer).
    pub(super) api: &'a [(String, String, f64)],
    /// Journal latency and recovery, rendered.
    pub(super) durability: String,
    /// The fast path alone, rendered.
    pub(super) engine: String,
    /// User-namespaced container starts, rendered (empty before containerd 2.x).
    pub(super) userns: String,
}

pub(super) struct Header {
    pub(super) quick: bool,
    pub(super) runs: usize,
    pub(super) containerd: String,
    pub(super) containerd_arg: Option<String>,
    pub(super) cas_diff: bool,
    pub(super) unpack: String,
    pub(super) cas_layers: String,
    pub(super) fs_gib: u64,
    pub(super) backing_fs: String,
    pub(super) minutes: f64,
    pub(super) max_load: f64,
}

pub(super) fn csv(samples: &[Sample], limits: &[Limit], api: &[(String, String, f64)]) -> String {
    let mut s = String::from("case,snapshotter,run,metric,value\n");
    for x in samples {
        let sn = x.sn;
        let r = x.run + 1;
        for (metric, v) in [
            ("seconds", x.secs),
            ("seconds_synced", x.synced_secs),
            ("written_bytes", x.written as f64),
            ("daemon_peak_rss_kib", x.daemon_hwm_kib as f64),
            ("daemon_rss_after_kib", x.daemon_rss_after_kib as f64),
            ("containerd_peak_rss_kib", x.containerd_hwm_kib as f64),
            ("daemon_cpu_seconds", x.daemon_cpu),
            ("containerd_cpu_seconds", x.containerd_cpu),
            ("load1", x.load1),
        ] {
            let _ = writeln!(s, "{},{sn},{r},{metric},{v}", x.case);
        }
    }
    for l in limits {
        for (i, v) in l.mbps.iter().enumerate() {
            let _ = writeln!(s, "limit/{},-,{},mb_per_second,{v:.1}", l.name, i + 1);
        }
    }
    let mut count: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (label, metric, ms) in api {
        let n = count.entry((label.clone(), metric.clone())).or_default();
        *n += 1;
        let _ = writeln!(s, "snapshots-api/{metric},{label},{n},ms_per_layer,{ms:.3}");
    }
    s
}

pub(super) fn values(
    samples: &[Sample],
    case: &str,
    sn: &str,
    f: impl Fn(&Sample) -> f64,
) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.case == case && s.sn == sn)
        .map(f)
        .collect()
}

pub(super) fn fmt_range(v: Vec<f64>, digits: usize) -> String {
    let (m, lo, hi) = summary(v);
    format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
}

pub(super) fn render(
    h: &Header,
    cases: &[Case],
    samples: &[Sample],
    case_limits: &BTreeMap<String, f64>,
    limits: &[Limit],
    api: &ApiSections,
    sizes: &[(String, u64, u64, u64, &'static str)],
) -> String {
    let ApiSections {
        api,
        durability,
        engine,
        userns,
    } = api;
    let mut s = String::new();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem = status_like("/proc/meminfo", "MemTotal:").unwrap_or(0) as f64 / (1 << 20) as f64;
    let _ = writeln!(
        s,
        "# Benchmark: cas-snapshotter against containerd's overlayfs\n"
    );
    let _ = writeln!(
        s,
        "Produced by `make bench{}{}`; raw numbers in [`results/bench.csv`](results/bench.csv), \
         plots [`results/bench-times.svg`](results/bench-times.svg) and \
         [`results/bench-scaling.svg`](results/bench-scaling.svg).\n",
        if h.quick { " QUICK=1" } else { "" },
        h.containerd_arg
            .as_deref()
            .map_or(String::new(), |c| format!(" CONTAINERD={c}"))
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = if h.max_load > 1.0 {
        format!(
            " **Busy machine**: 1-minute load average up to {:.1} on {cores} cores at the start of a timed \
             step (the benchmark's own earlier steps count in it, and any other work on the machine): \
             absolute times are noisy, compare the ratios.",
            h.max_load
        )
    } else {
        String::new()
    };
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| machine | {cpu}, {} cores, {mem:.0} GiB RAM |",
        sh("nproc", &[])
    );
    let _ = writeln!(s, "| kernel | {} |", sh("uname", &["-r"]));
    let _ = writeln!(
        s,
        "| filesystem | XFS (`mkfs.xfs` defaults) on a {} GiB sparse loop file on {}: registry, containerd's root and our store |",
        h.fs_gib, h.backing_fs
    );
    let _ = writeln!(
        s,
        "| containerd | {} (one instance, both snapshotters){} |",
        h.containerd,
        if h.cas_diff {
            ", `cas-diff` declared"
        } else {
            ", walking differ"
        }
    );
    let _ = writeln!(s, "| unpack | {} |", h.unpack);
    let _ = writeln!(s, "| cas layers | {} |", h.cas_layers);
    let _ = writeln!(
        s,
        "| runs | {} per case and snapshotter, alternating, caches dropped before each; {} images |",
        h.runs,
        if h.quick { "QUICK (small)" } else { "full-size" }
    );
    let _ = writeln!(
        s,
        "| date | {} ({:.0} minutes) |",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        h.minutes
    );
    let _ = writeln!(
        s,
        "\nTimes are seconds until `ctr` returns, median [min–max].{shared}\n"
    );

    let _ = writeln!(
        s,
        "| case | overlayfs (s) | cas (s) | cas / overlayfs | limit (s) | % of limit: overlayfs / cas | \
         until synced (s): overlayfs / cas | written (MB): overlayfs / cas | peak RSS (MiB): cas daemon (kept after) / containerd with cas |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for c in cases.iter().filter(|c| c.scaling_files.is_none()) {
        let o = values(samples, &c.id, "overlayfs", |x| x.secs);
        let ours = values(samples, &c.id, "cas", |x| x.secs);
        let (om, cm) = (summary(o.clone()).0, summary(ours.clone()).0);
        let limit = case_limits.get(&c.id);
        let lim = limit.map_or("–".into(), |l| format!("{l:.2}"));
        let pct = limit.map_or("–".into(), |l| {
            format!("{:.0}% / {:.0}%", 100.0 * l / om, 100.0 * l / cm)
        });
        let med = |sn: &str, f: &dyn Fn(&Sample) -> f64| summary(values(samples, &c.id, sn, f)).0;
        let _ = writeln!(
            s,
            "| **{}**: {} | {} | {} | {:.2} | {lim} | {pct} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} ({:.0}) / {:.0} |",
            c.id,
            c.title,
            fmt_range(o, 2),
            fmt_range(ours, 2),
            cm / om,
            med("overlayfs", &|x| x.synced_secs),
            med("cas", &|x| x.synced_secs),
            med("overlayfs", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.daemon_hwm_kib as f64 / 1024.0),
            med("cas", &|x| x.daemon_rss_after_kib as f64 / 1024.0),
            med("cas", &|x| x.containerd_hwm_kib as f64 / 1024.0),
        );
    }

    let _ = writeln!(s, "\n## Scaling with the number of files\n");
    let _ = writeln!(
        s,
        "One layer of N files of 0–2 KiB each, unpacked with the content present. Linear growth \
         keeps the per-file columns flat.\n"
    );
    let _ = writeln!(
        s,
        "| files | overlayfs (s) | cas (s) | cas / overlayfs | overlayfs µs/file | cas µs/file | cas daemon peak RSS (kept after) (MiB) | written (MB): overlayfs / cas |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for c in cases.iter().filter(|c| c.scaling_files.is_some()) {
        let n = c.scaling_files.unwrap_or(1) as f64;
        let o = values(samples, &c.id, "overlayfs", |x| x.secs);
        let ours = values(samples, &c.id, "cas", |x| x.secs);
        let (om, cm) = (summary(o.clone()).0, summary(ours.clone()).0);
        let med = |sn: &str, f: &dyn Fn(&Sample) -> f64| summary(values(samples, &c.id, sn, f)).0;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} ({:.0}) | {:.0} / {:.0} |",
            n,
            fmt_range(o, 2),
            fmt_range(ours, 2),
            cm / om,
            om / n * 1e6,
            cm / n * 1e6,
            med("cas", &|x| x.daemon_hwm_kib as f64 / 1024.0),
            med("cas", &|x| x.daemon_rss_after_kib as f64 / 1024.0),
            med("overlayfs", &|x| x.written as f64 / 1e6),
            med("cas", &|x| x.written as f64 / 1e6),
        );
    }

    let _ = writeln!(s, "\n## Physical limits (same run, same filesystem)\n");
    let _ = writeln!(
        s,
        "| measure | MB/s, median [min–max] | of what |\n|---|---|---|"
    );
    for l in limits {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} |",
            l.name,
            fmt_range(l.mbps.clone(), 0),
            l.what
        );
    }
    let _ = writeln!(
        s,
        "\nA case's *limit* is the longer of two lower bounds: decompressing its blobs with `gzip -dc` \
         (`zstd -dc`) on one core, and writing its files' bytes at fio's sequential write rate. \
         *% of limit* is limit / median time: 100% would be an unpack as fast as decompression alone."
    );

    if !engine.is_empty() {
        let _ = writeln!(s, "\n## The fast path alone (no containerd)\n");
        let _ = writeln!(
        s,
        "`cas::unpack::apply_blob` on the same blobs, called directly (`make bench-engine`), on the same \
         filesystem: *cas new* into an empty store, *cas known* the same blob again into that store (the \
         near-duplicate case: only the layer's metadata is written), each layer's metadata as one \
         EROFS image as the daemon writes it here. *tar -x + syncfs* is GNU tar fed by the same \
         decompressor, then `syncfs`: a plain unpacker whose result is on disk, as ours is when the \
         apply returns. *limit* is single-core `gzip -dc` / `zstd -dc` into a pipe; *% of limit* is \
         limit / time (above 100%: faster than that tool alone). The blob is in the page cache, the \
         rest of the cache dropped before each step; medians of the runs.\n"
    );
        s.push_str(engine);
    }
    s.push_str(userns);

    if !api.is_empty() {
        let _ = writeln!(
            s,
            "\n## Snapshots API latency (containerd's benchsuite over gRPC)\n"
        );
        let _ = writeln!(
            s,
            "containerd's `snapshots/benchsuite` through the conformance harness: 16 layers per \
             iteration, each Prepare, mount + write ~10 files of 1 MiB + unmount, Commit; \
             `overlayfs` is containerd's own overlayfs snapshotter served over gRPC by the \
             harness's reference server. Milliseconds per layer; *total* is the median [min–max] over the counts, the steps are the last count's (upstream prints them once).\n"
        );
        let _ = writeln!(
            s,
            "| step | overlayfs (ms) | cas (ms) | cas / overlayfs |\n|---|---|---|---|"
        );
        for metric in ["prepare", "write", "commit", "total"] {
            let get = |label: &str| -> Vec<f64> {
                api.iter()
                    .filter(|(l, m, _)| l == label && m == metric)
                    .map(|x| x.2)
                    .collect()
            };
            let (o, c) = (get("overlayfs"), get("cas"));
            if o.is_empty() || c.is_empty() {
                continue;
            }
            let ratio = summary(c.clone()).0 / summary(o.clone()).0;
            let _ = writeln!(
                s,
                "| {metric} | {} | {} | {ratio:.2} |",
                fmt_range(o, 2),
                fmt_range(c, 2)
            );
        }
    }

    let _ = writeln!(s);
    s.push_str(durability);

    let _ = writeln!(s, "\n## Images\n");
    let _ = writeln!(
        s,
        "Generated by `cas_integration::fixture::write_files_layer` (deterministic content, half of \
         every 4 KiB block repeating a pattern, so gzip gets about 2:1), cached under the `--cache` \
         directory. `base-2..4` are independent builds of `base-1`: the same `usr/` files with other \
         times and their own `etc/` files. `app` is `base-1`'s layer plus an app layer.\n"
    );
    let _ = writeln!(s, "| image | layer files | file bytes (MB) | blob (MB) | compression |\n|---|---|---|---|---|");
    for (name, files, bytes, blob, comp) in sizes {
        let _ = writeln!(
            s,
            "| {name} | {files} | {:.1} | {:.1} | {comp} |",
            *bytes as f64 / 1e6,
            *blob as f64 / 1e6
        );
    }
    let _ = writeln!(
        s,
        "\n## Method\n\nEach timed step is `ctr images pull` after every image was removed \
         (`ctr images rm --sync`: containerd's GC empties both snapshotters) and the case's setup \
         ran: content fetched with `ctr content fetch` (all cases but the cold pulls, so only the \
         unpack is timed; the pull still resolves the tag on the local registry), a base unpacked \
         with the same snapshotter for the near-duplicate and app cases. Then `sync`, \
         `echo 3 > /proc/sys/vm/drop_caches`, and the step. *Until synced* adds a `sync` after \
         `ctr` returns: our Commit makes a layer durable before it returns, containerd's overlayfs \
         leaves dirty pages behind. *Written* is the loop device's sectors written over the step \
         and that `sync` (`/sys/block/<dev>/stat`): everything containerd, the snapshotters and \
         the filesystem wrote. *Peak RSS* is `VmHWM`, reset through `/proc/<pid>/clear_refs` \
         before the step (which resets it to the RSS the process keeps from earlier steps); \
         *kept after* is the daemon's `VmRSS` once the step and its `sync` are over. Daemon and containerd CPU seconds per step are in the CSV."
    );
    s
}
