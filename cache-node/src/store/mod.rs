//! The item store: memcached's data model (key, flags, expiry, CAS, value) under a byte
//! capacity that counts everything an item costs, with a live-switchable replacement policy.
//!
//! The store is sharded by key hash, one mutex per shard, so that threads rarely meet; the
//! capacity is one global budget, so a single large item may use most of it (a node caches
//! images of up to 16 MiB with the default 64 MiB capacity). An insert first evicts from its
//! own shard, which keeps shards balanced because keys hash uniformly, and only when its shard
//! is empty evicts from the others, never holding two locks at once.
//!
//! Every operation takes `now` from the caller (Unix seconds, and for writes and deletes a
//! [`Now`] with milliseconds too), so the store has no clock and its behaviour is a plain
//! function of its inputs. The milliseconds order writes and deletes across nodes: a hand-off
//! copy carries the time of its write, and passes a tombstone only if that write is newer
//! than the delete (see `StoreMode::AddUnlessDeleted`).

mod arena;
pub mod classes;
mod item;
mod lists;
mod shard;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub use item::HEADER_LEN as ITEM_HEADER_LEN;
pub use item::Item;
use shard::Shard;
pub use shard::{CLOCK_SKEW_MS, SLOT_OVERHEAD, TOMBSTONE_SECS, WRITE_TIME_MS, hash_key, item_cost};

/// The time a write or delete happens at, as the store needs it: Unix seconds (expiry,
/// `flush_all`) and Unix milliseconds (the order of writes and deletes, kept for tombstones
/// and for the write times hand-off copies carry). A bare `u32` converts to one with the
/// milliseconds of the second's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub secs: u32,
    pub ms: u64,
}

impl Now {
    /// The instant `ms` (Unix milliseconds).
    pub fn from_ms(ms: u64) -> Now {
        Now {
            secs: u32::try_from(ms / 1000).unwrap_or(u32::MAX),
            ms,
        }
    }

    /// The system clock's time.
    pub fn system() -> Now {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Now::from_ms(ms)
    }
}

impl From<u32> for Now {
    fn from(secs: u32) -> Now {
        Now {
            secs,
            ms: u64::from(secs) * 1000,
        }
    }
}

/// Replacement policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Least recently used: exact, per shard.
    Lru,
    /// A uniformly random item.
    Random,
    /// SIEVE: a FIFO whose eviction hand spares items read since it last passed.
    Sieve,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Lru, Policy::Random, Policy::Sieve];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Random => "random",
            Policy::Sieve => "sieve",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Policy::Lru),
            "random" => Ok(Policy::Random),
            "sieve" => Ok(Policy::Sieve),
            other => Err(format!(
                "unknown policy {other:?}: expected lru, random or sieve"
            )),
        }
    }
}

/// Counters kept per shard under its lock (no atomics on the hot path).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ShardStats {
    pub get_hits: u64,
    pub get_misses: u64,
    pub get_expired: u64,
    pub get_flushed: u64,
    pub cmd_set: u64,
    pub cmd_touch: u64,
    pub touch_hits: u64,
    pub touch_misses: u64,
    pub delete_hits: u64,
    pub delete_misses: u64,
    pub incr_hits: u64,
    pub incr_misses: u64,
    pub decr_hits: u64,
    pub decr_misses: u64,
    pub cas_hits: u64,
    pub cas_misses: u64,
    pub cas_badval: u64,
    pub evictions: u64,
    pub expired_unfetched: u64,
    pub total_items: u64,
}

impl ShardStats {
    fn add(&mut self, o: &ShardStats) {
        self.get_hits += o.get_hits;
        self.get_misses += o.get_misses;
        self.get_expired += o.get_expired;
        self.get_flushed += o.get_flushed;
        self.cmd_set += o.cmd_set;
        self.cmd_touch += o.cmd_touch;
        self.touch_hits += o.touch_hits;
        self.touch_misses += o.touch_misses;
        self.delete_hits += o.delete_hits;
        self.delete_misses += o.delete_misses;
        self.incr_hits += o.incr_hits;
        self.incr_misses += o.incr_misses;
        self.decr_hits += o.decr_hits;
        self.decr_misses += o.decr_misses;
        self.cas_hits += o.cas_hits;
        self.cas_misses += o.cas_misses;
        self.cas_badval += o.cas_badval;
        self.evictions += o.evictions;
        self.expired_unfetched += o.expired_unfetched;
        self.total_items += o.total_items;
    }
}

/// A consistent-enough snapshot of the whole store.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StoreStats {
    #[serde(flatten)]
    pub counters: ShardStats,
    pub curr_items: u64,
    pub bytes: u64,
    pub limit_maxbytes: u64,
    pub policy: Option<Policy>,
}

/// The storage commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    /// Store only if the item's CAS value still equals this one.
    Cas(u64),
    /// Add, and also refuse if the key was deleted within the last `TOMBSTONE_SECS` unless
    /// the copy's write time (`written_ms`, Unix ms on the clock of the node the write
    /// reached) is later than the delete by more than `CLOCK_SKEW_MS`: how copies carried
    /// forward during a migration (pool client, hand-off) are stored, so that a delete racing
    /// the copy cannot be undone by it, while a value written after the delete (on another
    /// node, the key having moved away and back) is not refused. Without a write time every
    /// recent delete refuses the copy. The stored item keeps `written_ms` as its write time.
    AddUnlessDeleted {
        written_ms: Option<u64>,
    },
}

/// Result of a storage command, named as the protocol answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    NotStored,
    Exists,
    NotFound,
    /// The item costs more than the whole capacity.
    TooLarge,
}

/// Result of a conditional delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The item's CAS value differs.
    Exists,
}

/// Result of `incr`/`decr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOutcome {
    Value(u64),
    NotFound,
    NonNumeric,
}

/// An item's metadata as seen by a reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemMeta {
    pub flags: u32,
    pub cas: u64,
    /// Absolute expiry, Unix seconds; 0 means never.
    pub expiry: u32,
    /// When the value was written (Unix ms), if recently (`WRITE_TIME_MS`). Looked up only
    /// for `Store::get_with_write_time`; `None` from `Store::get`.
    pub written_ms: Option<u64>,
}

/// A copy of an item taken out of the store (for the hand-off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedItem {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub flags: u32,
    /// Absolute expiry, Unix seconds; 0 means never.
    pub expiry: u32,
    pub cas: u64,
    /// When the value was written (Unix ms), if recently (`WRITE_TIME_MS`); older writes are
    /// older than every live tombstone.
    pub written_ms: Option<u64>,
}

/// Where a scan stands: shard and slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCursor {
    shard: usize,
    slot: usize,
    done: bool,
}

impl ScanCursor {
    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// The sharded store.
#[derive(Debug)]
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    shard_bits: u32,
    used: AtomicUsize,
    limit: AtomicUsize,
    /// Largest item (`protocol::item_size`) an append or prepend may grow to.
    max_item: AtomicUsize,
    policy: Mutex<Policy>,
}

/// Default shard count: enough that a few worker threads rarely contend, few enough that
/// per-shard eviction stays close to the global policy.
pub const DEFAULT_SHARD_BITS: u32 = 4;

impl Store {
    pub fn new(limit_bytes: usize, policy: Policy) -> Store {
        Store::with_shards(limit_bytes, policy, DEFAULT_SHARD_BITS)
    }

    /// A store with `2^shard_bits` shards (at most 256).
    pub fn with_shards(limit_bytes: usize, policy: Policy, shard_bits: u32) -> Store {
        let shard_bits = shard_bits.min(8);
        let n = 1usize << shard_bits;
        let share = limit_bytes / n;
        let shards = (0..n)
            .map(|i| Mutex::new(Shard::new(i, shard_bits, policy, share)))
            .collect();
        Store {
            shards,
            shard_bits,
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit_bytes),
            max_item: AtomicUsize::new(usize::MAX),
            policy: Mutex::new(policy),
        }
    }

    fn shard_index(&self, hash: u64) -> usize {
        // The top bits: the index uses the low bits for its buckets.
        if self.shard_bits == 0 {
            0
        } else {
            (hash >> (64 - self.shard_bits)) as usize
        }
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave the shard half-updated in a way
        // later operations trip over (each mutation completes before any call that can
        // panic), so poisoning is ignored rather than propagated to every client.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn locked(&self, key: &[u8], now: u32) -> (u64, usize, MutexGuard<'_, Shard>) {
        let hash = hash_key(key);
        let i = self.shard_index(hash);
        let mut shard = self.lock(i);
        self.check_flush(&mut shard, now);
        (hash, i, shard)
    }

    fn check_flush(&self, shard: &mut Shard, now: u32) {
        let freed = shard.check_flush(now);
        if freed > 0 {
            self.used.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// Looks up a live item, removing it if expired. Returns its slot.
    fn lookup(shard: &mut Shard, key: &[u8], hash: u64, now: u32, used: &AtomicUsize) -> Lookup {
        match shard.find(key, hash) {
            None => Lookup::Missing,
            Some(id) if shard.item(id).is_expired(now) => {
                let freed = shard.remove(id, hash);
                used.fetch_sub(freed, Ordering::Relaxed);
                Lookup::Expired
            }
            Some(id) => Lookup::Live(id),
        }
    }

    /// `get`/`gets`, and `gat`/`gats` when `touch` carries the new expiry. Calls `read` with the
    /// item's metadata and value while the shard is locked (so the value is copied once,
    /// straight into the caller's output buffer).
    pub fn get(
        &self,
        key: &[u8],
        touch: Option<u32>,
        now: u32,
        read: impl FnOnce(ItemMeta, &[u8]),
    ) -> bool {
        self.read(key, touch, now.into(), false, read)
    }

    /// `get` that also reports when the value was written (`ItemMeta::written_ms`, meta get's
    /// `w` flag): the pool client carries it with a copy it moves forward, so the copy meets
    /// tombstones with its true age (see `StoreMode::AddUnlessDeleted`).
    pub fn get_with_write_time(
        &self,
        key: &[u8],
        touch: Option<u32>,
        now: Now,
        read: impl FnOnce(ItemMeta, &[u8]),
    ) -> bool {
        self.read(key, touch, now, true, read)
    }

    fn read(
        &self,
        key: &[u8],
        touch: Option<u32>,
        now: Now,
        write_time: bool,
        read: impl FnOnce(ItemMeta, &[u8]),
    ) -> bool {
        let now_ms = now.ms;
        let now = now.secs;
        let (hash, _, mut shard) = self.locked(key, now);
        if touch.is_some() {
            shard.stats.cmd_touch += 1;
        }
        match Self::lookup(&mut shard, key, hash, now, &self.used) {
            Lookup::Live(id) => {
                // memcached counts gat/gats as touches only.
                if let Some(expiry) = touch {
                    shard.stats.touch_hits += 1;
                    shard.item_mut(id).set_expiry(expiry);
                } else {
                    shard.stats.get_hits += 1;
                }
                shard.on_hit(id);
                let item = shard.item(id);
                read(
                    ItemMeta {
                        flags: item.flags(),
                        cas: item.cas(),
                        expiry: item.expiry(),
                        written_ms: if write_time {
                            shard.written_at(hash, now_ms)
                        } else {
                            None
                        },
                    },
                    item.value(),
                );
                true
            }
            other => {
                if touch.is_some() {
                    shard.stats.touch_misses += 1;
                } else {
                    shard.stats.get_misses += 1;
                }
                if matches!(other, Lookup::Expired) {
                    shard.stats.get_expired += 1;
                }
                false
            }
        }
    }

    /// The storage commands. `value` is the whole data block (without its CRLF).
    pub fn store(
        &self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        flags: u32,
        expiry: u32,
        now: impl Into<Now>,
    ) -> StoreOutcome {
        self.store_cas(mode, key, value, flags, expiry, now).0
    }

    /// As `store`, also returning the stored item's CAS value (0 when nothing was stored).
    pub fn store_cas(
        &self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        flags: u32,
        expiry: u32,
        now: impl Into<Now>,
    ) -> (StoreOutcome, u64) {
        let now = now.into();
        loop {
            match self.try_store(mode, key, value, flags, expiry, now) {
                Attempt::Done(outcome, cas) => return (outcome, cas),
                // Our shard had nothing left to evict: free space in the others without
                // holding our lock, then decide again from scratch (nothing was changed).
                Attempt::NeedSpace(bytes) => {
                    self.evict_elsewhere(bytes, now.secs, Some(self.shard_of(key)))
                }
            }
        }
    }

    fn try_store(
        &self,
        mode: StoreMode,
        key: &[u8],
        value: &[u8],
        flags: u32,
        expiry: u32,
        now: Now,
    ) -> Attempt {
        let (hash, _, mut shard) = self.locked(key, now.secs);
        let existing = match Self::lookup(&mut shard, key, hash, now.secs, &self.used) {
            Lookup::Live(id) => Some(id),
            _ => None,
        };
        // Decide, and build the new value for append/prepend.
        let mut combined = None;
        if let StoreMode::AddUnlessDeleted { written_ms } = mode
            && existing.is_none()
            && let Some(deleted) = shard.deleted_at(hash, now.ms)
            && written_ms.is_none_or(|w| w <= deleted.saturating_add(CLOCK_SKEW_MS))
        {
            return self.refuse(&mut shard, StoreOutcome::NotStored);
        }
        let (flags, expiry) = match (mode, existing) {
            (StoreMode::Add | StoreMode::AddUnlessDeleted { .. }, Some(id)) => {
                // memcached bumps a refused add's item as if it had been read.
                shard.on_hit(id);
                return self.refuse(&mut shard, StoreOutcome::NotStored);
            }
            (StoreMode::Replace | StoreMode::Append | StoreMode::Prepend, None) => {
                return self.refuse(&mut shard, StoreOutcome::NotStored);
            }
            (StoreMode::Cas(_), None) => {
                shard.stats.cas_misses += 1;
                return self.refuse(&mut shard, StoreOutcome::NotFound);
            }
            (StoreMode::Cas(expected), Some(id)) if shard.item(id).cas() != expected => {
                shard.stats.cas_badval += 1;
                return self.refuse(&mut shard, StoreOutcome::Exists);
            }
            (StoreMode::Append | StoreMode::Prepend, Some(id))
                if shard.item(id).alloc_len() + value.len()
                    > self.max_item.load(Ordering::Relaxed) =>
            {
                // memcached refuses to grow an item past the item size limit.
                return self.refuse(&mut shard, StoreOutcome::NotStored);
            }
            (StoreMode::Append | StoreMode::Prepend, Some(id)) => {
                let item = shard.item(id);
                let old = item.value();
                let mut v = Vec::with_capacity(old.len() + value.len());
                if mode == StoreMode::Append {
                    v.extend_from_slice(old);
                    v.extend_from_slice(value);
                } else {
                    v.extend_from_slice(value);
                    v.extend_from_slice(old);
                }
                combined = Some(v);
                (item.flags(), item.expiry())
            }
            _ => (flags, expiry),
        };
        let value = combined.as_deref().unwrap_or(value);
        let cost = item_cost(key.len(), value.len());
        if cost > self.limit.load(Ordering::Relaxed) {
            shard.stats.cmd_set += 1;
            return Attempt::Done(StoreOutcome::TooLarge, 0);
        }
        let cas = match self.put(&mut shard, hash, existing, key, value, flags, expiry) {
            Ok(cas) => cas,
            Err(need) => return Attempt::NeedSpace(need),
        };
        shard.stats.cmd_set += 1;
        if let StoreMode::Cas(_) = mode {
            shard.stats.cas_hits += 1;
        }
        // A copy keeps the time of the write it carries (unknown for a copy without one);
        // anything else was written now.
        let written = match mode {
            StoreMode::AddUnlessDeleted { written_ms } => written_ms,
            _ => Some(shard.event_ms(now.ms)),
        };
        shard.record_write(hash, written, now.ms);
        // The newest event for the key here is now a write: a delete before it must not
        // refuse the key's copies later (it may move away and back within the tombstone's life).
        shard.forget_delete(hash);
        Attempt::Done(StoreOutcome::Stored, cas)
    }

    /// Stores an item in place of `existing` (if any), making room first. The item being
    /// replaced is kept out of eviction's reach meanwhile, so a replace never evicts its own
    /// target and fails for it, and only the growth (new cost minus old) is reserved. Nothing
    /// changes if room cannot be made in this shard: the caller gets the bytes still needed.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        shard: &mut Shard,
        hash: u64,
        existing: Option<u32>,
        key: &[u8],
        value: &[u8],
        flags: u32,
        expiry: u32,
    ) -> Result<u64, usize> {
        let cost = item_cost(key.len(), value.len());
        let old_cost = existing.map_or(0, |id| item_cost(key.len(), shard.item(id).value().len()));
        let growth = cost.saturating_sub(old_cost);
        if let Some(id) = existing {
            shard.detach(id);
        }
        if !self.make_room(shard, growth) {
            if let Some(id) = existing {
                shard.reattach(id);
            }
            return Err(growth);
        }
        if let Some(id) = existing {
            // Its bytes stay reserved: `growth` covered only the difference.
            shard.remove_detached(id, hash);
        }
        let id = shard.insert(hash, key, value, flags, expiry);
        if old_cost > cost {
            self.used.fetch_sub(old_cost - cost, Ordering::Relaxed);
        }
        Ok(shard.item(id).cas())
    }

    fn refuse(&self, shard: &mut Shard, outcome: StoreOutcome) -> Attempt {
        shard.stats.cmd_set += 1;
        Attempt::Done(outcome, 0)
    }

    /// Reserves `cost` bytes of the global budget, evicting from `shard`. Returns false if the
    /// shard has nothing left to evict and the budget is still short.
    fn make_room(&self, shard: &mut Shard, cost: usize) -> bool {
        loop {
            let used = self.used.load(Ordering::Relaxed);
            if used + cost <= self.limit.load(Ordering::Relaxed) {
                if self
                    .used
                    .compare_exchange_weak(used, used + cost, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            match shard.evict_one() {
                Some(freed) => {
                    self.used.fetch_sub(freed, Ordering::Relaxed);
                }
                None => return false,
            }
        }
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        self.shard_index(hash_key(key))
    }

    /// Evicts from the shards other than `skip` (one lock at a time) until `bytes` fit in the
    /// budget. Skipping the caller's shard keeps the item it is about to replace.
    fn evict_elsewhere(&self, bytes: usize, now: u32, skip: Option<usize>) {
        let n = self.shards.len();
        let mut idle_rounds = 0;
        let mut i = 0;
        while self.used.load(Ordering::Relaxed) + bytes > self.limit.load(Ordering::Relaxed) {
            if Some(i % n) == skip {
                i += 1;
                idle_rounds += 1;
                continue;
            }
            let mut shard = self.lock(i % n);
            self.check_flush(&mut shard, now);
            match shard.evict_one() {
                Some(freed) => {
                    self.used.fetch_sub(freed, Ordering::Relaxed);
                    idle_rounds = 0;
                }
                None => idle_rounds += 1,
            }
            drop(shard);
            i += 1;
            // Every shard empty: the item fits (checked against the limit by the caller), so
            // another thread holds the space only transiently; let it finish.
            if idle_rounds >= n {
                std::thread::yield_now();
                idle_rounds = 0;
            }
        }
    }

    pub fn delete(&self, key: &[u8], now: impl Into<Now>) -> bool {
        let now = now.into();
        let (hash, _, mut shard) = self.locked(key, now.secs);
        // Found or not: a delete of a key not yet copied here must still stop the copy.
        let at = shard.event_ms(now.ms);
        shard.record_delete(hash, at);
        match Self::lookup(&mut shard, key, hash, now.secs, &self.used) {
            Lookup::Live(id) => {
                let freed = shard.remove(id, hash);
                self.used.fetch_sub(freed, Ordering::Relaxed);
                shard.stats.delete_hits += 1;
                true
            }
            _ => {
                shard.stats.delete_misses += 1;
                false
            }
        }
    }

    /// `incr`/`decr`: 64-bit unsigned; incr wraps, decr stops at zero (memcached's rules).
    pub fn arith(&self, key: &[u8], incr: bool, delta: u64, now: impl Into<Now>) -> ArithOutcome {
        let now = now.into();
        loop {
            match self.try_arith(key, incr, delta, now) {
                Ok(outcome) => return outcome,
                Err(bytes) => self.evict_elsewhere(bytes, now.secs, Some(self.shard_of(key))),
            }
        }
    }

    fn try_arith(
        &self,
        key: &[u8],
        incr: bool,
        delta: u64,
        now: Now,
    ) -> Result<ArithOutcome, usize> {
        let (hash, _, mut shard) = self.locked(key, now.secs);
        let id = match Self::lookup(&mut shard, key, hash, now.secs, &self.used) {
            Lookup::Live(id) => id,
            _ => {
                if incr {
                    shard.stats.incr_misses += 1;
                } else {
                    shard.stats.decr_misses += 1;
                }
                return Ok(ArithOutcome::NotFound);
            }
        };
        let Some(current) = parse_counter(shard.item(id).value()) else {
            return Ok(ArithOutcome::NonNumeric);
        };
        let new = if incr {
            current.wrapping_add(delta)
        } else {
            current.saturating_sub(delta)
        };
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(new).as_bytes();
        let (flags, expiry) = (shard.item(id).flags(), shard.item(id).expiry());
        self.put(&mut shard, hash, Some(id), key, digits, flags, expiry)?;
        let written = shard.event_ms(now.ms);
        shard.record_write(hash, Some(written), now.ms);
        if incr {
            shard.stats.incr_hits += 1;
        } else {
            shard.stats.decr_hits += 1;
        }
        Ok(ArithOutcome::Value(new))
    }

    pub fn touch(&self, key: &[u8], expiry: u32, now: u32) -> bool {
        let (hash, _, mut shard) = self.locked(key, now);
        shard.stats.cmd_touch += 1;
        match Self::lookup(&mut shard, key, hash, now, &self.used) {
            Lookup::Live(id) => {
                shard.stats.touch_hits += 1;
                shard.item_mut(id).set_expiry(expiry);
                shard.on_hit(id);
                true
            }
            _ => {
                shard.stats.touch_misses += 1;
                false
            }
        }
    }

    /// `flush_all`: with `deadline` 0 or in the past, drops everything now; otherwise every
    /// item stored before `deadline` becomes invalid at `deadline`. A later call replaces an
    /// earlier pending one, as in memcached.
    pub fn flush_all(&self, deadline: u32, now: u32) {
        for i in 0..self.shards.len() {
            let mut shard = self.lock(i);
            if deadline == 0 || deadline <= now {
                shard.flush_deadline = 0;
                let freed = shard.clear();
                self.used.fetch_sub(freed, Ordering::Relaxed);
            } else {
                shard.flush_deadline = deadline;
            }
        }
    }

    /// Changes the capacity live, evicting down to it.
    pub fn set_limit(&self, limit_bytes: usize, now: u32) {
        self.limit.store(limit_bytes, Ordering::Relaxed);
        let share = limit_bytes / self.shards.len();
        for i in 0..self.shards.len() {
            self.lock(i).share = share;
        }
        self.evict_elsewhere(0, now, None);
    }

    /// Switches the replacement policy live, keeping every item.
    pub fn set_policy(&self, policy: Policy) {
        let mut current = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.shards.len() {
            self.lock(i).set_policy(policy);
        }
        *current = policy;
    }

    pub fn policy(&self) -> Policy {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Removes expired items, a bounded batch per shard; call periodically. `cursors` holds
    /// one scan position per shard between calls.
    pub fn reap_expired(&self, cursors: &mut Vec<usize>, batch: usize, now: u32) -> usize {
        cursors.resize(self.shards.len(), 0);
        let mut total = 0;
        for (i, cursor) in cursors.iter_mut().enumerate() {
            let mut shard = self.lock(i);
            self.check_flush(&mut shard, now);
            let (next, freed) = shard.reap_expired(*cursor, batch, now);
            self.used.fetch_sub(freed, Ordering::Relaxed);
            *cursor = next;
            total += freed;
        }
        total
    }

    /// Sets the largest item size (header, key and value) an append or prepend may reach.
    pub fn set_max_item_size(&self, bytes: usize) {
        self.max_item.store(bytes, Ordering::Relaxed);
    }

    /// What each size class holds (`stats items`, `stats slabs`), classes without memory left
    /// out; see `classes` for the mapping. Walks every item, one shard locked at a time.
    pub fn size_classes(&self, now: u32) -> std::collections::BTreeMap<u32, classes::ClassUsage> {
        let mut out = std::collections::BTreeMap::new();
        for i in 0..self.shards.len() {
            classes::add_shard(&self.lock(i), now, &mut out);
        }
        out
    }

    /// Live items by size (`stats sizes`): bucket (item size rounded up to 32) to count.
    pub fn size_histogram(&self, now: u32) -> std::collections::BTreeMap<u64, u64> {
        let mut out = std::collections::BTreeMap::new();
        self.for_each(|item| {
            if !item.is_expired(now) {
                *out.entry(classes::size_bucket(item.alloc_len()))
                    .or_insert(0) += 1;
            }
        });
        out
    }

    /// Up to `limit` live items of size class `class` (0: no limit), as (key, value length,
    /// absolute expiry), stopping once the keys reach `max_bytes` (`stats cachedump`).
    pub fn cachedump(
        &self,
        class: u32,
        limit: usize,
        max_bytes: usize,
        now: u32,
    ) -> Vec<(Vec<u8>, usize, u32)> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        let mut bytes = 0;
        for i in 0..self.shards.len() {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            self.lock(i).for_each(|item| {
                if out.len() < limit
                    && bytes < max_bytes
                    && !item.is_expired(now)
                    && classes::class_of(item.alloc_len()) == class
                {
                    bytes += item.key().len() + 32;
                    out.push((item.key().to_vec(), item.value().len(), item.expiry()));
                }
            });
        }
        out
    }

    /// Resets the counters (`stats reset`).
    pub fn reset_stats(&self) {
        for i in 0..self.shards.len() {
            self.lock(i).stats = ShardStats::default();
        }
    }

    pub fn stats(&self) -> StoreStats {
        let mut out = StoreStats {
            limit_maxbytes: self.limit() as u64,
            policy: Some(self.policy()),
            ..Default::default()
        };
        for i in 0..self.shards.len() {
            let shard = self.lock(i);
            out.counters.add(&shard.stats);
            out.curr_items += shard.len() as u64;
            out.bytes += shard.bytes as u64;
        }
        out
    }

    /// Copies out the next batch of live items whose key `select` picks (about `max_bytes`
    /// of values; one shard locked at a time, briefly). Call until the cursor is done.
    pub fn scan(
        &self,
        cursor: &mut ScanCursor,
        max_bytes: usize,
        now: u32,
        mut select: impl FnMut(&[u8]) -> bool,
    ) -> Vec<OwnedItem> {
        let mut out = Vec::new();
        let mut budget = max_bytes;
        while !cursor.done && budget > 0 {
            let shard = self.lock(cursor.shard);
            let before: usize = out
                .iter()
                .map(|i: &OwnedItem| i.key.len() + i.value.len())
                .sum();
            let next = shard.scan(cursor.slot, budget, now, &mut select, &mut out);
            drop(shard);
            let after: usize = out.iter().map(|i| i.key.len() + i.value.len()).sum();
            budget = budget.saturating_sub(after - before);
            if next == 0 {
                cursor.shard += 1;
                cursor.slot = 0;
                cursor.done = cursor.shard >= self.shards.len();
            } else {
                cursor.slot = next;
            }
        }
        out
    }

    /// `md`: deletes `key`, if `cas` is given only when the item's CAS value equals it. An
    /// unconditional delete leaves a tombstone unless `tombstone` is false (a key that moved
    /// to another node, not a deleted one).
    pub fn delete_cas(
        &self,
        key: &[u8],
        cas: Option<u64>,
        tombstone: bool,
        now: impl Into<Now>,
    ) -> DeleteOutcome {
        let now = now.into();
        let (hash, _, mut shard) = self.locked(key, now.secs);
        if cas.is_none() && tombstone {
            let at = shard.event_ms(now.ms);
            shard.record_delete(hash, at);
        }
        match Self::lookup(&mut shard, key, hash, now.secs, &self.used) {
            Lookup::Live(id) if cas.is_none_or(|c| shard.item(id).cas() == c) => {
                let freed = shard.remove(id, hash);
                self.used.fetch_sub(freed, Ordering::Relaxed);
                shard.stats.delete_hits += 1;
                DeleteOutcome::Deleted
            }
            Lookup::Live(_) => DeleteOutcome::Exists,
            _ => {
                shard.stats.delete_misses += 1;
                DeleteOutcome::NotFound
            }
        }
    }

    /// Deletes `key` only if its CAS value is still `cas` (the hand-off drops what it copied,
    /// never a newer write). Returns whether it was deleted.
    pub fn delete_if_cas(&self, key: &[u8], cas: u64, now: u32) -> bool {
        let (hash, _, mut shard) = self.locked(key, now);
        match shard.find(key, hash) {
            Some(id) if shard.item(id).cas() == cas => {
                let freed = shard.remove(id, hash);
                self.used.fetch_sub(freed, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Visits every item, shard by shard (each shard locked while visited).
    pub fn for_each(&self, mut f: impl FnMut(&Item)) {
        for i in 0..self.shards.len() {
            self.lock(i).for_each(&mut f);
        }
    }

    /// Checks every shard's internal consistency and the global byte count.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut bytes = 0;
        for i in 0..self.shards.len() {
            let shard = self.lock(i);
            shard
                .check_invariants()
                .map_err(|e| format!("shard {i}: {e}"))?;
            bytes += shard.bytes;
        }
        let used = self.used();
        if bytes != used {
            return Err(format!("shards hold {bytes} bytes, budget says {used}"));
        }
        if used > self.limit() {
            return Err(format!("{used} bytes used over the {} limit", self.limit()));
        }
        Ok(())
    }
}

enum Lookup {
    Missing,
    Expired,
    Live(u32),
}

enum Attempt {
    Done(StoreOutcome, u64),
    NeedSpace(usize),
}

/// Parses a counter value as memcached does: decimal digits, optionally followed by spaces
/// (memcached pads in place after a `decr`), at most a u64.
fn parse_counter(value: &[u8]) -> Option<u64> {
    let end = value.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    let digits = &value[..end];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
