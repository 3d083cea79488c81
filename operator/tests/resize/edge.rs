//! Edge cases of resizing: a source node dying mid hand-off, a second resize asked for while a
//! migration runs, an empty pool, values of the maximum item size; and a node stopped in
//! process while it hands off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_node::handoff::State;
use cachepool_crds::ring::{RingError, slot_for};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::harness::{Pool, ResizeError, run};
use crate::load::{self, Checker, Keys, Load, LoadConfig, Window};
use crate::scenario::{CAPACITY_MIB, HIT_RATIO_POINTS};

fn print_windows(title: &str, windows: &[Window]) {
    println!("== {title}");
    for (w, window) in windows.iter().enumerate() {
        println!(
            "   window {w:2}: {:6} reads, hit ratio {:6.2} %",
            window.reads,
            window.hit_pct()
        );
    }
}

/// A pool of `n` nodes, prefilled with 20,000 keys of 1 to 3 KiB (about 40 MB, so that a
/// rate-limited hand-off takes seconds), and the checker of those keys.
async fn loaded_pool(n: u32, rate_bytes_per_sec: u64) -> (Pool, Arc<Checker>) {
    let mut pool = Pool::start(n, CAPACITY_MIB).await;
    pool.options.rate_bytes_per_sec = rate_bytes_per_sec;
    let checker = Arc::new(Checker::new(Keys::new(20_000, 1024, 2048)));
    assert_eq!(
        load::prefill(pool.client(), checker.clone(), 16).await,
        0,
        "prefill writes failed"
    );
    (pool, checker)
}

/// A source node dies while it hands off (grow 2 -> 3, slot 1 killed): the survivor's
/// hand-off completes, the migration completes with the dead node reported, a fresh node takes
/// its slot, no read is stale, and the keys the dead node still held are misses.
#[test]
fn grow_completes_without_a_source_node_that_dies_mid_handoff() {
    run(async {
        let (mut pool, checker) = loaded_pool(2, 4 << 20).await;
        let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
        load.until_window(2).await;
        pool.begin_grow(3)
            .await
            .unwrap_or_else(|e| panic!("grow: {e}"));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let victim = pool.member(1);
        let (dead_addr, dead_admin) = (victim.addr.clone(), victim.admin_addr.clone());
        let before_kill = victim
            .admin
            .handoff()
            .await
            .unwrap_or_else(|e| panic!("status: {e}"));
        assert_eq!(
            before_kill.state,
            State::Running,
            "the hand-off must still run when the node dies"
        );
        println!(
            "   slot 1 killed mid hand-off: {} of {} foreign keys moved",
            before_kill.keys_moved, before_kill.keys_total
        );
        pool.kill(1).await;
        let killed_at = Instant::now();
        let post_mortem = pool.member(1).items();

        let resize = pool
            .finish()
            .await
            .unwrap_or_else(|e| panic!("finish: {e}"));
        println!("   {}", resize.describe());
        println!("   hand-off error: {:?}", resize.handoff_error);
        assert_eq!(
            resize.dead,
            vec![dead_addr.clone()],
            "the dead node is reported"
        );
        let error = resize.handoff_error.clone().unwrap_or_default();
        assert!(
            error.contains(&dead_addr) || error.contains(&dead_admin),
            "the hand-off error names the dead node: {error}"
        );
        assert_eq!(resize.statuses.len(), 1, "the survivor's status");
        assert_eq!(
            resize.statuses[0].state,
            State::Done,
            "{:?}",
            resize.statuses[0]
        );
        assert_eq!(resize.statuses[0].keys_remaining, 0);
        assert!(!pool.state().is_migrating());

        pool.replace_dead(1)
            .await
            .unwrap_or_else(|e| panic!("replace: {e}"));
        let end = load.window_now() + 2;
        let windows = load.stop_at(end).await;
        print_windows(
            "grow 2->3, slot 1 killed mid hand-off and replaced",
            &windows,
        );
        let verdict = checker.verdict();
        println!("   {verdict:?}");
        assert_eq!(verdict.stale, 0, "stale reads: {:?}", verdict.samples);
        assert_eq!(verdict.corrupt, 0, "corrupt reads: {:?}", verdict.samples);
        let clean = pool.check_clean().await;
        println!(
            "   end state clean: {} items, {} bytes",
            clean.items, clean.bytes
        );

        // What the dead node held is gone, unless a copy reached the new owner before the kill
        // (hand-off or a reader's copy forward: the same value) or the application wrote it
        // again since.
        let client = pool.client();
        let (mut missed, mut handed, mut rewritten) = (0, 0, 0);
        for (key, value) in &post_mortem {
            let i = checker
                .keys()
                .index(key)
                .unwrap_or_else(|| panic!("foreign key {key:?}"));
            if checker.touched_since(i, killed_at) {
                rewritten += 1;
                continue;
            }
            match client.get(key).await.unwrap_or_else(|e| panic!("get: {e}")) {
                None => missed += 1,
                Some(v) if v.data[..] == value[..] => handed += 1,
                Some(v) => panic!(
                    "{}: the pool returned {:?}, the dead node held {:?}, nothing wrote it since",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(&v.data[..v.data.len().min(12)]),
                    String::from_utf8_lossy(&value[..value.len().min(12)])
                ),
            }
        }
        println!(
            "   the dead node held {} keys: {missed} now miss, {handed} had been copied to their \
             new owner before it died, {rewritten} were written again since",
            post_mortem.len()
        );
        assert!(missed > 0, "the dead node's keys must be misses");
        pool.shutdown().await;
    });
}

/// A second resize asked for while the first migrates: the ring refuses to begin it (a clean
/// error, nothing changed), and the operator's way (the harness's `grow_to`) is to let the
/// running migration finish and complete, then start the next. Load keeps its hit ratio
/// throughout and nothing is stale.
#[test]
fn a_resize_asked_for_during_a_migration_starts_after_it_completes() {
    run(async {
        let (mut pool, checker) = loaded_pool(2, 4 << 20).await;
        let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
        load.until_window(3).await;
        pool.begin_grow(3)
            .await
            .unwrap_or_else(|e| panic!("grow: {e}"));
        let during = pool.state().clone();

        let mut probe = during.clone();
        let next = during
            .current()
            .grown(["127.0.0.1:9"])
            .unwrap_or_else(|e| panic!("{e}"));
        let refused = probe.begin(next);
        assert!(
            matches!(
                refused,
                Err(RingError::MigrationInProgress { from: 1, to: 2 })
            ),
            "{refused:?}"
        );
        assert_eq!(probe, during, "a refused begin changes nothing");
        match pool.begin_grow(4).await {
            Err(ResizeError::Ring(RingError::MigrationInProgress { .. })) => {}
            other => panic!("begin_grow during a migration: {other:?}"),
        }
        assert_eq!(pool.state(), &during, "the pool's ring is unchanged");
        assert_eq!(
            pool.client().ring(),
            during,
            "the clients' ring is unchanged"
        );
        assert_eq!(pool.len(), 3);

        let asked = Instant::now();
        let second = pool
            .grow_to(4)
            .await
            .unwrap_or_else(|e| panic!("grow to 4: {e}"));
        let first = pool.history[0].clone();
        println!("   first:  {}", first.describe());
        println!(
            "   second: {} (asked for {:?} after the first began)",
            second.describe(),
            asked - first.began
        );
        assert_eq!((first.from, first.to, second.from, second.to), (2, 3, 3, 4));
        assert!(
            first.completed > asked,
            "the first migration was still running when the second was asked for"
        );
        assert!(
            second.began >= first.completed,
            "the second began only after the first completed"
        );
        assert!(first.keys_total() > 0 && first.statuses.iter().all(|s| s.state == State::Done));
        assert_eq!((pool.ring().epoch(), pool.len()), (3, 4));
        assert_eq!(pool.client().ring(), *pool.state());

        let end = load.window_now() + 3;
        let windows = load.stop_at(end).await;
        print_windows(
            "grow 2->3 (rate-limited), then 3->4 asked for mid-way",
            &windows,
        );
        let steady = load::hit_pct(&windows[1..3]);
        let verdict = checker.verdict();
        println!("   steady {steady:.2} %; {verdict:?}");
        assert_eq!(verdict.stale, 0, "stale reads: {:?}", verdict.samples);
        assert_eq!(verdict.corrupt, 0, "corrupt reads: {:?}", verdict.samples);
        for (w, window) in windows.iter().enumerate().skip(3) {
            assert!(
                (window.hit_pct() - steady).abs() <= HIT_RATIO_POINTS,
                "window {w}: {:.2} % against steady {steady:.2} %",
                window.hit_pct()
            );
        }
        let clean = pool.check_clean().await;
        println!(
            "   end state clean: {} items, {} bytes",
            clean.items, clean.bytes
        );
        pool.shutdown().await;
    });
}

/// A pool without a single key grows and shrinks: every hand-off finishes with nothing to
/// move, and the pool still works afterwards.
#[test]
fn an_empty_pool_grows_and_shrinks_cleanly() {
    run(async {
        let mut pool = Pool::start(1, 16).await;
        for (grow, to) in [(true, 2), (true, 3), (true, 8), (false, 2), (false, 1)] {
            let resize = if grow {
                pool.grow_to(to).await
            } else {
                pool.shrink_to(to).await
            };
            let resize = resize.unwrap_or_else(|e| panic!("resize to {to}: {e}"));
            println!("   {}", resize.describe());
            assert!(resize.dead.is_empty() && resize.handoff_error.is_none());
            assert!(!resize.statuses.is_empty(), "the hand-off ran");
            for status in &resize.statuses {
                assert_eq!(status.state, State::Done, "{status:?}");
                assert_eq!(
                    (status.keys_total, status.keys_moved, status.keys_remaining),
                    (0, 0, 0)
                );
            }
            assert_eq!(pool.check_clean().await.items, 0);
            assert_eq!(pool.client().ring(), *pool.state());
        }
        let client = pool.client();
        client
            .set("after", b"resizes", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));
        let got = client
            .get("after")
            .await
            .unwrap_or_else(|e| panic!("get: {e}"));
        assert_eq!(got.map(|v| v.data.to_vec()), Some(b"resizes".to_vec()));
        pool.shutdown().await;
    });
}

/// Values of the maximum item size (16 MiB, the node's default) are handed off intact, with
/// their flags, on a grow and on a shrink.
#[test]
fn values_of_the_maximum_item_size_move_intact() {
    run(async {
        const MAX_ITEM: usize = 16 << 20;
        let mut pool = Pool::start(1, 128).await;
        // One key per slot of the 3-node ring: the slot-1 key moves on 1->2, the slot-2 key on
        // 2->3, and both come back on 3->1.
        let names: Vec<String> = (0..3u32)
            .map(|slot| {
                (0..)
                    .map(|i| format!("big:{i}"))
                    .find(|k| slot_for(k.as_bytes(), 3) == Some(slot))
                    .unwrap_or_default()
            })
            .collect();
        let values: Vec<Vec<u8>> = (0..3u64)
            .map(|seed| {
                let mut v = vec![0u8; MAX_ITEM];
                SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
                v
            })
            .collect();
        let client = pool.client();
        for (flags, (name, value)) in (7u32..).zip(names.iter().zip(&values)) {
            client
                .set(name, value, flags, 0)
                .await
                .unwrap_or_else(|e| panic!("set {name}: {e}"));
        }
        for (grow, to) in [(true, 2), (true, 3), (false, 1)] {
            let resize = if grow {
                pool.grow_to(to).await
            } else {
                pool.shrink_to(to).await
            };
            let resize = resize.unwrap_or_else(|e| panic!("resize to {to}: {e}"));
            println!("   {}", resize.describe());
            assert_eq!(resize.keys_dropped(), 0, "{:?}", resize.statuses);
            assert_eq!(
                resize.bytes_moved() as usize % MAX_ITEM,
                0,
                "only whole 16 MiB values move"
            );
            assert!(resize.keys_moved() > 0, "a big key moved");
            for (flags, (name, value)) in (7u32..).zip(names.iter().zip(&values)) {
                let owner = pool.ring().owner_slot(name.as_bytes()).unwrap_or_default();
                let held = pool.member(owner).items();
                assert!(
                    held.get(name.as_bytes()) == Some(value),
                    "{name} intact on its owner, slot {owner}"
                );
                let got = client
                    .get(name)
                    .await
                    .unwrap_or_else(|e| panic!("get {name}: {e}"));
                let got = got.unwrap_or_else(|| panic!("{name} missing after resizing to {to}"));
                assert!(got.data[..] == value[..], "{name}: the value changed");
                assert_eq!(got.flags, flags, "{name}: flags");
            }
            let clean = pool.check_clean().await;
            assert_eq!(clean.items, 3);
        }
        pool.shutdown().await;
    });
}

/// `Node::shutdown` promises to wait "for every task of the node to end", and a stopped node
/// must not go on changing other nodes. Its hand-off task is not tied to the node: after the
/// shutdown returns, it keeps moving the stopped node's keys to their owner.
#[test]
fn node_shutdown_ends_its_running_hand_off() {
    run(async {
        let (mut pool, checker) = loaded_pool(1, 2 << 20).await;
        drop(checker);
        pool.begin_grow(2)
            .await
            .unwrap_or_else(|e| panic!("grow: {e}"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        pool.stop_node(0).await;
        let count = |pool: &Pool| {
            (
                pool.member(0).shared.store.stats().curr_items,
                pool.member(1).shared.store.stats().curr_items,
            )
        };
        let at_stop = count(&pool);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = count(&pool);
        println!("   items (stopped node, owner): at shutdown {at_stop:?}, 1.5 s later {later:?}");
        pool.shutdown().await;
        assert_eq!(
            later, at_stop,
            "a stopped node's hand-off went on moving keys"
        );
    });
}
