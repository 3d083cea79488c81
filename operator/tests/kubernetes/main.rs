//! Kubernetes mode against a scripted API server (`apiserver`): the real operator (controller,
//! drivers, store, events, leader election) with in-process cache nodes, and every call it
//! makes to the API server logged, so each step lists the writes it expects and fails on a
//! missing or extra one.

mod apiserver;
mod rbac;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Call};
use cachepool_crds::client::OperatorClient;
use cachepool_crds::pool::{CachePool, PoolPhase};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::kubernetes::KubePods;
use cachepool_operator::kubernetes::role::{LEADER, ROLE_LABEL};
use cachepool_operator::kubernetes::{
    FINALIZER, LAST_VALID_SPEC, LeaderElection, LeaseTiming, OwnPod,
};
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::provider::pod::PodApi;
use cachepool_operator::run::{Config, FrontEnd, KubeClient, NodeBackend, Operator};
use serde_json::json;

const TOKEN: &str = "kubernetes-test-token";
const TIMEOUT: Duration = Duration::from_secs(30);
const NAMESPACE: &str = "shop";
const POOL: &str = "web-cache";
/// Where the operator replicas run (their Lease and pods).
const OPERATOR_NAMESPACE: &str = "cachepool-system";
const POOLS: &str = "/apis/cachepool.io/v1alpha1/namespaces/shop/cachepools/web-cache";

fn pool_object(replicas: u32) -> CachePool {
    serde_norway::from_str(&format!(
        "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {{name: {POOL}, namespace: {NAMESPACE}}}
spec:
  cache: {{capacityMiB: 16, maxItemSizeKiB: 1024}}
  scaling: {{mode: manual, replicas: {replicas}, maxReplicas: 4}}
  provider: {{process: {{}}}}
"
    ))
    .unwrap_or_else(|e| panic!("the test pool: {e}"))
}

async fn start(
    server: &ApiServer,
    who: &str,
    nodes: &Arc<EmbeddedProvider>,
    election: Option<LeaseTiming>,
) -> Operator {
    let mut config = Config::standalone(
        std::path::Path::new("."),
        NodeBackend::Embedded(nodes.clone()),
        "127.0.0.1:0",
        TOKEN,
    );
    config.driver = DriverOptions {
        probe_interval: Duration::from_millis(20),
        sample_interval: Duration::from_millis(100),
        ..DriverOptions::default()
    };
    config.operator_id = "cachepool-operator".to_owned();
    config.front_end = FrontEnd::Kubernetes {
        namespace: None,
        leader_election: election.map(|timing| {
            // Each replica runs in its own pod, which it labels while it leads.
            server.add_pod(OPERATOR_NAMESPACE, who);
            LeaderElection {
                namespace: OPERATOR_NAMESPACE.to_owned(),
                lease_name: "cachepool-operator".to_owned(),
                identity: who.to_owned(),
                timing,
                pod: Some(OwnPod {
                    namespace: OPERATOR_NAMESPACE.to_owned(),
                    name: who.to_owned(),
                }),
            }
        }),
        client: KubeClient::given(server.client(who)),
        node_image: None,
    };
    // RUST_LOG=debug shows the operator's own account of a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting operator {who}: {e}"))
}

/// Polls the stored object until `check` holds; returns it.
async fn until(server: &ApiServer, what: &str, check: impl Fn(&CachePool) -> bool) -> CachePool {
    let start = Instant::now();
    loop {
        let pool = server.pool(NAMESPACE, POOL);
        if let Some(pool) = &pool
            && check(pool)
        {
            return pool.clone();
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out waiting for {what}; stored: {:?}",
            pool.map(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Ready with `n` nodes in the ring, having acted on `generation`.
fn ready(n: usize, generation: i64) -> impl Fn(&CachePool) -> bool {
    move |pool| {
        pool.status.as_ref().is_some_and(|s| {
            s.phase == Some(PoolPhase::Ready)
                && s.observed_generation == Some(generation)
                && s.ring.as_ref().is_some_and(|r| r.members.len() == n)
                && s.migration.is_none()
        })
    }
}

fn condition(pool: &CachePool, kind: &str) -> Option<(String, String)> {
    let status = pool.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.reason.clone()))
}

/// The writes after the first `from`, without Events, as `METHOD path (kind)` lines.
fn writes_since(server: &ApiServer, from: usize) -> Vec<Call> {
    server.writes().into_iter().skip(from).collect()
}

fn lines(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| !c.path.contains("/events"))
        .map(Call::line)
        .collect()
}

fn count(lines: &[String], line: &str) -> usize {
    lines.iter().filter(|l| *l == line).count()
}

fn status_apply() -> String {
    format!("PATCH {POOLS}/status (apply)")
}

/// Every status write changed something: no two consecutive ones carry the same status, and
/// every one is a forced server-side apply under the operator's one field manager.
fn assert_no_repeated_status(calls: &[Call]) {
    let statuses: Vec<_> = calls
        .iter()
        .filter(|c| c.path.ends_with("/status"))
        .inspect(|c| {
            let query: Vec<&str> = c.query.split('&').collect();
            assert!(
                query.contains(&"fieldManager=cachepool-operator") && query.contains(&"force=true"),
                "a status write not applied by the operator's field manager: {}?{}",
                c.path,
                c.query
            );
        })
        .map(|c| c.body["status"].clone())
        .collect();
    for pair in statuses.windows(2) {
        assert_ne!(pair[0], pair[1], "a status write that changed nothing");
    }
}

fn event_reasons(server: &ApiServer, from: usize) -> Vec<String> {
    server
        .events()
        .into_iter()
        .skip(from)
        .map(|(r, _)| r)
        .collect()
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_from_creation_to_deletion_makes_exactly_the_expected_api_calls() {
    let server = ApiServer::new();
    let nodes = Arc::new(EmbeddedProvider::new());
    let operator = start(&server, "operator", &nodes, None).await;

    // Creation: the finalizer first, then the nodes; status by apply, the valid spec kept.
    server.create(&pool_object(1));
    let created = until(&server, "one ready node", ready(1, 1)).await;
    assert!(
        created
            .metadata
            .finalizers
            .as_ref()
            .unwrap()
            .contains(&FINALIZER.to_owned())
    );
    assert!(
        created
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(LAST_VALID_SPEC)
    );
    let calls = writes_since(&server, 0);
    let seen = lines(&calls);
    assert_eq!(
        seen[0],
        format!("PATCH {POOLS} (json-patch)"),
        "the finalizer comes first: {seen:#?}"
    );
    let finalizer = &calls[0].body;
    assert_eq!(
        finalizer[0]["op"], "test",
        "the finalizer patch is guarded: {finalizer}"
    );
    assert_eq!(
        count(&seen, &format!("PATCH {POOLS} (json-patch)")),
        1,
        "{seen:#?}"
    );
    assert_eq!(
        count(&seen, &format!("PATCH {POOLS} (apply)")),
        1,
        "{seen:#?}"
    );
    let creation_status = count(&seen, &status_apply());
    assert!(
        (1..=6).contains(&creation_status),
        "{creation_status} status writes to create a one-node pool: {seen:#?}"
    );
    assert_eq!(
        seen.len(),
        2 + creation_status,
        "an unexpected call: {seen:#?}"
    );
    assert_no_repeated_status(&calls);
    assert!(
        calls.iter().all(|c| c.who == "operator" && c.status < 300),
        "a write failed: {calls:#?}"
    );
    println!("creation: {creation_status} status writes");

    // A steady pool: 100 probe rounds, not one write.
    let label = format!("{NAMESPACE}/{POOL}");
    let writes = server.writes().len();
    let rounds = operator.metrics().reconciles(&label);
    wait_for("100 probe rounds", || {
        operator.metrics().reconciles(&label) >= rounds + 100
    })
    .await;
    let steady = writes_since(&server, writes);
    assert!(
        steady.is_empty(),
        "writes while nothing changed: {:#?}",
        lines(&steady)
    );

    // `kubectl scale cp/web-cache --replicas=3` (the scale subresource patches the spec).
    let writes = server.writes().len();
    let events = server.events().len();
    let asked = Instant::now();
    server.edit_spec(NAMESPACE, POOL, |spec| {
        spec["scaling"]["replicas"] = json!(3)
    });
    let grown = until(&server, "three nodes after kubectl scale", ready(3, 2)).await;
    let took = asked.elapsed();
    let calls = writes_since(&server, writes);
    let seen = lines(&calls);
    let resize_status = count(&seen, &status_apply());
    assert_eq!(
        count(&seen, &format!("PATCH {POOLS} (apply)")),
        1,
        "the new valid spec: {seen:#?}"
    );
    assert_eq!(
        seen.len(),
        1 + resize_status,
        "an unexpected call: {seen:#?}"
    );
    assert_no_repeated_status(&calls);
    let reasons = event_reasons(&server, events);
    for reason in ["ScaledUp", "HandoffStarted", "HandoffFinished"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event: {reasons:?}"
        );
    }
    assert_eq!(grown.status.as_ref().unwrap().replicas, 3);
    println!(
        "kubectl scale 1 -> 3: ring of 3 in {} ms, {} API writes ({resize_status} status, \
         {} Events)",
        took.as_millis(),
        calls.len(),
        reasons.len()
    );

    // The operator's API (the manager UI's control) patches the spec through the API server.
    let writes = server.writes().len();
    let api = OperatorClient::new(&operator.api_url(), TOKEN);
    api.scale(NAMESPACE, POOL, -1).await.unwrap();
    until(&server, "two nodes after the API's scale", ready(2, 3)).await;
    let calls = writes_since(&server, writes);
    let spec_patch = calls
        .iter()
        .find(|c| c.line() == format!("PATCH {POOLS} (json-patch)"))
        .unwrap_or_else(|| panic!("no spec patch: {:#?}", lines(&calls)));
    assert_eq!(spec_patch.body[0]["op"], "replace");
    assert_eq!(spec_patch.body[0]["path"], "/spec");
    assert_eq!(spec_patch.body[0]["value"]["scaling"]["replicas"], 2);
    assert_no_repeated_status(&calls);

    // An invalid spec: Degraded/InvalidSpec, the pool keeps running on its last valid spec.
    let writes = server.writes().len();
    let events = server.events().len();
    server.edit_spec(NAMESPACE, POOL, |spec| {
        spec["cache"]["capacityMiB"] = json!(0)
    });
    let degraded = until(&server, "Degraded/InvalidSpec", |p| {
        condition(p, "Degraded").is_some_and(|(s, r)| s == "True" && r == "InvalidSpec")
    })
    .await;
    let status = degraded.status.as_ref().unwrap();
    assert_eq!(
        status.ring.as_ref().unwrap().members.len(),
        2,
        "the nodes stay"
    );
    let seen = lines(&writes_since(&server, writes));
    assert!(
        seen.iter().all(|l| *l == status_apply()),
        "only the status changes (the valid spec stays): {seen:#?}"
    );
    assert!(event_reasons(&server, events).contains(&"InvalidSpec".to_owned()));

    // Deletion: every node stops, then the finalizer goes, and the object with it.
    let writes = server.writes().len();
    server.delete(NAMESPACE, POOL);
    wait_for("the pool to be gone", || {
        server.pool(NAMESPACE, POOL).is_none()
    })
    .await;
    assert_eq!(nodes.running(), 0, "a node outlived its pool");
    let calls = writes_since(&server, writes);
    let last = lines(&calls).pop().unwrap();
    assert_eq!(
        last,
        format!("PATCH {POOLS} (json-patch)"),
        "the finalizer goes last"
    );
    let removal = &calls.iter().rev().find(|c| c.line() == last).unwrap().body;
    assert!(removal.to_string().contains("remove"), "{removal}");

    operator.stop().await.unwrap();
    rbac::assert_granted(&server.calls(), OPERATOR_NAMESPACE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_only_after_the_deposed_leader_stopped_writing() {
    let server = ApiServer::new();
    // Nodes outlive operators, as pods and instances do: both replicas see the same ones.
    let nodes = Arc::new(EmbeddedProvider::outliving_the_operator());
    let timing = LeaseTiming {
        lease: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry: Duration::from_millis(500),
    };
    let a = start(&server, "a", &nodes, Some(timing)).await;
    server.create(&pool_object(2));
    until(&server, "two ready nodes under a", ready(2, 1)).await;
    assert_eq!(
        server
            .lease_holder("cachepool-system", "cachepool-operator")
            .as_deref(),
        Some("a")
    );
    let leader_label = |who: &str| server.pod_label(OPERATOR_NAMESPACE, who, ROLE_LABEL);
    wait_for("a's pod to carry the leader label", || {
        leader_label("a").as_deref() == Some(LEADER)
    })
    .await;
    let launched = nodes.launches();

    // b waits: it reads the lease and writes nothing else.
    let b = start(&server, "b", &nodes, Some(timing)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let by_b: Vec<String> = server
        .writes()
        .iter()
        .filter(|c| c.who == "b" && !c.path.contains("/leases/"))
        .map(Call::line)
        .collect();
    assert!(by_b.is_empty(), "a follower wrote: {by_b:#?}");
    assert_eq!(leader_label("b"), None, "a follower labelled itself");
    assert!(!b.registry().is_ready(), "a follower reports ready");

    // a can no longer renew its lease (a partition between it and the lease): it must stop
    // writing before b can take the lease.
    server.cut_off("a", "/leases/");
    wait_for("b to lead", || {
        server
            .lease_holder("cachepool-system", "cachepool-operator")
            .as_deref()
            == Some("b")
    })
    .await;
    let taken = server
        .calls()
        .into_iter()
        .find(|c| {
            c.who == "b" && c.path.contains("/leases/") && c.body["spec"]["holderIdentity"] == "b"
        })
        .unwrap_or_else(|| panic!("no lease write by b"))
        .at;
    let late: Vec<String> = server
        .calls()
        .iter()
        .filter(|c| c.who == "a" && c.is_write() && !c.path.contains("/leases/"))
        .filter(|c| c.at >= taken && c.status < 300)
        .map(Call::line)
        .collect();
    assert!(
        late.is_empty(),
        "the deposed leader wrote after the take-over: {late:#?}"
    );
    assert!(
        !a.registry().is_ready(),
        "the deposed leader still reports ready"
    );

    // b runs the pool: it adopts the nodes (no launch) and acts on the next change.
    server.edit_spec(NAMESPACE, POOL, |spec| {
        spec["scaling"]["replicas"] = json!(3)
    });
    until(&server, "three nodes under b", ready(3, 2)).await;
    assert_eq!(
        nodes.launches(),
        launched + 1,
        "b launched only the new node"
    );
    let after: Vec<String> = server
        .calls()
        .iter()
        .filter(|c| c.who == "a" && c.is_write() && c.status < 300 && c.at >= taken)
        .map(Call::line)
        .collect();
    assert!(after.is_empty(), "the deposed leader wrote: {after:#?}");
    wait_for("b to report ready", || b.registry().is_ready()).await;
    // The API Service now selects b alone: b labelled itself and took the label off a (which,
    // fenced, could not).
    wait_for("the leader label to move to b", || {
        leader_label("b").as_deref() == Some(LEADER) && leader_label("a").is_none()
    })
    .await;

    b.stop().await.unwrap();
    a.stop().await.unwrap();
    rbac::assert_granted(&server.calls(), OPERATOR_NAMESPACE);
}

/// The pool is deleted while no operator runs (or the one that began the deletion died): the
/// finalizer holds the object, and the next operator stops the nodes it finds and only then
/// lets the object go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_started_mid_deletion_finishes_it() {
    let server = ApiServer::new();
    let nodes = Arc::new(EmbeddedProvider::outliving_the_operator());
    let first = start(&server, "first", &nodes, None).await;
    server.create(&pool_object(2));
    until(&server, "two ready nodes", ready(2, 1)).await;
    first.stop().await.unwrap();
    assert_eq!(
        nodes.running(),
        2,
        "the nodes stop with the operator: they must not"
    );

    server.delete(NAMESPACE, POOL);
    let held = server
        .pool(NAMESPACE, POOL)
        .unwrap_or_else(|| panic!("the object went without the finalizer's cleanup"));
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(
        held.metadata.finalizers.as_deref(),
        Some(&[FINALIZER.to_owned()][..])
    );

    let writes = server.writes().len();
    let second = start(&server, "second", &nodes, None).await;
    wait_for("the pool to be gone", || {
        server.pool(NAMESPACE, POOL).is_none()
    })
    .await;
    assert_eq!(nodes.running(), 0, "a node outlived its pool");
    let calls = writes_since(&server, writes);
    assert!(calls.iter().all(|c| c.who == "second"), "{calls:#?}");
    let last = lines(&calls).pop().unwrap();
    assert_eq!(
        last,
        format!("PATCH {POOLS} (json-patch)"),
        "the finalizer goes last"
    );
    assert_eq!(
        event_reasons(&server, 0).last().map(String::as_str),
        Some("Deleted"),
        "events: {:?}",
        server.events()
    );
    second.stop().await.unwrap();
    rbac::assert_granted(&server.calls(), OPERATOR_NAMESPACE);
}

/// Permissions the chart grants that no test here exercises, each with the reason it is still
/// needed. Kept short on purpose: the test below fails on any other unused grant.
const NOT_EXERCISED: &[(&str, &str, &str, &str)] = &[(
    "events.k8s.io",
    "events",
    "patch",
    "kube's Recorder patches an existing Event to count a repeat of it (same reason and \
     note within its window); the scenarios here never repeat one",
)];

/// The chart's RBAC is least privilege for what the operator does: every call of a pool's
/// whole life under leader election (the Lease, the leader's pod label, creation, a kubectl
/// scale, the API's scale, deletion) and every call of the pod provider is granted, and every
/// granted verb is used by one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_grants_every_call_the_operator_makes_and_nothing_unused() {
    let server = ApiServer::new();
    let nodes = Arc::new(EmbeddedProvider::new());
    let timing = LeaseTiming {
        lease: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry: Duration::from_millis(500),
    };
    let operator = start(&server, "operator", &nodes, Some(timing)).await;
    server.create(&pool_object(1));
    until(&server, "one ready node", ready(1, 1)).await;
    wait_for("the leader label", || {
        server
            .pod_label(OPERATOR_NAMESPACE, "operator", ROLE_LABEL)
            .as_deref()
            == Some(LEADER)
    })
    .await;
    server.edit_spec(NAMESPACE, POOL, |spec| {
        spec["scaling"]["replicas"] = json!(2)
    });
    until(&server, "two nodes", ready(2, 2)).await;
    let api = OperatorClient::new(&operator.api_url(), TOKEN);
    api.scale(NAMESPACE, POOL, -1).await.unwrap();
    until(&server, "one node after the API's scale", ready(1, 3)).await;
    server.delete(NAMESPACE, POOL);
    wait_for("the pool to go", || server.pool(NAMESPACE, POOL).is_none()).await;
    operator.stop().await.unwrap();

    // The pod provider's calls (the embedded nodes above stand in for its pods).
    let pods = KubePods::new(server.client("pods"));
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "web-cache-cachepool-admin", "namespace": NAMESPACE},
        "stringData": {"token": "t"}
    }))
    .unwrap();
    pods.ensure_secret(NAMESPACE, secret.clone()).await.unwrap();
    pods.ensure_secret(NAMESPACE, secret).await.unwrap();
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "web-cache-0-abcde", "namespace": NAMESPACE,
                     "labels": {"cachepool.io/pool": POOL}},
    }))
    .unwrap();
    pods.create_pod(pod).await.unwrap();
    let listed = pods
        .list_pods(NAMESPACE, &format!("cachepool.io/pool={POOL}"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    pods.delete_pod(NAMESPACE, "web-cache-0-abcde")
        .await
        .unwrap();
    pods.delete_pod(NAMESPACE, "web-cache-0-abcde")
        .await
        .unwrap();

    let calls = server.calls();
    rbac::assert_granted(&calls, OPERATOR_NAMESPACE);
    let used: BTreeSet<rbac::Permission> = calls
        .iter()
        .map(|c| rbac::permission(c, OPERATOR_NAMESPACE))
        .collect();
    let granted = rbac::granted();
    let unused: Vec<&rbac::Permission> = granted
        .difference(&used)
        .filter(|(_, group, resource, verb)| {
            !NOT_EXERCISED
                .iter()
                .any(|(g, r, v, _)| g == group && r == resource && v == verb)
        })
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never uses: {unused:#?}\nused: {used:#?}"
    );
    println!(
        "RBAC: {} permissions granted, all used: {used:?}",
        granted.len()
    );
}
