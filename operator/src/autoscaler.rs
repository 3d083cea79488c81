//! The miss-rate autoscaler of a CachePool in `auto` mode: given one closed measurement
//! window, should the pool keep its size, grow or shrink?
//!
//! It is a pure decision: no I/O, no clock, no tasks. The operator's pool driver measures a
//! window (gets, misses, ring size, whether the ring stayed still), calls
//! [`Autoscaler::decide`] once per closed window with the spec as it is *now*, performs the
//! [`Decision`], and reports with [`Autoscaler::settled`] when the pool has settled at a size.
//! Time is whatever the windows and reports say it is, so tests replay hours of traffic in
//! microseconds and an operator restart loses nothing that [`Autoscaler::restore`] cannot
//! rebuild from the pool's status.
//!
//! # The rules
//!
//! Each window's miss rate is `misses / gets`. It is compared with `scaling.auto.maxMissRate`
//! and `scaling.auto.minMissRate`:
//!
//! - **Grow** when the miss rate is strictly above `maxMissRate`: `n` nodes become
//!   `ceil(n * expandRatio)`, at least `n + 1`.
//! - **Shrink** when it is strictly below `minMissRate`: `n` nodes become
//!   `floor(n * shrinkRatio)`, at most `n - 1`.
//! - A miss rate exactly at a threshold changes nothing. Products within 1e-9 of a whole
//!   number count as that number, so `10 * 1.1` is 11 nodes, not 12.
//! - Every new size is clamped to `[minReplicas, maxReplicas]`.
//!
//! What makes it safe to leave running in production:
//!
//! 1. **Bounds first.** If the pool (or the size it is moving to) lies outside
//!    `[minReplicas, maxReplicas]`, the answer is a scale into the bounds at once, whatever
//!    the traffic, cooldown or memory below. Spec changes (bounds, thresholds, ratios, mode)
//!    apply at the next window: the spec is an argument of every decision, not a copy.
//! 2. **One resize at a time.** After a scale, nothing else is decided until the pool has
//!    settled at the new size (the driver says so, or a steady window at that size proves it).
//! 3. **Only clean windows count.** A window counts when it is `steady` (no ring change and no
//!    migration at any moment of it) and began at or after the pool last settled, so it
//!    measures one pool size with its keys in place. A node replacement therefore also voids
//!    the windows that overlap it, but starts no cooldown.
//! 4. **Enough traffic.** A window with fewer than `minRequestsPerWindow` gets (or none at
//!    all, or inconsistent counts) decides nothing: its miss rate is noise.
//! 5. **Cooldown.** After every change of size (by this autoscaler or anyone else) no scale is
//!    made for `cooldownSeconds`, counted from when the pool *settled* at the new size, not
//!    from when the scale was asked for: a migration can take minutes.
//! 6. **A grow must help.** The first window that decides after a grow judges it. If the
//!    miss rate is still above `maxMissRate`, the grow from `n` to `m` nodes must have lowered
//!    it by at least 10 % of its old value per doubling of the pool (`0.10 * log2(m / n)`; a
//!    2 -> 4 grow must take 0.60 to 0.54 or lower). If it did not, the misses are not capacity
//!    misses (one-time keys, scans, expired or oversized items) and more memory will not help:
//!    grows are held for a back-off of `max(10 windows, 5 cooldowns)`, doubled after each
//!    further grow that does not help, at most a day. Shrinks stay allowed, and a shrink ends
//!    the back-off, since the workload has changed. The grow is not judged when the request
//!    rate rose by more than half meanwhile: a bigger load could hide the gain.
//!    Such a grow also unmarks both its sizes as *too small* (rule 7), and nothing is
//!    marked during the back-off: those misses were not for lack of memory.
//! 7. **No oscillation.** Every counted window whose miss rate is above `maxMissRate` marks
//!    its pool size as *too small* at its request rate. A shrink never goes to a size that is
//!    at or below a too-small size while the load is comparable, i.e. at least 70 % of the
//!    request rate at which that size proved too small; it stops at one node above it
//!    instead, or holds and says why. A later window that finds the pool healthy at that size
//!    or smaller under comparable load clears the mark, and marks expire after 24 hours. So a
//!    steady load whose miss rate is above the maximum at 1 node and below the minimum at 2
//!    grows to 2 once and stays there, where the naive rule flips between 1 and 2 forever; a
//!    load that falls well below the one that filled the pool still shrinks it.
//!
//! Every [`Decision::Hold`] carries its reason in words for the pool's status and the logs.
//! What the rules remember survives an operator restart: the driver keeps
//! [`Autoscaler::memory`] (the too-small marks, the grow back-off, a grow not judged yet) in
//! `status.autoscaler` and the cooldown in `status.lastScaleTime`, and a restarted operator
//! rebuilds the autoscaler from both ([`Autoscaler::restore`], [`Autoscaler::with_memory`]),
//! so a restart makes no extra grow or shrink. Times are kept to the second, as Kubernetes
//! writes them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use cachepool_crds::pool::{
    AutoscalerStatus, CachePoolSpec, GrowBackoff, ProcessProvider, ProviderSpec, ScalingMode,
    ScalingSpec, TooSmallSize, UnjudgedGrow, validate,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::reconcile::time;

/// A grow from `n` to `m` nodes must lower the miss rate by this fraction of its old value
/// per doubling of the pool (`log2(m / n)` doublings) to count as helpful. Ten percent per
/// doubling sits below what LRU under a Zipf load gains from twice the memory (a quarter or
/// more at the miss rates a pool grows at) and above what a scan gains (nothing).
pub const GROW_GAIN_PER_DOUBLING: f64 = 0.10;

/// A grow is not judged when the request rate rose by more than this factor since it was
/// made: a bigger load can eat the gain, and that says nothing about the workload.
pub const GROW_JUDGE_MAX_LOAD_RISE: f64 = 1.5;

/// A size that proved too small blocks shrinks while the request rate is at least this
/// fraction of the rate at which it proved too small.
pub const COMPARABLE_LOAD: f64 = 0.7;

/// How long a size that proved too small is remembered: a day covers a daily load cycle, and
/// forgetting costs at most one extra shrink and grow.
pub const TOO_SMALL_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Longest back-off on grows after grows that did not help.
pub const MAX_GROW_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// The first back-off after a grow that did not help is this many windows, or
/// [`FUTILE_GROW_BACKOFF_COOLDOWNS`] cooldowns if that is longer.
pub const FUTILE_GROW_BACKOFF_WINDOWS: u32 = 10;

/// See [`FUTILE_GROW_BACKOFF_WINDOWS`].
pub const FUTILE_GROW_BACKOFF_COOLDOWNS: u32 = 5;

/// Products of a size and a ratio this close to a whole number count as that number, so that
/// binary fractions (`10 * 1.1 = 11.000000000000002`) do not add or remove a node.
const RATIO_SLACK: f64 = 1e-9;

/// One closed decision window, as the driver measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// When the window closed.
    pub end: SystemTime,
    /// How long it lasted; it began at `end - length`.
    pub length: Duration,
    /// Gets answered by the pool's nodes in the window, and how many of them missed.
    pub gets: u64,
    /// Misses among `gets`.
    pub misses: u64,
    /// Ring size (serving nodes) during the window.
    pub replicas: u32,
    /// True when the ring did not change and no migration ran at any time in the window
    /// (a window that overlaps a resize mixes two pool sizes and a warming cache).
    pub steady: bool,
}

impl Window {
    /// When the window began.
    pub fn start(&self) -> SystemTime {
        self.end
            .checked_sub(self.length)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// What the driver should do after a window.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing to do; the reason is shown to users (status, logs), e.g. "window had 37 requests (< 100)".
    Hold {
        /// Which rule held, as a metric label: `invalid_spec`, `manual_mode`, `settling`,
        /// `not_steady`, `before_settle`, `too_few_requests`, `cooldown`,
        /// `within_thresholds`, `at_max_replicas`, `grow_backoff`, `at_min_replicas` or
        /// `too_small_before`.
        rule: &'static str,
        /// Why nothing changes, in words.
        reason: String,
    },
    /// Resize the pool to `replicas` (always within [minReplicas, maxReplicas]); reason e.g.
    /// "miss rate 0.62 > maxMissRate 0.40 over 60 s: 2 -> 4 nodes".
    Scale {
        /// The new pool size.
        replicas: u32,
        /// Why, in words (for `status.lastScaleReason` and Events).
        reason: String,
    },
}

impl Decision {
    /// The reason, whichever the decision.
    pub fn reason(&self) -> &str {
        match self {
            Decision::Hold { reason, .. } | Decision::Scale { reason, .. } => reason,
        }
    }

    /// The new size when this is a scale.
    pub fn replicas(&self) -> Option<u32> {
        match self {
            Decision::Hold { .. } => None,
            Decision::Scale { replicas, .. } => Some(*replicas),
        }
    }
}

/// A scale this autoscaler asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleEvent {
    /// End of the window that decided it.
    pub at: SystemTime,
    /// Pool size in that window.
    pub from: u32,
    /// Size asked for.
    pub to: u32,
    /// The window's miss rate; `None` for a scale into the bounds made without enough traffic.
    pub miss_rate: Option<f64>,
    /// The window's gets per second, when it had enough traffic.
    pub requests_per_second: Option<f64>,
}

/// The autoscaler of one pool: the rules of the module documentation plus the little memory
/// they need (the last scale, the last settle, sizes that proved too small, a grow back-off).
#[derive(Default, Clone, Debug)]
pub struct Autoscaler {
    /// Size the pool last settled at, as reported or inferred from a steady window.
    size: Option<u32>,
    /// When the pool last settled (after any ring change): earlier windows do not count.
    settled_at: Option<SystemTime>,
    /// When the pool last settled at a new size: the cooldown runs from here.
    cooldown_from: Option<SystemTime>,
    /// Size asked for by the last scale, until the pool settles.
    pending: Option<u32>,
    last_scale: Option<ScaleEvent>,
    /// A grow whose effect has not been judged yet.
    unjudged_grow: Option<GrowProbe>,
    /// Grows that did not help, and until when further grows wait.
    futile: Option<FutileGrows>,
    /// Sizes that proved too small, by size.
    too_small: BTreeMap<u32, TooSmall>,
}

/// The state before a grow, to judge it against.
#[derive(Clone, Copy, Debug)]
struct GrowProbe {
    from: u32,
    to: u32,
    miss_rate: f64,
    rps: f64,
}

#[derive(Clone, Copy, Debug)]
struct FutileGrows {
    from: u32,
    to: u32,
    before: f64,
    after: f64,
    needed: f64,
    /// Grows in a row that did not help; each doubles the back-off.
    streak: u32,
    until: SystemTime,
}

/// A size at which a counted window's miss rate was above `maxMissRate`.
#[derive(Clone, Copy, Debug)]
struct TooSmall {
    miss_rate: f64,
    rps: f64,
    at: SystemTime,
}

/// A counted window's figures.
#[derive(Clone, Copy, Debug)]
struct Measure {
    miss_rate: f64,
    rps: f64,
}

impl Autoscaler {
    /// An autoscaler with no memory: it learns the pool's size from the first steady window
    /// or [`Autoscaler::settled`] report, and starts with no cooldown.
    pub fn new() -> Self {
        Self::default()
    }

    /// After an operator restart: what the pool's status remembers (last scale time, e.g. for
    /// the cooldown). The cooldown runs from `last_scale`, and windows that began before it do
    /// not count. Pass the time the driver stored in `status.lastScaleTime`.
    pub fn restore(last_scale: Option<SystemTime>) -> Self {
        Self {
            settled_at: last_scale,
            cooldown_from: last_scale,
            ..Self::default()
        }
    }

    /// Adds what an earlier autoscaler of the pool had learned (from `status.autoscaler`) to
    /// one made by [`Autoscaler::restore`]. Marks older than a day are dropped.
    #[must_use]
    pub fn with_memory(mut self, memory: &AutoscalerStatus) -> Self {
        let at = |t: &Time| SystemTime::from(t.0);
        self.too_small = memory
            .too_small
            .iter()
            .map(|mark| {
                (
                    mark.replicas,
                    TooSmall {
                        miss_rate: mark.miss_rate,
                        rps: mark.requests_per_second,
                        at: at(&mark.at),
                    },
                )
            })
            .collect();
        self.futile = memory.grow_backoff.as_ref().map(|b| FutileGrows {
            from: b.from,
            to: b.to,
            before: b.miss_rate_before,
            after: b.miss_rate_after,
            needed: b.needed_gain,
            streak: b.streak.max(1),
            until: at(&b.until),
        });
        self.unjudged_grow = memory.unjudged_grow.as_ref().map(|g| GrowProbe {
            from: g.from,
            to: g.to,
            miss_rate: g.miss_rate,
            rps: g.requests_per_second,
        });
        self
    }

    /// What this autoscaler has learned, for `status.autoscaler`; `None` when nothing.
    pub fn memory(&self) -> Option<AutoscalerStatus> {
        let memory = AutoscalerStatus {
            too_small: self
                .too_small
                .iter()
                .map(|(&replicas, mark)| TooSmallSize {
                    replicas,
                    miss_rate: mark.miss_rate,
                    requests_per_second: mark.rps,
                    at: time(mark.at),
                })
                .collect(),
            grow_backoff: self.futile.map(|f| GrowBackoff {
                from: f.from,
                to: f.to,
                miss_rate_before: f.before,
                miss_rate_after: f.after,
                needed_gain: f.needed,
                streak: f.streak,
                until: time(f.until),
            }),
            unjudged_grow: self.unjudged_grow.map(|g| UnjudgedGrow {
                from: g.from,
                to: g.to,
                miss_rate: g.miss_rate,
                requests_per_second: g.rps,
            }),
        };
        (memory != AutoscalerStatus::default()).then_some(memory)
    }

    /// The last scale this autoscaler asked for, if any since it was created.
    pub fn last_scale(&self) -> Option<&ScaleEvent> {
        self.last_scale.as_ref()
    }

    /// Decide on one closed window. When it returns Scale it records the scale itself (time,
    /// sizes, miss rate).
    pub fn decide(&mut self, scaling: &ScalingSpec, window: &Window) -> Decision {
        if let Some(problem) = spec_problem(scaling) {
            return hold(
                "invalid_spec",
                format!(
                    "the scaling spec is invalid ({problem}); the autoscaler changes nothing until it is fixed"
                ),
            );
        }
        if scaling.mode == ScalingMode::Manual {
            // The driver follows `scaling.replicas` now; a scale asked for earlier is moot.
            self.pending = None;
            return hold(
                "manual_mode",
                format!(
                    "scaling.mode is manual: the pool keeps scaling.replicas = {}",
                    nodes(scaling.replicas)
                ),
            );
        }
        self.infer_settle(window);

        let (min, max) = (scaling.min_replicas, scaling.max_replicas);
        let current = self.pending.unwrap_or(window.replicas);
        if current < min {
            return self.scale_to_bound(window, min, "below scaling.minReplicas");
        }
        if current > max {
            return self.scale_to_bound(window, max, "above scaling.maxReplicas");
        }
        if let Some(target) = self.pending {
            return hold(
                "settling",
                format!(
                    "waiting for the pool to settle at {} (now {})",
                    nodes(target),
                    window.replicas
                ),
            );
        }
        if !window.steady {
            return hold(
                "not_steady",
                "window overlaps a resize, migration or node replacement; it is not counted"
                    .to_owned(),
            );
        }
        if let Some(settled) = self.settled_at
            && window.start() < settled
        {
            return hold(
                "before_settle",
                format!(
                    "window began {} before the pool settled at {}; it is not counted",
                    Span(duration_between(window.start(), settled)),
                    nodes(window.replicas)
                ),
            );
        }
        let m = match measure(scaling, window) {
            Ok(m) => m,
            Err(reason) => return hold("too_few_requests", reason),
        };
        let n = window.replicas;
        self.remember_size(scaling, n, m, window.end);

        if let Some(left) = self.cooldown_left(scaling, window.end) {
            return hold(
                "cooldown",
                format!(
                    "cooldown: {} left since the pool settled at {} (miss rate {:.2})",
                    Span(left),
                    nodes(n),
                    m.miss_rate
                ),
            );
        }
        self.judge_grow(scaling, n, m, window.end);

        let auto = &scaling.auto;
        if m.miss_rate > auto.max_miss_rate {
            self.grow(scaling, window, m)
        } else if m.miss_rate < auto.min_miss_rate {
            self.shrink(scaling, window, m)
        } else {
            hold(
                "within_thresholds",
                format!(
                    "miss rate {:.2} within [minMissRate {:.2}, maxMissRate {:.2}]: keeping {}",
                    m.miss_rate,
                    auto.min_miss_rate,
                    auto.max_miss_rate,
                    nodes(n)
                ),
            )
        }
    }

    /// The driver reports that the pool has settled at `replicas` (migration complete) at
    /// `at`, whoever caused the change (this autoscaler, a manual change before switching to
    /// auto, a replacement).
    ///
    /// Windows that began before `at` no longer count. A new size (or the end of a scale this
    /// autoscaler asked for) also starts the cooldown at `at`; the same size (a replacement)
    /// does not.
    pub fn settled(&mut self, replicas: u32, at: SystemTime) {
        let resized = match self.size {
            Some(size) => size != replicas,
            None => self.pending.is_some(),
        };
        if resized {
            self.cooldown_from = Some(at);
        }
        self.settled_at = Some(at);
        self.size = Some(replicas);
        // Settled somewhere else than asked (overridden, or an older change finishing): the
        // next steady window decides afresh rather than waiting for a size that may not come.
        self.pending = None;
    }

    /// A steady window proves the pool settled no later than the window's start, even if the
    /// driver did not say so; the start is the latest such time, so the cooldown is not cut.
    fn infer_settle(&mut self, window: &Window) {
        if !window.steady {
            return;
        }
        let unreported = match self.pending {
            Some(target) => target == window.replicas,
            None => self.size != Some(window.replicas),
        };
        if unreported {
            // Never earlier than a settle already known (from `restore`, say).
            let at = self
                .settled_at
                .map_or(window.start(), |t| t.max(window.start()));
            self.settled(window.replicas, at);
        }
    }

    fn cooldown_left(&self, scaling: &ScalingSpec, now: SystemTime) -> Option<Duration> {
        let from = self.cooldown_from?;
        let until = from + Duration::from_secs(u64::from(scaling.auto.cooldown_seconds));
        until
            .duration_since(now)
            .ok()
            .filter(|left| !left.is_zero())
    }

    /// Keep the too-small marks in line with what this window shows.
    fn remember_size(&mut self, scaling: &ScalingSpec, n: u32, m: Measure, now: SystemTime) {
        self.too_small
            .retain(|_, mark| duration_between(mark.at, now) < TOO_SMALL_MEMORY);
        let held = self.futile.is_some_and(|f| now < f.until);
        if m.miss_rate > scaling.auto.max_miss_rate {
            // While grows are held as futile, a high miss rate says nothing about memory.
            if held {
                return;
            }
            self.too_small.insert(
                n,
                TooSmall {
                    miss_rate: m.miss_rate,
                    rps: m.rps,
                    at: now,
                },
            );
        } else {
            // Healthy at `n` under a load at least comparable to the one that found a size
            // `>= n` too small: the workload has changed since, the mark is wrong now.
            self.too_small
                .retain(|&size, mark| size < n || m.rps < COMPARABLE_LOAD * mark.rps);
        }
    }

    /// Judge the last grow on the first window that may decide after it.
    fn judge_grow(&mut self, scaling: &ScalingSpec, n: u32, m: Measure, now: SystemTime) {
        let Some(probe) = self.unjudged_grow.take() else {
            return;
        };
        if probe.to != n {
            // The pool was resized again by someone else: nothing to judge.
            return;
        }
        if m.miss_rate <= scaling.auto.max_miss_rate {
            self.futile = None;
            return;
        }
        if m.rps > probe.rps * GROW_JUDGE_MAX_LOAD_RISE || probe.miss_rate <= 0.0 {
            return;
        }
        let needed = GROW_GAIN_PER_DOUBLING * (f64::from(probe.to) / f64::from(probe.from)).log2();
        let gain = (probe.miss_rate - m.miss_rate) / probe.miss_rate;
        if gain >= needed {
            self.futile = None;
            return;
        }
        // The same misses at both sizes: neither was short of memory.
        self.too_small.remove(&probe.from);
        self.too_small.remove(&probe.to);
        let streak = self.futile.map_or(0, |f| f.streak).saturating_add(1);
        let auto = &scaling.auto;
        let base = (u64::from(auto.window_seconds) * u64::from(FUTILE_GROW_BACKOFF_WINDOWS))
            .max(u64::from(auto.cooldown_seconds) * u64::from(FUTILE_GROW_BACKOFF_COOLDOWNS));
        let backoff = Duration::from_secs(base.saturating_mul(1 << (streak - 1).min(20)))
            .min(MAX_GROW_BACKOFF);
        self.futile = Some(FutileGrows {
            from: probe.from,
            to: probe.to,
            before: probe.miss_rate,
            after: m.miss_rate,
            needed,
            streak,
            until: now + backoff,
        });
    }

    fn grow(&mut self, scaling: &ScalingSpec, window: &Window, m: Measure) -> Decision {
        let auto = &scaling.auto;
        let n = window.replicas;
        let max = scaling.max_replicas;
        if n >= max {
            return hold(
                "at_max_replicas",
                format!(
                    "miss rate {:.2} > maxMissRate {:.2}, but the pool is at scaling.maxReplicas ({max})",
                    m.miss_rate, auto.max_miss_rate
                ),
            );
        }
        if let Some(f) = self.futile
            && let Ok(left) = f.until.duration_since(window.end)
            && !left.is_zero()
        {
            return hold(
                "grow_backoff",
                format!(
                    "miss rate {:.2} > maxMissRate {:.2}, but the last grow ({} -> {} nodes) only took it from {:.2} to {:.2} (needed {:.0} % lower): more memory does not help this workload; no grow for another {}",
                    m.miss_rate,
                    auto.max_miss_rate,
                    f.from,
                    f.to,
                    f.before,
                    f.after,
                    f.needed * 100.0,
                    Span(left)
                ),
            );
        }
        let to = grow_target(n, auto.expand_ratio).min(max);
        self.unjudged_grow = Some(GrowProbe {
            from: n,
            to,
            miss_rate: m.miss_rate,
            rps: m.rps,
        });
        let reason = format!(
            "miss rate {:.2} > maxMissRate {:.2} over {}: {n} -> {to} nodes",
            m.miss_rate,
            auto.max_miss_rate,
            Span(window.length)
        );
        self.record_scale(window, to, Some(m), reason)
    }

    fn shrink(&mut self, scaling: &ScalingSpec, window: &Window, m: Measure) -> Decision {
        let auto = &scaling.auto;
        let n = window.replicas;
        let min = scaling.min_replicas;
        if n <= min {
            return hold(
                "at_min_replicas",
                format!(
                    "miss rate {:.2} < minMissRate {:.2}, but the pool is at scaling.minReplicas ({min})",
                    m.miss_rate, auto.min_miss_rate
                ),
            );
        }
        let wanted = shrink_target(n, auto.shrink_ratio).max(min);
        // The largest size at or above the target that proved too small under a load like
        // this one, if any: the shrink must stay above it.
        let blocker = self
            .too_small
            .range(wanted..n)
            .rev()
            .find(|(_, mark)| {
                mark.miss_rate > auto.max_miss_rate && m.rps >= COMPARABLE_LOAD * mark.rps
            })
            .map(|(&size, &mark)| (size, mark));
        let Some((size, mark)) = blocker else {
            // The workload has changed; a grow back-off from before no longer applies.
            self.futile = None;
            let reason = format!(
                "miss rate {:.2} < minMissRate {:.2} over {}: {n} -> {wanted} nodes",
                m.miss_rate,
                auto.min_miss_rate,
                Span(window.length)
            );
            return self.record_scale(window, wanted, Some(m), reason);
        };
        let why = format!(
            "{} proved too small (miss rate {:.2} at {:.1} req/s, {} ago) and the load is comparable ({:.1} req/s)",
            nodes(size),
            mark.miss_rate,
            mark.rps,
            Span(duration_between(mark.at, window.end)),
            m.rps
        );
        let to = size + 1;
        if to >= n {
            return hold(
                "too_small_before",
                format!(
                    "miss rate {:.2} < minMissRate {:.2}, but {why}: staying at {}",
                    m.miss_rate,
                    auto.min_miss_rate,
                    nodes(n)
                ),
            );
        }
        self.futile = None;
        let reason = format!(
            "miss rate {:.2} < minMissRate {:.2} over {}: {n} -> {to} nodes (not {wanted}: {why})",
            m.miss_rate,
            auto.min_miss_rate,
            Span(window.length)
        );
        self.record_scale(window, to, Some(m), reason)
    }

    /// Scale into the bounds; `side` names the bound crossed, e.g. "above scaling.maxReplicas".
    fn scale_to_bound(&mut self, window: &Window, to: u32, side: &str) -> Decision {
        let reason = match self.pending {
            Some(target) => format!(
                "the pool is moving to {}, {side} {to}: {} instead",
                nodes(target),
                nodes(to)
            ),
            None => format!(
                "{} is {side} {to}: {} -> {to} nodes",
                nodes(window.replicas),
                window.replicas
            ),
        };
        // A bounds change overrides whatever the last grow was meant to show.
        self.unjudged_grow = None;
        let measured = measure_any(window);
        self.record_scale(window, to, measured, reason)
    }

    fn record_scale(
        &mut self,
        window: &Window,
        to: u32,
        m: Option<Measure>,
        reason: String,
    ) -> Decision {
        self.pending = Some(to);
        self.last_scale = Some(ScaleEvent {
            at: window.end,
            from: window.replicas,
            to,
            miss_rate: m.map(|m| m.miss_rate),
            requests_per_second: m.map(|m| m.rps),
        });
        Decision::Scale {
            replicas: to,
            reason,
        }
    }
}

fn hold(rule: &'static str, reason: String) -> Decision {
    Decision::Hold { rule, reason }
}

/// The spec's scaling rules, as the operator enforces them everywhere: the first broken rule,
/// or `None`. Checked here too so that a bad spec that slips through never makes the
/// arithmetic below panic or scale nonsensically.
fn spec_problem(scaling: &ScalingSpec) -> Option<String> {
    let spec = CachePoolSpec {
        scaling: scaling.clone(),
        provider: ProviderSpec {
            process: Some(ProcessProvider {}),
            ..ProviderSpec::default()
        },
        ..CachePoolSpec::default()
    };
    validate(&spec)
        .err()?
        .into_iter()
        .find(|e| e.field.starts_with("scaling."))
        .map(|e| e.to_string())
}

/// A window's miss rate and request rate, or why it decides nothing.
fn measure(scaling: &ScalingSpec, window: &Window) -> Result<Measure, String> {
    let wanted = scaling.auto.min_requests_per_window;
    if window.gets < wanted {
        return Err(format!("window had {} requests (< {wanted})", window.gets));
    }
    measure_any(window).ok_or_else(|| {
        if window.gets == 0 {
            "window had no requests: there is no miss rate to judge".to_owned()
        } else if window.length.is_zero() {
            "window has zero length: there is no request rate to judge".to_owned()
        } else {
            format!(
                "window counted {} misses for {} gets: the counts are inconsistent, so it is not judged",
                window.misses, window.gets
            )
        }
    })
}

/// A window's figures when they make sense at all, whatever the traffic threshold.
fn measure_any(window: &Window) -> Option<Measure> {
    if window.gets == 0 || window.misses > window.gets || window.length.is_zero() {
        return None;
    }
    Some(Measure {
        miss_rate: window.misses as f64 / window.gets as f64,
        rps: window.gets as f64 / window.length.as_secs_f64(),
    })
}

/// `ceil(n * ratio)`, at least `n + 1`; saturates instead of overflowing on huge ratios.
pub fn grow_target(n: u32, expand_ratio: f64) -> u32 {
    let product = (f64::from(n) * expand_ratio - RATIO_SLACK).ceil();
    // `as` saturates on floats out of range (and gives 0 for NaN, which the max() lifts).
    let by_ratio = product as u32;
    by_ratio.max(n.saturating_add(1))
}

/// `floor(n * ratio)`, at most `n - 1`, never below 0.
pub fn shrink_target(n: u32, shrink_ratio: f64) -> u32 {
    let product = (f64::from(n) * shrink_ratio + RATIO_SLACK).floor();
    let by_ratio = product as u32;
    by_ratio.min(n.saturating_sub(1))
}

/// `later - earlier`, zero if the clock says otherwise.
fn duration_between(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

fn nodes(n: u32) -> String {
    if n == 1 {
        "1 node".to_owned()
    } else {
        format!("{n} nodes")
    }
}

/// A duration the way a status line shows it: "45 s", "12 min", "3 h".
struct Span(Duration);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Rounded up, so a cooldown with 0.4 s left does not read "0 s".
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        if secs < 120 {
            write!(f, "{secs} s")
        } else if secs < 2 * 3600 {
            write!(f, "{} min", secs.div_ceil(60))
        } else {
            write!(f, "{} h", secs.div_ceil(3600))
        }
    }
}

#[cfg(test)]
mod tests;
