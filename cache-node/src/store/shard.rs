//! One lock's worth of the store: an index from key to slot, the slots holding items, and the
//! replacement policy's queues over those slots.
//!
//! Layout per item: an 8-byte thin pointer and 8 bytes of queue links in two dense vectors,
//! a 4-byte slot id in the hash index (hashbrown's swiss table, one control byte more), and
//! the item allocation itself (22-byte header, key, value). Slots are recycled through a free
//! list so ids stay dense, which lets the random policy sample slots directly.

use hashbrown::HashTable;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::arena::{self, Arena};
use super::item::Item;
use super::lists::{self, Link, NIL, Queue};
use super::{Policy, ShardStats};

/// Memory the store spends per item outside its allocation: pointer, links, and an estimate
/// of the index entry at a typical load (4-byte id + control byte at ~60% load).
pub const SLOT_OVERHEAD: usize = 8 + 8 + 8;

/// SIEVE's visited bit.
const VISITED: u8 = 0b100;

/// Hash used for the index and for shard selection (xxh3, the ring's hash too).
pub fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// What an item costs against the capacity: the chunk its allocation really takes plus the
/// slot overhead.
pub fn item_cost(key_len: usize, value_len: usize) -> usize {
    arena::chunk_size(super::item::HEADER_LEN + key_len + value_len) + SLOT_OVERHEAD
}

fn cost_of(item: &Item) -> usize {
    arena::chunk_size(item.alloc_len()) + SLOT_OVERHEAD
}

/// How long a delete blocks copies carried forward that were written before it: longer than
/// a copy-forward or hand-off batch can take (their request timeouts are 1 s and 15 s).
pub const TOMBSTONE_SECS: u32 = 30;
/// How far apart the nodes' clocks may be, in milliseconds: a copy carried forward passes a
/// tombstone only if its write time is later than the delete by more than this (see
/// `docs/architecture.md`, "Tombstones").
pub const CLOCK_SKEW_MS: u64 = 50;
/// How long a key's write time is remembered: longer than a tombstone lives plus the clock
/// skew, so a write whose time is forgotten is older than every live tombstone anywhere.
pub const WRITE_TIME_MS: u64 = TOMBSTONE_SECS as u64 * 1000 + 5_000;
/// Most tombstones kept per shard; the oldest go first.
const MAX_TOMBSTONES: usize = 1 << 15;
/// Most write times kept per shard. Past it, new keys' write times are not kept: their copies
/// are then treated as older than any tombstone (a possible miss, never a stale read).
const MAX_WRITE_TIMES: usize = 1 << 13;

/// A bounded, time-ordered set of recently deleted key hashes, with the time of the delete
/// (Unix milliseconds).
#[derive(Debug, Default)]
struct Tombstones {
    order: std::collections::VecDeque<(u64, u64)>,
    latest: std::collections::HashMap<u64, u64>,
}

impl Tombstones {
    fn record(&mut self, hash: u64, at_ms: u64) {
        let life = u64::from(TOMBSTONE_SECS) * 1000;
        while let Some(&(old, at)) = self.order.front() {
            if self.order.len() < MAX_TOMBSTONES && at + life > at_ms {
                break;
            }
            self.order.pop_front();
            if self.latest.get(&old) == Some(&at) {
                self.latest.remove(&old);
            }
        }
        self.order.push_back((hash, at_ms));
        self.latest.insert(hash, at_ms);
    }

    /// When `hash` was deleted, if within the last `TOMBSTONE_SECS`.
    fn deleted_at(&self, hash: u64, now_ms: u64) -> Option<u64> {
        let life = u64::from(TOMBSTONE_SECS) * 1000;
        self.latest
            .get(&hash)
            .copied()
            .filter(|&at| at + life > now_ms)
    }
}

/// The write times (Unix milliseconds) of keys written in the last `WRITE_TIME_MS`, by key
/// hash: what a copy of the key carries when it is handed off, for the owner to weigh
/// against its tombstones. Kept beside the items rather than in them: only recent writes can
/// be newer than a live tombstone, and a field in every item would cost 8 bytes per item
/// where this costs a bounded table.
#[derive(Debug, Default)]
struct WriteTimes {
    times: std::collections::HashMap<u64, u64>,
    /// No sweep before this time (bounds the work of sweeping a full table).
    next_sweep_ms: u64,
}

impl WriteTimes {
    fn record(&mut self, hash: u64, at_ms: u64, now_ms: u64) {
        if self.times.len() >= MAX_WRITE_TIMES
            && !self.times.contains_key(&hash)
            && now_ms >= self.next_sweep_ms
        {
            self.times.retain(|_, &mut t| t + WRITE_TIME_MS > now_ms);
            self.next_sweep_ms = now_ms + 1000;
        }
        if self.times.len() < MAX_WRITE_TIMES || self.times.contains_key(&hash) {
            self.times.insert(hash, at_ms);
        } else {
            // Full: forgetting is safe (the copy then counts as old), keeping a stale time not.
            self.times.remove(&hash);
        }
    }

    fn get(&self, hash: u64, now_ms: u64) -> Option<u64> {
        self.times
            .get(&hash)
            .copied()
            .filter(|&t| t + WRITE_TIME_MS > now_ms)
    }
}

#[derive(Debug)]
pub struct Shard {
    arena: Arena,
    index: HashTable<u32>,
    items: Vec<Option<Item>>,
    links: Vec<Link>,
    free_head: u32,
    queue: Queue,
    /// SIEVE's hand: the next slot to examine for eviction (NIL: start at the tail).
    hand: u32,
    policy: Policy,
    rng: SmallRng,
    next_cas: u64,
    shard_bits: u32,
    shard_id: u64,
    /// Unix second from which everything stored so far is invalid (`flush_all` with delay).
    pub flush_deadline: u32,
    /// Recent deletes (key hash, Unix ms), so a copy carried forward during a migration
    /// cannot bring back a value deleted meanwhile (`StoreMode::AddUnlessDeleted`).
    tombstones: Tombstones,
    /// Recent writes (key hash, Unix ms), the write times hand-off copies carry.
    write_times: WriteTimes,
    /// The latest event time handed out (Unix ms): event times never go backwards in a
    /// shard, even if the system clock does.
    last_event_ms: u64,
    pub stats: ShardStats,
    /// Sum of item costs.
    pub bytes: usize,
    /// This shard's share of the capacity.
    pub share: usize,
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Shard {
    pub fn new(shard_id: usize, shard_bits: u32, policy: Policy, share: usize) -> Shard {
        Shard {
            arena: Arena::default(),
            index: HashTable::new(),
            items: Vec::new(),
            links: Vec::new(),
            free_head: NIL,
            queue: Queue::default(),
            hand: NIL,
            policy,
            rng: SmallRng::seed_from_u64(0x5eed ^ shard_id as u64),
            next_cas: 1,
            shard_bits,
            shard_id: shard_id as u64,
            flush_deadline: 0,
            tombstones: Tombstones::default(),
            write_times: WriteTimes::default(),
            last_event_ms: 0,
            stats: ShardStats::default(),
            bytes: 0,
            share,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len
    }

    /// A fresh CAS value, unique across shards (shard id in the low bits).
    pub fn next_cas(&mut self) -> u64 {
        let cas = ((self.next_cas << self.shard_bits) | self.shard_id) & super::item::CAS_MASK;
        // Skip 0 after a wrap: clients treat it as "no CAS value".
        self.next_cas = (self.next_cas + 1) & (super::item::CAS_MASK >> self.shard_bits);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        cas
    }

    pub fn find(&self, key: &[u8], hash: u64) -> Option<u32> {
        let items = &self.items;
        self.index
            .find(hash, |&id| {
                items[id as usize]
                    .as_ref()
                    .is_some_and(|it| it.key() == key)
            })
            .copied()
    }

    pub fn item(&self, id: u32) -> &Item {
        match &self.items[id as usize] {
            Some(item) => item,
            None => unreachable!("slot {id} referenced by the index is empty"),
        }
    }

    pub fn item_mut(&mut self, id: u32) -> &mut Item {
        match &mut self.items[id as usize] {
            Some(item) => item,
            None => unreachable!("slot {id} referenced by the index is empty"),
        }
    }

    /// Applies `flush_all` if its deadline has passed; returns the bytes freed.
    #[must_use]
    pub fn check_flush(&mut self, now: u32) -> usize {
        if self.flush_deadline != 0 && now >= self.flush_deadline {
            self.flush_deadline = 0;
            self.clear()
        } else {
            0
        }
    }

    /// Drops every item.
    pub fn clear(&mut self) -> usize {
        let freed = self.bytes;
        for item in std::mem::take(&mut self.items).into_iter().flatten() {
            // Small items go with their pages below.
            if !item.is_small() {
                item.free(&mut self.arena);
            }
        }
        // SAFETY: no item of this shard remains: every slot was just taken.
        unsafe { self.arena.reset() };
        self.index.clear();
        self.links = Vec::new();
        self.free_head = NIL;
        self.queue = Queue::default();
        self.hand = NIL;
        self.bytes = 0;
        freed
    }

    /// Stores a new item (the key must not be present; the caller made room for it) and
    /// returns its slot.
    pub fn insert(&mut self, hash: u64, key: &[u8], value: &[u8], flags: u32, expiry: u32) -> u32 {
        let cas = self.next_cas();
        let item = Item::new(&mut self.arena, key, value, flags, expiry, cas);
        let cost = cost_of(&item);
        let id = if self.free_head != NIL {
            let id = self.free_head;
            self.free_head = self.links[id as usize].next;
            self.items[id as usize] = Some(item);
            id
        } else {
            self.items.push(Some(item));
            self.links.push(Link::default());
            (self.items.len() - 1) as u32
        };
        let items = &self.items;
        self.index.insert_unique(hash, id, |&other| {
            hash_key(
                items[other as usize]
                    .as_ref()
                    .map_or(&[][..], |it| it.key()),
            )
        });
        self.item_mut(id).set_bits(0);
        lists::push_head(&mut self.links, &mut self.queue, id, cost);
        self.bytes += cost;
        self.stats.total_items += 1;
        id
    }

    /// Takes the item in slot `id` out of the policy's queue, so eviction cannot choose it,
    /// while it stays readable. Undone by `reattach`, ended by `remove_detached`.
    pub fn detach(&mut self, id: u32) {
        let cost = cost_of(self.item(id));
        if self.hand == id {
            self.hand = self.links[id as usize].prev;
        }
        lists::unlink(&mut self.links, &mut self.queue, id, cost);
    }

    /// Whether slot `id` is in the queue (false for a detached item, which eviction must not
    /// choose).
    fn is_queued(&self, id: u32) -> bool {
        let link = self.links[id as usize];
        link.prev != NIL || link.next != NIL || self.queue.head == id
    }

    /// Puts a detached item back at the head of the queue.
    pub fn reattach(&mut self, id: u32) {
        let cost = cost_of(self.item(id));
        lists::push_head(&mut self.links, &mut self.queue, id, cost);
    }

    /// Removes the item in slot `id`; returns the bytes freed.
    pub fn remove(&mut self, id: u32, hash: u64) -> usize {
        self.detach(id);
        self.remove_detached(id, hash)
    }

    /// Removes a detached item; returns the bytes freed.
    pub fn remove_detached(&mut self, id: u32, hash: u64) -> usize {
        let cost = cost_of(self.item(id));
        if let Ok(entry) = self.index.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        if let Some(item) = self.items[id as usize].take() {
            item.free(&mut self.arena);
        }
        self.links[id as usize].next = self.free_head;
        self.free_head = id;
        self.bytes -= cost;
        cost
    }

    /// The time of an event (write or delete) happening now: `now_ms`, or the previous
    /// event's time if the clock went back.
    pub fn event_ms(&mut self, now_ms: u64) -> u64 {
        self.last_event_ms = self.last_event_ms.max(now_ms);
        self.last_event_ms
    }

    /// Remembers that `hash` was deleted at `at_ms` (see `Tombstones`).
    pub fn record_delete(&mut self, hash: u64, at_ms: u64) {
        self.tombstones.record(hash, at_ms);
    }

    /// Forgets a tombstone of `hash` (the key was written since).
    pub fn forget_delete(&mut self, hash: u64) {
        self.tombstones.latest.remove(&hash);
    }

    /// When `hash` was deleted, if within the last `TOMBSTONE_SECS`.
    pub fn deleted_at(&self, hash: u64, now_ms: u64) -> Option<u64> {
        self.tombstones.deleted_at(hash, now_ms)
    }

    /// Remembers that the value of `hash` now held was written at `at_ms` (`None`: unknown,
    /// so forgotten).
    pub fn record_write(&mut self, hash: u64, at_ms: Option<u64>, now_ms: u64) {
        match at_ms {
            Some(at) => self.write_times.record(hash, at, now_ms),
            None => {
                self.write_times.times.remove(&hash);
            }
        }
    }

    /// When the value of `hash` was written, if within the last `WRITE_TIME_MS`.
    pub fn written_at(&self, hash: u64, now_ms: u64) -> Option<u64> {
        self.write_times.get(hash, now_ms)
    }

    /// Records a read hit for the policy.
    pub fn on_hit(&mut self, id: u32) {
        match self.policy {
            Policy::Lru => {
                let cost = cost_of(self.item(id));
                lists::unlink(&mut self.links, &mut self.queue, id, cost);
                lists::push_head(&mut self.links, &mut self.queue, id, cost);
            }
            Policy::Random => {}
            Policy::Sieve => {
                let item = self.item_mut(id);
                item.set_bits(item.bits() | VISITED);
            }
        }
    }

    /// Evicts one item chosen by the policy; returns the bytes freed, or `None` if empty.
    pub fn evict_one(&mut self) -> Option<usize> {
        if self.len() == 0 {
            return None;
        }
        let victim = match self.policy {
            Policy::Lru => self.queue.tail,
            Policy::Random => self.random_victim(),
            Policy::Sieve => self.sieve_victim(),
        };
        let hash = hash_key(self.item(victim).key());
        self.stats.evictions += 1;
        Some(self.remove(victim, hash))
    }

    fn random_victim(&mut self) -> u32 {
        // Slots are dense (free slots are reused first), so a few samples find an item;
        // fall back to the queue tail to stay bounded.
        for _ in 0..16 {
            let id = self.rng.random_range(0..self.items.len()) as u32;
            if self.items[id as usize].is_some() && self.is_queued(id) {
                return id;
            }
        }
        self.queue.tail
    }

    /// SIEVE (Zhang et al., NSDI'24): one FIFO, a visited bit set on reads, and a hand that
    /// walks from the oldest item towards the newest, sparing (and clearing) visited items and
    /// evicting the first unvisited one. Spared items stay in place, so a hit writes one bit
    /// and no links; chosen over S3-FIFO and W-TinyLFU by measurement (docs/benchmarks.md).
    fn sieve_victim(&mut self) -> u32 {
        let mut at = if self.hand == NIL {
            self.queue.tail
        } else {
            self.hand
        };
        loop {
            let item = self.item_mut(at);
            let bits = item.bits();
            if bits & VISITED == 0 {
                // `remove` moves the hand on to the victim's newer neighbour.
                self.hand = at;
                return at;
            }
            item.set_bits(bits & !VISITED);
            at = self.links[at as usize].prev;
            if at == NIL {
                at = self.queue.tail;
            }
        }
    }

    /// Switches policy, keeping every item. Every policy orders the same queue (recency for
    /// LRU, insertion for SIEVE and random), so a switch only clears the policy bits.
    pub fn set_policy(&mut self, policy: Policy) {
        if policy == self.policy {
            return;
        }
        let mut at = self.queue.head;
        while at != NIL {
            self.item_mut(at).set_bits(0);
            at = self.links[at as usize].next;
        }
        self.hand = NIL;
        self.policy = policy;
    }

    /// Removes up to `budget` expired items, scanning slots from `cursor`; returns the next
    /// cursor and the bytes freed. Lets a background crawler reclaim memory without holding
    /// the lock for long.
    pub fn reap_expired(&mut self, cursor: usize, budget: usize, now: u32) -> (usize, usize) {
        let mut freed = 0;
        let end = (cursor + budget).min(self.items.len());
        for id in cursor..end {
            let expired = self.items[id].as_ref().is_some_and(|it| it.is_expired(now));
            if expired {
                let hash = hash_key(self.item(id as u32).key());
                freed += self.remove(id as u32, hash);
                self.stats.expired_unfetched += 1;
            }
        }
        (if end >= self.items.len() { 0 } else { end }, freed)
    }

    /// Copies out live items from slot `cursor` on, those `select` picks, until `max_bytes`
    /// of values are collected or the slots end; returns the next cursor (0 at the end).
    pub fn scan(
        &self,
        cursor: usize,
        max_bytes: usize,
        now: u32,
        select: &mut impl FnMut(&[u8]) -> bool,
        out: &mut Vec<super::OwnedItem>,
    ) -> usize {
        let mut bytes = 0;
        for id in cursor..self.items.len() {
            if bytes >= max_bytes {
                return id;
            }
            let Some(item) = &self.items[id] else {
                continue;
            };
            if item.is_expired(now) || !select(item.key()) {
                continue;
            }
            bytes += item.key().len() + item.value().len();
            let written_ms = self.written_at(hash_key(item.key()), u64::from(now) * 1000);
            out.push(super::OwnedItem {
                written_ms,
                key: item.key().to_vec(),
                value: item.value().to_vec(),
                flags: item.flags(),
                expiry: item.expiry(),
                cas: item.cas(),
            });
        }
        0
    }

    /// The shard's slab arena (for `stats slabs`).
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Visits every live item (for the hand-off and for tests).
    pub fn for_each(&self, mut f: impl FnMut(&Item)) {
        for item in self.items.iter().flatten() {
            f(item);
        }
    }

    /// Checks internal consistency; used by tests and the fuzz target.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut count = 0;
        let mut bytes = 0;
        {
            let q = &self.queue;
            let (mut at, mut prev, mut n, mut b) = (q.head, NIL, 0, 0);
            while at != NIL {
                let link = self.links[at as usize];
                if link.prev != prev {
                    return Err(format!("slot {at}: prev {} != {prev}", link.prev));
                }
                let item = self.items[at as usize]
                    .as_ref()
                    .ok_or("queued slot is empty")?;
                if self.find(item.key(), hash_key(item.key())) != Some(at) {
                    return Err(format!("slot {at} not reachable through the index"));
                }
                n += 1;
                b += cost_of(item);
                prev = at;
                at = link.next;
            }
            if prev != q.tail || n != q.len || b != q.bytes {
                return Err(format!(
                    "queue totals wrong: {n}/{} items {b}/{} bytes",
                    q.len, q.bytes
                ));
            }
            count += n;
            bytes += b;
        }
        if count != self.index.len() || bytes != self.bytes {
            return Err(format!(
                "index holds {} items, queues {count}; bytes {} vs {bytes}",
                self.index.len(),
                self.bytes
            ));
        }
        Ok(())
    }
}
