//! Experiments 4 and 5: the operator's own autoscaler (`cachepool_operator::autoscaler`,
//! through its public API and unchanged) deciding over the windows the bench measures, and
//! the naive rule it replaced, replayed on the same measurements.
//!
//! **Live.** Every `windowSeconds` the bench closes a window of the traffic's gets and misses
//! (marked not steady if a resize overlapped it), hands it to [`Autoscaler::decide`], performs
//! a `Scale` with the design's resize and reports [`Autoscaler::settled`] when it is done: the
//! operator's driver loop, with the bench's resize in place of the operator's.
//!
//! **Replay.** A rule's decisions change the pool, so a fixed series cannot be replayed as
//! it was measured. What is replayed is the miss rate each pool size showed in the live run:
//! the counted windows at each size (steady, begun after the pool settled there), in the order
//! measured. At each step a rule reads the next window measured at the size it has chosen
//! (cycling through them), exactly as it would have seen that size. Both the autoscaler and
//! the naive rule (same thresholds and ratios, no cooldown, no memory) are replayed this way,
//! so they see the same series.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cachepool_crds::pool::{AutoScalingSpec, ScalingMode, ScalingSpec};
use cachepool_operator::autoscaler::{Autoscaler, Decision, Window, grow_target, shrink_target};

/// The autoscaler settings of both experiments: the thresholds and ratios.
pub fn spec(start: u32, window_secs: u32, cooldown_secs: u32, min_requests: u64) -> ScalingSpec {
    ScalingSpec {
        mode: ScalingMode::Auto,
        replicas: start,
        min_replicas: 1,
        max_replicas: 8,
        auto: AutoScalingSpec {
            max_miss_rate: 0.4,
            min_miss_rate: 0.1,
            expand_ratio: 2.0,
            shrink_ratio: 0.5,
            window_seconds: window_secs,
            cooldown_seconds: cooldown_secs,
            min_requests_per_window: min_requests,
        },
    }
}

/// One closed window of the live run, with what the autoscaler made of it.
#[derive(Clone, Debug)]
pub struct WindowRow {
    /// Seconds since the experiment began, at the window's end.
    pub end: f64,
    pub length: f64,
    pub gets: u64,
    pub misses: u64,
    pub replicas: u32,
    pub steady: bool,
    /// Began after the pool last settled (the autoscaler counts it if it had enough traffic).
    pub after_settle: bool,
    /// `hold:<rule>` or `scale:<n>`.
    pub decision: String,
    pub reason: String,
}

impl WindowRow {
    pub fn miss_rate(&self) -> f64 {
        if self.gets == 0 {
            f64::NAN
        } else {
            self.misses as f64 / self.gets as f64
        }
    }
}

/// The clock the autoscaler is given: the experiment's seconds after the Unix epoch.
pub fn at(secs: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0))
}

/// Asks `scaler` about one window; returns the row to record.
pub fn decide(
    scaler: &mut Autoscaler,
    spec: &ScalingSpec,
    mut row: WindowRow,
) -> (WindowRow, Option<u32>) {
    let window = Window {
        end: at(row.end),
        length: Duration::from_secs_f64(row.length),
        gets: row.gets,
        misses: row.misses,
        replicas: row.replicas,
        steady: row.steady,
    };
    let decision = scaler.decide(spec, &window);
    row.decision = match &decision {
        Decision::Hold { rule, .. } => format!("hold:{rule}"),
        Decision::Scale { replicas, .. } => format!("scale:{replicas}"),
    };
    row.reason = decision.reason().to_owned();
    (row, decision.replicas())
}

/// What a replayed rule did.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    /// Pool size at each step (before the step's decision).
    pub sizes: Vec<u32>,
    pub changes: u32,
    pub final_size: u32,
    /// Steps cut short because the rule chose a size the live run never measured.
    pub unmeasured: bool,
}

/// The counted windows of the live run, by pool size, in measured order.
pub fn series_by_size(rows: &[WindowRow], min_requests: u64) -> BTreeMap<u32, Vec<WindowRow>> {
    let mut by = BTreeMap::<u32, Vec<WindowRow>>::new();
    for r in rows {
        if r.steady && r.after_settle && r.gets >= min_requests.max(1) {
            by.entry(r.replicas).or_default().push(r.clone());
        }
    }
    by
}

/// The naive rule over the per-size series: each step, grow or shrink on that window alone.
pub fn replay_naive(
    series: &BTreeMap<u32, Vec<WindowRow>>,
    start: u32,
    steps: usize,
    spec: &ScalingSpec,
) -> Replay {
    replay(series, start, steps, |size, row| {
        let rate = row.miss_rate();
        let a = &spec.auto;
        let next = if rate > a.max_miss_rate {
            grow_target(size, a.expand_ratio)
        } else if rate < a.min_miss_rate {
            shrink_target(size, a.shrink_ratio)
        } else {
            size
        };
        next.clamp(spec.min_replicas, spec.max_replicas)
    })
}

/// The operator's autoscaler over the same per-size series: each step is one window, a scale
/// settles before the next window.
pub fn replay_autoscaler(
    series: &BTreeMap<u32, Vec<WindowRow>>,
    start: u32,
    steps: usize,
    spec: &ScalingSpec,
) -> Replay {
    let mut scaler = Autoscaler::new();
    let length = f64::from(spec.auto.window_seconds.max(1));
    let mut step = 0u32;
    scaler.settled(start, at(0.0));
    replay(series, start, steps, |size, row| {
        step += 1;
        // Windows are laid end to end after a settle at 0; a scale settles at once, so the
        // cooldown is counted in windows, as the live driver does.
        let end = f64::from(step) * length;
        let window = Window {
            end: at(end),
            length: Duration::from_secs_f64(length),
            gets: row.gets,
            misses: row.misses,
            replicas: size,
            steady: true,
        };
        match scaler.decide(spec, &window).replicas() {
            Some(next) => {
                scaler.settled(next, at(end));
                next
            }
            None => size,
        }
    })
}

fn replay(
    series: &BTreeMap<u32, Vec<WindowRow>>,
    start: u32,
    steps: usize,
    mut rule: impl FnMut(u32, &WindowRow) -> u32,
) -> Replay {
    let mut used = BTreeMap::<u32, usize>::new();
    let mut size = start;
    let mut out = Replay {
        sizes: Vec::new(),
        changes: 0,
        final_size: start,
        unmeasured: false,
    };
    for _ in 0..steps {
        let Some(rows) = series.get(&size).filter(|r| !r.is_empty()) else {
            out.unmeasured = true;
            break;
        };
        let n = used.entry(size).or_default();
        let row = &rows[*n % rows.len()];
        *n += 1;
        out.sizes.push(size);
        let next = rule(size, row);
        if next != size {
            out.changes += 1;
            size = next;
        }
    }
    out.final_size = size;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(replicas: u32, miss: u64) -> WindowRow {
        WindowRow {
            end: 0.0,
            length: 2.0,
            gets: 1000,
            misses: miss,
            replicas,
            steady: true,
            after_settle: true,
            decision: String::new(),
            reason: String::new(),
        }
    }

    #[test]
    fn naive_rule_flaps_where_the_autoscaler_settles() {
        // Above the maximum at 1 node, below the minimum at 2: the experiment 5.
        let rows = vec![row(2, 20), row(1, 500), row(2, 30)];
        let spec = spec(2, 2, 2, 100);
        let series = series_by_size(&rows, 100);
        let naive = replay_naive(&series, 2, 20, &spec);
        assert!(naive.changes >= 10, "{naive:?}");
        let auto = replay_autoscaler(&series, 2, 20, &spec);
        assert!(auto.changes <= 2, "{auto:?}");
        assert_eq!(auto.final_size, 2);
    }
}
