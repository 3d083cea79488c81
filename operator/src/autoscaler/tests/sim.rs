//! "Recorded" miss-rate series: a small deterministic simulation of a pool of LRU caches,
//! keys placed by the real ring function, under seeded Zipf, uniform and scan loads, so that
//! growing really lowers the miss rate and shrinking really raises it. The autoscaler then
//! runs closed-loop over it through the same [`Harness`] as the synthetic tests.
//!
//! A resize hands every cached item to its owner on the new ring in recency order, the way
//! the operator's hand-off keeps items, so a resize adds no misses for cached keys and a
//! shrink keeps the most recent items that fit.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;

use cachepool_crds::ring::jump_consistent_hash;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

/// One node's store: least recently used first out, counted in items.
#[derive(Debug)]
struct Lru {
    capacity: usize,
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            stamp_of: HashMap::new(),
            by_stamp: BTreeMap::new(),
        }
    }

    /// Touch `key` at `stamp`; false (a miss) when it was not cached, and then it is filled,
    /// as the web app fills the pool after a miss.
    fn get_or_fill(&mut self, key: u64, stamp: u64) -> bool {
        let hit = match self.stamp_of.insert(key, stamp) {
            Some(old) => {
                self.by_stamp.remove(&old);
                true
            }
            None => false,
        };
        self.by_stamp.insert(stamp, key);
        if self.stamp_of.len() > self.capacity
            && let Some((_, oldest)) = self.by_stamp.pop_first()
        {
            self.stamp_of.remove(&oldest);
        }
        hit
    }
}

/// A pool of equal LRU nodes; `owner` is the ring's jump hash over a mixed key id (standing in
/// for xxh3 of the key's bytes).
#[derive(Debug)]
pub(super) struct SimPool {
    nodes: Vec<Lru>,
    capacity: usize,
    clock: u64,
}

fn mix(key: u64) -> u64 {
    // splitmix64's finaliser: spreads consecutive ids over the whole hash space.
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SimPool {
    pub(super) fn new(size: u32, capacity: usize) -> Self {
        Self {
            nodes: (0..size).map(|_| Lru::new(capacity)).collect(),
            capacity,
            clock: 0,
        }
    }

    fn size(&self) -> u32 {
        self.nodes.len() as u32
    }

    fn owner(key: u64, size: u32) -> usize {
        jump_consistent_hash(mix(key), NonZeroU32::new(size).expect("pool has nodes")) as usize
    }

    fn get(&mut self, key: u64) -> bool {
        self.clock += 1;
        let node = Self::owner(key, self.size());
        self.nodes[node].get_or_fill(key, self.clock)
    }

    /// Move to `size` nodes, handing every cached item to its new owner, oldest first so
    /// that each node keeps its most recent items.
    pub(super) fn resize(&mut self, size: u32) {
        if size == self.size() {
            return;
        }
        let mut items: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .flat_map(|n| n.by_stamp.iter().map(|(&s, &k)| (s, k)))
            .collect();
        items.sort_unstable();
        self.nodes = (0..size).map(|_| Lru::new(self.capacity)).collect();
        for (stamp, key) in items {
            self.nodes[Self::owner(key, size)].get_or_fill(key, stamp);
        }
    }
}

/// Which keys a load asks for.
#[derive(Debug)]
pub(super) enum Keys {
    /// Zipf over `cdf.len()` keys starting at id `base`: rank `i` has weight `(i+1)^-alpha`.
    Zipf { cdf: Vec<f64>, base: u64 },
    /// Never the same key twice: every get is a compulsory miss, whatever the memory.
    Scan { next: u64 },
}

impl Keys {
    pub(super) fn zipf(keys: usize, alpha: f64, base: u64) -> Self {
        let mut cdf: Vec<f64> = (0..keys)
            .scan(0.0, |sum, i| {
                *sum += ((i + 1) as f64).powf(-alpha);
                Some(*sum)
            })
            .collect();
        let total = cdf.last().copied().unwrap_or(1.0);
        cdf.iter_mut().for_each(|c| *c /= total);
        Keys::Zipf { cdf, base }
    }

    fn next(&mut self, rng: &mut SmallRng) -> u64 {
        match self {
            Keys::Zipf { cdf, base } => {
                let u: f64 = rng.random();
                let rank = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
                *base + rank as u64
            }
            Keys::Scan { next } => {
                *next += 1;
                *next
            }
        }
    }
}

/// A seeded load: `gets` requests per window drawn from `keys`.
#[derive(Debug)]
pub(super) struct Load {
    pub(super) keys: Keys,
    pub(super) gets: u64,
    rng: SmallRng,
}

impl Load {
    pub(super) fn new(keys: Keys, gets: u64, seed: u64) -> Self {
        Self {
            keys,
            gets,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// One window of this load against `pool`: (gets, misses).
    pub(super) fn window(&mut self, pool: &mut SimPool) -> (u64, u64) {
        let misses = (0..self.gets)
            .filter(|_| !pool.get(self.keys.next(&mut self.rng)))
            .count() as u64;
        (self.gets, misses)
    }
}

/// The autoscaler closed-loop over a simulated pool: each window the harness applies the
/// last decision (the hand-off happens at the window's start), then the load runs against
/// the pool at its current size.
pub(super) struct Loop {
    pub(super) harness: Harness,
    pub(super) pool: SimPool,
    /// Miss rate of each window, with the pool size it ran at.
    pub(super) series: Vec<(u32, f64)>,
}

impl Loop {
    /// Starts at `size` nodes, warmed with `warm` windows of `load` before the autoscaler
    /// sees any traffic: a cold pool's first windows measure the start, not the workload.
    pub(super) fn new(spec: ScalingSpec, size: u32, capacity: usize, load: &mut Load) -> Self {
        let mut pool = SimPool::new(size, capacity);
        for _ in 0..3 {
            load.window(&mut pool);
        }
        Self {
            harness: Harness::new(spec, size),
            pool,
            series: Vec::new(),
        }
    }

    pub(super) fn run(&mut self, windows: usize, load: &mut Load) {
        for _ in 0..windows {
            let pool = &mut self.pool;
            let series = &mut self.series;
            self.harness.step_with(|size| {
                pool.resize(size);
                let (gets, misses) = load.window(pool);
                series.push((size, misses as f64 / gets as f64));
                (gets, misses)
            });
        }
    }
}

/// Steady miss rate of `keys` at each size in `sizes` (after warming), for the figures.
fn miss_rate_by_size(sizes: &[u32], capacity: usize, make: impl Fn() -> Keys) -> Vec<f64> {
    sizes
        .iter()
        .map(|&size| {
            let mut pool = SimPool::new(size, capacity);
            let mut load = Load::new(make(), 20_000, 7);
            for _ in 0..5 {
                load.window(&mut pool);
            }
            let (gets, misses) = (0..3)
                .map(|_| load.window(&mut pool))
                .fold((0, 0), |(g, m), (dg, dm)| (g + dg, m + dm));
            misses as f64 / gets as f64
        })
        .collect()
}

const CAPACITY: usize = 1000;

/// Zipf over 40 000 keys, alpha 0.9: a typical cache load, where memory helps with
/// diminishing returns.
fn zipf_keys() -> Keys {
    Keys::zipf(40_000, 0.9, 0)
}

/// A nearly flat load over 1 900 keys: 1.9 nodes' worth, so one node misses well over 40 %
/// and two nodes hold everything. The original 1 <-> 2 flip-flop.
fn flat_keys() -> Keys {
    Keys::zipf(1_900, 0.3, 1_000_000)
}

#[test]
fn simulated_miss_rate_falls_as_the_pool_grows() {
    let sizes = [1, 2, 3, 4, 6, 8];
    let zipf = miss_rate_by_size(&sizes, CAPACITY, zipf_keys);
    let flat = miss_rate_by_size(&sizes, CAPACITY, flat_keys);
    let scan = miss_rate_by_size(&sizes, CAPACITY, || Keys::Scan { next: 0 });
    eprintln!("sizes {sizes:?}\nzipf  {zipf:.3?}\nflat  {flat:.3?}\nscan  {scan:.3?}");
    for pair in zipf.windows(2) {
        assert!(
            pair[1] < pair[0],
            "zipf miss rate must fall with size: {zipf:?}"
        );
    }
    assert!(
        zipf[0] > 0.4,
        "one node is too small for the zipf load: {zipf:?}"
    );
    assert!(
        flat[0] > 0.4 && flat[1] < 0.1,
        "flat load flips 1 <-> 2: {flat:?}"
    );
    assert!(
        scan.iter().all(|&m| m == 1.0),
        "a scan always misses: {scan:?}"
    );
}

#[test]
fn closed_loop_zipf_grows_until_healthy_then_stays() {
    let mut load = Load::new(zipf_keys(), 12_000, 1);
    let mut sim = Loop::new(auto_spec(), 1, CAPACITY, &mut load);
    sim.run(60, &mut load);
    let h = &sim.harness;
    eprintln!("scales {:#?}", h.scales);
    assert!(
        h.scales.iter().all(|s| s.to > s.from),
        "only grows: {:#?}",
        h.scales
    );
    assert!(
        (2..=4).contains(&h.scales.len()),
        "a few grows reach a healthy size: {:#?}",
        h.scales
    );
    assert!(h.scales[0].window == 0, "the first high window grows");
    let last = h.scales.last().expect("grew").window;
    assert!(last < 20, "healthy within 20 windows, last scale at {last}");
    let (size, miss) = *sim.series.last().expect("ran");
    assert!(
        miss <= 0.4 && size <= 8,
        "healthy at the end: {size} nodes, miss {miss:.3}"
    );
}

#[test]
fn closed_loop_flat_load_settles_at_two_nodes_instead_of_flipping() {
    let mut load = Load::new(flat_keys(), 6_000, 2);
    let mut sim = Loop::new(auto_spec(), 1, CAPACITY, &mut load);
    sim.run(40, &mut load);
    let h = &sim.harness;
    assert_eq!(
        h.scales.iter().map(|s| (s.from, s.to)).collect::<Vec<_>>(),
        [(1, 2)],
        "one grow, then no flip back: {:#?}",
        h.scales
    );
    let quiet = h.windows - 1 - h.scales[0].window;
    assert!(quiet >= 10, "no scale event for {quiet} windows");
    let low = sim.series.iter().skip(3).filter(|(_, m)| *m < 0.1).count();
    assert!(
        low >= 30,
        "two nodes keep the miss rate below minMissRate ({low} windows)"
    );
    let reason = h.last.as_ref().expect("ran").reason();
    assert!(
        reason.contains("1 node proved too small") && reason.contains("staying at 2 nodes"),
        "{reason}"
    );
}

#[test]
fn closed_loop_scan_does_not_grow_again_before_the_backoff() {
    let mut spec = auto_spec();
    spec.max_replicas = 16;
    let mut load = Load::new(Keys::Scan { next: 0 }, 6_000, 3);
    let mut sim = Loop::new(spec, 1, CAPACITY, &mut load);
    // 70 minutes: the naive rule would be at 16 nodes after 10 windows.
    sim.run(70, &mut load);
    let h = &sim.harness;
    let at: Vec<usize> = h.scales.iter().map(|s| s.window).collect();
    eprintln!("grows at windows {at:?}");
    assert_eq!(
        at.len(),
        3,
        "1 -> 2, then 2 -> 4 and 4 -> 8 after back-offs: {at:?}"
    );
    // Back-off 10 windows, then 20, on top of the cooldown.
    assert!(at[1] - at[0] >= 13 && at[2] - at[1] >= 23, "{at:?}");
    assert!(
        h.holds()
            .any(|r| r.contains("more memory does not help this workload")),
        "the hold says why"
    );
}

#[test]
fn closed_loop_follows_a_day_and_night_load() {
    let mut load = Load::new(zipf_keys(), 12_000, 4);
    let mut sim = Loop::new(auto_spec(), 1, CAPACITY, &mut load);
    sim.run(40, &mut load);
    let day = sim.harness.size;
    assert!(day >= 2, "the day load grew the pool to {day}");

    // Night: a tenth of the traffic over a small set of keys.
    let mut night = Load::new(Keys::zipf(500, 0.9, 0), 1_200, 5);
    sim.run(40, &mut night);
    let small = sim.harness.size;
    assert!(
        small < day,
        "the night load shrank the pool: {day} -> {small}"
    );

    let before = sim.harness.scales.len();
    load.gets = 12_000;
    sim.run(40, &mut load);
    let morning = sim.harness.size;
    assert!(
        morning > small,
        "the morning load grew it again: {small} -> {morning}"
    );
    let (_, miss) = *sim.series.last().expect("ran");
    assert!(miss <= 0.4, "healthy in the morning: {miss:.3}");
    let scales = &sim.harness.scales[before..];
    assert!(
        scales.iter().all(|s| s.to > s.from),
        "no shrink under the morning load: {scales:#?}"
    );
}
