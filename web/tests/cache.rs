//! Cache-aside reads against real cache nodes, started in-process on loopback ports the
//! kernel picks, through the real pool client.
//!
//! "Two web servers" are two `ImageCache`s, each over its own `PoolClient`, on the same
//! nodes: that is what two processes share, and what an in-process mechanism cannot cover.
//! Every test stops the nodes it started (on a panic, the test's runtime ends them).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_node::client::{ClientOptions, NodeClient, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::ring::Ring;
use cachepool_web::cache::envelope::{self, Envelope};
use cachepool_web::cache::{CacheConfig, CachedImage, FillError, ImageCache};
use cachepool_web::image::ImageKey;
use cachepool_web::store::etag_of;
use rand::Rng;
use tokio::sync::{Notify, oneshot};

/// Longest any condition a test waits for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// A test that takes longer than this has hung (a fill nobody releases, a waiter never
/// woken): it fails instead of blocking the suite.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Runs one test on its own two-worker runtime, within `TEST_LIMIT`. Dropping the runtime
/// ends every node and task the test started, also when it fails.
fn run(test: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("runtime: {err}"));
    runtime.block_on(async {
        if tokio::time::timeout(TEST_LIMIT, test).await.is_err() {
            panic!("test not done within {TEST_LIMIT:?}");
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// Nodes of one pool.
struct Cluster {
    nodes: Vec<Node>,
    addrs: Vec<String>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..n {
            let node = ok(
                Node::start(NodeConfig::ephemeral(64, Policy::Lru, None)).await,
                "node start",
            );
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes.iter().map(|node| node.addr.to_string()).collect();
        for addr in &addrs {
            let client = ok(
                NodeClient::new(addr.clone(), ClientOptions::default()),
                "node client",
            );
            poll(|| async { client.stats().await.is_ok() }).await;
        }
        Cluster { nodes, addrs }
    }

    /// A pool client of its own (a web server's).
    fn client(&self) -> Arc<PoolClient> {
        let ring = ok(
            Ring::from_addresses(1, self.addrs.iter().map(String::as_str)),
            "ring",
        );
        let options = ClientOptions {
            request_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        Arc::new(ok(PoolClient::from_ring(ring, options), "pool client"))
    }

    async fn stop(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// Deadlines that fit tests: a 2 s store deadline (generous for a loaded machine), so a
/// tombstone lives 5 s.
fn config() -> CacheConfig {
    CacheConfig {
        store_deadline: Duration::from_secs(2),
        tombstone_ttl_secs: 5,
        ..CacheConfig::default()
    }
}

fn cache(cluster: &Cluster, config: CacheConfig) -> Arc<ImageCache> {
    Arc::new(ok(ImageCache::new(cluster.client(), config), "image cache"))
}

fn key(name: &str) -> ImageKey {
    ok(ImageKey::parse(name), "key")
}

fn image(content: &str) -> CachedImage {
    let body = Bytes::from(content.as_bytes().to_vec());
    CachedImage {
        content_type: "image/png".into(),
        etag: etag_of(&body),
        body,
    }
}

/// The version an image made by `versioned` carries.
fn version_of(image: &CachedImage) -> u64 {
    std::str::from_utf8(&image.body)
        .ok()
        .and_then(|text| text.strip_prefix("version "))
        .and_then(|version| version.parse().ok())
        .unwrap_or_else(|| panic!("not a versioned image: {image:?}"))
}

fn versioned(version: u64) -> CachedImage {
    image(&format!("version {version}"))
}

/// What the pool holds under the image's pool key, decoded.
async fn raw(cache: &ImageCache, key: &ImageKey) -> Option<Envelope> {
    let value = ok(cache.pool().get(cache.pool_key(key)).await, "pool get")?;
    Some(ok(
        envelope::decode(&value.data),
        "the pool holds an envelope",
    ))
}

/// `result`'s value; a test failure naming `what` if it is an error.
fn ok<T, E: std::fmt::Debug>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err:?}"))
}

async fn poll<F, Fut>(mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the object store is down")]
struct StoreDown;

#[test]
fn a_miss_fills_and_stores_then_the_pool_serves_hits() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        let cat = key("cat.png");
        let fills = AtomicUsize::new(0);
        let fill = || async {
            fills.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Some(image("meow")))
        };

        let first = cache.get_or_fill(&cat, fill).await.unwrap().unwrap();
        assert!(!first.hit);
        assert_eq!(first.image, image("meow"));
        // What the pool holds is the envelope of exactly that image.
        assert_eq!(
            raw(&cache, &cat).await,
            Some(Envelope::Image(image("meow")))
        );

        let second = cache.get_or_fill(&cat, fill).await.unwrap().unwrap();
        assert!(second.hit);
        assert_eq!(second.image, image("meow"));
        assert_eq!(fills.load(Ordering::SeqCst), 1, "a hit does not fill");

        let stats = cache.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.fills, stats.stored),
            (1, 1, 1, 1),
            "{stats:?}"
        );
        assert_eq!(cache.fills_in_flight(), 0);
        cluster.stop().await;
    });
}

#[test]
fn an_image_the_store_does_not_have_is_not_cached() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let ghost = key("ghost");
        for _ in 0..2 {
            let found = cache
                .get_or_fill(&ghost, || async { Ok::<_, Infallible>(None) })
                .await
                .unwrap();
            assert_eq!(found, None);
        }
        assert_eq!(raw(&cache, &ghost).await, None);
        assert_eq!(cache.stats().fills, 2);
        cluster.stop().await;
    });
}

#[test]
fn fifty_concurrent_misses_on_one_key_run_one_fill() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        let fills = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, fills) = (cache.clone(), fills.clone());
            tasks.push(tokio::spawn(async move {
                let waited_for = cache.clone();
                cache
                    .get_or_fill(&key("popular"), || async move {
                        fills.fetch_add(1, Ordering::SeqCst);
                        // Finish only once every other caller waits on this fill, so that none
                        // could have missed it.
                        poll(|| async { waited_for.waiting() == 49 }).await;
                        Ok::<_, Infallible>(Some(image("everyone wants this")))
                    })
                    .await
            }));
        }
        for task in tasks {
            let fetched = task.await.unwrap().unwrap().unwrap();
            assert_eq!(fetched.image, image("everyone wants this"));
            assert!(!fetched.hit);
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!(
            (stats.misses, stats.fills, stats.collapsed, stats.stored),
            (50, 1, 49, 1),
            "{stats:?}"
        );
        assert_eq!(cache.waiting(), 0);
        cluster.stop().await;
    });
}

#[test]
fn different_keys_fill_in_parallel() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        let running = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (cache, running) = (cache.clone(), running.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("image-{i}");
                let fetched = cache
                    .get_or_fill(&key(&name), || async {
                        running.fetch_add(1, Ordering::SeqCst);
                        // Only completes if all eight fills run at the same time.
                        poll(|| async { running.load(Ordering::SeqCst) == 8 }).await;
                        Ok::<_, Infallible>(Some(image(&name)))
                    })
                    .await;
                (name, fetched)
            }));
        }
        for task in tasks {
            let (name, fetched) = task.await.unwrap();
            assert_eq!(fetched.unwrap().unwrap().image, image(&name));
        }
        let stats = cache.stats();
        assert_eq!((stats.fills, stats.collapsed), (8, 0), "{stats:?}");
        cluster.stop().await;
    });
}

#[test]
fn a_failed_fill_reaches_every_waiter_and_is_not_cached() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let fills = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, fills) = (cache.clone(), fills.clone());
            tasks.push(tokio::spawn(async move {
                let waited_for = cache.clone();
                cache
                    .get_or_fill(&key("flaky"), || async move {
                        fills.fetch_add(1, Ordering::SeqCst);
                        poll(|| async { waited_for.waiting() == 9 }).await;
                        Err::<Option<CachedImage>, _>(StoreDown)
                    })
                    .await
            }));
        }
        for task in tasks {
            let err: FillError = task.await.unwrap().unwrap_err();
            assert!(err.downcast_ref::<StoreDown>().is_some(), "{err:?}");
            assert_eq!(err.to_string(), "the object store is down");
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.fill_errors, stats.stored), (1, 0), "{stats:?}");
        assert_eq!(raw(&cache, &key("flaky")).await, None);

        // The store is back: the next read fills (nothing was cached), the one after hits.
        let fill = || async { Ok::<_, StoreDown>(Some(image("recovered"))) };
        let fetched = cache
            .get_or_fill(&key("flaky"), fill)
            .await
            .unwrap()
            .unwrap();
        assert!(!fetched.hit);
        let fetched = cache
            .get_or_fill(&key("flaky"), fill)
            .await
            .unwrap()
            .unwrap();
        assert!(fetched.hit);
        assert_eq!(fetched.image, image("recovered"));
        cluster.stop().await;
    });
}

#[test]
fn a_panicking_leader_does_not_wedge_its_waiters() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let fills = Arc::new(AtomicUsize::new(0));

        let leader = {
            let (cache, fills) = (cache.clone(), fills.clone());
            tokio::spawn(async move {
                let waited_for = cache.clone();
                cache
                    .get_or_fill(&key("cursed"), || async move {
                        fills.fetch_add(1, Ordering::SeqCst);
                        poll(|| async { waited_for.waiting() == 3 }).await;
                        if fills.load(Ordering::SeqCst) > 0 {
                            panic!("the fill panics (on purpose)");
                        }
                        Ok::<_, Infallible>(None)
                    })
                    .await
            })
        };
        poll(|| async { cache.fills_in_flight() == 1 }).await;
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let (cache, fills) = (cache.clone(), fills.clone());
            waiters.push(tokio::spawn(async move {
                cache
                    .get_or_fill(&key("cursed"), || async move {
                        fills.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Some(image("lifted")))
                    })
                    .await
            }));
        }
        assert!(leader.await.unwrap_err().is_panic());
        for waiter in waiters {
            let fetched = waiter.await.unwrap().unwrap().unwrap();
            assert_eq!(fetched.image, image("lifted"));
        }
        // The panicked fill, then one waiter's; the other two waited for it.
        assert_eq!(fills.load(Ordering::SeqCst), 2);
        assert_eq!(cache.fills_in_flight(), 0);
        assert_eq!(cache.waiting(), 0);
        cluster.stop().await;
    });
}

#[test]
fn a_cancelled_leader_hands_over_to_a_waiter() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let leader = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fill(&key("abandoned"), || async {
                        // A fill that never ends, like a request whose client went away.
                        std::future::pending::<Result<Option<CachedImage>, Infallible>>().await
                    })
                    .await
            })
        };
        poll(|| async { cache.fills_in_flight() == 1 }).await;
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fill(&key("abandoned"), || async {
                        Ok::<_, Infallible>(Some(image("picked up")))
                    })
                    .await
            })
        };
        poll(|| async { cache.waiting() == 1 }).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        let fetched = waiter.await.unwrap().unwrap().unwrap();
        assert_eq!(fetched.image, image("picked up"));
        assert_eq!(cache.stats().fills, 2);
        cluster.stop().await;
    });
}

#[test]
fn invalidate_makes_the_next_read_fill_the_new_image() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        let dog = key("dog");
        let source = AtomicU64::new(1);
        let fill = || async { Ok::<_, Infallible>(Some(versioned(source.load(Ordering::SeqCst)))) };

        cache.get_or_fill(&dog, fill).await.unwrap();
        assert!(cache.get_or_fill(&dog, fill).await.unwrap().unwrap().hit);

        source.store(2, Ordering::SeqCst);
        cache.invalidate(&dog).await.unwrap();
        assert!(matches!(
            raw(&cache, &dog).await,
            Some(Envelope::Tombstone(_))
        ));
        let fetched = cache.get_or_fill(&dog, fill).await.unwrap().unwrap();
        assert_eq!((version_of(&fetched.image), fetched.hit), (2, false));
        // Within the tombstone's life the new image is not cached yet...
        assert!(matches!(
            raw(&cache, &dog).await,
            Some(Envelope::Tombstone(_))
        ));
        // ...and once it expired, the next fill stores it and hits follow.
        poll(|| async { cache.get_or_fill(&dog, fill).await.unwrap().unwrap().hit }).await;
        let fetched = cache.get_or_fill(&dog, fill).await.unwrap().unwrap();
        assert_eq!((version_of(&fetched.image), fetched.hit), (2, true));
        assert_eq!(cache.stats().invalidations, 1);
        cluster.stop().await;
    });
}

/// A fill that reads the source, then waits for `release` before returning what it read.
async fn held_fill(
    source: &AtomicU64,
    read: oneshot::Sender<u64>,
    release: &Notify,
) -> Result<Option<CachedImage>, Infallible> {
    let version = source.load(Ordering::SeqCst);
    let _ = read.send(version);
    release.notified().await;
    Ok(Some(versioned(version)))
}

#[test]
fn a_fill_that_read_the_old_image_does_not_store_it_after_invalidate() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let source = Arc::new(AtomicU64::new(1));
        let release = Arc::new(Notify::new());
        let (read_tx, read_rx) = oneshot::channel();
        let reader = {
            let (cache, source, release) = (cache.clone(), source.clone(), release.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fill(&key("bird"), || held_fill(&source, read_tx, &release))
                    .await
            })
        };
        assert_eq!(read_rx.await.unwrap(), 1, "the reader read the old image");

        // The upload: commit, invalidate, acknowledge.
        source.store(2, Ordering::SeqCst);
        cache.invalidate(&key("bird")).await.unwrap();

        // A reader arriving now does not join the stale fill: it fills anew.
        let fresh = cache
            .get_or_fill(&key("bird"), || async {
                Ok::<_, Infallible>(Some(versioned(source.load(Ordering::SeqCst))))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(version_of(&fresh.image), 2);

        release.notify_one();
        // The old reader started before the upload returned, so the old image is a fair answer
        // for it; what matters is that it is not stored.
        let stale = reader.await.unwrap().unwrap().unwrap();
        assert_eq!(version_of(&stale.image), 1);
        assert!(matches!(
            raw(&cache, &key("bird")).await,
            Some(Envelope::Tombstone(_))
        ));
        // Neither result was offered to the pool: the stale one was detached by the
        // invalidation, the fresh one began on the tombstone.
        let stats = cache.stats();
        assert_eq!((stats.discarded, stats.refused), (2, 0), "{stats:?}");
        cluster.stop().await;
    });
}

/// Server A's reader reads version 1 and holds; server B commits version 2 and runs
/// `invalidate` (or, for the contrast, a plain delete); then A's reader stores.
async fn stale_fill_from_another_server(plain_delete: bool) -> (Option<Envelope>, u64) {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cache(&cluster, config()), cache(&cluster, config()));
    let fish = key("fish");
    let fill = |source: &AtomicU64| {
        let version = source.load(Ordering::SeqCst);
        async move { Ok::<_, Infallible>(Some(versioned(version))) }
    };
    let source = Arc::new(AtomicU64::new(1));
    ok(b.get_or_fill(&fish, || fill(&source)).await, "first fill");

    let release = Arc::new(Notify::new());
    let (read_tx, read_rx) = oneshot::channel();
    ok(a.pool().delete(a.pool_key(&fish)).await, "delete"); // A must miss
    let reader = {
        let (a, source, release, fish) = (a.clone(), source.clone(), release.clone(), fish.clone());
        tokio::spawn(async move {
            a.get_or_fill(&fish, || held_fill(&source, read_tx, &release))
                .await
        })
    };
    assert_eq!(ok(read_rx.await, "read"), 1);
    source.store(2, Ordering::SeqCst);
    if plain_delete {
        ok(b.pool().delete(b.pool_key(&fish)).await, "delete");
    } else {
        ok(b.invalidate(&fish).await, "invalidate");
    }
    release.notify_one();
    ok(ok(reader.await, "reader"), "stale fill");
    let refused = a.stats().refused;
    let left = raw(&b, &fish).await;
    cluster.stop().await;
    (left, refused)
}

#[test]
fn another_servers_stale_fill_is_refused_by_the_tombstone() {
    run(async {
        let (left, refused) = stale_fill_from_another_server(false).await;
        assert!(matches!(left, Some(Envelope::Tombstone(_))), "{left:?}");
        assert_eq!(refused, 1);
    });
}

#[test]
fn contrast_a_plain_delete_lets_the_stale_fill_back_in() {
    run(async {
        // The race the tombstone exists for is real: with a delete, version 1 is cached again
        // after the writer was done, and every hit would serve it.
        let (left, refused) = stale_fill_from_another_server(true).await;
        assert_eq!(left, Some(Envelope::Image(versioned(1))));
        assert_eq!(refused, 0);
    });
}

#[test]
fn a_reader_does_not_join_a_fill_that_predates_another_servers_invalidation() {
    run(async {
        let cluster = Cluster::start(2).await;
        let (a, b) = (cache(&cluster, config()), cache(&cluster, config()));
        let eel = key("eel");
        let source = Arc::new(AtomicU64::new(1));
        let release = Arc::new(Notify::new());
        let (read_tx, read_rx) = oneshot::channel();
        let early = {
            let (b, source, release, eel) =
                (b.clone(), source.clone(), release.clone(), eel.clone());
            tokio::spawn(async move {
                b.get_or_fill(&eel, || held_fill(&source, read_tx, &release))
                    .await
            })
        };
        assert_eq!(read_rx.await.unwrap(), 1);

        // Server A takes the upload; server B's running fill knows nothing of it.
        source.store(2, Ordering::SeqCst);
        a.invalidate(&eel).await.unwrap();
        assert_eq!(b.fills_in_flight(), 1);

        // A reader on B after the upload returned finds A's tombstone and fills anew.
        let late = b
            .get_or_fill(&eel, || async {
                Ok::<_, Infallible>(Some(versioned(source.load(Ordering::SeqCst))))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(version_of(&late.image), 2);
        assert_eq!(b.stats().collapsed, 0);

        release.notify_one();
        let early = early.await.unwrap().unwrap().unwrap();
        assert_eq!(version_of(&early.image), 1);
        assert!(matches!(raw(&b, &eel).await, Some(Envelope::Tombstone(_))));
        cluster.stop().await;
    });
}

/// Readers on two servers hammer one key while a writer commits new versions and
/// invalidates through either server. Every read that starts after an invalidation
/// returned must see that version or a newer one, and so must the pool's entry. Rounds wait
/// for the value to be cached again (tombstone expired), so that invalidations race hits
/// and stores, not only fills.
#[test]
fn invalidate_racing_fills_never_leaves_the_old_image_readable() {
    run(async {
        let cluster = Cluster::start(2).await;
        let config = CacheConfig {
            store_deadline: Duration::from_millis(300),
            tombstone_ttl_secs: 4,
            ..CacheConfig::default()
        };
        let servers = [cache(&cluster, config.clone()), cache(&cluster, config)];
        let race = key("race");
        let source = Arc::new(AtomicU64::new(1));
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));

        let mut readers = Vec::new();
        for i in 0..6 {
            let cache = servers[i % 2].clone();
            let (source, committed, stop, reads, race) = (
                source.clone(),
                committed.clone(),
                stop.clone(),
                reads.clone(),
                race.clone(),
            );
            readers.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let floor = committed.load(Ordering::SeqCst);
                    let fetched = cache
                        .get_or_fill(&race, || async {
                            let version = source.load(Ordering::SeqCst);
                            // Widen the window between reading the store and storing the result.
                            let pause = rand::rng().random_range(0..3000);
                            tokio::time::sleep(Duration::from_micros(pause)).await;
                            Ok::<_, Infallible>(Some(versioned(version)))
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    let seen = version_of(&fetched.image);
                    assert!(
                        seen >= floor,
                        "read version {seen} (hit: {}) after version {floor} was committed and \
                     invalidated",
                        fetched.hit
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }

        let mut version = 1;
        let mut hits_raced = 0;
        for _round in 0..2 {
            // Wait until the current version is cached, so the next invalidation races hits.
            let observer = &servers[0];
            poll(|| async {
            matches!(raw(observer, &race).await, Some(Envelope::Image(image)) if version_of(&image) == version)
        })
        .await;
            hits_raced += 1;
            for _ in 0..15 {
                version += 1;
                source.store(version, Ordering::SeqCst);
                let writer = &servers[version as usize % 2];
                writer.invalidate(&race).await.unwrap();
                committed.store(version, Ordering::SeqCst);
                // The pool never holds an older image once the invalidation returned.
                if let Some(Envelope::Image(image)) = raw(writer, &race).await {
                    assert!(version_of(&image) >= version);
                }
                let pause = rand::rng().random_range(0..20);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        stop.store(true, Ordering::SeqCst);
        for reader in readers {
            reader.await.unwrap();
        }
        // After the dust settles, the last version is what gets cached.
        let last = committed.load(Ordering::SeqCst);
        let reader = &servers[1];
        poll(|| async {
            let fetched = reader
                .get_or_fill(&race, || async {
                    Ok::<_, Infallible>(Some(versioned(last)))
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(version_of(&fetched.image), last);
            fetched.hit
        })
        .await;
        let stats: Vec<_> = servers.iter().map(|s| s.stats()).collect();
        let total =
            |f: fn(&cachepool_web::cache::CacheStats) -> u64| stats.iter().map(f).sum::<u64>();
        eprintln!(
            "hammer: {} reads, {hits_raced} rounds, 30 invalidations; hits {}, fills {}, \
         collapsed {}, stored {}, refused {}, discarded {}",
            reads.load(Ordering::Relaxed),
            total(|s| s.hits),
            total(|s| s.fills),
            total(|s| s.collapsed),
            total(|s| s.stored),
            total(|s| s.refused),
            total(|s| s.discarded),
        );
        assert!(total(|s| s.hits) > 0 && total(|s| s.refused) + total(|s| s.discarded) > 0);
        cluster.stop().await;
    });
}

#[test]
fn with_the_pool_down_fills_are_still_served_and_failures_counted() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        let fill = || async { Ok::<_, Infallible>(Some(image("still here"))) };
        cache.get_or_fill(&key("warm"), fill).await.unwrap();
        cluster.stop().await;

        for name in ["warm", "cold"] {
            let started = Instant::now();
            let fetched = cache.get_or_fill(&key(name), fill).await.unwrap().unwrap();
            assert_eq!(fetched.image, image("still here"));
            assert!(!fetched.hit);
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{name}: took {:?}",
                started.elapsed()
            );
        }
        let stats = cache.stats();
        assert_eq!(stats.fills, 3, "{stats:?}");
        assert!(
            stats.pool_errors >= 2,
            "the failed stores are counted: {stats:?}"
        );

        let err = cache.invalidate(&key("warm")).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the cache could not be invalidated for image \"warm\" ("),
            "{err}"
        );
        assert!(
            err.to_string()
                .ends_with("may be served from the cache for up to 3600 s")
        );
    });
}

#[test]
fn garbage_in_the_pool_is_a_miss_not_an_image() {
    run(async {
        let cluster = Cluster::start(1).await;
        let cache = cache(&cluster, config());
        let junk = key("junk");
        // Anything on the open data port can write under an image's key.
        cache
            .pool()
            .set(
                cache.pool_key(&junk),
                b"HTTP/1.1 200 OK\r\n\r\n<script>",
                0,
                0,
            )
            .await
            .unwrap();
        let fetched = cache
            .get_or_fill(&junk, || async { Ok::<_, Infallible>(Some(image("real"))) })
            .await
            .unwrap()
            .unwrap();
        assert_eq!((fetched.image, fetched.hit), (image("real"), false));
        let stats = cache.stats();
        // Left in place (deleting it could remove a tombstone), so the store is refused.
        assert_eq!((stats.corrupt, stats.refused), (1, 1), "{stats:?}");
        // An invalidation replaces it.
        cache.invalidate(&junk).await.unwrap();
        assert!(matches!(
            raw(&cache, &junk).await,
            Some(Envelope::Tombstone(_))
        ));
        cluster.stop().await;
    });
}

#[test]
fn a_fill_slower_than_the_store_deadline_is_served_but_not_stored() {
    run(async {
        let cluster = Cluster::start(1).await;
        let config = CacheConfig {
            store_deadline: Duration::from_millis(100),
            tombstone_ttl_secs: 4,
            ..CacheConfig::default()
        };
        let cache = cache(&cluster, config);
        let fetched = cache
            .get_or_fill(&key("slow"), || async {
                // The behaviour under test is the deadline itself, hence a real delay.
                tokio::time::sleep(Duration::from_millis(250)).await;
                Ok::<_, Infallible>(Some(image("late")))
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched.image, image("late"));
        assert_eq!(raw(&cache, &key("slow")).await, None);
        assert_eq!(cache.stats().discarded, 1);
        cluster.stop().await;
    });
}

#[test]
fn invalidate_all_empties_the_pool_and_detaches_running_fills() {
    run(async {
        let cluster = Cluster::start(2).await;
        let cache = cache(&cluster, config());
        for name in ["one", "two"] {
            cache
                .get_or_fill(&key(name), || async {
                    Ok::<_, Infallible>(Some(image(name)))
                })
                .await
                .unwrap();
        }
        let release = Arc::new(Notify::new());
        let (read_tx, read_rx) = oneshot::channel();
        let source = Arc::new(AtomicU64::new(7));
        let reader = {
            let (cache, source, release) = (cache.clone(), source.clone(), release.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fill(&key("three"), || held_fill(&source, read_tx, &release))
                    .await
            })
        };
        read_rx.await.unwrap();
        cache.invalidate_all().await.unwrap();
        assert_eq!(cache.fills_in_flight(), 0);
        release.notify_one();
        reader.await.unwrap().unwrap();
        for name in ["one", "two", "three"] {
            assert_eq!(raw(&cache, &key(name)).await, None, "{name}");
        }
        assert_eq!(cache.stats().discarded, 1);
        cluster.stop().await;
    });
}
