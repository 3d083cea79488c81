//! Figures of a run: the per-phase numbers of the tables, the CSV files and `summary.md`.
//!
//! Phases: *before* is from second 1 (the first second is partial) to the first resize being
//! asked for; *during* from then to the last resize being done; *after* from the second after
//! that to the end. Experiment 1 has no resize: its halves stand in for before and after.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use super::load::Second;
use super::{Experiment, Run, Settings};

/// Seconds `[from, to)` of a run, clamped to what it has.
fn span(run: &Run, from: f64, to: f64) -> std::ops::Range<usize> {
    let n = run.seconds.len();
    let a = (from.max(0.0).floor() as usize).min(n);
    let b = (to.max(0.0).ceil() as usize).clamp(a, n);
    a..b
}

/// The three phases as second ranges.
pub fn phases(run: &Run) -> [std::ops::Range<usize>; 3] {
    let n = run.seconds.len() as f64;
    match (run.resizes.first(), run.resizes.last()) {
        (Some(first), Some(last)) => [
            span(run, 1.0, first.asked.floor()),
            span(run, first.asked.floor(), last.done.ceil()),
            span(run, last.done.ceil(), n),
        ],
        _ => [span(run, 1.0, n / 2.0), 0..0, span(run, n / 2.0, n)],
    }
}

/// Completed requests per second over `range`.
pub fn throughput(run: &Run, range: &std::ops::Range<usize>) -> f64 {
    if range.is_empty() {
        return f64::NAN;
    }
    let ops: u64 = run.seconds[range.clone()].iter().map(|s| s.ops).sum();
    ops as f64 / range.len() as f64
}

/// A latency quantile in milliseconds over `range`.
pub fn quantile_ms(run: &Run, range: &std::ops::Range<usize>, q: f64) -> f64 {
    let mut merged: Option<Histogram<u64>> = None;
    for s in &run.seconds[range.clone()] {
        match &mut merged {
            Some(h) => {
                let _ = h.add(&s.latency);
            }
            None => merged = Some(s.latency.clone()),
        }
    }
    merged
        .filter(|h| !h.is_empty())
        .map_or(f64::NAN, |h| h.value_at_quantile(q) as f64 / 1000.0)
}

fn hit_rate(s: &Second) -> Option<f64> {
    (s.gets >= 10).then(|| s.hits as f64 / s.gets as f64)
}

/// Hit rate over `range`.
pub fn hit_rate_over(run: &Run, range: &std::ops::Range<usize>) -> f64 {
    let (g, h) = run.seconds[range.clone()]
        .iter()
        .fold((0, 0), |(g, h), s| (g + s.gets, h + s.hits));
    if g == 0 {
        f64::NAN
    } else {
        h as f64 / g as f64
    }
}

/// The worst 1-second hit rate from second 1 on.
pub fn worst_hit_rate(run: &Run) -> f64 {
    run.seconds
        .iter()
        .skip(1)
        .filter_map(hit_rate)
        .fold(f64::NAN, f64::min)
}

/// Seconds from the first resize being asked for until the hit rate is back within one
/// point of its level before, for three seconds in a row; 0 when it never left that band,
/// None when it did not come back within the run.
pub fn recovery_secs(run: &Run) -> Option<f64> {
    let first = run.resizes.first()?;
    let [before, ..] = phases(run);
    let base = hit_rate_over(run, &before);
    let from = first.asked.floor() as usize;
    let ok = |s: &Second| hit_rate(s).is_none_or(|h| h >= base - 0.01);
    let secs = &run.seconds;
    if secs[from.min(secs.len())..].iter().all(ok) {
        return Some(0.0);
    }
    (from..secs.len().saturating_sub(2))
        .find(|&t| secs[t..t + 3].iter().all(ok))
        .map(|t| (t as f64 - first.asked).max(0.0))
}

/// Totals over the whole run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub ops: u64,
    pub gets: u64,
    pub hits: u64,
    pub stale: u64,
    pub corrupt: u64,
    pub lost: u64,
    pub errors: u64,
    pub skipped: u64,
}

pub fn totals(run: &Run) -> Totals {
    run.seconds.iter().fold(Totals::default(), |t, s| Totals {
        ops: t.ops + s.ops,
        gets: t.gets + s.gets,
        hits: t.hits + s.hits,
        stale: t.stale + s.stale,
        corrupt: t.corrupt + s.corrupt,
        lost: t.lost + s.lost,
        errors: t.errors + s.errors,
        skipped: t.skipped + s.skipped,
    })
}

/// Probes and lost probes summed over the run's layout changes.
pub fn probe_loss(run: &Run) -> (u64, u64) {
    run.probes
        .iter()
        .fold((0, 0), |(p, l), &(_, pp, ll)| (p + pp, l + ll))
}

pub fn one_line(run: &Run) -> String {
    let t = totals(run);
    let [b, d, a] = phases(run);
    let (p, l) = probe_loss(run);
    format!(
        "{} ops/s before/during/after {:.0}/{:.0}/{:.0}, p99 ms {:.2}/{:.2}/{:.2}, hits {:.3}, \
         worst 1-s hit rate {:.3}, stale {}, lost {}, probes {p} lost {l}, resizes {}, final size {}",
        t.ops,
        throughput(run, &b),
        throughput(run, &d),
        throughput(run, &a),
        quantile_ms(run, &b, 0.99),
        quantile_ms(run, &d, 0.99),
        quantile_ms(run, &a, 0.99),
        t.hits as f64 / t.gets.max(1) as f64,
        worst_hit_rate(run),
        t.stale,
        t.lost,
        run.resizes.len(),
        run.final_size,
    )
}

/// `<slug>.csv` (per second), `<slug>-resizes.csv`, and for 4-5 `<slug>-windows.csv`.
pub fn write_files(dir: &Path, exp: Experiment, runs: &[Run]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "design,second,ops,gets,hits,hit_rate,p50_ms,p99_ms,p999_ms,max_ms,writes,stale,lost,errors,nodes,layout,keys_moved\n",
    );
    for run in runs {
        for (t, s) in run.seconds.iter().enumerate() {
            let (nodes, layout, moved) = run.state.get(t).copied().unwrap_or_default();
            let q = |q: f64| s.latency.value_at_quantile(q) as f64 / 1000.0;
            let _ = writeln!(
                csv,
                "{},{t},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{nodes},{layout},{moved}",
                run.design.name(),
                s.ops,
                s.gets,
                s.hits,
                hit_rate(s).map_or(String::new(), |h| format!("{h:.4}")),
                q(0.5),
                q(0.99),
                q(0.999),
                s.latency.max() as f64 / 1000.0,
                s.writes,
                s.stale,
                s.lost,
                s.errors,
            );
        }
    }
    std::fs::write(dir.join(format!("{}.csv", exp.slug())), csv)?;
    let mut rz = String::from(
        "design,from,to,asked_s,switched_s,done_s,keys_moved,jump_hash_ideal,probes,probes_missed\n",
    );
    for run in runs {
        for r in &run.resizes {
            let (p, l) = run
                .probes
                .iter()
                .find(|(layout, ..)| *layout == r.layout)
                .map_or((0, 0), |&(_, p, l)| (p, l));
            let _ = writeln!(
                rz,
                "{},{},{},{:.2},{:.2},{:.2},{},{},{p},{l}",
                run.design.name(),
                r.from,
                r.to,
                r.asked,
                r.switched,
                r.done,
                r.keys_moved,
                r.ideal
            );
        }
    }
    std::fs::write(dir.join(format!("{}-resizes.csv", exp.slug())), rz)?;
    if exp.is_auto() {
        let mut w =
            String::from("design,end_s,length_s,gets,misses,miss_rate,replicas,steady,decision\n");
        for run in runs {
            for r in &run.windows {
                let _ = writeln!(
                    w,
                    "{},{:.2},{:.2},{},{},{:.4},{},{},{}",
                    run.design.name(),
                    r.end,
                    r.length,
                    r.gets,
                    r.misses,
                    r.miss_rate(),
                    r.replicas,
                    r.steady,
                    r.decision
                );
            }
        }
        std::fs::write(dir.join(format!("{}-windows.csv", exp.slug())), w)?;
    }
    Ok(())
}

fn f(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.digits$}")
    }
}

/// The tables of docs/results.md.
pub fn markdown(settings: &Settings, all: &[(Experiment, Vec<Run>)]) -> String {
    let mut out = format!(
        "Settings: {} requests/s open loop, {:.0} % reads, {} keys, values {}..{} B, \
         experiments 1-3 {} s with key popularity {}, experiments 4-5 {} s with uniform keys, \
         autoscaler window {} s and cooldown {} s, seed {}.\n\n",
        settings.rate,
        settings.read_ratio * 100.0,
        settings.keys,
        settings.min_value,
        settings.max_value,
        settings.secs,
        settings.dist,
        settings.auto_secs,
        settings.window_secs,
        settings.cooldown_secs,
        settings.seed,
    );
    for (exp, runs) in all {
        let _ = writeln!(out, "### {}\n", exp.title());
        let _ = writeln!(
            out,
            "| design | node MiB | ops/s before / during / after | p99 ms before / during / after | \
             worst 1-s hit rate | recovery s | keys moved (jump-hash ideal) | stale reads | lost hits | \
             first reads after a resize that missed | size changes | final size |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for run in runs {
            let [b, d, a] = phases(run);
            let t = totals(run);
            let (p, l) = probe_loss(run);
            let moved: u64 = run.resizes.iter().map(|r| r.keys_moved).sum();
            let ideal: u64 = run.resizes.iter().map(|r| r.ideal).sum();
            let recovery = if run.resizes.is_empty() {
                "-".to_string()
            } else {
                recovery_secs(run).map_or("not in run".into(), |s| f(s, 0))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} / {} / {} | {} / {} / {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                run.design.name(),
                run.capacity_mib,
                f(throughput(run, &b), 0),
                f(throughput(run, &d), 0),
                f(throughput(run, &a), 0),
                f(quantile_ms(run, &b, 0.99), 2),
                f(quantile_ms(run, &d, 0.99), 2),
                f(quantile_ms(run, &a, 0.99), 2),
                f(worst_hit_rate(run), 3),
                recovery,
                moved,
                ideal,
                t.stale,
                if exp.is_auto() {
                    "n/a (evictions)".to_string()
                } else {
                    t.lost.to_string()
                },
                if p == 0 {
                    "-".to_string()
                } else {
                    format!("{l} of {p} ({:.1} %)", 100.0 * l as f64 / p as f64)
                },
                run.resizes.len(),
                run.final_size,
            );
        }
        if exp.is_auto() {
            let _ = writeln!(out);
            for run in runs {
                if let Some((naive, auto)) = &run.replay {
                    let _ = writeln!(
                        out,
                        "Replay on the {} run's per-size series ({} steps): autoscaler {} size changes, final {}; naive rule {} size changes, final {}{}.",
                        run.design.name(),
                        naive.sizes.len().max(auto.sizes.len()),
                        auto.changes,
                        auto.final_size,
                        naive.changes,
                        naive.final_size,
                        if naive.unmeasured || auto.unmeasured {
                            " (a rule reached a size the run never measured; its replay stops there)"
                        } else {
                            ""
                        },
                    );
                }
            }
        }
        let _ = writeln!(out);
    }
    out
}
