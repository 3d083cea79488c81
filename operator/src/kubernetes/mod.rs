//! Kubernetes mode: the same per-pool drivers as standalone mode, fed by a kube-rs runtime
//! `Controller` over the cluster's CachePool objects instead of a state directory.
//!
//! What each part does, and why it is shaped so:
//! - [`controller`]: the `Controller` watches CachePools (every namespace or one) and hands
//!   each object to its pool's driver: a new pool starts a driver (its record read from the
//!   object's status), a new `metadata.generation` or new labels reach the running driver as
//!   `observed`. The driver, not the controller, runs the pool: its probe rounds stay inside
//!   the operator, and the controller only turns watch events into commands. Every pool
//!   carries the finalizer [`FINALIZER`]; deleting a pool deletes its driver (which stops every
//!   node) before the finalizer goes, so nothing is left running.
//! - [`store`]: [`KubeStore`], the [`PoolStore`](crate::store::PoolStore) over the API
//!   server: status by server-side apply under [`FIELD_MANAGER`] (only when the driver says it
//!   changed meaningfully), spec changes from the operator's API as a patch of `spec`, and the
//!   last valid spec in the annotation [`LAST_VALID_SPEC`] so that a restarted operator keeps
//!   a pool whose spec turned invalid running on what it ran before.
//! - [`events`]: [`KubeEvents`], the [`EventSink`](crate::events::EventSink) publishing
//!   Kubernetes Events on the CachePool from a queue, so a driver never waits for the API.
//! - [`pods`]: [`KubePods`], the pod provider's calls made to the API server (pods and the
//!   per-pool admin-token Secret).
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease. Only the leader runs
//!   the controller, the drivers and the operator API; a leader that cannot renew stops writing
//!   before anyone else can take the lease (the timing argument is in that module).
//! - [`role`]: the leader labels its own pod, so the API Service routes to it alone.

pub mod controller;
pub mod events;
pub mod leader;
pub mod pods;
pub mod role;
pub mod store;

use std::time::Duration;

pub use controller::Controller;
pub use events::KubeEvents;
pub use leader::{Fence, LeaderElection, LeaseTiming};
pub use pods::KubePods;
pub use role::OwnPod;
pub use store::KubeStore;

/// The finalizer on every CachePool: the pool's nodes are stopped before it is removed.
pub const FINALIZER: &str = "cachepool.io/nodes";

/// The field manager of every server-side apply the operator makes (status, annotations).
pub const FIELD_MANAGER: &str = "cachepool-operator";

/// Annotation holding the pool's last valid spec (JSON), written by the operator whenever
/// the valid spec changes, read when an operator (re)starts. It lets a pool whose current
/// spec is invalid keep running on its last valid spec across operator restarts; the status
/// cannot carry it (the CRD's status schema has no such field, and a spec is not status).
pub const LAST_VALID_SPEC: &str = "cachepool.io/last-valid-spec";

/// The name the operator reports Events under (`reportingController`).
pub const CONTROLLER_NAME: &str = "cachepool-operator";

/// Why Kubernetes mode could not start or a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig and not in a pod, or the kubeconfig is unusable.
    #[error("finding the Kubernetes API server: {0}")]
    Config(String),
    /// The API server refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer {FINALIZER}: {0}")]
    Finalizer(String),
    /// Deleting a pool left nodes running: the finalizer stays and deletion is retried.
    #[error("pool {pool}: {nodes} node(s) still running after deletion; retrying")]
    NodesLeft { pool: String, nodes: usize },
    /// The provider could not tell whether a deleted pool's nodes are gone.
    #[error("{0}")]
    Provider(#[from] crate::provider::Error),
    /// The object has no namespace or name.
    #[error("a CachePool without a namespace or name")]
    Unnamed,
    /// The lease could not be read or written.
    #[error("leader election: {0}")]
    Lease(String),
}

impl Error {
    /// The label failures are counted under in `/metrics` (`reconcile_failed`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::NodesLeft { .. } => "delete",
            Error::Provider(e) => e.kind(),
            Error::Unnamed => "unnamed",
            Error::Lease(_) => "lease",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of the Kubernetes front end.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// Watch CachePools of this namespace only; every namespace when `None`.
    pub namespace: Option<String>,
    /// Reconcile every pool again after this long without a change (a safety net: the
    /// drivers run the pools; this only restarts a driver that ended unexpectedly).
    pub resync: Duration,
    /// Shortest and longest wait before a failed reconcile is retried (doubling per failure).
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// The `reportingInstance` of Events (the pod name).
    pub instance: String,
    /// This replica's pod, labelled as the leader's once the watch listed every pool (see
    /// [`role`]); `None` outside a pod or without leader election.
    pub leader_pod: Option<OwnPod>,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self {
            namespace: None,
            resync: Duration::from_secs(300),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            instance: CONTROLLER_NAME.to_owned(),
            leader_pod: None,
        }
    }
}

/// A client for the cluster this process runs in, or the one the kubeconfig names.
pub async fn infer_client() -> Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}
