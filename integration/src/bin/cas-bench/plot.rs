//! SVG plots of `cas-bench perf`, drawn with `plotters`: the time of every case for
//! both snapshotters, and the scaling curves (time and peak RSS against files).

use std::fmt::Display;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::perf::{summary, Case, Sample, SNAPSHOTTERS};

const COLORS: [RGBColor; 2] = [RGBColor(0x4c, 0x72, 0xb0), RGBColor(0xdd, 0x84, 0x52)];

fn err(e: impl Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

fn stats(samples: &[Sample], case: &str, sn: &str, f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    summary(
        samples
            .iter()
            .filter(|s| s.case == case && s.sn == sn)
            .map(f)
            .collect(),
    )
}

/// Grouped bars (log scale): median time of every non-scaling case, min–max whiskers.
pub fn times(path: &Path, cases: &[Case], samples: &[Sample]) -> Result<()> {
    let main: Vec<&Case> = cases.iter().filter(|c| c.scaling_files.is_none()).collect();
    if main.is_empty() {
        // `perf --case` with scaling cases only: no bars (an empty log range never ends)
        return Ok(());
    }
    let all: Vec<(f64, f64, f64)> = main
        .iter()
        .flat_map(|c| SNAPSHOTTERS.map(|sn| stats(samples, &c.id, sn, |s| s.secs)))
        .collect();
    let lo = all
        .iter()
        .map(|x| x.1)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 2.0;
    let hi = all.iter().map(|x| x.2).fold(0.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = main.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time per case, median with min–max (seconds, log scale; lower is better)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n - 0.5, (lo..hi).log_scale())
        .map_err(err)?;
    let names: Vec<String> = main.iter().map(|c| c.id.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(main.len())
        .x_label_formatter(&|x| {
            let k = x.round();
            if (x - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < names.len() {
                names[k as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc("seconds")
        .draw()
        .map_err(err)?;
    for (j, sn) in SNAPSHOTTERS.iter().enumerate() {
        let color = COLORS[j];
        let bars: Vec<(f64, (f64, f64, f64))> = main
            .iter()
            .enumerate()
            .map(|(i, c)| (i as f64, stats(samples, &c.id, sn, |s| s.secs)))
            .collect();
        let x0 = |i: f64| i - 0.4 + 0.4 * j as f64;
        chart
            .draw_series(bars.iter().map(|&(i, (m, _, _))| {
                Rectangle::new([(x0(i), lo), (x0(i) + 0.38, m)], color.filled())
            }))
            .map_err(err)?
            .label(*sn)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(bars.iter().map(|&(i, (_, min, max))| {
                PathElement::new(
                    vec![(x0(i) + 0.19, min), (x0(i) + 0.19, max)],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Two log-log panels against the number of files: unpack time of both snapshotters,
/// and peak RSS (our daemon with cas; containerd, which unpacks, with overlayfs).
pub fn scaling(path: &Path, cases: &[Case], samples: &[Sample]) -> Result<()> {
    let sc: Vec<(f64, &Case)> = cases
        .iter()
        .filter_map(|c| c.scaling_files.map(|n| (n as f64, c)))
        .collect();
    if sc.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 2));
    let xr = sc[0].0 / 2.0..sc[sc.len() - 1].0 * 2.0;

    type Metric<'a> = (
        &'a str,
        &'a str,
        [(&'a str, &'a str); 2],
        fn(&Sample) -> f64,
    );
    let metrics: [Metric; 2] = [
        (
            "Unpack time (s)",
            "seconds",
            [("overlayfs", "overlayfs"), ("cas", "cas")],
            |s| s.secs,
        ),
        (
            "Peak RSS (MiB)",
            "MiB",
            [
                ("overlayfs", "containerd (overlayfs)"),
                ("cas", "cas-snapshotter daemon"),
            ],
            |s| {
                if s.sn == "cas" {
                    s.daemon_hwm_kib as f64 / 1024.0
                } else {
                    s.containerd_hwm_kib as f64 / 1024.0
                }
            },
        ),
    ];
    for (panel, (title, unit, series, f)) in panels.iter().zip(metrics) {
        let pts: Vec<Vec<(f64, f64)>> = series
            .iter()
            .map(|(sn, _)| {
                sc.iter()
                    .map(|(n, c)| (*n, stats(samples, &c.id, sn, f).0))
                    .collect()
            })
            .collect();
        let ys = pts.iter().flatten().map(|p| p.1);
        let lo = ys.clone().fold(f64::INFINITY, f64::min).max(1e-3) / 2.0;
        let hi = ys.fold(0.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{title} against files in the layer"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xr.clone().log_scale(), (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("files")
            .y_desc(unit)
            .draw()
            .map_err(err)?;
        for (j, ((_, label), line)) in series.iter().zip(pts).enumerate() {
            let color = COLORS[j];
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
