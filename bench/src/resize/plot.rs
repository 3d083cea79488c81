//! The figures of `bench resize`, as SVG with `plotters` (built, as for the web's charts,
//! without its `ttf` feature: the SVG backend writes text as `<text>` elements).
//!
//! PNG is not drawn by plotters: its bitmap backend needs a font rasteriser (`ttf`, with
//! font-kit and a system font) and an image encoder (`image`), neither of which the workspace
//! builds. Instead each SVG is rendered to a PNG of the same size by headless Chromium when
//! one is installed (the UI tests' browser), so the PNG is exactly the SVG's picture; without
//! it the bench says so and writes the SVG alone.
//!
//! Per experiment, `<slug>.svg`: throughput, p99 latency (log scale) and hit rate per second,
//! one line per design, each design's resizes marked by vertical lines in its colour (solid:
//! asked for; dashed: done). Experiments 4-5 also get `<slug>-scaling.svg`: pool size and the
//! autoscaler's window miss rate over time per design, with the thresholds drawn.

use std::path::Path;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::pool::Design;
use super::{Experiment, Run};

const WIDTH: u32 = 900;
const PANEL: u32 = 230;

fn colour(d: Design) -> RGBColor {
    match d {
        Design::Product => RGBColor(0x1f, 0x5f, 0xa8),
        Design::Empty => RGBColor(0xe0, 0x8a, 0x00),
        Design::Original => RGBColor(0xb0, 0x30, 0x30),
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// One design's points; `true` draws them as steps.
type Line = (Design, Vec<(f64, f64)>, bool);

struct Panel<'p> {
    title: &'p str,
    y: std::ops::Range<f64>,
    y_label: fn(f64) -> String,
    lines: Vec<Line>,
    /// Horizontal reference lines with their captions.
    thresholds: Vec<(f64, &'p str)>,
}

fn draw(area: &Area<'_>, x_max: f64, runs: &[Run], p: &Panel<'_>) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("drawing {}: {e}", p.title);
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, p.y.clone())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .x_labels(12)
        .y_labels(6)
        .y_label_formatter(&|y| (p.y_label)(*y))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(0xe4, 0xe8, 0xee))
        .label_style(("sans-serif", 11))
        .draw()
        .map_err(err)?;
    for (y, caption) in &p.thresholds {
        chart
            .draw_series(LineSeries::new(
                [(0.0, *y), (x_max, *y)],
                ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1),
            ))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                caption.to_string(),
                (x_max * 0.005, *y),
                ("sans-serif", 11),
            )))
            .map_err(err)?;
    }
    for run in runs {
        let c = colour(run.design);
        for r in &run.resizes {
            for (t, solid) in [(r.asked, true), (r.done, false)] {
                let style =
                    ShapeStyle::from(&c.mix(if solid { 0.7 } else { 0.45 })).stroke_width(1);
                if solid {
                    chart
                        .draw_series(LineSeries::new([(t, p.y.start), (t, p.y.end)], style))
                        .map_err(err)?;
                } else {
                    chart
                        .draw_series(DashedLineSeries::new(
                            [(t, p.y.start), (t, p.y.end)],
                            4,
                            4,
                            style,
                        ))
                        .map_err(err)?;
                }
            }
        }
    }
    for (design, points, step) in &p.lines {
        let c = colour(*design);
        let pts: Vec<(f64, f64)> = if *step {
            let mut out = Vec::new();
            for w in points.windows(2) {
                out.push(w[0]);
                out.push((w[1].0, w[0].1));
            }
            out.extend(points.last());
            out
        } else {
            points.clone()
        };
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(design.name())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xc0, 0xc0, 0xc0))
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn per_second(run: &Run, f: impl Fn(&super::load::Second) -> Option<f64>) -> Vec<(f64, f64)> {
    run.seconds
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(t, s)| f(s).map(|y| (t as f64 + 0.5, y)))
        .collect()
}

/// Writes the experiment's figures into `dir`.
/// With `chromium`, each SVG also as PNG.
pub fn write(
    dir: &Path,
    exp: Experiment,
    runs: &[Run],
    chromium: Option<&Path>,
) -> anyhow::Result<()> {
    let x_max = runs.iter().map(|r| r.seconds.len()).max().unwrap_or(1) as f64;
    let tput: Vec<_> = runs
        .iter()
        .map(|r| (r.design, per_second(r, |s| Some(s.ops as f64)), false))
        .collect();
    let top = tput
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.15;
    let p99: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.design,
                per_second(r, |s| {
                    (!s.latency.is_empty())
                        .then(|| (s.latency.value_at_quantile(0.99).max(1) as f64 / 1000.0).log10())
                }),
                false,
            )
        })
        .collect();
    let (lo, hi) = p99
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    } else {
        (-1.0, 1.0)
    };
    let hits: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.design,
                per_second(r, |s| (s.gets >= 10).then(|| s.hits as f64 / s.gets as f64)),
                false,
            )
        })
        .collect();
    let hit_lo = hits
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::min);
    let hit_lo = ((hit_lo - 0.05) * 10.0).floor().max(0.0) / 10.0;
    let panels = [
        Panel {
            title: "throughput (completed requests per second)",
            y: 0.0..top,
            y_label: |y| format!("{y:.0}"),
            lines: tput,
            thresholds: Vec::new(),
        },
        Panel {
            title: "p99 latency (ms, from the scheduled send; log scale)",
            y: lo..hi,
            y_label: |y| {
                let ms = 10f64.powf(y);
                if ms < 1.0 {
                    format!("{ms:.2}")
                } else {
                    format!("{ms:.0}")
                }
            },
            lines: p99,
            thresholds: Vec::new(),
        },
        Panel {
            title: "hit rate (per second)",
            y: hit_lo..1.0,
            y_label: |y| format!("{y:.2}"),
            lines: hits,
            thresholds: Vec::new(),
        },
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, PANEL * 3 + 30)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let root = root
            .titled(
                &format!(
                    "{} — solid line: resize asked, dashed: resize done",
                    exp.title()
                ),
                ("sans-serif", 17),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let areas = root.split_evenly((3, 1));
        for (area, panel) in areas.iter().zip(&panels) {
            draw(area, x_max, runs, panel)?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let path = dir.join(format!("{}.svg", exp.slug()));
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    png(chromium, &path, WIDTH, PANEL * 3 + 30)?;
    if exp.is_auto() {
        write_scaling(dir, exp, runs, x_max, chromium)?;
    }
    Ok(())
}

/// Renders `svg` to a PNG beside it with headless Chromium, if `chromium` can be started.
fn png(chromium: Option<&Path>, svg: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    let Some(chromium) = chromium else {
        return Ok(());
    };
    let svg = std::fs::canonicalize(svg)?;
    let out = svg.with_extension("png");
    let result = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
        ])
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", out.display()))
        .arg(format!("file://{}", svg.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match result {
        Ok(status) if status.success() && out.exists() => Ok(()),
        Ok(status) => anyhow::bail!(
            "{} could not render {} ({status})",
            chromium.display(),
            svg.display()
        ),
        Err(e) => {
            eprintln!(
                "no PNG for {}: cannot start {} ({e}); the SVG is written",
                svg.display(),
                chromium.display()
            );
            Ok(())
        }
    }
}

fn write_scaling(
    dir: &Path,
    exp: Experiment,
    runs: &[Run],
    x_max: f64,
    chromium: Option<&Path>,
) -> anyhow::Result<()> {
    let nodes: Vec<_> = runs
        .iter()
        .map(|r| {
            let mut pts = vec![(0.0, f64::from(r.state.first().map_or(1, |s| s.0)))];
            let mut size = pts[0].1;
            for rz in &r.resizes {
                pts.push((rz.switched, size));
                size = f64::from(rz.to);
                pts.push((rz.switched, size));
            }
            pts.push((x_max, size));
            (r.design, pts, false)
        })
        .collect();
    let top = nodes
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|(_, y)| *y))
        .fold(2.0, f64::max)
        + 1.0;
    let miss: Vec<_> = runs
        .iter()
        .map(|r| {
            (
                r.design,
                r.windows
                    .iter()
                    .filter(|w| w.gets > 0)
                    .map(|w| (w.end, w.miss_rate()))
                    .collect(),
                true,
            )
        })
        .collect();
    let panels = [
        Panel {
            title: "pool size (nodes serving)",
            y: 0.0..top,
            y_label: |y| format!("{y:.0}"),
            lines: nodes,
            thresholds: Vec::new(),
        },
        Panel {
            title: "miss rate per autoscaler window (steps at each window's end)",
            y: 0.0..1.0,
            y_label: |y| format!("{y:.1}"),
            lines: miss,
            thresholds: vec![
                (0.4, "maxMissRate 0.4: grow"),
                (0.1, "minMissRate 0.1: shrink"),
            ],
        },
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, PANEL * 2 + 30)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let root = root
            .titled(
                &format!("{} — nodes and miss rate", exp.title()),
                ("sans-serif", 17),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let areas = root.split_evenly((2, 1));
        for (area, panel) in areas.iter().zip(&panels) {
            draw(area, x_max, runs, panel)?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let path = dir.join(format!("{}-scaling.svg", exp.slug()));
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    png(chromium, &path, WIDTH, PANEL * 2 + 30)
}
