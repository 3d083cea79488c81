//! `cachepool bench policies`: the hit ratio of every replacement policy of the real store
//! (`cache_node::store::Store`, sharded as in a node) on independent-reference Zipf traces,
//! in-process, with no network.
//!
//! Each trace is generated once per exponent with a fixed seed and replayed against every
//! policy and cache size, so policies see identical requests. A get miss is followed by a set
//! (a read-through cache); the first `--warmup-pct` of requests fill the cache and are not
//! counted. The store's capacity is sized with `item_cost`, so it holds exactly
//! `cache_pct`% of the universe's items however the store accounts for them.

use std::time::Instant;

use anyhow::ensure;
use cache_node::store::{DEFAULT_SHARD_BITS, Policy, Store, StoreMode, item_cost};
use rand::SeedableRng as _;
use rand::rngs::SmallRng;
use serde_json::json;

use super::keys::{KeyDist, KeySampler, mix64};
use super::report::Table;

/// Key length: 16 hex digits of the scrambled rank.
const KEY_LEN: usize = 16;
/// Fixed clock: nothing in the trace expires.
const NOW: u32 = 1_000_000;

/// `cachepool bench policies` flags.
#[derive(Debug, clap::Args)]
pub struct PoliciesArgs {
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000_000)]
    universe: u64,
    /// Requests per trace (the warm-up included).
    #[arg(long, default_value_t = 10_000_000)]
    requests: usize,
    /// Zipf exponents, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.9,1.0")]
    alphas: Vec<f64>,
    /// Cache sizes as percentages of the universe's items, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    cache_pcts: Vec<f64>,
    /// log2 of the store's shard count (each shard runs its own policy); 0 = one queue.
    #[arg(long, default_value_t = DEFAULT_SHARD_BITS)]
    shards_bits: u32,
    /// Value size in bytes (equal for every item).
    #[arg(long, default_value_t = 16)]
    value_size: usize,
    /// Leading percentage of each trace that warms the cache and is not counted.
    #[arg(long, default_value_t = 10.0)]
    warmup_pct: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One policy on one trace and cache size.
#[derive(Debug)]
struct Outcome {
    alpha: f64,
    cache_pct: f64,
    capacity_items: u64,
    policy: Policy,
    hit_ratio: f64,
    /// Items the store held at the end: checks the capacity holds what it should.
    held: u64,
    mreq_per_s: f64,
}

pub fn run(args: &PoliciesArgs) -> anyhow::Result<()> {
    ensure!(
        args.universe > 0 && args.universe <= u64::from(u32::MAX),
        "--universe must be between 1 and 2^32-1"
    );
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(
        (0.0..100.0).contains(&args.warmup_pct),
        "--warmup-pct must be in [0, 100)"
    );
    ensure!(
        args.shards_bits <= 8,
        "--shards-bits must be at most 8 (the store's limit)"
    );
    ensure!(
        args.cache_pcts.iter().all(|p| *p > 0.0 && *p <= 100.0),
        "--cache-pcts must be in (0, 100]"
    );
    ensure!(
        args.alphas.iter().all(|a| *a > 0.0 && a.is_finite()),
        "--alphas must be positive"
    );
    let keys: Vec<[u8; KEY_LEN]> = (0..args.universe).map(key_for_rank).collect();
    let value = vec![b'v'; args.value_size];
    let warm = (args.requests as f64 * args.warmup_pct / 100.0) as usize;
    let mut outcomes = Vec::new();
    for &alpha in &args.alphas {
        let started = Instant::now();
        let trace = zipf_trace(args.universe, args.requests, alpha, args.seed)?;
        eprintln!(
            "zipf {alpha}: {} requests generated in {:.1?}",
            trace.len(),
            started.elapsed()
        );
        for &pct in &args.cache_pcts {
            let capacity_items = ((args.universe as f64 * pct / 100.0).round() as u64).max(1);
            let limit = capacity_items as usize * item_cost(KEY_LEN, args.value_size);
            for policy in Policy::ALL {
                let started = Instant::now();
                let store = Store::with_shards(limit, policy, args.shards_bits);
                let hit_ratio = replay(&store, &trace, &keys, &value, warm);
                let secs = started.elapsed().as_secs_f64();
                store
                    .check_invariants()
                    .map_err(|e| anyhow::anyhow!("store inconsistent after {policy}: {e}"))?;
                let o = Outcome {
                    alpha,
                    cache_pct: pct,
                    capacity_items,
                    policy,
                    hit_ratio,
                    held: store.stats().curr_items,
                    mreq_per_s: trace.len() as f64 / secs / 1e6,
                };
                eprintln!(
                    "zipf {alpha} cache {pct}% {policy}: {:.2}% hits ({:.1} Mreq/s)",
                    100.0 * o.hit_ratio,
                    o.mreq_per_s
                );
                outcomes.push(o);
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(args, &outcomes))?
        );
    } else {
        print!("{}", render(args, &outcomes));
    }
    Ok(())
}

/// The key of a popularity rank: the hex of a bijective hash of the rank, so popular keys are
/// scattered over shards and buckets, and distinct ranks never share a key.
fn key_for_rank(rank: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    let hex = format!("{:016x}", mix64(rank));
    key.copy_from_slice(hex.as_bytes());
    key
}

/// `requests` ranks in `0..universe` drawn i.i.d. from Zipf(alpha).
fn zipf_trace(universe: u64, requests: usize, alpha: f64, seed: u64) -> anyhow::Result<Vec<u32>> {
    let sampler = KeySampler::new(KeyDist::Zipf(alpha), universe, seed)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    // Ranks fit u32: the universe is checked against u32::MAX.
    Ok((0..requests)
        .map(|_| sampler.rank(&mut rng) as u32)
        .collect())
}

/// Replays `trace` as a read-through cache; returns the hit ratio after the first `warm`.
fn replay(store: &Store, trace: &[u32], keys: &[[u8; KEY_LEN]], value: &[u8], warm: usize) -> f64 {
    let mut hits = 0u64;
    for (i, &rank) in trace.iter().enumerate() {
        let key = &keys[rank as usize];
        let hit = store.get(key, None, NOW, |_, _| {});
        if !hit {
            store.store(StoreMode::Set, key, value, 0, 0, NOW);
        }
        if i >= warm {
            hits += u64::from(hit);
        }
    }
    let counted = trace.len().saturating_sub(warm);
    if counted == 0 {
        f64::NAN
    } else {
        hits as f64 / counted as f64
    }
}

fn lru_of<'a>(outcomes: &'a [Outcome], o: &Outcome) -> Option<&'a Outcome> {
    outcomes
        .iter()
        .find(|b| b.policy == Policy::Lru && b.alpha == o.alpha && b.cache_pct == o.cache_pct)
}

fn render(args: &PoliciesArgs, outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "bench policies: universe {}, {} requests per trace ({}% warm-up not counted), keys {} B, \
         values {} B, {} shard(s), seed {}\n\n",
        args.universe,
        args.requests,
        args.warmup_pct,
        KEY_LEN,
        args.value_size,
        1u32 << args.shards_bits,
        args.seed
    );
    let mut t = Table::new([
        "zipf",
        "cache %",
        "capacity items",
        "policy",
        "hit %",
        "vs LRU (points)",
        "items held",
        "Mreq/s",
    ]);
    for o in outcomes {
        let delta = lru_of(outcomes, o).map_or("-".to_string(), |b| {
            format!("{:+.2}", 100.0 * (o.hit_ratio - b.hit_ratio))
        });
        t.row([
            o.alpha.to_string(),
            o.cache_pct.to_string(),
            o.capacity_items.to_string(),
            o.policy.to_string(),
            format!("{:.2}", 100.0 * o.hit_ratio),
            delta,
            o.held.to_string(),
            format!("{:.1}", o.mreq_per_s),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn to_json(args: &PoliciesArgs, outcomes: &[Outcome]) -> serde_json::Value {
    json!({
        "settings": {
            "universe": args.universe, "requests": args.requests, "warmup_pct": args.warmup_pct,
            "key_size": KEY_LEN, "value_size": args.value_size, "shards": 1u32 << args.shards_bits,
            "seed": args.seed,
        },
        "results": outcomes.iter().map(|o| json!({
            "alpha": o.alpha, "cache_pct": o.cache_pct, "capacity_items": o.capacity_items,
            "policy": o.policy.as_str(), "hit_ratio": o.hit_ratio,
            "delta_vs_lru_points": lru_of(outcomes, o).map(|b| 100.0 * (o.hit_ratio - b.hit_ratio)),
            "items_held": o.held, "mreq_per_s": o.mreq_per_s,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_keys_are_distinct_and_fixed_length() {
        let keys: std::collections::HashSet<[u8; KEY_LEN]> =
            (0..10_000).map(key_for_rank).collect();
        assert_eq!(keys.len(), 10_000);
    }

    #[test]
    fn a_cache_holding_the_whole_universe_misses_only_cold_keys() {
        let keys: Vec<_> = (0..100).map(key_for_rank).collect();
        let trace = zipf_trace(100, 20_000, 1.0, 3).unwrap();
        let store = Store::with_shards(100 * item_cost(KEY_LEN, 16), Policy::Lru, 0);
        // The first half touches every key (the rarest is drawn about 1 time in 520).
        let ratio = replay(&store, &trace, &keys, &[b'v'; 16], 10_000);
        assert_eq!(ratio, 1.0);
        assert_eq!(store.stats().curr_items, 100);
    }

    #[test]
    fn lru_replay_matches_ches_approximation() {
        // 10k keys, 1% cache, Zipf 1.0, LRU on one shard: Che's approximation gives 39.05%.
        // A replay that miscounted warm-up, sized the cache wrongly or mis-keyed would be off
        // by far more than the sampling noise of 360k counted requests.
        let keys: Vec<_> = (0..10_000).map(key_for_rank).collect();
        let trace = zipf_trace(10_000, 400_000, 1.0, 9).unwrap();
        let store = Store::with_shards(100 * item_cost(KEY_LEN, 16), Policy::Lru, 0);
        let ratio = replay(&store, &trace, &keys, &[b'v'; 16], 40_000);
        assert!((0.38..0.40).contains(&ratio), "hit ratio {ratio}");
        assert_eq!(store.stats().curr_items, 100);
    }
}
