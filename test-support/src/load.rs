//! The traffic a resize runs under, and the checker that judges every read of it: the load
//! generator of the resize suite (`operator/tests/resize`) and of `tests/e2e`.
//!
//! - **Readers** draw keys from a Zipf(0.99) distribution (inverse CDF over a precomputed
//!   cumulative table, seeded RNG) and behave as a cache-aside application: a miss is filled
//!   with `set`.
//! - **Writers** draw keys the same way and overwrite them with a newer version, or now and
//!   then delete them.
//! - Every value is `v<version>:<padding>`, the padding a function of the key, so a read names
//!   the write it returns and a torn or misplaced value is caught.
//!
//! The checker holds, per key, the history of writes and deletes with monotonic timestamps
//! taken *after* each acknowledgement, and every read takes its timestamp *before* it is sent.
//! A read that returns version `v` is **stale** when, before the read began, another write or
//! a delete had been acknowledged that began after `v`'s write was acknowledged. For that rule
//! to be exact the load never runs two writes (or deletes, or fills) of one key at once: a key
//! being written is skipped by other writers and fillers, so a key's writes are totally
//! ordered in real time and "began after `v` was acknowledged" is simply "came later". A write
//! that failed may still land at any later time (a request that timed out can still reach the
//! node), so its version is *in doubt*: reading it proves nothing and is counted apart.
//!
//! A miss is **unexplained** when the key's last operation was an acknowledged write, no
//! write or delete of it was in flight or failed, and none began while the read ran: nodes
//! have room for every key, so the pool lost a value it held (DESIGN.md: "a resize adds no
//! misses for keys that were cached before it").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cache_node::client::PoolClient;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

/// Windows the load can record; a test lasts far fewer seconds.
const MAX_WINDOWS: usize = 120;

/// The key space: names and the padding each key's values carry.
#[derive(Debug)]
pub struct Keys {
    names: Vec<String>,
    min_pad: usize,
    pad_spread: usize,
}

impl Keys {
    /// `count` keys whose values carry `min_pad..min_pad + pad_spread` bytes of padding.
    pub fn new(count: usize, min_pad: usize, pad_spread: usize) -> Keys {
        let names = (0..count).map(|i| format!("resize:key:{i:06}")).collect();
        Keys {
            names,
            min_pad,
            pad_spread: pad_spread.max(1),
        }
    }

    /// How many keys the space has.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the space has no keys.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The index of a key name of this space.
    pub fn index(&self, name: &[u8]) -> Option<usize> {
        let digits = std::str::from_utf8(name)
            .ok()?
            .strip_prefix("resize:key:")?;
        let i: usize = digits.parse().ok()?;
        (i < self.names.len() && self.names[i].as_bytes() == name).then_some(i)
    }

    fn padding(&self, i: usize) -> impl Iterator<Item = u8> {
        // A multiplicative hash spreads the sizes; the bytes depend on the key, so a value
        // served under the wrong key is caught.
        let len = self.min_pad + (i.wrapping_mul(2_654_435_761) >> 7) % self.pad_spread;
        (0..len).map(move |j| b'a' + ((i + j) % 26) as u8)
    }

    /// The value of version `version` of key `i`.
    pub fn value(&self, i: usize, version: u64) -> Vec<u8> {
        let mut out = format!("v{version}:").into_bytes();
        out.extend(self.padding(i));
        out
    }

    /// The version a value of key `i` carries, or why it is not a value of key `i`.
    pub fn parse(&self, i: usize, value: &[u8]) -> Result<u64, String> {
        let colon = value
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| format!("no version prefix in a {}-byte value", value.len()))?;
        let version = std::str::from_utf8(&value[..colon])
            .ok()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "bad version prefix {:?}",
                    String::from_utf8_lossy(&value[..colon])
                )
            })?;
        if !value[colon + 1..].iter().copied().eq(self.padding(i)) {
            return Err(format!(
                "v{version}: the padding is not key {i}'s ({} bytes)",
                value.len()
            ));
        }
        Ok(version)
    }
}

/// Zipf's law over ranks `0..n`: rank `r` drawn with probability proportional to
/// `1 / (r + 1)^s`. Inverse CDF over a cumulative table: exact, and a binary search per draw.
#[derive(Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for r in 0..n {
            sum += 1.0 / ((r + 1) as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// One write of a key.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    /// Acknowledged by the pool.
    acked: bool,
    /// Finished, acknowledged or not (false while in flight).
    done: bool,
    /// When the acknowledgement was recorded.
    acked_at: Option<Instant>,
    /// When the next acknowledged operation on the key ended: from then on this version is
    /// stale.
    superseded_at: Option<Instant>,
}

/// What the checker knows of one key.
#[derive(Debug, Default)]
struct Record {
    /// A write, delete or fill of the key is in flight.
    busy: bool,
    /// Operations begun on the key.
    ops: u64,
    /// Version `v` at index `v - 1`.
    versions: Vec<Written>,
    /// The version of the last acknowledged operation, when that was a write.
    live: Option<u64>,
    /// The last finished operation failed: the pool may or may not hold the key.
    uncertain: bool,
    /// When the last operation on the key began.
    last_begun: Option<Instant>,
    /// Whether the first read after the checker was armed that expected a hit got one.
    first_read: Option<bool>,
}

/// What the checker counted.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub reads: u64,
    pub hits: u64,
    pub stale: u64,
    pub corrupt: u64,
    pub in_doubt: u64,
    pub unexplained_misses: u64,
    pub writes_acked: u64,
    pub deletes_acked: u64,
    pub write_errors: u64,
    pub read_errors: u64,
    /// The first few stale, corrupt or unexplained reads, described.
    pub samples: Vec<String>,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    stale: AtomicU64,
    corrupt: AtomicU64,
    in_doubt: AtomicU64,
    unexplained: AtomicU64,
    writes_acked: AtomicU64,
    deletes_acked: AtomicU64,
    write_errors: AtomicU64,
    read_errors: AtomicU64,
}

/// The per-key histories, and the counts of what reads were found to be.
#[derive(Debug)]
pub struct Checker {
    keys: Keys,
    records: Vec<Mutex<Record>>,
    counters: Counters,
    samples: Mutex<Vec<String>>,
    /// Times in samples count from here (the load's window 0).
    origin: Mutex<Instant>,
    /// Reads that begin from this instant on count towards the cold hit ratio.
    armed: OnceLock<Instant>,
}

/// A read in progress: when it began and what the key's history was then.
#[derive(Debug, Clone, Copy)]
pub struct ReadStart {
    at: Instant,
    ops: u64,
    expect_hit: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const SAMPLES: usize = 10;

impl Checker {
    pub fn new(keys: Keys) -> Checker {
        let records = (0..keys.len())
            .map(|_| Mutex::new(Record::default()))
            .collect();
        Checker {
            keys,
            records,
            counters: Counters::default(),
            samples: Mutex::new(Vec::new()),
            origin: Mutex::new(Instant::now()),
            armed: OnceLock::new(),
        }
    }

    fn set_origin(&self, origin: Instant) {
        *lock(&self.origin) = origin;
    }

    /// From now on, the first read of each key that expects a hit (the key is cached and
    /// untouched) counts towards the cold hit ratio. Once per checker.
    pub fn arm(&self) {
        let _ = self.armed.set(Instant::now());
    }

    /// Of the keys read since `arm` while cached and untouched: (how many, how many of their
    /// first reads hit). Unlike a window's hit ratio it weighs every key alike, so it shows the
    /// share of cached keys a resize lost, however quickly hot keys were refilled.
    pub fn cold(&self) -> (u64, u64) {
        let (mut keys, mut hits) = (0, 0);
        for r in &self.records {
            if let Some(hit) = lock(r).first_read {
                keys += 1;
                hits += u64::from(hit);
            }
        }
        (keys, hits)
    }

    fn note_first_read(&self, r: &mut Record, start: &ReadStart, hit: bool) {
        if start.expect_hit
            && r.first_read.is_none()
            && r.ops == start.ops
            && self.armed.get().is_some_and(|armed| start.at >= *armed)
        {
            r.first_read = Some(hit);
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Milliseconds from the load's window 0 to `t` (negative: before it).
    pub fn ms(&self, t: Instant) -> i128 {
        let origin = *lock(&self.origin);
        match t.checked_duration_since(origin) {
            Some(d) => d.as_millis() as i128,
            None => -(origin.duration_since(t).as_millis() as i128),
        }
    }

    fn sample(&self, what: String) {
        let mut samples = lock(&self.samples);
        if samples.len() < SAMPLES {
            samples.push(what);
        }
    }

    /// Claims key `i` for a write: its new version, or `None` if another write of it runs.
    pub fn begin_write(&self, i: usize) -> Option<u64> {
        let mut r = lock(&self.records[i]);
        if r.busy {
            return None;
        }
        r.busy = true;
        r.ops += 1;
        r.last_begun = Some(Instant::now());
        r.versions.push(Written::default());
        Some(r.versions.len() as u64)
    }

    /// Records how the write of `version` ended.
    pub fn end_write(&self, i: usize, version: u64, acked: bool) {
        let now = Instant::now();
        let mut r = lock(&self.records[i]);
        r.busy = false;
        let idx = (version - 1) as usize;
        r.versions[idx].done = true;
        if acked {
            if let Some(live) = r.live.take() {
                r.versions[(live - 1) as usize].superseded_at = Some(now);
            }
            r.versions[idx].acked = true;
            r.versions[idx].acked_at = Some(now);
            r.live = Some(version);
            r.uncertain = false;
            self.counters.writes_acked.fetch_add(1, Ordering::Relaxed);
        } else {
            r.uncertain = true;
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Claims key `i` for a delete; false if a write of it runs.
    pub fn begin_delete(&self, i: usize) -> bool {
        let mut r = lock(&self.records[i]);
        if r.busy {
            return false;
        }
        r.busy = true;
        r.ops += 1;
        r.last_begun = Some(Instant::now());
        true
    }

    pub fn end_delete(&self, i: usize, acked: bool) {
        let now = Instant::now();
        let mut r = lock(&self.records[i]);
        r.busy = false;
        if acked {
            if let Some(live) = r.live.take() {
                r.versions[(live - 1) as usize].superseded_at = Some(now);
            }
            r.uncertain = false;
            self.counters.deletes_acked.fetch_add(1, Ordering::Relaxed);
        } else {
            r.uncertain = true;
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Call just before sending a read of key `i`.
    pub fn before_read(&self, i: usize) -> ReadStart {
        let r = lock(&self.records[i]);
        // Taken under the lock, after every acknowledgement recorded so far.
        let at = Instant::now();
        ReadStart {
            at,
            ops: r.ops,
            expect_hit: !r.busy && !r.uncertain && r.live.is_some(),
        }
    }

    /// Judges a read of key `i` that returned `value`.
    pub fn after_hit(&self, i: usize, start: &ReadStart, value: &[u8]) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        let version = match self.keys.parse(i, value) {
            Ok(v) => v,
            Err(why) => {
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.sample(format!("corrupt read of {}: {why}", self.keys.name(i)));
                return;
            }
        };
        let mut r = lock(&self.records[i]);
        self.note_first_read(&mut r, start, true);
        let Some(w) = version
            .checked_sub(1)
            .and_then(|idx| r.versions.get(idx as usize))
        else {
            drop(r);
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            self.sample(format!(
                "read of {} returned v{version}, never written",
                self.keys.name(i)
            ));
            return;
        };
        if !w.acked {
            if w.done {
                // Its write failed: it may land whenever, so reading it proves nothing.
                self.counters.in_doubt.fetch_add(1, Ordering::Relaxed);
            }
            // Otherwise it is being written right now: concurrent, so not stale.
            return;
        }
        if let Some(superseded) = w.superseded_at
            && superseded < start.at
        {
            let (at, sup) = (self.ms(start.at), self.ms(superseded));
            let newest = r.live.map_or("deleted".to_string(), |v| format!("v{v}"));
            drop(r);
            self.counters.stale.fetch_add(1, Ordering::Relaxed);
            self.sample(format!(
                "STALE: read of {} began at +{at} ms and returned v{version}, superseded at \
                 +{sup} ms (now {newest})",
                self.keys.name(i)
            ));
        }
    }

    /// Judges a read of key `i` that missed.
    pub fn after_miss(&self, i: usize, start: &ReadStart) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let mut r = lock(&self.records[i]);
        self.note_first_read(&mut r, start, false);
        if start.expect_hit && r.ops == start.ops {
            let live = r.live.map_or("nothing".to_string(), |v| {
                let at = r.versions[(v - 1) as usize]
                    .acked_at
                    .map_or(0, |t| self.ms(t));
                format!("v{v} at +{at} ms")
            });
            drop(r);
            self.counters.unexplained.fetch_add(1, Ordering::Relaxed);
            self.sample(format!(
                "UNEXPLAINED MISS: read of {} began at +{} ms; the pool had acknowledged {live} \
                 and nothing touched the key since",
                self.keys.name(i),
                self.ms(start.at),
            ));
        }
    }

    pub fn read_error(&self) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a write or delete of key `i` began at or after `t`.
    pub fn touched_since(&self, i: usize, t: Instant) -> bool {
        lock(&self.records[i]).last_begun.is_some_and(|b| b >= t)
    }

    pub fn verdict(&self) -> Verdict {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Verdict {
            reads: load(&c.reads),
            hits: load(&c.hits),
            stale: load(&c.stale),
            corrupt: load(&c.corrupt),
            in_doubt: load(&c.in_doubt),
            unexplained_misses: load(&c.unexplained),
            writes_acked: load(&c.writes_acked),
            deletes_acked: load(&c.deletes_acked),
            write_errors: load(&c.write_errors),
            read_errors: load(&c.read_errors),
            samples: lock(&self.samples).clone(),
        }
    }
}

/// Writes version `v` of key `i` through the pool, recording it; false if the key was busy or
/// the write failed.
async fn write(client: &PoolClient, checker: &Checker, i: usize) -> bool {
    let Some(version) = checker.begin_write(i) else {
        return false;
    };
    let value = checker.keys.value(i, version);
    let acked = client.set(checker.keys.name(i), &value, 0, 0).await.is_ok();
    checker.end_write(i, version, acked);
    acked
}

async fn delete(client: &PoolClient, checker: &Checker, i: usize) {
    if checker.begin_delete(i) {
        let acked = client.delete(checker.keys.name(i)).await.is_ok();
        checker.end_delete(i, acked);
    }
}

/// Writes every key once, `concurrency` requests at a time; returns how many writes failed.
pub async fn prefill(client: Arc<PoolClient>, checker: Arc<Checker>, concurrency: usize) -> u64 {
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (client, checker) = (client.clone(), checker.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for i in (t..checker.keys.len()).step_by(concurrency) {
                    failed += u64::from(!write(&client, &checker, i).await);
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.unwrap_or_else(|e| panic!("prefill task: {e}"));
    }
    failed
}

/// How much load, and of what kind.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    pub readers: usize,
    pub writers: usize,
    /// Each writer writes (or deletes) once per interval.
    pub write_interval: Duration,
    /// Share of writer operations that are deletes.
    pub delete_share: f64,
    pub zipf_s: f64,
    pub seed: u64,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            readers: 8,
            writers: 2,
            write_interval: Duration::from_millis(2),
            delete_share: 0.05,
            zipf_s: 0.99,
            seed: 0x5eed,
        }
    }
}

/// Reads and hits of one one-second window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub reads: u64,
    pub hits: u64,
}

impl Window {
    /// Hit ratio in percent (100 for a window without reads).
    pub fn hit_pct(&self) -> f64 {
        if self.reads == 0 {
            100.0
        } else {
            100.0 * self.hits as f64 / self.reads as f64
        }
    }
}

/// The hit ratio of several windows taken together, in percent.
pub fn hit_pct(windows: &[Window]) -> f64 {
    let reads: u64 = windows.iter().map(|w| w.reads).sum();
    let hits: u64 = windows.iter().map(|w| w.hits).sum();
    Window { reads, hits }.hit_pct()
}

#[derive(Debug)]
struct Windows {
    origin: Instant,
    reads: Vec<AtomicU64>,
    hits: Vec<AtomicU64>,
}

impl Windows {
    fn record(&self, at: Instant, hit: bool) {
        let w = at.saturating_duration_since(self.origin).as_secs() as usize;
        if w < MAX_WINDOWS {
            self.reads[w].fetch_add(1, Ordering::Relaxed);
            self.hits[w].fetch_add(u64::from(hit), Ordering::Relaxed);
        }
    }
}

/// Load running against a pool; stops (and its tasks end) on `stop` or when dropped.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    windows: Arc<Windows>,
}

impl Load {
    /// Starts readers and writers; window 0 begins now.
    pub fn start(client: Arc<PoolClient>, checker: Arc<Checker>, config: LoadConfig) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        checker.set_origin(origin);
        let windows = Arc::new(Windows {
            origin,
            reads: (0..MAX_WINDOWS).map(|_| AtomicU64::new(0)).collect(),
            hits: (0..MAX_WINDOWS).map(|_| AtomicU64::new(0)).collect(),
        });
        let zipf = Arc::new(Zipf::new(checker.keys.len(), config.zipf_s));
        let mut tasks = Vec::new();
        for r in 0..config.readers {
            let (client, checker, zipf, stop, windows) = (
                client.clone(),
                checker.clone(),
                zipf.clone(),
                stop.clone(),
                windows.clone(),
            );
            let mut rng = SmallRng::seed_from_u64(config.seed ^ (r as u64 + 1));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = zipf.sample(&mut rng);
                    let start = checker.before_read(i);
                    let hit = match client.get(checker.keys.name(i)).await {
                        Ok(Some(value)) => {
                            checker.after_hit(i, &start, &value.data);
                            true
                        }
                        Ok(None) => {
                            checker.after_miss(i, &start);
                            // Cache-aside: the application fills what it missed.
                            write(&client, &checker, i).await;
                            false
                        }
                        Err(_) => {
                            checker.read_error();
                            false
                        }
                    };
                    windows.record(Instant::now(), hit);
                }
            }));
        }
        for w in 0..config.writers {
            let (client, checker, zipf, stop) =
                (client.clone(), checker.clone(), zipf.clone(), stop.clone());
            let mut rng = SmallRng::seed_from_u64(config.seed.rotate_left(17) ^ (w as u64 + 1));
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(config.write_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let i = zipf.sample(&mut rng);
                    if rng.random_bool(config.delete_share) {
                        delete(&client, &checker, i).await;
                    } else {
                        write(&client, &checker, i).await;
                    }
                }
            }));
        }
        Load {
            stop,
            tasks,
            windows,
        }
    }

    /// The window running now.
    pub fn window_now(&self) -> usize {
        self.windows.origin.elapsed().as_secs() as usize
    }

    /// Sleeps until window `w` begins (returns at once if it has).
    pub async fn until_window(&self, w: usize) {
        let at = self.windows.origin + Duration::from_secs(w as u64);
        tokio::time::sleep_until(at.into()).await;
    }

    /// Stops at the start of window `end` and returns windows `0..end`. Every operation in
    /// flight finishes first, so none is left in doubt by the stop.
    pub async fn stop_at(mut self, end: usize) -> Vec<Window> {
        self.until_window(end).await;
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            task.await.unwrap_or_else(|e| panic!("load task: {e}"));
        }
        (0..end.min(MAX_WINDOWS))
            .map(|w| Window {
                reads: self.windows.reads[w].load(Ordering::Relaxed),
                hits: self.windows.hits[w].load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}
