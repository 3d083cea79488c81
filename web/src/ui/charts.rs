//! The dashboard's six charts, drawn server-side as SVG with `plotters`.
//!
//! Server-side SVG keeps the page free of a charting script (the CSP allows only our own
//! static script) and makes a chart a plain string the refresh endpoint can ship. plotters is
//! built without its `ttf` feature: its SVG backend writes text as `<text>` elements and
//! estimates label widths itself, which is all an SVG needs (the browser lays the text out).
//! The x axis is minutes before now (−30 … 0), one point per minute of the operator's history.

use plotters::prelude::*;

use super::forms::human_size;
use super::operator::HistoryPoint;

/// Minutes the charts cover.
pub const WINDOW_MINUTES: u32 = 30;
const WIDTH: u32 = 360;
const HEIGHT: u32 = 180;
const LINE: RGBColor = RGBColor(0x1f, 0x5f, 0xa8);

/// One chart of the dashboard.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Chart {
    /// The element id (the page contract's `chart-…`).
    pub id: &'static str,
    pub title: &'static str,
    /// The newest point's value as a plain number; empty without points.
    pub latest: String,
    /// The newest value for people (`12.3 KiB`, `38 %`).
    pub latest_label: String,
    /// The chart, an SVG document.
    pub svg: String,
}

/// Which value of a point a chart shows.
struct Metric {
    id: &'static str,
    title: &'static str,
    value: fn(&HistoryPoint) -> Option<f64>,
    label: fn(f64) -> String,
    /// The y axis always reaches at least this far (rates: 1; counts: 4, so that an idle
    /// pool's axis has whole-number labels).
    floor: f64,
}

const METRICS: [Metric; 6] = [
    Metric {
        id: "chart-nodes",
        title: "Nodes",
        value: |p| Some(f64::from(p.nodes)),
        label: |v| format!("{v:.0}"),
        floor: 4.0,
    },
    Metric {
        id: "chart-miss-rate",
        title: "Miss rate",
        value: |p| p.miss_rate,
        label: |v| format!("{:.1} %", v * 100.0),
        floor: 1.0,
    },
    Metric {
        id: "chart-hit-rate",
        title: "Hit rate",
        value: |p| p.hit_rate,
        label: |v| format!("{:.1} %", v * 100.0),
        floor: 1.0,
    },
    Metric {
        id: "chart-items",
        title: "Items",
        value: |p| Some(p.items as f64),
        label: |v| format!("{v:.0}"),
        floor: 4.0,
    },
    Metric {
        id: "chart-bytes",
        title: "Bytes",
        value: |p| Some(p.bytes as f64),
        // A rounded display value: truncation is what is wanted.
        label: |v| human_size(v.max(0.0) as u64),
        floor: 1024.0,
    },
    Metric {
        id: "chart-requests",
        title: "Requests per minute",
        value: |p| Some(p.requests_per_minute),
        label: |v| format!("{v:.0}"),
        floor: 4.0,
    },
];

/// The six charts of `history` (oldest first), placed against `now` (Unix seconds).
pub fn charts(history: &[HistoryPoint], now: i64) -> Vec<Chart> {
    let placed: Vec<(f64, &HistoryPoint)> = history
        .iter()
        .filter_map(|p| {
            let t = p.t;
            let minutes = (t.as_second() - now) as f64 / 60.0;
            (minutes >= -f64::from(WINDOW_MINUTES) - 1.0).then_some((minutes, p))
        })
        .collect();
    METRICS
        .iter()
        .map(|m| {
            let points: Vec<(f64, f64)> = placed
                .iter()
                .filter_map(|(x, p)| (m.value)(p).map(|y| (*x, y)))
                .collect();
            let latest = points.last().map(|(_, y)| *y);
            Chart {
                id: m.id,
                title: m.title,
                latest: latest.map(plain_number).unwrap_or_default(),
                latest_label: latest.map(m.label).unwrap_or_else(|| "—".to_owned()),
                svg: render(m.title, &points, m.floor, m.label).unwrap_or_else(|e| {
                    tracing::warn!(chart = m.id, error = %e, "drawing a chart failed");
                    String::new()
                }),
            }
        })
        .collect()
}

/// A number as `data-latest` carries it: no exponent, no needless fraction.
pub fn plain_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// One chart as an SVG document: an area under a line, minutes on x, the value on y.
pub fn render(
    title: &str,
    points: &[(f64, f64)],
    floor: f64,
    label: fn(f64) -> String,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let top = points
            .iter()
            .map(|(_, y)| *y)
            .fold(floor, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.1;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(58)
            .build_cartesian_2d(-f64::from(WINDOW_MINUTES)..0.0, 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(7)
            .y_labels(5)
            .x_label_formatter(&|x| format!("{x:.0}m"))
            .y_label_formatter(&|y| label(*y))
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(0xe4, 0xe8, 0xee))
            .axis_style(RGBColor(0x9a, 0xa4, 0xb1))
            .label_style(
                ("sans-serif", 11)
                    .into_font()
                    .color(&RGBColor(0x4a, 0x55, 0x68)),
            )
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(AreaSeries::new(points.iter().copied(), 0.0, LINE.mix(0.15)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                LINE.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 2, LINE.filled())))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    // The document names itself for screen readers; the title is ours, not the visitor's.
    Ok(svg.replacen(
        "<svg ",
        &format!("<svg role=\"img\" aria-label=\"{title}\" "),
        1,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: &str, nodes: u32, miss: Option<f64>) -> HistoryPoint {
        HistoryPoint {
            t: t.parse().unwrap(),
            nodes,
            miss_rate: miss,
            hit_rate: miss.map(|m| 1.0 - m),
            items: 10,
            bytes: 2048,
            requests_per_minute: 600.0,
        }
    }

    #[test]
    fn six_charts_carry_the_newest_values() {
        let now: jiff::Timestamp = "2026-11-26T01:10:30Z".parse().unwrap();
        let history = [
            point("2026-11-26T01:08:00Z", 1, Some(0.5)),
            point("2026-11-26T01:09:00Z", 2, Some(0.25)),
            point("2026-11-26T01:10:00Z", 3, None),
        ];
        let charts = charts(&history, now.as_second());
        let ids: Vec<_> = charts.iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [
                "chart-nodes",
                "chart-miss-rate",
                "chart-hit-rate",
                "chart-items",
                "chart-bytes",
                "chart-requests"
            ]
        );
        assert_eq!(charts[0].latest, "3");
        // The last minute had no gets: the newest rate is the minute before.
        assert_eq!(charts[1].latest, "0.25");
        assert_eq!(charts[2].latest, "0.75");
        assert_eq!(charts[4].latest, "2048");
        assert_eq!(charts[4].latest_label, "2.0 KiB");
        for chart in &charts {
            assert!(chart.svg.starts_with("<svg role=\"img\""), "{}", chart.svg);
            assert!(chart.svg.trim_end().ends_with("</svg>"));
        }
    }

    #[test]
    fn chart_draws_one_marker_per_point_and_axis_labels() {
        let points = [(-3.0, 1.0), (-2.0, 2.0), (-1.0, 4.0)];
        let svg = render("Nodes", &points, 1.0, |v| format!("{v:.0}")).unwrap();
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        assert!(svg.contains("<polyline"), "a line through the points");
        assert!(svg.contains("\n-30m\n"), "x axis labels: {svg}");
        assert!(svg.contains("<text"));
        let empty = render("Nodes", &[], 1.0, |v| format!("{v:.0}")).unwrap();
        assert_eq!(empty.matches("<circle").count(), 0);
        let charts = charts(&[], 0);
        assert!(charts.iter().all(|c| c.latest.is_empty()));
    }

    #[test]
    fn plain_numbers() {
        assert_eq!(plain_number(3.0), "3");
        assert_eq!(plain_number(0.25), "0.25");
        assert_eq!(plain_number(1.0 / 3.0), "0.333333");
    }
}
