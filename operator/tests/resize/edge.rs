//! Edge cases of resizing through the operator: a source node dying mid hand-off, a second
//! resize asked for while a migration runs, an empty pool, values of the maximum item size;
//! a node killed while it hands off moving no more keys; and keys deleted, moved away,
//! rewritten and moved back within a tombstone's life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_node::handoff::{HandoffStatus, State, default_max_in_flight_bytes};
use cachepool_crds::ring::{RingError, moves, slot_for};
use cachepool_test_support::placement::items;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::harness::{Pool, run};
use crate::load::{self, Checker, Keys, Load, LoadConfig, Window};
use crate::scenario::{CAPACITY_MIB, HIT_RATIO_POINTS};

/// Waiting for a hand-off to be seen running gives up after this.
const WAIT: Duration = Duration::from_secs(30);

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

/// A pool of `n` nodes run by the operator, prefilled with 20,000 keys of 1 to 3 KiB (about
/// 40 MB, so that a hand-off takes long enough to be caught running), and the checker of
/// those keys.
async fn loaded_pool(n: u32) -> (Pool, Arc<Checker>) {
    let pool = Pool::start(n, CAPACITY_MIB).await;
    let checker = Arc::new(Checker::new(Keys::new(20_000, 1024, 2048)));
    assert_eq!(
        load::prefill(pool.client(), checker.clone(), 16).await,
        0,
        "prefill writes failed"
    );
    (pool, checker)
}

/// Polls the hand-off of the node at `slot` until it runs towards the operator's current
/// (migrating) ring and has moved a key; returns that status.
async fn until_handing_off(pool: &mut Pool, slot: u32) -> HandoffStatus {
    let member = pool.member(slot);
    let epoch = pool.state().current().epoch();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = member
            .admin
            .handoff()
            .await
            .unwrap_or_else(|e| panic!("hand-off status of slot {slot}: {e}"));
        if status.epoch == Some(epoch) {
            match status.state {
                State::Running if status.keys_moved > 0 => return status,
                State::Running | State::Idle => {}
                other => panic!(
                    "the hand-off of slot {slot} ended ({other:?}) before the test saw it run: \
                     {status:?}"
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} never handed off: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A source node dies while it hands off (grow 2 -> 3 through the operator, slot 1 killed as a
/// crash would kill it): the operator replaces it in its slot, the survivor's hand-off
/// completes, the migration completes, no read is stale, the pool ends clean, and the keys the
/// dead node still held are misses.
///
/// What the operator does differs from the harness this suite had before, which completed
/// the migration and then put a fresh node in the slot with no previous ring, and reported the
/// dead node as a hand-off error. The operator launches a replacement as soon as it sees the
/// node dead and publishes it in the slot when it is ready: in the migrating ring if that comes
/// first (the survivor's hand-off then restarts towards the new epoch), after the migration
/// completed if the survivor finishes first (what this machine shows). Until then writes of the
/// dead node's keys fail: write errors, never stale reads. The replacement is told as a
/// `NodeReplaced` event naming the dead node; that event is what reports it now.
#[test]
fn grow_completes_without_a_source_node_that_dies_mid_handoff() {
    run(async {
        let (mut pool, checker) = loaded_pool(2).await;
        let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
        load.until_window(2).await;
        let asked = pool.ask(3).await;
        pool.until_migrating_to(3).await;
        let before_kill = until_handing_off(&mut pool, 1).await;
        assert_eq!(
            before_kill.state,
            State::Running,
            "the hand-off must still run when the node dies"
        );
        println!(
            "   slot 1 killed mid hand-off: {} of {} foreign keys moved",
            before_kill.keys_moved, before_kill.keys_total
        );
        let dead_addr = pool.kill(1).await;
        let killed_at = Instant::now();
        let dead = pool.shared(&dead_addr);
        let post_mortem = items(&dead);
        let held_at_kill = dead.store.stats().curr_items;

        let resize = pool.finish(asked).await;
        println!("   {}", resize.describe());
        assert_eq!(resize.dead, vec![dead_addr.clone()], "the dead node");
        assert_eq!(
            resize.replaced.len(),
            1,
            "one replacement told: {:?}",
            resize.replaced
        );
        assert!(
            resize.replaced[0].contains(&dead_addr) && resize.replaced[0].contains("slot 1"),
            "the replacement names the dead node and its slot: {:?}",
            resize.replaced
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
        let fresh = pool.member(1);
        assert_ne!(fresh.addr, dead_addr, "a fresh node serves slot 1");
        assert_eq!(
            dead.store.stats().curr_items,
            held_at_kill,
            "the killed node went on handing keys off"
        );

        let end = load.window_now() + 2;
        let windows = load.stop_at(end).await;
        print_windows(
            "grow 2->3, slot 1 killed mid hand-off and replaced by the operator",
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

/// A second resize asked for while the first migrates: the ring itself refuses a second
/// migration (a clean error, nothing changed), and the operator takes the new size at once
/// (the spec is stored) but leaves the running migration's ring alone and launches nothing
/// for the new size until that migration has completed; then it starts the next. Load keeps
/// its hit ratio throughout and nothing is stale.
#[test]
fn a_resize_asked_for_during_a_migration_starts_after_it_completes() {
    run(async {
        let (mut pool, checker) = loaded_pool(2).await;
        let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
        load.until_window(3).await;
        let first = pool.ask(3).await;
        let during = pool.until_migrating_to(3).await;
        assert_eq!(
            pool.state(),
            during,
            "the client follows the operator's ring"
        );

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

        let second = pool.ask(4).await;
        let answered = second.answer.status.clone().unwrap_or_default();
        assert!(
            answered.migration.is_some(),
            "the first migration was still running when the second was asked for: {answered:?}"
        );
        assert_eq!(second.answer.spec.scaling.replicas, 4, "the spec is taken");
        // Until the first migration completes, its ring stays and no node starts for slot 3.
        loop {
            let state = pool.state();
            if !state.is_migrating() {
                break;
            }
            assert_eq!(
                state, during,
                "the pool's ring changed during the migration"
            );
            assert_eq!(pool.client().ring(), during, "the clients' ring changed");
            let slot3: Vec<_> = pool
                .provider_nodes()
                .into_iter()
                .filter(|(slot, _, _)| *slot == 3)
                .collect();
            assert!(
                slot3.is_empty(),
                "a node for slot 3 started during the first migration: {slot3:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        let first = pool.finish(first).await;
        let asked = second.at;
        let second = pool.finish(second).await;
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
        // The operator raises the epoch when a migration completes (`RingState::completed`,
        // so that clients long-polling the epoch learn the previous ring is gone): 1 first,
        // 2 and 3 for the first resize, 4 and 5 for the second. The old harness completed
        // in place and ended at epoch 3.
        assert_eq!((pool.ring().epoch(), pool.len()), (5, 4));
        assert_eq!(pool.client().ring(), pool.state());

        let end = load.window_now() + 3;
        let windows = load.stop_at(end).await;
        print_windows("grow 2->3, then 3->4 asked for mid-way", &windows);
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
        for to in [2, 3, 8, 2, 1] {
            let resize = pool.resize_to(to).await;
            println!("   {}", resize.describe());
            assert!(resize.dead.is_empty() && resize.replaced.is_empty());
            // Every previous member hands off, the nodes that stay included, so there is a
            // status even when a shrink's removed nodes were stopped before the harness saw
            // theirs.
            assert!(!resize.statuses.is_empty(), "the hand-off ran");
            for status in &resize.statuses {
                assert_eq!(status.state, State::Done, "{status:?}");
                assert_eq!(
                    (status.keys_total, status.keys_moved, status.keys_remaining),
                    (0, 0, 0)
                );
            }
            assert_eq!(resize.keys_moved(), 0, "{}", resize.describe());
            assert_eq!(pool.check_clean().await.items, 0);
            assert_eq!(pool.client().ring(), pool.state());
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

/// Items of the maximum item size (16 MiB, the spec's default, header and key included) are
/// handed off intact, with their flags, on a grow and on a shrink.
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
        // The largest value each key takes: the limit counts the node's item header and the
        // key, as memcached's `-I` does.
        let longest_key = names.iter().map(String::len).max().unwrap_or_default();
        let value_len = MAX_ITEM - cache_node::protocol::item_size(longest_key, 0);
        let values: Vec<Vec<u8>> = (0..3u64)
            .map(|seed| {
                let mut v = vec![0u8; value_len];
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
        for to in [2, 3, 1] {
            let resize = pool.resize_to(to).await;
            println!("   {}", resize.describe());
            assert_eq!(resize.keys_dropped(), 0, "{:?}", resize.statuses);
            assert_eq!(
                resize.bytes_moved() as usize % value_len,
                0,
                "only whole values move"
            );
            assert!(resize.keys_moved() > 0, "a big key moved");
            let must_move = names
                .iter()
                .filter(|k| moves(resize.from, to, k.as_bytes()))
                .count() as u64;
            assert_eq!(
                resize.keys_moved(),
                must_move,
                "the big keys the ring moves"
            );
            for (flags, (name, value)) in (7u32..).zip(names.iter().zip(&values)) {
                let owner = pool.ring().owner_slot(name.as_bytes()).unwrap_or_default();
                let held = items(&pool.member(owner).shared);
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

/// A node killed while it hands off (`EmbeddedProvider::kill`, which stops the node with
/// `Node::shutdown`, as a crash would end its process) moves no more keys: `Node::shutdown`
/// ends the node's running hand-off, so a stopped node cannot go on changing other nodes
/// behind the operator's back. Checked once the operator has replaced it and settled, which
/// takes far longer than the hand-off needs to move another batch.
///
/// The stopped node's store must not change at all (the hand-off drops a source copy only
/// after its batch is acknowledged, so no drop means no batch finished after the stop). Its
/// owner may still take what was in flight: the operator starts hand-offs at full speed, so
/// up to `maxInFlightBytes` (16 MiB by default) of keys and values may already be written to
/// the socket, which lands whatever stops the sender (a real crash too). The harness this suite
/// had before rate-limited its hand-offs to 2 MB/s, so its batches were small and it could
/// ask the owner's count not to change at all.
#[test]
fn node_shutdown_ends_its_running_hand_off() {
    run(async {
        let (mut pool, checker) = loaded_pool(1).await;
        drop(checker);
        let asked = pool.ask(2).await;
        pool.until_migrating_to(2).await;
        until_handing_off(&mut pool, 0).await;
        let owner = pool.member(1).shared;
        let stopped = pool.kill(0).await;
        let stopped = pool.shared(&stopped);
        let (source_at_stop, owner_at_stop) = (items(&stopped), items(&owner));
        let resize = pool.finish(asked).await;
        let (source_later, owner_later) = (items(&stopped), items(&owner));
        let landed: Vec<usize> = owner_later
            .iter()
            .filter(|(k, _)| !owner_at_stop.contains_key(*k))
            .map(|(_, v)| v.len())
            .collect();
        let landed_bytes: usize = landed.iter().sum();
        println!("   {}", resize.describe());
        println!(
            "   items (stopped node, owner): at shutdown ({}, {}), once the operator replaced it \
             and settled ({}, {}); {} keys ({landed_bytes} value bytes) of the batch in flight \
             landed on the owner after the stop",
            source_at_stop.len(),
            owner_at_stop.len(),
            source_later.len(),
            owner_later.len(),
            landed.len()
        );
        pool.shutdown().await;
        assert!(
            source_later == source_at_stop,
            "a stopped node's hand-off went on dropping its keys"
        );
        let largest = landed.iter().copied().max().unwrap_or(0);
        assert!(
            landed_bytes <= default_max_in_flight_bytes() + largest,
            "a stopped node's hand-off went on moving keys: {landed_bytes} value bytes landed \
             on the owner after the stop, more than the window in flight"
        );
    });
}

/// Issue 16, "The last lost-hit case": keys deleted on their owner (a tombstone there), moved
/// away by a grow, written on their new owner and moved back by a shrink within the
/// tombstone's 30 s. The hand-off back carries each write's time, newer than the delete, so
/// every write survives (no lost hit); keys deleted again after their write stay deleted (no
/// stale read).
#[test]
fn keys_deleted_moved_away_rewritten_and_moved_back_keep_their_newer_value() {
    run(async {
        let mut pool = Pool::start(1, 16).await;
        let client = pool.client();
        let keys: Vec<String> = (0..)
            .map(|i| format!("back:{i}"))
            .filter(|k| moves(1, 2, k.as_bytes()))
            .take(200)
            .collect();
        for key in &keys {
            client
                .set(key, b"v1", 0, 0)
                .await
                .unwrap_or_else(|e| panic!("set {key}: {e}"));
            let found = client
                .delete(key)
                .await
                .unwrap_or_else(|e| panic!("delete {key}: {e}"));
            assert!(found, "{key} was there to delete");
        }
        let began = Instant::now();
        let away = pool.resize_to(2).await;
        println!("   {}", away.describe());
        // The writes must come later than the deletes by more than the node clocks may
        // disagree (here they share one clock; the resize alone usually takes longer).
        tokio::time::sleep(Duration::from_millis(cache_node::store::CLOCK_SKEW_MS + 20)).await;
        for (i, key) in keys.iter().enumerate() {
            client
                .set(key, format!("v2-{i}").as_bytes(), 0, 0)
                .await
                .unwrap_or_else(|e| panic!("set {key}: {e}"));
        }
        // Every fourth key is deleted again on its new owner: it must not come back.
        for key in keys.iter().step_by(4) {
            client
                .delete(key)
                .await
                .unwrap_or_else(|e| panic!("delete {key}: {e}"));
        }
        let back = pool.resize_to(1).await;
        println!("   {}", back.describe());
        let elapsed = began.elapsed();
        assert!(
            elapsed < Duration::from_secs(u64::from(cache_node::store::TOMBSTONE_SECS)),
            "the round trip took {elapsed:?}, beyond the tombstones' life"
        );
        let (mut lost, mut stale, mut hits) = (0u32, 0u32, 0u64);
        for (i, key) in keys.iter().enumerate() {
            let got = client
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("get {key}: {e}"))
                .map(|v| v.data.to_vec());
            let deleted_again = i % 4 == 0;
            match (got, deleted_again) {
                (Some(_), true) => stale += 1,
                (Some(v), false) if v == format!("v2-{i}").into_bytes() => hits += 1,
                (Some(_), false) => stale += 1,
                (None, false) => lost += 1,
                (None, true) => {}
            }
        }
        println!(
            "   {} keys deleted, moved away, rewritten and moved back in {elapsed:?}: {hits} \
             hits, {lost} lost hits, {stale} stale reads",
            keys.len()
        );
        assert_eq!((lost, stale), (0, 0), "{}", back.describe());
        assert_eq!(pool.check_clean().await.items, hits);
        pool.shutdown().await;
    });
}
