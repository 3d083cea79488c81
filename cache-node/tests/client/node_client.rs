//! `NodeClient` against a real node, and against peers that misbehave on purpose.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cache_node::NodeConfig;
use cache_node::client::{ClientError, ClientOptions, Held, NodeClient};
use cache_node::store::{Now, Policy};

use crate::support::{
    Action, REQUEST_TIMEOUT, SLACK, accepted_by, client, dead_addr, options, scripted,
    silent_listener, start_node, start_with, stop, within,
};

const LIMIT: Duration = Duration::from_secs(5);

fn unix_ms() -> u64 {
    Now::system().ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_binary_values_flags_and_cas() {
    let node = start_node().await;
    let c = client(&node);
    within(LIMIT, async {
        // Every byte value, including \r\n and NUL, must come back as sent.
        let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        c.set("bin", &binary, 0xdead_beef, 0).await.unwrap();
        let got = c.get("bin").await.unwrap().unwrap();
        assert_eq!(got.data, binary);
        assert_eq!(got.flags, 0xdead_beef);

        c.set("empty", b"", 0, 0).await.unwrap();
        assert_eq!(c.get("empty").await.unwrap().unwrap().data.len(), 0);

        // Past the inline limit the body goes out as a vectored write.
        let large: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        c.set("large", &large, 1, 0).await.unwrap();
        assert_eq!(c.get("large").await.unwrap().unwrap().data, large);

        let before = c.get("bin").await.unwrap().unwrap().cas;
        c.set("bin", b"again", 0, 0).await.unwrap();
        assert_ne!(
            c.get("bin").await.unwrap().unwrap().cas,
            before,
            "a set changes the CAS"
        );

        assert!(
            !c.add("bin", b"x", 0, 0).await.unwrap(),
            "add keeps an existing key"
        );
        assert!(c.add("fresh", b"x", 3, 0).await.unwrap());
        assert_eq!(c.get("fresh").await.unwrap().unwrap().flags, 3);

        assert!(c.touch("fresh", 100).await.unwrap());
        assert!(!c.touch("absent", 100).await.unwrap());
        assert!(c.delete("fresh").await.unwrap());
        assert!(!c.delete("fresh").await.unwrap());
        assert_eq!(c.get("fresh").await.unwrap(), None);
    })
    .await;
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_held_reports_remaining_seconds_none_for_items_that_never_expire_and_write_time() {
    let node = start_node().await;
    let c = client(&node);
    within(LIMIT, async {
        let before = unix_ms();
        c.set("ttl", b"v", 9, 100).await.unwrap();
        let after = unix_ms();
        let Held {
            value,
            ttl,
            written_ms,
        } = c.get_held("ttl").await.unwrap().unwrap();
        let written = written_ms.expect("a fresh write's time is known");
        assert!(
            (before..=after).contains(&written),
            "written at {written}, set between {before} and {after}"
        );
        assert_eq!((&value.data[..], value.flags), (&b"v"[..], 9));
        let ttl = ttl.unwrap();
        assert!((99..=100).contains(&ttl), "ttl {ttl}");
        assert_eq!(
            value.cas,
            c.get("ttl").await.unwrap().unwrap().cas,
            "mg and gets agree on CAS"
        );

        c.set("forever", b"v", 0, 0).await.unwrap();
        assert_eq!(c.get_held("forever").await.unwrap().unwrap().ttl, None);

        assert!(c.touch("forever", 50).await.unwrap());
        let ttl = c.get_held("forever").await.unwrap().unwrap().ttl.unwrap();
        assert!((49..=50).contains(&ttl), "ttl after touch {ttl}");

        assert_eq!(c.get_held("missing").await.unwrap(), None);
        assert_eq!(c.cas_of("missing").await.unwrap(), None);
        let cas = c.get("forever").await.unwrap().unwrap().cas;
        assert_eq!(c.cas_of("forever").await.unwrap(), Some(cas));
    })
    .await;
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_flush_all() {
    let node = start_node().await;
    let c = client(&node);
    within(LIMIT, async {
        for i in 0..10 {
            c.set(format!("k{i}"), b"v", 0, 0).await.unwrap();
        }
        let stats = c.stats().await.unwrap();
        assert_eq!(stats["curr_items"], "10");
        assert!(stats.contains_key("version") && stats.contains_key("get_hits"));
        c.flush_all().await.unwrap();
        assert_eq!(c.get("k0").await.unwrap(), None);
        assert_eq!(c.stats().await.unwrap()["cmd_flush"], "1");
    })
    .await;
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_bounded() {
    let node = start_node().await;
    let c = client(&node);
    within(LIMIT, async {
        c.set("k", b"v", 0, 0).await.unwrap();
        for _ in 0..200 {
            assert!(c.get("k").await.unwrap().is_some());
        }
        assert_eq!(
            accepted_by(&node),
            1,
            "sequential requests share one connection"
        );

        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let c = c.clone();
            tasks.spawn(async move { c.get("k").await.map(|v| v.is_some()) });
        }
        while let Some(done) = tasks.join_next().await {
            assert!(done.unwrap().unwrap());
        }
        let limit = options().max_connections_per_node;
        assert!(c.open_connections() <= limit);
        assert!(
            accepted_by(&node) as usize <= limit,
            "accepted {}",
            accepted_by(&node)
        );
    })
    .await;
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_peer_that_never_answers_time_out() {
    let (addr, _peer) = silent_listener().await;
    let c = NodeClient::new(addr.to_string(), options()).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let err = within(REQUEST_TIMEOUT + SLACK, c.get("k"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "get", .. }),
            "{err}"
        );
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
        let err = within(REQUEST_TIMEOUT + SLACK, c.set("k", b"v", 0, 0))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "set", .. }),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_is_never_read_as_the_answer_to_the_next_request() {
    // The first connection answers its first request long after the client gave up; with the
    // connection reused, that stale VALUE would be taken as the next get's answer.
    let (addr, accepted, _peer) = scripted(|conn, _line| {
        if conn == 0 {
            Action::ReplyAfter(
                REQUEST_TIMEOUT * 2,
                b"VALUE k 0 3 1\r\nold\r\nEND\r\n".to_vec(),
            )
        } else {
            Action::Reply(b"END\r\n".to_vec())
        }
    })
    .await;
    let c = NodeClient::new(addr.to_string(), options()).unwrap();
    let err = within(REQUEST_TIMEOUT + SLACK, c.get("k"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert_eq!(within(LIMIT, c.get("k")).await.unwrap(), None);
    tokio::time::sleep(REQUEST_TIMEOUT * 2).await;
    assert_eq!(within(LIMIT, c.get("k")).await.unwrap(), None);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the abandoned connection was not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_reply_is_a_protocol_error_and_costs_the_connection() {
    let (addr, accepted, _peer) = scripted(|conn, line| match (conn, line) {
        (0, _) => Action::Reply(b"STORED\r\n".to_vec()),
        (_, "gets k") => Action::Reply(b"VALUE k 4 2 9\r\nok\r\nEND\r\n".to_vec()),
        _ => Action::Reply(b"ERROR\r\n".to_vec()),
    })
    .await;
    let c = NodeClient::new(addr.to_string(), options()).unwrap();
    let err = within(LIMIT, c.get("k")).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol { .. }), "{err}");
    let value = within(LIMIT, c.get("k")).await.unwrap().unwrap();
    assert_eq!(
        (&value.data[..], value.flags, value.cas),
        (&b"ok"[..], 4, 9)
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let err = within(LIMIT, c.delete("k")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Server { ref message, .. } if message == "ERROR"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_node_closed_is_discarded_and_the_next_request_succeeds() {
    // Every connection answers one request and closes, as a node does when it restarts or
    // drops idle connections: each next request finds its pooled connection dead.
    let (addr, accepted, _peer) =
        scripted(|_, _| Action::ReplyThenClose(b"END\r\n".to_vec())).await;
    let c = NodeClient::new(addr.to_string(), options()).unwrap();
    for _ in 0..5 {
        assert_eq!(within(LIMIT, c.get("k")).await.unwrap(), None);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);

    // The same with a real node: restart it (stop, then a new node on the same port when the
    // port can be had again).
    let node = start_node().await;
    let c = client(&node);
    within(LIMIT, c.set("k", b"v", 0, 0)).await.unwrap();
    let addr = node.addr;
    stop([node]).await;
    let mut config = NodeConfig::ephemeral(16, Policy::Lru, Some("t"));
    config.listen = addr.to_string();
    let Ok(node) = cache_node::Node::start(config).await else {
        // The port was taken in between; the scripted peer above covered the behaviour.
        println!("could not restart the node on {addr}; restart case skipped");
        return;
    };
    assert_eq!(
        within(LIMIT, c.get("k")).await.unwrap(),
        None,
        "a fresh node is empty"
    );
    within(LIMIT, c.set("k", b"w", 0, 0)).await.unwrap();
    assert_eq!(
        &within(LIMIT, c.get("k")).await.unwrap().unwrap().data[..],
        b"w"
    );
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_node_fails_fast() {
    let c = NodeClient::new(dead_addr().await, options()).unwrap();
    let err = within(REQUEST_TIMEOUT + SLACK, c.get("k"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    let err = within(REQUEST_TIMEOUT + SLACK, c.set("k", b"v", 0, 0))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusal_is_a_server_error_and_the_client_goes_on() {
    let mut config = NodeConfig::ephemeral(16, Policy::Lru, Some("t"));
    config.max_item_size_kib = 1;
    let node = start_with(config).await;
    let c = client(&node);
    within(LIMIT, async {
        let err = c.set("big", &[b'x'; 4096], 0, 0).await.unwrap_err();
        assert!(matches!(err, ClientError::Server { ref message, .. } if message.starts_with("SERVER_ERROR")), "{err}");
        c.set("small", b"x", 0, 0).await.unwrap();
        assert!(c.get("small").await.unwrap().is_some());
    })
    .await;
    stop([node]).await;
}

#[tokio::test]
async fn bad_keys_and_arguments_are_rejected_before_anything_is_sent() {
    // Nothing listens there: an attempt to send would fail differently.
    let c = NodeClient::new(dead_addr().await, options()).unwrap();
    for key in [&b""[..], b"has space", b"new\nline", &[b'k'; 251]] {
        assert!(
            matches!(c.get(key).await, Err(ClientError::InvalidKey(_))),
            "{key:?}"
        );
    }
    assert!(
        c.get([b'k'; 250])
            .await
            .is_err_and(|e| matches!(e, ClientError::Connect { .. }))
    );
    assert!(matches!(
        c.set("k", b"v", 0, u32::MAX).await,
        Err(ClientError::InvalidArgument(_))
    ));
    let zero = ClientOptions {
        max_connections_per_node: 0,
        ..options()
    };
    assert!(matches!(
        NodeClient::new("127.0.0.1:1", zero),
        Err(ClientError::Options(_))
    ));
}
