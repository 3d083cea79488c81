//! The admin HTTP API: open probes, bearer-token authorization, live configuration, flush and
//! Prometheus metrics.

use cache_node::NodeConfig;
use cache_node::store::Policy;
use serde_json::json;

use crate::support::{Client, TOKEN, http, start_node, start_with, stat};

const GUARDED: [(&str, &str, Option<&str>); 4] = [
    ("GET", "/stats", None),
    ("GET", "/config", None),
    (
        "PUT",
        "/config",
        Some(r#"{"capacityMiB": 1, "policy": "sieve"}"#),
    ),
    ("POST", "/flush", None),
];

/// Stores `n` items of `value_len` bytes through the memcached port.
async fn fill(client: &mut Client, n: usize, value_len: usize) {
    let value = "v".repeat(value_len);
    let request: String = (0..n)
        .map(|i| format!("set item{i} 0 0 {value_len}\r\n{value}\r\n"))
        .collect();
    client.ask(request, "STORED\r\n".repeat(n)).await;
}

async fn config(node: &cache_node::Node) -> serde_json::Value {
    let answer = http(node.admin_addr, "GET", "/config", Some(TOKEN), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_need_no_token() {
    let node = start_node(16).await;
    let healthz = http(node.admin_addr, "GET", "/healthz", None, None).await;
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
    let readyz = http(node.admin_addr, "GET", "/readyz", None, None).await;
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ready\n"));
    // Prometheus scrapes every pool's nodes with one scrape config, and each pool has its own
    // token: the counters are open, as the operator's are (and as `stats` is on the data port).
    let metrics = http(node.admin_addr, "GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics.body.contains("cachepool_node_items"),
        "{}",
        metrics.body
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_endpoints_answer_401_json_without_a_token() {
    let node = start_node(16).await;
    for (method, path, body) in GUARDED {
        let answer = http(node.admin_addr, method, path, None, body).await;
        assert_eq!(
            answer.status, 401,
            "{method} {path} without a token: {}",
            answer.body
        );
        let error = answer.json();
        assert_eq!(error["error"], "unauthorized", "{method} {path}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{method} {path}: {error}"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_gets_401_and_changes_nothing() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 10, 100).await;
    for (method, path, body) in GUARDED {
        for token in ["wrong-token", "", "test-token-and-more", "test-toke"] {
            let answer = http(node.admin_addr, method, path, Some(token), body).await;
            assert_eq!(
                answer.status, 401,
                "{method} {path} with token {token:?}: {}",
                answer.body
            );
            assert_eq!(answer.json()["error"], "unauthorized");
        }
    }
    let config = config(&node).await;
    assert_eq!(
        (config["capacityMiB"].clone(), config["policy"].clone()),
        (json!(16), json!("lru"))
    );
    assert_eq!(
        stat(&c.stats().await, "curr_items"),
        10,
        "a refused flush or shrink changed the data"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_reads_work_and_changes_get_403() {
    let node = start_with(NodeConfig::ephemeral(16, Policy::Lru, None)).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 10, 100).await;
    for (method, path, body) in GUARDED {
        // A presented token does not help: there is none to match.
        for token in [None, Some(TOKEN)] {
            let answer = http(node.admin_addr, method, path, token, body).await;
            if method == "GET" {
                assert_eq!(answer.status, 200, "{method} {path}: {}", answer.body);
            } else {
                assert_eq!(answer.status, 403, "{method} {path}: {}", answer.body);
                assert_eq!(answer.json()["error"], "forbidden");
            }
        }
    }
    let config = http(node.admin_addr, "GET", "/config", None, None)
        .await
        .json();
    assert_eq!(
        (config["capacityMiB"].clone(), config["policy"].clone()),
        (json!(16), json!("lru"))
    );
    assert_eq!(stat(&c.stats().await, "curr_items"), 10);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_config_capacity_shrinks_the_node_live() {
    let node = start_node(8).await;
    let mut c = Client::connect(node.addr).await;
    // About 4 MiB of items.
    fill(&mut c, 4000, 1000).await;
    let before = c.stats().await;
    assert_eq!(stat(&before, "curr_items"), 4000);
    let answer = http(
        node.admin_addr,
        "PUT",
        "/config",
        Some(TOKEN),
        Some(r#"{"capacityMiB": 1}"#),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["capacityMiB"], 1);
    let after = c.stats().await;
    assert_eq!(stat(&after, "limit_maxbytes"), 1 << 20);
    assert!(
        stat(&after, "bytes") <= 1 << 20,
        "bytes {} over the new limit",
        stat(&after, "bytes")
    );
    assert!(
        stat(&after, "curr_items") < 1100,
        "items not evicted: {}",
        stat(&after, "curr_items")
    );
    assert!(stat(&after, "evictions") >= 2900);
    assert_eq!(config(&node).await["capacityMiB"], 1);
    // The node goes on working at its new size.
    c.set("new", b"n").await;
    assert_eq!(c.get("new").await.as_deref(), Some(&b"n"[..]));
    if let Err(err) = node.shared.store.check_invariants() {
        panic!("store inconsistent after shrinking: {err}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_config_policy_switches_live_keeping_every_item() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 500, 100).await;
    let before = stat(&c.stats().await, "curr_items");
    assert_eq!(before, 500);
    let answer = http(
        node.admin_addr,
        "PUT",
        "/config",
        Some(TOKEN),
        Some(r#"{"policy": "sieve"}"#),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["policy"], "sieve");
    assert_eq!(config(&node).await["policy"], "sieve");
    let stats = c.stats().await;
    assert_eq!(stat(&stats, "curr_items"), before);
    assert_eq!(stats.get("policy").map(String::as_str), Some("sieve"));
    assert_eq!(
        c.stats_of("stats settings")
            .await
            .get("policy")
            .map(String::as_str),
        Some("sieve")
    );
    for i in [0, 250, 499] {
        assert!(
            c.get(&format!("item{i}")).await.is_some(),
            "item{i} lost in the switch"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_config_rejects_invalid_values_with_400_and_changes_nothing() {
    let node = start_node(16).await;
    let cases = [
        (r#"{"policy": "fifo"}"#, Some("policy")),
        (r#"{"capacityMiB": 0}"#, Some("capacityMiB")),
        (r#"{"capacityMiB": 2, "policy": "fifo"}"#, Some("policy")),
        (r#"{"capacityMiB": 2, "bogus": 1}"#, None),
        (r#"{"capacityMiB": "two"}"#, None),
        ("not json", None),
    ];
    for (body, field) in cases {
        let answer = http(node.admin_addr, "PUT", "/config", Some(TOKEN), Some(body)).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        let error = answer.json();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}: {error}"
        );
        if let Some(field) = field {
            assert_eq!(error["field"], field, "{body}: {error}");
        }
    }
    let config = config(&node).await;
    assert_eq!(
        (config["capacityMiB"].clone(), config["policy"].clone()),
        (json!(16), json!("lru"))
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_handoff_rejects_batch_and_window_sizes_out_of_range_and_starts_nothing() {
    let node = start_node(16).await;
    let ring = json!({"epoch": 2, "members": [{"slot": 0, "address": "127.0.0.1:1"}]});
    for (field, value) in [
        ("batchBytes", json!(0)),
        ("maxInFlightBytes", json!(0)),
        ("maxInFlightBytes", json!(1u64 << 40)),
        ("batchBytes", json!((1u64 << 30) + 1)),
    ] {
        let body = json!({"ring": ring, "selfAddress": "127.0.0.1:2", field: value}).to_string();
        let answer = http(
            node.admin_addr,
            "POST",
            "/handoff",
            Some(TOKEN),
            Some(&body),
        )
        .await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.json()["field"], field, "{body}: {}", answer.body);
    }
    let status = http(node.admin_addr, "GET", "/handoff", Some(TOKEN), None).await;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(
        status.json()["state"],
        "idle",
        "nothing started: {}",
        status.body
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_flush_empties_the_node() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 20, 10).await;
    let answer = http(node.admin_addr, "POST", "/flush", Some(TOKEN), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["flushedItems"], 20);
    c.ask("get item0 item19\r\n", "END\r\n").await;
    let stats = c.stats().await;
    assert_eq!((stat(&stats, "curr_items"), stat(&stats, "bytes")), (0, 0));
    assert_eq!(stat(&stats, "cmd_flush"), 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_endpoint_returns_memcached_stats_as_json() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 3, 10).await;
    let answer = http(node.admin_addr, "GET", "/stats", Some(TOKEN), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let stats = answer.json();
    assert_eq!(stats["curr_items"], 3);
    assert_eq!(stats["cmd_set"], 3);
    assert_eq!(stats["limit_maxbytes"], 16 << 20);
    assert!(
        stats["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.6.")),
        "{stats}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_items_commands_and_latency_histograms() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 3, 10).await;
    c.ask("get item0 item1 nokey\r\nget item2\r\n", "VALUE item0 0 10\r\nvvvvvvvvvv\r\nVALUE item1 0 10\r\nvvvvvvvvvv\r\nEND\r\nVALUE item2 0 10\r\nvvvvvvvvvv\r\nEND\r\n")
        .await;
    let answer = http(node.admin_addr, "GET", "/metrics", Some(TOKEN), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let text = answer.body;
    for needle in [
        "cachepool_node_items 3\n",
        // Retrievals count keys, as memcached's cmd_get does.
        "cachepool_node_commands_total{command=\"get\"} 4\n",
        "cachepool_node_commands_total{command=\"set\"} 3\n",
        "# TYPE cachepool_node_command_duration_seconds histogram\n",
        "cachepool_node_command_duration_seconds_count{command=\"get\"} 2\n",
        "cachepool_node_command_duration_seconds_sum{command=\"get\"} ",
        "cachepool_node_command_duration_seconds_count{command=\"set\"} 3\n",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(
        histogram_buckets(&text, "cachepool_node_command_duration_seconds", "get").len() > 1,
        "{text}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_latency_buckets_are_cumulative_and_end_with_plus_inf_equal_to_the_count() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    fill(&mut c, 3, 10).await;
    c.ask(
        "get item0\r\nget nokey\r\n",
        "VALUE item0 0 10\r\nvvvvvvvvvv\r\nEND\r\nEND\r\n",
    )
    .await;
    let answer = http(node.admin_addr, "GET", "/metrics", Some(TOKEN), None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let text = answer.body;
    for (command, count) in [("get", 2), ("set", 3)] {
        let buckets = histogram_buckets(&text, "cachepool_node_command_duration_seconds", command);
        assert!(buckets.len() > 1, "no buckets for {command} in\n{text}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{command} buckets not cumulative: {buckets:?}"
        );
        // Prometheus requires the last bucket to be le="+Inf" and to equal the count.
        assert_eq!(
            buckets.last().cloned(),
            Some(("+Inf".to_string(), count)),
            "{command}: {buckets:?}"
        );
    }
    node.shutdown().await;
}

/// The `(le, value)` pairs of one histogram's buckets for one command, in exposition order.
fn histogram_buckets(text: &str, name: &str, command: &str) -> Vec<(String, u64)> {
    let command_label = format!("command=\"{command}\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix("_bucket{"))
        .filter_map(|rest| rest.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|l| l == command_label))
        .map(|(labels, value)| {
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .map(|l| l.trim_end_matches('"').to_string())
                .unwrap_or_default();
            (le, value.trim().parse().unwrap_or(u64::MAX))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_admin_path_answers_404_json() {
    let node = start_node(16).await;
    let answer = http(node.admin_addr, "GET", "/nope", Some(TOKEN), None).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"], "not_found");
    node.shutdown().await;
}
