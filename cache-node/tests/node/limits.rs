//! Limits under load: the largest item, the byte capacity, many connections, and the
//! connection cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache_node::NodeConfig;
use cache_node::store::Policy;
use tokio::task::JoinSet;

use crate::support::{Client, eventually, show, start_node, start_with, stat};

const MAX_ITEM: usize = 16 << 20;

/// The longest value under `key` that fits MAX_ITEM: the limit counts the whole item (the
/// node's header and the key too), as memcached's `-I` does.
fn largest_value(key: &str) -> usize {
    MAX_ITEM - cache_node::protocol::item_size(key.len(), 0)
}

fn pattern(len: usize) -> Vec<u8> {
    // A period that is not a power of two, so a misplaced chunk changes the bytes.
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn set_request(key: &str, value: &[u8]) -> Vec<u8> {
    let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_of_exactly_the_16_mib_max_item_size_is_stored_and_read_back() {
    let node = start_node(64).await;
    let mut c = Client::connect(node.addr).await;
    let value = pattern(largest_value("big"));
    c.set("big", &value).await;
    let got = c.get("big").await;
    assert!(
        got.as_deref() == Some(&value[..]),
        "16 MiB value came back different (len {:?})",
        got.map(|v| v.len())
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_one_byte_over_the_max_item_size_is_too_large_and_its_data_swallowed() {
    let node = start_node(64).await;
    let mut c = Client::connect(node.addr).await;
    let mut req = set_request("big", &pattern(largest_value("big") + 1));
    // The next command on the same connection must run, not be eaten or mistaken for data.
    req.extend_from_slice(b"set after 0 0 1\r\na\r\nget big after\r\n");
    c.ask(
        req,
        "SERVER_ERROR object too large for cache\r\nSTORED\r\nVALUE after 0 1\r\na\r\nEND\r\n",
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_set_removes_the_previous_value_as_memcached_does() {
    let node = start_node(64).await;
    let mut c = Client::connect(node.addr).await;
    c.set("k", b"old").await;
    // memcached 1.6 unlinks the key when a set is refused as too large, so readers never see a
    // value the client believes it replaced. A refused add leaves the item alone.
    let mut req = set_request("k", &pattern(largest_value("k") + 1));
    req.extend_from_slice(b"get k\r\n");
    c.ask(req, "SERVER_ERROR object too large for cache\r\nEND\r\n")
        .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_node_under_ten_mib_of_writes_stays_within_its_limit_and_evicts() {
    let node = start_node(1).await;
    let limit = 1u64 << 20;
    let stop = Arc::new(AtomicBool::new(false));
    // A watcher reads `stats` throughout, so a transient overshoot is caught, not only the end
    // state.
    let watcher = {
        let stop = stop.clone();
        let mut c = Client::connect(node.addr).await;
        tokio::spawn(async move {
            let mut worst = 0;
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                let stats = c.stats().await;
                assert_eq!(stat(&stats, "limit_maxbytes"), limit);
                worst = worst.max(stat(&stats, "bytes"));
                samples += 1;
            }
            (worst, samples)
        })
    };
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let addr = node.addr;
        writers.spawn(async move {
            let mut c = Client::connect(addr).await;
            // 2.5 MiB per writer: mostly 1 KiB items, and every tenth batch a 200 KiB one that
            // must evict across shards.
            for batch in 0..25 {
                let mut req = Vec::new();
                let mut expected = Vec::new();
                for i in 0..100 {
                    req.extend_from_slice(&set_request(
                        &format!("w{w}-{batch}-{i}"),
                        &pattern(1000),
                    ));
                    expected.extend_from_slice(b"STORED\r\n");
                }
                if batch % 10 == 0 {
                    req.extend_from_slice(&set_request(
                        &format!("w{w}-large-{batch}"),
                        &pattern(200 << 10),
                    ));
                    expected.extend_from_slice(b"STORED\r\n");
                }
                c.ask(req, expected).await;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        if let Err(err) = done {
            std::panic::resume_unwind(err.into_panic());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (worst, samples) = match watcher.await {
        Ok(w) => w,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    };
    let mut c = Client::connect(node.addr).await;
    // Still a working cache: a new item is stored and read back.
    c.set("final", b"f").await;
    assert_eq!(c.get("final").await.as_deref(), Some(&b"f"[..]));
    let stats = c.stats().await;
    assert!(samples > 0);
    assert!(
        worst <= limit,
        "bytes reached {worst}, over limit_maxbytes {limit}"
    );
    assert!(stat(&stats, "bytes") <= limit);
    assert!(
        stat(&stats, "evictions") > 0,
        "10 MiB into 1 MiB without an eviction"
    );
    assert!(stat(&stats, "curr_items") < 10_000);
    if let Err(err) = node.shared.store.check_invariants() {
        panic!("store inconsistent after the load: {err}");
    }
    node.shutdown().await;
}

/// Fails with a clear message if this process may not open `needed` descriptors.
fn require_open_files(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit failed");
    assert!(
        limit.rlim_cur >= needed,
        "this test needs {needed} open files, the limit is {}: raise it with `ulimit -n {needed}`",
        limit.rlim_cur
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_concurrent_connections_each_set_and_get() {
    const CONNECTIONS: usize = 1100;
    // Client and server side of each connection live in this process.
    require_open_files(2 * CONNECTIONS as u64 + 200);
    let node = start_node(16).await;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    // Connect in waves below the listen backlog, so no SYN is dropped and retried seconds later.
    for wave in 0..CONNECTIONS / 100 {
        let mut connecting = JoinSet::new();
        for i in 0..100 {
            let addr = node.addr;
            connecting.spawn(async move { (wave * 100 + i, Client::connect(addr).await) });
        }
        while let Some(done) = connecting.join_next().await {
            match done {
                Ok(pair) => clients.push(pair),
                Err(err) => std::panic::resume_unwind(err.into_panic()),
            }
        }
    }
    // Every connection is open at once: the node counts them all.
    let mut probe = Client::connect(node.addr).await;
    assert!(stat(&probe.stats().await, "curr_connections") > CONNECTIONS as u64);
    let mut work = JoinSet::new();
    for (i, mut c) in clients {
        work.spawn(async move {
            let value = format!("value-{i}");
            c.set(&format!("key{i}"), value.as_bytes()).await;
            assert_eq!(
                c.get(&format!("key{i}")).await.map(|v| show(&v)),
                Some(value)
            );
            c
        });
    }
    let mut finished = Vec::with_capacity(CONNECTIONS);
    while let Some(done) = work.join_next().await {
        match done {
            Ok(c) => finished.push(c),
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
    let stats = probe.stats().await;
    assert_eq!(stat(&stats, "curr_items"), CONNECTIONS as u64);
    assert_eq!(stat(&stats, "get_hits"), CONNECTIONS as u64);
    drop(finished);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_get_too_many_open_connections() {
    let config = NodeConfig {
        max_connections: 4,
        ..NodeConfig::ephemeral(16, Policy::Lru, None)
    };
    let node = start_with(config).await;
    let version = format!("VERSION {}\r\n", cache_node::server::VERSION);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(node.addr).await;
        // An answer proves the node accepted and counted the connection.
        c.ask("version\r\n", &version).await;
        open.push(c);
    }
    let mut refused = Client::connect(node.addr).await;
    let (answer, closed) = refused.read_to_close(Duration::from_secs(5)).await;
    assert_eq!(show(&answer), "ERROR Too many open connections\r\n");
    assert!(closed, "a refused connection was left open");
    // The four accepted connections keep working.
    for c in &mut open {
        c.ask("version\r\n", &version).await;
    }
    // Closing one frees its slot.
    drop(open.pop());
    eventually(
        Duration::from_secs(5),
        "a slot freed by a closed connection",
        || async {
            let mut c = Client::connect(node.addr).await;
            c.send("version\r\n").await;
            c.read_n(version.len()).await == version.as_bytes()
        },
    )
    .await;
    let stats = open[0].stats().await;
    assert!(stat(&stats, "rejected_connections") >= 1);
    node.shutdown().await;
}

/// Both schedulings of the data port: connections spread over the worker threads see each
/// other's writes, every one is served, and stopping the node closes them all and (pinned)
/// ends its worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_and_shared_scheduling_serve_every_connection_and_stop_cleanly() {
    use cache_node::server::Scheduling;
    const CONNECTIONS: usize = 8;
    for scheduling in [Scheduling::Pinned, Scheduling::Shared] {
        let mut config = NodeConfig::ephemeral(16, Policy::Lru, None);
        config.threads = 3;
        config.scheduling = scheduling;
        let node = start_with(config).await;
        let shared = node.shared.clone();
        let expected_threads = match scheduling {
            Scheduling::Pinned => 3,
            Scheduling::Shared => 0,
        };
        let mut clients = Vec::new();
        for i in 0..CONNECTIONS {
            let mut c = Client::connect(node.addr).await;
            c.set(&format!("k{i}"), format!("value {i}").as_bytes())
                .await;
            clients.push(c);
        }
        // Round-robin puts neighbours on different threads: each reads the next one's key.
        for (i, c) in clients.iter_mut().enumerate() {
            let j = (i + 1) % CONNECTIONS;
            assert_eq!(
                c.get(&format!("k{j}")).await.as_deref(),
                Some(format!("value {j}").as_bytes()),
                "{scheduling}: connection {i} reading k{j}"
            );
        }
        assert!(stat(&clients[0].stats().await, "curr_connections") >= CONNECTIONS as u64);
        // The data port started its workers before it accepted the first connection.
        assert_eq!(shared.data_threads(), expected_threads, "{scheduling}");
        node.shutdown().await;
        for (i, c) in clients.iter_mut().enumerate() {
            let (_, closed) = c.read_to_close(Duration::from_secs(10)).await;
            assert!(
                closed,
                "{scheduling}: connection {i} still open after shutdown"
            );
        }
        eventually(Duration::from_secs(10), "worker threads to end", || {
            let shared = shared.clone();
            async move { shared.data_threads() == 0 }
        })
        .await;
        assert_eq!(
            shared.stats.curr_connections.load(Ordering::Relaxed),
            0,
            "{scheduling}"
        );
    }
}
