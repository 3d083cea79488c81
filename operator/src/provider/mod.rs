//! Where a pool's nodes run: the seam between the reconcile core and the machines.
//!
//! The core decides how many nodes a pool needs and which slot each one fills; a [`Provider`]
//! only starts, lists and stops them. The trait is deliberately small and says nothing about
//! processes or instances, so the same core drives [`process::ProcessProvider`] (local
//! children) and the EC2 provider. Two rules shape it:
//!
//! - `launch` returns as soon as the node's addresses are known, not when it is ready: the
//!   core already polls `/readyz` for every node it depends on, and one place doing that keeps
//!   readiness timeouts in one policy.
//! - `list` reports dead nodes (`alive: false`) instead of hiding them, so the core sees a
//!   crash as a crash and replaces the node in its slot; `terminate` is what forgets a node.

pub mod process;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

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

/// What a new node is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchSpec {
    pub capacity_mib: u32,
    /// Replacement policy as the node's `--policy` flag spells it (`lru`, `random`, `sieve`).
    pub policy: String,
    pub max_item_size_kib: u32,
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

/// Starts, lists and stops the nodes of pools.
pub trait Provider: Send + Sync + 'static {
    /// Every node of the pool that this provider knows of (started now or adopted), alive or not.
    fn list(&self, pool: &PoolRef) -> impl Future<Output = Result<Vec<ProviderNode>>> + Send;

    /// Starts a node for `slot` and returns once its ports are bound (addresses known).
    /// Readiness is the caller's job (poll `/readyz`). Several nodes may exist for one slot
    /// while one replaces another.
    fn launch(
        &self,
        pool: &PoolRef,
        slot: u32,
        spec: &LaunchSpec,
    ) -> impl Future<Output = Result<ProviderNode>> + Send;

    /// Stops a node and forgets it; idempotent (an unknown or already-dead id is Ok).
    fn terminate(&self, pool: &PoolRef, id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Stops every node of every pool (operator shutdown, `cachepool up` Ctrl-C).
    fn terminate_all(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Why a provider could not start, list or stop a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
