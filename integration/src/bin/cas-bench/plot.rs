//! SVG plots of `cas-bench perf`, drawn with `plotters`: the time of every case for
//! both snapshotters, and the scaling curves (time and peak RSS against files); and the
//! log-log panels those curves and `cas-bench scale` draw with.

use std::fmt::Display;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::perf::{summary, Case, Sample, SNAPSHOTTERS};

const COLORS: [RGBColor; 7] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
    RGBColor(0xda, 0x8b, 0xc3),
];

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
    let panels: Vec<Panel> = metrics
        .into_iter()
        .map(|(title, unit, series, f)| Panel {
            title: format!("{title} against files in the layer"),
            x_desc: "files",
            y_desc: unit,
            lines: series
                .iter()
                .map(|(sn, label)| {
                    let pts = sc
                        .iter()
                        .map(|(n, c)| (*n, stats(samples, &c.id, sn, f).0))
                        .collect();
                    (label.to_string(), pts)
                })
                .collect(),
        })
        .collect();
    log_log_panels(path, (1100, 480), &panels)
}

/// One panel of [`log_log_panels`]: its title, axis names and named lines.
pub struct Panel {
    pub title: String,
    pub x_desc: &'static str,
    pub y_desc: &'static str,
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

/// Log-log panels side by side, each line with its points marked. Points that are not
/// positive are drawn at the panel's floor.
pub fn log_log_panels(path: &Path, size: (u32, u32), panels: &[Panel]) -> Result<()> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        let pts = || panel.lines.iter().flat_map(|(_, l)| l.iter());
        let xs = pts().map(|p| p.0).filter(|x| *x > 0.0);
        let x_lo = xs.clone().fold(f64::INFINITY, f64::min) / 2.0;
        let x_hi = xs.fold(0.0, f64::max) * 2.0;
        let ys = pts().map(|p| p.1).filter(|y| y.is_finite() && *y > 0.0);
        let lo = ys.clone().fold(f64::INFINITY, f64::min).max(1e-3) / 2.0;
        let hi = ys.fold(0.0, f64::max).max(lo * 4.0) * 2.0;
        if !x_lo.is_finite() || x_hi <= x_lo {
            continue;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(panel.x_desc)
            .y_desc(panel.y_desc)
            .draw()
            .map_err(err)?;
        for (j, (label, line)) in panel.lines.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let line: Vec<(f64, f64)> = line
                .iter()
                .map(|&(x, y)| (x, if y.is_finite() { y.max(lo) } else { lo }))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label.as_str())
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
