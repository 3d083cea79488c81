//! Where a pool's nodes run: the seam between the reconcile core and the machines.
//!
//! The core decides how many nodes a pool needs and which slot each one fills; a [`Provider`]
//! only starts, lists and stops them. The trait is deliberately small and says nothing about
//! processes, pods or instances. Each pool is served by the provider its `spec.provider` names:
//! [`Providers`] holds the providers this operator was started with and resolves a spec to a
//! [`PoolProvider`] (an enum over them, so the driver dispatches without trait objects); a
//! pool that names a provider the operator cannot serve gets [`Unserved`] and starts nothing.
//!
//! Rules that shape the trait:
//!
//! - `launch` returns as soon as the node's addresses are known, not when it is ready: the
//!   core already polls `/readyz` for every node it depends on, and one place doing that keeps
//!   readiness timeouts in one policy (for EC2 that is minutes, for a process milliseconds).
//! - `list` reports dead nodes (`alive: false`) instead of hiding them, so the core sees a
//!   crash as a crash and replaces the node in its slot; `terminate` is what forgets a node.
//! - What happens to the nodes when the operator stops is the provider's [`ShutdownPolicy`]:
//!   local processes die with their supervisor, pods and instances stay for the next leader.

#[cfg(feature = "ec2")]
pub mod ec2;
pub mod embedded;
pub mod pod;
pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cachepool_crds::pool::ProviderSpec;

/// A pool, as the operator addresses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolRef {
    pub namespace: String,
    pub name: String,
}

impl PoolRef {
    /// The pool `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> PoolRef {
        PoolRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PoolRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds of provider a spec can name (`spec.provider.<kind>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderKind {
    /// Local child processes (standalone mode).
    Process,
    /// Pods in the pool's namespace (Kubernetes mode).
    Pod,
    /// EC2 instances.
    Ec2,
}

impl ProviderKind {
    /// The kind a spec names, `None` when it names none or several (an invalid spec).
    pub fn of(spec: &ProviderSpec) -> Option<ProviderKind> {
        match (&spec.process, &spec.pod, &spec.ec2) {
            (Some(_), None, None) => Some(ProviderKind::Process),
            (None, Some(_), None) => Some(ProviderKind::Pod),
            (None, None, Some(_)) => Some(ProviderKind::Ec2),
            _ => None,
        }
    }

    /// The spec's field name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Process => "process",
            ProviderKind::Pod => "pod",
            ProviderKind::Ec2 => "ec2",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Label, tag or annotation keys the operator puts on every node it starts (as EC2 tags,
/// pod labels; the process provider keeps them in its records).
pub mod tags {
    /// `<namespace>/<name>` of the pool.
    pub const POOL: &str = "cachepool.io/pool";
    /// The node's ring slot.
    pub const SLOT: &str = "cachepool.io/slot";
    /// Which operator installation started it (tagged nodes of another operator are not ours).
    pub const OPERATOR: &str = "cachepool.io/operator";
}

/// A node's admin token. Its `Debug` is redacted so that logging a launch does not leak it.
///
/// The driver mints one per node and hands it over in the [`LaunchSpec`]; how it reaches the
/// node is the provider's business and never through a place other users can read: the
/// process provider passes it in the child's environment (not its argv, which
/// `/proc/<pid>/cmdline` shows to everyone); pods get it from a Secret, instances from a
/// parameter their role may read, never from user data.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A new random token (256 bits, hex).
    pub fn generate() -> AdminToken {
        AdminToken(hex::encode(rand::random::<[u8; 32]>()))
    }

    /// A token known from elsewhere (an adopted node's record).
    pub fn from_secret(token: impl Into<String>) -> AdminToken {
        AdminToken(token.into())
    }

    /// The token itself, for the one place that delivers it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Everything a provider needs to start one node: which pool and slot it is for, what it is
/// tagged with, the pool's provider settings, the node's cache settings and its admin token.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    pub pool: PoolRef,
    /// `metadata.uid` of the pool: with the slot and an attempt number, what makes an
    /// idempotent launch key (EC2's `ClientToken`).
    pub uid: String,
    pub slot: u32,
    /// What the node is tagged or labelled with (see [`tags`]).
    pub tags: BTreeMap<String, String>,
    /// The pool's `spec.provider` (the settings of the provider that serves it).
    pub provider: ProviderSpec,
    pub capacity_mib: u32,
    /// Replacement policy as the node's `--policy` flag spells it (`lru`, `random`, `sieve`).
    pub policy: String,
    pub max_item_size_kib: u32,
    pub admin_token: AdminToken,
}

impl LaunchSpec {
    /// The standard tags of a node of `pool` in `slot`, started by operator `operator_id`.
    pub fn standard_tags(pool: &PoolRef, slot: u32, operator_id: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (tags::POOL.to_owned(), pool.to_string()),
            (tags::SLOT.to_owned(), slot.to_string()),
            (tags::OPERATOR.to_owned(), operator_id.to_owned()),
        ])
    }
}

/// One node as the provider sees it. Its `Debug` leaves the admin token out, so logging a node
/// does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderNode {
    /// The ring slot the node was launched for.
    pub slot: u32,
    /// Provider id: `pid-12345` for a process, an instance id for EC2.
    pub id: String,
    /// Memcached data `host:port`.
    pub address: String,
    /// Admin HTTP `host:port`.
    pub admin_address: String,
    /// Bearer token of this node's admin API (random per node).
    pub admin_token: String,
    pub launched_at: SystemTime,
    /// False once the node is known to have exited (crash, `kill -9`).
    pub alive: bool,
}

impl fmt::Debug for ProviderNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderNode")
            .field("slot", &self.slot)
            .field("id", &self.id)
            .field("address", &self.address)
            .field("admin_address", &self.admin_address)
            .field("admin_token", &"<redacted>")
            .field("launched_at", &self.launched_at)
            .field("alive", &self.alive)
            .finish()
    }
}

/// What becomes of a provider's nodes when the operator stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownPolicy {
    /// Stop them: they cannot outlive their supervisor usefully (local processes), unless the
    /// operator is told to keep them for the next one on the same machine.
    StopNodes,
    /// Leave them: the next leader adopts them (pods, instances).
    KeepNodes,
}

/// Starts, lists and stops the nodes of pools.
pub trait Provider: Send + Sync + 'static {
    /// Which `spec.provider` field this provider serves.
    fn kind(&self) -> ProviderKind;

    /// What happens to the nodes when the operator stops.
    fn shutdown_policy(&self) -> ShutdownPolicy;

    /// Every node of the pool that this provider knows of (started now or adopted), alive or not.
    fn list(&self, pool: &PoolRef) -> impl Future<Output = Result<Vec<ProviderNode>>> + Send;

    /// Starts a node for `spec.slot` and returns once its addresses are known. Readiness is
    /// the caller's job (poll `/readyz`). Several nodes may exist for one slot while one
    /// replaces another.
    fn launch(&self, spec: &LaunchSpec) -> impl Future<Output = Result<ProviderNode>> + Send;

    /// Stops a node and forgets it; idempotent (an unknown or already-dead id is Ok).
    fn terminate(&self, pool: &PoolRef, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Stops every node of every pool this provider knows of (operator shutdown under
    /// [`ShutdownPolicy::StopNodes`]).
    fn stop_all(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The provider serving one pool: one of the providers the operator runs.
#[derive(Clone, Debug)]
pub enum PoolProvider {
    /// `cachepool node` child processes.
    Process(Arc<process::ProcessProvider>),
    /// Nodes inside the operator's own process (tests, benchmarks).
    Embedded(Arc<embedded::EmbeddedProvider>),
    /// Pods.
    Pod(Arc<pod::PodProvider>),
    /// EC2 instances (bound to a pool spec's region by [`Providers::resolve`]).
    #[cfg(feature = "ec2")]
    Ec2(ec2::Ec2Pool),
}

impl PoolProvider {
    /// Which `spec.provider` field it serves.
    pub fn kind(&self) -> ProviderKind {
        match self {
            PoolProvider::Process(p) => p.kind(),
            PoolProvider::Embedded(p) => p.kind(),
            PoolProvider::Pod(p) => p.kind(),
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.kind(),
        }
    }

    /// What happens to its nodes when the operator stops.
    pub fn shutdown_policy(&self) -> ShutdownPolicy {
        match self {
            PoolProvider::Process(p) => p.shutdown_policy(),
            PoolProvider::Embedded(p) => p.shutdown_policy(),
            PoolProvider::Pod(p) => p.shutdown_policy(),
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.shutdown_policy(),
        }
    }

    pub async fn list(&self, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        match self {
            PoolProvider::Process(p) => p.list(pool).await,
            PoolProvider::Embedded(p) => p.list(pool).await,
            PoolProvider::Pod(p) => p.list(pool).await,
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.list(pool).await,
        }
    }

    pub async fn launch(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        match self {
            PoolProvider::Process(p) => p.launch(spec).await,
            PoolProvider::Embedded(p) => p.launch(spec).await,
            PoolProvider::Pod(p) => p.launch(spec).await,
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.launch(spec).await,
        }
    }

    pub async fn terminate(&self, pool: &PoolRef, id: &str) -> Result<()> {
        match self {
            PoolProvider::Process(p) => p.terminate(pool, id).await,
            PoolProvider::Embedded(p) => p.terminate(pool, id).await,
            PoolProvider::Pod(p) => p.terminate(pool, id).await,
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.terminate(pool, id).await,
        }
    }

    pub async fn stop_all(&self) -> Result<()> {
        match self {
            PoolProvider::Process(p) => p.stop_all().await,
            PoolProvider::Embedded(p) => p.stop_all().await,
            PoolProvider::Pod(p) => p.stop_all().await,
            #[cfg(feature = "ec2")]
            PoolProvider::Ec2(p) => p.stop_all().await,
        }
    }
}

/// Why a pool's provider cannot be served by this operator: the pool is `Degraded` with this
/// message and nothing starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unserved {
    /// The provider the spec names, if it names exactly one.
    pub kind: Option<ProviderKind>,
    pub message: String,
}

/// The providers one operator runs, by the `spec.provider` field each serves.
#[derive(Clone, Debug, Default)]
pub struct Providers {
    /// Serves `provider: {process: {}}`.
    pub process: Option<PoolProvider>,
    /// Serves `provider: {pod: {...}}`.
    pub pod: Option<PoolProvider>,
    /// Serves `provider: {ec2: ...}`.
    pub ec2: Option<PoolProvider>,
}

impl Providers {
    /// Standalone mode's providers: local processes only.
    pub fn process_only(provider: PoolProvider) -> Providers {
        Providers {
            process: Some(provider),
            ..Providers::default()
        }
    }

    /// The provider serving a pool with this `spec.provider`.
    pub fn resolve(&self, spec: &ProviderSpec) -> Result<PoolProvider, Unserved> {
        let Some(kind) = ProviderKind::of(spec) else {
            return Err(Unserved {
                kind: None,
                message: "spec.provider must name exactly one provider".to_owned(),
            });
        };
        let served = match kind {
            ProviderKind::Process => self.process.clone(),
            ProviderKind::Pod => self.pod.clone(),
            ProviderKind::Ec2 => match &self.ec2 {
                // Bound to the spec's region; refused when the provider has no credentials.
                #[cfg(feature = "ec2")]
                Some(PoolProvider::Ec2(p)) => {
                    return p.provider().for_spec(spec).map(PoolProvider::Ec2);
                }
                other => other.clone(),
            },
        };
        served.ok_or_else(|| Unserved {
            kind: Some(kind),
            message: format!(
                "this operator cannot run `{kind}` nodes (it serves: {}); no node was started. \
                 Run the pool under an operator that serves `{kind}`, or change spec.provider",
                self.served()
            ),
        })
    }

    /// The kinds served, for messages: `process, ec2` or `none`.
    pub fn served(&self) -> String {
        let kinds: Vec<&str> = self.all().iter().map(|p| p.kind().as_str()).collect();
        if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds.join(", ")
        }
    }

    /// Every provider, once each.
    pub fn all(&self) -> Vec<PoolProvider> {
        [&self.process, &self.pod, &self.ec2]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Why a provider could not start, list or stop a node. Variants are shared by every provider;
/// [`Error::kind`] is the label failures are counted and reported under.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine API refused or failed a call (EC2, the Kubernetes API): `action` is what was
    /// asked, `message` what it answered.
    #[error("{provider} provider: {action} failed: {message}")]
    Api {
        provider: ProviderKind,
        action: &'static str,
        message: String,
    },
    /// The pool's provider settings cannot work (an image that does not exist, no permission);
    /// retrying does not help until someone changes them.
    #[error("{provider} provider: {message}")]
    Config {
        provider: ProviderKind,
        message: String,
    },
    #[error(
        "cannot start the node binary {binary}: {source}; point the process provider at the \
         `cachepool` executable"
    )]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the node for slot {slot} of pool {pool} exited ({status}) before binding its ports; \
         its log ends with:\n{log_tail}"
    )]
    NodeExited {
        pool: PoolRef,
        slot: u32,
        status: String,
        log_tail: String,
    },
    #[error(
        "the node for slot {slot} of pool {pool} did not report its ports within {timeout:?} \
         (it was stopped); its log ends with:\n{log_tail}"
    )]
    StartTimeout {
        pool: PoolRef,
        slot: u32,
        timeout: Duration,
        log_tail: String,
    },
    #[error("node {id} of pool {pool} did not exit within {timeout:?} even after SIGKILL")]
    StopTimeout {
        pool: PoolRef,
        id: String,
        timeout: Duration,
    },
    #[error(
        "cannot {action} {path}: {source}; check that the directory is writable by the operator"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pool {pool} has a namespace or name the process provider cannot use as a directory; \
         use Kubernetes names (lowercase letters, digits, '-' and '.', not starting with '.')"
    )]
    PoolName { pool: PoolRef },
    #[error("the address file {path} of a new node is malformed: {reason}")]
    AddrFile { path: PathBuf, reason: String },
}

/// Result with the provider error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable label for metrics and events (`launch`, `start_timeout`, `api`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Api { .. } => "api",
            Error::Config { .. } | Error::Spawn { .. } | Error::PoolName { .. } => "config",
            Error::NodeExited { .. } | Error::AddrFile { .. } => "launch",
            Error::StartTimeout { .. } => "start_timeout",
            Error::StopTimeout { .. } => "stop_timeout",
            Error::Io { .. } => "io",
        }
    }
}
