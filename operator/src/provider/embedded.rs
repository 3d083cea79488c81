//! The embedded provider: each node is a [`cache_node::Node`] served inside the operator's own
//! process, on loopback ports.
//!
//! It exists so that the whole operator — front end, driver, reconcile core, hand-off, ring —
//! can run in one test process without a `cachepool` binary: the resize suite and the
//! operator's in-process tests drive real pools through it, and can look inside every node's
//! store (which keys it holds) or kill a node (as a crash) to check what the operator does.
//! It serves `provider: {process: {}}` pools when an operator is configured with it instead of
//! the process provider; nodes share the operator's runtime, so it is for tests and benchmarks,
//! never for production.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use cache_node::server::Shared;
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};

use super::{
    Error, LaunchSpec, PoolRef, Provider, ProviderKind, ProviderNode, Result, ShutdownPolicy,
};

/// Worker threads of each embedded node: they share the test's machine with everything else.
const NODE_THREADS: usize = 2;

/// One embedded node.
#[derive(Debug)]
struct Embedded {
    node: ProviderNode,
    /// The running server; `None` once killed or stopped.
    server: Option<Node>,
    shared: Arc<Shared>,
}

/// Runs nodes in-process (see the module documentation).
#[derive(Debug, Default)]
pub struct EmbeddedProvider {
    pools: Mutex<BTreeMap<PoolRef, BTreeMap<String, Embedded>>>,
    next_id: AtomicU64,
    launches: AtomicU64,
    /// The nodes stay when the operator stops, as pods and instances do.
    outlive_operator: bool,
}

impl EmbeddedProvider {
    /// A provider with no node, whose nodes stop with the operator (as local processes do).
    pub fn new() -> EmbeddedProvider {
        EmbeddedProvider::default()
    }

    /// A provider with no node, whose nodes outlive the operator that started them (as pods and
    /// instances do: [`ShutdownPolicy::KeepNodes`]), so a test can stop an operator and let the
    /// next one adopt or clean up after it.
    pub fn outliving_the_operator() -> EmbeddedProvider {
        EmbeddedProvider {
            outlive_operator: true,
            ..EmbeddedProvider::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PoolRef, BTreeMap<String, Embedded>>> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the node serving `slot` of `pool` abruptly, as a crash would: it is listed
    /// `alive: false` until the operator terminates it. Returns its id.
    pub async fn kill(&self, pool: &PoolRef, slot: u32) -> Option<String> {
        let (id, server) = {
            let mut pools = self.lock();
            let nodes = pools.get_mut(pool)?;
            let (id, node) = nodes
                .iter_mut()
                .find(|(_, n)| n.node.slot == slot && n.node.alive)?;
            node.node.alive = false;
            (id.clone(), node.server.take())
        };
        if let Some(server) = server {
            server.shutdown().await;
        }
        Some(id)
    }

    /// The store and counters of every node of `pool` (alive or not), by id: what the
    /// tests read to check which keys each node holds.
    pub fn stores(&self, pool: &PoolRef) -> BTreeMap<String, (ProviderNode, Arc<Shared>)> {
        self.lock()
            .get(pool)
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|(id, n)| (id.clone(), (n.node.clone(), n.shared.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many nodes were launched in all.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// How many nodes run now, over every pool.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .flat_map(BTreeMap::values)
            .filter(|n| n.server.is_some())
            .count()
    }
}

impl Provider for EmbeddedProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Process
    }

    fn shutdown_policy(&self) -> ShutdownPolicy {
        if self.outlive_operator {
            ShutdownPolicy::KeepNodes
        } else {
            ShutdownPolicy::StopNodes
        }
    }

    async fn list(&self, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        let mut nodes: Vec<ProviderNode> = self
            .lock()
            .get(pool)
            .map(|m| m.values().map(|n| n.node.clone()).collect())
            .unwrap_or_default();
        nodes.sort_by(|a, b| (a.slot, a.launched_at, &a.id).cmp(&(b.slot, b.launched_at, &b.id)));
        Ok(nodes)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        let policy = Policy::from_str(&spec.policy).map_err(|message| Error::Config {
            provider: ProviderKind::Process,
            message,
        })?;
        let mut config = NodeConfig::ephemeral(
            u64::from(spec.capacity_mib),
            policy,
            Some(spec.admin_token.expose()),
        );
        config.max_item_size_kib = u64::from(spec.max_item_size_kib);
        config.threads = NODE_THREADS;
        let server = Node::start(config).await.map_err(|e| Error::NodeExited {
            pool: spec.pool.clone(),
            slot: spec.slot,
            status: e.to_string(),
            log_tail: String::new(),
        })?;
        let id = format!("embedded-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let node = ProviderNode {
            slot: spec.slot,
            id: id.clone(),
            address: server.addr.to_string(),
            admin_address: server.admin_addr.to_string(),
            admin_token: spec.admin_token.expose().to_owned(),
            launched_at: SystemTime::now(),
            alive: true,
        };
        self.launches.fetch_add(1, Ordering::Relaxed);
        let shared = server.shared.clone();
        self.lock().entry(spec.pool.clone()).or_default().insert(
            id,
            Embedded {
                node: node.clone(),
                server: Some(server),
                shared,
            },
        );
        Ok(node)
    }

    async fn terminate(&self, pool: &PoolRef, id: &str) -> Result<()> {
        let removed = self.lock().get_mut(pool).and_then(|nodes| nodes.remove(id));
        if let Some(server) = removed.and_then(|mut n| n.server.take()) {
            server.shutdown().await;
        }
        Ok(())
    }

    async fn stop_all(&self) -> Result<()> {
        let servers: Vec<Node> = std::mem::take(&mut *self.lock())
            .into_values()
            .flat_map(BTreeMap::into_values)
            .filter_map(|mut n| n.server.take())
            .collect();
        for server in servers {
            server.shutdown().await;
        }
        Ok(())
    }
}
