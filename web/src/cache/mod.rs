//! Cache-aside reads of images through the pool, one fill per key at a time, and
//! invalidation that a re-upload can rely on.
//!
//! [`ImageCache::get_or_fill`] reads the pool; on a miss it runs the caller's `fill` (the
//! database and the object store), stores what it found, and returns it. The pool is an
//! accelerator, never a dependency: when it fails, reads become misses and stores are
//! skipped, the site keeps serving from the store, and the failures are counted
//! ([`CacheStats`]).
//!
//! # One fill per key
//!
//! Concurrent misses on one key share one fill (single flight): the first caller leads and
//! runs its `fill`; callers arriving while it runs wait for its result, success or error,
//! instead of running theirs. An error is handed to every waiter and never cached, so the
//! next request tries again. The flights live in a map under a short-held mutex (no lock is
//! held across an await); the leader publishes its result through a `watch` channel, which
//! a caller joining late still reads. If the leader goes away without a result — its request
//! was cancelled, or `fill` panicked — its guard leaves an unclaimed successor flight in its
//! place before the channel closes: the first waiter to wake claims it and runs its own
//! `fill`, the others wait for that one. Nobody waits on a leader that is gone, and the
//! waiters still share one fill. A fill running longer than `store_deadline` is not joined
//! (rule 3 below): under a very slow store, a hot key sees one new fill per deadline.
//!
//! # Invalidation: nobody sees the old image after the upload returned
//!
//! A writer commits the new image to the store, then calls [`ImageCache::invalidate`], then
//! acknowledges the upload. The race to beat is a reader whose fill read the *old* image
//! before the commit and stores it after the invalidation: a plain delete would let that
//! stale value back in, to be served until it expired. Three mechanisms close it:
//!
//! 1. **A tombstone in the pool.** `invalidate` does not delete the entry: it overwrites it
//!    with a tombstone (a tiny [`envelope`] with an id unique to this invalidation, which
//!    reads as a miss) living `tombstone_ttl_secs`, and fills store with `add`, which the
//!    node refuses while any entry — the tombstone included — holds the key. A fill that
//!    read the old image started before the commit, hence before the tombstone; fills
//!    store only if they send their `add` within `store_deadline` of starting (a slower
//!    fill is served but not stored), and the tombstone outlives that deadline by a margin
//!    for the `add`'s flight time and the node's one-second expiry granularity. So the
//!    stale `add` arrives while the tombstone lives and is refused. This holds across web
//!    servers sharing the pool, which an in-process generation counter would not. (A fill
//!    whose leader found a tombstone does not even offer its result: the `add` would
//!    carry the whole image only to be refused.)
//! 2. **Detaching in-process flights.** `invalidate` removes the key's running flight from
//!    the map and marks it stale: callers arriving afterwards start a new fill (which reads
//!    the new image) instead of receiving the old one, and the stale leader does not even
//!    try to store. This also protects the process's own readers when the tombstone could
//!    not be written.
//! 3. **Joining only fills that cannot predate what the caller saw.** Another web server's
//!    invalidation cannot detach this server's flights, so a reader here could join a fill
//!    that read the old image before that invalidation. Hence a caller that missed joins a
//!    running fill only if its leader found the same thing in the pool (the same tombstone,
//!    by its id, or none) and it is younger than `store_deadline`; otherwise the caller
//!    starts its own fill, and the older one will not store. A caller that found tombstone
//!    T came after invalidation T, and so did any fill whose leader also found T. A caller
//!    that found no tombstone after an invalidation returned came after that tombstone
//!    expired, so longer after the commit than `store_deadline`: no fill it may join is old
//!    enough to have read the old image.
//!
//! The price is that a key is not cached for `tombstone_ttl_secs` (8 s by default) after an
//! invalidation: those reads fill from the store, one fill per web server at a time. For
//! images, re-uploaded rarely and read often, that is cheap.
//!
//! What remains, stated plainly:
//! - The argument assumes an `add` reaches the node within the margin (2 s by default)
//!   after it is sent. The pool client's request timeout (1 s by default) bounds how long
//!   the client waits, not when a node that stalled processes a request it already read.
//! - A tombstone can vanish early if its node is replaced or flushed, or evicts it under
//!   memory pressure (unlikely: it is the most recently written entry); a stale `add`
//!   landing then is served until the entry's `ttl_secs`.
//! - [`ImageCache::invalidate_all`] (delete all data, clear the cache) flushes the pool and
//!   detaches every local flight, but leaves no tombstones: a fill running in another web
//!   server at that moment can put back one image it read before. Callers that need that
//!   case exact invalidate each key.
//! - A failed invalidation is an error, not a shrug: the old image may be served from the
//!   pool until it expires, and the caller decides what to tell the uploader.
//!
//! # The in-process cache: a lease, so replicas need not hear of writes
//!
//! With `local_bytes` above 0, a bounded in-process cache ([`local`]) sits in front of the
//! pool: a hot image is served from this process's memory (`X-Cache: local`), the same
//! `Bytes` every time, without the pool's round trip. Another web server's write cannot
//! reach that memory, so each entry carries a lease instead: it is served only until
//! `leased_from + lease`, where `leased_from` is read from the monotonic clock *before* the
//! pool read (or, for a fill's leader, before the pool read that missed) that produced it;
//! and every [`ImageCache::invalidate`] and [`ImageCache::invalidate_all`] waits the lease
//! (plus 1 % and 1 ms) after the pool acknowledged the tombstone or the flush, before it
//! returns. The argument: a copy of the old image was read from the pool before the node
//! applied the tombstone, or from the store before the commit, which came before the
//! tombstone; either way its `leased_from` precedes the invalidation, so the copy expired
//! before the invalidation returned, and so before the write was acknowledged. This needs
//! no message between web servers and holds for any number of them, provided that:
//! - every web server sharing the pool is given the same lease (or a writer a longer one),
//!   also one whose own in-process cache is off: the writer's wait is what expires the
//!   readers' copies;
//! - the monotonic clocks of the web servers' hosts run at the same rate to within 1 %
//!   (NTP keeps them within 0.05 %); no agreement on the time of day is needed.
//!
//! The staleness bound: a read that *begins* after a write was acknowledged never returns
//! the old bytes (under the pool's own assumptions above); while the write is in progress,
//! from its commit until its acknowledgement (at least the lease), another web server may
//! still serve the old bytes from memory. The price is that a re-upload or delete-all takes
//! the lease longer to answer (200 ms by default), and a hot image costs one pool read per
//! lease per web server. Within the process, an invalidation also drops the key (or
//! everything) at once, and a fill detached by an invalidation does not enter the cache.
//!
//! # Thumbnails
//!
//! An image's thumbnail is cached exactly as the image is, under its own entries: the pool key
//! and the in-process key put [`THUMBNAIL_MARKER`] (`thumb/`) before the image key, a
//! character no image key has, so no image's entry is ever a thumbnail's
//! ([`ImageCache::get_or_fill_thumbnail`]). [`ImageCache::invalidate`] treats both entries
//! alike (a tombstone on each, with the same id, local copies dropped, flights detached) and
//! then waits the lease once; [`ImageCache::invalidate_all`] flushes both. So everything above
//! holds for thumbnails word for word: no replica serves an old thumbnail once a re-upload or
//! a delete-all was acknowledged.
//!
//! During a pool migration the same holds: the pool client's `set` (the tombstone) deletes
//! the key on the previous owner first, and its `add` (a fill) pulls the previous owner's
//! copy forward before adding, so the tombstone on the current owner is what both meet.

pub mod envelope;
mod local;

use std::collections::HashMap;
use std::error::Error;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_node::client::{ClientError, PoolClient};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::image::{ImageKey, MAX_IMAGE_BYTES, MAX_KEY_LEN};
use crate::latency::{Part, StoreMetrics};
use envelope::Envelope;
use local::LocalCache;
pub use local::LocalStats;

/// A node's item size limit under the CachePool defaults (`cache.maxItemSizeKiB` = 16384).
pub const DEFAULT_NODE_ITEM_BYTES: usize = 16384 << 10;

const _: () = assert!(
    MAX_IMAGE_BYTES + envelope::MAX_OVERHEAD <= DEFAULT_NODE_ITEM_BYTES,
    "the largest image in its envelope must fit a node's default item size limit"
);

/// Put between the prefix and the image key to name the image's thumbnail, in the pool and
/// in the in-process cache. An image key has no `/` (`crate::image::key`), so no image key
/// names a thumbnail's entry, whatever the prefix.
pub const THUMBNAIL_MARKER: &str = "thumb/";

/// Memcached keys are at most 250 bytes; image keys take up to `MAX_KEY_LEN` of them, and a
/// thumbnail's entry [`THUMBNAIL_MARKER`] more.
const MAX_PREFIX_LEN: usize = 250 - MAX_KEY_LEN - THUMBNAIL_MARKER.len();

/// Seconds a tombstone must outlive the store deadline: one for the node's whole-second
/// expiry, two for an `add` in flight (see the module documentation).
const TOMBSTONE_MARGIN_SECS: u32 = 3;

/// Longest exptime memcached reads as relative seconds (30 days).
const MAX_RELATIVE_SECS: u32 = 30 * 24 * 60 * 60;

/// The site's default budget of the in-process cache (`--local-cache-mib`).
pub const DEFAULT_LOCAL_BYTES: usize = 64 << 20;

/// The site's default lease of an in-process entry (`--local-cache-lease-ms`).
pub const DEFAULT_LEASE: Duration = Duration::from_millis(200);

/// The longest lease: every re-upload and delete-all waits this long before answering.
pub const MAX_LEASE: Duration = Duration::from_secs(10);

/// An image as the site serves it: bytes and the headers that go with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    /// `Content-Type` (e.g. `image/png`).
    pub content_type: String,
    /// `ETag`, quoted (e.g. `"9f1c2a0b4d5e6f70-1a2b"`).
    pub etag: String,
    /// The image's bytes.
    pub body: Bytes,
}

/// Which of an image's entries a read or an invalidation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The image's own bytes.
    Image,
    /// Its thumbnail.
    Thumbnail,
}

/// What [`ImageCache::get_or_fill`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The image.
    pub image: CachedImage,
    /// True if a cache served it, this process's or the pool; false if a fill did, this
    /// caller's or the one it waited for.
    pub hit: bool,
    /// True if this process's in-process cache served it (`X-Cache: local`); `hit` is then
    /// true too. False for a pool hit (`X-Cache: hit`) and a fill (`X-Cache: miss`).
    pub local: bool,
}

/// Settings of an [`ImageCache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Put before every image key to make its pool key, so that other users of the pool
    /// cannot collide with images: 1 to 44 printable ASCII characters without spaces.
    pub prefix: String,
    /// Lifetime of a cached image, in seconds (1 to 30 days). Bounds how long an entry the
    /// invalidation could not reach (see the module documentation) can be served.
    pub ttl_secs: u32,
    /// A fill that took longer than this is served but not stored: its result may predate
    /// an invalidation whose tombstone has expired.
    pub store_deadline: Duration,
    /// Lifetime of the tombstone `invalidate` leaves, in seconds. At least the store
    /// deadline (rounded up) plus 3.
    pub tombstone_ttl_secs: u32,
    /// Byte budget of the in-process cache of hot images in front of the pool; 0 turns it
    /// off (every read asks the pool).
    pub local_bytes: usize,
    /// How long an in-process entry is served after the read that produced it began; every
    /// invalidation waits this long before returning (see the module documentation). Give
    /// every web server sharing the pool the same lease, also those whose in-process cache
    /// is off: the writer's wait is what expires the readers' copies. At most
    /// [`MAX_LEASE`]; zero only with the in-process cache off everywhere.
    pub lease: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            prefix: "img:".into(),
            ttl_secs: 60 * 60,
            store_deadline: Duration::from_secs(5),
            tombstone_ttl_secs: 5 + TOMBSTONE_MARGIN_SECS,
            local_bytes: 0,
            lease: Duration::ZERO,
        }
    }
}

impl CacheConfig {
    /// Checks the settings (see each field).
    pub fn validate(&self) -> Result<(), CacheError> {
        let bad = |message: String| Err(CacheError::Config(message));
        let prefix_ok = self.prefix.bytes().all(|b| b.is_ascii_graphic());
        if self.prefix.is_empty() || self.prefix.len() > MAX_PREFIX_LEN || !prefix_ok {
            return bad(format!(
                "prefix {:?} must be 1 to {MAX_PREFIX_LEN} printable ASCII characters without \
                 spaces",
                self.prefix
            ));
        }
        if !(1..=MAX_RELATIVE_SECS).contains(&self.ttl_secs) {
            return bad(format!(
                "ttl_secs must be between 1 and {MAX_RELATIVE_SECS} (30 days), got {}",
                self.ttl_secs
            ));
        }
        if self.store_deadline.is_zero() {
            return bad("store_deadline must be greater than zero".into());
        }
        let deadline_secs =
            self.store_deadline.as_secs() + u64::from(self.store_deadline.subsec_nanos() > 0);
        let least = deadline_secs.saturating_add(u64::from(TOMBSTONE_MARGIN_SECS));
        if u64::from(self.tombstone_ttl_secs) < least || self.tombstone_ttl_secs > MAX_RELATIVE_SECS
        {
            return bad(format!(
                "tombstone_ttl_secs must be at least the store deadline ({:?}, rounded up) plus \
                 {TOMBSTONE_MARGIN_SECS}, so at least {least}, and at most {MAX_RELATIVE_SECS}; \
                 got {}",
                self.store_deadline, self.tombstone_ttl_secs
            ));
        }
        if self.lease > MAX_LEASE {
            return bad(format!(
                "the in-process cache's lease must be at most {MAX_LEASE:?} (every re-upload \
                 waits that long), got {:?}",
                self.lease
            ));
        }
        if self.local_bytes > 0 && self.lease.is_zero() {
            return bad(
                "the in-process cache needs a lease greater than zero (or a budget of 0 to \
                 turn it off)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Errors of the cache itself. Fill errors are [`FillError`]; pool failures on the read
/// path are not errors (they are misses, counted).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The configuration cannot work.
    #[error("invalid cache configuration: {0}")]
    Config(String),
    /// The tombstone could not be written.
    #[error(
        "the cache could not be invalidated for image {key:?} ({source}); the previous image \
         may be served from the cache for up to {ttl_secs} s"
    )]
    Invalidate {
        /// The image key.
        key: String,
        /// The pool's error.
        source: ClientError,
        /// How long the old entry may live.
        ttl_secs: u32,
    },
    /// The pool could not be flushed.
    #[error("the cache could not be cleared ({0}); cached images may be served until they expire")]
    Flush(ClientError),
}

/// The error a fill returned, shared by the leader and every waiter (hence the `Arc`).
/// [`FillError::downcast_ref`] recovers the fill's own error type, to choose a status.
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct FillError(Arc<dyn Error + Send + Sync + 'static>);

impl FillError {
    /// The fill's error as `T`, if it is one.
    pub fn downcast_ref<T: Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

/// Counters since the cache was made; a snapshot of [`ImageCache::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups the pool served.
    pub hits: u64,
    /// Lookups it did not (absent, tombstone, unreadable entry or pool failure).
    pub misses: u64,
    /// Fills run (one per flight).
    pub fills: u64,
    /// Callers served by another caller's fill instead of running their own.
    pub collapsed: u64,
    /// Fills that returned an error (counted once, however many waited).
    pub fill_errors: u64,
    /// Fill results stored in the pool.
    pub stored: u64,
    /// Stores the pool refused because the key was held (a tombstone or a newer entry).
    pub refused: u64,
    /// Fill results not offered to the pool: invalidated meanwhile, begun on a tombstone,
    /// slower than the store deadline, or not encodable.
    pub discarded: u64,
    /// Pool entries under an image key that were not a readable envelope.
    pub corrupt: u64,
    /// Pool requests that failed (stores, invalidations, flushes). Read failures do not
    /// show here: the pool client reports them as misses.
    pub pool_errors: u64,
    /// Invalidations asked for (one key or all).
    pub invalidations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    collapsed: AtomicU64,
    fill_errors: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
    discarded: AtomicU64,
    corrupt: AtomicU64,
    pool_errors: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What a flight ends with: the image, `None` if the store has no such key, or the error.
type Outcome = Result<Option<CachedImage>, FillError>;

type Sender = watch::Sender<Option<Outcome>>;
type Receiver = watch::Receiver<Option<Outcome>>;

/// What a caller that missed found in the pool: the id of an invalidation's tombstone, or
/// `None` (nothing, or an unreadable entry).
type Observed = Option<u64>;

/// What a pool read came to.
enum Lookup {
    Hit(CachedImage),
    Miss(Observed),
}

/// One fill of one key, and the callers waiting for it.
#[derive(Debug)]
struct Flight {
    /// Set when the flight was detached from the map (an invalidation, or a caller that
    /// would not join it): its result must not be stored.
    stale: AtomicBool,
    /// What the leader found in the pool; callers join only if they found the same.
    observed: Observed,
    /// When the flight began; callers join only a flight younger than the store deadline.
    started: Instant,
    /// `None` until the leader publishes the outcome. Waiters hold clones; the sender
    /// closes when the leader goes away.
    outcome: Receiver,
    /// The sender while nobody leads the flight: whoever takes it leads.
    unclaimed: Mutex<Option<Sender>>,
    /// Set when the leader went away without an outcome while callers waited: the flight
    /// they move to, so that they still share one fill.
    successor: OnceLock<Arc<Flight>>,
}

impl Flight {
    /// A flight and its sender, for the caller that leads it.
    fn led(observed: Observed) -> (Arc<Flight>, Sender) {
        let (sender, outcome) = watch::channel(None);
        let flight = Flight {
            stale: AtomicBool::new(false),
            observed,
            started: Instant::now(),
            outcome,
            unclaimed: Mutex::new(None),
            successor: OnceLock::new(),
        };
        (Arc::new(flight), sender)
    }

    /// A flight nobody leads yet.
    fn unclaimed(observed: Observed) -> Arc<Flight> {
        let (flight, sender) = Flight::led(observed);
        *lock(&flight.unclaimed) = Some(sender);
        flight
    }
}

/// The leader's hold on its flight. When it is dropped — after the outcome was published,
/// or without one because the caller was cancelled or the fill panicked — it takes the
/// flight out of the map, and in the second case hands the waiters (if any) an unclaimed
/// successor, before its sender closes the channel and wakes them.
struct Lead<'a> {
    flights: &'a Mutex<HashMap<String, Arc<Flight>>>,
    key: &'a str,
    flight: Arc<Flight>,
    outcome: Sender,
    published: bool,
}

impl Lead<'_> {
    fn publish(&mut self, outcome: Outcome) {
        self.outcome.send_replace(Some(outcome));
        self.published = true;
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut flights = lock(self.flights);
        let in_map = flights
            .get(self.key)
            .is_some_and(|flight| Arc::ptr_eq(flight, &self.flight));
        // Waiters clone the receiver under the map's lock, so this count is exact here. One
        // receiver is the flight's own.
        let waiters = self.outcome.receiver_count() > 1;
        if !self.published && in_map && waiters {
            // The waiters joined legitimately, and the successor's fill starts now.
            let next = Flight::unclaimed(self.flight.observed);
            let _ = self.flight.successor.set(next.clone());
            flights.insert(self.key.to_owned(), next);
        } else if in_map {
            flights.remove(self.key);
        }
        // A detached flight gets no successor: its waiters start over from the map.
    }
}

enum Role<'a> {
    Lead(Lead<'a>),
    Wait(Arc<Flight>, Receiver),
}

/// Cache-aside access to images in the pool (see the module documentation).
///
/// Share it (`Arc<ImageCache>`) between request handlers; every method takes `&self`.
#[derive(Debug)]
pub struct ImageCache {
    pool: Arc<PoolClient>,
    config: CacheConfig,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    counters: Counters,
    /// Callers waiting for another caller's fill now (a gauge, unlike the counters).
    waiting: AtomicUsize,
    /// Keys for tombstone ids: random per process, so ids from different web servers differ.
    tombstone_ids: RandomState,
    invalidations: AtomicU64,
    /// Latency histograms of pool requests, once the site's metrics are attached
    /// ([`ImageCache::attach_metrics`]; the cache is shared before the metrics exist).
    metrics: OnceLock<StoreMetrics>,
    /// Hot images in front of the pool; `None` when `config.local_bytes` is 0.
    local: Option<LocalCache>,
}

/// Counts a caller in [`ImageCache::waiting`] for as long as it lives, however its wait
/// ends (a result, a vanished leader, or the caller's own cancellation).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ImageCache {
    /// A cache over `pool`. The pool client stays shareable: whoever follows the operator's
    /// ring calls `set_ring` on it.
    pub fn new(pool: Arc<PoolClient>, config: CacheConfig) -> Result<ImageCache, CacheError> {
        config.validate()?;
        let local =
            (config.local_bytes > 0).then(|| LocalCache::new(config.local_bytes, config.lease));
        Ok(ImageCache {
            local,
            pool,
            config,
            flights: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            waiting: AtomicUsize::new(0),
            tombstone_ids: RandomState::new(),
            invalidations: AtomicU64::new(0),
            metrics: OnceLock::new(),
        })
    }

    /// Records the latency of every pool request in `metrics` (by operation: `get`, `add`,
    /// `set`, `flush_all`). Only the first call takes effect.
    pub fn attach_metrics(&self, metrics: StoreMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// Runs one pool request, timing it when metrics are attached.
    async fn timed<T>(&self, operation: &'static str, call: impl Future<Output = T>) -> T {
        let Some(metrics) = self.metrics.get() else {
            return call.await;
        };
        let started = Instant::now();
        let out = call.await;
        metrics.observe(Part::Pool, operation, started.elapsed());
        out
    }

    /// The pool client.
    pub fn pool(&self) -> &Arc<PoolClient> {
        &self.pool
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The pool key of an image key: the prefix, then the key.
    pub fn pool_key(&self, key: &ImageKey) -> String {
        format!("{}{}", self.config.prefix, key.as_str())
    }

    /// The pool key of an image's thumbnail: the prefix, [`THUMBNAIL_MARKER`], then the key.
    pub fn thumbnail_pool_key(&self, key: &ImageKey) -> String {
        format!("{}{THUMBNAIL_MARKER}{}", self.config.prefix, key.as_str())
    }

    /// The in-process cache's key and the pool's key of `variant` of the image under `key`.
    fn entry_keys(&self, key: &ImageKey, variant: Variant) -> (String, String) {
        match variant {
            Variant::Image => (key.as_str().to_owned(), self.pool_key(key)),
            Variant::Thumbnail => (
                format!("{THUMBNAIL_MARKER}{}", key.as_str()),
                self.thumbnail_pool_key(key),
            ),
        }
    }

    /// The image under `key`: from the pool if it holds it (`hit: true`), else from `fill`,
    /// whose result is then stored. Concurrent misses on one key run one `fill`; the others
    /// wait for its result. `fill` answers `Ok(None)` when the store has no such image
    /// (nothing is cached then) and an error when it cannot tell; the error goes to this
    /// caller and every waiter, and is not cached.
    ///
    /// Pool failures never fail this call: they are misses and skipped stores.
    pub async fn get_or_fill<F, Fut, E>(
        &self,
        key: &ImageKey,
        fill: F,
    ) -> Result<Option<Fetched>, FillError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<CachedImage>, E>>,
        E: Error + Send + Sync + 'static,
    {
        self.fetch(key, Variant::Image, fill).await
    }

    /// The thumbnail of the image under `key`, as [`ImageCache::get_or_fill`] reads an
    /// image: its own entries in the in-process cache and the pool (the image's keys with
    /// [`THUMBNAIL_MARKER`]), its own fills; [`ImageCache::invalidate`] and
    /// [`ImageCache::invalidate_all`] cover both the image and its thumbnail. `fill` answers
    /// `Ok(None)` when there is no such image.
    pub async fn get_or_fill_thumbnail<F, Fut, E>(
        &self,
        key: &ImageKey,
        fill: F,
    ) -> Result<Option<Fetched>, FillError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<CachedImage>, E>>,
        E: Error + Send + Sync + 'static,
    {
        self.fetch(key, Variant::Thumbnail, fill).await
    }

    async fn fetch<F, Fut, E>(
        &self,
        key: &ImageKey,
        variant: Variant,
        fill: F,
    ) -> Result<Option<Fetched>, FillError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<CachedImage>, E>>,
        E: Error + Send + Sync + 'static,
    {
        let (local_key, pool_key) = self.entry_keys(key, variant);
        // The lease of whatever this call puts in the in-process cache counts from here,
        // before the pool read or the fill that produces it.
        let leased_from = Instant::now();
        if let Some(local) = &self.local
            && let Some(image) = local.get(&local_key, leased_from)
        {
            return Ok(Some(Fetched {
                image,
                hit: true,
                local: true,
            }));
        }
        let observed = match self.read(&pool_key).await {
            Lookup::Hit(image) => {
                bump(&self.counters.hits);
                if let Some(local) = &self.local {
                    local.insert(&local_key, &image, leased_from);
                }
                return Ok(Some(Fetched {
                    image,
                    hit: true,
                    local: false,
                }));
            }
            Lookup::Miss(observed) => observed,
        };
        bump(&self.counters.misses);
        let mut role = self.join_or_lead(&pool_key, observed);
        let mut lead = loop {
            match role {
                Role::Lead(lead) => break lead,
                Role::Wait(flight, mut outcome) => {
                    let waiting = Waiting::new(&self.waiting);
                    let outcome = wait(&mut outcome).await;
                    drop(waiting);
                    if let Some(outcome) = outcome {
                        bump(&self.counters.collapsed);
                        return served(outcome);
                    }
                    debug!(key = %pool_key, "fill leader went away without a result; taking over");
                    role = match flight.successor.get() {
                        Some(next) => self.take_over(next, &pool_key),
                        None => self.join_or_lead(&pool_key, observed),
                    };
                }
            }
        };
        bump(&self.counters.fills);
        let started = Instant::now();
        let outcome: Outcome = fill().await.map_err(|err| {
            bump(&self.counters.fill_errors);
            FillError(Arc::new(err))
        });
        // Waiters get the result now, not after the store's round trip.
        lead.publish(outcome.clone());
        if let Ok(Some(image)) = &outcome {
            if let Some(local) = &self.local
                && !lead.flight.stale.load(Ordering::Acquire)
            {
                local.insert(&local_key, image, leased_from);
            }
            self.store(&pool_key, image, &lead.flight, started).await;
        }
        // Keeping the flight in the map until the store landed lets callers that missed
        // meanwhile take the result instead of filling again.
        drop(lead);
        served(outcome)
    }

    /// Makes sure nobody reads the image now under `key`, or its thumbnail, from the cache
    /// once this returns (call it after committing the new image and before acknowledging
    /// the upload): from the pool, and from any web server's in-process cache, for which it
    /// waits the lease after the tombstones were written. The image and its thumbnail each
    /// get a tombstone, with one id; both are tried, and the first failure is the error. See
    /// the module documentation for how, and for what an error means.
    pub async fn invalidate(&self, key: &ImageKey) -> Result<(), CacheError> {
        bump(&self.counters.invalidations);
        let seq = self.invalidations.fetch_add(1, Ordering::Relaxed);
        let tombstone = envelope::encode_tombstone(self.tombstone_ids.hash_one(seq));
        let mut failed = None;
        for variant in [Variant::Image, Variant::Thumbnail] {
            let (local_key, pool_key) = self.entry_keys(key, variant);
            if let Some(local) = &self.local {
                local.remove(&local_key);
            }
            if let Some(flight) = lock(&self.flights).remove(&pool_key) {
                flight.stale.store(true, Ordering::Release);
            }
            let written = self
                .timed(
                    "set",
                    self.pool
                        .set(&pool_key, &tombstone, 0, self.config.tombstone_ttl_secs),
                )
                .await;
            if let Err(source) = written {
                bump(&self.counters.pool_errors);
                failed.get_or_insert(CacheError::Invalidate {
                    key: key.to_string(),
                    source,
                    ttl_secs: self.config.ttl_secs,
                });
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        self.outlive_leases().await;
        Ok(())
    }

    /// Waits until every in-process copy any web server read before the invalidation that
    /// just returned has expired (see the module documentation).
    async fn outlive_leases(&self) {
        if !self.config.lease.is_zero() {
            tokio::time::sleep(lease_wait(self.config.lease)).await;
        }
    }

    /// Empties the pool (every node, not only images) and this process's in-process cache,
    /// detaches every running fill, and waits the lease so that every other web server's
    /// in-process copies have expired. For "clear the cache" and "delete all data"; see the
    /// module documentation for the case this does not cover across web servers.
    pub async fn invalidate_all(&self) -> Result<(), CacheError> {
        bump(&self.counters.invalidations);
        for (_, flight) in lock(&self.flights).drain() {
            flight.stale.store(true, Ordering::Release);
        }
        if let Some(local) = &self.local {
            local.clear();
        }
        self.timed("flush_all", self.pool.flush_all())
            .await
            .map_err(|err| {
                bump(&self.counters.pool_errors);
                CacheError::Flush(err)
            })?;
        self.outlive_leases().await;
        Ok(())
    }

    /// The in-process cache's counters and sizes; `None` when it is off.
    pub fn local_stats(&self) -> Option<LocalStats> {
        self.local.as_ref().map(LocalCache::stats)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            fills: get(&c.fills),
            collapsed: get(&c.collapsed),
            fill_errors: get(&c.fill_errors),
            stored: get(&c.stored),
            refused: get(&c.refused),
            discarded: get(&c.discarded),
            corrupt: get(&c.corrupt),
            pool_errors: get(&c.pool_errors),
            invalidations: get(&c.invalidations),
        }
    }

    /// Keys with a fill running, or waiting to be claimed by a waiter after its leader went
    /// away.
    pub fn fills_in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Callers waiting for another caller's fill now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The image the pool holds under `pool_key`, or what it holds instead.
    async fn read(&self, pool_key: &str) -> Lookup {
        let value = match self.timed("get", self.pool.get(pool_key)).await {
            Ok(Some(value)) => value,
            Ok(None) => return Lookup::Miss(None),
            Err(err) => {
                bump(&self.counters.pool_errors);
                debug!(key = pool_key, %err, "cache read failed; treated as a miss");
                return Lookup::Miss(None);
            }
        };
        match envelope::decode(&value.data) {
            Ok(Envelope::Image(image)) => Lookup::Hit(image),
            Ok(Envelope::Tombstone(id)) => Lookup::Miss(Some(id)),
            Err(err) => {
                // Left in place: deleting could remove a tombstone written meanwhile. It
                // expires with its ttl, or the next invalidation overwrites it.
                bump(&self.counters.corrupt);
                debug!(key = pool_key, %err, "unreadable cache entry; treated as a miss");
                Lookup::Miss(None)
            }
        }
    }

    /// Joins the key's flight (leading it if it is unclaimed) if the caller may (see the
    /// module documentation), or starts one and leads it.
    fn join_or_lead<'a>(&'a self, pool_key: &'a str, observed: Observed) -> Role<'a> {
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(pool_key) {
            if flight.observed == observed && flight.started.elapsed() <= self.config.store_deadline
            {
                return self.claim_or_wait(flight.clone(), pool_key);
            }
            // Its result may predate what this caller saw: replaced below, and not stored.
            flight.stale.store(true, Ordering::Release);
        }
        let (flight, sender) = Flight::led(observed);
        flights.insert(pool_key.to_owned(), flight.clone());
        self.lead(flight, sender, pool_key)
    }

    /// Moves to the successor of a flight whose leader went away.
    fn take_over<'a>(&'a self, next: &Arc<Flight>, pool_key: &'a str) -> Role<'a> {
        // Under the map's lock, like every receiver clone (see `Lead::drop`).
        let _flights = lock(&self.flights);
        self.claim_or_wait(next.clone(), pool_key)
    }

    /// Leads `flight` if nobody does, else waits for it. Call with the map locked.
    fn claim_or_wait<'a>(&'a self, flight: Arc<Flight>, pool_key: &'a str) -> Role<'a> {
        let unclaimed = lock(&flight.unclaimed).take();
        match unclaimed {
            Some(sender) => self.lead(flight, sender, pool_key),
            None => {
                let outcome = flight.outcome.clone();
                Role::Wait(flight, outcome)
            }
        }
    }

    fn lead<'a>(&'a self, flight: Arc<Flight>, sender: Sender, pool_key: &'a str) -> Role<'a> {
        Role::Lead(Lead {
            flights: &self.flights,
            key: pool_key,
            flight,
            outcome: sender,
            published: false,
        })
    }

    /// Offers a fill's result to the pool, unless it may be stale or would be refused (see
    /// the module documentation).
    async fn store(&self, pool_key: &str, image: &CachedImage, flight: &Flight, started: Instant) {
        let skip = |why: &str| {
            bump(&self.counters.discarded);
            debug!(key = pool_key, why, "fill result not cached");
        };
        if flight.stale.load(Ordering::Acquire) {
            return skip("invalidated during the fill");
        }
        if flight.observed.is_some() {
            // The `add` would carry the whole image to meet the tombstone; a reader after it
            // expired stores instead.
            return skip("the fill began on a tombstone");
        }
        let value = match envelope::encode(image) {
            Ok(value) => value,
            Err(err) => {
                bump(&self.counters.discarded);
                warn!(key = pool_key, %err, "image not cached: it cannot be put in an envelope");
                return;
            }
        };
        if started.elapsed() > self.config.store_deadline {
            return skip("the fill took longer than the store deadline");
        }
        match self
            .timed(
                "add",
                self.pool.add(pool_key, &value, 0, self.config.ttl_secs),
            )
            .await
        {
            Ok(true) => bump(&self.counters.stored),
            Ok(false) => {
                bump(&self.counters.refused);
                debug!(
                    key = pool_key,
                    "fill result not cached: the key is held (tombstone or newer entry)"
                );
            }
            Err(err) => {
                bump(&self.counters.pool_errors);
                debug!(key = pool_key, %err, "fill result not cached: the pool failed");
            }
        }
    }
}

/// The leader's outcome, or `None` if the leader went away without one.
async fn wait(outcome: &mut Receiver) -> Option<Outcome> {
    let published = outcome.wait_for(Option::is_some).await.ok()?;
    published.clone()
}

fn served(outcome: Outcome) -> Result<Option<Fetched>, FillError> {
    outcome.map(|found| {
        found.map(|image| Fetched {
            image,
            hit: false,
            local: false,
        })
    })
}

/// How long a writer waits after invalidating: the lease, plus 1 % and a millisecond for
/// monotonic clocks of different hosts running at slightly different rates (NTP slews them
/// by at most 0.05 %) and for timer granularity.
fn lease_wait(lease: Duration) -> Duration {
    lease + lease / 100 + Duration::from_millis(1)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (map operations only); if something did,
    // the map is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_item_limit_is_the_cachepool_default() {
        let spec = cachepool_crds::pool::CacheSpec::default();
        assert_eq!(
            DEFAULT_NODE_ITEM_BYTES,
            spec.max_item_size_kib as usize * 1024
        );
    }

    #[test]
    fn the_default_config_is_valid() {
        CacheConfig::default().validate().unwrap();
    }

    #[test]
    fn config_errors_say_what_to_fix() {
        let base = CacheConfig::default();
        let message = |config: CacheConfig| config.validate().unwrap_err().to_string();
        assert_eq!(
            message(CacheConfig {
                prefix: "img :".into(),
                ..base.clone()
            }),
            "invalid cache configuration: prefix \"img :\" must be 1 to 44 printable ASCII \
             characters without spaces"
        );
        assert!(
            message(CacheConfig {
                prefix: "p".repeat(45),
                ..base.clone()
            })
            .contains("1 to 44")
        );
        assert_eq!(
            message(CacheConfig {
                ttl_secs: 0,
                ..base.clone()
            }),
            "invalid cache configuration: ttl_secs must be between 1 and 2592000 (30 days), got 0"
        );
        assert_eq!(
            message(CacheConfig {
                store_deadline: Duration::from_millis(1500),
                tombstone_ttl_secs: 4,
                ..base.clone()
            }),
            "invalid cache configuration: tombstone_ttl_secs must be at least the store \
             deadline (1.5s, rounded up) plus 3, so at least 5, and at most 2592000; got 4"
        );
        assert_eq!(
            message(CacheConfig {
                local_bytes: 1 << 20,
                lease: MAX_LEASE + Duration::from_millis(1),
                ..base.clone()
            }),
            "invalid cache configuration: the in-process cache's lease must be at most 10s \
             (every re-upload waits that long), got 10.001s"
        );
        assert!(
            message(CacheConfig {
                local_bytes: 1 << 20,
                lease: Duration::ZERO,
                ..base.clone()
            })
            .contains("needs a lease greater than zero")
        );
        CacheConfig {
            local_bytes: 0,
            lease: Duration::ZERO,
            ..base.clone()
        }
        .validate()
        .unwrap();
        CacheConfig {
            store_deadline: Duration::from_millis(1500),
            tombstone_ttl_secs: 5,
            ..base
        }
        .validate()
        .unwrap();
    }
}
