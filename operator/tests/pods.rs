//! The pod provider through the real operator, with a fake pod backend: each "pod" the
//! provider creates is served by a node inside the test process, started with the arguments
//! and the Secret's token the pod spec carries, at the loopback ports it bound (its "pod IP").
//! So the driver, the hand-off and the ring run end to end on what the provider really asks
//! Kubernetes for: grow and shrink keep every cached key, a deleted pod is replaced in its
//! slot, and deleting the pool leaves no pod.

use std::collections::BTreeMap;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cache_node::client::{ClientOptions, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::pool::{CachePool, PoolPhase};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::provider::PoolRef;
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::provider::pod::{PodApi, PodOptions, PodProvider, TOKEN_KEY};
use cachepool_operator::provider::{self, ProviderKind};
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_operator::store::BoxFuture;
use cachepool_test_support::servers::TempDir;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const TOKEN: &str = "pods-test-token";
const TIMEOUT: Duration = Duration::from_secs(30);

/// `expect` for the fixtures (clippy allows `unwrap` only inside the test itself).
trait Must<T> {
    fn must(self, what: &str) -> T;
}

impl<T> Must<T> for Option<T> {
    fn must(self, what: &str) -> T {
        self.unwrap_or_else(|| panic!("{what}: nothing"))
    }
}

impl<T, E: std::fmt::Display> Must<T> for Result<T, E> {
    fn must(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// A pod and the node serving it.
#[derive(Debug)]
struct FakePod {
    pod: Pod,
    node: Option<Node>,
}

/// Pods and Secrets kept in memory; every pod is served by an embedded node.
#[derive(Debug, Default)]
struct FakePods {
    pods: Mutex<BTreeMap<String, FakePod>>,
    secrets: Mutex<BTreeMap<String, Secret>>,
    created: Mutex<Vec<Pod>>,
}

fn arg(args: &[String], flag: &str) -> String {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("the pod has no {flag}: {args:?}"));
    args[at + 1].clone()
}

fn matches(pod: &Pod, selector: &str) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        labels.get(k).map(String::as_str) == Some(v)
    })
}

impl FakePods {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakePod>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names of the pods that exist.
    fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Deletes a pod behind the operator's back (`kubectl delete pod`).
    async fn delete_by_hand(&self, name: &str) {
        let node = self.lock().remove(name).and_then(|mut p| p.node.take());
        if let Some(node) = node {
            node.shutdown().await;
        }
    }

    async fn start(&self, mut pod: Pod) -> Pod {
        let container = &pod.spec.as_ref().must("fake pod backend").containers[0];
        let args = container.args.clone().must("fake pod backend");
        let secret_ref = container.env.as_ref().must("fake pod backend")[0]
            .value_from
            .as_ref()
            .must("fake pod backend")
            .secret_key_ref
            .clone()
            .must("fake pod backend");
        let namespace = pod.metadata.namespace.clone().must("fake pod backend");
        let token = {
            let secrets = self.secrets.lock().must("fake pod backend");
            let secret = &secrets[&format!("{namespace}/{}", secret_ref.name)];
            secret.string_data.as_ref().must("fake pod backend")[&secret_ref.key].clone()
        };
        let mut config = NodeConfig::ephemeral(
            arg(&args, "--capacity-mib")
                .parse()
                .must("fake pod backend"),
            arg(&args, "--policy")
                .parse::<Policy>()
                .must("fake pod backend"),
            Some(&token),
        );
        config.max_item_size_kib = arg(&args, "--max-item-size-kib")
            .parse()
            .must("fake pod backend");
        let node = Node::start(config).await.must("fake pod backend");
        pod.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        pod.metadata.annotations.get_or_insert_default().insert(
            "test/addresses".to_owned(),
            format!("{} {}", node.addr, node.admin_addr),
        );
        pod.status = Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some("127.0.0.1".to_owned()),
            ..PodStatus::default()
        });
        self.created
            .lock()
            .must("fake pod backend")
            .push(pod.clone());
        self.lock().insert(
            pod.metadata.name.clone().must("fake pod backend"),
            FakePod {
                pod: pod.clone(),
                node: Some(node),
            },
        );
        pod
    }
}

impl PodApi for FakePods {
    fn create_pod(&self, pod: Pod) -> BoxFuture<'_, provider::Result<Pod>> {
        Box::pin(async move { Ok(self.start(pod).await) })
    }

    fn list_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, provider::Result<Vec<Pod>>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .values()
                .filter(|p| p.pod.metadata.namespace.as_deref() == Some(namespace))
                .filter(|p| matches(&p.pod, selector))
                .map(|p| p.pod.clone())
                .collect())
        })
    }

    fn delete_pod<'a>(
        &'a self,
        _namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, provider::Result<()>> {
        Box::pin(async move {
            self.delete_by_hand(name).await;
            Ok(())
        })
    }

    fn ensure_secret<'a>(
        &'a self,
        namespace: &'a str,
        secret: Secret,
    ) -> BoxFuture<'a, provider::Result<Secret>> {
        Box::pin(async move {
            let key = format!(
                "{namespace}/{}",
                secret.metadata.name.clone().unwrap_or_default()
            );
            let mut secrets = self.secrets.lock().must("fake pod backend");
            Ok(secrets.entry(key).or_insert(secret).clone())
        })
    }

    fn addresses(&self, pod: &Pod) -> Option<(String, String)> {
        let text = pod.metadata.annotations.as_ref()?.get("test/addresses")?;
        let (data, admin) = text.split_once(' ')?;
        Some((data.to_owned(), admin.to_owned()))
    }
}

const POOL_YAML: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: web-cache}
spec:
  cache: {capacityMiB: 16, maxItemSizeKiB: 1024}
  scaling: {mode: manual, replicas: 1, maxReplicas: 4}
  provider: {pod: {image: registry.example/cachepool:test}}
";

async fn until(
    operator: &Operator,
    pool: &PoolRef,
    what: &str,
    check: impl Fn(&CachePool) -> bool,
) {
    let start = Instant::now();
    loop {
        if let Some(resource) = operator.registry().get(pool).map(|h| h.resource())
            && check(&resource)
        {
            return;
        }
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settled(n: u32) -> impl Fn(&CachePool) -> bool {
    move |r| {
        r.status.as_ref().is_some_and(|s| {
            s.phase == Some(PoolPhase::Ready) && s.ready_replicas == n && s.migration.is_none()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_serve_a_pool_through_resizes_replacement_and_deletion() {
    let dir = TempDir::new("pods");
    dir.write("pool.yaml", POOL_YAML);
    let fake = Arc::new(FakePods::default());
    let mut config = Config::standalone(
        dir.path(),
        NodeBackend::Embedded(Arc::new(EmbeddedProvider::new())),
        "127.0.0.1:0",
        TOKEN,
    );
    config.driver = DriverOptions {
        probe_interval: Duration::from_millis(50),
        ..DriverOptions::default()
    };
    config.standalone = StandaloneOptions {
        scan_interval: Duration::from_millis(50),
    };
    let mut options = PodOptions::new("cachepool:operator-image");
    options.address_timeout = Duration::from_secs(5);
    config.pods = Some(Arc::new(PodProvider::new(fake.clone(), options)));
    let operator = Operator::start(config).await.unwrap();
    let pool = PoolRef::new("default", "web-cache");
    until(&operator, &pool, "one ready pod", settled(1)).await;

    // What the provider asked Kubernetes for.
    let first = fake.created.lock().unwrap()[0].clone();
    let labels = first.metadata.labels.clone().unwrap();
    assert_eq!(labels["cachepool.io/pool"], "web-cache");
    assert_eq!(labels["cachepool.io/slot"], "0");
    let owner = &first.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("CachePool", "web-cache")
    );
    assert_eq!(owner.controller, Some(true));
    let spec = first.spec.as_ref().unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let container = &spec.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/cachepool:test")
    );
    let env = &container.env.as_ref().unwrap()[0];
    assert!(
        env.value.is_none(),
        "the admin token is never in the pod spec"
    );
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .key,
        TOKEN_KEY
    );
    let memory = &container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap()["memory"];
    assert_eq!(memory.0, "48Mi", "capacity 16 MiB + 32 MiB overhead");
    let handle = operator.registry().get(&pool).unwrap();
    let selector = handle.resource().status.unwrap().selector;
    assert_eq!(selector.as_deref(), Some("cachepool.io/pool=web-cache"));

    // Cache some keys, then grow 1 -> 3 and shrink back: every key is still served.
    let ring = handle.ring().borrow().clone().unwrap();
    let client = PoolClient::new(ring, ClientOptions::default()).unwrap();
    for i in 0..500 {
        client
            .set(format!("k{i}"), format!("v{i}").as_bytes(), 0, 0)
            .await
            .unwrap();
    }
    for (n, what) in [(3, "grown to 3 pods"), (1, "shrunk to 1 pod")] {
        let mut spec = handle.resource().spec;
        spec.scaling.replicas = n;
        let scaled = Instant::now();
        handle.set_spec(spec).await.unwrap();
        until(&operator, &pool, what, settled(n)).await;
        println!(
            "{what} in {:?} (spec change to settled pool)",
            scaled.elapsed()
        );
        client.set_ring(handle.ring().borrow().clone().unwrap());
        for i in 0..500 {
            let value = client.get(format!("k{i}")).await.unwrap();
            assert_eq!(
                value.map(|v| v.data.to_vec()),
                Some(format!("v{i}").into_bytes()),
                "k{i} after {what}"
            );
        }
        assert_eq!(fake.names().len(), n as usize, "{:?}", fake.names());
    }

    // A pod deleted by hand is replaced in its slot.
    let victim = fake.names()[0].clone();
    fake.delete_by_hand(&victim).await;
    until(&operator, &pool, "a replacement pod", |r| {
        settled(1)(r)
            && r.status
                .as_ref()
                .is_some_and(|s| s.nodes.iter().all(|n| n.id != victim))
    })
    .await;
    let names = fake.names();
    assert_eq!(names.len(), 1);
    assert!(names[0].starts_with("web-cache-0-"), "{names:?}");

    // Deleting the pool deletes every pod; the operator's own stop would leave them running.
    dir.remove("pool.yaml");
    let start = Instant::now();
    while operator.registry().get(&pool).is_some() || !fake.names().is_empty() {
        assert!(start.elapsed() < TIMEOUT, "pods left: {:?}", fake.names());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    operator.stop().await.unwrap();
    assert_eq!(ProviderKind::Pod.as_str(), "pod");
}
