use std::time::UNIX_EPOCH;

use cachepool_crds::pool::CachePoolStatus;

use super::*;

mod sim;

/// Seconds after an arbitrary fixed instant.
fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// Auto mode with the documented defaults: windows of 60 s, cooldown 120 s, thresholds
/// 0.10 / 0.40, ratios 2 / 0.5, at least 100 requests, 1..=8 nodes.
fn auto_spec() -> ScalingSpec {
    ScalingSpec {
        mode: ScalingMode::Auto,
        ..ScalingSpec::default()
    }
}

/// A steady 60 s window ending at `end` seconds.
fn window(end: u64, replicas: u32, gets: u64, misses: u64) -> Window {
    Window {
        end: at(end),
        length: Duration::from_secs(60),
        gets,
        misses,
        replicas,
        steady: true,
    }
}

fn assert_hold(decision: &Decision, words: &str) {
    match decision {
        Decision::Hold { reason, .. } => assert!(
            reason.contains(words),
            "hold reason {reason:?} should mention {words:?}"
        ),
        other => panic!("expected a hold mentioning {words:?}, got {other:?}"),
    }
}

fn assert_scale(decision: &Decision, replicas: u32) {
    assert_eq!(
        decision.replicas(),
        Some(replicas),
        "expected a scale to {replicas}, got {decision:?}"
    );
}

/// A scale the harness performed.
#[derive(Debug)]
struct ScaleAt {
    window: usize,
    from: u32,
    to: u32,
    reason: String,
}

/// The pool driver around the autoscaler, with no pool: windows of the spec's length follow
/// each other, a scale is performed during the next window (which is therefore not steady)
/// and settles `migration` after that window starts.
struct Harness {
    scaler: Autoscaler,
    spec: ScalingSpec,
    now: SystemTime,
    size: u32,
    resizing_to: Option<u32>,
    migration: Duration,
    windows: usize,
    scales: Vec<ScaleAt>,
    decisions: Vec<Decision>,
    last: Option<Decision>,
    /// End of the window that decided the last scale (the driver's `lastScaleTime`).
    last_scale_at: Option<SystemTime>,
}

impl Harness {
    fn new(spec: ScalingSpec, size: u32) -> Self {
        let mut scaler = Autoscaler::new();
        scaler.settled(size, at(0));
        Self {
            scaler,
            spec,
            now: at(0),
            size,
            resizing_to: None,
            migration: Duration::from_secs(10),
            windows: 0,
            scales: Vec::new(),
            decisions: Vec::new(),
            last: None,
            last_scale_at: None,
        }
    }

    /// One window; `load` gives (gets, misses) for the size the window runs at.
    fn step_with(&mut self, load: impl FnOnce(u32) -> (u64, u64)) -> Decision {
        let length = Duration::from_secs(u64::from(self.spec.auto.window_seconds));
        let start = self.now;
        let mut steady = true;
        if let Some(to) = self.resizing_to.take() {
            self.size = to;
            steady = false;
            self.scaler.settled(to, start + self.migration);
        }
        let (gets, misses) = load(self.size);
        let window = Window {
            end: start + length,
            length,
            gets,
            misses,
            replicas: self.size,
            steady,
        };
        self.now = window.end;
        let decision = self.scaler.decide(&self.spec, &window);
        if let Decision::Scale { replicas, reason } = &decision {
            let (min, max) = (self.spec.min_replicas, self.spec.max_replicas);
            assert!(
                (min..=max).contains(replicas),
                "{replicas} outside [{min}, {max}]"
            );
            self.scales.push(ScaleAt {
                window: self.windows,
                from: self.size,
                to: *replicas,
                reason: reason.clone(),
            });
            self.resizing_to = Some(*replicas);
            self.last_scale_at = Some(window.end);
        }
        self.windows += 1;
        self.decisions.push(decision.clone());
        self.last = Some(decision.clone());
        decision
    }

    /// `windows` windows of a load model: size -> (gets, miss rate).
    fn run(&mut self, windows: usize, model: impl Fn(u32) -> (u64, f64)) {
        for _ in 0..windows {
            self.step_with(|size| {
                let (gets, rate) = model(size);
                (gets, (gets as f64 * rate).round() as u64)
            });
        }
    }

    fn holds(&self) -> impl Iterator<Item = &str> {
        self.decisions.iter().filter_map(|d| match d {
            Decision::Hold { reason, .. } => Some(reason.as_str()),
            Decision::Scale { .. } => None,
        })
    }

    fn moves(&self) -> Vec<(u32, u32)> {
        self.scales.iter().map(|s| (s.from, s.to)).collect()
    }
}

#[test]
fn grows_within_one_window_of_a_high_miss_rate() {
    let mut scaler = Autoscaler::new();
    let decision = scaler.decide(&auto_spec(), &window(60, 2, 1000, 620));
    assert_eq!(
        decision,
        Decision::Scale {
            replicas: 4,
            reason: "miss rate 0.62 > maxMissRate 0.40 over 60 s: 2 -> 4 nodes".to_owned()
        }
    );
    let event = scaler.last_scale().expect("recorded");
    assert_eq!((event.at, event.from, event.to), (at(60), 2, 4));
    assert_eq!(event.miss_rate, Some(0.62));
    assert_eq!(event.requests_per_second, Some(1000.0 / 60.0));
}

#[test]
fn shrinks_by_the_ratio_when_the_miss_rate_is_low() {
    let mut scaler = Autoscaler::new();
    let decision = scaler.decide(&auto_spec(), &window(60, 6, 1000, 20));
    assert_eq!(
        decision,
        Decision::Scale {
            replicas: 3,
            reason: "miss rate 0.02 < minMissRate 0.10 over 60 s: 6 -> 3 nodes".to_owned()
        }
    );
}

#[test]
fn a_miss_rate_exactly_at_a_threshold_does_not_scale() {
    let spec = auto_spec();
    for (misses, expected) in [(400, None), (100, None), (401, Some(4)), (99, Some(1))] {
        let decision = Autoscaler::new().decide(&spec, &window(60, 2, 1000, misses));
        assert_eq!(decision.replicas(), expected, "{misses}/1000: {decision:?}");
    }
    assert_hold(
        &Autoscaler::new().decide(&spec, &window(60, 2, 1000, 400)),
        "miss rate 0.40 within [minMissRate 0.10, maxMissRate 0.40]: keeping 2 nodes",
    );
}

#[test]
fn windows_with_too_few_requests_decide_nothing() {
    let mut h = Harness::new(auto_spec(), 1);
    h.run(20, |_| (99, 1.0));
    assert!(h.scales.is_empty(), "{:#?}", h.scales);
    assert_hold(
        h.last.as_ref().expect("ran"),
        "window had 99 requests (< 100)",
    );
    assert_scale(&h.step_with(|_| (100, 100)), 2);
}

#[test]
fn empty_and_inconsistent_windows_decide_nothing() {
    let mut spec = auto_spec();
    spec.auto.min_requests_per_window = 0;
    let mut scaler = Autoscaler::new();
    assert_hold(&scaler.decide(&spec, &window(60, 2, 0, 0)), "no requests");
    assert_hold(
        &scaler.decide(&spec, &window(120, 2, 10, 12)),
        "12 misses for 10 gets",
    );
    let mut instant = window(180, 2, 1000, 900);
    instant.length = Duration::ZERO;
    assert_hold(&scaler.decide(&spec, &instant), "zero length");
    assert!(scaler.last_scale().is_none());
}

#[test]
fn shrink_waits_for_the_cooldown_counted_from_when_the_pool_settled() {
    let spec = auto_spec();
    let mut scaler = Autoscaler::new();
    assert_scale(&scaler.decide(&spec, &window(60, 4, 1000, 900)), 8);
    // The migration takes five minutes; 120 s after the decision means nothing.
    let mut migrating = window(180, 4, 1000, 10);
    migrating.steady = false;
    assert_hold(
        &scaler.decide(&spec, &migrating),
        "waiting for the pool to settle at 8 nodes",
    );
    scaler.settled(8, at(400));
    // Ends at the settle, so began before it. Half the load of the grow from four nodes, so
    // that four nodes do not count as too small (see the oscillation tests).
    assert_hold(
        &scaler.decide(&spec, &window(400, 8, 500, 10)),
        "began 60 s before the pool settled at 8 nodes",
    );
    assert_hold(
        &scaler.decide(&spec, &window(460, 8, 500, 10)),
        "cooldown: 60 s left since the pool settled at 8 nodes",
    );
    assert_hold(
        &scaler.decide(&spec, &window(519, 8, 500, 10)),
        "cooldown: 1 s left",
    );
    assert_scale(&scaler.decide(&spec, &window(520, 8, 500, 10)), 4);
}

#[test]
fn windows_overlapping_a_resize_are_not_counted() {
    let spec = auto_spec();
    let mut scaler = Autoscaler::new();
    scaler.settled(2, at(0));
    let mut replacing = window(120, 2, 5000, 4900);
    replacing.steady = false;
    assert_hold(&scaler.decide(&spec, &replacing), "overlaps a resize");
    // A replacement settles at the same size: later windows count, earlier ones do not.
    scaler.settled(2, at(130));
    assert_hold(
        &scaler.decide(&spec, &window(180, 2, 5000, 4900)),
        "began 10 s before the pool settled",
    );
    assert!(scaler.last_scale().is_none());
    // A replacement starts no cooldown.
    assert_scale(&scaler.decide(&spec, &window(190, 2, 5000, 4900)), 4);
}

#[test]
fn nothing_is_decided_until_a_scale_settles() {
    let spec = auto_spec();
    let mut scaler = Autoscaler::new();
    assert_scale(&scaler.decide(&spec, &window(60, 2, 1000, 900)), 4);
    // The driver has not even started: still two nodes, steady.
    for end in [120, 180, 240] {
        assert_hold(
            &scaler.decide(&spec, &window(end, 2, 1000, 900)),
            "waiting for the pool to settle at 4 nodes (now 2)",
        );
    }
    // No settled() report, but a steady window at 4 nodes proves it settled by its start,
    // and the cooldown runs from there.
    assert_hold(
        &scaler.decide(&spec, &window(300, 4, 1000, 900)),
        "cooldown: 60 s left",
    );
    assert_scale(&scaler.decide(&spec, &window(360, 4, 1000, 500)), 8);
}

#[test]
fn a_size_change_by_someone_else_starts_a_cooldown() {
    let spec = auto_spec();
    let mut scaler = Autoscaler::new();
    scaler.settled(2, at(0));
    assert_hold(&scaler.decide(&spec, &window(60, 2, 1000, 300)), "within");
    // A manual change to 3 nodes before switching to auto.
    scaler.settled(3, at(70));
    assert_hold(
        &scaler.decide(&spec, &window(130, 3, 1000, 900)),
        "cooldown: 60 s left since the pool settled at 3 nodes",
    );
    assert_scale(&scaler.decide(&spec, &window(190, 3, 1000, 900)), 6);
}

#[test]
fn a_helpful_grow_may_be_followed_by_another() {
    let mut spec = auto_spec();
    spec.max_replicas = 16;
    let mut h = Harness::new(spec, 1);
    h.run(12, |size| match size {
        1 => (1000, 0.9),
        2 => (1000, 0.7),
        4 => (1000, 0.5),
        _ => (1000, 0.2),
    });
    assert_eq!(h.moves(), [(1, 2), (2, 4), (4, 8)]);
    // Every grow as soon as the resize and the cooldown allow: decide, migrate, cool down.
    let at: Vec<usize> = h.scales.iter().map(|s| s.window).collect();
    assert_eq!(at, [0, 3, 6]);
}

#[test]
fn a_grow_that_did_not_help_is_not_repeated_before_the_backoff() {
    let mut spec = auto_spec();
    spec.max_replicas = 64;
    let mut h = Harness::new(spec, 1);
    // More memory changes nothing: 0.90 at any size.
    h.run(120, |_| (1000, 0.9));
    let at: Vec<usize> = h.scales.iter().map(|s| s.window).collect();
    assert_eq!(
        h.moves(),
        [(1, 2), (2, 4), (4, 8), (8, 16)],
        "grows at windows {at:?}"
    );
    // Each grow is judged 3 windows later (migration, cooldown); the back-off then is
    // max(10 windows, 5 cooldowns) = 600 s, then 1 200 s, then 2 400 s.
    assert_eq!(at, [0, 3 + 10, 16 + 20, 39 + 40]);
    let judged = h.decisions[3].reason();
    assert!(
        judged.contains(
            "the last grow (1 -> 2 nodes) only took it from 0.90 to 0.90 (needed 10 % lower): \
             more memory does not help this workload; no grow for another 10 min"
        ),
        "{judged}"
    );
}

#[test]
fn a_grow_that_did_not_help_leaves_no_size_marked_too_small() {
    let mut h = Harness::new(auto_spec(), 1);
    h.run(8, |_| (1000, 0.9));
    assert_eq!(h.moves(), [(1, 2)]);
    // The scan ends; the same traffic now hits. One node was never short of memory, so the
    // pool may shrink back at once (the naive mark would hold it at two nodes for a day).
    h.run(4, |_| (1000, 0.02));
    assert_eq!(h.moves(), [(1, 2), (2, 1)]);
}

#[test]
fn a_grow_is_not_judged_when_the_load_rose_meanwhile() {
    let mut h = Harness::new(auto_spec(), 1);
    // Twice the traffic at two nodes: the miss rate barely moves, but that says nothing
    // about whether memory helps.
    h.run(7, |size| (500 * u64::from(size), 0.85));
    assert_eq!(h.moves(), [(1, 2), (2, 4), (4, 8)]);
}

#[test]
fn the_grow_rule_scales_with_the_size_of_the_grow() {
    let mut spec = auto_spec();
    spec.max_replicas = 16;
    spec.auto.expand_ratio = 1.25;
    let mut h = Harness::new(spec, 8);
    // 8 -> 10 nodes is a third of a doubling: 0.60 -> 0.57 (5 % better) is enough.
    h.run(4, |size| match size {
        8 => (1000, 0.6),
        _ => (1000, 0.57),
    });
    assert_eq!(h.moves(), [(8, 10), (10, 13)]);
}

#[test]
fn one_and_two_nodes_do_not_flip_under_a_steady_load() {
    let mut h = Harness::new(auto_spec(), 1);
    // Above maxMissRate at one node, below minMissRate at two.
    h.run(
        40,
        |size| if size == 1 { (1000, 0.6) } else { (1000, 0.05) },
    );
    assert_eq!(h.moves(), [(1, 2)]);
    assert_eq!(h.scales[0].window, 0);
    assert_hold(
        h.last.as_ref().expect("ran"),
        "miss rate 0.05 < minMissRate 0.10, but 1 node proved too small (miss rate 0.60 at \
         16.7 req/s, 39 min ago) and the load is comparable (16.7 req/s): staying at 2 nodes",
    );
}

#[test]
fn a_much_lighter_load_may_shrink_below_a_size_that_proved_too_small() {
    let mut h = Harness::new(auto_spec(), 1);
    h.run(
        10,
        |size| if size == 1 { (1000, 0.6) } else { (1000, 0.05) },
    );
    // 690 requests is 69 % of the load that found one node too small.
    h.run(10, |size| if size == 1 { (690, 0.3) } else { (690, 0.05) });
    assert_eq!(h.moves(), [(1, 2), (2, 1)]);
    assert_hold(h.last.as_ref().expect("ran"), "within");
}

#[test]
fn a_shrink_stops_above_a_size_that_proved_too_small() {
    let mut h = Harness::new(auto_spec(), 4);
    h.run(
        20,
        |size| if size <= 4 { (1000, 0.5) } else { (1000, 0.05) },
    );
    assert_eq!(h.moves(), [(4, 8), (8, 5)]);
    assert!(
        h.scales[1].reason.ends_with(
            "8 -> 5 nodes (not 4: 4 nodes proved too small (miss rate 0.50 at 16.7 req/s, \
             3 min ago) and the load is comparable (16.7 req/s))"
        ),
        "{}",
        h.scales[1].reason
    );
    assert_hold(h.last.as_ref().expect("ran"), "staying at 5 nodes");
}

#[test]
fn a_size_that_proved_too_small_is_forgotten_after_a_day() {
    let mut h = Harness::new(auto_spec(), 1);
    // Two days and a bit of one-minute windows.
    h.run(2 * 1440 + 60, |size| {
        if size == 1 { (1000, 0.6) } else { (1000, 0.05) }
    });
    assert_eq!(h.moves(), [(1, 2), (2, 1), (1, 2), (2, 1), (1, 2)]);
    // The mark for one node is set by the window that grew (window 0, ending at minute 1):
    // the shrink comes with the first window a day after it.
    assert_eq!(h.scales[1].window, 1440);
}

#[test]
fn a_healthy_window_clears_the_marks_it_contradicts() {
    let mut spec = auto_spec();
    spec.auto.cooldown_seconds = 0;
    let mut scaler = Autoscaler::new();
    scaler.settled(2, at(0));
    assert_scale(&scaler.decide(&spec, &window(60, 2, 1000, 500)), 4);
    scaler.settled(4, at(60));
    // Two nodes proved too small: from four, the shrink stops at three.
    let mut marked = scaler.clone();
    assert_scale(&marked.decide(&spec, &window(120, 4, 1000, 20)), 3);
    // Someone brings the pool back to two nodes, where the same load is now healthy ...
    scaler.settled(2, at(120));
    assert_hold(&scaler.decide(&spec, &window(180, 2, 1000, 200)), "within");
    // ... so two nodes no longer count as too small.
    scaler.settled(4, at(180));
    assert_scale(&scaler.decide(&spec, &window(240, 4, 1000, 20)), 2);
}

#[test]
fn sizes_follow_the_ratios_with_exact_products() {
    assert_eq!(grow_target(10, 1.1), 11);
    assert_eq!(grow_target(3, 1.5), 5);
    assert_eq!(grow_target(5, 1.000_001), 6);
    assert_eq!(grow_target(1, 2.0), 2);
    assert_eq!(shrink_target(100, 0.29), 29);
    assert_eq!(shrink_target(10, 0.7), 7);
    assert_eq!(shrink_target(8, 0.999), 7);
    assert_eq!(shrink_target(1, 0.5), 0);
    assert_eq!(shrink_target(0, 0.5), 0);
    assert_eq!(grow_target(u32::MAX, 2.0), u32::MAX);
    assert_eq!(grow_target(7, f64::INFINITY), u32::MAX);
}

#[test]
fn bounds_hold_with_extreme_ratios() {
    let mut spec = auto_spec();
    spec.min_replicas = 2;
    spec.max_replicas = 9;
    spec.auto.expand_ratio = 1000.0;
    spec.auto.shrink_ratio = 0.001;
    spec.auto.cooldown_seconds = 0;
    let mut h = Harness::new(spec, 3);
    h.run(3, |_| (1000, 0.9));
    // Half the load, so that three nodes do not count as too small any more.
    h.run(3, |_| (500, 0.01));
    assert_eq!(h.moves(), [(3, 9), (9, 2)]);
    assert_hold(&h.decisions[2], "at scaling.maxReplicas (9)");
    assert_hold(h.last.as_ref().expect("ran"), "at scaling.minReplicas (2)");

    let mut spec = auto_spec();
    spec.max_replicas = 1000;
    spec.auto.expand_ratio = 1.000_001;
    spec.auto.shrink_ratio = 0.999_999;
    spec.auto.cooldown_seconds = 0;
    let mut h = Harness::new(spec, 500);
    h.run(2, |_| (1000, 0.9));
    h.run(4, |_| (500, 0.01));
    assert_eq!(h.moves(), [(500, 501), (501, 500), (500, 499)]);
}

#[test]
fn bounds_changes_take_effect_at_the_next_window() {
    let mut spec = auto_spec();
    let mut scaler = Autoscaler::new();
    assert_scale(&scaler.decide(&spec, &window(60, 3, 1000, 900)), 6);
    scaler.settled(6, at(100));
    // In the cooldown and without traffic, a lower maximum still applies at once.
    spec.max_replicas = 4;
    assert_eq!(
        scaler.decide(&spec, &window(160, 6, 0, 0)),
        Decision::Scale {
            replicas: 4,
            reason: "6 nodes is above scaling.maxReplicas 4: 6 -> 4 nodes".to_owned()
        }
    );
    scaler.settled(4, at(200));
    spec.min_replicas = 5;
    spec.max_replicas = 8;
    assert_eq!(
        scaler.decide(&spec, &window(260, 4, 3, 0)),
        Decision::Scale {
            replicas: 5,
            reason: "4 nodes is below scaling.minReplicas 5: 4 -> 5 nodes".to_owned()
        }
    );
    // A bound that moves under a scale in flight retargets it.
    spec.max_replicas = 3;
    spec.min_replicas = 1;
    assert_eq!(
        scaler.decide(&spec, &window(320, 4, 1000, 900)),
        Decision::Scale {
            replicas: 3,
            reason: "the pool is moving to 5 nodes, above scaling.maxReplicas 3: 3 nodes instead"
                .to_owned()
        }
    );
    assert_hold(
        &scaler.decide(&spec, &window(380, 4, 1000, 900)),
        "waiting for the pool to settle at 3 nodes",
    );
}

#[test]
fn bounds_changes_mid_run_keep_the_pool_inside_them() {
    let mut h = Harness::new(auto_spec(), 1);
    let model = |size: u32| {
        let miss = match size {
            1 => 0.9,
            2 => 0.7,
            3..=5 => 0.5,
            _ => 0.3,
        };
        (1000, miss)
    };
    h.run(10, model);
    assert_eq!(h.size, 8);
    h.spec.max_replicas = 5;
    h.run(1, model);
    assert_eq!(h.moves().last(), Some(&(8, 5)));
    h.run(10, model);
    h.spec.min_replicas = 7;
    h.spec.max_replicas = 10;
    h.run(1, model);
    assert_eq!(h.moves().last(), Some(&(5, 7)));
    h.run(10, model);
    assert!(h.scales.iter().all(|s| s.to <= 10));
    assert_eq!(
        h.size, 7,
        "healthy at 7 within the new bounds: {:#?}",
        h.scales
    );
}

#[test]
fn threshold_and_mode_changes_take_effect_at_the_next_window() {
    let mut spec = auto_spec();
    spec.auto.max_miss_rate = 0.6;
    let mut scaler = Autoscaler::new();
    assert_hold(&scaler.decide(&spec, &window(60, 2, 1000, 500)), "within");
    spec.auto.max_miss_rate = 0.4;
    assert_scale(&scaler.decide(&spec, &window(120, 2, 1000, 500)), 4);

    // Manual mode drops the scale in flight; back in auto, the next steady window decides.
    spec.mode = ScalingMode::Manual;
    spec.replicas = 2;
    assert_hold(
        &scaler.decide(&spec, &window(180, 2, 1000, 500)),
        "scaling.mode is manual: the pool keeps scaling.replicas = 2 nodes",
    );
    spec.mode = ScalingMode::Auto;
    assert_scale(&scaler.decide(&spec, &window(240, 2, 1000, 500)), 4);
}

#[test]
fn a_raised_max_miss_rate_releases_a_size_marked_too_small() {
    let mut h = Harness::new(auto_spec(), 1);
    h.run(6, |size| if size == 1 { (1000, 0.6) } else { (1000, 0.05) });
    assert_eq!(h.moves(), [(1, 2)]);
    h.spec.auto.max_miss_rate = 0.7;
    h.run(1, |_| (1000, 0.05));
    assert_eq!(h.moves(), [(1, 2), (2, 1)]);
}

#[test]
fn restore_honours_the_cooldown() {
    let spec = auto_spec();
    let mut scaler = Autoscaler::restore(Some(at(0)));
    assert_hold(
        &scaler.decide(&spec, &window(50, 2, 1000, 900)),
        "began 10 s before the pool settled",
    );
    assert_hold(
        &scaler.decide(&spec, &window(60, 2, 1000, 900)),
        "cooldown: 60 s left",
    );
    assert_hold(
        &scaler.decide(&spec, &window(119, 2, 1000, 900)),
        "cooldown: 1 s left",
    );
    assert_scale(&scaler.decide(&spec, &window(120, 2, 1000, 900)), 4);

    let mut fresh = Autoscaler::restore(None);
    assert_scale(&fresh.decide(&spec, &window(60, 2, 1000, 900)), 4);
}

#[test]
fn an_invalid_spec_changes_nothing() {
    let mut scaler = Autoscaler::new();
    let mut spec = auto_spec();
    spec.min_replicas = 5;
    spec.max_replicas = 2;
    assert_hold(
        &scaler.decide(&spec, &window(60, 9, 1000, 900)),
        "scaling.minReplicas: 5 exceeds scaling.maxReplicas (2)",
    );
    let mut spec = auto_spec();
    spec.auto.max_miss_rate = f64::NAN;
    assert_hold(
        &scaler.decide(&spec, &window(60, 2, 1000, 900)),
        "scaling.auto.maxMissRate",
    );
    let mut spec = auto_spec();
    spec.auto.expand_ratio = f64::NAN;
    assert_hold(
        &scaler.decide(&spec, &window(60, 2, 1000, 900)),
        "scaling.auto.expandRatio",
    );
    let mut spec = auto_spec();
    spec.min_replicas = 0;
    assert_hold(
        &scaler.decide(&spec, &window(60, 0, 1000, 900)),
        "scaling.minReplicas: must be at least 1",
    );
    assert!(scaler.last_scale().is_none());
}

#[test]
fn an_empty_pool_in_auto_mode_scales_to_the_minimum() {
    let mut spec = auto_spec();
    spec.min_replicas = 2;
    let mut scaler = Autoscaler::new();
    assert_eq!(
        scaler.decide(&spec, &window(60, 0, 0, 0)),
        Decision::Scale {
            replicas: 2,
            reason: "0 nodes is below scaling.minReplicas 2: 0 -> 2 nodes".to_owned()
        }
    );
}

#[test]
fn spans_read_like_a_status_line() {
    let show = |secs: f64| Span(Duration::from_secs_f64(secs)).to_string();
    assert_eq!(show(0.0), "0 s");
    assert_eq!(show(0.4), "1 s");
    assert_eq!(show(119.0), "119 s");
    assert_eq!(show(120.0), "2 min");
    assert_eq!(show(601.0), "11 min");
    assert_eq!(show(7200.0), "2 h");
}

/// The operator restarts between two windows: a new autoscaler is built from what the
/// driver keeps in the pool's status (`lastScaleTime` and `autoscaler`), through the JSON a
/// store or the API server holds. `with_memory: false` is the autoscaler before it kept its
/// memory, for contrast.
fn restart(h: &mut Harness, with_memory: bool) {
    let status = CachePoolStatus {
        last_scale_time: h.last_scale_at.map(time),
        autoscaler: h.scaler.memory().filter(|_| with_memory),
        ..CachePoolStatus::default()
    };
    let json = serde_json::to_string(&status).expect("status serializes");
    let stored: CachePoolStatus = serde_json::from_str(&json).expect("status parses");
    let last_scale = stored
        .last_scale_time
        .as_ref()
        .map(|t| SystemTime::from(t.0));
    h.scaler = Autoscaler::restore(last_scale).with_memory(&stored.autoscaler.unwrap_or_default());
}

#[test]
fn a_restart_keeps_the_sizes_that_proved_too_small() {
    // Above maxMissRate at one node, below minMissRate at two; restarts after the grow.
    let load = |size| if size == 1 { (1000, 0.6) } else { (1000, 0.05) };
    let mut h = Harness::new(auto_spec(), 1);
    h.run(6, load);
    restart(&mut h, true);
    h.run(34, load);
    assert_eq!(
        h.moves(),
        [(1, 2)],
        "no extra shrink and grow after the restart"
    );
    assert_hold(h.last.as_ref().expect("ran"), "1 node proved too small");

    // What it did when the marks lived in memory only: one extra shrink and grow.
    let mut forgetful = Harness::new(auto_spec(), 1);
    forgetful.run(6, load);
    restart(&mut forgetful, false);
    forgetful.run(34, load);
    assert_eq!(forgetful.moves(), [(1, 2), (2, 1), (1, 2)]);
}

#[test]
fn a_restart_keeps_the_grow_backoff() {
    let mut h = Harness::new(spec_64(), 1);
    // More memory changes nothing: the grow 1 -> 2 is judged futile at window 3, and the
    // next grow waits 10 windows (600 s) — across a restart at window 6.
    h.run(6, |_| (1000, 0.9));
    assert!(h.scaler.memory().is_some_and(|m| m.grow_backoff.is_some()));
    restart(&mut h, true);
    h.run(20, |_| (1000, 0.9));
    let at: Vec<usize> = h.scales.iter().map(|s| s.window).collect();
    assert_eq!(at, [0, 13], "the back-off held across the restart");

    let mut forgetful = Harness::new(spec_64(), 1);
    forgetful.run(6, |_| (1000, 0.9));
    restart(&mut forgetful, false);
    forgetful.run(20, |_| (1000, 0.9));
    assert_eq!(
        forgetful.scales[1].window, 6,
        "without memory it grows at once"
    );
}

#[test]
fn a_restart_before_a_grow_is_judged_still_judges_it() {
    let mut h = Harness::new(spec_64(), 1);
    // The grow 1 -> 2 is decided at window 0 and judged at window 3; restart at window 2.
    h.run(2, |_| (1000, 0.9));
    assert!(h.scaler.memory().is_some_and(|m| m.unjudged_grow.is_some()));
    restart(&mut h, true);
    h.run(10, |_| (1000, 0.9));
    assert_eq!(
        h.moves(),
        [(1, 2)],
        "the futile grow was judged and not repeated"
    );

    let mut forgetful = Harness::new(spec_64(), 1);
    forgetful.run(2, |_| (1000, 0.9));
    restart(&mut forgetful, false);
    forgetful.run(10, |_| (1000, 0.9));
    assert_eq!(forgetful.moves()[..2], [(1, 2), (2, 4)]);
}

fn spec_64() -> ScalingSpec {
    let mut spec = auto_spec();
    spec.max_replicas = 64;
    spec
}

#[test]
fn the_memory_round_trips_through_the_status() {
    let mut h = Harness::new(auto_spec(), 1);
    assert_eq!(h.scaler.memory(), None, "nothing learned, nothing stored");
    h.run(6, |size| if size == 1 { (1000, 0.6) } else { (1000, 0.05) });
    let before = h.scaler.memory().expect("a size proved too small");
    restart(&mut h, true);
    assert_eq!(h.scaler.memory(), Some(before));
}
