//! Fuzzes the store with random operation sequences against a plain map model (capacity
//! large enough that nothing is evicted), and checks the store's internal invariants after
//! every step, including with tiny capacities where eviction runs constantly.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use cache_node::store::{ArithOutcome, Policy, Store, StoreMode, StoreOutcome, TOMBSTONE_SECS};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Set { key: u8, len: u8, flags: u32 },
    SetNumber { key: u8, n: u64 },
    Add { key: u8, len: u8 },
    AddUnlessDeleted { key: u8, len: u8 },
    Replace { key: u8, len: u8 },
    Append { key: u8, len: u8 },
    Cas { key: u8, len: u8, stale: bool },
    Get { key: u8 },
    Delete { key: u8 },
    Incr { key: u8, delta: u64 },
    Expire { key: u8 },
    Tick,
    Policy(u8),
    Shrink(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    tiny: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let limit = if input.tiny { 4096 } else { 64 << 20 };
    let store = Store::with_shards(limit, Policy::Lru, 2);
    // The model only holds while nothing can be evicted.
    let mut model: Option<HashMap<Vec<u8>, (Vec<u8>, u32)>> = (!input.tiny).then(HashMap::new);
    let mut now = 1_000_000u32;
    // When each key was last deleted (for AddUnlessDeleted); a write since lifts it.
    let mut deleted_at: HashMap<Vec<u8>, u32> = HashMap::new();
    for op in input.ops {
        let key = |k: u8| format!("k{}", k % 32).into_bytes();
        let value = |k: u8, len: u8| vec![b'a' + k % 26; usize::from(len)];
        match op {
            Op::Set { key: k, len, flags } => {
                let r = store.store(StoreMode::Set, &key(k), &value(k, len), flags, 0, now);
                assert_eq!(r, StoreOutcome::Stored);
                deleted_at.remove(&key(k));
                if let Some(m) = &mut model {
                    m.insert(key(k), (value(k, len), flags));
                }
            }
            Op::SetNumber { key: k, n } => {
                let digits = n.to_string().into_bytes();
                assert_eq!(store.store(StoreMode::Set, &key(k), &digits, 0, 0, now), StoreOutcome::Stored);
                deleted_at.remove(&key(k));
                if let Some(m) = &mut model {
                    m.insert(key(k), (digits, 0));
                }
            }
            Op::Add { key: k, len } => {
                let r = store.store(StoreMode::Add, &key(k), &value(k, len), 0, 0, now);
                if r == StoreOutcome::Stored {
                    deleted_at.remove(&key(k));
                }
                if let Some(m) = &mut model {
                    let expect = if m.contains_key(&key(k)) { StoreOutcome::NotStored } else { StoreOutcome::Stored };
                    assert_eq!(r, expect);
                    m.entry(key(k)).or_insert((value(k, len), 0));
                }
            }
            Op::AddUnlessDeleted { key: k, len } => {
                // A copy of unknown age: any live tombstone refuses it.
                let mode = StoreMode::AddUnlessDeleted { written_ms: None };
                let r = store.store(mode, &key(k), &value(k, len), 0, 0, now);
                if let Some(m) = &mut model {
                    let tomb = deleted_at.get(&key(k)).is_some_and(|&at| at + TOMBSTONE_SECS > now);
                    let expect = if m.contains_key(&key(k)) || tomb { StoreOutcome::NotStored } else { StoreOutcome::Stored };
                    assert_eq!(r, expect);
                    if expect == StoreOutcome::Stored {
                        m.insert(key(k), (value(k, len), 0));
                    }
                }
            }
            Op::Replace { key: k, len } => {
                let r = store.store(StoreMode::Replace, &key(k), &value(k, len), 0, 0, now);
                if r == StoreOutcome::Stored {
                    deleted_at.remove(&key(k));
                }
                if let Some(m) = &mut model {
                    if let Some(v) = m.get_mut(&key(k)) {
                        assert_eq!(r, StoreOutcome::Stored);
                        *v = (value(k, len), 0);
                    } else {
                        assert_eq!(r, StoreOutcome::NotStored);
                    }
                }
            }
            Op::Append { key: k, len } => {
                let r = store.store(StoreMode::Append, &key(k), &value(k, len), 0, 0, now);
                if r == StoreOutcome::Stored {
                    deleted_at.remove(&key(k));
                }
                if let Some(m) = &mut model {
                    if let Some(v) = m.get_mut(&key(k)) {
                        assert_eq!(r, StoreOutcome::Stored);
                        v.0.extend(value(k, len));
                    } else {
                        assert_eq!(r, StoreOutcome::NotStored);
                    }
                }
            }
            Op::Cas { key: k, len, stale } => {
                let mut cas = None;
                store.get(&key(k), None, now, |meta, _| cas = Some(meta.cas));
                let unique = cas.map_or(1, |c| if stale { c.wrapping_add(1) } else { c });
                let r = store.store(StoreMode::Cas(unique), &key(k), &value(k, len), 0, 0, now);
                if r == StoreOutcome::Stored {
                    deleted_at.remove(&key(k));
                }
                match (cas, stale) {
                    (None, _) => assert_eq!(r, StoreOutcome::NotFound),
                    (Some(_), true) => assert_eq!(r, StoreOutcome::Exists),
                    (Some(_), false) => {
                        assert_eq!(r, StoreOutcome::Stored);
                        if let Some(m) = &mut model {
                            m.insert(key(k), (value(k, len), 0));
                        }
                    }
                }
            }
            Op::Get { key: k } => {
                let mut got = None;
                store.get(&key(k), None, now, |meta, v| got = Some((v.to_vec(), meta.flags)));
                if let Some(m) = &model {
                    assert_eq!(got.as_ref(), m.get(&key(k)));
                }
            }
            Op::Delete { key: k } => {
                let found = store.delete(&key(k), now);
                deleted_at.insert(key(k), now);
                if let Some(m) = &mut model {
                    assert_eq!(found, m.remove(&key(k)).is_some());
                }
            }
            Op::Incr { key: k, delta } => {
                let r = store.arith(&key(k), true, delta, now);
                if matches!(r, ArithOutcome::Value(_)) {
                    deleted_at.remove(&key(k));
                }
                if let Some(m) = &mut model {
                    match m.get_mut(&key(k)) {
                        None => assert_eq!(r, ArithOutcome::NotFound),
                        Some(v) => match std::str::from_utf8(&v.0).ok().and_then(|s| s.trim_end_matches(' ').parse::<u64>().ok()) {
                            Some(n) if !v.0.is_empty() && v.0[0].is_ascii_digit() => {
                                let new = n.wrapping_add(delta);
                                assert_eq!(r, ArithOutcome::Value(new));
                                v.0 = new.to_string().into_bytes();
                            }
                            _ => assert_eq!(r, ArithOutcome::NonNumeric),
                        },
                    }
                }
            }
            Op::Expire { key: k } => {
                let found = store.touch(&key(k), now + 1, now);
                if let Some(m) = &mut model {
                    assert_eq!(found, m.contains_key(&key(k)));
                    // Expired at the next tick: forget it then.
                    if found {
                        m.remove(&key(k));
                        now += 1;
                    }
                }
            }
            Op::Tick => now += 7,
            Op::Policy(p) => store.set_policy(Policy::ALL[usize::from(p) % Policy::ALL.len()]),
            Op::Shrink(kib) => {
                if input.tiny {
                    store.set_limit(usize::from(kib % 8 + 1) * 1024, now);
                }
            }
        }
        if let Err(e) = store.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
});
