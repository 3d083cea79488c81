//! Pool counters, windows and per-minute history, folded from the nodes' `GET /stats` samples.
//!
//! A node's counters are cumulative for the life of its process, so the pool's traffic is the
//! sum of per-node *deltas* between successive samples, never the sum of current counters: a
//! node that restarts, is replaced in its slot, is removed, or misses a round would otherwise
//! make the pool's totals drop or leap. This module is pure (time comes in as an argument, no
//! I/O), so every one of those cases is a unit test.
//!
//! Shape of the data, and why:
//! - **Rounds** (one per [`PoolHistory::record`] call, kept [`RAW_RETENTION`]) hold the deltas
//!   counted over the round's span `(previous round, this round]`. Windows up to an hour are
//!   summed from them, prorating a round that straddles the window's edge, so a 60 s window
//!   answered at any instant covers 60 s.
//! - **Minutes** (kept for the retention, at least 24 h) aggregate the rounds whose sample time
//!   falls in the minute: deltas summed, gauges (nodes, items, bytes) the last of the minute,
//!   and the time the rounds covered, so `requestsPerMinute` is `requests × 60 s / covered`.
//!   A minute sampled only for its last 20 s thus reports a rate, not a third of one.
//! - **Node baselines**, one per slot: the last counters seen, to take the next delta from.
//!
//! Delta rules, each chosen so the pool's totals never go negative or jump:
//! - Same process (same pid, uptime not lower): counter differences. If any counter went down
//!   (`stats reset`), the counters restarted from zero within the interval: the delta is the
//!   current value, as Prometheus' `increase()` assumes.
//! - A process the slot has no baseline for (new slot, restart, replacement): its counters all
//!   accrued since it started, so they count in full when the start (now − uptime) falls after
//!   the slot's previous sample (or the previous round, for a slot seen for the first time);
//!   otherwise the process ran unobserved and its counters are only a baseline. That is what
//!   keeps an operator restart from counting hours of old traffic as one round's.
//! - A node that misses rounds: its next delta covers every round since its last answer and is
//!   spread over them in proportion to their spans, so neither the missed rounds read low nor
//!   the answering round high. Its items and bytes are carried forward meanwhile.
//! - Silence longer than [`MAX_GAP`] (of the whole pool or of one node) cannot be placed in
//!   time: the next sample is a baseline and the silent minutes have no points.
//! - A node removed from the ring (slot ≥ ring size) that no longer answers is forgotten; the
//!   traffic it served before stays in the totals.
//! - A round at or before the latest one (the wall clock stepped back) only refreshes the
//!   baselines, so later deltas stay small.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// The least per-minute history a pool keeps: the manager's charts promise a day.
pub const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long raw rounds are kept: the longest window (3600 s, the autoscaler's limit) plus a
/// minute, so a window ending slightly before the latest round is still fully covered.
pub const RAW_RETENTION: Duration = Duration::from_secs(3600 + 60);

/// The longest silence whose traffic is still spread over the time it covers. Beyond it the
/// next sample is a baseline: five minutes of counters could have come at any moment of the
/// gap, and a point should describe its own minute.
pub const MAX_GAP: Duration = Duration::from_secs(300);

/// `uptime` is whole seconds, rounded down: a process may have started up to a second before
/// `now − uptime`.
const UPTIME_SLACK_MS: u64 = 1000;

const MINUTE_MS: u64 = 60_000;

/// Why a node's stats could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The body was JSON but not an object.
    #[error(
        "stats of the node in slot {slot} are not a JSON object; expected the body of the node's `GET /stats`"
    )]
    NotAnObject { slot: u32 },
    /// A counter the pool's history needs is absent or not a non-negative integer.
    #[error(
        "stats of the node in slot {slot} lack `{key}` as a non-negative integer; is the node a `cachepool node` of this release?"
    )]
    MissingCounter { slot: u32, key: &'static str },
}

/// One node's counters at one instant, as its admin API's `GET /stats` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSample {
    /// The node's slot in the ring.
    pub slot: u32,
    /// Process id: a change means a new process whose counters started from zero.
    pub pid: u64,
    /// Seconds since the process started.
    pub uptime: u64,
    /// Retrievals (per key) that found a live item.
    pub get_hits: u64,
    /// Retrievals (per key) that found nothing.
    pub get_misses: u64,
    /// Every command counted: retrievals, storage commands (cas included, as memcached's
    /// `cmd_set` counts it), touches (`gat` included), deletes, incr and decr.
    pub requests: u64,
    /// Items held now.
    pub items: u64,
    /// Bytes held now, per-item overhead included.
    pub bytes: u64,
    /// Items evicted since start.
    pub evictions: u64,
    /// Capacity in bytes.
    pub limit_bytes: u64,
}

impl NodeSample {
    /// Reads a node's `GET /stats` JSON. `pid`, `uptime`, `get_hits`, `get_misses`, `cmd_set`,
    /// `curr_items` and `bytes` are required; the other counters count as zero when absent,
    /// so a node that lacks a command family still yields its traffic.
    pub fn from_stats(slot: u32, stats: &Value) -> Result<NodeSample, Error> {
        let map = stats.as_object().ok_or(Error::NotAnObject { slot })?;
        let optional = |key: &str| map.get(key).and_then(Value::as_u64).unwrap_or(0);
        let required = |key: &'static str| {
            map.get(key)
                .and_then(Value::as_u64)
                .ok_or(Error::MissingCounter { slot, key })
        };
        let get_hits = required("get_hits")?;
        let get_misses = required("get_misses")?;
        let requests = [
            get_hits,
            get_misses,
            required("cmd_set")?,
            optional("cmd_touch"),
            optional("delete_hits"),
            optional("delete_misses"),
            optional("incr_hits"),
            optional("incr_misses"),
            optional("decr_hits"),
            optional("decr_misses"),
        ]
        .iter()
        .fold(0u64, |sum, v| sum.saturating_add(*v));
        Ok(NodeSample {
            slot,
            pid: required("pid")?,
            uptime: required("uptime")?,
            get_hits,
            get_misses,
            requests,
            items: required("curr_items")?,
            bytes: required("bytes")?,
            evictions: optional("evictions"),
            limit_bytes: optional("limit_maxbytes"),
        })
    }

    /// Retrievals: hits plus misses.
    pub fn gets(&self) -> u64 {
        self.get_hits.saturating_add(self.get_misses)
    }
}

/// The pool's traffic over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowTotals {
    /// Retrievals (per key).
    pub gets: u64,
    /// Retrievals that found nothing.
    pub misses: u64,
    /// Every command.
    pub requests: u64,
    /// Items evicted.
    pub evictions: u64,
    /// How much of the window the samples covered (at most its length).
    pub covered: Duration,
}

impl WindowTotals {
    /// Retrievals that found an item.
    pub fn hits(&self) -> u64 {
        self.gets.saturating_sub(self.misses)
    }

    /// Misses / gets; `None` without gets.
    pub fn miss_rate(&self) -> Option<f64> {
        (self.gets > 0).then(|| self.misses as f64 / self.gets as f64)
    }

    /// Hits / gets; `None` without gets.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.gets > 0).then(|| self.hits() as f64 / self.gets as f64)
    }

    /// Requests per minute of covered time; `None` if nothing was covered.
    pub fn requests_per_minute(&self) -> Option<f64> {
        let secs = self.covered.as_secs_f64();
        (secs > 0.0).then(|| self.requests as f64 * 60.0 / secs)
    }
}

/// One minute of history, as the operator API's `/history` serves it (the wire type).
pub use cachepool_crds::api::HistoryPoint as Point;

/// A closed minute as the traffic sinks get it: the point the API serves and the counts behind
/// its rates, so a metrics system can be given sums that a source adds up again over any
/// window (a rate cannot be averaged over minutes of different traffic).
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedMinute {
    pub point: Point,
    /// Retrievals that found an item in the minute.
    pub hits: u64,
    /// Retrievals that found nothing.
    pub misses: u64,
    /// Every command of the minute (not scaled to a full minute).
    pub requests: u64,
    /// How much of the minute the samples covered.
    pub covered: Duration,
}

/// The latest state of a pool, for its status and gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// When the latest round (at or before the instant asked about) was sampled.
    pub sampled_at: Option<SystemTime>,
    /// Ring size at that round.
    pub nodes: u32,
    /// Nodes that answered that round.
    pub answered: u32,
    /// Items held (absent nodes counted with their last answer, for up to [`MAX_GAP`]).
    pub items: u64,
    /// Bytes held, likewise.
    pub bytes: u64,
    /// The window asked for, if enough of it was covered.
    pub window: Option<WindowTotals>,
    /// Misses / gets over the window.
    pub miss_rate: Option<f64>,
    /// Hits / gets over the window.
    pub hit_rate: Option<f64>,
    /// Requests per minute over the window.
    pub requests_per_minute: Option<f64>,
}

/// Cumulative traffic counters, kept per round, per minute and per node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    hits: u64,
    misses: u64,
    requests: u64,
    evictions: u64,
}

impl Counters {
    fn of(s: &NodeSample) -> Counters {
        Counters {
            hits: s.get_hits,
            misses: s.get_misses,
            requests: s.requests,
            evictions: s.evictions,
        }
    }

    fn fields(self) -> [u64; 4] {
        [self.hits, self.misses, self.requests, self.evictions]
    }

    fn from_fields([hits, misses, requests, evictions]: [u64; 4]) -> Counters {
        Counters {
            hits,
            misses,
            requests,
            evictions,
        }
    }

    /// What accrued since `prev` of the same process. A counter that went down means the
    /// counters were reset in between, so all of them count from zero.
    fn since(self, prev: Counters) -> Counters {
        let now = self.fields();
        let before = prev.fields();
        if now.iter().zip(before).any(|(n, b)| *n < b) {
            return self;
        }
        Counters::from_fields(std::array::from_fn(|i| now[i] - before[i]))
    }

    fn add(&mut self, other: Counters) {
        let mut sum = self.fields();
        for (s, o) in sum.iter_mut().zip(other.fields()) {
            *s = s.saturating_add(o);
        }
        *self = Counters::from_fields(sum);
    }

    /// `self × num / den`, rounded down (u128, so no overflow).
    fn scaled(self, num: u64, den: u64) -> Counters {
        if den == 0 {
            return Counters::default();
        }
        Counters::from_fields(
            self.fields()
                .map(|v| (u128::from(v) * u128::from(num) / u128::from(den)) as u64),
        )
    }

    fn sub(self, other: Counters) -> Counters {
        let a = self.fields();
        let b = other.fields();
        Counters::from_fields(std::array::from_fn(|i| a[i].saturating_sub(b[i])))
    }

    fn gets(self) -> u64 {
        self.hits.saturating_add(self.misses)
    }
}

/// One sampling round: the deltas counted over `(start, end]` (milliseconds since the Unix
/// epoch) and the gauges at `end`. `start == end` for a baseline round, which covers nothing.
#[derive(Clone, Copy, Debug)]
struct Round {
    start: u64,
    end: u64,
    counts: Counters,
    nodes: u32,
    answered: u32,
    items: u64,
    bytes: u64,
}

/// The rounds whose `end` falls in one minute.
#[derive(Clone, Copy, Debug)]
struct Minute {
    /// Minutes since the Unix epoch.
    index: u64,
    counts: Counters,
    covered_ms: u64,
    nodes: u32,
    items: u64,
    bytes: u64,
}

/// What the pool last saw of the node in one slot.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    pid: u64,
    uptime: u64,
    at: u64,
    counters: Counters,
    items: u64,
    bytes: u64,
}

/// Everything the operator keeps about one pool's traffic. Memory is bounded by the retention
/// and the sampling interval (see [`PoolHistory::memory_bytes`]), not by uptime.
#[derive(Clone, Debug)]
pub struct PoolHistory {
    retention_ms: u64,
    rounds: VecDeque<Round>,
    minutes: VecDeque<Minute>,
    baselines: BTreeMap<u32, Baseline>,
    totals: Counters,
    covered_ms: u64,
}

impl PoolHistory {
    /// A pool's history keeping `retention` of per-minute points; less than
    /// [`MIN_RETENTION`] is raised to it, the day the manager's charts rely on.
    pub fn new(retention: Duration) -> PoolHistory {
        PoolHistory {
            retention_ms: millis_of(retention.max(MIN_RETENTION)),
            rounds: VecDeque::new(),
            minutes: VecDeque::new(),
            baselines: BTreeMap::new(),
            totals: Counters::default(),
            covered_ms: 0,
        }
    }

    /// One sampling round: every node that answered (nodes that did not answer are simply
    /// absent), `nodes` = ring size at that instant.
    pub fn record(&mut self, at: SystemTime, nodes: u32, samples: &[NodeSample]) {
        let at = unix_millis(at);
        let last_end = self.rounds.back().map(|r| r.end);
        if let Some(last_end) = last_end
            && at <= last_end
        {
            self.rebase(last_end, samples);
            return;
        }
        let start = match last_end {
            Some(end) if at - end <= millis_of(MAX_GAP) => end,
            _ => at,
        };
        self.rounds.push_back(Round {
            start,
            end: at,
            counts: Counters::default(),
            nodes,
            answered: samples.len().try_into().unwrap_or(u32::MAX),
            items: 0,
            bytes: 0,
        });
        let index = at / MINUTE_MS;
        if self.minutes.back().map(|m| m.index) != Some(index) {
            self.minutes.push_back(Minute {
                index,
                counts: Counters::default(),
                covered_ms: 0,
                nodes,
                items: 0,
                bytes: 0,
            });
        }
        if let Some(minute) = self.minutes.back_mut() {
            minute.covered_ms += at - start;
        }
        self.covered_ms += at - start;

        for sample in samples {
            if let Some((delta, from)) = self.delta(at, start, sample) {
                self.spread(delta, from, at);
            }
            self.baselines.insert(sample.slot, baseline(at, sample));
        }
        // Forget nodes that left the ring and stopped answering, and nodes silent for longer
        // than a gap we can bridge: their next sample is a baseline either way.
        let max_gap = millis_of(MAX_GAP);
        self.baselines
            .retain(|slot, b| b.at == at || (*slot < nodes && at.saturating_sub(b.at) <= max_gap));

        let items = self.baselines.values().map(|b| b.items).sum();
        let bytes = self.baselines.values().map(|b| b.bytes).sum();
        if let Some(round) = self.rounds.back_mut() {
            round.items = items;
            round.bytes = bytes;
        }
        if let Some(minute) = self.minutes.back_mut() {
            minute.nodes = nodes;
            minute.items = items;
            minute.bytes = bytes;
        }
        self.trim(at);
    }

    /// Gets/misses/requests over `(at − length, at]`, from the raw rounds (kept for
    /// [`RAW_RETENTION`], so any window up to 3600 s can be answered). A round straddling the
    /// window's start or end counts in proportion to its overlap. `None` if the samples cover
    /// half of the window or less.
    pub fn window(&self, at: SystemTime, length: Duration) -> Option<WindowTotals> {
        let end = unix_millis(at);
        let length_ms = millis_of(length);
        let start = end.saturating_sub(length_ms);
        let first = self.rounds.partition_point(|r| r.end <= start);
        let mut counts = Counters::default();
        let mut covered = 0;
        for round in self.rounds.range(first..) {
            if round.start >= end {
                break;
            }
            let overlap = round.end.min(end).saturating_sub(round.start.max(start));
            if overlap == 0 {
                continue;
            }
            let span = round.end - round.start;
            counts.add(if overlap == span {
                round.counts
            } else {
                round.counts.scaled(overlap, span)
            });
            covered += overlap;
        }
        if covered == 0 || covered * 2 <= length_ms {
            return None;
        }
        Some(WindowTotals {
            gets: counts.gets(),
            misses: counts.misses,
            requests: counts.requests,
            evictions: counts.evictions,
            covered: Duration::from_millis(covered),
        })
    }

    /// Per-minute points with minute start in `[from, to)`, oldest first. Minutes without
    /// data are absent, and so is a minute whose only sample was a baseline (it covers no time).
    pub fn points(&self, from: SystemTime, to: SystemTime) -> Vec<Point> {
        self.closed_minutes(from, to)
            .into_iter()
            .map(|m| m.point)
            .collect()
    }

    /// The minutes of [`PoolHistory::points`] with their counts.
    pub fn closed_minutes(&self, from: SystemTime, to: SystemTime) -> Vec<ClosedMinute> {
        let from = unix_millis(from);
        let to = unix_millis(to);
        let first = self.minutes.partition_point(|m| m.index * MINUTE_MS < from);
        self.minutes
            .range(first..)
            .take_while(|m| m.index * MINUTE_MS < to)
            .filter(|m| m.covered_ms > 0)
            .filter_map(|m| {
                Some(ClosedMinute {
                    point: point(m)?,
                    hits: m.counts.hits,
                    misses: m.counts.misses,
                    requests: m.counts.requests,
                    covered: Duration::from_millis(m.covered_ms),
                })
            })
            .collect()
    }

    /// The latest values (for status and gauges): rates and requests per minute over the
    /// last `length`, and the gauges of the latest round at or before `at`.
    pub fn latest(&self, at: SystemTime, length: Duration) -> Summary {
        let at_ms = unix_millis(at);
        let last = self.rounds.partition_point(|r| r.end <= at_ms);
        let round = last.checked_sub(1).and_then(|i| self.rounds.get(i));
        let window = self.window(at, length);
        Summary {
            sampled_at: round.map(|r| UNIX_EPOCH + Duration::from_millis(r.end)),
            nodes: round.map_or(0, |r| r.nodes),
            answered: round.map_or(0, |r| r.answered),
            items: round.map_or(0, |r| r.items),
            bytes: round.map_or(0, |r| r.bytes),
            window,
            miss_rate: window.and_then(|w| w.miss_rate()),
            hit_rate: window.and_then(|w| w.hit_rate()),
            requests_per_minute: window.and_then(|w| w.requests_per_minute()),
        }
    }

    /// Everything counted since this history began; it never decreases.
    pub fn totals(&self) -> WindowTotals {
        WindowTotals {
            gets: self.totals.gets(),
            misses: self.totals.misses,
            requests: self.totals.requests,
            evictions: self.totals.evictions,
            covered: Duration::from_millis(self.covered_ms),
        }
    }

    /// Heap bytes held: the allocated capacity of the rounds and minutes and the per-slot
    /// baselines (a B-tree node per few slots, estimated at twice the entries' size).
    pub fn memory_bytes(&self) -> usize {
        self.rounds.capacity() * size_of::<Round>()
            + self.minutes.capacity() * size_of::<Minute>()
            + self.baselines.len() * 2 * (size_of::<u32>() + size_of::<Baseline>())
    }

    /// Rounds held (at most [`RAW_RETENTION`] / sampling interval, plus one).
    pub fn rounds_held(&self) -> usize {
        self.rounds.len()
    }

    /// Minutes held (at most retention / 1 min).
    pub fn minutes_held(&self) -> usize {
        self.minutes.len()
    }

    /// The delta `sample` adds since its slot's baseline and the instant it accrued from, or
    /// `None` if the sample can only serve as a baseline.
    fn delta(&self, at: u64, round_start: u64, sample: &NodeSample) -> Option<(Counters, u64)> {
        let now = Counters::of(sample);
        // A baseline older than the longest bridgeable gap is as good as none.
        let prev = self
            .baselines
            .get(&sample.slot)
            .filter(|p| at.saturating_sub(p.at) <= millis_of(MAX_GAP));
        match prev {
            Some(prev) if prev.pid == sample.pid && sample.uptime >= prev.uptime => {
                Some((now.since(prev.counters), prev.at))
            }
            prev => {
                // A process we have no counters of: everything it counted is new, if it
                // started after we last looked at the slot.
                let since = prev.map_or(round_start, |p| p.at);
                let started =
                    at.saturating_sub(sample.uptime.saturating_mul(1000) + UPTIME_SLACK_MS);
                (started >= since && since < at).then_some((now, started))
            }
        }
    }

    /// Adds `delta`, accrued over `(from, to]`, to the rounds that interval covers, in
    /// proportion to their overlap with it, and to those rounds' minutes.
    fn spread(&mut self, delta: Counters, from: u64, to: u64) {
        self.totals.add(delta);
        let Some(current) = self.rounds.len().checked_sub(1) else {
            return;
        };
        let first = self.rounds.partition_point(|r| r.end <= from);
        let weights: Vec<(usize, u64)> = (first..=current)
            .filter_map(|i| {
                let r = self.rounds.get(i)?;
                let w = r.end.min(to).saturating_sub(r.start.max(from));
                (w > 0).then_some((i, w))
            })
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        if weights.len() <= 1 || total == 0 {
            // The usual case: the whole delta belongs to one round.
            let i = weights.first().map_or(current, |(i, _)| *i);
            self.add_to_round(i, delta);
            return;
        }
        // Cumulative rounding: the shares add up to the delta exactly.
        let mut cumulative = 0;
        let mut given = Counters::default();
        for (i, w) in weights {
            cumulative += w;
            let upto = delta.scaled(cumulative, total);
            self.add_to_round(i, upto.sub(given));
            given = upto;
        }
    }

    fn add_to_round(&mut self, i: usize, share: Counters) {
        let Some(round) = self.rounds.get_mut(i) else {
            return;
        };
        round.counts.add(share);
        let index = round.end / MINUTE_MS;
        let m = self.minutes.partition_point(|m| m.index < index);
        if let Some(minute) = self.minutes.get_mut(m)
            && minute.index == index
        {
            minute.counts.add(share);
        }
    }

    /// A round that is not after the latest (the wall clock stepped back): its counters
    /// become the baselines, dated at the latest round, and nothing is counted.
    fn rebase(&mut self, latest: u64, samples: &[NodeSample]) {
        for sample in samples {
            self.baselines.insert(sample.slot, baseline(latest, sample));
        }
    }

    fn trim(&mut self, now: u64) {
        let raw = millis_of(RAW_RETENTION);
        while self.rounds.front().is_some_and(|r| r.end + raw < now) {
            self.rounds.pop_front();
        }
        let keep = self.retention_ms;
        while self
            .minutes
            .front()
            .is_some_and(|m| m.index * MINUTE_MS + keep <= now)
        {
            self.minutes.pop_front();
        }
    }
}

fn baseline(at: u64, sample: &NodeSample) -> Baseline {
    Baseline {
        pid: sample.pid,
        uptime: sample.uptime,
        at,
        counters: Counters::of(sample),
        items: sample.items,
        bytes: sample.bytes,
    }
}

fn point(m: &Minute) -> Option<Point> {
    let t = Timestamp::from_second(i64::try_from(m.index * 60).ok()?).ok()?;
    let gets = m.counts.gets();
    let rate = |part: u64| (gets > 0).then(|| part as f64 / gets as f64);
    Some(Point {
        t,
        nodes: m.nodes,
        miss_rate: rate(m.counts.misses),
        hit_rate: rate(m.counts.hits),
        items: m.items,
        bytes: m.bytes,
        requests_per_minute: m.counts.requests as f64 * MINUTE_MS as f64 / m.covered_ms as f64,
    })
}

/// Milliseconds since the Unix epoch; instants before it (a badly set clock) count as 0.
fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis_of)
}

fn millis_of(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
