//! A pool run by the real operator, in-process, resized the way the API and the manager UI
//! resize one.
//!
//! `Pool::start` writes a CachePool manifest (manual mode, `provider: {process: {}}`) to a
//! fresh state directory and starts an [`Operator`] over it with the embedded provider, so the
//! standalone front end, the pool driver, the reconcile core and the nodes' hand-offs all run
//! as in production, with the nodes (`cache_node::Node`s) inside the test process. A resize is
//! `PoolHandle::set_spec` with a new `scaling.replicas`, the API's path for a patch or a scale
//! call; what happens next (launching, publishing the migrating ring, starting and watching the
//! hand-offs, dropping the previous ring, stopping removed nodes, replacing a crashed node) is
//! the operator's doing alone. The test's pool client follows the operator's ring: a task
//! watches `PoolHandle::ring` and hands every new ring to `PoolClient::set_ring`, as an
//! application long-polling the API's ring endpoint does (without the HTTP hop).
//!
//! The harness only observes: the operator's events (with the instant each was told) give when
//! a resize began and completed and the keys it moved; the nodes' `GET /handoff` (polled while
//! a migration runs, since a removed node is stopped as soon as the migration completes) give
//! each participant's hand-off counts; the embedded provider's stores give which keys each node
//! holds.
//!
//! [`PlainPool`] is the comparison: plain nodes whose clients are switched straight to the new
//! ring, with no previous ring and no hand-off, as a memcached client with the same hash does
//! when a server is added or removed.
//!
//! Every test runs inside `run`: one test at a time (the hit-ratio windows mean nothing when
//! two tests share the machine's two cores), on a fresh multi-threaded runtime that is dropped
//! when the test ends or panics, which ends every node and task it started.

use std::collections::HashMap;
use std::future::Future;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cache_node::client::{AdminClient, ClientOptions, NodeClient, PoolClient};
use cache_node::handoff::{HandoffStatus, State};
use cache_node::server::Shared;
use cache_node::store::{Policy, item_cost};
use cache_node::{Node, NodeConfig};
use cachepool_crds::pool::{CachePool, PoolPhase};
use cachepool_crds::ring::{Ring, RingState};
use cachepool_operator::driver::{DriverOptions, PoolHandle};
use cachepool_operator::events::{Event, EventSink, reason};
use cachepool_operator::provider::PoolRef;
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_test_support::placement::{items, misplaced};
use cachepool_test_support::servers::TempDir;
use futures_util::future::join_all;
use tokio::task::JoinHandle;

/// Admin token of the operator's API (the nodes get random tokens from the operator).
const TOKEN: &str = "resize-harness-token";

/// A test that takes longer than this has hung.
const TEST_LIMIT: Duration = Duration::from_secs(90);

/// A resize (or the pool's start) that takes longer than this is stuck.
const RESIZE_LIMIT: Duration = Duration::from_secs(30);

/// How often the harness looks at the pool while it waits (status, ring, hand-offs).
const POLL: Duration = Duration::from_millis(2);

/// Runs one test: alone, on its own two-worker runtime, within `TEST_LIMIT`.
pub fn run(test: impl Future<Output = ()>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(async {
        if tokio::time::timeout(TEST_LIMIT, test).await.is_err() {
            panic!("test not done within {TEST_LIMIT:?}");
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// Client options of the pool client under test: generous timeouts, so that a slow machine
/// gives slow answers rather than errors (errors would be misses the resize did not cause).
pub fn client_options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The operator's events, each with the instant it was told.
#[derive(Debug, Default)]
struct Timeline(Mutex<Vec<(Instant, Event)>>);

impl EventSink for Timeline {
    fn emit(&self, _pool: &PoolRef, event: Event) {
        lock(&self.0).push((Instant::now(), event));
    }
}

impl Timeline {
    fn len(&self) -> usize {
        lock(&self.0).len()
    }

    fn since(&self, mark: usize) -> Vec<(Instant, Event)> {
        lock(&self.0)[mark..].to_vec()
    }
}

/// The number after `prefix` in `text` (digits only).
fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What one resize did, as the operator told it and the nodes reported it.
#[derive(Debug, Clone)]
pub struct Resize {
    pub from: u32,
    pub to: u32,
    /// The final hand-off status (towards the migration's last ring) of each previous-ring
    /// member that reported one; the node's last answer while it ran when it was stopped
    /// before the harness saw it finish (a removed node, see `unfinished`).
    pub statuses: Vec<HandoffStatus>,
    /// Previous-ring members whose last status seen was not `done` (a removed node stopped
    /// between two polls of the harness; the operator itself waits for `done`).
    pub unfinished: Vec<String>,
    /// When the spec change was asked for (`set_spec`).
    pub asked: Instant,
    /// When the operator published the migrating ring (`HandoffStarted`).
    pub began: Instant,
    /// When the operator published the completed ring (`HandoffFinished`).
    pub completed: Instant,
    /// When the pool was settled at the new size: phase `Ready`, no migration, the clients on
    /// the final ring, no node left beside the ring's. `None` when the spec had moved on to
    /// another size meanwhile.
    pub settled: Option<Instant>,
    /// Keys and value bytes moved, as the operator told them (`HandoffFinished`).
    pub reported_keys: u64,
    pub reported_bytes: u64,
    /// Previous-ring members the test killed (data addresses).
    pub dead: Vec<String>,
    /// The operator's `NodeReplaced` messages from the spec change until the pool settled
    /// (a member that died mid-migration is replaced before or after the migration
    /// completes, whichever comes first).
    pub replaced: Vec<String>,
    /// Items the removed nodes still held when the operator stopped them (a shrink).
    pub left_on_removed: u64,
}

impl Resize {
    /// Keys moved, as the participants counted them.
    pub fn keys_moved(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_moved).sum()
    }
    /// Value bytes moved, as the participants counted them.
    pub fn bytes_moved(&self) -> u64 {
        self.statuses.iter().map(|s| s.bytes_moved).sum()
    }
    pub fn keys_skipped(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_skipped).sum()
    }
    pub fn keys_total(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_total).sum()
    }
    pub fn keys_dropped(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_dropped).sum()
    }
    pub fn keys_retried(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_retried).sum()
    }

    /// From the spec change to a settled pool (or to the completed ring).
    pub fn elapsed(&self) -> Duration {
        self.settled.unwrap_or(self.completed) - self.asked
    }

    pub fn describe(&self) -> String {
        let ms = |t: Instant| (t - self.asked).as_secs_f64() * 1000.0;
        format!(
            "{}->{} in {:?} (spec change -> migrating ring {:.1} ms -> completed ring {:.1} ms{}): \
             hand-off of {} foreign keys: moved {} ({} bytes; the operator told {} keys, {} \
             bytes), skipped {}, retried (copy withdrawn) {}, dropped {}{}{}{}",
            self.from,
            self.to,
            self.elapsed(),
            ms(self.began),
            ms(self.completed),
            self.settled
                .map(|s| format!(" -> settled {:.1} ms", ms(s)))
                .unwrap_or_default(),
            self.keys_total(),
            self.keys_moved(),
            self.bytes_moved(),
            self.reported_keys,
            self.reported_bytes,
            self.keys_skipped(),
            self.keys_retried(),
            self.keys_dropped(),
            if self.dead.is_empty() {
                String::new()
            } else {
                format!("; dead: {:?}", self.dead)
            },
            if self.replaced.is_empty() {
                String::new()
            } else {
                format!("; replaced: {:?}", self.replaced)
            },
            if self.unfinished.is_empty() {
                String::new()
            } else {
                format!("; last status seen not done: {:?}", self.unfinished)
            },
        )
    }
}

/// A spec change asked for and not yet waited for.
#[derive(Debug)]
pub struct Asked {
    pub to: u32,
    pub at: Instant,
    /// The resource as `set_spec` answered it.
    pub answer: CachePool,
    /// Events told before the change.
    mark: usize,
}

/// Where every key is, per slot of the ring at the time.
#[derive(Debug)]
pub struct Snapshot {
    /// Slot -> key -> value.
    pub slots: Vec<HashMap<Vec<u8>, Vec<u8>>>,
}

impl Snapshot {
    /// Key -> slots holding it.
    pub fn placement(&self) -> HashMap<&[u8], Vec<u32>> {
        let mut out: HashMap<&[u8], Vec<u32>> = HashMap::new();
        for (slot, items) in (0u32..).zip(&self.slots) {
            for key in items.keys() {
                out.entry(key.as_slice()).or_default().push(slot);
            }
        }
        out
    }
}

/// The pool's end state, checked.
#[derive(Debug, Clone, Copy)]
pub struct Clean {
    pub items: u64,
    pub bytes: u64,
}

/// A node of the operator's pool, as the embedded provider holds it.
#[derive(Debug, Clone)]
pub struct Member {
    pub slot: u32,
    /// Data address, as the ring names it.
    pub addr: String,
    pub admin: AdminClient,
    /// The node's store and counters, readable even after the node stopped.
    pub shared: Arc<Shared>,
    pub alive: bool,
}

/// A pool run by an in-process operator, and a pool client following its ring.
#[derive(Debug)]
pub struct Pool {
    operator: Option<Operator>,
    nodes: Arc<EmbeddedProvider>,
    pool: PoolRef,
    handle: Arc<PoolHandle>,
    timeline: Arc<Timeline>,
    client: Arc<PoolClient>,
    /// Every ring the client was given, with the instant.
    rings: Arc<Mutex<Vec<(Instant, RingState)>>>,
    follower: JoinHandle<()>,
    /// Every node seen, by data address (kept after the operator stops it).
    known: HashMap<String, Member>,
    /// The latest hand-off status seen, by node address and target epoch.
    handoffs: HashMap<(String, u64), HandoffStatus>,
    /// Addresses of the nodes the test killed.
    killed: Vec<String>,
    /// Every resize waited for, in order.
    pub history: Vec<Resize>,
    _dir: TempDir,
}

/// The manifest of the pool under test.
fn manifest(replicas: u32, capacity_mib: u64) -> String {
    format!(
        "apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {{name: resize}}
spec:
  cache: {{capacityMiB: {capacity_mib}, policy: lru}}
  scaling: {{mode: manual, replicas: {replicas}, maxReplicas: 8}}
  provider: {{process: {{}}}}
"
    )
}

impl Pool {
    /// An operator running a pool of `n` nodes of `capacity_mib` each; returns once the pool
    /// is `Ready` and the client follows its ring.
    pub async fn start(n: u32, capacity_mib: u64) -> Pool {
        let dir = TempDir::new("resize");
        dir.write("resize.yaml", &manifest(n, capacity_mib));
        let nodes = Arc::new(EmbeddedProvider::new());
        let timeline = Arc::new(Timeline::default());
        let mut config = Config::standalone(
            dir.path(),
            NodeBackend::Embedded(nodes.clone()),
            "127.0.0.1:0",
            TOKEN,
        );
        // The operator's own timing, except that a crash is noticed within 50 ms rather than
        // 500 (the kill tests) and the state directory is read at once at start.
        config.driver = DriverOptions {
            probe_interval: Duration::from_millis(50),
            ..DriverOptions::default()
        };
        config.standalone = StandaloneOptions {
            scan_interval: Duration::from_millis(50),
        };
        config.events = vec![timeline.clone()];
        let operator = Operator::start(config)
            .await
            .unwrap_or_else(|e| panic!("starting the operator: {e}"));
        let pool = PoolRef::new("default", "resize");
        let deadline = Instant::now() + RESIZE_LIMIT;
        let handle = loop {
            if let Some(handle) = operator.registry().get(&pool) {
                break handle;
            }
            assert!(Instant::now() < deadline, "the operator never ran {pool}");
            tokio::time::sleep(POLL).await;
        };
        let ring = loop {
            let resource = handle.resource();
            let ring = handle.ring().borrow().clone();
            if let (Some(status), Some(ring)) = (&resource.status, ring)
                && status.phase == Some(PoolPhase::Ready)
                && status.ready_replicas == n
                && !ring.is_migrating()
                && ring.current().len() == n
            {
                break ring;
            }
            assert!(
                Instant::now() < deadline,
                "the pool of {n} never became ready: {:?}",
                resource.status
            );
            tokio::time::sleep(POLL).await;
        };
        let client = Arc::new(
            PoolClient::new(ring, client_options()).unwrap_or_else(|e| panic!("client: {e}")),
        );
        let rings = Arc::new(Mutex::new(Vec::new()));
        let follower = follow(&handle, client.clone(), rings.clone());
        let mut pool = Pool {
            operator: Some(operator),
            nodes,
            pool,
            handle,
            timeline,
            client,
            rings,
            follower,
            known: HashMap::new(),
            handoffs: HashMap::new(),
            killed: Vec::new(),
            history: Vec::new(),
            _dir: dir,
        };
        pool.remember_nodes();
        pool
    }

    pub fn client(&self) -> Arc<PoolClient> {
        self.client.clone()
    }

    /// The operator's ring (what clients are told).
    pub fn state(&self) -> RingState {
        self.handle
            .ring()
            .borrow()
            .clone()
            .unwrap_or_else(|| panic!("the pool has no ring"))
    }

    pub fn ring(&self) -> Ring {
        self.state().current().clone()
    }

    pub fn len(&self) -> u32 {
        self.state().current().len()
    }

    /// Every node the provider runs or ran for the pool (alive or not), by slot.
    pub fn provider_nodes(&self) -> Vec<(u32, String, bool)> {
        self.nodes
            .stores(&self.pool)
            .into_values()
            .map(|(node, _)| (node.slot, node.address, node.alive))
            .collect()
    }

    /// Notes every node the provider lists, so that its store stays readable after it stops.
    fn remember_nodes(&mut self) {
        for (node, shared) in self.nodes.stores(&self.pool).into_values() {
            let member = self
                .known
                .entry(node.address.clone())
                .or_insert_with(|| Member {
                    slot: node.slot,
                    addr: node.address.clone(),
                    admin: AdminClient::with_timeouts(
                        &node.admin_address,
                        Some(&node.admin_token),
                        Duration::from_secs(2),
                    ),
                    shared,
                    alive: node.alive,
                });
            member.alive = node.alive;
        }
        let listed: Vec<String> = self
            .nodes
            .stores(&self.pool)
            .into_values()
            .map(|(n, _)| n.address)
            .collect();
        for member in self.known.values_mut() {
            if !listed.contains(&member.addr) {
                member.alive = false;
            }
        }
    }

    /// The node serving `slot` in the operator's current ring.
    pub fn member(&mut self, slot: u32) -> Member {
        self.remember_nodes();
        let addr = self
            .ring()
            .member(slot)
            .unwrap_or_else(|| panic!("no slot {slot}"))
            .address
            .clone();
        self.known
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| panic!("no node at {addr}"))
    }

    /// While a migration runs, asks each previous-ring member for its hand-off status.
    async fn poll_handoffs(&mut self) {
        let state = self.state();
        let Some(previous) = state.previous() else {
            return;
        };
        self.remember_nodes();
        let asks: Vec<_> = previous
            .members()
            .iter()
            .filter_map(|m| self.known.get(&m.address))
            .filter(|m| m.alive)
            .map(|m| {
                let (addr, admin) = (m.addr.clone(), m.admin.clone());
                async move { (addr, admin.handoff().await) }
            })
            .collect();
        for (addr, status) in join_all(asks).await {
            if let Ok(status) = status
                && let Some(epoch) = status.epoch
            {
                self.handoffs.insert((addr, epoch), status);
            }
        }
    }

    /// Sets `scaling.replicas` to `to` through the API's path (`set_spec`), and returns at once.
    pub async fn ask(&mut self, to: u32) -> Asked {
        let mark = self.timeline.len();
        let mut spec = self.handle.resource().spec;
        spec.scaling.replicas = to;
        let at = Instant::now();
        let answer = self
            .handle
            .set_spec(spec)
            .await
            .unwrap_or_else(|e| panic!("set_spec replicas {to}: {e}"));
        Asked {
            to,
            at,
            answer,
            mark,
        }
    }

    /// Whether the pool is settled at `n` nodes: phase `Ready`, no migration, the client on
    /// the operator's ring, and no node beside the ring's.
    fn settled_at(&self, n: u32) -> bool {
        let resource = self.handle.resource();
        let Some(status) = &resource.status else {
            return false;
        };
        let state = self.state();
        let live: Vec<String> = self
            .provider_nodes()
            .into_iter()
            .filter(|(_, _, alive)| *alive)
            .map(|(_, addr, _)| addr)
            .collect();
        let listed = self.nodes.stores(&self.pool).len();
        status.phase == Some(PoolPhase::Ready)
            && status.migration.is_none()
            && status.replicas == n
            && status.ready_replicas == n
            && !state.is_migrating()
            && state.current().len() == n
            && self.client.ring() == state
            && listed == n as usize
            && live.len() == n as usize
            && state
                .current()
                .members()
                .iter()
                .all(|m| live.contains(&m.address))
    }

    /// Waits for the resize `asked` to complete (and, when the spec still asks for its size,
    /// for the pool to settle), and returns what it did.
    pub async fn finish(&mut self, asked: Asked) -> Resize {
        let deadline = Instant::now() + RESIZE_LIMIT;
        let finished = |events: &[(Instant, Event)]| {
            events.iter().position(|(_, e)| {
                e.reason == reason::HANDOFF_FINISHED
                    && e.message.ends_with(&format!("; {} nodes serve", asked.to))
            })
        };
        let (events, done_at) = loop {
            self.poll_handoffs().await;
            let events = self.timeline.since(asked.mark);
            if let Some(i) = finished(&events) {
                let wanted = self.handle.resource().spec.scaling.replicas;
                if wanted != asked.to {
                    break (events, i);
                }
                if self.settled_at(asked.to) {
                    break (events, i);
                }
            }
            assert!(
                Instant::now() < deadline,
                "resize to {} not done within {RESIZE_LIMIT:?}; status {:?}; events {:?}",
                asked.to,
                self.handle.resource().status,
                events.iter().map(|(_, e)| &e.message).collect::<Vec<_>>()
            );
            tokio::time::sleep(POLL).await;
        };
        let settled = (self.handle.resource().spec.scaling.replicas == asked.to).then(Instant::now);
        let told = if settled.is_some() {
            self.timeline.since(asked.mark)
        } else {
            events[..done_at].to_vec()
        };
        self.remember_nodes();
        let (completed, finish) = events[done_at].clone();
        let upto = &events[..done_at];
        let last = |wanted: &[&str]| {
            upto.iter()
                .rev()
                .find(|(_, e)| wanted.contains(&e.reason))
                .cloned()
        };
        let (began, _) = last(&[reason::HANDOFF_STARTED])
            .unwrap_or_else(|| panic!("no HandoffStarted before {:?}", finish.message));
        let (_, scaled) = last(&[reason::SCALED_UP, reason::SCALED_DOWN])
            .unwrap_or_else(|| panic!("no scale event before {:?}", finish.message));
        let from = number_after(&scaled.message, " from ")
            .unwrap_or_else(|| panic!("no size in {:?}", scaled.message)) as u32;
        let replaced = told
            .iter()
            .filter(|(_, e)| e.reason == reason::NODE_REPLACED)
            .map(|(_, e)| e.message.clone())
            .collect();
        let parse = |prefix: &str| {
            number_after(&finish.message, prefix)
                .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", finish.message))
        };
        // The completed ring is the migrating ring's members at the next epoch.
        let target = parse("ring epoch ") - 1;
        let reported_keys = parse("(");
        let reported_bytes = parse(" keys, ");
        let previous: Vec<String> = lock(&self.rings)
            .iter()
            .filter(|(_, r)| r.current().epoch() == target)
            .find_map(|(_, r)| r.previous().map(|p| p.members().to_vec()))
            .unwrap_or_else(|| panic!("the client never saw the migrating ring of epoch {target}"))
            .into_iter()
            .map(|m| m.address)
            .collect();
        let current: Vec<String> = lock(&self.rings)
            .iter()
            .filter(|(_, r)| r.current().epoch() == target)
            .flat_map(|(_, r)| r.current().members().to_vec())
            .map(|m| m.address)
            .collect();
        let (mut statuses, mut unfinished, mut dead) = (Vec::new(), Vec::new(), Vec::new());
        let mut left_on_removed = 0;
        for addr in &previous {
            if self.killed.contains(addr) {
                dead.push(addr.clone());
                continue;
            }
            let member = self.known.get(addr).cloned();
            let mut status = self.handoffs.get(&(addr.clone(), target)).cloned();
            if let Some(m) = &member
                && m.alive
                && let Ok(now) = m.admin.handoff().await
                && now.epoch == Some(target)
            {
                status = Some(now);
            }
            match status {
                Some(s) => {
                    if s.state != State::Done {
                        unfinished.push(addr.clone());
                    }
                    statuses.push(s);
                }
                None => unfinished.push(addr.clone()),
            }
            if !current.contains(addr)
                && let Some(m) = member
            {
                left_on_removed += m.shared.store.stats().curr_items;
            }
        }
        let resize = Resize {
            from,
            to: asked.to,
            statuses,
            unfinished,
            asked: asked.at,
            began,
            completed,
            settled,
            reported_keys,
            reported_bytes,
            dead,
            replaced,
            left_on_removed,
        };
        self.history.push(resize.clone());
        resize
    }

    /// Resizes to `to` nodes through the operator and waits until the pool is settled.
    pub async fn resize_to(&mut self, to: u32) -> Resize {
        let asked = self.ask(to).await;
        self.finish(asked).await
    }

    /// Waits until the client routes by a migrating ring of `to` members.
    pub async fn until_migrating_to(&self, to: u32) -> RingState {
        let deadline = Instant::now() + RESIZE_LIMIT;
        loop {
            let state = self.client.ring();
            if state.is_migrating() && state.current().len() == to {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "no migrating ring of {to} nodes reached the client; it has {state:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Kills the node serving `slot` as a crash would (`EmbeddedProvider::kill`); returns its
    /// data address. The operator notices and replaces it.
    pub async fn kill(&mut self, slot: u32) -> String {
        self.remember_nodes();
        let addr = self.member(slot).addr;
        self.nodes
            .kill(&self.pool, slot)
            .await
            .unwrap_or_else(|| panic!("no live node in slot {slot}"));
        self.killed.push(addr.clone());
        self.remember_nodes();
        addr
    }

    /// The store of the node at `addr` (kept after it stopped).
    pub fn shared(&self, addr: &str) -> Arc<Shared> {
        self.known
            .get(addr)
            .map(|m| m.shared.clone())
            .unwrap_or_else(|| panic!("no node at {addr}"))
    }

    /// The members of the operator's current ring, in slot order.
    fn members(&mut self) -> Vec<Member> {
        self.remember_nodes();
        self.ring()
            .members()
            .iter()
            .map(|m| {
                self.known
                    .get(&m.address)
                    .cloned()
                    .unwrap_or_else(|| panic!("no node at {}", m.address))
            })
            .collect()
    }

    /// What every node of the current ring holds now.
    pub fn snapshot(&mut self) -> Snapshot {
        Snapshot {
            slots: self.members().iter().map(|m| items(&m.shared)).collect(),
        }
    }

    /// Asserts a clean end state: no migration, no node running beside the ring's, every key
    /// on its owner and only there, each node's `curr_items` and `bytes` (asked over the
    /// memcached protocol) equal to what its store holds, the stores' own invariants, and the
    /// totals adding up.
    pub async fn check_clean(&mut self) -> Clean {
        let state = self.state();
        assert!(!state.is_migrating(), "a migration is still pending");
        let members = self.members();
        let strays: Vec<(u32, String, bool)> = self
            .provider_nodes()
            .into_iter()
            .filter(|(_, addr, _)| !members.iter().any(|m| m.addr == *addr))
            .collect();
        assert!(
            strays.is_empty(),
            "nodes outside the ring are still there: {strays:?}"
        );
        let snapshot = self.snapshot();
        let ring = state.current();
        let misplaced = misplaced((0u32..).zip(&snapshot.slots), |key| ring.owner_slot(key));
        assert!(
            misplaced.is_empty(),
            "{} keys are held by nodes that do not own them, e.g. {:?}",
            misplaced.len(),
            &misplaced[..misplaced.len().min(5)]
        );
        let placement = snapshot.placement();
        let (mut items, mut bytes) = (0u64, 0u64);
        for (m, held) in members.iter().zip(&snapshot.slots) {
            assert!(m.alive, "slot {} is not alive", m.slot);
            let (i, b) = check_node(m.slot, &m.addr, &m.shared, held).await;
            items += i;
            bytes += b;
        }
        assert_eq!(
            items,
            placement.len() as u64,
            "curr_items summed over nodes vs distinct keys"
        );
        Clean { items, bytes }
    }

    /// Stops the operator, which stops every node (a pending migration is abandoned).
    pub async fn shutdown(mut self) {
        self.follower.abort();
        if let Some(operator) = self.operator.take() {
            operator
                .stop()
                .await
                .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
        }
        assert_eq!(self.nodes.running(), 0, "every embedded node is stopped");
    }
}

/// Checks one node against what its store holds; returns its `curr_items` and `bytes`.
async fn check_node(
    slot: u32,
    addr: &str,
    shared: &Shared,
    held: &HashMap<Vec<u8>, Vec<u8>>,
) -> (u64, u64) {
    shared
        .store
        .check_invariants()
        .unwrap_or_else(|e| panic!("slot {slot}: store invariants: {e}"));
    let client =
        NodeClient::new(addr.to_owned(), client_options()).unwrap_or_else(|e| panic!("{e}"));
    let stats = client
        .stats()
        .await
        .unwrap_or_else(|e| panic!("stats of slot {slot}: {e}"));
    let stat = |name: &str| -> u64 {
        stats
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("stat {name} of slot {slot}"))
    };
    let cost: u64 = held
        .iter()
        .map(|(k, v)| item_cost(k.len(), v.len()) as u64)
        .sum();
    assert_eq!(
        stat("curr_items"),
        held.len() as u64,
        "curr_items of slot {slot}"
    );
    assert_eq!(stat("bytes"), cost, "bytes of slot {slot}");
    assert_eq!(
        stat("evictions"),
        0,
        "slot {slot} evicted: the test's capacity is too small"
    );
    (stat("curr_items"), stat("bytes"))
}

/// Hands every ring the operator publishes to `client`, and notes it with the instant.
fn follow(
    handle: &PoolHandle,
    client: Arc<PoolClient>,
    seen: Arc<Mutex<Vec<(Instant, RingState)>>>,
) -> JoinHandle<()> {
    let mut rings = handle.ring();
    tokio::spawn(async move {
        loop {
            let ring = rings.borrow_and_update().clone();
            if let Some(ring) = ring {
                client.set_ring(ring.clone());
                lock(&seen).push((Instant::now(), ring));
            }
            if rings.changed().await.is_err() {
                break;
            }
        }
    })
}

/// The comparison: plain nodes whose clients switch straight to the new ring, with no
/// previous ring and no hand-off.
#[derive(Debug)]
pub struct PlainPool {
    /// By slot; a removed slot's node is stopped.
    nodes: Vec<(String, Arc<Shared>, Option<Node>)>,
    client: Arc<PoolClient>,
    capacity_mib: u64,
}

impl PlainPool {
    pub async fn start(n: u32, capacity_mib: u64) -> PlainPool {
        let mut pool = PlainPool {
            nodes: Vec::new(),
            client: Arc::new(
                PoolClient::new(RingState::default(), client_options())
                    .unwrap_or_else(|e| panic!("client: {e}")),
            ),
            capacity_mib,
        };
        for _ in 0..n {
            pool.add_node().await;
        }
        let ring = Ring::from_addresses(1, pool.nodes.iter().map(|(a, _, _)| a.clone()))
            .unwrap_or_else(|e| panic!("ring: {e}"));
        pool.client = Arc::new(
            PoolClient::new(RingState::new(ring), client_options())
                .unwrap_or_else(|e| panic!("client: {e}")),
        );
        pool
    }

    async fn add_node(&mut self) -> String {
        let node = Node::start(NodeConfig::ephemeral(self.capacity_mib, Policy::Lru, None))
            .await
            .unwrap_or_else(|e| panic!("node: {e}"));
        let addr = node.addr.to_string();
        self.nodes
            .push((addr.clone(), node.shared.clone(), Some(node)));
        addr
    }

    pub fn client(&self) -> Arc<PoolClient> {
        self.client.clone()
    }

    pub fn ring(&self) -> Ring {
        self.client.ring().current().clone()
    }

    /// Switches the clients to a ring of `to` nodes; keys stay where they are. Returns when
    /// it switched.
    pub async fn resize_to(&mut self, to: u32) -> Instant {
        let ring = self.ring();
        let n = ring.len();
        let next = if to > n {
            let mut added = Vec::new();
            for _ in n..to {
                added.push(self.add_node().await);
            }
            ring.grown(added)
        } else {
            ring.shrunk(n - to)
        }
        .unwrap_or_else(|e| panic!("ring: {e}"));
        assert!(
            self.client.set_ring(RingState::new(next)),
            "the client refused the ring"
        );
        let at = Instant::now();
        for (_, _, node) in self.nodes.drain(to as usize..).collect::<Vec<_>>() {
            if let Some(node) = node {
                node.shutdown().await;
            }
        }
        at
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            slots: self.nodes.iter().map(|(_, s, _)| items(s)).collect(),
        }
    }

    pub async fn shutdown(mut self) {
        for (_, _, node) in &mut self.nodes {
            if let Some(node) = node.take() {
                node.shutdown().await;
            }
        }
    }
}
