//! The pool driver: one task per pool that observes its nodes, samples their traffic, runs
//! the autoscaler and carries out what the reconcile core decides.
//!
//! A round: list the provider's nodes, probe each one's `/readyz` (and `/handoff` for the
//! previous ring's members while keys migrate), sample `/stats` every sampling interval into
//! the pool's history, let the autoscaler judge a closed window, call [`reconcile::plan`], and
//! execute its actions in order. A ring is stored in the pool record before any client hears
//! of it. Rounds come quickly while something is in progress and at the probe interval
//! otherwise; commands from the API (spec changes, flush) wake the driver at once.
//!
//! The driver is the only writer of its pool's record and manifest, so spec changes from the
//! API and from the file never race: both arrive as commands or scans handled between rounds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use cache_node::handoff::HandoffStatus;
use cachepool_crds::pool::{CachePool, CachePoolSpec, ScalingMode, SpecError, validate};
use cachepool_crds::ring::RingState;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::autoscaler::{Autoscaler, Decision, Window};
use crate::history::{NodeSample, Point, PoolHistory};
use crate::metrics::{OperatorMetrics, ScaleDirection};
use crate::provider::{LaunchSpec, PoolRef, Provider, ProviderNode};
use crate::rebalance::AdminClient;
use crate::reconcile::{self, Action, Health, Input, NodeSettings, NodeView, RingChange};
use crate::state::{PoolRecord, StateDir};

/// Timing of the driver; the defaults suit a real pool, tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct DriverOptions {
    /// Round interval while nothing is in progress (also how fast a crash is noticed).
    pub probe_interval: Duration,
    /// Round interval while keys migrate.
    pub busy_interval: Duration,
    /// Round interval while a node starts or right after a ring change.
    pub quick_interval: Duration,
    /// How often every node's stats are sampled.
    pub sample_interval: Duration,
    /// A ready node that does not answer for this long is replaced.
    pub node_timeout: Duration,
    /// A new node that is not ready within this long is replaced.
    pub start_timeout: Duration,
    /// Timeout of one probe request.
    pub probe_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            busy_interval: Duration::from_millis(100),
            quick_interval: Duration::from_millis(10),
            sample_interval: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// Per-minute history kept per pool.
const HISTORY_RETENTION: Duration = Duration::from_secs(25 * 3600);

/// Window of the status's miss rate, hit rate and requests per minute in manual mode (auto
/// mode uses the autoscaler's window).
const STATUS_WINDOW: Duration = Duration::from_secs(60);

/// A failed hand-off is restarted at most this often per node.
const HANDOFF_RETRY: Duration = Duration::from_secs(2);

/// Why an API request to a pool failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The spec breaks rules; nothing was changed.
    #[error("invalid spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<SpecError>),
    /// The change was valid but could not be stored.
    #[error("{0}")]
    Storage(String),
    /// The pool is being deleted or the operator is stopping.
    #[error("the pool is going away")]
    Gone,
}

/// What the API asks of a pool's driver.
#[derive(Debug)]
enum Command {
    /// Replace the spec (already merged from a patch); answered with the updated resource.
    SetSpec {
        spec: Box<CachePoolSpec>,
        reply: oneshot::Sender<Result<CachePool, CommandError>>,
    },
    /// Empty every node; answered with how many nodes were flushed and how many items dropped.
    Flush {
        reply: oneshot::Sender<Result<FlushReport, CommandError>>,
    },
    /// The manifest changed (or appeared).
    Manifest {
        path: std::path::PathBuf,
        pool: Box<CachePool>,
    },
    /// The manifest cannot be read any more.
    Unreadable { message: String },
    /// The manifest was deleted: stop every node and end.
    Delete,
}

/// Result of a flush.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushReport {
    pub nodes: u32,
    pub items_dropped: u64,
    /// Nodes that could not be flushed, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// The face of a pool that the API and the standalone loop hold.
#[derive(Debug)]
pub struct PoolHandle {
    pub pool: PoolRef,
    resource: watch::Sender<CachePool>,
    ring: watch::Sender<Option<RingState>>,
    history: Mutex<PoolHistory>,
    commands: mpsc::Sender<Command>,
}

impl PoolHandle {
    /// The resource as Kubernetes would show it: metadata, the newest spec, the status.
    pub fn resource(&self) -> CachePool {
        self.resource.borrow().clone()
    }

    /// Watches the pool's ring (`None` until the first one is published).
    pub fn ring(&self) -> watch::Receiver<Option<RingState>> {
        self.ring.subscribe()
    }

    /// Per-minute history points with minute start in `[from, to)`.
    pub fn history(&self, from: SystemTime, to: SystemTime) -> Vec<Point> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .points(from, to)
    }

    /// Replaces the spec after validating it; the manifest file is rewritten.
    pub async fn set_spec(&self, spec: CachePoolSpec) -> Result<CachePool, CommandError> {
        validate(&spec).map_err(CommandError::Invalid)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetSpec {
            spec: Box::new(spec),
            reply,
        })
        .await?;
        answer.await.map_err(|_| CommandError::Gone)?
    }

    /// Empties every node of the pool.
    pub async fn flush(&self) -> Result<FlushReport, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Flush { reply }).await?;
        answer.await.map_err(|_| CommandError::Gone)?
    }

    pub(crate) async fn manifest_changed(&self, path: std::path::PathBuf, pool: CachePool) {
        let _ = self
            .send(Command::Manifest {
                path,
                pool: Box::new(pool),
            })
            .await;
    }

    pub(crate) async fn manifest_unreadable(&self, message: String) {
        let _ = self.send(Command::Unreadable { message }).await;
    }

    pub(crate) async fn delete(&self) {
        let _ = self.send(Command::Delete).await;
    }

    async fn send(&self, command: Command) -> Result<(), CommandError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| CommandError::Gone)
    }
}

/// What the driver remembers about one node between rounds.
#[derive(Debug)]
struct NodeMemory {
    address: String,
    admin: AdminClient,
    probe: AdminClient,
    fresh: bool,
    settings: Option<NodeSettings>,
    first_seen: Instant,
    last_ok: Option<Instant>,
    handoff: Option<HandoffStatus>,
    /// Epoch and time of the last hand-off this driver started on the node.
    handoff_started: Option<(u64, Instant)>,
}

/// The driver of one pool.
pub struct Driver<P: Provider> {
    handle: Arc<PoolHandle>,
    commands: mpsc::Receiver<Command>,
    provider: Arc<P>,
    state: StateDir,
    metrics: OperatorMetrics,
    options: DriverOptions,
    manifest_path: std::path::PathBuf,
    metadata: ObjectMeta,
    record: PoolRecord,
    spec_errors: Vec<SpecError>,
    nodes: BTreeMap<String, NodeMemory>,
    autoscaler: Autoscaler,
    next_window: Option<SystemTime>,
    pending_reason: Option<String>,
    ring_changed_at: SystemTime,
    last_sample: Option<Instant>,
    deleted: bool,
}

impl<P: Provider> std::fmt::Debug for Driver<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("pool", &self.handle.pool)
            .finish_non_exhaustive()
    }
}

impl<P: Provider> Driver<P> {
    /// A driver for the pool declared in `path`, restoring its record from the state directory.
    pub fn new(
        pool: PoolRef,
        path: std::path::PathBuf,
        resource: CachePool,
        provider: Arc<P>,
        state: StateDir,
        metrics: OperatorMetrics,
        options: DriverOptions,
    ) -> (Driver<P>, Arc<PoolHandle>) {
        let now = SystemTime::now();
        let mut record = state.load_record(&pool).unwrap_or_else(|| PoolRecord {
            generation: 0,
            uid: new_uid(),
            creation_timestamp: Some(reconcile::time(now)),
            ..PoolRecord::default()
        });
        let spec_errors = accept_spec(&mut record, &resource.spec);
        let autoscaler = Autoscaler::restore(
            record
                .status
                .last_scale_time
                .as_ref()
                .map(|t| SystemTime::from(t.0)),
        );
        let ring = reconcile::ring_state(&record.status);
        let (commands_tx, commands) = mpsc::channel(16);
        let mut metadata = resource.metadata.clone();
        fill_metadata(&mut metadata, &record);
        let mut shown = CachePool::new(&pool.name, record.spec.clone());
        shown.metadata = metadata.clone();
        shown.status = Some(record.status.clone());
        let handle = Arc::new(PoolHandle {
            pool: pool.clone(),
            resource: watch::Sender::new(shown),
            ring: watch::Sender::new(ring),
            history: Mutex::new(PoolHistory::new(HISTORY_RETENTION)),
            commands: commands_tx,
        });
        let driver = Driver {
            handle: handle.clone(),
            commands,
            provider,
            state,
            metrics,
            options,
            manifest_path: path,
            metadata,
            record,
            spec_errors,
            nodes: BTreeMap::new(),
            autoscaler,
            next_window: None,
            pending_reason: None,
            ring_changed_at: now,
            last_sample: None,
            deleted: false,
        };
        (driver, handle)
    }

    fn label(&self) -> String {
        self.handle.pool.to_string()
    }

    /// Runs until the pool is deleted or `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(pool = %self.handle.pool, generation = self.record.generation, "pool driver started");
        let mut interval = Duration::ZERO;
        loop {
            let command = tokio::select! {
                biased;
                stop = shutdown.wait_for(|stop| *stop) => {
                    drop(stop);
                    break;
                }
                command = self.commands.recv() => match command {
                    Some(command) => Some(command),
                    None => break,
                },
                () = tokio::time::sleep(interval) => None,
            };
            if let Some(command) = command {
                self.command(command).await;
            }
            interval = self.round().await;
            if self.deleted {
                break;
            }
        }
        if self.deleted {
            self.metrics.forget_pool(&self.label());
            info!(pool = %self.handle.pool, "pool deleted: its nodes are stopped");
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::SetSpec { spec, reply } => {
                let _ = reply.send(self.set_spec(*spec));
            }
            Command::Flush { reply } => {
                let _ = reply.send(Ok(self.flush().await));
            }
            Command::Manifest { path, pool } => {
                self.manifest_path = path;
                let labels = pool.metadata.labels.clone();
                let annotations = pool.metadata.annotations.clone();
                self.metadata.labels = labels;
                self.metadata.annotations = annotations;
                let before = self.record.generation;
                self.spec_errors = accept_spec(&mut self.record, &pool.spec);
                if self.record.generation != before {
                    info!(pool = %self.handle.pool, generation = self.record.generation,
                          valid = self.spec_errors.is_empty(), "manifest changed");
                    if !self.spec_errors.is_empty() {
                        self.metrics.reconcile_failed(&self.label(), "invalid_spec");
                        warn!(pool = %self.handle.pool, errors = %join_errors(&self.spec_errors),
                              "spec rejected; the pool keeps running on its last valid spec");
                    }
                }
            }
            Command::Unreadable { message } => {
                let error = SpecError {
                    field: "manifest".to_owned(),
                    message,
                };
                if self.spec_errors != [error.clone()] {
                    warn!(pool = %self.handle.pool, error = %error, "manifest unreadable; the pool keeps running");
                    self.metrics.reconcile_failed(&self.label(), "invalid_spec");
                    self.spec_errors = vec![error];
                }
            }
            Command::Delete => self.delete().await,
        }
    }

    fn set_spec(&mut self, spec: CachePoolSpec) -> Result<CachePool, CommandError> {
        let mut resource = self.handle.resource();
        resource.spec = spec.clone();
        resource.metadata = self.metadata.clone();
        self.state
            .write_manifest(&self.manifest_path, &resource)
            .map_err(|e| CommandError::Storage(e.to_string()))?;
        self.spec_errors = accept_spec(&mut self.record, &spec);
        self.save();
        self.publish_resource();
        info!(pool = %self.handle.pool, generation = self.record.generation, "spec changed through the API");
        Ok(self.handle.resource())
    }

    async fn flush(&mut self) -> FlushReport {
        let mut report = FlushReport {
            nodes: 0,
            items_dropped: 0,
            failed: Vec::new(),
        };
        let requests: Vec<_> = self
            .nodes
            .iter()
            .map(|(id, memory)| (id.clone(), memory.admin.clone()))
            .collect();
        let results = futures_join(
            requests
                .into_iter()
                .map(|(id, admin)| async move { (id, admin.flush().await) }),
        )
        .await;
        for (id, result) in results {
            match result {
                Ok(answer) => {
                    report.nodes += 1;
                    report.items_dropped += answer
                        .get("itemsDropped")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0);
                }
                Err(e) => report.failed.push(format!("{id}: {e}")),
            }
        }
        info!(pool = %self.handle.pool, nodes = report.nodes, items = report.items_dropped, "flushed");
        report
    }

    async fn delete(&mut self) {
        let pool = self.handle.pool.clone();
        match self.provider.list(&pool).await {
            Ok(nodes) => {
                for node in nodes {
                    if let Err(e) = self.provider.terminate(&pool, &node.id).await {
                        warn!(pool = %pool, node = %node.id, error = %e, "stopping a node of a deleted pool");
                    }
                }
            }
            Err(e) => warn!(pool = %pool, error = %e, "listing the nodes of a deleted pool"),
        }
        if let Err(e) = self.state.remove_record(&pool) {
            warn!(pool = %pool, error = %e, "removing the record of a deleted pool");
        }
        self.handle.ring.send_replace(None);
        self.deleted = true;
    }

    /// One observation and reconcile round; returns how soon the next should come.
    async fn round(&mut self) -> Duration {
        if self.deleted {
            return self.options.probe_interval;
        }
        let label = self.label();
        let _timer = self.metrics.start_reconcile(&label);
        let pool = self.handle.pool.clone();
        let listed = match self.provider.list(&pool).await {
            Ok(nodes) => nodes,
            Err(e) => {
                warn!(pool = %pool, error = %e, "listing nodes failed");
                self.metrics.reconcile_failed(&label, "provider");
                return self.options.busy_interval;
            }
        };
        let views = self.observe(&listed).await;
        let now = SystemTime::now();
        self.sample(&listed, now).await;
        self.autoscale(now);

        let valid = self.record.valid_spec.clone();
        let Some(spec) = valid else {
            // Never had a valid spec: nothing runs, the status says why.
            let status = reconcile::plan(Input {
                spec: &self.record.spec,
                generation: Some(self.record.generation),
                spec_errors: &self.spec_errors,
                status: &self.record.status,
                nodes: &views,
                scale_reason: None,
                now,
            })
            .status;
            self.set_status(status);
            return self.options.probe_interval;
        };
        let plan = reconcile::plan(Input {
            spec: &spec,
            generation: Some(self.record.generation),
            spec_errors: &self.spec_errors,
            status: &self.record.status,
            nodes: &views,
            scale_reason: self.pending_reason.as_deref(),
            now,
        });
        let mut status = plan.status;
        self.keep_traffic(&mut status);
        // A node about to answer, or a step just taken, is looked at again almost at once: a
        // resize is a chain of short steps and each waits for the next round.
        let quick = views.iter().any(|v| v.health == Health::Starting)
            || plan.actions.iter().any(|a| {
                matches!(
                    a,
                    Action::Launch { .. } | Action::Publish { .. } | Action::StartHandoff { .. }
                )
            });
        for action in plan.actions {
            match action {
                Action::Launch { slot } => self.launch(slot, &spec).await,
                Action::Terminate { id, reason } => {
                    info!(pool = %pool, node = %id, reason = %reason, "stopping node");
                    if let Err(e) = self.provider.terminate(&pool, &id).await {
                        warn!(pool = %pool, node = %id, error = %e, "stopping node failed");
                        self.metrics.reconcile_failed(&label, "terminate");
                    } else {
                        self.nodes.remove(&id);
                    }
                }
                Action::PushConfig { id } => self.push_config(&id, &spec).await,
                Action::Publish {
                    ring,
                    change,
                    reason,
                } => {
                    match change {
                        RingChange::Replace => self.metrics.node_replaced(&label),
                        // The autoscaler's reason went into the status with this resize.
                        RingChange::Begin => self.pending_reason = None,
                        RingChange::First | RingChange::Complete => {}
                    }
                    self.publish_ring(&ring, &reason, &mut status, now);
                }
                Action::StartHandoff { id } => self.start_handoff(&id, &listed).await,
            }
        }
        self.set_status(status);
        match (plan.busy, quick) {
            (false, _) => self.options.probe_interval,
            (true, true) => self.options.quick_interval,
            (true, false) => self.options.busy_interval,
        }
    }

    /// Probes every node and builds the core's view of it.
    async fn observe(&mut self, listed: &[ProviderNode]) -> Vec<NodeView> {
        let now = Instant::now();
        let options = self.options;
        // Forget nodes the provider no longer lists.
        self.nodes
            .retain(|id, _| listed.iter().any(|node| node.id == *id));
        for node in listed {
            self.nodes.entry(node.id.clone()).or_insert_with(|| {
                let admin = AdminClient::new(&node.admin_address, Some(&node.admin_token));
                let probe = AdminClient::with_timeouts(
                    &node.admin_address,
                    Some(&node.admin_token),
                    options.probe_timeout,
                );
                NodeMemory {
                    address: node.address.clone(),
                    admin,
                    probe,
                    // Not launched by this driver: adopted after a restart.
                    fresh: false,
                    settings: None,
                    first_seen: now,
                    last_ok: None,
                    handoff: None,
                    handoff_started: None,
                }
            });
        }
        let previous: Vec<String> = self
            .handle
            .ring
            .borrow()
            .as_ref()
            .and_then(|s| s.previous().map(|r| r.members().to_vec()))
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.address)
            .collect();
        let probes = listed.iter().filter(|node| node.alive).filter_map(|node| {
            let memory = self.nodes.get(&node.id)?;
            let probe = memory.probe.clone();
            let wants_handoff = previous.contains(&node.address);
            let id = node.id.clone();
            Some(async move {
                let ready = probe.ready().await;
                let handoff = if wants_handoff && ready {
                    probe.handoff().await.ok()
                } else {
                    None
                };
                (id, ready, handoff)
            })
        });
        let results = futures_join(probes).await;
        for (id, ready, handoff) in results {
            if let Some(memory) = self.nodes.get_mut(&id) {
                if ready {
                    memory.last_ok = Some(Instant::now());
                }
                memory.handoff = handoff;
            }
        }
        listed
            .iter()
            .map(|node| {
                let memory = self.nodes.get(&node.id);
                let health = match memory {
                    _ if !node.alive => Health::Dead,
                    None => Health::Starting,
                    Some(m) => match m.last_ok {
                        // A node that stops answering keeps its place until the timeout: one
                        // slow probe is not a failure.
                        Some(ok) if now.duration_since(ok) <= options.node_timeout => Health::Ready,
                        Some(_) => Health::Unresponsive,
                        None if now.duration_since(m.first_seen) > options.start_timeout => {
                            Health::Unresponsive
                        }
                        None => Health::Starting,
                    },
                };
                NodeView {
                    slot: node.slot,
                    id: node.id.clone(),
                    address: node.address.clone(),
                    admin_address: node.admin_address.clone(),
                    health,
                    settings: memory.and_then(|m| m.settings.clone()),
                    fresh: memory.is_some_and(|m| m.fresh),
                    handoff: memory.and_then(|m| m.handoff.clone()),
                }
            })
            .collect()
    }

    /// Samples every live node's stats into the history, every sampling interval.
    async fn sample(&mut self, listed: &[ProviderNode], now: SystemTime) {
        let due = self
            .last_sample
            .is_none_or(|at| at.elapsed() >= self.options.sample_interval);
        if !due {
            return;
        }
        self.last_sample = Some(Instant::now());
        let ring = self.handle.ring.borrow().clone();
        let Some(ring) = ring else {
            return;
        };
        // Members of both rings: during a migration the previous owners still answer reads.
        let members: Vec<(u32, String)> = ring
            .current()
            .members()
            .iter()
            .chain(ring.previous().map_or(&[][..], |r| r.members()))
            .map(|m| (m.slot, m.address.clone()))
            .collect();
        let requests = listed.iter().filter(|n| n.alive).filter_map(|node| {
            let member = members.iter().find(|(_, a)| *a == node.address)?;
            let probe = self.nodes.get(&node.id)?.probe.clone();
            let slot = member.0;
            Some(async move { (slot, probe.stats().await) })
        });
        let results = futures_join(requests).await;
        let label = self.label();
        let mut samples = Vec::new();
        for (slot, result) in results {
            match result.map(|stats| NodeSample::from_stats(slot, &stats)) {
                Ok(Ok(sample)) => samples.push(sample),
                Ok(Err(e)) => {
                    warn!(pool = %self.handle.pool, slot, error = %e, "unreadable stats");
                    self.metrics.sample_failed(&label);
                }
                Err(_) => self.metrics.sample_failed(&label),
            }
        }
        let window = self.status_window();
        let summary = {
            let mut history = self
                .handle
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            history.record(now, ring.current().len(), &samples);
            history.latest(now, window)
        };
        self.metrics.set_traffic(&label, &summary);
        let status = &mut self.record.status;
        status.miss_rate = summary.miss_rate;
        status.hit_rate = summary.hit_rate;
        status.requests_per_minute = summary.requests_per_minute;
    }

    fn status_window(&self) -> Duration {
        let spec = self.record.valid_spec.as_ref().unwrap_or(&self.record.spec);
        match spec.scaling.mode {
            ScalingMode::Auto => {
                Duration::from_secs(u64::from(spec.scaling.auto.window_seconds.max(1)))
            }
            ScalingMode::Manual => STATUS_WINDOW,
        }
    }

    /// In auto mode, judges each closed window.
    fn autoscale(&mut self, now: SystemTime) {
        let Some(spec) = self.record.valid_spec.clone() else {
            return;
        };
        if spec.scaling.mode != ScalingMode::Auto || !self.spec_errors.is_empty() {
            self.next_window = None;
            return;
        }
        let length = Duration::from_secs(u64::from(spec.scaling.auto.window_seconds.max(1)));
        let Some(ring) = self.handle.ring.borrow().clone() else {
            return;
        };
        let due = *self.next_window.get_or_insert(now + length);
        if now < due {
            return;
        }
        self.next_window = Some(now + length);
        let totals = self
            .handle
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .window(now, length);
        let window_start = now.checked_sub(length).unwrap_or(SystemTime::UNIX_EPOCH);
        let window = Window {
            end: now,
            length,
            gets: totals.map_or(0, |t| t.gets),
            misses: totals.map_or(0, |t| t.misses),
            replicas: ring.current().len(),
            steady: totals.is_some()
                && !ring.is_migrating()
                && self.ring_changed_at <= window_start,
        };
        let decision = self.autoscaler.decide(&spec.scaling, &window);
        match decision {
            Decision::Scale { replicas, reason } => {
                let from = ring.current().len();
                info!(pool = %self.handle.pool, from, to = replicas, reason = %reason, "autoscaler decided");
                let direction = if replicas > from {
                    ScaleDirection::Up
                } else {
                    ScaleDirection::Down
                };
                self.metrics.scaled(&self.label(), direction);
                self.record.status.desired_replicas = replicas;
                self.pending_reason = Some(reason);
            }
            Decision::Hold { reason } => {
                tracing::debug!(pool = %self.handle.pool, reason = %reason, "autoscaler holds");
            }
        }
    }

    async fn launch(&mut self, slot: u32, spec: &CachePoolSpec) {
        let settings = NodeSettings::of(spec);
        let launch = LaunchSpec {
            capacity_mib: settings.capacity_mib,
            policy: settings.policy.clone(),
            max_item_size_kib: settings.max_item_size_kib,
        };
        let pool = self.handle.pool.clone();
        match self.provider.launch(&pool, slot, &launch).await {
            Ok(node) => {
                info!(pool = %pool, slot, node = %node.id, address = %node.address, "node launched");
                self.metrics.node_launched(&self.label());
                let admin = AdminClient::new(&node.admin_address, Some(&node.admin_token));
                let probe = AdminClient::with_timeouts(
                    &node.admin_address,
                    Some(&node.admin_token),
                    self.options.probe_timeout,
                );
                self.nodes.insert(
                    node.id.clone(),
                    NodeMemory {
                        address: node.address.clone(),
                        admin,
                        probe,
                        fresh: true,
                        settings: Some(settings),
                        first_seen: Instant::now(),
                        last_ok: None,
                        handoff: None,
                        handoff_started: None,
                    },
                );
            }
            Err(e) => {
                warn!(pool = %pool, slot, error = %e, "launching a node failed");
                self.metrics.reconcile_failed(&self.label(), "launch");
            }
        }
    }

    async fn push_config(&mut self, id: &str, spec: &CachePoolSpec) {
        let settings = NodeSettings::of(spec);
        let Some(memory) = self.nodes.get_mut(id) else {
            return;
        };
        let body = json!({
            "capacityMiB": settings.capacity_mib,
            "policy": settings.policy,
            "maxItemSizeKiB": settings.max_item_size_kib,
        });
        match memory.admin.put_config(&body).await {
            Ok(_) => {
                info!(pool = %self.handle.pool, node = %id, capacity_mib = settings.capacity_mib,
                      policy = %settings.policy, "configuration pushed");
                memory.settings = Some(settings);
            }
            Err(e) => {
                warn!(pool = %self.handle.pool, node = %id, error = %e, "pushing configuration failed");
                self.metrics.reconcile_failed(&self.label(), "config");
            }
        }
    }

    fn publish_ring(
        &mut self,
        ring: &RingState,
        reason: &str,
        status: &mut cachepool_crds::pool::CachePoolStatus,
        now: SystemTime,
    ) {
        info!(pool = %self.handle.pool, epoch = ring.current().epoch(),
              members = ring.current().len(), migrating = ring.is_migrating(), reason, "ring published");
        // Members are no longer fresh: a node that leaves the ring is never reused.
        for memory in self.nodes.values_mut() {
            if ring
                .current()
                .members()
                .iter()
                .any(|m| m.address == memory.address)
            {
                memory.fresh = false;
            }
        }
        self.ring_changed_at = now;
        // The status, with this ring, is stored before any client hears of the ring.
        self.record.status = status.clone();
        self.save();
        self.handle.ring.send_replace(Some(ring.clone()));
        if !ring.is_migrating() {
            self.autoscaler.settled(ring.current().len(), now);
        }
    }

    async fn start_handoff(&mut self, id: &str, listed: &[ProviderNode]) {
        let Some(ring) = self.handle.ring.borrow().clone() else {
            return;
        };
        let Some(node) = listed.iter().find(|n| n.id == id) else {
            return;
        };
        let Some(memory) = self.nodes.get_mut(id) else {
            return;
        };
        let epoch = ring.current().epoch();
        // A failed hand-off towards the same ring is retried at most every HANDOFF_RETRY.
        if memory
            .handoff_started
            .is_some_and(|(e, at)| e == epoch && at.elapsed() < HANDOFF_RETRY)
        {
            return;
        }
        memory.handoff_started = Some((epoch, Instant::now()));
        match memory
            .admin
            .start_handoff(ring.current(), &node.address, 0)
            .await
        {
            Ok(status) => {
                info!(pool = %self.handle.pool, node = %id, epoch = ring.current().epoch(), "hand-off started");
                memory.handoff = Some(status);
            }
            Err(e) => {
                warn!(pool = %self.handle.pool, node = %id, error = %e, "starting a hand-off failed");
                self.metrics.reconcile_failed(&self.label(), "handoff");
            }
        }
    }

    /// The plan's status keeps the traffic figures sampled since the last round.
    fn keep_traffic(&self, status: &mut cachepool_crds::pool::CachePoolStatus) {
        let sampled = &self.record.status;
        status.miss_rate = sampled.miss_rate;
        status.hit_rate = sampled.hit_rate;
        status.requests_per_minute = sampled.requests_per_minute;
    }

    fn set_status(&mut self, status: cachepool_crds::pool::CachePoolStatus) {
        let changed = status != self.record.status;
        self.metrics.observe_status(&self.label(), &status);
        self.metrics
            .set_migration(&self.label(), status.migration.as_ref());
        self.record.status = status;
        if changed {
            self.save();
        }
        self.publish_resource();
    }

    fn publish_resource(&self) {
        let mut metadata = self.metadata.clone();
        fill_metadata(&mut metadata, &self.record);
        let mut resource = CachePool::new(&self.handle.pool.name, self.record.spec.clone());
        resource.metadata = metadata;
        resource.status = Some(self.record.status.clone());
        self.handle.resource.send_replace(resource);
    }

    fn save(&self) {
        if let Err(e) = self.state.save_record(&self.handle.pool, &self.record) {
            warn!(pool = %self.handle.pool, error = %e, "saving the pool record failed");
            self.metrics.reconcile_failed(&self.label(), "storage");
        }
    }
}

/// Takes `spec` as the newest spec: a new generation if it differs, the valid spec if it
/// passes validation. Returns the rules it breaks.
fn accept_spec(record: &mut PoolRecord, spec: &CachePoolSpec) -> Vec<SpecError> {
    if record.generation == 0 || record.spec != *spec {
        record.generation += 1;
        record.spec = spec.clone();
    }
    match validate(spec) {
        Ok(()) => {
            record.valid_spec = Some(spec.clone());
            Vec::new()
        }
        Err(errors) => errors,
    }
}

fn fill_metadata(metadata: &mut ObjectMeta, record: &PoolRecord) {
    metadata.generation = Some(record.generation);
    metadata.uid = Some(record.uid.clone());
    metadata.creation_timestamp = record.creation_timestamp.clone();
}

fn join_errors(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn new_uid() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Runs futures concurrently on the current task and collects their outputs.
async fn futures_join<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for future in futures {
        set.spawn(future);
    }
    let mut out = Vec::new();
    while let Some(result) = set.join_next().await {
        if let Ok(value) = result {
            out.push(value);
        }
    }
    out
}
