//! The open-loop, cache-aside traffic of `bench resize`, and the bookkeeping that judges it.
//!
//! **Open loop.** Request `i` is due at `start + i / rate`, whatever happened to the ones
//! before it; each is its own task, so a stalled pool cannot slow the sending down. Latency
//! runs from the *due* time to the end of the request, so time a request spent waiting behind
//! a stall counts (coordinated omission corrected, as wrk2 and HdrHistogram's
//! `recordCorrectedValue` intend).
//!
//! **Cache aside.** A read is a `get`; on a miss the application reads its database (here an
//! in-memory version table, free) and fills the cache with `set`. A write updates the
//! database, then `set`s the new version in the cache. The latency of a read that missed
//! includes its fill, as an application would see it.
//!
//! **Judging.** Every value is `v<version>:` followed by padding whose length depends on the
//! key, so a read names the write it returns and a value of the wrong key or a torn one is
//! caught. Writes and fills of one key never overlap (a key being written is skipped by other
//! writers and fillers), so each key's cached versions are ordered in real time:
//! - a hit is **stale** when it returns an older version than the newest one whose cache write
//!   had been acknowledged before the read began;
//! - a miss is **lost** when the key had been stored and acknowledged, nothing touched it
//!   since, and nothing was in flight on it: the pool dropped a value it held. Only meaningful
//!   when the nodes have room for every key (experiments 1–3); with capacity-bound nodes an
//!   eviction looks the same.
//! - the first read of each stored key after a layout change is a **probe**: the fraction of
//!   probes that miss is the fraction of the cache a resize made unreachable.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;

use super::pool::Router;
use crate::keys::{KeyDist, KeySampler, write_key};

/// `cached` of a key that the pool is not known to hold.
const NOT_CACHED: u64 = u64::MAX;
/// Layout changes whose probes are counted; an experiment makes a handful.
pub const MAX_LAYOUTS: usize = 64;

/// The keys, their value sizes and what the application knows of each.
#[derive(Debug)]
pub struct KeySpace {
    key_len: usize,
    sizes: Vec<u32>,
    keys: Vec<KeyState>,
}

#[derive(Debug, Default)]
struct KeyState {
    /// The database's version of the key (bumped before the cache write).
    db: AtomicU64,
    /// The newest version whose cache write was acknowledged.
    acked: AtomicU64,
    /// The layout under which the pool last acknowledged storing the key, or `NOT_CACHED`.
    cached: AtomicU64,
    /// A write or fill of the key is in flight.
    busy: AtomicBool,
    /// Writes and fills begun on the key.
    ops: AtomicU64,
    /// The last layout whose first read of this key was counted as a probe (+1; 0: none).
    probed: AtomicU64,
}

impl KeySpace {
    /// `n` keys with value sizes from `min` to `max` bytes, skewed towards small ones: size
    /// `min * (max / min)^(u^3)` for uniform `u`, so the median is about `min * (max/min)^0.125`
    /// and a few keys carry values of tens of KiB (web objects, thumbnails and images).
    pub fn new(n: usize, min: usize, max: usize, seed: u64) -> KeySpace {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_5173);
        let (min, max) = (min.max(1) as f64, max.max(min.max(1)) as f64);
        let sizes = (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                (min * (max / min).powf(u * u * u)).round() as u32
            })
            .collect();
        let key_len = 2 + n.max(2).saturating_sub(1).ilog10() as usize + 1;
        KeySpace {
            key_len,
            sizes,
            keys: (0..n).map(|_| KeyState::default()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of key `i`.
    pub fn name(&self, i: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.key_len);
        write_key(&mut out, i as u64, self.key_len);
        out
    }

    /// Bytes of values over all keys (at version 1).
    pub fn value_bytes(&self) -> u64 {
        self.sizes.iter().map(|&s| u64::from(s) + 3).sum()
    }

    /// Key and value bytes over all keys: what the pool holds when it holds every key.
    pub fn total_bytes(&self) -> u64 {
        self.value_bytes() + (self.key_len * self.len()) as u64
    }

    /// Version `version` of key `i`'s value.
    pub fn value(&self, i: usize, version: u64) -> Vec<u8> {
        let pad = self.sizes[i] as usize;
        let mut out = Vec::with_capacity(pad + 24);
        out.extend_from_slice(format!("v{version}:").as_bytes());
        out.extend((0..pad).map(|j| b'a' + ((i + j) % 26) as u8));
        out
    }

    /// The version a value of key `i` carries, or `None` if it is not a whole value of key `i`.
    pub fn parse(&self, i: usize, data: &[u8]) -> Option<u64> {
        let colon = data.iter().take(24).position(|&b| b == b':')?;
        let version: u64 = std::str::from_utf8(data.get(1..colon)?)
            .ok()?
            .parse()
            .ok()?;
        let pad = &data[colon + 1..];
        let want = self.sizes[i] as usize;
        let ok = data.first() == Some(&b'v')
            && pad.len() == want
            && pad
                .iter()
                .enumerate()
                .take(16)
                .chain(pad.iter().enumerate().skip(want.saturating_sub(16)))
                .all(|(j, &b)| b == b'a' + ((i + j) % 26) as u8);
        ok.then_some(version)
    }

    /// Marks key `i` as stored at `version` under layout `layout` (the prefill).
    pub fn mark_stored(&self, i: usize, version: u64, layout: u64) {
        let k = &self.keys[i];
        k.db.fetch_max(version, Ordering::SeqCst);
        k.acked.fetch_max(version, Ordering::SeqCst);
        k.cached.store(layout, Ordering::SeqCst);
    }

    /// Keys the pool is known to hold (stored and acknowledged, never found lost since).
    pub fn cached_keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.cached.load(Ordering::Relaxed) != NOT_CACHED)
            .map(|(i, _)| i)
    }
}

/// The measurements of one second (by completion time).
#[derive(Debug)]
pub struct Second {
    pub ops: u64,
    pub gets: u64,
    pub hits: u64,
    pub writes: u64,
    pub skipped: u64,
    pub errors: u64,
    pub stale: u64,
    pub corrupt: u64,
    pub lost: u64,
    /// Latency from due time to completion, in microseconds.
    pub latency: Histogram<u64>,
}

impl Second {
    fn new() -> anyhow::Result<Second> {
        Ok(Second {
            ops: 0,
            gets: 0,
            hits: 0,
            writes: 0,
            skipped: 0,
            errors: 0,
            stale: 0,
            corrupt: 0,
            lost: 0,
            latency: Histogram::new_with_bounds(1, 600_000_000, 3)
                .context("creating a latency histogram")?,
        })
    }
}

/// What the traffic shares with the code that resizes the pool.
#[derive(Debug)]
pub struct Shared {
    pub keys: KeySpace,
    /// Time zero of the experiment is `origin + t0` (set when the traffic starts).
    origin: Instant,
    t0_ns: AtomicU64,
    seconds: Vec<Mutex<Second>>,
    /// The layout (routing) in force: bumped each time traffic switches to a new one.
    pub layout: AtomicU64,
    /// Gets and their misses since the start (the autoscaler's windows read these).
    pub gets: AtomicU64,
    pub misses: AtomicU64,
    /// Requests begun and not finished.
    pub in_flight: AtomicU32,
    /// Probes and lost probes per layout.
    probes: Vec<(AtomicU64, AtomicU64)>,
    /// True when nodes cannot hold every key (misses may be evictions, not losses).
    pub capacity_bound: bool,
}

impl Shared {
    pub fn new(keys: KeySpace, seconds: usize, capacity_bound: bool) -> anyhow::Result<Shared> {
        let mut secs = Vec::with_capacity(seconds);
        for _ in 0..seconds {
            secs.push(Mutex::new(Second::new()?));
        }
        Ok(Shared {
            keys,
            origin: Instant::now(),
            t0_ns: AtomicU64::new(0),
            seconds: secs,
            layout: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            probes: (0..MAX_LAYOUTS)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            capacity_bound,
        })
    }

    /// Makes now time zero of the experiment (after the prefill).
    pub fn start_clock(&self) {
        let ns = self.origin.elapsed().as_nanos() as u64;
        self.t0_ns.store(ns, Ordering::SeqCst);
    }

    /// Time zero of the experiment.
    pub fn start(&self) -> Instant {
        self.origin + Duration::from_nanos(self.t0_ns.load(Ordering::SeqCst))
    }

    /// Seconds since the experiment began.
    pub fn elapsed(&self) -> f64 {
        self.start().elapsed().as_secs_f64()
    }

    /// The per-second measurements, in order (the traffic must have ended).
    pub fn into_seconds(self) -> Vec<Second> {
        self.seconds
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            .collect()
    }

    /// Probes and lost probes of layout `layout`.
    pub fn probes(&self, layout: u64) -> (u64, u64) {
        self.probes.get(layout as usize).map_or((0, 0), |(p, l)| {
            (p.load(Ordering::Relaxed), l.load(Ordering::Relaxed))
        })
    }

    fn record(&self, done: Instant, due: Instant, f: impl FnOnce(&mut Second)) {
        let at = done.saturating_duration_since(self.start()).as_secs() as usize;
        if let Some(cell) = self.seconds.get(at) {
            let mut s = cell.lock().unwrap_or_else(PoisonError::into_inner);
            s.ops += 1;
            s.latency
                .saturating_record(done.saturating_duration_since(due).as_micros() as u64);
            f(&mut s);
        }
    }
}

/// The traffic's settings.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    /// Requests per second, sent on schedule.
    pub rate: f64,
    /// Fraction of requests that are reads.
    pub read_ratio: f64,
    pub dist: KeyDist,
    pub seed: u64,
}

/// Sends `traffic` through `router` from now until `until`, then waits for the requests in
/// flight. Returns the number of requests sent.
pub async fn drive(
    shared: Arc<Shared>,
    router: Arc<Router>,
    traffic: Traffic,
    until: Instant,
) -> anyhow::Result<u64> {
    let sampler = KeySampler::new(traffic.dist, shared.keys.len() as u64, traffic.seed)?;
    let mut rng = SmallRng::seed_from_u64(traffic.seed);
    let begin = Instant::now();
    let period = Duration::from_secs_f64(1.0 / traffic.rate.max(1e-3));
    let mut tasks = JoinSet::new();
    let mut sent = 0u64;
    loop {
        let due = begin + period.mul_f64(sent as f64);
        if due >= until || crate::interrupted() {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let key = sampler.sample(&mut rng) as usize;
        let read = rng.random::<f64>() < traffic.read_ratio;
        let (shared, router) = (shared.clone(), router.clone());
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            if read {
                read_op(&shared, &router, key, due).await;
            } else {
                write_op(&shared, &router, key, due).await;
            }
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        sent += 1;
        while let Some(done) = tasks.try_join_next() {
            done.context("a request task panicked")?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a request task panicked")?;
    }
    Ok(sent)
}

async fn read_op(shared: &Shared, router: &Router, i: usize, due: Instant) {
    let keys = &shared.keys;
    let k = &keys.keys[i];
    let name = keys.name(i);
    let acked = k.acked.load(Ordering::SeqCst);
    let cached = k.cached.load(Ordering::SeqCst);
    let busy = k.busy.load(Ordering::SeqCst);
    let ops = k.ops.load(Ordering::SeqCst);
    let layout = shared.layout.load(Ordering::SeqCst);
    let got = router.get(&name).await;
    // The first read of a stored key under a new layout: can the pool still find it?
    let probe = cached != NOT_CACHED
        && cached < layout
        && !busy
        && k.probed.swap(layout + 1, Ordering::SeqCst) != layout + 1;
    shared.gets.fetch_add(1, Ordering::Relaxed);
    let (mut stale, mut corrupt, mut lost, mut error, mut hit) =
        (false, false, false, false, false);
    match &got {
        Ok(Some(v)) => match keys.parse(i, &v.data) {
            Some(version) => {
                hit = true;
                stale = version < acked;
            }
            None => corrupt = true,
        },
        Ok(None) => {
            let untouched = k.ops.load(Ordering::SeqCst) == ops && !k.busy.load(Ordering::SeqCst);
            lost = cached != NOT_CACHED && !busy && untouched && !shared.capacity_bound;
        }
        Err(_) => error = true,
    }
    if probe && let Some((p, l)) = shared.probes.get(layout as usize) {
        p.fetch_add(1, Ordering::Relaxed);
        if !hit {
            l.fetch_add(1, Ordering::Relaxed);
        }
    }
    if !hit {
        shared.misses.fetch_add(1, Ordering::Relaxed);
        if lost {
            k.cached.store(NOT_CACHED, Ordering::SeqCst);
        }
        // Cache aside: read the database, fill the cache.
        if !k.busy.swap(true, Ordering::SeqCst) {
            k.ops.fetch_add(1, Ordering::SeqCst);
            let version = k.db.load(Ordering::SeqCst);
            let layout = shared.layout.load(Ordering::SeqCst);
            if router.set(&name, &keys.value(i, version)).await.is_ok() {
                k.acked.fetch_max(version, Ordering::SeqCst);
                k.cached.store(layout, Ordering::SeqCst);
            } else {
                error = true;
            }
            k.busy.store(false, Ordering::SeqCst);
        }
    }
    shared.record(Instant::now(), due, |s| {
        s.gets += 1;
        s.hits += u64::from(hit);
        s.stale += u64::from(stale);
        s.corrupt += u64::from(corrupt);
        s.lost += u64::from(lost);
        s.errors += u64::from(error);
    });
}

async fn write_op(shared: &Shared, router: &Router, i: usize, due: Instant) {
    let keys = &shared.keys;
    let k = &keys.keys[i];
    if k.busy.swap(true, Ordering::SeqCst) {
        // Another write or fill of this key runs: the application would serialise on it;
        // skipping keeps every key's cache writes ordered (see the module documentation).
        shared.record(Instant::now(), due, |s| s.skipped += 1);
        return;
    }
    k.ops.fetch_add(1, Ordering::SeqCst);
    let version = k.db.fetch_add(1, Ordering::SeqCst) + 1;
    let layout = shared.layout.load(Ordering::SeqCst);
    let ok = router
        .set(&keys.name(i), &keys.value(i, version))
        .await
        .is_ok();
    if ok {
        k.acked.fetch_max(version, Ordering::SeqCst);
        k.cached.store(layout, Ordering::SeqCst);
    }
    k.busy.store(false, Ordering::SeqCst);
    shared.record(Instant::now(), due, |s| {
        s.writes += 1;
        s.errors += u64::from(!ok);
    });
}

/// Stores version 1 of every key through `router` (`tasks` at a time) and marks them stored.
pub async fn prefill(
    shared: &Arc<Shared>,
    router: &Arc<Router>,
    tasks: usize,
) -> anyhow::Result<()> {
    let n = shared.keys.len();
    let mut set = JoinSet::new();
    for t in 0..tasks.max(1) {
        let (shared, router) = (shared.clone(), router.clone());
        let step = tasks.max(1);
        set.spawn(async move {
            let layout = shared.layout.load(Ordering::SeqCst);
            let mut i = t;
            while i < n {
                crate::check_interrupted()?;
                router
                    .set(&shared.keys.name(i), &shared.keys.value(i, 1))
                    .await
                    .with_context(|| format!("prefilling key {i}"))?;
                shared.keys.mark_stored(i, 1, layout);
                i += step;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = set.join_next().await {
        done.context("a prefill task panicked")??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_their_version_and_key() {
        let keys = KeySpace::new(100, 300, 100 << 10, 1);
        for i in [0, 7, 99] {
            let v = keys.value(i, 42);
            assert_eq!(keys.parse(i, &v), Some(42));
            assert_eq!(keys.parse((i + 1) % 100, &v), None);
            assert_eq!(keys.parse(i, &v[..v.len() - 1]), None);
        }
    }

    #[test]
    fn sizes_span_the_range_and_favour_small_values() {
        let keys = KeySpace::new(10_000, 300, 100 << 10, 1);
        let min = *keys.sizes.iter().min().unwrap();
        let max = *keys.sizes.iter().max().unwrap();
        assert!((300..400).contains(&min), "{min}");
        assert!(max > 60 << 10 && max <= 100 << 10, "{max}");
        let mut sorted = keys.sizes.clone();
        sorted.sort_unstable();
        assert!(sorted[5000] < 1024, "median {}", sorted[5000]);
    }
}
