//! Auto mode against real traffic: the operator grows a pool whose miss rate is too high,
//! holds it steady (no flapping back) while the load stays the same, and shrinks it once the
//! load is light, after the cooldown.
//!
//! Nodes have 4 MiB. The heavy load reads 12,000 keys uniformly (about 0.6 KiB per item,
//! 7 MB in all): one node holds some 60 % of them, so its miss rate settles near 0.4, above
//! `maxMissRate` 0.3; two nodes hold all of them, so the miss rate falls to about zero, below
//! `minMissRate` 0.1. A naive autoscaler would then shrink back to one node and grow again
//! forever; this one must stay at two (it remembers that one node was too small at that
//! load). The light load is 100 reads a second of 100 cached keys: it still fills every
//! window past `minRequestsPerWindow`, at a small fraction of the heavy rate, so the pool
//! may shrink.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cache_node::client::PoolClient;
use cachepool_crds::pool::CachePoolStatus;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::harness::{
    Manifest, RingFollower, TIMEOUT, TestDir, apply_and_start, pool_client, ring_epoch, run,
    settled, shutdown,
};
use cachepool_test_support::load::{Checker, Keys, Load, LoadConfig};

const POOL: &str = "auto";
const WINDOW: Duration = Duration::from_secs(2);
const COOLDOWN: Duration = Duration::from_secs(4);
/// A new node's start plus a hand-off, on a busy machine.
const NODE_START: Duration = Duration::from_secs(5);
/// Windows the pool must hold still under the steady load.
const STEADY_WINDOWS: u32 = 10;
/// One-second load windows after the grow not counted in the steady miss rate: the keys one
/// node had no room for are read, missed and filled for the first time then.
const REFILL_SECONDS: usize = 4;

fn manifest() -> Manifest {
    Manifest {
        auto: true,
        replicas: 1,
        min_replicas: 1,
        max_replicas: 3,
        capacity_mib: 4,
        max_miss_rate: 0.3,
        min_miss_rate: 0.1,
        window_seconds: WINDOW.as_secs() as u32,
        cooldown_seconds: COOLDOWN.as_secs() as u32,
        min_requests_per_window: 50,
        ..Manifest::manual(POOL, 1)
    }
}

/// A steady trickle of reads of a few cached keys: `per_second` gets, filled on a miss.
struct Trickle {
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
    reads: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

impl Trickle {
    async fn start(client: Arc<PoolClient>, keys: usize, per_second: u64) -> Trickle {
        let names: Vec<String> = (0..keys).map(|i| format!("trickle:{i:04}")).collect();
        for name in &names {
            client
                .set(name, b"cached", 0, 0)
                .await
                .unwrap_or_else(|e| panic!("set {name}: {e}"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (reads, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (flag, r, m) = (stop.clone(), reads.clone(), misses.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for name in names.iter().cycle() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                r.fetch_add(1, Ordering::Relaxed);
                if !matches!(client.get(name).await, Ok(Some(_))) {
                    m.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set(name, b"cached", 0, 0).await;
                }
            }
        });
        Trickle {
            stop,
            task,
            reads,
            misses,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .unwrap_or_else(|e| panic!("trickle task: {e}"));
        (
            self.reads.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

fn scale_time_ms(status: &CachePoolStatus) -> Option<i64> {
    status
        .last_scale_time
        .as_ref()
        .map(|t| t.0.as_millisecond())
}

#[test]
fn auto_mode_grows_on_misses_holds_under_steady_load_and_shrinks_after_cooldown() {
    run(async {
        let dir = TestDir::new("auto");
        let setup = apply_and_start(&dir, &manifest(), 1).await;
        let api = setup.operator.api.clone();
        api.scale(POOL, 1)
            .await
            .expect_error(409, "scale in auto mode");
        let client = pool_client(&api, POOL).await;
        let follower = RingFollower::start(api.clone(), POOL, client.clone());

        // Grow: one node cannot hold the heavy load's keys.
        let checker = Arc::new(Checker::new(Keys::new(12_000, 400, 200)));
        let heavy = LoadConfig {
            readers: 4,
            writers: 0,
            zipf_s: 0.0,
            ..LoadConfig::default()
        };
        let load = Load::start(client.clone(), checker.clone(), heavy);
        let started = Instant::now();
        // The first window wholly under load ends within two windows of the start.
        let grow_limit = 2 * WINDOW + NODE_START;
        let grown = follower
            .wait_for("the grown ring", started, grow_limit, |e| e.members > 1)
            .await;
        let to_grown_ring = grown.at - started;
        assert_eq!(grown.members, 2, "1 node x expandRatio 2");
        let status = api.wait_settled(POOL, 2, TIMEOUT).await;
        let to_settled = started.elapsed();
        let grow_time = scale_time_ms(&status).unwrap_or_else(|| panic!("no lastScaleTime"));
        let epoch = ring_epoch(&status);
        assert_eq!(dir.wait_node_count(2, TIMEOUT).await.len(), 2);
        println!(
            "== e2e auto mode: FIGURE load start -> grown ring at client {:.1} ms, -> settled at 2 \
             {:.1} ms; reason: {:?}",
            to_grown_ring.as_secs_f64() * 1e3,
            to_settled.as_secs_f64() * 1e3,
            status.last_scale_reason
        );

        // Hold: the same load for ten windows at two nodes, whose miss rate is below
        // minMissRate, so only the autoscaler's memory keeps it from shrinking.
        let hold_from = load.window_now() + 1;
        load.until_window(hold_from).await;
        let hold_end = Instant::now() + STEADY_WINDOWS * WINDOW;
        let mut samples = Vec::new();
        while Instant::now() < hold_end {
            let s = api.status(POOL).await;
            assert_eq!(
                (scale_time_ms(&s), ring_epoch(&s), s.desired_replicas),
                (Some(grow_time), epoch, 2),
                "a scale event under a steady load: {s:#?}"
            );
            assert!(settled(&s, 2), "not settled at 2: {s:#?}");
            samples.push(s.miss_rate);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let hold_to = load.window_now();
        let windows = load.stop_at(hold_to).await;
        for (w, window) in windows.iter().enumerate() {
            println!(
                "   FIGURE window {w:2}{}: {:6} reads, miss rate {:.3}",
                if w >= hold_from { " (hold)" } else { "" },
                window.reads,
                1.0 - window.hit_pct() / 100.0
            );
        }
        // The first seconds at two nodes refill the keys one node had no room for.
        let held = &windows[hold_from + REFILL_SECONDS..];
        let reads: u64 = held.iter().map(|w| w.reads).sum();
        let hits: u64 = held.iter().map(|w| w.hits).sum();
        let miss_rate = 1.0 - hits as f64 / reads.max(1) as f64;
        assert!(
            miss_rate < 0.1,
            "the steady load's miss rate at 2 nodes is {miss_rate:.3}, not below minMissRate: \
             the test no longer shows that the pool resists shrinking"
        );
        println!("   status missRate samples while holding: {samples:?}");
        let v = checker.verdict();
        assert_eq!(v.stale, 0, "stale reads: {:#?}", v.samples);
        assert_eq!(v.corrupt, 0, "corrupt reads: {:#?}", v.samples);
        assert!(
            follower
                .events()
                .iter()
                .all(|e| e.at < grown.at || e.members == 2),
            "ring changes while holding: {:?}",
            follower.events()
        );

        // Shrink: a light load, well below the one that filled the pool.
        let trickle = Trickle::start(client.clone(), 100, 100).await;
        let light = Instant::now();
        let shrunk = follower
            .wait_for(
                "the shrunk ring",
                light,
                COOLDOWN + 4 * WINDOW + NODE_START,
                |e| e.members < 2,
            )
            .await;
        let status = api.wait_settled(POOL, 1, TIMEOUT).await;
        let (reads, misses) = trickle.stop().await;
        let shrink_time = scale_time_ms(&status).unwrap_or_else(|| panic!("no lastScaleTime"));
        assert!(
            shrink_time - grow_time >= COOLDOWN.as_millis() as i64,
            "shrank {} ms after the grow, within the cooldown",
            shrink_time - grow_time
        );
        assert_eq!(dir.wait_node_count(1, TIMEOUT).await.len(), 1);
        println!(
            "   FIGURE light load ({reads} reads, {misses} misses) -> shrunk ring at client {:.1} ms; \
             reason: {:?}",
            (shrunk.at - light).as_secs_f64() * 1e3,
            status.last_scale_reason
        );
        drop(follower);
        shutdown(&dir, setup.operator).await;
    });
}
