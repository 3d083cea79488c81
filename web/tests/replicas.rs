//! Two replicas of the site sharing the pool, the database and the object store, each with
//! its in-process cache of hot images: once one replica acknowledged a re-upload or a
//! delete-all, the other never serves the old bytes, although it held them in memory (the
//! lease rule of `cachepool_web::cache`); the same for the image's thumbnail. Plus the
//! in-process cache's metrics and its byte budget, as `/metrics` shows them.
//!
//! The replicas are two routers with their own pool clients and image caches on their own
//! ports, over one SQLite file, one image directory and two in-process cache nodes: what two
//! `cachepool web` processes share. A reader hammers replica A throughout and notes when each
//! read began; every read that began after replica B's call returned must carry the new
//! bytes. The contrast case drops the writer's wait and sees the old bytes come back, so the
//! check can fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cachepool_test_support::images::photo_png;
use cachepool_test_support::site::{Replica, Site, gif, header, site_cache_config};
use cachepool_test_support::store::{Db, Objects};
use cachepool_web::cache::CacheConfig;

/// Longest any condition a test waits for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// One read of replica A.
#[derive(Debug)]
struct Read {
    began: Instant,
    status: u16,
    x_cache: String,
    body: Vec<u8>,
}

/// Reads `key` from `url` back to back until stopped; every read, in order.
struct Reader {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Read>>,
}

impl Reader {
    fn start(http: reqwest::Client, url: &str, key: &str) -> Reader {
        Reader::start_at(http, format!("{url}/api/v1/images/{key}"))
    }

    /// Reads `target` (a full URL) back to back until stopped.
    fn start_at(http: reqwest::Client, target: String) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut reads = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let began = Instant::now();
                let r = http
                    .get(&target)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {target}: {e}"));
                let status = r.status().as_u16();
                let x_cache = header(&r, "x-cache");
                let body = r
                    .bytes()
                    .await
                    .unwrap_or_else(|e| panic!("GET {target}: {e}"));
                reads.push(Read {
                    began,
                    status,
                    x_cache,
                    body: body.to_vec(),
                });
            }
            reads
        });
        Reader { stop, task }
    }

    async fn stop(self) -> Vec<Read> {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .unwrap_or_else(|e| panic!("the reader failed: {e}"))
    }
}

/// Reads `key` from A until A serves `body` from its memory.
async fn until_local(site: &Site, key: &str, body: &[u8]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = site.get(key).await;
        let x_cache = header(&r, "x-cache");
        let got = r.bytes().await.unwrap_or_else(|e| panic!("GET {key}: {e}"));
        if x_cache == "local" && got.as_ref() == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica A did not come to serve the image from memory"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What replica B did: when its call returned, and what A must serve from then on (`None`:
/// 404).
struct Acked {
    at: Instant,
    now: Option<Vec<u8>>,
}

/// The reads that began after a write was acknowledged (and before the next one began) but
/// did not serve what that write left.
fn stale_reads<'a>(reads: &'a [Read], acks: &[Acked], next_began: &[Instant]) -> Vec<&'a Read> {
    reads
        .iter()
        .filter(|read| {
            let Some(i) = acks.iter().rposition(|a| a.at <= read.began) else {
                return false;
            };
            if next_began.get(i).is_some_and(|&t| read.began >= t) {
                return false; // the next write is in progress: either answer is right
            }
            match &acks[i].now {
                Some(body) => read.status != 200 || &read.body != body,
                None => read.status != 404,
            }
        })
        .collect()
}

/// Replica B re-uploads `key` `rounds` times while a reader hammers A, A holding the current
/// image in memory before each write; the reads, the acknowledgements and when each write
/// began.
async fn reuploads_under_reads(
    a: &Site,
    b: &Replica,
    key: &str,
    rounds: u8,
) -> (Vec<Read>, Vec<Acked>, Vec<Instant>) {
    assert_eq!(a.put(key, gif(1)).await.0, 201);
    until_local(a, key, &gif(1)).await;
    let reader = Reader::start(a.http.clone(), &a.url, key);
    let mut acks = Vec::new();
    let mut began = Vec::new();
    for shade in 2..2 + rounds {
        until_local(a, key, &gif(shade - 1)).await;
        began.push(Instant::now());
        assert_eq!(b.put(key, gif(shade)).await, 200);
        acks.push(Acked {
            at: Instant::now(),
            now: Some(gif(shade)),
        });
        // Let the reader run on the new image for a while.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (reader.stop().await, acks, began[1..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_replicas_reupload_returned_no_replica_serves_the_old_bytes() {
    let a = Site::start(Db::Sqlite, Objects::Local).await;
    let b = a.replica(site_cache_config()).await;
    let (reads, acks, next) = reuploads_under_reads(&a, &b, "hot.gif", 5).await;
    let stale = stale_reads(&reads, &acks, &next);
    assert!(
        stale.is_empty(),
        "{} of {} reads of A served old bytes after B's upload returned: {:?}",
        stale.len(),
        reads.len(),
        stale.first().map(|r| (&r.x_cache, r.status))
    );
    // The reader did read from A's memory, before and after the writes.
    let local = reads.iter().filter(|r| r.x_cache == "local").count();
    assert!(local > 0, "no read was served from A's memory");
    let after_last = reads.iter().filter(|r| r.began >= acks[4].at).count();
    assert!(
        after_last > 0,
        "no read began after the last write returned"
    );
    // B's own cache: its reads serve the new image at once.
    let r = b.get("hot.gif").await;
    assert_eq!(r.bytes().await.unwrap().to_vec(), gif(6));
    drop(b);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contrast_without_the_writers_wait_a_replica_serves_old_bytes() {
    // A trusts its copies for 2 s; B does not wait at all (a lease of 0 with its own
    // in-process cache off): the configuration the lease rule forbids.
    let lease = Duration::from_secs(2);
    let a = Site::start_with_cache(
        Db::Sqlite,
        Objects::Local,
        CacheConfig {
            lease,
            ..site_cache_config()
        },
    )
    .await;
    let b = a.replica(CacheConfig::default()).await;
    let (reads, acks, next) = reuploads_under_reads(&a, &b, "hot.gif", 1).await;
    let stale = stale_reads(&reads, &acks, &next);
    assert!(
        stale.iter().any(|r| r.x_cache == "local"),
        "expected A to serve its old copy after B's upload returned ({} reads)",
        reads.len()
    );
    drop(b);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_replicas_delete_all_returned_no_replica_serves_the_old_bytes() {
    let a = Site::start(Db::Sqlite, Objects::Local).await;
    let b = a.replica(site_cache_config()).await;
    let key = "hot.gif";
    for round in 0..3u8 {
        let shade = 10 + round;
        assert_eq!(a.put(key, gif(shade)).await.0, 201);
        until_local(&a, key, &gif(shade)).await;
        let reader = Reader::start(a.http.clone(), &a.url, key);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.delete_data().await, 200);
        let acks = [Acked {
            at: Instant::now(),
            now: None,
        }];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reads = reader.stop().await;
        let stale = stale_reads(&reads, &acks, &[]);
        assert!(
            stale.is_empty(),
            "round {round}: {} of {} reads of A served the image after B's delete-all \
             returned: {:?}",
            stale.len(),
            reads.len(),
            stale.first().map(|r| (&r.x_cache, r.status))
        );
        assert!(
            reads.iter().any(|r| r.x_cache == "local"),
            "round {round}: no read was served from A's memory before the delete"
        );
        assert!(reads.iter().any(|r| r.began >= acks[0].at));
    }
    drop(b);
    a.stop().await;
}

/// Reads `key`'s thumbnail from A until A serves it from its memory; its bytes.
async fn until_local_thumbnail(site: &Site, key: &str) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = site.thumbnail(key).await;
        let x_cache = header(&r, "x-cache");
        let got = r.bytes().await.unwrap_or_else(|e| panic!("GET {key}: {e}"));
        if x_cache == "local" {
            return got.to_vec();
        }
        assert!(
            Instant::now() < deadline,
            "replica A did not come to serve the thumbnail from memory"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_replicas_write_returned_no_replica_serves_the_old_thumbnail() {
    let a = Site::start(Db::Sqlite, Objects::Local).await;
    let b = a.replica(site_cache_config()).await;
    let key = "hot.png";
    assert_eq!(a.put(key, photo_png(64, 48, 1)).await.0, 201);
    let first = until_local_thumbnail(&a, key).await;
    let reader = Reader::start_at(
        a.http.clone(),
        format!("{}/api/v1/images/{key}/thumbnail", a.url),
    );
    let mut acks = Vec::new();
    let mut began = Vec::new();
    let mut previous = first;
    for seed in 2..5 {
        // A holds the current thumbnail in memory before each write.
        until_local_thumbnail(&a, key).await;
        began.push(Instant::now());
        assert_eq!(b.put(key, photo_png(64, 48, seed)).await, 200);
        let at = Instant::now();
        // What every read from now on must serve: B's answer (made at the upload, stored).
        let now = b.thumbnail(key).await.bytes().await.unwrap().to_vec();
        assert_ne!(
            now, previous,
            "the thumbnails of two images are the same bytes"
        );
        previous.clone_from(&now);
        acks.push(Acked { at, now: Some(now) });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_local_thumbnail(&a, key).await;
    began.push(Instant::now());
    assert_eq!(b.delete_data().await, 200);
    acks.push(Acked {
        at: Instant::now(),
        now: None,
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reads = reader.stop().await;
    let stale = stale_reads(&reads, &acks, &began[1..]);
    assert!(
        stale.is_empty(),
        "{} of {} thumbnail reads of A served an old thumbnail after B's write returned: {:?}",
        stale.len(),
        reads.len(),
        stale.first().map(|r| (&r.x_cache, r.status))
    );
    assert!(
        reads.iter().any(|r| r.x_cache == "local"),
        "no thumbnail read was served from A's memory"
    );
    assert!(
        reads
            .iter()
            .any(|r| r.began >= acks[3].at && r.status == 404)
    );
    drop(b);
    a.stop().await;
}

/// A PNG of `size` bytes the site accepts: one image-data chunk of filler (CRCs are not
/// checked).
fn png(size: usize) -> Vec<u8> {
    let fixed = 8 + (12 + 13) + 12 + 12;
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&[0; 4]);
    };
    chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
    chunk(b"IDAT", &vec![7; size - fixed]);
    chunk(b"IEND", &[]);
    out
}

/// The value of one series in OpenMetrics text (`None` when absent).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

async fn scrape(url: &str, http: &reqwest::Client) -> String {
    http.get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_in_process_cache_and_its_budget_holds() {
    // A budget of 16 KiB: an image may take 2 KiB, so a few dozen small GIFs overflow it.
    let budget = 16 << 10;
    let a = Site::start_with_cache(
        Db::Sqlite,
        Objects::Local,
        CacheConfig {
            local_bytes: budget,
            lease: Duration::from_secs(10),
            ..site_cache_config()
        },
    )
    .await;
    let image = png(1500);
    assert_eq!(a.put("one.gif", image.clone()).await.0, 201);
    let first = a.get("one.gif").await;
    assert_eq!(header(&first, "x-cache"), "miss");
    let second = a.get("one.gif").await;
    assert_eq!(header(&second, "x-cache"), "local");
    assert_eq!(second.bytes().await.unwrap().to_vec(), image);
    let text = scrape(&a.url, &a.http).await;
    let get = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name} in {text}"));
    assert_eq!(get("cachepool_web_local_hits_total"), 1.0);
    assert_eq!(get("cachepool_web_local_misses_total"), 1.0);
    assert_eq!(get("cachepool_web_local_entries"), 1.0);
    assert!(get("cachepool_web_local_bytes") >= 1500.0);
    assert_eq!(get("cachepool_web_local_capacity_bytes"), budget as f64);
    assert_eq!(get("cachepool_web_local_evictions_total"), 0.0);
    // The pool saw only the miss.
    assert_eq!(get("cachepool_web_pool_misses_total"), 1.0);
    assert_eq!(get("cachepool_web_pool_hits_total"), 0.0);

    for i in 0..30 {
        let key = format!("k{i}.gif");
        assert_eq!(a.put(&key, image.clone()).await.0, 201);
        assert_eq!(a.get(&key).await.status(), 200);
    }
    let text = scrape(&a.url, &a.http).await;
    let get = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name} in {text}"));
    assert!(get("cachepool_web_local_bytes") <= budget as f64, "{text}");
    assert!(get("cachepool_web_local_evictions_total") > 0.0, "{text}");
    assert!(get("cachepool_web_local_entries") < 31.0, "{text}");
    // The most recent image is still in memory.
    assert_eq!(header(&a.get("k29.gif").await, "x-cache"), "local");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_in_process_cache_off_hits_come_from_the_pool_and_no_local_metrics() {
    let a = Site::start_with_cache(Db::Sqlite, Objects::Local, CacheConfig::default()).await;
    assert_eq!(a.put("p.gif", gif(3)).await.0, 201);
    assert_eq!(header(&a.get("p.gif").await, "x-cache"), "miss");
    assert_eq!(header(&a.get("p.gif").await, "x-cache"), "hit");
    let text = scrape(&a.url, &a.http).await;
    assert!(!text.contains("cachepool_web_local_"), "{text}");
    a.stop().await;
}
