//! Differential conformance against Debian's memcached 1.6: the same bytes go to a node and
//! to a real `memcached` on a free loopback port (stopped when the test ends), and the answers
//! must match, except for the differences `docs/memcached.md` lists, which are asserted here
//! as the node's own answers.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cache_node::NodeConfig;
use cache_node::store::Policy;

use crate::support::{Client, eventually, show, start_with};

/// A memcached child process, killed and reaped on drop.
struct Memcached {
    child: Child,
    addr: SocketAddr,
}

impl Memcached {
    /// memcached with its defaults (64 MiB, `-I 1m`) on loopback; retried if another process
    /// takes the free port between our probe and memcached's bind.
    async fn start() -> Memcached {
        for _ in 0..5 {
            let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(a) => a.port(),
                Err(err) => panic!("no free loopback port: {err}"),
            };
            let mut cmd = Command::new("memcached");
            cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                // memcached refuses to run as root unless told which user to be.
                cmd.args(["-u", "root"]);
            }
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(err) => panic!(
                    "cannot start memcached ({err}): run scripts/test, which installs Debian's \
                     memcached, before the test suite"
                ),
            };
            let mut server = Memcached {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                if answers_version(server.addr).await {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = server.child.kill();
        }
        panic!("memcached did not start on a free loopback port in 5 attempts");
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn answers_version(addr: SocketAddr) -> bool {
    let attempt = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"version\r\n").await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].starts_with(b"VERSION "))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

/// A node configured as a bare `cachepool node` is: memcached's 1 MiB item size limit.
async fn bare_node() -> cache_node::Node {
    let mut config = NodeConfig::ephemeral(64, Policy::Lru, None);
    config.max_item_size = None;
    config.max_item_size_kib = 1024;
    start_with(config).await
}

/// Sends `request` followed by `version`, and returns everything answered before VERSION.
async fn answer(c: &mut Client, request: &[u8]) -> String {
    let mut req = request.to_vec();
    req.extend_from_slice(b"version\r\n");
    c.send(req).await;
    let text = show(&c.read_until(b"VERSION ").await);
    c.line().await;
    text.trim_end_matches("VERSION ").to_string()
}

/// Both servers' answers to `request`, on connections `n` and `m`.
async fn both(n: &mut Client, m: &mut Client, request: &str) -> (String, String) {
    (
        answer(n, request.as_bytes()).await,
        answer(m, request.as_bytes()).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_parsed_as_memcached_parses_them() {
    let (node, mc) = (bare_node().await, Memcached::start().await);
    let (mut n, mut m) = (
        Client::connect(node.addr).await,
        Client::connect(mc.addr).await,
    );
    let setup = "set n 0 0 1\r\n5\r\nset t 0 0 1\r\nt\r\n";
    assert_eq!(both(&mut n, &mut m, setup).await.0, "STORED\r\nSTORED\r\n");
    // Every line here gets the same answer from both: trailing garbage and signs refused with
    // the command's own error, a leading `+` and leading zeros taken, extra tokens ignored
    // where memcached ignores them.
    let same = [
        "verbosity 1\r\n",
        "verbosity 1x\r\n",
        "verbosity -1\r\n",
        "verbosity +1\r\n",
        "verbosity 99999999999999999999\r\n",
        "verbosity 1 2\r\n",
        "verbosity x noreply\r\n",
        "verbosity\r\n",
        "verbosity 1 2 3\r\n",
        "touch t 1x\r\n",
        "touch t +500\r\n",
        "touch t 500 foo\r\n",
        "touch t x noreply\r\n",
        "touch t\r\n",
        "incr n 1x\r\n",
        "incr n -1\r\n",
        "incr n +1\r\n",
        "incr n 01\r\n",
        "decr n 0x1\r\n",
        "incr n 18446744073709551616\r\n",
        "incr n 1 foo\r\n",
        "incr n 1 2 3\r\n",
        "incr n x noreply\r\n",
        "gat 1x t\r\n",
        "gats x t\r\n",
        "gat +500 nokey\r\n",
        "gat -1 nokey\r\n",
        "gat 500\r\n",
        "gat\r\n",
        "delete t 1\r\n",
        "delete t 00\r\n",
        "delete t x noreply\r\n",
        "cache_memlimit 64x\r\n",
        "cache_memlimit -1\r\n",
        "cache_memlimit 0\r\n",
        "cache_memlimit 7\r\n",
        "cache_memlimit x noreply\r\n",
        "cache_memlimit +64\r\n",
        "mg t T1x v\r\n",
        "mg t T\r\n",
        "md t C1x\r\n",
        "md t C\r\n",
        "md t C-1\r\n",
        "ms t 1 F1x\r\na\r\n",
        "ms t 1 F-1\r\na\r\n",
        "ms t 1 F\r\na\r\n",
        "ms t 1 T1x\r\na\r\n",
        "ms t 1 T\r\na\r\n",
        "ms t 1 C1x\r\na\r\n",
        "ms t 1 C-1\r\na\r\n",
        "ms t 1 C18446744073709551616\r\na\r\n",
        "ms t 1 F+1 T+500\r\na\r\n",
        "ms t +1\r\na\r\n",
        "set s +1 +500 +1\r\na\r\n",
        "cas s 0 0 1 +1\r\na\r\n",
        "set s 0 0 1 foo\r\na\r\n",
        "get n s\r\n",
        "verbosity noreply\r\n",
        "mg t T+5 v\r\n",
        "md nokey C+5\r\n",
        "touch t 1 noreply\r\n",
        "flush_all noreply 5\r\n",
        "stats detail on x\r\n",
        // Last: these empty the cache.
        "flush_all 0x\r\n",
        "flush_all x noreply\r\n",
        "flush_all 1 2 3\r\n",
        "flush_all +0\r\n",
        "get n s t\r\n",
        "set n 0 0 1\r\n5\r\nflush_all 0 2\r\n",
        "set n 0 0 1\r\n5\r\nflush_all -1 noreply\r\n",
    ];
    for request in same {
        let (node_says, memcached_says) = both(&mut n, &mut m, request).await;
        assert_eq!(node_says, memcached_says, "{request:?}");
    }
    // Bad numbers in a storage command line: the same error, but the node also skips the data
    // block where memcached runs it as a command (and answers ERROR to it).
    for request in [
        "set s 1x 0 1\r\na\r\n",
        "set s -1 0 1\r\na\r\n",
        "set s 0 1x 1\r\na\r\n",
        "cas s 0 0 1 1x\r\na\r\n",
        "cas s 0 0 1 -1\r\na\r\n",
        "cas s 0 0 1 18446744073709551616\r\na\r\n",
    ] {
        let (node_says, memcached_says) = both(&mut n, &mut m, request).await;
        assert_eq!(
            memcached_says, "CLIENT_ERROR bad command line format\r\nERROR\r\n",
            "{request:?}"
        );
        assert_eq!(
            node_says, "CLIENT_ERROR bad command line format\r\n",
            "{request:?}"
        );
    }
    // A length memcached refuses is refused by both, and neither can skip data it cannot size.
    for request in [
        "set s 0 0 1x\r\n",
        "set s 0 0 -1\r\n",
        "ms s 1x\r\n",
        "ms s -1\r\n",
    ] {
        let (node_says, memcached_says) = both(&mut n, &mut m, request).await;
        assert_eq!(node_says, memcached_says, "{request:?}");
        assert_eq!(node_says, "CLIENT_ERROR bad command line format\r\n");
    }
    // Numbers too large for their 32-bit field: memcached 1.6 truncates them silently (a
    // different exptime, flags or level than the client sent); the node refuses them with the
    // error that field gets for garbage.
    for (request, node_expects) in [
        (
            "verbosity 4294967296\r\n",
            "CLIENT_ERROR bad command line format\r\n",
        ),
        (
            "flush_all 99999999999\r\n",
            "CLIENT_ERROR invalid exptime argument\r\n",
        ),
        (
            "touch t 2147483648\r\n",
            "CLIENT_ERROR invalid exptime argument\r\n",
        ),
        (
            "gat 99999999999 t\r\n",
            "CLIENT_ERROR invalid exptime argument\r\n",
        ),
        (
            "mg t T99999999999\r\n",
            "CLIENT_ERROR bad token in command line format\r\n",
        ),
        (
            "ms t 1 F4294967296\r\na\r\n",
            "CLIENT_ERROR bad command line format\r\n",
        ),
        (
            "set s 4294967296 0 1\r\na\r\n",
            "CLIENT_ERROR bad command line format\r\n",
        ),
        (
            "set s 0 99999999999 1\r\na\r\n",
            "CLIENT_ERROR bad command line format\r\n",
        ),
    ] {
        let (node_says, memcached_says) = both(&mut n, &mut m, request).await;
        assert!(
            !memcached_says.contains("ERROR"),
            "memcached now refuses {request:?} ({memcached_says:?}): drop the difference"
        );
        assert_eq!(node_says, node_expects, "{request:?}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_node_refuses_items_over_one_mib_as_memcached_does() {
    let (node, mc) = (bare_node().await, Memcached::start().await);
    let (mut n, mut m) = (
        Client::connect(node.addr).await,
        Client::connect(mc.addr).await,
    );
    // (command line, data length): each oversized but for the last.
    let cases = [
        // A value of exactly 1 MiB is too large with its key and header, in both.
        ("set old 0 0 1048576", 1 << 20),
        ("set old 0 0 2097152", 2 << 20),
        ("set old 0 0 2097152 noreply", 2 << 20),
        ("add old 0 0 2097152", 2 << 20),
        ("replace old 0 0 2097152", 2 << 20),
        ("append old 0 0 2097152", 2 << 20),
        ("cas old 0 0 2097152 1", 2 << 20),
        ("ms old 2097152", 2 << 20),
        ("ms old 2097152 MA", 2 << 20),
        ("set old 0 0 1000000", 1_000_000),
    ];
    for (line, len) in cases {
        // The old value first, then the command, then a read: the same answers, the data
        // swallowed (the read still runs), and the old value kept or dropped alike.
        let mut req = format!("set old 0 0 3\r\nold\r\n{line}\r\n").into_bytes();
        req.extend(std::iter::repeat_n(b'v', len));
        req.extend_from_slice(b"\r\nmg old s\r\n");
        let node_says = answer(&mut n, &req).await;
        let memcached_says = answer(&mut m, &req).await;
        assert_eq!(node_says, memcached_says, "{line}");
    }
    // An append that would grow an item past the limit is not stored, in both.
    let half = vec![b'h'; 700_000];
    let mut req = format!("set grow 0 0 {}\r\n", half.len()).into_bytes();
    req.extend_from_slice(&half);
    req.extend_from_slice(format!("\r\nappend grow 0 0 {}\r\n", half.len()).as_bytes());
    req.extend_from_slice(&half);
    req.extend_from_slice(b"\r\nmg grow s\r\n");
    let node_says = answer(&mut n, &req).await;
    assert_eq!(node_says, answer(&mut m, &req).await);
    assert_eq!(node_says, "STORED\r\nNOT_STORED\r\nHD s700000\r\n");
    let (settings_n, settings_m) = (
        n.stats_of("stats settings").await,
        m.stats_of("stats settings").await,
    );
    assert_eq!(settings_n["item_size_max"], settings_m["item_size_max"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_lines_close_the_connection_without_a_reply() {
    let (node, mc) = (bare_node().await, Memcached::start().await);
    for request in [
        "GET / HTTP/1.0\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        "PUT /x HTTP/1.1\r\n",
        "DELETE /x HTTP/1.1\r\n",
        "HEAD / HTTP/1.1\r\n",
        "OPTIONS * HTTP/1.1\r\n",
        "PATCH /x HTTP/1.1\r\n",
        "CONNECT a:1 HTTP/1.1\r\n",
        // After a command in the same packet: even that command's answer is dropped.
        "version\r\nGET / HTTP/1.0\r\n",
    ] {
        for (server, addr) in [("node", node.addr), ("memcached", mc.addr)] {
            let mut c = Client::connect(addr).await;
            c.send(request).await;
            let (got, closed) = c.read_to_close(Duration::from_secs(5)).await;
            assert!(
                got.is_empty() && closed,
                "{server} answered {:?} to {request:?} (closed: {closed})",
                show(&got)
            );
        }
    }
    // A known command that happens to end in HTTP/1.x is still that command, in both.
    let (mut n, mut m) = (
        Client::connect(node.addr).await,
        Client::connect(mc.addr).await,
    );
    for request in ["get / HTTP/1.0\r\n", "GET /\r\n", "stats HTTP/1.1\r\n"] {
        let (node_says, memcached_says) = both(&mut n, &mut m, request).await;
        assert_eq!(node_says, memcached_says, "{request:?}");
    }
    node.shutdown().await;
}

/// The field names of a stats answer with class or descriptor numbers taken out
/// (`items:3:number` → `items:N:number`), so servers with different classes compare.
fn shapes(stats: &std::collections::HashMap<String, String>) -> BTreeSet<String> {
    stats
        .keys()
        .map(|k| {
            k.split(':')
                .map(|part| {
                    if part.bytes().all(|b| b.is_ascii_digit()) {
                        "N"
                    } else {
                        part
                    }
                })
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect()
}

fn all_numeric(stats: &std::collections::HashMap<String, String>, what: &str) {
    for (k, v) in stats {
        assert!(
            v.parse::<u64>().is_ok(),
            "{what}: {k} = {v:?} is not a number"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stats_form_answers_in_memcached_format() {
    let (node, mc) = (bare_node().await, Memcached::start().await);
    let (mut n, mut m) = (
        Client::connect(node.addr).await,
        Client::connect(mc.addr).await,
    );
    // An idle second connection, for `stats conns`.
    let (_idle_n, _idle_m) = (
        Client::connect(node.addr).await,
        Client::connect(mc.addr).await,
    );
    let fill = "set a 0 0 1\r\n1\r\nset pre:b 0 0 100\r\n0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789\r\n";
    assert_eq!(both(&mut n, &mut m, fill).await.0, "STORED\r\nSTORED\r\n");

    for form in ["stats items", "stats slabs"] {
        let (sn, sm) = (n.stats_of(form).await, m.stats_of(form).await);
        assert_eq!(shapes(&sn), shapes(&sm), "{form}: the same fields");
        all_numeric(&sn, form);
    }
    let items = n.stats_of("stats items").await;
    let number: u64 = items
        .iter()
        .filter(|(k, _)| k.ends_with(":number"))
        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
        .sum();
    assert_eq!(number, 2, "stats items counts every item once: {items:?}");
    let slabs = n.stats_of("stats slabs").await;
    assert_eq!(slabs["active_slabs"], "2", "{slabs:?}");

    // stats conns: the listener and both connections, the asker parsing, as memcached shows.
    for c in [&mut n, &mut m] {
        let conns = c.stats_of("stats conns").await;
        let states: Vec<&str> = conns
            .iter()
            .filter(|(k, _)| k.ends_with(":state"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(states.iter().filter(|s| **s == "conn_listening").count(), 1);
        assert_eq!(states.iter().filter(|s| **s == "conn_parse_cmd").count(), 1);
        assert!(states.len() >= 3, "{conns:?}");
        assert!(
            conns
                .iter()
                .any(|(k, v)| k.ends_with(":addr") && v.starts_with("tcp:127.0.0.1:"))
        );
    }
    let (cn, cm) = (
        n.stats_of("stats conns").await,
        m.stats_of("stats conns").await,
    );
    assert_eq!(shapes(&cn), shapes(&cm));

    // stats cachedump of the class holding `a`: the same line in both (memcached lists a
    // new item once its LRU maintainer has moved it, so poll).
    let class_of = |items: &std::collections::HashMap<String, String>| {
        let mut classes: Vec<u32> = items
            .keys()
            .filter(|k| k.ends_with(":number"))
            .filter_map(|k| k.split(':').nth(1)?.parse().ok())
            .collect();
        classes.sort_unstable();
        classes[0]
    };
    let node_class = class_of(&n.stats_of("stats items").await);
    let (dump, _) = both(
        &mut n,
        &mut m,
        &format!("stats cachedump {node_class} 0\r\n"),
    )
    .await;
    assert_eq!(dump, "ITEM a [1 b; 0 s]\r\nEND\r\n");
    let mc_class = class_of(&m.stats_of("stats items").await);
    let mc_addr = mc.addr;
    eventually(
        Duration::from_secs(10),
        "memcached's cachedump lists a",
        || async move {
            let mut c = Client::connect(mc_addr).await;
            answer(
                &mut c,
                format!("stats cachedump {mc_class} 0\r\n").as_bytes(),
            )
            .await
                == "ITEM a [1 b; 0 s]\r\nEND\r\n"
        },
    )
    .await;

    // Forms whose answers do not depend on the server's layout: byte for byte the same.
    for form in [
        "stats cachedump 1\r\n",
        "stats cachedump x 1\r\n",
        "stats cachedump 1 -1\r\n",
        "stats cachedump 300 1\r\n",
        "stats detail\r\n",
        "stats detail foo\r\n",
        "stats detail on\r\nget pre:b pre:c\r\nset pre:d 0 0 1\r\n1\r\ndelete pre:e\r\nget nokey\r\nstats detail off\r\nstats detail dump\r\n",
        "stats sizes\r\n",
        "stats extstore\r\n",
        "stats reset\r\n",
        "stats reset now\r\n",
        "stats bogus\r\n",
        "stats\tfoo\r\n",
    ] {
        let (node_says, memcached_says) = both(&mut n, &mut m, form).await;
        assert_eq!(node_says, memcached_says, "{form:?}");
    }
    // stats sizes: memcached's shape once enabled. memcached omits END after
    // sizes_enable/sizes_disable; the node sends it, so stats readers do not hang.
    let (node_says, memcached_says) = both(&mut n, &mut m, "stats sizes_enable\r\n").await;
    assert_eq!(memcached_says, "STAT sizes_status enabled\r\n");
    assert_eq!(node_says, "STAT sizes_status enabled\r\nEND\r\n");
    // memcached counts items stored after sizes_enable.
    let (stored, _) = both(&mut n, &mut m, "set z 0 0 1\r\nz\r\n").await;
    assert_eq!(stored, "STORED\r\n");
    let (sn, sm) = (
        n.stats_of("stats sizes").await,
        m.stats_of("stats sizes").await,
    );
    all_numeric(&sn, "stats sizes");
    assert!(!sn.is_empty() && !sm.is_empty(), "{sn:?} {sm:?}");
    let (settings_n, settings_m) = (
        n.stats_of("stats settings").await,
        m.stats_of("stats settings").await,
    );
    for field in [
        "detail_enabled",
        "track_sizes",
        "cas_enabled",
        "item_size_max",
    ] {
        assert_eq!(settings_n.get(field), settings_m.get(field), "{field}");
    }
    node.shutdown().await;
}
