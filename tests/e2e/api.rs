//! The operator API's contract: bearer tokens (none or a wrong one: 401; the read token on a
//! mutating call: 403; nothing changes either way), the history window's bounds (400 outside
//! 1..=1440 minutes), the unauthenticated probes and metrics,
//! `flush` emptying every node, and the ring long-poll answering as soon as the ring changes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::harness::{
    ADMIN_TOKEN, Api, Manifest, Operator, OperatorOptions, READ_TOKEN, TIMEOUT, TestDir,
    apply_and_start, items_per_node, pool_client, ring_epoch, run, shutdown, status_pids,
};

/// The items of a list answer: a bare array, or a Kubernetes-style `{"items": [...]}`.
fn list_items(body: &Value) -> Vec<Value> {
    body.as_array()
        .or_else(|| body["items"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("not a list of pools: {body}"))
}

#[test]
fn api_answers_401_without_or_with_a_wrong_token_and_403_to_the_read_token_on_writes() {
    run(async {
        const POOL: &str = "guarded";
        let dir = TestDir::new("auth");
        dir.write_manifest(POOL, &Manifest::manual(POOL, 1).yaml());
        // Tokens from the environment this time.
        let env = OperatorOptions {
            tokens_in_env: true,
            ..OperatorOptions::default()
        };
        let operator = Operator::start_with(&dir, env).await;
        let api = operator.api.clone();
        let before = api.wait_settled(POOL, 1, TIMEOUT).await;
        let pids = dir.wait_node_count(1, TIMEOUT).await;
        let client = pool_client(&api, POOL).await;
        client
            .set("guarded:probe", b"kept", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));

        let pool = Api::pool_path(POOL);
        let json_body = |v: Value| Some(("application/json", v.to_string()));
        let merge = |v: Value| Some(("application/merge-patch+json", v.to_string()));
        let reads = [
            "/api/v1/pools".to_owned(),
            pool.clone(),
            format!("{pool}/ring"),
            format!("{pool}/history?minutes=30"),
        ];
        let writes = || {
            [
                (
                    Method::PATCH,
                    pool.clone(),
                    merge(json!({"spec": {"scaling": {"replicas": 2}}})),
                ),
                (
                    Method::POST,
                    format!("{pool}/scale"),
                    json_body(json!({"delta": 1})),
                ),
                (Method::POST, format!("{pool}/flush"), None),
            ]
        };
        for token in [None, Some("not-the-token"), Some("")] {
            for path in &reads {
                api.call(Method::GET, path, token, None)
                    .await
                    .expect_error(401, &format!("GET {path} with token {token:?}"));
            }
            for (method, path, body) in writes() {
                api.call(method.clone(), &path, token, body)
                    .await
                    .expect_error(401, &format!("{method} {path} with token {token:?}"));
            }
        }
        for (method, path, body) in writes() {
            api.call(method.clone(), &path, Some(READ_TOKEN), body)
                .await
                .expect_error(403, &format!("{method} {path} with the read token"));
        }

        // Nothing changed.
        let after = api.status(POOL).await;
        assert_eq!(ring_epoch(&after), ring_epoch(&before));
        assert_eq!(api.spec(POOL).await.scaling.replicas, 1);
        assert_eq!(dir.node_pids(), pids);
        assert!(
            client.get("guarded:probe").await.ok().flatten().is_some(),
            "a refused flush emptied the pool"
        );

        // The read token reads everything; either token reads.
        let pools = list_items(&api.get("/api/v1/pools").await.expect(200, "GET pools"));
        assert!(
            pools
                .iter()
                .any(|p| p["metadata"]["name"] == POOL && p["kind"] == "CachePool"),
            "{pools:?}"
        );
        for path in &reads {
            api.call(Method::GET, path, Some(ADMIN_TOKEN), None)
                .await
                .expect(200, &format!("GET {path} with the admin token"));
            api.get(path).await.expect(200, &format!("GET {path}"));
        }
        let history = api.get(&reads[3]).await.body;
        assert!(
            history.is_array(),
            "history is not a list of points: {history}"
        );
        // A history window outside 1..=1440 minutes is refused, naming the bounds.
        for minutes in ["0", "1441", "100000"] {
            let what = format!("GET history?minutes={minutes}");
            let reply = api.get(&format!("{pool}/history?minutes={minutes}")).await;
            reply.expect_error(400, &what);
            assert_eq!(reply.body["field"], "minutes", "{what}: {}", reply.body);
            assert!(
                reply.body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("[1, 1440]")),
                "{what}: {}",
                reply.body
            );
        }
        for minutes in ["1", "1440"] {
            let what = format!("GET history?minutes={minutes}");
            let points = api
                .get(&format!("{pool}/history?minutes={minutes}"))
                .await
                .expect(200, &what);
            assert!(points.is_array(), "{what}: {points}");
        }
        api.get(&Api::pool_path("nonexistent"))
            .await
            .expect_error(404, "GET an unknown pool");
        // Manual mode at minReplicas: scaling down is a conflict.
        api.scale(POOL, -1)
            .await
            .expect_error(409, "scale below minReplicas");
        assert_eq!(api.spec(POOL).await.scaling.replicas, 1);

        // Probes and metrics need no token.
        for path in ["/healthz", "/readyz"] {
            let (status, text) = api.get_text(path).await;
            assert_eq!(status, 200, "{path}: {text}");
        }
        let (status, metrics) = api.get_text("/metrics").await;
        assert_eq!(status, 200);
        for family in ["cachepool_operator_", "cachepool_pool_"] {
            assert!(
                metrics.contains(family),
                "no {family}* family in /metrics:\n{metrics}"
            );
        }
        shutdown(&dir, operator).await;
    });
}

#[test]
fn flush_empties_every_node() {
    run(async {
        const POOL: &str = "flushed";
        let dir = TestDir::new("flush");
        let setup = apply_and_start(&dir, &Manifest::manual(POOL, 3), 3).await;
        let api = setup.operator.api.clone();
        let client = pool_client(&api, POOL).await;
        let keys: Vec<String> = (0..3000).map(|i| format!("flush:{i:05}")).collect();
        for key in &keys {
            client
                .set(key, key.as_bytes(), 0, 0)
                .await
                .unwrap_or_else(|e| panic!("set {key}: {e}"));
        }
        let ring = api.ring(POOL, None).await;
        let before = items_per_node(&ring).await;
        assert_eq!(before.iter().sum::<u64>(), 3000, "{before:?}");
        assert!(before.iter().all(|&n| n > 0), "{before:?}");

        let reply = api.flush(POOL).await;
        assert!((200..300).contains(&reply.status), "flush: {reply:?}");
        let after = items_per_node(&ring).await;
        assert_eq!(after, vec![0, 0, 0], "items per node after the flush");
        let mut found = 0;
        for key in &keys {
            found += usize::from(client.get(key).await.ok().flatten().is_some());
        }
        assert_eq!(found, 0, "keys read back after the flush");
        // Flushing empties; it does not stop, restart or re-ring anything.
        let status = api.status(POOL).await;
        assert_eq!(ring_epoch(&status), ring_epoch(&setup.status));
        assert_eq!(status_pids(&status), status_pids(&setup.status));
        client
            .set("flush:after", b"fresh", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set after the flush: {e}"));
        assert!(client.get("flush:after").await.ok().flatten().is_some());
        shutdown(&dir, setup.operator).await;
    });
}

/// How soon after a scale call a waiting `ring?after=` must answer: a node's start (tens of
/// milliseconds) plus the operator's reaction, with room for a busy machine.
const LONG_POLL_LIMIT: Duration = Duration::from_millis(1500);

#[test]
fn ring_long_poll_answers_within_a_second_of_a_scale_call() {
    run(async {
        const POOL: &str = "polled";
        let dir = TestDir::new("long-poll");
        let setup = apply_and_start(&dir, &Manifest::manual(POOL, 1), 1).await;
        let api = setup.operator.api.clone();
        let epoch = ring_epoch(&setup.status);
        assert!(epoch > 0);
        // A past epoch is answered at once.
        let now = tokio::time::timeout(Duration::from_secs(2), api.ring(POOL, Some(epoch - 1)))
            .await
            .unwrap_or_else(|_| panic!("ring?after={} did not answer at once", epoch - 1));
        assert_eq!(now.current().epoch(), epoch);

        let mut poll = {
            let api = api.clone();
            tokio::spawn(async move {
                let ring = api.ring(POOL, Some(epoch)).await;
                (Instant::now(), ring)
            })
        };
        // Nothing changed, so the poll must still be waiting (this is the one fixed wait: it
        // shows that the poll does not answer early).
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut poll)
                .await
                .is_err(),
            "ring?after={epoch} answered although the ring did not change"
        );
        let called = Instant::now();
        let reply = api.scale(POOL, 1).await;
        assert!((200..300).contains(&reply.status), "scale +1: {reply:?}");
        let (answered, ring) = tokio::time::timeout(TIMEOUT, poll)
            .await
            .unwrap_or_else(|_| panic!("ring?after={epoch} did not answer the scale"))
            .unwrap_or_else(|e| panic!("long-poll task: {e}"));
        let took = answered - called;
        println!(
            "== e2e ring long-poll: FIGURE scale call -> ring?after answered {:.1} ms (epoch {} -> \
             {}, migrating {})",
            took.as_secs_f64() * 1e3,
            epoch,
            ring.current().epoch(),
            ring.is_migrating()
        );
        assert!(ring.current().epoch() > epoch);
        assert_eq!(ring.current().len(), 2);
        assert!(
            took <= LONG_POLL_LIMIT,
            "answered {took:?} after the scale call"
        );

        // The end of the migration is a ring change of its own.
        let mut last = ring;
        while last.is_migrating() {
            last = tokio::time::timeout(TIMEOUT, api.ring(POOL, Some(last.current().epoch())))
                .await
                .unwrap_or_else(|_| panic!("the migration did not end within {TIMEOUT:?}"));
        }
        assert_eq!(last.current().len(), 2);
        api.wait_settled(POOL, 2, TIMEOUT).await;
        shutdown(&dir, setup.operator).await;
    });
}
