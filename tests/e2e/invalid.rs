//! The manifest directory as the source of truth: an invalid spec, written to the file or
//! sent through the API, is rejected with the rule's message and leaves the running pool
//! alone; a file added while the operator runs is a new pool, a file removed stops its pool's
//! nodes and nothing else.

use std::time::Duration;

use cachepool_crds::pool::{CachePoolStatus, PoolPhase};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{
    Api, Manifest, NAMESPACE, TIMEOUT, TestDir, apply_and_start, pool_client, ring_epoch, run,
    settled, shutdown, status_members, status_pids,
};

/// The rule a spec with `minReplicas: 5` and `maxReplicas: 3` breaks, as `validate` words it.
const RULE: &str = "5 exceeds scaling.maxReplicas (3)";

/// The `Degraded` condition, if the status has one that is true.
fn degraded(status: &CachePoolStatus) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// Watches the pool for `period` and asserts its ring and processes stay as they were.
async fn assert_untouched(
    dir: &TestDir,
    api: &Api,
    name: &str,
    before: &CachePoolStatus,
    period: Duration,
) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        let s = api.status(name).await;
        assert_eq!(
            ring_epoch(&s),
            ring_epoch(before),
            "the ring changed: {s:#?}"
        );
        assert_eq!(status_members(&s), status_members(before));
        assert_eq!(
            dir.node_pids(),
            status_pids(before),
            "node processes changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn invalid_spec_from_the_file_or_the_api_is_rejected_and_the_pool_left_running() {
    run(async {
        const POOL: &str = "strict";
        let dir = TestDir::new("invalid");
        let manifest = Manifest::manual(POOL, 2);
        let setup = apply_and_start(&dir, &manifest, 2).await;
        let api = setup.operator.api.clone();
        let before = setup.status;
        let client = pool_client(&api, POOL).await;
        client
            .set("strict:probe", b"kept", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));

        // From the file: minReplicas above maxReplicas.
        let bad = Manifest {
            min_replicas: 5,
            max_replicas: 3,
            ..manifest.clone()
        };
        dir.write_manifest(POOL, &bad.yaml());
        let invalid = api
            .wait_status(POOL, "Invalid", TIMEOUT, |s| {
                s.phase == Some(PoolPhase::Invalid)
            })
            .await;
        let (reason, message) =
            degraded(&invalid).unwrap_or_else(|| panic!("no Degraded condition: {invalid:#?}"));
        assert_eq!(reason, "InvalidSpec");
        assert!(
            message.contains(&format!("scaling.minReplicas: {RULE}")),
            "the condition does not quote the rule: {message:?}"
        );
        println!("== e2e invalid file: condition message {message:?}");
        assert_untouched(&dir, &api, POOL, &before, Duration::from_secs(2)).await;
        let value = client.get("strict:probe").await.ok().flatten();
        assert!(value.is_some(), "the pool lost its data");

        // Repaired, the pool is Ready again, still the same nodes.
        dir.write_manifest(POOL, &manifest.yaml());
        let repaired = api
            .wait_status(POOL, "repaired", TIMEOUT, |s| {
                settled(s, 2) && degraded(s).is_none()
            })
            .await;
        assert_eq!(ring_epoch(&repaired), ring_epoch(&before));
        assert_eq!(status_pids(&repaired), status_pids(&before));

        // From the API: refused with the field and the rule, nothing written.
        let file = dir.read_manifest(POOL);
        let reply = api
            .patch(
                POOL,
                &json!({"spec": {"scaling": {"minReplicas": 5, "maxReplicas": 3}}}),
            )
            .await;
        reply.expect_error(422, "PATCH min > max");
        // The field is named from the spec or from the resource root; either way it is the
        // one the rule names first.
        let field = reply.body["field"].as_str().unwrap_or_default();
        assert!(
            field == "scaling.minReplicas" || field == "spec.scaling.minReplicas",
            "field {field:?}: {}",
            reply.body
        );
        let text = reply.body["message"].as_str().unwrap_or_default();
        assert!(
            text.contains(RULE),
            "the answer does not quote the rule: {text:?}"
        );
        let spec = api.spec(POOL).await;
        assert_eq!(
            (spec.scaling.min_replicas, spec.scaling.max_replicas),
            (1, 4)
        );
        assert_eq!(dir.read_manifest(POOL), file, "the manifest file changed");
        // Not a merge patch at all: bad input.
        let garbage = api
            .call(
                reqwest::Method::PATCH,
                &Api::pool_path(POOL),
                Some(crate::harness::ADMIN_TOKEN),
                Some(("application/merge-patch+json", "{\"spec\": ".into())),
            )
            .await;
        garbage.expect_error(400, "PATCH with a truncated body");
        assert_untouched(&dir, &api, POOL, &before, Duration::from_secs(1)).await;
        let s = api.status(POOL).await;
        assert!(settled(&s, 2) && degraded(&s).is_none(), "{s:#?}");
        shutdown(&dir, setup.operator).await;
    });
}

/// Pids of the nodes of pool `name` (their command lines name the pool's run directory).
fn pool_pids(dir: &TestDir, name: &str) -> Vec<u32> {
    let marker = format!("/{NAMESPACE}/{name}/");
    dir.processes()
        .into_iter()
        .filter(|(_, args)| {
            args.get(1).is_some_and(|a| a == "node") && args.iter().any(|a| a.contains(&marker))
        })
        .map(|(pid, _)| pid)
        .collect()
}

#[test]
fn manifest_added_while_running_starts_a_pool_and_removed_stops_only_its_nodes() {
    run(async {
        let dir = TestDir::new("files");
        let setup = apply_and_start(&dir, &Manifest::manual("first", 2), 2).await;
        let api = setup.operator.api.clone();

        dir.write_manifest("second", &Manifest::manual("second", 1).yaml());
        let second = api.wait_settled("second", 1, TIMEOUT).await;
        let pids = dir.wait_node_count(3, TIMEOUT).await;
        assert_eq!(
            pool_pids(&dir, "second"),
            Vec::from_iter(status_pids(&second))
        );
        assert_eq!(
            pool_pids(&dir, "first"),
            Vec::from_iter(status_pids(&setup.status))
        );
        assert!(pids.is_superset(&status_pids(&second)));

        std::fs::remove_file(dir.manifest("first"))
            .unwrap_or_else(|e| panic!("cannot remove the manifest: {e}"));
        let left = dir.wait_node_count(1, TIMEOUT).await;
        assert_eq!(left, status_pids(&second), "the wrong pool's nodes stopped");
        crate::harness::until("the removed pool to be forgotten", TIMEOUT, async || {
            (api.get(&Api::pool_path("first")).await.status == 404).then_some(())
        })
        .await;
        api.get(&Api::pool_path("first"))
            .await
            .expect_error(404, "GET a removed pool");
        let s = api.status("second").await;
        assert!(settled(&s, 1), "{s:#?}");
        shutdown(&dir, setup.operator).await;
    });
}
