//! A pool of real nodes, in-process on loopback, resized the way the operator resizes one.
//!
//! Grow `n -> m`: start nodes for slots `n..m`, `begin` the grown ring and publish it (clients
//! read the new owner and fall back to the old one), have the old nodes hand off
//! (`rebalance::hand_off_all`), `complete` and publish again. Shrink `n -> m`: `begin` the
//! shrunk ring, publish, have the removed nodes hand everything off, `complete`, publish, stop
//! the removed nodes. `handoff: false` skips the hand-off step, for the comparison.
//!
//! Operator policies the harness fixes (and the tests hold it to):
//! - **One migration at a time.** `RingState::begin` refuses while a migration runs, because
//!   clients have a single fallback ring. A resize asked for during a migration waits for the
//!   running one to finish its hand-off and complete, then starts (`grow_to`/`shrink_to`
//!   settle first); `begin_grow`/`begin_shrink` called directly during a migration are refused
//!   cleanly: the state is unchanged and any node started for it is stopped.
//! - **A participant that dies mid hand-off** does not hold the migration up: its keys are lost
//!   whatever the operator does. The others finish, the migration completes, and the dead node
//!   is reported; `replace_dead` then puts a fresh node in its slot (`Ring::replaced`),
//!   published without a previous ring since the dead node has nothing to hand over. A
//!   participant that failed but still answers is not written off: the migration stays pending
//!   and the error is returned.
//!
//! Every test runs inside `run`: one test at a time (the hit-ratio windows mean nothing when
//! two tests share the machine's two cores), on a fresh multi-threaded runtime that is dropped
//! when the test ends or panics, which ends every node and task it started.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cache_node::client::{ClientOptions, NodeClient, PoolClient};
use cache_node::handoff::{HandoffStatus, State};
use cache_node::server::Shared;
use cache_node::store::{Policy, item_cost};
use cache_node::{Node, NodeConfig};
use cachepool_crds::ring::{Ring, RingError, RingState};
use cachepool_operator::rebalance::{self, AdminClient, HandoffOptions, Participant};
use tokio::task::JoinHandle;

/// Admin token of every node the harness starts.
pub const TOKEN: &str = "resize-harness-token";

/// A test that takes longer than this has hung.
const TEST_LIMIT: Duration = Duration::from_secs(90);

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

/// One node of the pool.
#[derive(Debug)]
pub struct Member {
    pub slot: u32,
    /// Data address, as the ring names it.
    pub addr: String,
    /// Admin address (`host:port`).
    pub admin_addr: String,
    pub admin: AdminClient,
    /// The node's store and counters, readable even after the node stopped.
    pub shared: Arc<Shared>,
    node: Option<Node>,
}

impl Member {
    async fn start(slot: u32, capacity_mib: u64) -> Member {
        let config = NodeConfig::ephemeral(capacity_mib, Policy::Lru, Some(TOKEN));
        let node = Node::start(config)
            .await
            .unwrap_or_else(|e| panic!("node for slot {slot}: {e}"));
        let admin = AdminClient::new(&node.admin_addr.to_string(), Some(TOKEN));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !admin.ready().await {
            assert!(
                Instant::now() < deadline,
                "node for slot {slot} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Member {
            slot,
            addr: node.addr.to_string(),
            admin_addr: node.admin_addr.to_string(),
            admin,
            shared: node.shared.clone(),
            node: Some(node),
        }
    }

    fn participant(&self) -> Participant {
        Participant {
            address: self.addr.clone(),
            admin: self.admin.clone(),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.node.is_some()
    }

    async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
    }

    /// Every item the node's store holds: key -> value.
    pub fn items(&self) -> HashMap<Vec<u8>, Vec<u8>> {
        let mut out = HashMap::new();
        self.shared.store.for_each(|item| {
            out.insert(item.key().to_vec(), item.value().to_vec());
        });
        out
    }
}

/// What one resize did.
#[derive(Debug, Clone)]
pub struct Resize {
    pub from: u32,
    pub to: u32,
    /// Hand-off status of each participant that finished.
    pub statuses: Vec<HandoffStatus>,
    /// When the ring was begun, and when the completed ring was published.
    pub began: Instant,
    pub completed: Instant,
    /// From `begin` to the completed ring being published.
    pub elapsed: Duration,
    /// Participants that died during the hand-off (data addresses).
    pub dead: Vec<String>,
    /// What `hand_off_all` answered, when it failed.
    pub handoff_error: Option<String>,
    /// Items the removed nodes still held when they were stopped (a shrink).
    pub left_on_removed: u64,
}

impl Resize {
    pub fn keys_moved(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_moved).sum()
    }
    pub fn keys_skipped(&self) -> u64 {
        self.statuses.iter().map(|s| s.keys_skipped).sum()
    }
    pub fn bytes_moved(&self) -> u64 {
        self.statuses.iter().map(|s| s.bytes_moved).sum()
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

    pub fn describe(&self) -> String {
        format!(
            "{}->{} in {:?}: hand-off of {} foreign keys: moved {} ({} bytes), skipped {}, \
             retried (copy withdrawn) {}, dropped {}{}",
            self.from,
            self.to,
            self.elapsed,
            self.keys_total(),
            self.keys_moved(),
            self.bytes_moved(),
            self.keys_skipped(),
            self.keys_retried(),
            self.keys_dropped(),
            if self.dead.is_empty() {
                String::new()
            } else {
                format!("; dead: {:?}", self.dead)
            }
        )
    }
}

/// Why a resize did not happen or did not finish.
#[derive(Debug)]
pub enum ResizeError {
    /// The ring refused the change (e.g. a migration is still running).
    Ring(RingError),
    /// A participant that still answers failed its hand-off; the migration stays pending.
    Handoff(rebalance::Error),
}

impl std::fmt::Display for ResizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResizeError::Ring(e) => write!(f, "ring: {e}"),
            ResizeError::Handoff(e) => write!(f, "hand-off: {e}"),
        }
    }
}

type HandoffTask = JoinHandle<rebalance::Result<Vec<HandoffStatus>>>;

/// A migration begun and not yet completed.
#[derive(Debug)]
struct Pending {
    from: u32,
    to: u32,
    target: Ring,
    participants: Vec<Participant>,
    task: Option<HandoffTask>,
    began: Instant,
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

/// A pool of in-process nodes and a pool client routing by its ring.
#[derive(Debug)]
pub struct Pool {
    /// The current ring's nodes, in slot order.
    members: Vec<Member>,
    /// Removed by the pending shrink; stopped when it completes.
    leaving: Vec<Member>,
    state: RingState,
    client: Arc<PoolClient>,
    capacity_mib: u64,
    /// Run the hand-off step of a resize (false: only publish the rings).
    pub handoff: bool,
    pub options: HandoffOptions,
    pending: Option<Pending>,
    /// Every resize completed, in order.
    pub history: Vec<Resize>,
}

impl Pool {
    /// `n` nodes of `capacity_mib` each, in ring epoch 1.
    pub async fn start(n: u32, capacity_mib: u64) -> Pool {
        let mut members = Vec::new();
        for slot in 0..n {
            members.push(Member::start(slot, capacity_mib).await);
        }
        let ring = Ring::from_addresses(1, members.iter().map(|m| m.addr.clone()))
            .unwrap_or_else(|e| panic!("ring: {e}"));
        let state = RingState::new(ring);
        let client = PoolClient::new(state.clone(), client_options())
            .unwrap_or_else(|e| panic!("client: {e}"));
        Pool {
            members,
            leaving: Vec::new(),
            state,
            client: Arc::new(client),
            capacity_mib,
            handoff: true,
            options: HandoffOptions {
                poll: Duration::from_millis(20),
                timeout: Duration::from_secs(60),
                ..HandoffOptions::default()
            },
            pending: None,
            history: Vec::new(),
        }
    }

    pub fn client(&self) -> Arc<PoolClient> {
        self.client.clone()
    }

    pub fn state(&self) -> &RingState {
        &self.state
    }

    pub fn ring(&self) -> &Ring {
        self.state.current()
    }

    pub fn len(&self) -> u32 {
        self.state.current().len()
    }

    pub fn member(&self, slot: u32) -> &Member {
        &self.members[slot as usize]
    }

    fn publish(&self) {
        assert!(
            self.client.set_ring(self.state.clone()),
            "the pool client refused the ring"
        );
    }

    fn spawn_handoff(&self, participants: &[Participant], target: &Ring) -> Option<HandoffTask> {
        if !self.handoff || participants.is_empty() {
            return None;
        }
        let (participants, target, options) = (participants.to_vec(), target.clone(), self.options);
        Some(tokio::spawn(async move {
            rebalance::hand_off_all(&participants, &target, options).await
        }))
    }

    /// Starts growing to `m` nodes: new nodes, the grown ring published, hand-off started.
    pub async fn begin_grow(&mut self, m: u32) -> Result<(), ResizeError> {
        let n = self.len();
        assert!(m > n, "grow {n} -> {m}");
        let mut added = Vec::new();
        for slot in n..m {
            added.push(Member::start(slot, self.capacity_mib).await);
        }
        let next = self
            .state
            .current()
            .grown(added.iter().map(|a| a.addr.clone()));
        if let Err(e) = next.and_then(|next| self.state.begin(next)) {
            for mut node in added {
                node.stop().await;
            }
            return Err(ResizeError::Ring(e));
        }
        self.members.extend(added);
        self.publish();
        let participants: Vec<_> = self.members[..n as usize]
            .iter()
            .map(Member::participant)
            .collect();
        let target = self.state.current().clone();
        let task = self.spawn_handoff(&participants, &target);
        self.pending = Some(Pending {
            from: n,
            to: m,
            target,
            participants,
            task,
            began: Instant::now(),
        });
        Ok(())
    }

    /// Starts shrinking to `m` nodes: the shrunk ring published, the removed nodes handing off.
    pub async fn begin_shrink(&mut self, m: u32) -> Result<(), ResizeError> {
        let n = self.len();
        assert!(m < n && m > 0, "shrink {n} -> {m}");
        let next = self
            .state
            .current()
            .shrunk(n - m)
            .map_err(ResizeError::Ring)?;
        self.state.begin(next).map_err(ResizeError::Ring)?;
        self.publish();
        self.leaving = self.members.split_off(m as usize);
        let participants: Vec<_> = self.leaving.iter().map(Member::participant).collect();
        let target = self.state.current().clone();
        let task = self.spawn_handoff(&participants, &target);
        self.pending = Some(Pending {
            from: n,
            to: m,
            target,
            participants,
            task,
            began: Instant::now(),
        });
        Ok(())
    }

    /// Whether a migration is pending (begun, not completed).
    pub fn is_migrating(&self) -> bool {
        self.pending.is_some()
    }

    /// Waits for the pending migration's hand-off, completes the migration, publishes the ring
    /// and stops the nodes a shrink removed. See the module documentation for dead nodes.
    pub async fn finish(&mut self) -> Result<Resize, ResizeError> {
        let Some(mut pending) = self.pending.take() else {
            panic!("no migration to finish");
        };
        let outcome = match pending.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| panic!("hand-off task: {e}")),
            None => Ok(Vec::new()),
        };
        let (statuses, dead, handoff_error) = match outcome {
            Ok(statuses) => (statuses, Vec::new(), None),
            Err(error) => {
                let (statuses, dead, live_failure) = self.settle_participants(&pending).await;
                if live_failure {
                    self.pending = Some(pending);
                    return Err(ResizeError::Handoff(error));
                }
                (statuses, dead, Some(error.to_string()))
            }
        };
        self.state.complete();
        self.publish();
        let mut left_on_removed = 0;
        for mut node in self.leaving.drain(..) {
            left_on_removed += node.shared.store.stats().curr_items;
            node.stop().await;
        }
        let resize = Resize {
            from: pending.from,
            to: pending.to,
            statuses,
            began: pending.began,
            completed: Instant::now(),
            elapsed: pending.began.elapsed(),
            dead,
            handoff_error,
            left_on_removed,
        };
        self.history.push(resize.clone());
        Ok(resize)
    }

    /// After `hand_off_all` failed: waits for every participant that still answers to end its
    /// hand-off. Returns their statuses, the dead participants, and whether a live one failed.
    async fn settle_participants(
        &self,
        pending: &Pending,
    ) -> (Vec<HandoffStatus>, Vec<String>, bool) {
        let (mut statuses, mut dead, mut live_failure) = (Vec::new(), Vec::new(), false);
        for p in &pending.participants {
            let deadline = Instant::now() + self.options.timeout;
            loop {
                match p.admin.handoff().await {
                    Err(_) if !p.admin.ready().await => {
                        dead.push(p.address.clone());
                        break;
                    }
                    Ok(st)
                        if st.epoch == Some(pending.target.epoch())
                            && st.state != State::Running =>
                    {
                        live_failure |= st.state != State::Done;
                        statuses.push(st);
                        break;
                    }
                    _ if Instant::now() > deadline => {
                        live_failure = true;
                        break;
                    }
                    _ => tokio::time::sleep(self.options.poll).await,
                }
            }
        }
        (statuses, dead, live_failure)
    }

    /// Completes a pending migration first (the one-at-a-time policy); returns what it did.
    pub async fn settle(&mut self) -> Result<Option<Resize>, ResizeError> {
        if self.pending.is_some() {
            self.finish().await.map(Some)
        } else {
            Ok(None)
        }
    }

    /// Grows to `m` nodes, after the pending migration if one runs.
    pub async fn grow_to(&mut self, m: u32) -> Result<Resize, ResizeError> {
        self.settle().await?;
        self.begin_grow(m).await?;
        self.finish().await
    }

    /// Shrinks to `m` nodes, after the pending migration if one runs.
    pub async fn shrink_to(&mut self, m: u32) -> Result<Resize, ResizeError> {
        self.settle().await?;
        self.begin_shrink(m).await?;
        self.finish().await
    }

    /// Kills the node at `slot`: it stops answering on both ports and its hand-off stops.
    ///
    /// A killed process takes its hand-off task with it; an in-process `Node::shutdown` does
    /// not (see `edge::node_shutdown_ends_its_running_hand_off`), so the hand-off is cancelled
    /// first to make the in-process death look like a real one.
    pub async fn kill(&mut self, slot: u32) {
        let member = &mut self.members[slot as usize];
        let url = format!("http://{}/handoff", member.admin_addr);
        let _ = reqwest::Client::new()
            .delete(url)
            .bearer_auth(TOKEN)
            .send()
            .await;
        member.stop().await;
    }

    /// Stops the node at `slot` with `Node::shutdown` alone, as an embedding application would.
    pub async fn stop_node(&mut self, slot: u32) {
        self.members[slot as usize].stop().await;
    }

    /// Puts a fresh, empty node in the slot of a dead one. Not a migration: the dead node has
    /// nothing to hand over, and naming it as a previous owner would only make every write of
    /// its keys fail (writes delete on the previous owner first).
    pub async fn replace_dead(&mut self, slot: u32) -> Result<(), ResizeError> {
        assert!(
            !self.is_migrating(),
            "complete the migration before replacing a node"
        );
        assert!(
            !self.members[slot as usize].is_alive(),
            "slot {slot} is alive"
        );
        let fresh = Member::start(slot, self.capacity_mib).await;
        let next = self
            .state
            .current()
            .replaced(slot, fresh.addr.clone())
            .map_err(ResizeError::Ring)?;
        self.state = RingState::new(next);
        self.members[slot as usize] = fresh;
        self.publish();
        Ok(())
    }

    /// What every node of the current ring holds now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            slots: self.members.iter().map(Member::items).collect(),
        }
    }

    /// Asserts a clean end state: every key on its owner and only there, each node's
    /// `curr_items` and `bytes` (asked over the memcached protocol) equal to what its store
    /// holds, the stores' own invariants, and the totals adding up.
    pub async fn check_clean(&self) -> Clean {
        assert!(!self.is_migrating(), "a migration is still pending");
        let snapshot = self.snapshot();
        let mut misplaced = Vec::new();
        for (slot, items) in (0u32..).zip(&snapshot.slots) {
            for key in items.keys() {
                let owner = self.ring().owner_slot(key);
                if owner != Some(slot) {
                    misplaced.push(format!(
                        "{} on slot {slot}, owner {owner:?}",
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        assert!(
            misplaced.is_empty(),
            "{} keys are held by nodes that do not own them, e.g. {:?}",
            misplaced.len(),
            &misplaced[..misplaced.len().min(5)]
        );
        let placement = snapshot.placement();
        let (mut items, mut bytes) = (0u64, 0u64);
        for (m, held) in self.members.iter().zip(&snapshot.slots) {
            if !m.is_alive() {
                continue;
            }
            m.shared
                .store
                .check_invariants()
                .unwrap_or_else(|e| panic!("slot {}: store invariants: {e}", m.slot));
            let client =
                NodeClient::new(m.addr.clone(), client_options()).unwrap_or_else(|e| panic!("{e}"));
            let stats = client
                .stats()
                .await
                .unwrap_or_else(|e| panic!("stats of slot {}: {e}", m.slot));
            let stat = |name: &str| -> u64 {
                stats
                    .get(name)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("stat {name} of slot {}", m.slot))
            };
            let cost: u64 = held
                .iter()
                .map(|(k, v)| item_cost(k.len(), v.len()) as u64)
                .sum();
            assert_eq!(
                stat("curr_items"),
                held.len() as u64,
                "curr_items of slot {}",
                m.slot
            );
            assert_eq!(stat("bytes"), cost, "bytes of slot {}", m.slot);
            assert_eq!(
                stat("evictions"),
                0,
                "slot {} evicted: the test's capacity is too small",
                m.slot
            );
            items += stat("curr_items");
            bytes += stat("bytes");
        }
        assert_eq!(
            items,
            placement.len() as u64,
            "curr_items summed over nodes vs distinct keys"
        );
        Clean { items, bytes }
    }

    /// Stops every node (a pending migration is abandoned).
    pub async fn shutdown(mut self) {
        if let Some(pending) = self.pending.take()
            && let Some(task) = pending.task
        {
            task.abort();
        }
        for m in self.members.iter_mut().chain(&mut self.leaving) {
            m.stop().await;
        }
    }
}
