//! The operator as a library, started in-process with nodes embedded in the test: a pool
//! whose provider this operator does not serve starts nothing and says why; a served pool's
//! resizes are told as events; the store sees status writes only on meaningful change; a
//! restarted operator takes a node no ring names as its slot's new node only if it never stored
//! an item.
//!
//! Each test starts its own operator over its own state directory on port 0, and stops it
//! (which stops every embedded node) before it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_node::client::PoolClient;
use cachepool_crds::pool::{CachePool, PoolPhase, ProviderSpec, ScalingMode};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::events::{RecordedEvents, reason};
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::provider::{AdminToken, LaunchSpec, PoolRef, Provider as _};
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_test_support::servers::TempDir;

const TOKEN: &str = "seams-test-token";
const TIMEOUT: Duration = Duration::from_secs(30);

struct Harness {
    operator: Operator,
    nodes: Arc<EmbeddedProvider>,
    events: RecordedEvents,
    dir: TempDir,
}

async fn start(name: &str, manifest: &str) -> Harness {
    start_with(
        name,
        manifest,
        DriverOptions::default().status_counter_interval,
    )
    .await
}

async fn start_with(name: &str, manifest: &str, status_counter_interval: Duration) -> Harness {
    let dir = TempDir::new(&format!("seams-{name}"));
    dir.write("pool.yaml", manifest);
    start_in(dir, status_counter_interval).await
}

/// An operator over `dir` as it is: a restart when an earlier operator used it.
async fn start_in(dir: TempDir, status_counter_interval: Duration) -> Harness {
    start_on(
        dir,
        Arc::new(EmbeddedProvider::new()),
        status_counter_interval,
    )
    .await
}

/// An operator over `dir` whose nodes come from `nodes` (which may hold nodes an earlier
/// operator left, when they outlive operators).
async fn start_on(
    dir: TempDir,
    nodes: Arc<EmbeddedProvider>,
    status_counter_interval: Duration,
) -> Harness {
    let events = RecordedEvents::new();
    let mut config = Config::standalone(
        dir.path(),
        NodeBackend::Embedded(nodes.clone()),
        "127.0.0.1:0",
        TOKEN,
    );
    config.driver = DriverOptions {
        probe_interval: Duration::from_millis(50),
        sample_interval: Duration::from_millis(100),
        status_counter_interval,
        ..DriverOptions::default()
    };
    config.standalone = StandaloneOptions {
        scan_interval: Duration::from_millis(50),
    };
    config.events = vec![Arc::new(events.clone())];
    let operator = Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"));
    Harness {
        operator,
        nodes,
        events,
        dir,
    }
}

impl Harness {
    /// Polls the pool's resource until `check` holds.
    async fn until(
        &self,
        pool: &PoolRef,
        what: &str,
        check: impl Fn(&CachePool) -> bool,
    ) -> CachePool {
        let start = Instant::now();
        loop {
            if let Some(handle) = self.operator.registry().get(pool) {
                let resource = handle.resource();
                if check(&resource) {
                    return resource;
                }
                assert!(
                    start.elapsed() < TIMEOUT,
                    "timed out waiting for {what}; status: {:?}",
                    resource.status
                );
            } else {
                assert!(
                    start.elapsed() < TIMEOUT,
                    "timed out waiting for {pool} to appear"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.stop_keeping_state().await;
    }

    /// Stops the operator (and its embedded nodes) and hands back its state directory, for
    /// a restart.
    async fn stop_keeping_state(self) -> TempDir {
        let nodes = self.nodes.clone();
        self.operator
            .stop()
            .await
            .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
        assert_eq!(nodes.running(), 0, "every embedded node is stopped");
        self.dir
    }
}

fn phase(resource: &CachePool) -> Option<PoolPhase> {
    resource.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    resource: &'a CachePool,
    kind: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    resource
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
}

const EC2_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: cloud}
spec:
  scaling: {mode: manual, replicas: 2}
  provider:
    ec2:
      region: eu-west-1
      imageId: ami-0123456789abcdef0
      instanceType: r7g.large
      subnetId: subnet-0123456789abcdef0
      securityGroupIds: [sg-0123456789abcdef0]
";

const POD_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: cloud}
spec:
  provider: {pod: {}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_naming_a_provider_this_operator_cannot_serve_is_degraded_and_starts_nothing() {
    for (manifest, kind) in [(EC2_POOL, "ec2"), (POD_POOL, "pod")] {
        unserved_provider_is_refused(manifest, kind).await;
    }
}

async fn unserved_provider_is_refused(manifest: &str, kind: &str) {
    let h = start(kind, manifest).await;
    let pool = PoolRef::new("default", "cloud");
    let resource = h
        .until(&pool, "Degraded", |r| phase(r) == Some(PoolPhase::Degraded))
        .await;
    let degraded =
        condition(&resource, "Degraded").unwrap_or_else(|| panic!("no Degraded condition"));
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "ProviderUnavailable");
    assert!(
        degraded.message.contains(&format!("`{kind}`"))
            && degraded.message.contains("no node was started"),
        "{}",
        degraded.message
    );
    let ready = condition(&resource, "Ready").unwrap_or_else(|| panic!("no Ready condition"));
    assert_eq!(ready.status, "False");
    // Several rounds later, still nothing started and the event was told once.
    let label = pool.to_string();
    let rounds = h.operator.metrics().reconciles(&label);
    let start = Instant::now();
    while h.operator.metrics().reconciles(&label) < rounds + 5 {
        assert!(start.elapsed() < TIMEOUT, "the driver stopped reconciling");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h.nodes.launches(),
        0,
        "no node may start for an unserved provider"
    );
    let told = h
        .events
        .reasons(&pool)
        .into_iter()
        .filter(|r| *r == reason::PROVIDER_UNAVAILABLE)
        .count();
    assert_eq!(told, 1, "the unserved provider is told once per generation");
    h.stop().await;
}

const LOCAL_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: local}
spec:
  cache: {capacityMiB: 8, maxItemSizeKiB: 1024}
  scaling: {mode: manual, replicas: 1}
  provider: {process: {}}
";

/// Reads the ring from the registry and keeps a pool client on it.
async fn client_for(h: &Harness, pool: &PoolRef) -> Arc<PoolClient> {
    let handle = h
        .operator
        .registry()
        .get(pool)
        .unwrap_or_else(|| panic!("no pool {pool}"));
    let ring = handle
        .ring()
        .borrow()
        .clone()
        .unwrap_or_else(|| panic!("{pool} has no ring"));
    Arc::new(
        PoolClient::new(ring, cache_node::client::ClientOptions::default())
            .unwrap_or_else(|e| panic!("pool client: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_is_told_as_events_and_status_is_written_only_on_meaningful_change() {
    let h = start("events", LOCAL_POOL).await;
    let pool = PoolRef::new("default", "local");
    h.until(&pool, "Ready", |r| phase(r) == Some(PoolPhase::Ready))
        .await;
    let handle = h.operator.registry().get(&pool).unwrap();

    // A steady pool under traffic: samples change the traffic figures every 100 ms, but the
    // store sees them at most once per status counter interval (15 s).
    let client = client_for(&h, &pool).await;
    let label = pool.to_string();
    let before = h.operator.metrics().status_writes(&label);
    let steady = Instant::now();
    let mut i = 0u32;
    while steady.elapsed() < Duration::from_secs(3) {
        let key = format!("k{}", i % 200);
        if client.get(key.as_bytes()).await.unwrap().is_none() {
            client.set(key.as_bytes(), b"value", 0, 0).await.unwrap();
        }
        i += 1;
    }
    let steady_writes = h.operator.metrics().status_writes(&label) - before;
    println!(
        "steady pool: {steady_writes} status writes in {:?} ({i} requests, samples every 100 ms)",
        steady.elapsed()
    );
    assert!(
        steady_writes <= 1,
        "a steady pool wrote its status {steady_writes} times in 3 s"
    );

    // Grow to 3 through the API path: every step of the resize is told.
    let mut spec = handle.resource().spec;
    spec.scaling.replicas = 3;
    let resize = Instant::now();
    let before = h.operator.metrics().status_writes(&label);
    handle.set_spec(spec).await.unwrap();
    h.until(&pool, "3 ready nodes", |r| {
        phase(r) == Some(PoolPhase::Ready)
            && r.status.as_ref().is_some_and(|s| s.ready_replicas == 3)
    })
    .await;
    let resize_writes = h.operator.metrics().status_writes(&label) - before;
    println!(
        "grow 1 -> 3: {resize_writes} status writes in {:?}",
        resize.elapsed()
    );
    let reasons = h.events.reasons(&pool);
    for expected in [
        reason::SCALED_UP,
        reason::HANDOFF_STARTED,
        reason::HANDOFF_FINISHED,
    ] {
        assert!(
            reasons.contains(&expected),
            "{expected} missing from {reasons:?}"
        );
    }
    assert!(
        resize_writes <= 12,
        "a resize wrote its status {resize_writes} times"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typed_client_speaks_the_operator_api() {
    use cachepool_crds::client::OperatorClient;

    let h = start("client", LOCAL_POOL).await;
    let pool = PoolRef::new("default", "local");
    h.until(&pool, "Ready", |r| phase(r) == Some(PoolPhase::Ready))
        .await;
    let client = OperatorClient::new(&h.operator.api_url(), TOKEN);

    let list = client.pools().await.unwrap();
    assert_eq!(list.kind, "CachePoolList");
    assert_eq!(list.items.len(), 1);
    let ring = client.ring("default", "local", None).await.unwrap();
    let epoch = ring.current().epoch();

    // A merge patch is validated like a new spec: the refusal keeps the operator's body whole.
    let refused = client
        .patch(
            "default",
            "local",
            &serde_json::json!({"spec": {"scaling": {"minReplicas": 5, "maxReplicas": 2}}}),
        )
        .await
        .unwrap_err();
    let (status, body) = refused.refusal().expect("a refusal");
    assert_eq!(status, 422);
    assert_eq!(body.error, "invalid_spec");
    assert!(
        body.field
            .as_deref()
            .is_some_and(|f| f.starts_with("spec.scaling")),
        "{body}"
    );

    // Grow by one; the long-poll answers with the next ring.
    let grown = client.scale("default", "local", 1).await.unwrap();
    assert_eq!(grown.spec.scaling.replicas, 2);
    let next = client.ring("default", "local", Some(epoch)).await.unwrap();
    assert!(next.current().epoch() > epoch);

    let flushed = client.flush("default", "local").await.unwrap();
    assert!(flushed.nodes >= 1, "{flushed:?}");
    let history = client.history("default", "local", 5).await.unwrap();
    assert!(history.len() <= 6, "{history:?}");

    let missing = client.pool("default", "nope").await.unwrap_err();
    assert_eq!(
        missing.refusal().map(|(s, b)| (s, b.error.as_str())),
        Some((404, "not_found"))
    );
    h.stop().await;
}

const STEADY_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: local}
spec:
  cache: {capacityMiB: 8, maxItemSizeKiB: 1024}
  scaling:
    mode: auto
    minReplicas: 1
    maxReplicas: 1
    auto: {windowSeconds: 2}
  provider: {process: {}}
";

/// Status writes of a pool under steady traffic and through a resize with keys to move,
/// with fast counters held back (`interval`) or written on every change (`ZERO`, what the
/// operator did before the status policy).
async fn measure_status_writes(interval: Duration) -> (u64, Duration, u64, Duration) {
    // Auto mode with a 2 s window, held at one node, so the status shows traffic figures within
    // seconds (manual mode's are over a minute).
    let h = start_with("writes", STEADY_POOL, interval).await;
    let pool = PoolRef::new("default", "local");
    h.until(&pool, "Ready", |r| phase(r) == Some(PoolPhase::Ready))
        .await;
    let handle = h
        .operator
        .registry()
        .get(&pool)
        .unwrap_or_else(|| panic!("no pool {pool}"));
    let client = client_for(&h, &pool).await;
    let label = pool.to_string();
    let value = vec![b'v'; 1024];
    for i in 0..3000 {
        client
            .set(format!("key{i}").as_bytes(), &value, 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));
    }
    // Half the keys asked for exist, so the miss rate moves from sample to sample. Measured once
    // the status shows traffic figures (the window must be half covered first).
    let mut i = 0u32;
    let mut traffic = async || {
        let _ = client
            .get(format!("key{}", (i * 7919) % 6000).as_bytes())
            .await
            .unwrap_or_else(|e| panic!("get: {e}"));
        i += 1;
    };
    let warm = Instant::now();
    while handle
        .resource()
        .status
        .is_none_or(|s| s.requests_per_minute.is_none())
    {
        assert!(warm.elapsed() < TIMEOUT, "no traffic figures in the status");
        traffic().await;
    }
    let before = h.operator.metrics().status_writes(&label);
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(3) {
        traffic().await;
    }
    let steady_writes = h.operator.metrics().status_writes(&label) - before;
    let steady_time = steady.elapsed();

    let mut spec = handle.resource().spec;
    spec.scaling.mode = ScalingMode::Manual;
    spec.scaling.max_replicas = 3;
    spec.scaling.replicas = 3;
    let before = h.operator.metrics().status_writes(&label);
    let resize = Instant::now();
    handle
        .set_spec(spec)
        .await
        .unwrap_or_else(|e| panic!("set_spec: {e}"));
    h.until(&pool, "3 ready nodes, idle", |r| {
        r.status.as_ref().is_some_and(|s| {
            s.ready_replicas == 3 && s.migration.is_none() && s.phase == Some(PoolPhase::Ready)
        })
    })
    .await;
    let resize_writes = h.operator.metrics().status_writes(&label) - before;
    let resize_time = resize.elapsed();
    h.stop().await;
    (steady_writes, steady_time, resize_writes, resize_time)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_back_fast_counters_cuts_status_writes() {
    let per_minute = |writes: u64, took: Duration| writes as f64 * 60.0 / took.as_secs_f64();
    let (old_steady, old_steady_t, old_resize, old_resize_t) =
        measure_status_writes(Duration::ZERO).await;
    let (new_steady, new_steady_t, new_resize, new_resize_t) =
        measure_status_writes(DriverOptions::default().status_counter_interval).await;
    println!(
        "status writes, every change written: steady {old_steady} in {old_steady_t:?} ({:.0}/min), \
         grow 1->3 {old_resize} in {old_resize_t:?}",
        per_minute(old_steady, old_steady_t)
    );
    println!(
        "status writes, fast counters held back: steady {new_steady} in {new_steady_t:?} ({:.0}/min), \
         grow 1->3 {new_resize} in {new_resize_t:?}",
        per_minute(new_steady, new_steady_t)
    );
    // Samples every 100 ms change the traffic figures: writing every change writes often.
    assert!(
        old_steady >= 5,
        "the measurement saw no traffic changes: {old_steady}"
    );
    assert!(
        new_steady <= 1,
        "{new_steady} writes of a steady pool in 3 s"
    );
    assert!(new_resize <= old_resize, "{new_resize} > {old_resize}");
}

/// Auto mode held at one node, judged every second on little traffic: every window of all
/// misses marks one node as too small.
const LEARNING_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: learner}
spec:
  cache: {capacityMiB: 8, maxItemSizeKiB: 1024}
  scaling:
    mode: auto
    minReplicas: 1
    maxReplicas: 1
    auto: {windowSeconds: 1, cooldownSeconds: 0, minRequestsPerWindow: 10}
  provider: {process: {}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_autoscaler_learned_survives_an_operator_restart() {
    let h = start("learner", LEARNING_POOL).await;
    let pool = PoolRef::new("default", "learner");
    h.until(&pool, "Ready", |r| phase(r) == Some(PoolPhase::Ready))
        .await;
    // Gets of keys nobody stored: every window misses everything, so one node proves too
    // small (the pool may not grow: maxReplicas is 1).
    let client = client_for(&h, &pool).await;
    let start = Instant::now();
    let mut i = 0u64;
    let learned = loop {
        for _ in 0..50 {
            let key = format!("never-stored-{i}");
            let got = client.get(key.as_bytes()).await;
            assert!(matches!(got, Ok(None)), "{key}: {got:?}");
            i += 1;
        }
        let resource = h.operator.registry().get(&pool).map(|p| p.resource());
        if let Some(memory) = resource
            .and_then(|r| r.status)
            .and_then(|s| s.autoscaler)
            .filter(|m| m.too_small.iter().any(|mark| mark.replicas == 1))
        {
            break memory;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no too-small mark in the status after {i} gets"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mark = &learned.too_small[0];
    assert!(mark.miss_rate > 0.4, "{learned:?}");
    drop(client);
    let dir = h.stop_keeping_state().await;

    // The restarted operator shows the same memory from its first status on, before any
    // window of its own has been judged (no traffic now: none would count).
    let h = start_in(dir, DriverOptions::default().status_counter_interval).await;
    let restored = h
        .until(&pool, "Ready after the restart", |r| {
            phase(r) == Some(PoolPhase::Ready)
        })
        .await;
    let memory = restored.status.and_then(|s| s.autoscaler);
    let marks: Vec<_> = memory.iter().flat_map(|m| m.too_small.clone()).collect();
    assert!(
        marks.iter().any(|m| m.replicas == 1 && m.at == mark.at),
        "the mark of {:?} was lost in the restart: {memory:?}",
        mark.at
    );
    println!(
        "learned after {i} gets in {:?}: {learned:?}; restored: {memory:?}",
        start.elapsed()
    );
    h.stop().await;
}

fn vetted_pool(replicas: u32) -> String {
    format!(
        "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {{name: vetted}}
spec:
  cache: {{capacityMiB: 8, maxItemSizeKiB: 1024}}
  scaling: {{mode: manual, replicas: {replicas}}}
  provider: {{process: {{}}}}
"
    )
}

/// Stores `key` on the node at `address` over the memcached protocol.
async fn store_on(address: &str, key: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
    conn.write_all(format!("set {key} 0 0 5\r\nstale\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("writing to {address}: {e}"));
    let mut answer = [0u8; 8];
    conn.read_exact(&mut answer)
        .await
        .unwrap_or_else(|e| panic!("reading from {address}: {e}"));
    assert_eq!(&answer, b"STORED\r\n", "set {key} on {address}");
}

/// Nodes left outside the rings by an operator that stopped (as pods and instances outlive it)
/// are told apart by what they hold: one that never stored an item (launched just before a
/// crash) becomes its slot's node, with no second launch; one that did (it was a member once, its
/// values may be stale) is stopped, and its slot gets a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_takes_an_unrecorded_node_only_if_it_never_stored_an_item() {
    let nodes = Arc::new(EmbeddedProvider::outliving_the_operator());
    let dir = TempDir::new("seams-vetted");
    dir.write("pool.yaml", &vetted_pool(1));
    let pool = PoolRef::new("default", "vetted");
    let h = start_on(
        dir,
        nodes.clone(),
        DriverOptions::default().status_counter_interval,
    )
    .await;
    h.until(&pool, "Ready with one node", |r| {
        phase(r) == Some(PoolPhase::Ready)
    })
    .await;
    let Harness { operator, dir, .. } = h;
    operator
        .stop()
        .await
        .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
    assert_eq!(nodes.running(), 1, "the node outlives the operator");

    // While no operator runs: two nodes the record does not know, for slots 1 and 2 of the
    // pool about to grow to 3. Slot 1's stored an item, slot 2's never did.
    let spec = |slot| LaunchSpec {
        pool: pool.clone(),
        uid: String::new(),
        slot,
        tags: LaunchSpec::standard_tags(&pool, slot, "test"),
        provider: ProviderSpec::default(),
        capacity_mib: 8,
        policy: "sieve".to_owned(),
        max_item_size_kib: 1024,
        admin_token: AdminToken::generate(),
    };
    let held = nodes
        .launch(&spec(1))
        .await
        .unwrap_or_else(|e| panic!("launching slot 1's node: {e}"));
    let unused = nodes
        .launch(&spec(2))
        .await
        .unwrap_or_else(|e| panic!("launching slot 2's node: {e}"));
    store_on(&held.address, "left-behind").await;
    let launches_before = nodes.launches();
    dir.write("pool.yaml", &vetted_pool(3));

    let h = start_on(
        dir,
        nodes.clone(),
        DriverOptions::default().status_counter_interval,
    )
    .await;
    let grown = h
        .until(&pool, "Ready with three members", |r| {
            phase(r) == Some(PoolPhase::Ready)
                && r.status.as_ref().is_some_and(|s| {
                    s.migration.is_none()
                        && s.ring.as_ref().is_some_and(|ring| ring.members.len() == 3)
                })
        })
        .await;
    let ring = grown
        .status
        .and_then(|s| s.ring)
        .unwrap_or_else(|| panic!("no ring"));
    let at = |slot: u32| {
        ring.members
            .iter()
            .find(|m| m.slot == slot)
            .map(|m| m.address.clone())
            .unwrap_or_else(|| panic!("no member for slot {slot}: {ring:?}"))
    };
    assert_eq!(
        at(2),
        unused.address,
        "the node that never stored an item is slot 2's member"
    );
    assert_ne!(
        at(1),
        held.address,
        "the node that held an item joined the ring"
    );
    assert_eq!(
        nodes.launches() - launches_before,
        1,
        "one launch (slot 1's new node), none for slot 2"
    );
    let stores = nodes.stores(&pool);
    assert!(
        !stores.contains_key(&held.id),
        "the node that held an item was not stopped"
    );
    h.operator
        .stop()
        .await
        .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
    nodes
        .stop_all()
        .await
        .unwrap_or_else(|e| panic!("stopping the nodes: {e}"));
    assert_eq!(nodes.running(), 0, "every embedded node is stopped");
}
