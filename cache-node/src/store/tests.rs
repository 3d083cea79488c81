use super::*;

const NOW: u32 = 1_700_000_000;

fn get(store: &Store, key: &[u8]) -> Option<Vec<u8>> {
    let mut out = None;
    store.get(key, None, NOW, |_, v| out = Some(v.to_vec()));
    out
}

fn set(store: &Store, key: &[u8], value: &[u8]) -> StoreOutcome {
    store.store(StoreMode::Set, key, value, 0, 0, NOW)
}

#[test]
fn storage_commands_follow_memcached_semantics() {
    let s = Store::new(1 << 20, Policy::Lru);
    assert_eq!(
        s.store(StoreMode::Replace, b"k", b"v", 0, 0, NOW),
        StoreOutcome::NotStored
    );
    assert_eq!(
        s.store(StoreMode::Append, b"k", b"v", 0, 0, NOW),
        StoreOutcome::NotStored
    );
    assert_eq!(
        s.store(StoreMode::Add, b"k", b"1", 7, 0, NOW),
        StoreOutcome::Stored
    );
    assert_eq!(
        s.store(StoreMode::Add, b"k", b"2", 0, 0, NOW),
        StoreOutcome::NotStored
    );
    assert_eq!(
        s.store(StoreMode::Append, b"k", b"3", 99, 0, NOW),
        StoreOutcome::Stored
    );
    assert_eq!(
        s.store(StoreMode::Prepend, b"k", b"0", 99, 0, NOW),
        StoreOutcome::Stored
    );
    let mut meta = None;
    s.get(b"k", None, NOW, |m, v| meta = Some((m, v.to_vec())));
    let (m, v) = meta.unwrap();
    assert_eq!(v, b"013");
    assert_eq!(m.flags, 7, "append/prepend keep the original flags");
    assert_eq!(
        s.store(StoreMode::Cas(m.cas + 1), b"k", b"x", 0, 0, NOW),
        StoreOutcome::Exists
    );
    assert_eq!(
        s.store(StoreMode::Cas(m.cas), b"k", b"x", 0, 0, NOW),
        StoreOutcome::Stored
    );
    assert_eq!(
        s.store(StoreMode::Cas(m.cas), b"k", b"y", 0, 0, NOW),
        StoreOutcome::Exists
    );
    assert_eq!(
        s.store(StoreMode::Cas(1), b"nope", b"y", 0, 0, NOW),
        StoreOutcome::NotFound
    );
    assert!(s.delete(b"k", NOW));
    assert!(!s.delete(b"k", NOW));
    let st = s.stats();
    assert_eq!(
        (
            st.counters.cas_hits,
            st.counters.cas_badval,
            st.counters.cas_misses
        ),
        (1, 2, 1)
    );
    s.check_invariants().unwrap();
}

#[test]
fn incr_wraps_and_decr_stops_at_zero() {
    let s = Store::new(1 << 20, Policy::Lru);
    set(&s, b"n", b"18446744073709551615");
    assert_eq!(s.arith(b"n", true, 2, NOW), ArithOutcome::Value(1));
    assert_eq!(s.arith(b"n", false, 5, NOW), ArithOutcome::Value(0));
    set(&s, b"n", b"10 ");
    assert_eq!(s.arith(b"n", false, 1, NOW), ArithOutcome::Value(9));
    assert_eq!(get(&s, b"n").unwrap(), b"9");
    set(&s, b"t", b"ten");
    assert_eq!(s.arith(b"t", true, 1, NOW), ArithOutcome::NonNumeric);
    set(&s, b"big", b"184467440737095516150");
    assert_eq!(s.arith(b"big", true, 1, NOW), ArithOutcome::NonNumeric);
    assert_eq!(s.arith(b"none", true, 1, NOW), ArithOutcome::NotFound);
    s.check_invariants().unwrap();
}

#[test]
fn expired_items_are_misses_and_are_reclaimed() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.store(StoreMode::Set, b"a", b"1", 0, NOW + 2, NOW);
    s.store(StoreMode::Set, b"b", b"1", 0, NOW + 2, NOW);
    assert!(s.get(b"a", None, NOW + 1, |_, _| {}));
    assert!(!s.get(b"a", None, NOW + 2, |_, _| {}));
    assert_eq!(s.stats().counters.get_expired, 1);
    let mut cursors = Vec::new();
    s.reap_expired(&mut cursors, 1000, NOW + 2);
    assert_eq!(s.stats().curr_items, 0);
    assert_eq!(s.used(), 0);
    // touch extends, gat extends and reads
    s.store(StoreMode::Set, b"c", b"1", 0, NOW + 1, NOW);
    assert!(s.touch(b"c", NOW + 100, NOW));
    assert!(s.get(b"c", Some(NOW + 200), NOW + 50, |m, _| assert_eq!(
        m.expiry,
        NOW + 200
    )));
    assert!(s.get(b"c", None, NOW + 150, |_, _| {}));
    s.check_invariants().unwrap();
}

#[test]
fn flush_all_with_delay_invalidates_items_stored_before_the_deadline() {
    let s = Store::new(1 << 20, Policy::Lru);
    set(&s, b"a", b"1");
    s.flush_all(NOW + 10, NOW);
    assert!(get(&s, b"a").is_some());
    s.store(StoreMode::Set, b"b", b"1", 0, 0, NOW + 5);
    assert!(!s.get(b"a", None, NOW + 10, |_, _| {}));
    assert!(!s.get(b"b", None, NOW + 10, |_, _| {}));
    s.store(StoreMode::Set, b"c", b"1", 0, 0, NOW + 11);
    assert!(s.get(b"c", None, NOW + 12, |_, _| {}));
    s.flush_all(0, NOW + 12);
    assert_eq!(s.stats().curr_items, 0);
    assert_eq!(s.used(), 0);
}

#[test]
fn capacity_counts_overhead_and_is_never_exceeded() {
    for policy in Policy::ALL {
        let limit = 64 * 1024;
        let s = Store::new(limit, policy);
        for i in 0..10_000u32 {
            let key = format!("key:{i}");
            assert_eq!(set(&s, key.as_bytes(), &[b'x'; 100]), StoreOutcome::Stored);
            assert!(s.used() <= limit);
        }
        let st = s.stats();
        assert!(
            st.bytes as usize <= limit && st.bytes > (limit as u64) * 8 / 10,
            "{policy}: {st:?}"
        );
        // Keys are "key:0" to "key:9999": every item costs between these two.
        let (lo, hi) = (item_cost(5, 100) as u64, item_cost(8, 100) as u64);
        assert!(
            st.curr_items * lo <= st.bytes && st.bytes <= st.curr_items * hi,
            "{st:?}"
        );
        assert!(st.counters.evictions > 9000);
        s.check_invariants().unwrap();
    }
}

#[test]
fn one_large_item_may_use_most_of_the_capacity() {
    let s = Store::new(1 << 20, Policy::Lru);
    for i in 0..1000u32 {
        set(&s, format!("small:{i}").as_bytes(), &[1; 500]);
    }
    let big = vec![7u8; 900 * 1024];
    assert_eq!(set(&s, b"big", &big), StoreOutcome::Stored);
    assert_eq!(get(&s, b"big").unwrap(), big);
    assert_eq!(set(&s, b"huge", &vec![0; 1 << 20]), StoreOutcome::TooLarge);
    s.check_invariants().unwrap();
}

#[test]
fn shrinking_capacity_evicts_down_and_policy_switch_keeps_items() {
    let s = Store::new(1 << 20, Policy::Lru);
    for i in 0..2000u32 {
        set(&s, format!("k{i}").as_bytes(), &[1; 100]);
    }
    let before = s.stats().curr_items;
    for policy in [Policy::Sieve, Policy::Random, Policy::Lru, Policy::Sieve] {
        s.set_policy(policy);
        assert_eq!(
            s.stats().curr_items,
            before,
            "switch to {policy} keeps items"
        );
        s.check_invariants().unwrap();
    }
    s.set_limit(100 * 1024, NOW);
    assert!(s.used() <= 100 * 1024);
    assert!(s.stats().curr_items < before);
    s.check_invariants().unwrap();
}

#[test]
fn lru_evicts_the_least_recently_read() {
    let s = Store::with_shards(10 * item_cost(2, 10), Policy::Lru, 0);
    for i in 0..10u8 {
        set(&s, &[b'k', b'0' + i], &[0; 10]);
    }
    assert!(get(&s, b"k0").is_some());
    set(&s, b"kx", &[0; 10]);
    assert!(get(&s, b"k0").is_some(), "recently read survives");
    assert!(get(&s, b"k1").is_none(), "least recent is evicted");
}

/// A hot set read at random, interleaved with a stream of one-hit items that together
/// overflow the cache: LRU lets the stream push hot items out, SIEVE spares what was read.
#[test]
fn sieve_keeps_hot_items_that_a_one_hit_stream_pushes_out_of_lru() {
    use rand::{Rng, SeedableRng};
    let hot_hit_ratio = |policy| {
        let s = Store::with_shards(100 * item_cost(6, 10), policy, 0);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let (mut hits, mut reads) = (0, 0);
        for step in 0..20_000u32 {
            let key = format!("h{:05}", rng.random_range(0..50u32));
            let hit = get(&s, key.as_bytes()).is_some();
            if !hit {
                set(&s, key.as_bytes(), &[0; 10]);
            }
            if step >= 1000 {
                reads += 1;
                hits += usize::from(hit);
            }
            set(&s, format!("s{:05}", step * 2).as_bytes(), &[0; 10]);
            set(&s, format!("s{:05}", step * 2 + 1).as_bytes(), &[0; 10]);
        }
        s.check_invariants().unwrap();
        hits as f64 / reads as f64
    };
    let (sieve, lru) = (hot_hit_ratio(Policy::Sieve), hot_hit_ratio(Policy::Lru));
    assert!(sieve > 0.95, "sieve {sieve}");
    assert!(lru < sieve - 0.2, "lru {lru} sieve {sieve}");
}

#[test]
fn scan_visits_every_selected_item_once_in_bounded_batches() {
    let s = Store::new(16 << 20, Policy::Lru);
    for i in 0..5000u32 {
        s.store(
            StoreMode::Set,
            format!("k{i}").as_bytes(),
            &[b'v'; 100],
            i,
            0,
            NOW,
        );
    }
    s.store(StoreMode::Set, b"gone", b"x", 0, NOW, NOW);
    let mut cursor = ScanCursor::default();
    let mut seen = std::collections::HashSet::new();
    let mut batches = 0;
    while !cursor.is_done() {
        let batch = s.scan(&mut cursor, 10_000, NOW, |k| k.ends_with(b"7"));
        assert!(
            batch
                .iter()
                .map(|i| i.key.len() + i.value.len())
                .sum::<usize>()
                <= 10_000 + 200
        );
        for item in batch {
            assert!(seen.insert(item.key.clone()), "seen twice");
            assert_eq!(item.value, vec![b'v'; 100]);
        }
        batches += 1;
    }
    assert_eq!(seen.len(), 500);
    assert!(batches > 3);
    assert!(!seen.contains(&b"gone"[..]));
}

#[test]
fn delete_if_cas_spares_newer_writes() {
    let s = Store::new(1 << 20, Policy::Lru);
    set(&s, b"k", b"1");
    let mut cas = 0;
    s.get(b"k", None, NOW, |m, _| cas = m.cas);
    set(&s, b"k", b"2");
    assert!(!s.delete_if_cas(b"k", cas, NOW));
    assert_eq!(get(&s, b"k").unwrap(), b"2");
    s.get(b"k", None, NOW, |m, _| cas = m.cas);
    assert!(s.delete_if_cas(b"k", cas, NOW));
    assert!(get(&s, b"k").is_none());
}

/// Regression (found by the store fuzz target): with the random policy, eviction sampled
/// slots directly and could pick the item a replace had detached, corrupting the queue.
#[test]
fn replacing_under_pressure_never_evicts_the_item_being_replaced() {
    for policy in Policy::ALL {
        let s = Store::with_shards(20 * item_cost(3, 40), policy, 0);
        for round in 0..200u32 {
            for k in 0..30u32 {
                let key = format!("k{k:02}");
                let len = 10 + ((round + k) % 30) as usize;
                s.store(StoreMode::Set, key.as_bytes(), &vec![b'x'; len], 0, 0, NOW);
                s.store(StoreMode::Append, key.as_bytes(), b"y", 0, 0, NOW);
                s.check_invariants()
                    .unwrap_or_else(|e| panic!("{policy}: {e}"));
            }
        }
    }
}

#[test]
fn a_recent_delete_stops_a_copy_carried_forward_but_not_a_plain_add() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.delete(b"k", NOW);
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"k",
            b"old",
            0,
            0,
            NOW + 1
        ),
        StoreOutcome::NotStored
    );
    assert_eq!(
        s.store(StoreMode::Add, b"k", b"new", 0, 0, NOW + 1),
        StoreOutcome::Stored
    );
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"other",
            b"v",
            0,
            0,
            NOW + 1
        ),
        StoreOutcome::Stored,
        "keys never deleted are copied"
    );
    s.delete(b"k", NOW + 1);
    let later = NOW + 1 + TOMBSTONE_SECS;
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"k",
            b"v",
            0,
            0,
            later
        ),
        StoreOutcome::Stored,
        "tombstones expire"
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_write_after_a_delete_lifts_its_tombstone() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.delete(b"k", NOW);
    s.store(StoreMode::Set, b"k", b"newer", 0, 0, NOW + 1);
    // The key moves away (its copy here dropped by CAS, as a hand-off does) and comes back.
    let mut cas = 0;
    assert!(s.get(b"k", None, NOW + 1, |m, _| cas = m.cas));
    assert!(s.delete_if_cas(b"k", cas, NOW + 2));
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"k",
            b"newer",
            0,
            0,
            NOW + 3
        ),
        StoreOutcome::Stored,
        "the delete was older than the write"
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_delete_without_tombstone_does_not_refuse_the_key_coming_back() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.store(StoreMode::Set, b"moved", b"v", 0, 0, NOW);
    s.store(StoreMode::Set, b"deleted", b"v", 0, 0, NOW);
    assert_eq!(
        s.delete_cas(b"moved", None, false, NOW),
        crate::store::DeleteOutcome::Deleted
    );
    assert_eq!(
        s.delete_cas(b"deleted", None, true, NOW),
        crate::store::DeleteOutcome::Deleted
    );
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"moved",
            b"v2",
            0,
            0,
            NOW + 1
        ),
        StoreOutcome::Stored
    );
    assert_eq!(
        s.store(
            StoreMode::AddUnlessDeleted { written_ms: None },
            b"deleted",
            b"v2",
            0,
            0,
            NOW + 1
        ),
        StoreOutcome::NotStored
    );
}

/// Unix milliseconds of `NOW`.
const NOW_MS: u64 = NOW as u64 * 1000;

fn copy(written_ms: Option<u64>) -> StoreMode {
    StoreMode::AddUnlessDeleted { written_ms }
}

/// The write time a scan reports for `key` (what the hand-off sends with its copy).
fn written_ms(store: &Store, key: &[u8], now: u32) -> Option<u64> {
    let mut cursor = ScanCursor::default();
    let mut found = Vec::new();
    while !cursor.is_done() {
        found.extend(store.scan(&mut cursor, usize::MAX, now, |k| k == key));
    }
    match &found[..] {
        [item] => item.written_ms,
        other => panic!("{} items of the key", other.len()),
    }
}

#[test]
fn a_copy_written_after_the_delete_passes_its_tombstone_and_an_older_one_never_does() {
    let s = Store::new(1 << 20, Policy::Lru);
    let deleted = NOW_MS + 500;
    s.delete(b"k", Now::from_ms(deleted));
    let arrives = Now::from_ms(deleted + 10_000);
    for (written, why) in [
        (None, "a copy without a write time"),
        (Some(deleted - 1), "a copy written before the delete"),
        (Some(deleted), "a copy written in the same millisecond"),
        (
            Some(deleted + CLOCK_SKEW_MS),
            "a copy within the clocks' allowed skew",
        ),
    ] {
        assert_eq!(
            s.store(copy(written), b"k", b"v", 0, 0, arrives),
            StoreOutcome::NotStored,
            "{why}"
        );
    }
    assert_eq!(
        s.store(
            copy(Some(deleted + CLOCK_SKEW_MS + 1)),
            b"k",
            b"newer",
            0,
            0,
            arrives
        ),
        StoreOutcome::Stored,
        "a copy written after the delete"
    );
    assert_eq!(get(&s, b"k").as_deref(), Some(&b"newer"[..]));
    s.check_invariants().unwrap();
}

#[test]
fn the_lost_hit_case_delete_move_away_write_move_back_keeps_the_write() {
    // Two nodes, as the hand-off uses them: a deletes the key, the key moves to b and is
    // written there, then moves back to a with the write time b kept for it.
    let (a, b) = (
        Store::new(1 << 20, Policy::Lru),
        Store::new(1 << 20, Policy::Lru),
    );
    a.store(StoreMode::Set, b"k", b"v1", 0, 0, Now::from_ms(NOW_MS));
    assert!(a.delete(b"k", Now::from_ms(NOW_MS + 100)));
    b.store(
        StoreMode::Set,
        b"k",
        b"v2",
        0,
        0,
        Now::from_ms(NOW_MS + 900),
    );
    let written = written_ms(&b, b"k", NOW + 1);
    assert_eq!(
        written,
        Some(NOW_MS + 900),
        "b remembers when v2 was written"
    );
    assert_eq!(
        a.store(
            copy(written),
            b"k",
            b"v2",
            0,
            0,
            Now::from_ms(NOW_MS + 2_000)
        ),
        StoreOutcome::Stored
    );
    assert_eq!(
        written_ms(&a, b"k", NOW + 2),
        Some(NOW_MS + 900),
        "the copy keeps the time of its write, not of its arrival"
    );
}

#[test]
fn write_times_follow_the_value_and_are_forgotten_when_older_than_any_tombstone() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.store(StoreMode::Set, b"k", b"1", 0, 0, Now::from_ms(NOW_MS + 7));
    assert_eq!(written_ms(&s, b"k", NOW), Some(NOW_MS + 7));
    assert_eq!(
        s.arith(b"k", true, 1, Now::from_ms(NOW_MS + 9)),
        ArithOutcome::Value(2)
    );
    assert_eq!(written_ms(&s, b"k", NOW), Some(NOW_MS + 9), "incr writes");
    s.delete_cas(b"c", None, false, NOW);
    s.store(copy(None), b"c", b"v", 0, 0, NOW);
    assert_eq!(written_ms(&s, b"c", NOW), None, "a copy of unknown age");
    let late = NOW + (WRITE_TIME_MS / 1000) as u32 + 1;
    assert_eq!(
        written_ms(&s, b"k", late),
        None,
        "forgotten after WRITE_TIME_MS"
    );
    assert!(WRITE_TIME_MS > u64::from(TOMBSTONE_SECS) * 1000 + CLOCK_SKEW_MS);
    // A reader asks for it (`mg … w`) or not (every other read: no table lookup).
    let read = |now: Now, with_time: bool| {
        let mut meta = None;
        let hit = |m: ItemMeta, _: &[u8]| meta = Some(m.written_ms);
        if with_time {
            s.get_with_write_time(b"k", None, now, hit);
        } else {
            s.get(b"k", None, now.secs, hit);
        }
        meta.expect("a hit")
    };
    assert_eq!(read(Now::from(NOW), true), Some(NOW_MS + 9));
    assert_eq!(read(Now::from(NOW), false), None);
    assert_eq!(
        read(Now::from(late), true),
        None,
        "forgotten for readers too"
    );
}

#[test]
fn event_times_never_go_back_with_the_clock() {
    let s = Store::new(1 << 20, Policy::Lru);
    s.delete(b"k", Now::from_ms(NOW_MS + 5_000));
    // The system clock stepped back a second: the write still counts as after the delete.
    s.store(
        StoreMode::Set,
        b"k",
        b"v",
        0,
        0,
        Now::from_ms(NOW_MS + 4_000),
    );
    assert_eq!(written_ms(&s, b"k", NOW + 4), Some(NOW_MS + 5_000));
}
