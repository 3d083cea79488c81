//! A small in-process cache of hot images in front of the pool, bounded in bytes, whose
//! entries are trusted only for a lease.
//!
//! A hit here skips the pool's loopback or network round trip and hands the response the
//! same `Bytes` (no copy). What keeps it honest across web servers is the lease, not a
//! message: an entry is served only until `leased_from + lease`, where `leased_from` was
//! taken before the pool read (or the fill) that produced it, and every write waits `lease`
//! after invalidating the pool before it is acknowledged ([`super::ImageCache::invalidate`]).
//! Whatever another server read before the invalidation has expired by then (the module
//! documentation of [`super`] states the argument). `Instant` is the monotonic clock, so
//! wall-clock steps do not stretch a lease.
//!
//! Recency order and the byte budget come from the `lru` crate (already built for the S3
//! client); the lock is held for a map operation and a clone of three reference-counted or
//! short fields, never across an await.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{CachedImage, lock};

/// Bytes an entry is charged on top of its body, content type, ETag and key: the map's
/// node, the key's and strings' headers, the `Bytes` header.
const ENTRY_OVERHEAD: usize = 160;

/// Counters and sizes of a [`LocalCache`]; a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalStats {
    /// Lookups it served.
    pub hits: u64,
    /// Lookups it did not: absent, or its lease ran out (counted in `expired` too).
    pub misses: u64,
    /// Lookups that found an entry whose lease had run out.
    pub expired: u64,
    /// Entries pushed out to keep within the byte budget.
    pub evictions: u64,
    /// Bytes charged for the entries held now (bodies plus overhead).
    pub bytes: u64,
    /// Entries held now, expired ones included until they are looked up or pushed out.
    pub entries: u64,
    /// The byte budget.
    pub capacity_bytes: u64,
}

struct Entry {
    image: CachedImage,
    /// When the lease runs out: this entry is not served from then on.
    expires: Instant,
    /// Bytes charged against the budget.
    weight: usize,
}

struct Held {
    lru: LruCache<String, Entry>,
    bytes: usize,
}

/// The cache; see the module documentation.
pub(crate) struct LocalCache {
    budget: usize,
    /// The largest entry admitted: an eighth of the budget, so that one large image cannot
    /// push out everything else.
    max_entry: usize,
    lease: Duration,
    held: Mutex<Held>,
    hits: AtomicU64,
    misses: AtomicU64,
    expired: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("budget", &self.budget)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl LocalCache {
    /// A cache of at most `budget` bytes whose entries live `lease`.
    pub(crate) fn new(budget: usize, lease: Duration) -> LocalCache {
        LocalCache {
            budget,
            max_entry: budget / 8,
            lease,
            held: Mutex::new(Held {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The image under `key` if its lease has not run out at `now`.
    pub(crate) fn get(&self, key: &str, now: Instant) -> Option<CachedImage> {
        let mut held = lock(&self.held);
        let found = match held.lru.get(key) {
            Some(entry) if now < entry.expires => Some(entry.image.clone()),
            Some(_) => {
                if let Some(entry) = held.lru.pop(key) {
                    held.bytes -= entry.weight;
                }
                self.expired.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => None,
        };
        drop(held);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `image` under `key` until `leased_from + lease`, where `leased_from` was taken
    /// before the read that produced the image began. Nothing is kept if that time has
    /// passed, if the image is larger than an eighth of the budget, or if the entry held
    /// now lives longer (both are good until their own expiry; the later one is kept).
    pub(crate) fn insert(&self, key: &str, image: &CachedImage, leased_from: Instant) {
        let expires = leased_from + self.lease;
        let weight = image.body.len()
            + image.content_type.len()
            + image.etag.len()
            + key.len()
            + ENTRY_OVERHEAD;
        if weight > self.max_entry || Instant::now() >= expires {
            return;
        }
        let mut held = lock(&self.held);
        if held.lru.peek(key).is_some_and(|e| e.expires >= expires) {
            return;
        }
        let entry = Entry {
            image: image.clone(),
            expires,
            weight,
        };
        if let Some((_, old)) = held.lru.push(key.to_owned(), entry) {
            held.bytes -= old.weight;
        }
        held.bytes += weight;
        let mut evicted = 0;
        while held.bytes > self.budget {
            let Some((_, out)) = held.lru.pop_lru() else {
                break;
            };
            held.bytes -= out.weight;
            evicted += 1;
        }
        drop(held);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: &str) {
        let mut held = lock(&self.held);
        if let Some(entry) = held.lru.pop(key) {
            held.bytes -= entry.weight;
        }
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        let mut held = lock(&self.held);
        held.lru.clear();
        held.bytes = 0;
    }

    /// A snapshot of the counters and sizes.
    pub(crate) fn stats(&self) -> LocalStats {
        let (bytes, entries) = {
            let held = lock(&self.held);
            (held.bytes, held.lru.len())
        };
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LocalStats {
            hits: get(&self.hits),
            misses: get(&self.misses),
            expired: get(&self.expired),
            evictions: get(&self.evictions),
            bytes: bytes as u64,
            entries: entries as u64,
            capacity_bytes: self.budget as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn image(len: usize, fill: u8) -> CachedImage {
        CachedImage {
            content_type: "image/png".into(),
            etag: "\"e\"".into(),
            body: Bytes::from(vec![fill; len]),
        }
    }

    fn weight(key: &str, len: usize) -> usize {
        len + "image/png".len() + "\"e\"".len() + key.len() + ENTRY_OVERHEAD
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_hit_shares_the_bytes_it_was_given() {
        let cache = LocalCache::new(1 << 20, LONG);
        let img = image(1000, 7);
        cache.insert("a", &img, Instant::now());
        let got = cache.get("a", Instant::now()).unwrap();
        assert_eq!(got, img);
        assert_eq!(
            got.body.as_ptr(),
            img.body.as_ptr(),
            "a copy, not the same bytes"
        );
        assert!(cache.get("b", Instant::now()).is_none());
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
        assert_eq!(s.bytes, weight("a", 1000) as u64);
    }

    #[test]
    fn an_entry_is_not_served_once_its_lease_ran_out() {
        let lease = Duration::from_millis(200);
        let cache = LocalCache::new(1 << 20, lease);
        let from = Instant::now();
        cache.insert("a", &image(10, 1), from);
        assert!(
            cache
                .get("a", from + lease - Duration::from_millis(1))
                .is_some()
        );
        assert!(cache.get("a", from + lease).is_none());
        let s = cache.stats();
        assert_eq!((s.expired, s.entries, s.bytes), (1, 0, 0));
    }

    #[test]
    fn the_lease_counts_from_before_the_read_not_from_the_insert() {
        let lease = Duration::from_millis(50);
        let cache = LocalCache::new(1 << 20, lease);
        // A read that began longer ago than the lease: nothing to keep.
        let long_ago = Instant::now() - lease;
        cache.insert("a", &image(10, 1), long_ago);
        assert_eq!(cache.stats().entries, 0);
        assert!(cache.get("a", Instant::now()).is_none());
    }

    #[test]
    fn the_byte_budget_holds_and_the_least_recently_used_go_first() {
        let w = weight("k0", 1000);
        let cache = LocalCache::new(8 * w, LONG);
        let now = Instant::now();
        for i in 0..8 {
            cache.insert(&format!("k{i}"), &image(1000, i as u8), now);
        }
        assert_eq!(cache.stats().entries, 8);
        assert_eq!(cache.stats().evictions, 0);
        // k0 used recently: k1 is the least recently used and goes first.
        assert!(cache.get("k0", now).is_some());
        cache.insert("k8", &image(1000, 8), now);
        cache.insert("k9", &image(1000, 9), now);
        let s = cache.stats();
        assert!(s.bytes <= s.capacity_bytes, "{s:?}");
        assert_eq!((s.entries, s.evictions), (8, 2));
        assert!(cache.get("k0", now).is_some());
        assert!(cache.get("k1", now).is_none());
        assert!(cache.get("k2", now).is_none());
        assert!(cache.get("k9", now).is_some());
    }

    #[test]
    fn an_image_larger_than_an_eighth_of_the_budget_is_not_kept() {
        let cache = LocalCache::new(8000, LONG);
        cache.insert("big", &image(1001, 1), Instant::now());
        assert_eq!(cache.stats().entries, 0);
        cache.insert("small", &image(500, 1), Instant::now());
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn the_entry_with_the_later_lease_is_kept() {
        let cache = LocalCache::new(1 << 20, LONG);
        let early = Instant::now();
        let late = early + Duration::from_millis(5);
        cache.insert("a", &image(10, 2), late);
        cache.insert("a", &image(10, 1), early);
        assert_eq!(cache.get("a", late).unwrap().body[0], 2);
        cache.insert("a", &image(20, 3), late + Duration::from_millis(1));
        assert_eq!(cache.get("a", late).unwrap().body[0], 3);
        assert_eq!(cache.stats().bytes, weight("a", 20) as u64);
    }

    #[test]
    fn remove_and_clear_forget_and_release_the_bytes() {
        let cache = LocalCache::new(1 << 20, LONG);
        let now = Instant::now();
        cache.insert("a", &image(10, 1), now);
        cache.insert("b", &image(10, 1), now);
        cache.remove("a");
        assert!(cache.get("a", now).is_none());
        assert_eq!(cache.stats().bytes, weight("b", 10) as u64);
        cache.clear();
        assert!(cache.get("b", now).is_none());
        assert_eq!((cache.stats().bytes, cache.stats().entries), (0, 0));
    }
}
