//! The reconcile core: from a pool's spec, its last status and what is observed of its nodes,
//! decide what to do next and what the status says. Pure: no I/O, no clock.
//!
//! It is level-triggered and idempotent: [`plan`] looks only at the current observation, never
//! at what it asked for last time, so the driver may call it as often as it likes, lose any
//! action (a crash, a failed request) and call it again, and an operator restarted in the middle
//! of a resize carries on from what its status and its nodes show. The driver executes the
//! actions in order and calls [`plan`] again; a step that must wait (a node starting, a hand-off
//! running) simply produces no action for it and `busy: true`.
//!
//! The order that makes a resize lossless (DESIGN.md, "The ring"; `rebalance`):
//! - grow: nodes for the new slots are launched and ready (and configured) before the grown
//!   ring is published with the previous ring attached; then every previous member hands off
//!   the keys it no longer owns; then the previous ring is dropped;
//! - shrink: the shrunk ring is published with the previous ring attached, the removed nodes
//!   hand everything off, the previous ring is dropped, and only then do the removed nodes stop;
//! - a failed node (dead, or not answering for a while) is replaced in its slot: a fresh node is
//!   launched for the slot and published in its place with the next epoch, nothing else moves;
//!   during a migration the previous ring stays and hand-offs restart towards the new epoch;
//! - configuration changes are pushed to every node live (`PUT /config`), never by restarting.
//!
//! One ring change at a time: replacements first (a pool with a hole loses hits), then the
//! running migration, then a resize towards the desired size.
//!
//! Nodes that may join the ring must be *fresh*: launched by this operator for that purpose and
//! never a member. Any other node outside the rings (a node that drained out, a node launched by
//! an operator that then crashed) is stopped rather than reused, because it may hold keys from
//! an older ring that would be served stale if it became an owner again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use cache_node::handoff::{HandoffStatus, State as HandoffState};
use cachepool_crds::pool::{
    CachePoolSpec, CachePoolStatus, MigrationStatus, NodeState, NodeStatus, PoolPhase,
    RingMemberStatus, RingStatus, ScalingMode, SpecError,
};
use cachepool_crds::ring::{Member, Ring, RingError, RingState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// How a node answers, as the driver's probes saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Launched, not yet ready.
    Starting,
    /// Answers `/readyz`.
    Ready,
    /// Was ready, has not answered for longer than the driver tolerates, or never became ready
    /// within the start timeout: to be replaced.
    Unresponsive,
    /// The process or instance is gone.
    Dead,
}

impl Health {
    fn failed(self) -> bool {
        matches!(self, Health::Unresponsive | Health::Dead)
    }
}

/// The settings a node runs with, from `spec.cache`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub capacity_mib: u32,
    pub policy: String,
    pub max_item_size_kib: u32,
}

impl NodeSettings {
    /// The settings `spec` asks for.
    pub fn of(spec: &CachePoolSpec) -> Self {
        Self {
            capacity_mib: spec.cache.capacity_mib,
            policy: spec.cache.policy.as_str().to_owned(),
            max_item_size_kib: spec.cache.max_item_size_kib,
        }
    }
}

/// One node as the driver observed it.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub slot: u32,
    /// Provider id.
    pub id: String,
    /// memcached data address, as rings name it.
    pub address: String,
    pub admin_address: String,
    pub health: Health,
    /// Settings the node was launched with or last accepted; `None` when unknown (a node
    /// adopted after a restart), which gets them pushed again.
    pub settings: Option<NodeSettings>,
    /// Launched by this operator to join the ring, and never a member since.
    pub fresh: bool,
    /// The node's hand-off, when the driver asked (previous-ring members during a migration).
    pub handoff: Option<HandoffStatus>,
}

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start a node for `slot` (a fresh node: it may join the ring once ready).
    Launch { slot: u32 },
    /// Stop a node and forget it.
    Terminate { id: String, reason: String },
    /// `PUT /config` with the spec's settings.
    PushConfig { id: String },
    /// Make `ring` the pool's ring: store it in the status first, then tell clients.
    Publish {
        ring: RingState,
        change: RingChange,
        reason: String,
    },
    /// Have the node hand off the keys it does not own under the current ring (`POST /handoff`);
    /// also restarts a failed or outdated hand-off.
    StartHandoff { id: String },
}

/// Why a ring is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingChange {
    /// The pool's first ring.
    First,
    /// A resize begins: the new ring with the previous one attached.
    Begin,
    /// The hand-off is done: the previous ring is dropped.
    Complete,
    /// A failed node was replaced in its slot.
    Replace,
}

/// Input of [`plan`].
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The spec in force: the newest valid one.
    pub spec: &'a CachePoolSpec,
    /// Generation of the newest spec seen (valid or not).
    pub generation: Option<i64>,
    /// Rules the newest spec breaks; when not empty, `spec` is the last valid one and nothing is
    /// changed on its account.
    pub spec_errors: &'a [SpecError],
    /// The status as last written.
    pub status: &'a CachePoolStatus,
    /// Every node the provider knows of for this pool.
    pub nodes: &'a [NodeView],
    /// Why the pool is to change size, when the autoscaler decided it (recorded in the status
    /// when the resize begins).
    pub scale_reason: Option<&'a str>,
    /// Something the pool needs is not available (its provider or its metrics source):
    /// the pool is `Degraded` with this reason and message.
    pub unavailable: Option<Unavailable<'a>>,
    pub now: SystemTime,
}

/// Something a pool needs that the operator cannot give it.
#[derive(Clone, Copy, Debug)]
pub struct Unavailable<'a> {
    /// The `Degraded` condition's reason (`ProviderUnavailable`, ...).
    pub reason: &'a str,
    pub message: &'a str,
    /// Nothing may be started, stopped or published (the provider itself is missing); when
    /// false the pool is reconciled as usual and only reported degraded.
    pub halt: bool,
}

/// Output of [`plan`].
#[derive(Clone, Debug)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The status after the actions.
    pub status: CachePoolStatus,
    /// Something is in progress (starting nodes, a migration): observe again soon.
    pub busy: bool,
}

/// The size the pool is driven towards: `scaling.replicas` in manual mode; in auto mode the
/// autoscaler's last decision (`status.desiredReplicas`), or the running size before its first.
/// Always within `[minReplicas, maxReplicas]`.
pub fn desired_replicas(spec: &CachePoolSpec, status: &CachePoolStatus) -> u32 {
    let scaling = &spec.scaling;
    let wanted = match scaling.mode {
        ScalingMode::Manual => scaling.replicas,
        ScalingMode::Auto if status.desired_replicas > 0 => status.desired_replicas,
        ScalingMode::Auto => status
            .ring
            .as_ref()
            .map_or(scaling.min_replicas, |ring| ring.members.len() as u32),
    };
    wanted.clamp(
        scaling.min_replicas,
        scaling.max_replicas.max(scaling.min_replicas),
    )
}

/// The two-ring state recorded in a status: the ring, and during a migration the previous ring.
/// `None` before the first ring is published (or if the stored one is corrupt).
pub fn ring_state(status: &CachePoolStatus) -> Option<RingState> {
    let ring = status.ring.as_ref()?;
    let current = ring_of(ring.epoch, &ring.members).ok()?;
    match &status.migration {
        Some(m) if m.to_epoch == ring.epoch => {
            let previous = ring_of(m.from_epoch, &m.from_members).ok()?;
            RingState::migrating(current, previous).ok()
        }
        _ => Some(RingState::new(current)),
    }
}

fn ring_of(epoch: u64, members: &[RingMemberStatus]) -> Result<Ring, RingError> {
    Ring::new(
        epoch,
        members
            .iter()
            .map(|m| Member::new(m.slot, m.address.clone()))
            .collect(),
    )
}

fn ring_status(ring: &Ring) -> RingStatus {
    RingStatus {
        epoch: ring.epoch(),
        members: ring.members().iter().map(RingMemberStatus::from).collect(),
    }
}

/// Decide the next actions and the status.
pub fn plan(input: Input<'_>) -> Plan {
    let mut planner = Planner::new(input);
    planner.run();
    planner.finish()
}

struct Planner<'a> {
    input: Input<'a>,
    desired: u32,
    settings: NodeSettings,
    ring: Option<RingState>,
    actions: Vec<Action>,
    /// Nodes already dealt with by an action (not to be terminated or reused twice).
    claimed: BTreeSet<String>,
    busy: bool,
    degraded: Option<(String, String)>,
    progressing: Option<(String, String)>,
    scaled: Option<String>,
    /// Nothing was planned: what the pool needs is unavailable.
    halted: bool,
}

impl<'a> Planner<'a> {
    fn new(input: Input<'a>) -> Self {
        Self {
            desired: desired_replicas(input.spec, input.status),
            settings: NodeSettings::of(input.spec),
            ring: ring_state(input.status),
            input,
            actions: Vec::new(),
            claimed: BTreeSet::new(),
            busy: false,
            degraded: None,
            progressing: None,
            scaled: None,
            halted: false,
        }
    }

    fn run(&mut self) {
        if let Some(unavailable) = self.input.unavailable {
            self.degraded = Some((
                unavailable.reason.to_owned(),
                unavailable.message.to_owned(),
            ));
            if unavailable.halt {
                self.halted = true;
                return;
            }
        }
        self.clean_up_dead();
        if self.ring.is_none() {
            self.first_ring();
        } else {
            self.replace_failed();
            if self.ring.as_ref().is_some_and(RingState::is_migrating) {
                self.migrate();
            } else {
                self.resize();
            }
        }
        self.push_config();
        self.stop_strays();
    }

    fn nodes(&self) -> impl Iterator<Item = &'a NodeView> + 'a {
        self.input.nodes.iter()
    }

    fn node_at(&self, address: &str) -> Option<&'a NodeView> {
        self.nodes()
            .filter(|n| n.address == address && n.health != Health::Dead)
            .chain(self.nodes().filter(|n| n.address == address))
            .next()
    }

    fn in_rings(&self, address: &str) -> bool {
        self.ring.as_ref().is_some_and(|state| {
            state
                .current()
                .members()
                .iter()
                .chain(state.previous().map_or(&[][..], Ring::members))
                .any(|m| m.address == address)
        })
    }

    fn terminating(&self, id: &str) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Terminate { id: t, .. } if t == id))
    }

    fn terminate(&mut self, node: &NodeView, reason: impl Into<String>) {
        if self.claimed.insert(node.id.clone()) {
            self.actions.push(Action::Terminate {
                id: node.id.clone(),
                reason: reason.into(),
            });
        }
    }

    fn progress(&mut self, reason: &str, message: impl Into<String>) {
        self.busy = true;
        if self.progressing.is_none() {
            self.progressing = Some((reason.to_owned(), message.into()));
        }
    }

    /// Dead nodes outside the rings are forgotten; dead members wait for their replacement.
    fn clean_up_dead(&mut self) {
        for node in self.input.nodes {
            if node.health == Health::Dead && !self.in_rings(&node.address) {
                self.terminate(node, "process exited");
            }
        }
    }

    /// The fresh node standing by for `slot`: the oldest live one; others for the slot are
    /// extra and stopped. Launches one when there is none.
    fn standby(&mut self, slot: u32) -> Option<&'a NodeView> {
        let mut candidates: Vec<&'a NodeView> = self
            .nodes()
            .filter(|n| {
                n.slot == slot && n.fresh && !n.health.failed() && !self.in_rings(&n.address)
            })
            .collect();
        // Ready first, then in provider order (launch order).
        candidates.sort_by_key(|n| n.health != Health::Ready);
        let mut candidates = candidates.into_iter();
        let chosen = candidates.next();
        for extra in candidates {
            self.terminate(extra, format!("a second standby node for slot {slot}"));
        }
        match chosen {
            Some(node) => {
                self.claimed.insert(node.id.clone());
                Some(node)
            }
            None => {
                self.actions.push(Action::Launch { slot });
                None
            }
        }
    }

    /// Ready standbys for every slot in `slots`, configured as the spec says; `None` while
    /// any is missing, starting or awaiting its configuration.
    fn standbys(&mut self, slots: std::ops::Range<u32>) -> Option<Vec<&'a NodeView>> {
        let mut ready = Vec::new();
        let mut all = true;
        for slot in slots {
            match self.standby(slot) {
                Some(node)
                    if node.health == Health::Ready
                        && node.settings.as_ref() == Some(&self.settings) =>
                {
                    ready.push(node)
                }
                _ => all = false,
            }
        }
        all.then_some(ready)
    }

    fn first_ring(&mut self) {
        let n = self.desired;
        if !self.input.spec_errors.is_empty() {
            // A pool that never had a valid spec starts nothing.
            return;
        }
        self.progress("Launching", format!("starting {n} nodes"));
        // A stored ring that no longer parses is replaced, never with a lower epoch: clients
        // ignore rings older than the one they have.
        let epoch = self.input.status.ring.as_ref().map_or(1, |r| r.epoch + 1);
        if let Some(nodes) = self.standbys(0..n) {
            match Ring::from_addresses(epoch, nodes.iter().map(|n| n.address.clone())) {
                Ok(ring) => self.publish(
                    RingState::new(ring),
                    RingChange::First,
                    format!("first ring of {n} nodes"),
                ),
                Err(e) => self.degrade("RingInvalid", e.to_string()),
            }
        }
    }

    fn publish(&mut self, ring: RingState, change: RingChange, reason: String) {
        self.ring = Some(ring.clone());
        self.actions.push(Action::Publish {
            ring,
            change,
            reason,
        });
        self.busy = true;
    }

    fn degrade(&mut self, reason: &str, message: String) {
        if self.degraded.is_none() {
            self.degraded = Some((reason.to_owned(), message));
        }
    }

    /// Members of the current ring that failed get a fresh node in their slot.
    fn replace_failed(&mut self) {
        let Some(state) = self.ring.clone() else {
            return;
        };
        for member in state.current().members() {
            let failed = match self.node_at(&member.address) {
                Some(node) => node.health.failed(),
                None => true,
            };
            if !failed {
                continue;
            }
            let slot = member.slot;
            self.degrade(
                "NodeFailed",
                format!(
                    "node at slot {slot} ({}) failed; replacing it in place",
                    member.address
                ),
            );
            self.progress("Replacing", format!("replacing the node at slot {slot}"));
            let Some(standby) = self.standby(slot) else {
                continue;
            };
            if standby.health != Health::Ready || standby.settings.as_ref() != Some(&self.settings)
            {
                continue;
            }
            let current = self.ring.clone().unwrap_or(state.clone());
            match current.replaced(slot, standby.address.clone()) {
                Ok(next) => {
                    self.publish(
                        next,
                        RingChange::Replace,
                        format!(
                            "node at slot {slot} ({}) replaced by {}",
                            member.address, standby.address
                        ),
                    );
                    if let Some(old) = self.node_at(&member.address) {
                        let old = old.clone();
                        if !self.in_rings(&old.address) {
                            self.terminate(&old, format!("replaced in slot {slot}"));
                        }
                    }
                }
                Err(e) => self.degrade("RingInvalid", e.to_string()),
            }
        }
    }

    /// Drive the running migration: hand-offs on every live previous member, then drop the
    /// previous ring.
    fn migrate(&mut self) {
        let Some(state) = self.ring.clone() else {
            return;
        };
        let Some(previous) = state.previous() else {
            return;
        };
        let target = state.current().epoch();
        let mut done = true;
        for member in previous.members() {
            let Some(node) = self.node_at(&member.address) else {
                // Gone: its keys are lost whatever we do; nothing to wait for.
                continue;
            };
            if node.health.failed() {
                continue;
            }
            match &node.handoff {
                Some(h) if h.epoch == Some(target) && h.state == HandoffState::Done => {}
                Some(h) if h.epoch == Some(target) && h.state == HandoffState::Running => {
                    done = false;
                }
                Some(h) if h.epoch == Some(target) && h.state == HandoffState::Failed => {
                    done = false;
                    self.degrade(
                        "HandoffFailed",
                        format!(
                            "hand-off on {} failed: {}; retrying",
                            member.address,
                            h.last_error.as_deref().unwrap_or("no reason given")
                        ),
                    );
                    self.actions.push(Action::StartHandoff {
                        id: node.id.clone(),
                    });
                }
                // Not known this round (the node did not answer): wait rather than restart a
                // hand-off that may be running.
                None => done = false,
                // Idle, cancelled, or working towards an older ring.
                Some(_) => {
                    done = false;
                    self.actions.push(Action::StartHandoff {
                        id: node.id.clone(),
                    });
                }
            }
        }
        let from = previous.len();
        let to = state.current().len();
        if done {
            match state.completed() {
                Ok(next) => self.publish(
                    next,
                    RingChange::Complete,
                    format!("hand-off from {from} to {to} nodes complete"),
                ),
                Err(e) => self.degrade("RingInvalid", e.to_string()),
            }
        } else {
            self.progress(
                "HandingOff",
                format!("handing keys off from {from} to {to} nodes (epoch {target})"),
            );
        }
    }

    /// Outside a migration: grow or shrink towards the desired size.
    fn resize(&mut self) {
        let Some(state) = self.ring.clone() else {
            return;
        };
        if state.is_migrating() || self.has_ring_action() {
            return;
        }
        let n = state.current().len();
        let desired = self.desired;
        if desired > n {
            self.progress("Growing", format!("growing from {n} to {desired} nodes"));
            let Some(nodes) = self.standbys(n..desired) else {
                return;
            };
            let grown = state
                .current()
                .grown(nodes.iter().map(|node| node.address.clone()));
            self.begin(state, grown, n, desired);
        } else if desired < n {
            self.progress(
                "Shrinking",
                format!("shrinking from {n} to {desired} nodes"),
            );
            let shrunk = state.current().shrunk(n - desired);
            self.begin(state, shrunk, n, desired);
        }
    }

    fn begin(&mut self, mut state: RingState, next: Result<Ring, RingError>, from: u32, to: u32) {
        let begun = next.and_then(|ring| state.begin(ring));
        match begun {
            Ok(()) => {
                let reason = match (self.input.spec.scaling.mode, self.input.scale_reason) {
                    (ScalingMode::Auto, Some(reason)) => reason.to_owned(),
                    (ScalingMode::Auto, None) => format!("auto: {from} -> {to} nodes"),
                    (ScalingMode::Manual, _) => {
                        format!("manual: scaling.replicas is {to} ({from} -> {to} nodes)")
                    }
                };
                self.scaled = Some(reason.clone());
                self.publish(state, RingChange::Begin, reason);
            }
            Err(e) => self.degrade("RingInvalid", e.to_string()),
        }
    }

    fn has_ring_action(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Publish { .. }))
    }

    /// Every live, ready node that is or may become a member runs the spec's settings.
    fn push_config(&mut self) {
        for node in self.input.nodes {
            if node.health != Health::Ready
                || node.settings.as_ref() == Some(&self.settings)
                || self.terminating(&node.id)
                || !(self.in_rings(&node.address) || self.claimed.contains(&node.id))
            {
                continue;
            }
            self.actions.push(Action::PushConfig {
                id: node.id.clone(),
            });
            self.busy = true;
        }
    }

    /// Nodes that are neither members nor a fresh standby in use are stopped: nodes that
    /// drained out, standbys no longer wanted, nodes a crashed operator left behind.
    fn stop_strays(&mut self) {
        for node in self.input.nodes {
            if self.in_rings(&node.address) || self.claimed.contains(&node.id) {
                continue;
            }
            let reason = if node.fresh {
                format!("slot {} is no longer wanted", node.slot)
            } else {
                format!("slot {} is not in the ring", node.slot)
            };
            self.terminate(node, reason);
        }
    }

    fn finish(self) -> Plan {
        let status = self.status();
        Plan {
            actions: self.actions,
            status,
            busy: self.busy,
        }
    }

    fn status(&self) -> CachePoolStatus {
        let input = &self.input;
        let old = input.status;
        let now = input.now;
        let mut status = CachePoolStatus {
            observed_generation: input.generation.or(old.observed_generation),
            desired_replicas: self.desired,
            miss_rate: old.miss_rate,
            hit_rate: old.hit_rate,
            requests_per_minute: old.requests_per_minute,
            last_scale_time: old.last_scale_time.clone(),
            last_scale_reason: old.last_scale_reason.clone(),
            autoscaler: old.autoscaler.clone(),
            ..CachePoolStatus::default()
        };
        if let Some(reason) = &self.scaled {
            status.last_scale_time = Some(time(now));
            status.last_scale_reason = Some(reason.clone());
        }
        if let Some(state) = &self.ring {
            status.ring = Some(ring_status(state.current()));
            status.replicas = state.current().len();
            if let Some(previous) = state.previous() {
                let target = state.current().epoch();
                let (keys, bytes) = self
                    .nodes()
                    .filter_map(|n| n.handoff.as_ref())
                    .filter(|h| h.epoch == Some(target))
                    .fold((0, 0), |(k, b), h| (k + h.keys_moved, b + h.bytes_moved));
                let started_at = old
                    .migration
                    .as_ref()
                    .filter(|m| m.from_epoch == previous.epoch())
                    .and_then(|m| m.started_at.clone())
                    .or_else(|| Some(time(now)));
                status.migration = Some(MigrationStatus {
                    from_epoch: previous.epoch(),
                    to_epoch: target,
                    started_at,
                    keys_moved: keys,
                    bytes_moved: bytes,
                    from_members: previous
                        .members()
                        .iter()
                        .map(RingMemberStatus::from)
                        .collect(),
                });
            }
        }
        status.nodes = self.node_statuses();
        status.ready_replicas = status
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count() as u32;

        let invalid = (!input.spec_errors.is_empty()).then(|| {
            input
                .spec_errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        });
        let migrating = status.migration.is_some();
        let settled = self.ring.is_some()
            && !migrating
            && status.replicas == self.desired
            && status.ready_replicas == status.replicas
            && self.degraded.is_none();
        status.phase = Some(if invalid.is_some() {
            PoolPhase::Invalid
        } else if self.halted || self.degraded.is_some() {
            // Also before the first ring: a pool whose first launches are refused or never
            // become ready is not merely pending.
            PoolPhase::Degraded
        } else if self.ring.is_none() {
            PoolPhase::Pending
        } else if !settled || self.progressing.is_some() {
            PoolPhase::Scaling
        } else {
            PoolPhase::Ready
        });

        let generation = status.observed_generation;
        let ready = if settled {
            (
                true,
                "AllNodesReady",
                "every node serves and the size matches the spec".to_owned(),
            )
        } else if let (true, Some((reason, message))) = (self.halted, &self.degraded) {
            (false, reason.as_str(), message.clone())
        } else if self.ring.is_none() {
            (false, "Pending", "the first nodes are starting".to_owned())
        } else {
            (
                false,
                "NotSettled",
                format!(
                    "{} of {} nodes ready, {} wanted{}",
                    status.ready_replicas,
                    status.replicas,
                    self.desired,
                    if migrating { ", keys migrating" } else { "" }
                ),
            )
        };
        let progressing = match &self.progressing {
            Some((reason, message)) => (true, reason.as_str(), message.clone()),
            None => (false, "Idle", "nothing in progress".to_owned()),
        };
        let degraded = match (&invalid, &self.degraded) {
            (Some(errors), _) => (
                true,
                "InvalidSpec",
                format!("the spec was rejected, the pool keeps running unchanged: {errors}"),
            ),
            (None, Some((reason, message))) => (true, reason.as_str(), message.clone()),
            (None, None) => (false, "Healthy", "no failure".to_owned()),
        };
        status.conditions = [
            ("Ready", ready.0, ready.1, ready.2),
            ("Progressing", progressing.0, progressing.1, progressing.2),
            ("Degraded", degraded.0, degraded.1, degraded.2),
        ]
        .into_iter()
        .map(|(kind, value, reason, message)| {
            condition(old, kind, value, reason, message, generation, now)
        })
        .collect();
        status
    }

    fn node_statuses(&self) -> Vec<NodeStatus> {
        let terminating: BTreeSet<&str> = self
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Terminate { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let current: BTreeMap<&str, u32> = self
            .ring
            .as_ref()
            .map(|s| {
                s.current()
                    .members()
                    .iter()
                    .map(|m| (m.address.as_str(), m.slot))
                    .collect()
            })
            .unwrap_or_default();
        let mut out: Vec<NodeStatus> = self
            .nodes()
            .map(|node| {
                let state = if terminating.contains(node.id.as_str()) {
                    NodeState::Terminating
                } else if node.health.failed() {
                    NodeState::Failed
                } else if current.contains_key(node.address.as_str()) {
                    if node.health == Health::Ready {
                        NodeState::Ready
                    } else {
                        NodeState::Starting
                    }
                } else if self.in_rings(&node.address) {
                    NodeState::Draining
                } else {
                    NodeState::Starting
                };
                let since = self
                    .input
                    .status
                    .nodes
                    .iter()
                    .find(|old| old.id == node.id && old.state == state)
                    .and_then(|old| old.since.clone())
                    .or_else(|| Some(time(self.input.now)));
                NodeStatus {
                    slot: node.slot,
                    id: node.id.clone(),
                    address: node.address.clone(),
                    admin_address: node.admin_address.clone(),
                    state,
                    since,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        out
    }
}

/// A condition, keeping its transition time when its status did not change.
fn condition(
    old: &CachePoolStatus,
    kind: &str,
    value: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let status = if value { "True" } else { "False" };
    let last_transition_time = old
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(|| time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// A status timestamp, to the second as Kubernetes writes them.
pub fn time(at: SystemTime) -> Time {
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Time(Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests;
