//! The pod provider: each node is a Pod running `cachepool node` from the operator's own
//! image, owned by its CachePool — what a pool runs on in a Kubernetes cluster (kind
//! included).
//!
//! How a node pod is made (`node_pod`):
//! - named `<pool>-<slot>-<5 random chars>` (a replacement never collides with the pod it
//!   replaces while that one terminates), labelled `cachepool.io/pool=<name>` and
//!   `cachepool.io/slot=<slot>` (plus the `app.kubernetes.io/*` set), annotated with the
//!   operator's id, and owned by the CachePool (owner reference with `controller: true`), so
//!   Kubernetes' garbage collector also removes the pods of a deleted pool;
//! - `restartPolicy: Never`: a node that dies comes back empty, so it must not silently rejoin
//!   the ring under its old address. A failed pod is listed dead and the reconcile core replaces
//!   it in its slot with a fresh one, exactly as a crashed process;
//! - memory request and limit derived from `capacityMiB` plus the node's measured overhead
//!   (`PodOptions::overhead_mib`) unless the spec gives `resources`;
//! - readiness probe on the admin port's `/readyz`, liveness on `/healthz`; non-root,
//!   read-only root filesystem, no privilege escalation, every capability dropped;
//! - the admin token from a per-pool Secret (`<pool>-cachepool-admin`, key `token`) that the
//!   provider creates once (owned by the pool too), through `secretKeyRef`: never in the pod
//!   spec in clear. Every node of a pool shares that token (a Secret per node would multiply
//!   objects for no gain: whoever can read one Secret of the namespace can read them all).
//!
//! The provider talks to Kubernetes through [`PodApi`], so the same code runs against the API
//! server (`KubePods`, in Kubernetes mode) and against a test backend that runs each "pod" as a
//! local node and reports its loopback address.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Pod, PodSpec,
    Probe, ResourceRequirements, Secret, SecretKeySelector, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Error, LaunchSpec, PoolRef, Provider, ProviderKind, ProviderNode, Result, ShutdownPolicy, tags,
};
use crate::store::BoxFuture;

/// Data port of a node pod.
pub const DATA_PORT: u16 = 11211;
/// Admin port of a node pod.
pub const ADMIN_PORT: u16 = 11212;
/// Key of the admin token in the pool's Secret.
pub const TOKEN_KEY: &str = "token";

/// What a node pod may be configured with (`spec.provider.pod`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSettings {
    /// Image to run instead of the operator's own.
    pub image: Option<String>,
    /// Resources instead of the derived memory request and limit.
    pub resources: Option<ResourceRequirements>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub tolerations: Option<Vec<Toleration>>,
}

/// How the provider makes pods.
#[derive(Clone, Debug)]
pub struct PodOptions {
    /// The operator's own image (`cachepool`), used unless the spec names another.
    pub image: String,
    /// Memory a node uses beyond its cache capacity (runtime, buffers, connections), added to
    /// the derived request and limit.
    pub overhead_mib: u32,
    /// How long `launch` waits for the new pod to get an IP.
    pub address_timeout: Duration,
    /// Identifies this operator on the pods it starts.
    pub operator_id: String,
}

impl PodOptions {
    /// Options with the defaults: 32 MiB overhead, 60 s for an address.
    pub fn new(image: impl Into<String>) -> PodOptions {
        PodOptions {
            image: image.into(),
            overhead_mib: 32,
            address_timeout: Duration::from_secs(60),
            operator_id: "cachepool-operator".to_owned(),
        }
    }
}

/// The calls the pod provider makes to Kubernetes (or to a test backend).
pub trait PodApi: Send + Sync + fmt::Debug + 'static {
    /// Creates `pod` in its namespace.
    fn create_pod(&self, pod: Pod) -> BoxFuture<'_, Result<Pod>>;
    /// The pods of `namespace` matching the label selector.
    fn list_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>>>;
    /// Deletes a pod; an absent one is Ok.
    fn delete_pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<()>>;
    /// The Secret `name` of `namespace`, created from `secret` if it does not exist.
    fn ensure_secret<'a>(
        &'a self,
        namespace: &'a str,
        secret: Secret,
    ) -> BoxFuture<'a, Result<Secret>>;
    /// The data and admin `host:port` of a running pod: its IP and the node's ports in a
    /// cluster; a test backend answers with the loopback ports its local node bound.
    fn addresses(&self, pod: &Pod) -> Option<(String, String)> {
        let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
        Some((format!("{ip}:{DATA_PORT}"), format!("{ip}:{ADMIN_PORT}")))
    }
}

/// Runs nodes as pods (see the module documentation).
#[derive(Clone)]
pub struct PodProvider {
    api: Arc<dyn PodApi>,
    opts: PodOptions,
}

impl fmt::Debug for PodProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodProvider")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Name of a pool's admin-token Secret.
pub fn secret_name(pool: &str) -> String {
    format!("{pool}-cachepool-admin")
}

/// Label selector of a pool's node pods.
pub fn pool_selector(pool: &str) -> String {
    format!("{}={pool}", tags::POOL)
}

fn api_error(action: &'static str, message: impl Into<String>) -> Error {
    Error::Api {
        provider: ProviderKind::Pod,
        action,
        message: message.into(),
    }
}

/// The owner reference that makes an object belong to the CachePool `pool` (uid `uid`).
fn owned_by(pool: &PoolRef, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "cachepool.io/v1alpha1".to_owned(),
        kind: "CachePool".to_owned(),
        name: pool.name.clone(),
        uid: uid.to_owned(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The labels of a node pod.
fn pod_labels(pool: &PoolRef, slot: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (tags::POOL.to_owned(), pool.name.clone()),
        (tags::SLOT.to_owned(), slot.to_string()),
        (
            "app.kubernetes.io/name".to_owned(),
            "cachepool-node".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pool.name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "cachepool-operator".to_owned(),
        ),
    ])
}

/// The Pod of one node (see the module documentation).
pub fn node_pod(spec: &LaunchSpec, settings: &PodSettings, opts: &PodOptions) -> Pod {
    let suffix: String = (0..5)
        .map(|_| {
            let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
            char::from(alphabet[rand::random_range(0..alphabet.len())])
        })
        .collect();
    let memory = Quantity(format!("{}Mi", spec.capacity_mib + opts.overhead_mib));
    let resources = settings.resources.clone().unwrap_or(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("memory".to_owned(), memory.clone()),
            ("cpu".to_owned(), Quantity("100m".to_owned())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), memory)])),
        ..ResourceRequirements::default()
    });
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let args = vec![
        "node".to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{DATA_PORT}"),
        "--admin-listen".to_owned(),
        format!("0.0.0.0:{ADMIN_PORT}"),
        "--capacity-mib".to_owned(),
        spec.capacity_mib.to_string(),
        "--policy".to_owned(),
        spec.policy.clone(),
        "--max-item-size-kib".to_owned(),
        spec.max_item_size_kib.to_string(),
    ];
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}-{suffix}", spec.pool.name, spec.slot)),
            namespace: Some(spec.pool.namespace.clone()),
            labels: Some(pod_labels(&spec.pool, spec.slot)),
            annotations: Some(BTreeMap::from([(
                tags::OPERATOR.to_owned(),
                opts.operator_id.clone(),
            )])),
            owner_references: Some(vec![owned_by(&spec.pool, &spec.uid)]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            automount_service_account_token: Some(false),
            node_selector: settings.node_selector.clone(),
            tolerations: settings.tolerations.clone(),
            containers: vec![Container {
                name: "node".to_owned(),
                image: Some(settings.image.clone().unwrap_or_else(|| opts.image.clone())),
                args: Some(args),
                env: Some(vec![EnvVar {
                    name: "CACHEPOOL_ADMIN_TOKEN".to_owned(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret_name(&spec.pool.name),
                            key: TOKEN_KEY.to_owned(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                }]),
                ports: Some(vec![
                    ContainerPort {
                        name: Some("memcached".to_owned()),
                        container_port: i32::from(DATA_PORT),
                        ..ContainerPort::default()
                    },
                    ContainerPort {
                        name: Some("admin".to_owned()),
                        container_port: i32::from(ADMIN_PORT),
                        ..ContainerPort::default()
                    },
                ]),
                readiness_probe: Some(probe("/readyz", 2)),
                liveness_probe: Some(probe("/healthz", 10)),
                resources: Some(resources),
                security_context: Some(SecurityContext {
                    run_as_non_root: Some(true),
                    read_only_root_filesystem: Some(true),
                    allow_privilege_escalation: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_owned()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The Secret holding a new pool's admin token.
fn token_secret(pool: &PoolRef, uid: &str, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&pool.name)),
            namespace: Some(pool.namespace.clone()),
            labels: Some(BTreeMap::from([(tags::POOL.to_owned(), pool.name.clone())])),
            owner_references: Some(vec![owned_by(pool, uid)]),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), token.to_owned())])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// The token a Secret holds (`data` as the API server returns it, or `stringData` as created).
fn secret_token(secret: &Secret) -> Option<String> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(TOKEN_KEY)) {
        return String::from_utf8(bytes.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .cloned()
}

impl PodProvider {
    /// A provider making pods through `api`.
    pub fn new(api: Arc<dyn PodApi>, opts: PodOptions) -> PodProvider {
        PodProvider { api, opts }
    }

    /// The pool's admin token, from its Secret (created with `proposed` if absent).
    async fn token(&self, pool: &PoolRef, uid: &str, proposed: &str) -> Result<String> {
        let secret = self
            .api
            .ensure_secret(&pool.namespace, token_secret(pool, uid, proposed))
            .await?;
        secret_token(&secret).ok_or_else(|| {
            api_error(
                "reading the admin token",
                format!(
                    "secret {}/{} has no `{TOKEN_KEY}` key; delete it to have a new one made",
                    pool.namespace,
                    secret_name(&pool.name)
                ),
            )
        })
    }

    fn node(&self, pod: &Pod, token: &str) -> Option<ProviderNode> {
        let meta = &pod.metadata;
        let slot = meta.labels.as_ref()?.get(tags::SLOT)?.parse().ok()?;
        let (address, admin_address) = self.api.addresses(pod).unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let alive =
            meta.deletion_timestamp.is_none() && !matches!(phase, Some("Failed" | "Succeeded"));
        Some(ProviderNode {
            slot,
            id: meta.name.clone()?,
            address,
            admin_address,
            admin_token: token.to_owned(),
            launched_at: meta
                .creation_timestamp
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, |t| SystemTime::from(t.0)),
            alive,
        })
    }
}

impl Provider for PodProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pod
    }

    fn shutdown_policy(&self) -> ShutdownPolicy {
        ShutdownPolicy::KeepNodes
    }

    async fn list(&self, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        let pods = self
            .api
            .list_pods(&pool.namespace, &pool_selector(&pool.name))
            .await?;
        if pods.is_empty() {
            return Ok(Vec::new());
        }
        // The pool's Secret exists whenever it has pods (launch makes it first).
        let secret = self
            .api
            .ensure_secret(&pool.namespace, token_secret(pool, "", ""))
            .await?;
        let token = secret_token(&secret).unwrap_or_default();
        let mut nodes: Vec<ProviderNode> = pods
            .iter()
            // A pod not yet given an address is not a node yet: launch waits for it.
            .filter_map(|pod| self.node(pod, &token))
            .filter(|node| !node.address.is_empty() || !node.alive)
            .collect();
        nodes.sort_by(|a, b| (a.slot, a.launched_at, &a.id).cmp(&(b.slot, b.launched_at, &b.id)));
        Ok(nodes)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        let settings = pod_settings(&spec.provider);
        let token = self
            .token(&spec.pool, &spec.uid, spec.admin_token.expose())
            .await?;
        let pod = node_pod(spec, &settings, &self.opts);
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.api.create_pod(pod).await?;
        // The pod has no IP until it is scheduled and its sandbox is up; poll for it.
        let selector = format!(
            "{},{}={}",
            pool_selector(&spec.pool.name),
            tags::SLOT,
            spec.slot
        );
        let deadline = tokio::time::Instant::now() + self.opts.address_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let pods = self.api.list_pods(&spec.pool.namespace, &selector).await?;
            if let Some(node) = pods
                .iter()
                .filter(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                .find_map(|p| self.node(p, &token))
            {
                if !node.alive {
                    return Err(Error::NodeExited {
                        pool: spec.pool.clone(),
                        slot: spec.slot,
                        status: format!("pod {name} failed before it got an address"),
                        log_tail: String::new(),
                    });
                }
                if !node.address.is_empty() {
                    return Ok(node);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                // Not left behind half made: the slot gets a new attempt.
                let _ = self.api.delete_pod(&spec.pool.namespace, &name).await;
                return Err(Error::StartTimeout {
                    pool: spec.pool.clone(),
                    slot: spec.slot,
                    timeout: self.opts.address_timeout,
                    log_tail: format!(
                        "pod {name} got no IP (unschedulable? see `kubectl describe pod {name}`)"
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn terminate(&self, pool: &PoolRef, id: &str) -> Result<()> {
        self.api.delete_pod(&pool.namespace, id).await
    }

    async fn stop_all(&self) -> Result<()> {
        // Pods outlive the operator (ShutdownPolicy::KeepNodes); nothing is stopped here.
        Ok(())
    }
}

/// The pod settings of a pool's `spec.provider`.
fn pod_settings(spec: &cachepool_crds::pool::ProviderSpec) -> PodSettings {
    spec.pod
        .as_ref()
        .map(|pod| PodSettings {
            image: pod.image.clone(),
            resources: pod.resources.clone(),
            node_selector: pod.node_selector.clone(),
            tolerations: pod.tolerations.clone(),
        })
        .unwrap_or_default()
}
