//! The three designs a resize is measured under, over the same nodes and the same client
//! library:
//!
//! - **Product**: the jump-hash ring and the operator's rebalance order
//!   (`cachepool_operator::rebalance`): new nodes started and ready, the new ring published
//!   with the previous one attached (the pool client reads the new owner and falls back to the
//!   old one), `POST /handoff` on every member of the previous ring, and the previous ring
//!   dropped when every hand-off reports done; removed nodes stop last.
//! - **Empty**: the same ring, switched at once with no hand-off, as a plain client-side
//!   consistent-hash ring (or a managed cache adding a shard) does: new nodes start empty and
//!   a removed node's keys are gone.
//! - **Original**: the system this product grew from: `hash % n` placement; on a resize, new
//!   nodes are started, then every key is rehashed and each one whose node changes is copied
//!   (get from its old node, set on its new one) while traffic still uses the old layout;
//!   traffic switches when the copy is done. Its 60 s sleep is replaced by the node's real
//!   start, so the comparison is about data movement. The bench's key list stands in for the
//!   original's key listing.
//!
//! The baselines live here, in the bench, and nowhere in the operator.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cache_node::client::{AdminClient, ClientOptions, NodeClient, PoolClient, Value};
use cache_node::handoff::State;
use cachepool_crds::ring::{Ring, RingState, key_hash, moves};
use tokio::task::JoinSet;

use super::load::Shared;
use crate::admin_node::{self, AdminNode};

/// How a resize is carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Design {
    /// This product: jump-hash ring, nodes ready before the ring changes, keys handed off.
    Product,
    /// Same ring, no hand-off: a new node starts empty.
    Empty,
    /// Modulo placement, every key rehashed and copied, then traffic switches.
    Original,
}

impl Design {
    pub const ALL: [Design; 3] = [Design::Product, Design::Empty, Design::Original];

    /// Name in tables, CSV and legends.
    pub fn name(self) -> &'static str {
        match self {
            Design::Product => "cachepool",
            Design::Empty => "new-node-empty",
            Design::Original => "original-modulo",
        }
    }
}

/// Where the nodes run.
#[derive(Clone, Debug)]
pub enum NodeKind {
    /// `cachepool node` child processes of this executable (the command line).
    Process,
    /// In this process, on the current runtime (tests: no binary needed, stopped with it).
    InProcess,
}

/// One running node.
#[derive(Debug)]
enum Running {
    Process(AdminNode),
    InProcess(cache_node::Node),
}

#[derive(Debug)]
struct LiveNode {
    addr: String,
    admin: AdminClient,
    running: Running,
}

impl LiveNode {
    async fn start(kind: &NodeKind, capacity_mib: u64) -> anyhow::Result<LiveNode> {
        match kind {
            NodeKind::Process => {
                let node = AdminNode::start("resize-node", capacity_mib, 1).await?;
                Ok(LiveNode {
                    addr: node.addr.to_string(),
                    admin: node.admin.clone(),
                    running: Running::Process(node),
                })
            }
            NodeKind::InProcess => {
                let mut config = cache_node::NodeConfig::ephemeral(
                    capacity_mib,
                    cache_node::store::Policy::Lru,
                    Some(admin_node::TOKEN),
                );
                config.threads = 1;
                let node = cache_node::Node::start(config)
                    .await
                    .context("starting an in-process node")?;
                let admin = AdminClient::new(&node.admin_addr.to_string(), Some(admin_node::TOKEN));
                Ok(LiveNode {
                    addr: node.addr.to_string(),
                    admin,
                    running: Running::InProcess(node),
                })
            }
        }
    }

    async fn stop(self) {
        match self.running {
            // The guard kills and reaps the process.
            Running::Process(node) => drop(node),
            Running::InProcess(node) => node.shutdown().await,
        }
    }
}

/// Where requests go: the pool client over a ring, or `hash % n` over node clients.
#[derive(Debug)]
pub enum Router {
    Ring(PoolClient),
    Modulo(RwLock<Arc<Vec<NodeClient>>>),
}

impl Router {
    pub async fn get(&self, key: &[u8]) -> anyhow::Result<Option<Value>> {
        match self {
            Router::Ring(client) => Ok(client.get(key).await?),
            Router::Modulo(nodes) => {
                let nodes = modulo_nodes(nodes);
                Ok(modulo_owner(&nodes, key)?.get(key).await?)
            }
        }
    }

    pub async fn set(&self, key: &[u8], data: &[u8]) -> anyhow::Result<()> {
        match self {
            Router::Ring(client) => Ok(client.set(key, data, 0, 0).await?),
            Router::Modulo(nodes) => {
                let nodes = modulo_nodes(nodes);
                Ok(modulo_owner(&nodes, key)?.set(key, data, 0, 0).await?)
            }
        }
    }
}

fn modulo_nodes(nodes: &RwLock<Arc<Vec<NodeClient>>>) -> Arc<Vec<NodeClient>> {
    nodes
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn modulo_owner<'a>(nodes: &'a [NodeClient], key: &[u8]) -> anyhow::Result<&'a NodeClient> {
    let n = nodes.len() as u64;
    if n == 0 {
        bail!("the pool has no nodes");
    }
    Ok(&nodes[(key_hash(key) % n) as usize])
}

fn client_options() -> ClientOptions {
    ClientOptions {
        // A request stuck behind a stalled node shows as latency, not as an error.
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        max_connections_per_node: 32,
        ..ClientOptions::default()
    }
}

/// What one resize did.
#[derive(Clone, Debug)]
pub struct Resize {
    pub from: u32,
    pub to: u32,
    /// Seconds since the experiment began: asked for, traffic switched to the new layout,
    /// finished (hand-off or copy done, removed nodes stopped).
    pub asked: f64,
    pub switched: f64,
    pub done: f64,
    pub keys_moved: u64,
    /// Keys the pool held that jump hash moves for this change: what a minimal resize moves.
    pub ideal: u64,
    /// The layout number traffic switched to.
    pub layout: u64,
}

/// A pool of nodes under one design.
#[derive(Debug)]
pub struct Pool {
    pub design: Design,
    kind: NodeKind,
    capacity_mib: u64,
    nodes: Vec<LiveNode>,
    ring: Option<Ring>,
    pub router: Arc<Router>,
}

impl Pool {
    /// Starts `n` nodes of `capacity_mib` each.
    pub async fn start(
        design: Design,
        kind: NodeKind,
        n: u32,
        capacity_mib: u64,
    ) -> anyhow::Result<Pool> {
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(LiveNode::start(&kind, capacity_mib).await?);
        }
        let (router, ring) = match design {
            Design::Product | Design::Empty => {
                let ring = Ring::from_addresses(1, nodes.iter().map(|n| n.addr.clone()))
                    .context("building the first ring")?;
                let client = PoolClient::from_ring(ring.clone(), client_options())?;
                (Router::Ring(client), Some(ring))
            }
            Design::Original => (
                Router::Modulo(RwLock::new(Arc::new(clients(&nodes)?))),
                None,
            ),
        };
        Ok(Pool {
            design,
            kind,
            capacity_mib,
            nodes,
            ring,
            router: Arc::new(router),
        })
    }

    pub fn size(&self) -> u32 {
        self.nodes.len() as u32
    }

    /// Resizes to `to` nodes the design's way; `shared` gets the new layout number when
    /// traffic switches.
    pub async fn resize(&mut self, to: u32, shared: &Shared) -> anyhow::Result<Resize> {
        let from = self.size();
        anyhow::ensure!(to >= 1 && to != from, "no resize from {from} to {to}");
        let asked = shared.elapsed();
        let ideal = shared
            .keys
            .cached_keys()
            .filter(|&i| moves(from, to, &shared.keys.name(i)))
            .count() as u64;
        for _ in from..to {
            self.nodes
                .push(LiveNode::start(&self.kind, self.capacity_mib).await?);
        }
        let (switched, keys_moved) = match self.design {
            Design::Product => self.resize_product(to, shared).await?,
            Design::Empty => {
                let next = self.next_ring(to)?;
                self.set_ring(RingState::new(next.clone()))?;
                self.ring = Some(next);
                (switch(shared), 0)
            }
            Design::Original => self.resize_original(from, to, shared).await?,
        };
        for node in self.nodes.drain(to as usize..).collect::<Vec<_>>() {
            node.stop().await;
        }
        Ok(Resize {
            from,
            to,
            asked,
            switched,
            done: shared.elapsed(),
            keys_moved,
            ideal,
            layout: shared.layout.load(Ordering::SeqCst),
        })
    }

    fn next_ring(&self, to: u32) -> anyhow::Result<Ring> {
        let ring = self.ring.as_ref().context("a ring design has a ring")?;
        let from = ring.len();
        Ok(if to > from {
            ring.grown(
                self.nodes[from as usize..to as usize]
                    .iter()
                    .map(|n| n.addr.clone()),
            )?
        } else {
            ring.shrunk(from - to)?
        })
    }

    fn set_ring(&self, state: RingState) -> anyhow::Result<()> {
        match &*self.router {
            Router::Ring(client) => {
                client.set_ring(state);
                Ok(())
            }
            Router::Modulo(_) => bail!("a modulo pool has no ring"),
        }
    }

    /// The operator's order: publish with the previous ring attached, hand off, complete.
    async fn resize_product(&mut self, to: u32, shared: &Shared) -> anyhow::Result<(f64, u64)> {
        let old = self.ring.clone().context("a ring design has a ring")?;
        let next = self.next_ring(to)?;
        self.set_ring(RingState::migrating(next.clone(), old.clone())?)?;
        let switched = switch(shared);
        let members = &self.nodes[..old.len() as usize];
        for node in members {
            node.admin
                .start_handoff(&next, &node.addr, 0)
                .await
                .with_context(|| format!("POST /handoff to {}", node.addr))?;
        }
        let mut moved = 0;
        for node in members {
            moved += wait_handoff(&node.admin, next.epoch()).await?;
        }
        self.set_ring(RingState::new(next.clone()))?;
        self.ring = Some(next);
        Ok((switched, moved))
    }

    /// Copy every key whose `hash % n` node changes, then switch.
    async fn resize_original(
        &mut self,
        from: u32,
        to: u32,
        shared: &Shared,
    ) -> anyhow::Result<(f64, u64)> {
        let old = Arc::new(clients(&self.nodes[..from as usize])?);
        let new = Arc::new(clients(&self.nodes[..to as usize])?);
        let n = shared.keys.len();
        let tasks = 8;
        let mut set = JoinSet::new();
        let names: Arc<Vec<Vec<u8>>> = Arc::new((0..n).map(|i| shared.keys.name(i)).collect());
        for t in 0..tasks {
            let (old, new, names) = (old.clone(), new.clone(), names.clone());
            set.spawn(async move {
                let mut moved = 0u64;
                for key in names.iter().skip(t).step_by(tasks) {
                    crate::check_interrupted()?;
                    let h = key_hash(key);
                    let (a, b) = (
                        (h % old.len() as u64) as usize,
                        (h % new.len() as u64) as usize,
                    );
                    if old[a].addr() == new[b].addr() {
                        continue;
                    }
                    if let Some(v) = old[a].get(key).await? {
                        new[b].set(key, &v.data, v.flags, 0).await?;
                        moved += 1;
                    }
                }
                anyhow::Ok(moved)
            });
        }
        let mut moved = 0;
        while let Some(done) = set.join_next().await {
            moved += done.context("a copy task panicked")??;
        }
        match &*self.router {
            Router::Modulo(nodes) => {
                *nodes
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
            }
            Router::Ring(_) => bail!("the original design routes by modulo"),
        }
        Ok((switch(shared), moved))
    }

    /// Items held over all nodes (`curr_items`).
    pub async fn items(&self) -> u64 {
        let mut total = 0;
        for node in &self.nodes {
            if let Ok(stats) = node.admin.stats().await {
                total += stats
                    .get("curr_items")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
            }
        }
        total
    }

    /// Stops every node.
    pub async fn stop(mut self) {
        for node in self.nodes.drain(..) {
            node.stop().await;
        }
    }
}

fn clients(nodes: &[LiveNode]) -> anyhow::Result<Vec<NodeClient>> {
    nodes
        .iter()
        .map(|n| Ok(NodeClient::new(n.addr.clone(), client_options())?))
        .collect()
}

/// Bumps the layout number: traffic from now on uses the new layout. Returns the time.
fn switch(shared: &Shared) -> f64 {
    shared.layout.fetch_add(1, Ordering::SeqCst);
    shared.elapsed()
}

/// Polls a node's hand-off to `epoch` until done; the keys it moved.
async fn wait_handoff(admin: &AdminClient, epoch: u64) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        crate::check_interrupted()?;
        let st = admin.handoff().await?;
        if st.epoch == Some(epoch) {
            match st.state {
                State::Done => return Ok(st.keys_moved),
                State::Failed | State::Cancelled => bail!(
                    "hand-off on {} ended {:?}: {}",
                    admin.address(),
                    st.state,
                    st.last_error.unwrap_or_default()
                ),
                State::Running | State::Idle => {}
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("hand-off on {} did not finish in 300 s", admin.address());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
