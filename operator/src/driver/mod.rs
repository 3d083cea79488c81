//! The pool driver: one task per pool that observes its nodes, samples their traffic, runs
//! the autoscaler and carries out what the reconcile core decides.
//!
//! A round: list the provider's nodes, probe each one's `/readyz` (and `/handoff` for the
//! previous ring's members while keys migrate), sample `/stats` every sampling interval into
//! the pool's history, let the autoscaler judge a closed window, call [`reconcile::plan`], and
//! execute its actions in order. A ring is stored before any client hears of it. Rounds come
//! quickly while something is in progress and at the probe interval otherwise; commands (a new
//! generation from the front end, a spec change or a flush from the API) wake the driver at
//! once.
//!
//! The driver knows no front end and no machine: specs arrive as [`CachePool`] objects with
//! their generation (from the state directory or the Kubernetes API), the record goes back
//! through a [`PoolStore`], events through an [`EventSink`], and nodes come from the provider
//! the spec names ([`Providers::resolve`]). What it writes, and when, is in [`status`]: only
//! changes a reader of the status would want to see, never every probe round.
//!
//! - [`observe`]: probing, sampling, the autoscaler's windows;
//! - [`act`]: the actions (launch, configure, publish a ring, hand off, stop) and the events
//!   they make;
//! - [`status`]: when the status is written, and the resource the API shows.
//!
//! The driver is the only writer of its pool's record, so spec changes from the API and from
//! the front end never race: both arrive as commands handled between rounds.

mod act;
mod observe;
mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use cache_node::handoff::HandoffStatus;
use cachepool_crds::pool::{CachePool, CachePoolSpec, SpecError, validate};
use cachepool_crds::ring::RingState;
use futures_util::future::join_all;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

pub use cachepool_crds::api::FlushReport;

use crate::autoscaler::Autoscaler;
use crate::events::{Event, EventSink, reason};
use crate::history::{Point, PoolHistory};
use crate::metrics::OperatorMetrics;
use crate::provider::{PoolProvider, PoolRef, ProviderKind, Providers, Unserved};
use crate::rebalance::AdminClient;
use crate::reconcile::{self, Action, Health, Input, NodeSettings, RingChange, Unavailable};
use crate::store::{PoolRecord, PoolStore};
use crate::traffic::Traffic;

pub use status::StatusPolicy;

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
    /// After a node that never became ready is terminated, or a launch the provider refused
    /// (a subnet that does not exist, a quota reached), its slot is launched again only after
    /// this pause, doubled for each further failure in a row (at most [`MAX_LAUNCH_BACKOFF`]):
    /// an AMI that does not boot, a node that cannot start or a cloud that says no must not
    /// become a launch loop.
    pub launch_backoff: Duration,
    /// Timeout of one probe request.
    pub probe_timeout: Duration,
    /// A status that differs from the stored one only in fast counters (keys moved, traffic
    /// figures) is written at most this often; every other change is written at once.
    pub status_counter_interval: Duration,
}

/// The longest pause between launches of a slot whose nodes never become ready or whose
/// launches are refused.
pub const MAX_LAUNCH_BACKOFF: Duration = Duration::from_secs(300);

/// A slot whose launches failed in a row: nodes that did not become ready, or launches the
/// provider refused.
#[derive(Clone, Debug)]
struct StartFailures {
    count: u32,
    /// No launch for the slot before this.
    retry_at: Instant,
    /// For the status (`Degraded`) and the event: `NodeNotReady` or `ProviderError`.
    reason: &'static str,
    message: String,
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
            launch_backoff: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            status_counter_interval: Duration::from_secs(15),
        }
    }
}

/// What every driver of one operator shares: where specs and status live, where events and
/// traffic go, which providers run nodes, and the operator's metrics.
#[derive(Clone, Debug)]
pub struct Context {
    pub providers: Providers,
    pub store: Arc<dyn PoolStore>,
    pub events: Arc<dyn EventSink>,
    pub traffic: Traffic,
    pub metrics: OperatorMetrics,
    pub options: DriverOptions,
    /// Identifies this operator installation on the nodes it starts (tag `cachepool.io/operator`).
    pub operator_id: String,
}

/// Per-minute history kept per pool.
const HISTORY_RETENTION: Duration = Duration::from_secs(25 * 3600);

/// The same provider error is told as an event at most this often.
const PROVIDER_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// Why an API request to a pool failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The spec breaks rules; nothing was changed.
    #[error("invalid spec: {}", join_errors(.0))]
    Invalid(Vec<SpecError>),
    /// The change was valid but could not be stored.
    #[error("{0}")]
    Storage(String),
    /// The pool is being deleted or the operator is stopping.
    #[error("the pool is going away")]
    Gone,
}

/// What the front end and the API ask of a pool's driver.
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
    /// The front end saw the pool (a new generation, or new labels).
    Observed(Box<CachePool>),
    /// The front end cannot read the pool's declaration any more.
    Unreadable { message: String },
    /// The pool was deleted: stop every node and end.
    Delete,
}

/// The face of a pool that the API and the front end hold.
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

    /// Watches the resource (changes whenever the driver publishes a new status or spec).
    pub fn watch_resource(&self) -> watch::Receiver<CachePool> {
        self.resource.subscribe()
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

    /// Replaces the spec after validating it; the store keeps the change.
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

    /// The front end saw the pool: `resource` carries `metadata.generation` (a new one is a
    /// new spec), uid and labels.
    pub async fn observed(&self, resource: CachePool) {
        let _ = self.send(Command::Observed(Box::new(resource))).await;
    }

    /// The front end cannot read the pool's declaration; the pool keeps running and its status
    /// says why.
    pub async fn unreadable(&self, message: String) {
        let _ = self.send(Command::Unreadable { message }).await;
    }

    /// The pool was deleted: the driver stops every node, forgets the pool and ends.
    pub async fn delete(&self) {
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
    /// Launched to join the ring and never a member since (see [`NodeView::fresh`]).
    fresh: bool,
    /// Whether `fresh` is settled. A node adopted outside the rings is not known to be fresh
    /// until it answers: one that never stored an item (an instance launched just before a
    /// crash) is as good as a new one; one that did was a member once and is never reused.
    vetted: bool,
    settings: Option<NodeSettings>,
    first_seen: Instant,
    last_ok: Option<Instant>,
    handoff: Option<HandoffStatus>,
    /// Epoch and time of the last hand-off this driver started on the node.
    handoff_started: Option<(u64, Instant)>,
}

/// The driver of one pool.
pub struct Driver {
    handle: Arc<PoolHandle>,
    commands: mpsc::Receiver<Command>,
    ctx: Arc<Context>,
    metadata: ObjectMeta,
    record: PoolRecord,
    spec_errors: Vec<SpecError>,
    /// The provider of the spec in force, or why this operator cannot serve it.
    provider: Option<Result<PoolProvider, Unserved>>,
    /// The generation whose unserved provider was already told as an event.
    unserved_told: Option<i64>,
    nodes: BTreeMap<String, NodeMemory>,
    autoscaler: Autoscaler,
    next_window: Option<SystemTime>,
    pending_reason: Option<String>,
    ring_changed_at: SystemTime,
    last_sample: Option<Instant>,
    /// Start of the newest minute handed to the traffic sinks.
    published_minute: Option<SystemTime>,
    status_policy: StatusPolicy,
    /// The last provider error told as an event, and when.
    provider_event: Option<(String, Instant)>,
    /// Why the autoscaler has no window (the pool's metrics source is unavailable).
    traffic_unavailable: Option<String>,
    /// Slots whose launched nodes never became ready, and when each may be launched again.
    start_failures: BTreeMap<u32, StartFailures>,
    deleted: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("pool", &self.handle.pool)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver for `resource` as its front end delivered it (with generation and uid), over
    /// the record an earlier run kept, if any.
    pub fn new(
        pool: PoolRef,
        resource: CachePool,
        record: Option<PoolRecord>,
        ctx: Arc<Context>,
    ) -> (Driver, Arc<PoolHandle>) {
        let now = SystemTime::now();
        let record = record.unwrap_or_default();
        let autoscaler = Autoscaler::restore(
            record
                .status
                .last_scale_time
                .as_ref()
                .map(|t| SystemTime::from(t.0)),
        )
        .with_memory(&record.status.autoscaler.clone().unwrap_or_default());
        let ring = reconcile::ring_state(&record.status);
        let (commands_tx, commands) = mpsc::channel(16);
        let mut shown = CachePool::new(&pool.name, record.spec.clone());
        shown.metadata = resource.metadata.clone();
        shown.status = Some(record.status.clone());
        let handle = Arc::new(PoolHandle {
            pool: pool.clone(),
            resource: watch::Sender::new(shown),
            ring: watch::Sender::new(ring),
            history: Mutex::new(PoolHistory::new(HISTORY_RETENTION)),
            commands: commands_tx,
        });
        let status_policy = StatusPolicy::new(
            ctx.options.status_counter_interval,
            (record.generation > 0).then(|| record.status.clone()),
        );
        let mut driver = Driver {
            handle: handle.clone(),
            commands,
            ctx,
            metadata: resource.metadata.clone(),
            record,
            spec_errors: Vec::new(),
            provider: None,
            unserved_told: None,
            nodes: BTreeMap::new(),
            autoscaler,
            next_window: None,
            pending_reason: None,
            ring_changed_at: now,
            last_sample: None,
            published_minute: None,
            status_policy,
            provider_event: None,
            traffic_unavailable: None,
            start_failures: BTreeMap::new(),
            deleted: false,
        };
        driver.accept(&resource);
        driver.publish_resource();
        (driver, handle)
    }

    fn label(&self) -> String {
        self.handle.pool.to_string()
    }

    fn metrics(&self) -> &OperatorMetrics {
        &self.ctx.metrics
    }

    fn options(&self) -> &DriverOptions {
        &self.ctx.options
    }

    fn event(&self, event: Event) {
        self.ctx.events.emit(&self.handle.pool, event);
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
            self.metrics().forget_pool(&self.label());
            info!(pool = %self.handle.pool, "pool deleted: its nodes are stopped");
        } else {
            // Counters that changed since the last write are not lost to a restart.
            self.flush_status().await;
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::SetSpec { spec, reply } => {
                let _ = reply.send(self.set_spec(*spec).await);
            }
            Command::Flush { reply } => {
                let _ = reply.send(Ok(self.flush().await));
            }
            Command::Observed(resource) => {
                if self.accept(&resource) {
                    self.save().await;
                }
                self.publish_resource();
            }
            Command::Unreadable { message } => {
                let error = SpecError {
                    field: "manifest".to_owned(),
                    message,
                };
                if self.spec_errors != [error.clone()] {
                    warn!(pool = %self.handle.pool, error = %error, "pool declaration unreadable; the pool keeps running");
                    self.metrics()
                        .reconcile_failed(&self.label(), "invalid_spec");
                    self.event(Event::warning(
                        reason::INVALID_SPEC,
                        format!("{error}; the pool keeps running on its last valid spec"),
                    ));
                    self.spec_errors = vec![error];
                }
            }
            Command::Delete => self.delete().await,
        }
    }

    /// Takes the resource as the front end delivered it: labels always, the spec when its
    /// generation is new. Returns whether the generation changed.
    fn accept(&mut self, resource: &CachePool) -> bool {
        let meta = &resource.metadata;
        self.metadata.labels = meta.labels.clone();
        self.metadata.annotations = meta.annotations.clone();
        if let Some(uid) = &meta.uid {
            self.record.uid = uid.clone();
        }
        if meta.creation_timestamp.is_some() {
            self.record.creation_timestamp = meta.creation_timestamp.clone();
        }
        let generation = meta
            .generation
            .unwrap_or_else(|| self.record.generation.max(1));
        let new = generation != self.record.generation;
        self.record.generation = generation;
        self.record.spec = resource.spec.clone();
        let mut errors = validate(&resource.spec).err().unwrap_or_default();
        if errors.is_empty()
            && let Some(error) = self.provider_change(&resource.spec)
        {
            errors.push(error);
        }
        if errors.is_empty() {
            self.record.valid_spec = Some(resource.spec.clone());
        }
        if self.provider.is_none() || errors.is_empty() {
            self.provider = self
                .record
                .valid_spec
                .as_ref()
                .map(|spec| self.ctx.providers.resolve(&spec.provider));
        }
        if new {
            info!(pool = %self.handle.pool, generation, valid = errors.is_empty(), "spec changed");
            if !errors.is_empty() {
                self.metrics()
                    .reconcile_failed(&self.label(), "invalid_spec");
                let joined = join_errors(&errors);
                warn!(pool = %self.handle.pool, errors = %joined,
                      "spec rejected; the pool keeps running on its last valid spec");
                self.event(Event::warning(
                    reason::INVALID_SPEC,
                    format!(
                        "generation {generation} rejected, the pool keeps running on its last valid spec: {joined}"
                    ),
                ));
            }
        }
        self.spec_errors = errors;
        new
    }

    /// A pool that has nodes cannot move to another kind of provider: its keys live on the
    /// nodes it has. (Settings of the same provider may change: new nodes use them.)
    fn provider_change(&self, spec: &CachePoolSpec) -> Option<SpecError> {
        let running = self.record.valid_spec.as_ref()?;
        let (from, to) = (
            ProviderKind::of(&running.provider)?,
            ProviderKind::of(&spec.provider)?,
        );
        let has_nodes = self.record.status.ring.is_some() || !self.nodes.is_empty();
        (from != to && has_nodes).then(|| SpecError {
            field: "provider".to_owned(),
            message: format!(
                "cannot change from `{from}` to `{to}` while the pool has nodes; delete the pool \
                 and create it again with the new provider"
            ),
        })
    }

    async fn set_spec(&mut self, spec: CachePoolSpec) -> Result<CachePool, CommandError> {
        if let Some(error) = self.provider_change(&spec) {
            return Err(CommandError::Invalid(vec![error]));
        }
        let mut resource = self.handle.resource();
        resource.spec = spec;
        resource.metadata = self.metadata.clone();
        resource.status = None;
        let stored = self
            .ctx
            .store
            .write_spec(&self.handle.pool, &resource)
            .await
            .map_err(|e| CommandError::Storage(e.to_string()))?;
        self.accept(&stored);
        self.save().await;
        self.publish_resource();
        info!(pool = %self.handle.pool, generation = self.record.generation, "spec changed through the API");
        Ok(self.handle.resource())
    }

    /// One observation and reconcile round; returns how soon the next should come.
    async fn round(&mut self) -> Duration {
        if self.deleted {
            return self.options().probe_interval;
        }
        let label = self.label();
        let _timer = self.metrics().start_reconcile(&label);
        let pool = self.handle.pool.clone();
        let now = SystemTime::now();
        let provider = match &self.provider {
            // Never had a valid spec: nothing runs, the status says why.
            None => {
                self.plan_without_nodes(None, now).await;
                return self.options().probe_interval;
            }
            Some(Err(unserved)) => {
                let unserved = unserved.clone();
                if self.unserved_told != Some(self.record.generation) {
                    self.unserved_told = Some(self.record.generation);
                    warn!(pool = %pool, error = %unserved, "the pool's provider is not served here");
                    self.metrics()
                        .reconcile_failed(&label, "provider_unavailable");
                    self.event(Event::warning(
                        reason::PROVIDER_UNAVAILABLE,
                        unserved.message.clone(),
                    ));
                }
                self.plan_without_nodes(Some(&unserved), now).await;
                return self.options().probe_interval;
            }
            Some(Ok(provider)) => provider.clone(),
        };
        let listed = match provider.list(&pool).await {
            Ok(nodes) => nodes,
            Err(e) => {
                self.provider_error("listing the nodes", &e);
                return self.options().busy_interval;
            }
        };
        let views = self.observe(&listed).await;
        self.sample(&listed, now).await;
        self.autoscale(now).await;

        let Some(spec) = self.record.valid_spec.clone() else {
            return self.options().probe_interval;
        };
        // A slot whose node answers again starts its back-off afresh next time.
        for view in views.iter().filter(|v| v.health == Health::Ready) {
            self.start_failures.remove(&view.slot);
        }
        let plan = reconcile::plan(Input {
            spec: &spec,
            generation: Some(self.record.generation),
            spec_errors: &self.spec_errors,
            status: &self.record.status,
            nodes: &views,
            scale_reason: self.pending_reason.as_deref(),
            unavailable: self
                .traffic_unavailable
                .as_deref()
                .map(|message| Unavailable {
                    reason: "MetricsSourceUnavailable",
                    message,
                    halt: false,
                })
                .or_else(|| {
                    self.start_failures.values().next().map(|f| Unavailable {
                        reason: f.reason,
                        message: &f.message,
                        halt: false,
                    })
                }),
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
        // Nodes that never became ready and go now: their slots back off before anything
        // runs, since the plan may launch the slot's next node ahead of the termination.
        let never_ready: Vec<(u32, String)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Terminate { id, .. } => views
                    .iter()
                    .find(|v| v.id == *id && v.health == Health::Unresponsive)
                    .filter(|_| self.nodes.get(id).is_some_and(|m| m.last_ok.is_none()))
                    .map(|v| (v.slot, id.clone())),
                _ => None,
            })
            .collect();
        for (slot, id) in never_ready {
            self.start_failed(slot, &id);
        }
        for action in plan.actions {
            match action {
                Action::Launch { slot } => {
                    let backing_off = self
                        .start_failures
                        .get(&slot)
                        .is_some_and(|f| Instant::now() < f.retry_at);
                    if !backing_off {
                        self.launch(&provider, slot, &spec).await;
                    }
                }
                Action::Terminate { id, reason } => {
                    self.terminate(&provider, &id, &reason).await;
                }
                Action::PushConfig { id } => self.push_config(&id, &spec).await,
                Action::Publish {
                    ring,
                    change,
                    reason,
                } => {
                    if change == RingChange::Begin {
                        // The autoscaler's reason went into the status with this resize.
                        self.pending_reason = None;
                    }
                    self.publish_ring(&ring, change, &reason, &mut status, now)
                        .await;
                }
                Action::StartHandoff { id } => self.start_handoff(&id, &listed).await,
            }
        }
        self.set_status(status).await;
        match (plan.busy, quick) {
            (false, _) => self.options().probe_interval,
            (true, true) => self.options().quick_interval,
            (true, false) => self.options().busy_interval,
        }
    }

    /// The status of a pool that runs nothing: it never had a valid spec, or its provider is
    /// not served by this operator.
    async fn plan_without_nodes(&mut self, unserved: Option<&Unserved>, now: SystemTime) {
        let spec = self
            .record
            .valid_spec
            .clone()
            .unwrap_or_else(|| self.record.spec.clone());
        let message = unserved.map(|u| u.message.clone());
        let status = reconcile::plan(Input {
            spec: &spec,
            generation: Some(self.record.generation),
            spec_errors: &self.spec_errors,
            status: &self.record.status,
            nodes: &[],
            scale_reason: None,
            unavailable: message.as_deref().map(|message| Unavailable {
                reason: "ProviderUnavailable",
                message,
                halt: true,
            }),
            now,
        })
        .status;
        self.set_status(status).await;
    }
}

fn join_errors(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
