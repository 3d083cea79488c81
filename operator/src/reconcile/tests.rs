//! The reconcile core against a simulated world: nodes that take a round to start, hand-offs
//! that take a few rounds, crashes and operator restarts at chosen or random moments. Every
//! published ring and every stopped node is checked against the resize order.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cache_node::handoff::{HandoffStatus, State as HandoffState};
use cachepool_crds::pool::{
    CachePolicy, CachePoolSpec, CachePoolStatus, NodeState, PoolPhase, ProcessProvider,
    ScalingMode, SpecError,
};
use cachepool_crds::ring::RingState;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

fn spec(replicas: u32) -> CachePoolSpec {
    let mut spec = CachePoolSpec::default();
    spec.provider.process = Some(ProcessProvider {});
    spec.scaling.replicas = replicas;
    spec
}

#[derive(Clone, Debug)]
struct SimNode {
    view: NodeView,
    /// Rounds until a starting node is ready.
    starting: u32,
    /// Rounds until a running hand-off is done.
    handing_off: u32,
}

/// A pool's world: its nodes, its stored status, and a log of what the core asked for.
struct World {
    spec: CachePoolSpec,
    errors: Vec<SpecError>,
    generation: i64,
    status: CachePoolStatus,
    nodes: Vec<SimNode>,
    next_id: u32,
    now: SystemTime,
    published: Vec<(RingState, String)>,
    launched: u32,
    terminated: Vec<String>,
    handoffs_started: Vec<(String, u64)>,
    /// Rounds a new node takes to become ready, and a hand-off to finish.
    start_rounds: u32,
    handoff_rounds: u32,
}

impl World {
    fn new(spec: CachePoolSpec) -> World {
        World {
            spec,
            errors: Vec::new(),
            generation: 1,
            status: CachePoolStatus::default(),
            nodes: Vec::new(),
            next_id: 0,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            published: Vec::new(),
            launched: 0,
            terminated: Vec::new(),
            handoffs_started: Vec::new(),
            start_rounds: 1,
            handoff_rounds: 2,
        }
    }

    fn views(&self) -> Vec<NodeView> {
        self.nodes.iter().map(|n| n.view.clone()).collect()
    }

    fn plan(&self) -> Plan {
        let nodes = self.views();
        plan(Input {
            spec: &self.spec,
            generation: Some(self.generation),
            spec_errors: &self.errors,
            status: &self.status,
            nodes: &nodes,
            scale_reason: None,
            unavailable: None,
            now: self.now,
        })
    }

    fn node(&mut self, id: &str) -> &mut SimNode {
        self.nodes
            .iter_mut()
            .find(|n| n.view.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// One round: plan, check, apply every action, let time pass. Returns the plan.
    fn round(&mut self) -> Plan {
        let plan = self.plan();
        let last_epoch = ring_state(&self.status).map(|s| s.current().epoch());
        for action in &plan.actions {
            match action {
                Action::Launch { slot } => {
                    self.next_id += 1;
                    self.launched += 1;
                    let id = format!("n{}", self.next_id);
                    self.nodes.push(SimNode {
                        view: NodeView {
                            slot: *slot,
                            id: id.clone(),
                            address: format!("10.0.0.{}:11211", self.next_id),
                            admin_address: format!("10.0.0.{}:11212", self.next_id),
                            health: Health::Starting,
                            settings: Some(NodeSettings::of(&self.spec)),
                            fresh: true,
                            handoff: Some(HandoffStatus::default()),
                        },
                        starting: self.start_rounds,
                        handing_off: 0,
                    });
                }
                Action::Terminate { id, .. } => {
                    self.check_termination(id, &plan);
                    self.nodes.retain(|n| n.view.id != *id);
                    self.terminated.push(id.clone());
                }
                Action::PushConfig { id } => {
                    let settings = NodeSettings::of(&self.spec);
                    self.node(id).view.settings = Some(settings);
                }
                Action::Publish { ring, reason, .. } => {
                    self.check_publish(ring, last_epoch);
                    for m in ring.current().members() {
                        if let Some(n) = self.nodes.iter_mut().find(|n| n.view.address == m.address)
                        {
                            n.view.fresh = false;
                        }
                    }
                    self.published.push((ring.clone(), reason.clone()));
                }
                Action::StartHandoff { id } => {
                    let epoch = plan
                        .status
                        .ring
                        .as_ref()
                        .map(|r| r.epoch)
                        .expect("a hand-off needs a ring");
                    let rounds = self.handoff_rounds;
                    self.handoffs_started.push((id.clone(), epoch));
                    let node = self.node(id);
                    node.handing_off = rounds;
                    node.view.handoff = Some(HandoffStatus {
                        state: HandoffState::Running,
                        epoch: Some(epoch),
                        keys_moved: 10,
                        bytes_moved: 1000,
                        ..HandoffStatus::default()
                    });
                }
            }
        }
        self.status = plan.status.clone();
        // Time passes.
        self.now += Duration::from_secs(1);
        for n in &mut self.nodes {
            if n.view.health == Health::Starting {
                if n.starting <= 1 {
                    n.view.health = Health::Ready;
                } else {
                    n.starting -= 1;
                }
            }
            if let Some(h) = &mut n.view.handoff
                && h.state == HandoffState::Running
            {
                if n.handing_off <= 1 {
                    h.state = HandoffState::Done;
                } else {
                    n.handing_off -= 1;
                }
            }
        }
        plan
    }

    /// A published ring only names live, ready, configured nodes; epochs only grow; a grown
    /// ring's new members are fresh nodes.
    fn check_publish(&self, ring: &RingState, last_epoch: Option<u64>) {
        if let Some(last) = last_epoch {
            assert!(
                ring.current().epoch() > last,
                "epoch went from {last} to {ring:?}"
            );
        }
        for m in ring.current().members() {
            let node = self
                .nodes
                .iter()
                .find(|n| n.view.address == m.address)
                .unwrap_or_else(|| panic!("published member {m:?} is no node"));
            assert_eq!(node.view.slot, m.slot, "{m:?} launched for another slot");
            let was_member = self.published.iter().any(|(r, _)| {
                r.current()
                    .members()
                    .iter()
                    .any(|old| old.address == m.address)
            }) || ring_state(&self.status).is_some_and(|s| {
                s.current()
                    .members()
                    .iter()
                    .any(|old| old.address == m.address)
            });
            assert!(
                was_member || node.view.fresh,
                "{m:?} joined the ring without being fresh"
            );
            if !was_member {
                assert_eq!(
                    node.view.health,
                    Health::Ready,
                    "{m:?} joined before it was ready"
                );
                assert_eq!(
                    node.view.settings,
                    Some(NodeSettings::of(&self.spec)),
                    "{m:?} joined before it was configured"
                );
            }
        }
    }

    /// No live node is stopped while it is in a ring: removed nodes stop after the hand-off.
    fn check_termination(&self, id: &str, plan: &Plan) {
        let Some(node) = self.nodes.iter().find(|n| n.view.id == id) else {
            return;
        };
        if node.view.health.failed() {
            return;
        }
        if let Some(state) = ring_state(&plan.status) {
            let member = state
                .current()
                .members()
                .iter()
                .chain(state.previous().map_or(&[][..], |r| r.members()))
                .any(|m| m.address == node.view.address);
            assert!(!member, "stopped live member {id} of {state:?}");
        }
    }

    /// Rounds until nothing is left to do; panics if it takes more than `limit`.
    fn settle(&mut self, limit: u32) -> u32 {
        for round in 1..=limit {
            let plan = self.round();
            if plan.actions.is_empty() && !plan.busy {
                return round;
            }
        }
        panic!(
            "not settled after {limit} rounds: status {:#?}\nnodes {:#?}",
            self.status,
            self.views()
        );
    }

    fn ring(&self) -> RingState {
        ring_state(&self.status).expect("a ring")
    }

    /// The settled pool: `n` ready members in slot order, no migration, no other node.
    fn assert_settled(&self, n: u32) {
        let ring = self.ring();
        assert!(!ring.is_migrating(), "still migrating: {ring:?}");
        assert_eq!(ring.current().len(), n, "ring {ring:?}");
        assert_eq!(self.nodes.len() as u32, n, "nodes {:#?}", self.views());
        for m in ring.current().members() {
            let node = self
                .nodes
                .iter()
                .find(|x| x.view.address == m.address)
                .expect("member is a node");
            assert_eq!(node.view.health, Health::Ready);
            assert_eq!(node.view.slot, m.slot);
        }
        assert_eq!(
            self.status.phase,
            Some(PoolPhase::Ready),
            "{:#?}",
            self.status
        );
        assert_eq!(self.status.ready_replicas, n);
        assert_eq!(self.status.replicas, n);
        assert!(self.status.migration.is_none());
        let cond = |kind: &str| {
            self.status
                .conditions
                .iter()
                .find(|c| c.type_ == kind)
                .map(|c| c.status.clone())
                .expect("condition present")
        };
        assert_eq!(cond("Ready"), "True");
        assert_eq!(cond("Progressing"), "False");
        assert_eq!(cond("Degraded"), "False");
    }

    /// The operator restarts: nodes are adopted (not fresh, settings unknown, hand-off status
    /// as the nodes report it).
    fn restart_operator(&mut self) {
        for n in &mut self.nodes {
            n.view.fresh = false;
            n.view.settings = None;
        }
    }

    fn kill(&mut self, slot: u32) {
        let address = self
            .ring()
            .current()
            .member(slot)
            .expect("slot")
            .address
            .clone();
        for n in &mut self.nodes {
            if n.view.address == address {
                n.view.health = Health::Dead;
            }
        }
    }

    fn set_replicas(&mut self, n: u32) {
        self.spec.scaling.replicas = n;
        self.generation += 1;
    }
}

#[test]
fn first_ring_is_published_only_when_every_node_is_ready() {
    let mut w = World::new(spec(3));
    w.start_rounds = 3;
    let first = w.round();
    assert_eq!(
        first.actions,
        vec![
            Action::Launch { slot: 0 },
            Action::Launch { slot: 1 },
            Action::Launch { slot: 2 }
        ]
    );
    assert_eq!(first.status.phase, Some(PoolPhase::Pending));
    // Starting: nothing more to do, but busy.
    let waiting = w.round();
    assert!(waiting.actions.is_empty() && waiting.busy);
    w.settle(10);
    assert_eq!(w.launched, 3);
    assert_eq!(w.published.len(), 1);
    assert_eq!(w.ring().current().epoch(), 1);
    w.assert_settled(3);
    assert_eq!(w.status.observed_generation, Some(1));
}

#[test]
fn grow_publishes_after_new_nodes_are_ready_then_hands_off_then_completes() {
    let mut w = World::new(spec(1));
    w.settle(10);
    let first = w.ring().current().clone();
    w.set_replicas(4);
    w.settle(20);
    w.assert_settled(4);
    // begin (grown ring with the previous attached), then complete.
    let rings: Vec<&RingState> = w.published.iter().map(|(r, _)| r).collect();
    assert_eq!(rings.len(), 3);
    assert_eq!(rings[1].previous(), Some(&first));
    assert_eq!(rings[1].current().len(), 4);
    assert!(!rings[2].is_migrating());
    assert_eq!(rings[2].current().members(), rings[1].current().members());
    assert_eq!(rings[2].current().epoch(), 3, "completion raises the epoch");
    // Slot 0 kept its node; only it handed off (the previous ring's members).
    assert_eq!(rings[2].current().member(0), first.member(0));
    let slot0 = w
        .nodes
        .iter()
        .find(|n| n.view.slot == 0)
        .unwrap()
        .view
        .id
        .clone();
    assert_eq!(w.handoffs_started, vec![(slot0, 2)]);
    assert_eq!(w.launched, 4);
    assert!(w.terminated.is_empty());
    assert!(
        w.status
            .last_scale_reason
            .as_deref()
            .unwrap()
            .contains("1 -> 4"),
        "{:?}",
        w.status.last_scale_reason
    );
}

#[test]
fn migration_status_counts_the_keys_moved_and_keeps_its_start_time() {
    let mut w = World::new(spec(1));
    w.settle(10);
    w.set_replicas(2);
    w.handoff_rounds = 3;
    let mut seen = None;
    for _ in 0..10 {
        w.round();
        if let Some(m) = &w.status.migration {
            assert_eq!(m.from_members.len(), 1);
            assert_eq!(m.to_epoch, m.from_epoch + 1);
            if let Some(started) = &seen {
                assert_eq!(m.started_at.as_ref(), Some(started));
            }
            seen = m.started_at.clone();
            if m.keys_moved > 0 {
                assert_eq!((m.keys_moved, m.bytes_moved), (10, 1000));
            }
            assert_eq!(w.status.phase, Some(PoolPhase::Scaling));
        }
    }
    assert!(seen.is_some(), "never saw a migration");
    w.assert_settled(2);
}

#[test]
fn shrink_stops_removed_nodes_only_after_their_handoff() {
    let mut w = World::new(spec(4));
    w.settle(10);
    let removed: Vec<String> = w
        .nodes
        .iter()
        .filter(|n| n.view.slot >= 1)
        .map(|n| n.view.id.clone())
        .collect();
    w.set_replicas(1);
    w.handoff_rounds = 3;
    let begin = w.round();
    let Some(Action::Publish { ring, .. }) = begin.actions.first() else {
        panic!(
            "shrink should begin with the shrunk ring: {:?}",
            begin.actions
        );
    };
    assert_eq!(ring.current().len(), 1);
    assert_eq!(ring.previous().map(|r| r.len()), Some(4));
    assert!(w.terminated.is_empty(), "stopped before the hand-off");
    // Draining nodes show as such.
    assert_eq!(
        w.status
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Draining)
            .count(),
        3
    );
    w.settle(20);
    w.assert_settled(1);
    let mut stopped = w.terminated.clone();
    stopped.sort();
    let mut expected = removed;
    expected.sort();
    assert_eq!(stopped, expected);
    // Every previous member was asked to hand off.
    assert_eq!(w.handoffs_started.len(), 4);
}

#[test]
fn dead_member_is_replaced_in_its_slot_and_nothing_else_moves() {
    let mut w = World::new(spec(3));
    w.settle(10);
    let before = w.ring().current().clone();
    w.kill(1);
    let plan = w.round();
    assert_eq!(plan.actions, vec![Action::Launch { slot: 1 }]);
    assert_eq!(plan.status.phase, Some(PoolPhase::Degraded));
    let failed: Vec<_> = plan
        .status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Failed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].slot, 1);
    w.settle(10);
    w.assert_settled(3);
    let after = w.ring().current().clone();
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert_eq!(after.member(0), before.member(0));
    assert_eq!(after.member(2), before.member(2));
    assert_ne!(after.member(1), before.member(1));
    assert!(
        w.handoffs_started.is_empty(),
        "a replacement hands nothing off"
    );
    assert_eq!(w.terminated.len(), 1);
}

#[test]
fn unresponsive_member_is_replaced_and_stopped() {
    let mut w = World::new(spec(2));
    w.settle(10);
    let id = w.nodes[0].view.id.clone();
    w.node(&id).view.health = Health::Unresponsive;
    w.settle(10);
    w.assert_settled(2);
    assert_eq!(w.terminated, vec![id]);
}

#[test]
fn member_dying_mid_migration_is_replaced_keeping_the_previous_ring() {
    let mut w = World::new(spec(2));
    w.settle(10);
    w.set_replicas(4);
    w.handoff_rounds = 5;
    // Run until the migration has begun and hand-offs are running.
    while !w.ring().is_migrating() {
        w.round();
    }
    w.round();
    let previous = w.ring().previous().cloned().unwrap();
    w.kill(3); // a new member, a hand-off target
    let mut replaced_during_migration = false;
    for _ in 0..30 {
        w.round();
        let s = w.ring();
        if s.is_migrating() && s.current().epoch() > previous.epoch() + 1 {
            assert_eq!(s.previous(), Some(&previous));
            replaced_during_migration = true;
        }
    }
    assert!(replaced_during_migration);
    w.assert_settled(4);
    // Hand-offs were restarted towards the replaced ring's epoch.
    let last_epoch = w.ring().current().epoch();
    let restarted = w
        .handoffs_started
        .iter()
        .filter(|(_, e)| *e == last_epoch - 1)
        .count();
    assert_eq!(restarted, 2, "{:?}", w.handoffs_started);
}

#[test]
fn operator_restart_mid_migration_finishes_it_without_new_nodes() {
    let mut w = World::new(spec(1));
    w.settle(10);
    w.set_replicas(3);
    w.handoff_rounds = 4;
    while !w.ring().is_migrating() {
        w.round();
    }
    let launched = w.launched;
    w.restart_operator();
    let plan = w.round();
    // Adopted nodes get their settings pushed again; nothing is launched or stopped.
    assert!(
        plan.actions
            .iter()
            .all(|a| matches!(a, Action::PushConfig { .. } | Action::StartHandoff { .. })),
        "{:?}",
        plan.actions
    );
    w.settle(20);
    w.assert_settled(3);
    assert_eq!(w.launched, launched);
    assert!(w.terminated.is_empty());
}

#[test]
fn operator_restart_before_the_grown_ring_replaces_unpublished_standbys() {
    let mut w = World::new(spec(1));
    w.settle(10);
    w.start_rounds = 3;
    w.set_replicas(3);
    w.round(); // launches slots 1 and 2
    assert_eq!(w.launched, 3);
    w.restart_operator();
    w.settle(20);
    w.assert_settled(3);
    // The two standbys of the crashed operator were not trusted: stopped and launched again.
    assert_eq!(w.terminated.len(), 2);
    assert_eq!(w.launched, 5);
}

#[test]
fn unknown_handoff_state_waits_instead_of_restarting() {
    let mut w = World::new(spec(1));
    w.settle(10);
    w.set_replicas(2);
    while !w.ring().is_migrating() {
        w.round();
    }
    w.round();
    let started = w.handoffs_started.len();
    for n in &mut w.nodes {
        n.view.handoff = None;
        n.handing_off = 100;
    }
    let plan = w.round();
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert!(plan.busy);
    assert_eq!(w.handoffs_started.len(), started);
}

#[test]
fn failed_handoff_is_restarted_and_reported() {
    let mut w = World::new(spec(1));
    w.settle(10);
    w.set_replicas(2);
    w.handoff_rounds = 10;
    while w.handoffs_started.is_empty() {
        w.round();
    }
    let (id, epoch) = w.handoffs_started[0].clone();
    if let Some(h) = &mut w.node(&id).view.handoff {
        h.state = HandoffState::Failed;
        h.last_error = Some("owner 10.0.0.2:11211 unreachable".into());
    }
    let plan = w.round();
    assert_eq!(plan.actions, vec![Action::StartHandoff { id: id.clone() }]);
    let degraded = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.contains("unreachable"), "{degraded:?}");
    assert_eq!(w.handoffs_started.last(), Some(&(id, epoch)));
    w.handoff_rounds = 1;
    w.settle(20);
    w.assert_settled(2);
}

#[test]
fn invalid_spec_changes_nothing_and_says_why() {
    let mut w = World::new(spec(2));
    w.settle(10);
    let ring = w.ring();
    w.generation += 1;
    w.errors = vec![SpecError {
        field: "scaling.minReplicas".into(),
        message: "5 exceeds scaling.maxReplicas (3)".into(),
    }];
    let plan = w.round();
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(PoolPhase::Invalid));
    assert_eq!(plan.status.observed_generation, Some(2));
    let degraded = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(degraded.message.contains("scaling.minReplicas: 5 exceeds"));
    assert_eq!(w.ring(), ring);
}

#[test]
fn invalid_spec_on_a_new_pool_starts_nothing() {
    let mut w = World::new(spec(2));
    w.errors = vec![SpecError {
        field: "cache.capacityMiB".into(),
        message: "must be at least 1".into(),
    }];
    let plan = w.round();
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(PoolPhase::Invalid));
    assert!(plan.status.ring.is_none());
}

#[test]
fn an_unavailable_provider_halts_the_pool_and_says_why() {
    let w = World::new(spec(2));
    let nodes = w.views();
    let plan = plan(Input {
        spec: &w.spec,
        generation: Some(w.generation),
        spec_errors: &w.errors,
        status: &w.status,
        nodes: &nodes,
        scale_reason: None,
        unavailable: Some(Unavailable {
            reason: "ProviderUnavailable",
            message: "this operator cannot run `ec2` nodes",
            halt: true,
        }),
        now: w.now,
    });
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(PoolPhase::Degraded));
    let condition = |kind: &str| {
        plan.status
            .conditions
            .iter()
            .find(|c| c.type_ == kind)
            .unwrap()
            .clone()
    };
    assert_eq!(condition("Degraded").status, "True");
    assert_eq!(condition("Degraded").reason, "ProviderUnavailable");
    assert_eq!(condition("Ready").status, "False");
    assert_eq!(condition("Ready").reason, "ProviderUnavailable");
}

#[test]
fn an_unavailable_metrics_source_degrades_without_halting() {
    let mut w = World::new(spec(2));
    w.settle(10);
    let nodes = w.views();
    let plan = plan(Input {
        spec: &w.spec,
        generation: Some(w.generation),
        spec_errors: &w.errors,
        status: &w.status,
        nodes: &nodes,
        scale_reason: None,
        unavailable: Some(Unavailable {
            reason: "MetricsSourceUnavailable",
            message: "no CloudWatch source",
            halt: false,
        }),
        now: w.now,
    });
    assert_eq!(plan.status.phase, Some(PoolPhase::Degraded));
    assert_eq!(plan.status.ring, w.status.ring, "the ring stays as it is");
    assert_eq!(plan.status.ready_replicas, 2);
}

#[test]
fn config_change_is_pushed_to_every_member_without_restarts() {
    let mut w = World::new(spec(3));
    w.settle(10);
    let epoch = w.ring().current().epoch();
    w.spec.cache.policy = CachePolicy::Sieve;
    w.spec.cache.capacity_mib = 128;
    let plan = w.round();
    assert_eq!(plan.actions.len(), 3);
    assert!(
        plan.actions
            .iter()
            .all(|a| matches!(a, Action::PushConfig { .. }))
    );
    w.settle(5);
    w.assert_settled(3);
    assert_eq!(w.ring().current().epoch(), epoch);
    assert!(
        w.nodes
            .iter()
            .all(|n| n.view.settings.as_ref().unwrap().policy == "sieve")
    );
}

#[test]
fn grow_cancelled_before_publish_stops_the_standbys() {
    let mut w = World::new(spec(2));
    w.settle(10);
    w.start_rounds = 5;
    w.set_replicas(5);
    w.round();
    assert_eq!(w.nodes.len(), 5);
    w.set_replicas(2);
    w.settle(10);
    w.assert_settled(2);
    assert_eq!(w.terminated.len(), 3);
    assert_eq!(w.published.len(), 1, "no ring change for a cancelled grow");
}

#[test]
fn resize_asked_during_a_migration_waits_for_it() {
    let mut w = World::new(spec(2));
    w.settle(10);
    w.handoff_rounds = 4;
    w.set_replicas(3);
    while !w.ring().is_migrating() {
        w.round();
    }
    w.set_replicas(1);
    let plan = w.round();
    assert!(
        !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Publish { ring, .. } if ring.current().len() == 1)),
        "began a shrink during a grow's migration"
    );
    w.settle(30);
    w.assert_settled(1);
}

#[test]
fn auto_mode_follows_desired_replicas_within_bounds() {
    let mut s = spec(1);
    s.scaling.mode = ScalingMode::Auto;
    s.scaling.min_replicas = 2;
    s.scaling.max_replicas = 4;
    let status = CachePoolStatus::default();
    assert_eq!(
        desired_replicas(&s, &status),
        2,
        "min bound before any decision"
    );
    let decided = CachePoolStatus {
        desired_replicas: 9,
        ..CachePoolStatus::default()
    };
    assert_eq!(desired_replicas(&s, &decided), 4, "max bound");
    let mut w = World::new(s);
    w.settle(10);
    w.assert_settled(2);
    w.status.desired_replicas = 3;
    w.settle(20);
    w.assert_settled(3);
}

#[test]
fn conditions_keep_their_transition_time_while_unchanged() {
    let mut w = World::new(spec(1));
    w.settle(10);
    let before = w.status.conditions.clone();
    w.now += Duration::from_secs(100);
    w.round();
    assert_eq!(w.status.conditions, before);
}

/// Random spec changes, crashes and operator restarts: every published ring and every stop is
/// checked, and the pool always settles at the size asked for.
#[test]
fn random_resizes_crashes_and_restarts_always_settle_at_the_spec() {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    for trial in 0..40 {
        let mut w = World::new(spec(rng.random_range(1..=4)));
        w.start_rounds = rng.random_range(1..=3);
        w.handoff_rounds = rng.random_range(1..=4);
        w.settle(30);
        for _ in 0..12 {
            match rng.random_range(0..10) {
                0..=4 => w.set_replicas(rng.random_range(1..=8)),
                5 | 6 => {
                    let n = w.ring().current().len();
                    w.kill(rng.random_range(0..n));
                }
                7 => w.restart_operator(),
                _ => w.spec.cache.capacity_mib = rng.random_range(32..=256),
            }
            for _ in 0..rng.random_range(0..6) {
                w.round();
            }
        }
        w.settle(80);
        let want = w.spec.scaling.replicas;
        w.assert_settled(want);
        let epochs: Vec<u64> = w
            .published
            .iter()
            .map(|(r, _)| r.current().epoch())
            .collect();
        assert!(
            epochs.windows(2).all(|p| p[0] < p[1]),
            "trial {trial}: epochs {epochs:?}"
        );
        let members: BTreeMap<u32, u32> =
            w.nodes
                .iter()
                .map(|n| (n.view.slot, 1))
                .fold(BTreeMap::new(), |mut acc, (s, c)| {
                    *acc.entry(s).or_default() += c;
                    acc
                });
        assert!(
            members.values().all(|&c| c == 1),
            "trial {trial}: {members:?}"
        );
    }
}
