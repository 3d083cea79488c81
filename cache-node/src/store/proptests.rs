//! Property test of tombstones and hand-off copies: random interleavings of client writes,
//! deletes and reads (routed as the pool client routes them), hand-off copies (read from the
//! source, then delivered later, as a pipelined batch is) and resizes over a few keys on three
//! in-process stores, each with its own clock within `CLOCK_SKEW_MS` of the others.
//!
//! Checked: no read ever returns anything but the latest acknowledged write or a miss; and once
//! a resize completes (every hand-off done), every key whose latest acknowledged operation is a
//! write is held by its owner with that value, and by no other node, except the documented case:
//! a write that came within the clocks' allowance (`2 * CLOCK_SKEW_MS` of global time) after a
//! delete on the node its copy goes back to, which the tombstone refuses (a miss, never stale).

use proptest::prelude::*;

use super::*;

const NODES: usize = 3;
const KEYS: usize = 4;
const START_MS: u64 = 1_700_000_000_000;

#[derive(Clone, Debug)]
enum Op {
    Set(usize),
    Delete(usize),
    Get(usize),
    /// Move the keys to these owners (ignored while a migration runs, as the operator queues
    /// it).
    Resize([usize; KEYS]),
    /// A node's hand-off reads every item it does not own under the current ring.
    HandoffRead(usize),
    /// One copy read earlier reaches its owner.
    HandoffDeliver(usize),
    /// Every hand-off runs to its end and the migration completes.
    Complete,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS).prop_map(Op::Set),
        3 => (0..KEYS).prop_map(Op::Delete),
        4 => (0..KEYS).prop_map(Op::Get),
        2 => proptest::array::uniform4(0..NODES).prop_map(Op::Resize),
        2 => (0..NODES).prop_map(Op::HandoffRead),
        3 => (0..64usize).prop_map(Op::HandoffDeliver),
        1 => Just(Op::Complete),
        3 => prop_oneof![0..=60u64, 0..=3_000u64, Just(31_000u64)].prop_map(Op::Advance),
    ]
}

/// A copy on its way: read from `from`, going to `to`.
#[derive(Debug)]
struct Copy {
    from: usize,
    to: usize,
    item: OwnedItem,
}

#[derive(Debug)]
struct Pool {
    nodes: Vec<Store>,
    /// Each node's clock offset from global time (ms).
    offsets: [i64; NODES],
    now_ms: u64,
    owners: [usize; KEYS],
    previous: Option<[usize; KEYS]>,
    in_flight: Vec<Copy>,
    /// The latest acknowledged operation per key: `Some(value)` for a write, `None` for a
    /// delete (or nothing yet).
    latest: [Option<Vec<u8>>; KEYS],
    /// Global time of each key's latest acknowledged write and delete.
    written_at: [Option<u64>; KEYS],
    deleted_at: [Option<u64>; KEYS],
    writes: u64,
    /// Writes lost in the documented case.
    excused: u64,
}

fn key(k: usize) -> Vec<u8> {
    format!("k{k}").into_bytes()
}

fn index_of(key: &[u8]) -> usize {
    std::str::from_utf8(&key[1..])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a model key: {key:?}"))
}

impl Pool {
    fn new(offsets: [i64; NODES]) -> Pool {
        Pool {
            nodes: (0..NODES)
                .map(|_| Store::with_shards(1 << 20, Policy::Lru, 1))
                .collect(),
            offsets,
            now_ms: START_MS,
            owners: [0; KEYS],
            previous: None,
            in_flight: Vec::new(),
            latest: Default::default(),
            written_at: [None; KEYS],
            deleted_at: [None; KEYS],
            writes: 0,
            excused: 0,
        }
    }

    /// Node `n`'s clock.
    fn clock(&self, n: usize) -> Now {
        Now::from_ms(self.now_ms.saturating_add_signed(self.offsets[n]))
    }

    /// Node `n`'s value of `k` and its CAS.
    fn get_on(&self, n: usize, k: usize) -> Option<(Vec<u8>, u64)> {
        self.held_on(n, k).map(|(v, meta)| (v, meta.cas))
    }

    /// What the pool client's `mg … w` reads: the value and its metadata with write time.
    fn held_on(&self, n: usize, k: usize) -> Option<(Vec<u8>, ItemMeta)> {
        let mut out = None;
        self.nodes[n].get_with_write_time(&key(k), None, self.clock(n), |meta, v| {
            out = Some((v.to_vec(), meta));
        });
        out
    }

    /// The previous owner of `k` while it migrates.
    fn previous_owner(&self, k: usize) -> Option<usize> {
        self.previous.map(|p| p[k]).filter(|&p| p != self.owners[k])
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Set(k) => {
                // The pool client: delete on the previous owner without a tombstone, then set.
                if let Some(p) = self.previous_owner(k) {
                    self.nodes[p].delete_cas(&key(k), None, false, self.clock(p));
                }
                self.writes += 1;
                let value = format!("v{}", self.writes).into_bytes();
                let o = self.owners[k];
                let stored =
                    self.nodes[o].store(StoreMode::Set, &key(k), &value, 0, 0, self.clock(o));
                prop_assert_eq!(stored, StoreOutcome::Stored);
                self.latest[k] = Some(value);
                self.written_at[k] = Some(self.now_ms);
            }
            Op::Delete(k) => {
                if let Some(p) = self.previous_owner(k) {
                    self.nodes[p].delete_cas(&key(k), None, false, self.clock(p));
                }
                let o = self.owners[k];
                self.nodes[o].delete(&key(k), self.clock(o));
                self.latest[k] = None;
                self.deleted_at[k] = Some(self.now_ms);
            }
            Op::Get(k) => {
                let read = self.get(k);
                if let Some(value) = read {
                    prop_assert_eq!(
                        Some(&value),
                        self.latest[k].as_ref(),
                        "stale read of k{}",
                        k
                    );
                }
            }
            Op::Resize(owners) => {
                if self.previous.is_none() && owners != self.owners {
                    self.previous = Some(self.owners);
                    self.owners = owners;
                }
            }
            Op::HandoffRead(n) => {
                if self.previous.is_some() {
                    let copies = self.foreign(n);
                    self.in_flight.extend(copies);
                }
            }
            Op::HandoffDeliver(i) => {
                if !self.in_flight.is_empty() {
                    let copy = self.in_flight.remove(i % self.in_flight.len());
                    self.deliver(copy);
                }
            }
            Op::Complete => self.complete()?,
            Op::Advance(ms) => self.now_ms += ms,
        }
        Ok(())
    }

    /// The pool client's get: the owner, then the previous owner with a copy forward that
    /// carries the write time it read.
    fn get(&mut self, k: usize) -> Option<Vec<u8>> {
        let o = self.owners[k];
        if let Some((value, _)) = self.get_on(o, k) {
            return Some(value);
        }
        let p = self.previous_owner(k)?;
        let Some((value, meta)) = self.held_on(p, k) else {
            return self.get_on(o, k).map(|(v, _)| v);
        };
        let cas = meta.cas;
        let (outcome, copy_cas) = self.nodes[o].store_cas(
            StoreMode::AddUnlessDeleted {
                written_ms: meta.written_ms,
            },
            &key(k),
            &value,
            0,
            0,
            self.clock(o),
        );
        // The re-check: withdraw the copy if the source changed meanwhile.
        if outcome == StoreOutcome::Stored && self.get_on(p, k).is_some_and(|(_, c)| c != cas) {
            self.nodes[o].delete_cas(&key(k), Some(copy_cas), true, self.clock(o));
            return self.get_on(o, k).map(|(v, _)| v);
        }
        Some(value)
    }

    /// Copies of every item node `n` holds but does not own.
    fn foreign(&self, n: usize) -> Vec<Copy> {
        let owners = self.owners;
        let mut cursor = ScanCursor::default();
        let mut out = Vec::new();
        while !cursor.is_done() {
            let batch = self.nodes[n].scan(&mut cursor, usize::MAX, self.clock(n).secs, |k| {
                owners[index_of(k)] != n
            });
            out.extend(batch.into_iter().map(|item| Copy {
                from: n,
                to: owners[index_of(&item.key)],
                item,
            }));
        }
        out
    }

    /// The hand-off's rules for one copy: an add that a tombstone refuses unless the copy's
    /// write is newer; the source dropped only if unchanged, else the copy withdrawn.
    fn deliver(&mut self, copy: Copy) {
        let Copy { from, to, item } = copy;
        let (outcome, copy_cas) = self.nodes[to].store_cas(
            StoreMode::AddUnlessDeleted {
                written_ms: item.written_ms,
            },
            &item.key,
            &item.value,
            item.flags,
            item.expiry,
            self.clock(to),
        );
        let dropped = self.nodes[from].delete_if_cas(&item.key, item.cas, self.clock(from).secs);
        if !dropped && outcome == StoreOutcome::Stored {
            self.nodes[to].delete_cas(&item.key, Some(copy_cas), true, self.clock(to));
        }
    }

    /// Every hand-off to its end, then the migration completes; checks what must then hold.
    fn complete(&mut self) -> Result<(), TestCaseError> {
        for copy in std::mem::take(&mut self.in_flight) {
            self.deliver(copy);
        }
        if self.previous.is_none() {
            return Ok(());
        }
        for n in 0..NODES {
            for copy in self.foreign(n) {
                self.deliver(copy);
            }
        }
        self.previous = None;
        for k in 0..KEYS {
            let o = self.owners[k];
            for n in (0..NODES).filter(|&n| n != o) {
                prop_assert!(self.get_on(n, k).is_none(), "k{} left on node {}", k, n);
            }
            let held = self.get_on(o, k).map(|(v, _)| v);
            match (&self.latest[k], held) {
                (Some(want), Some(got)) => prop_assert_eq!(want, &got, "k{} on its owner", k),
                (None, Some(got)) => {
                    prop_assert!(false, "k{} deleted, yet its owner holds {:?}", k, got)
                }
                (Some(_), None) => {
                    // The documented case: written within the allowance after a delete.
                    let excused = match (self.written_at[k], self.deleted_at[k]) {
                        (Some(w), Some(d)) => w >= d && w - d <= 2 * CLOCK_SKEW_MS,
                        _ => false,
                    };
                    prop_assert!(excused, "the acknowledged write of k{} was lost", k);
                    self.excused += 1;
                    self.latest[k] = None;
                }
                (None, None) => {}
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn tombstones_and_hand_off_copies_never_serve_stale_values_nor_lose_writes(
        offsets in proptest::array::uniform3(
            -(CLOCK_SKEW_MS as i64 / 2)..=(CLOCK_SKEW_MS as i64 / 2)
        ),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut pool = Pool::new(offsets);
        for op in &ops {
            pool.apply(op)?;
        }
        pool.apply(&Op::Complete)?;
    }
}
