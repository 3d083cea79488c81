//! The driver's actions: what it does to nodes and rings once the reconcile core has decided,
//! and the events each one tells.

use std::time::{Duration, Instant, SystemTime};

use cache_node::admin::ConfigPatch;
use cachepool_crds::pool::{CachePoolSpec, CachePoolStatus};
use cachepool_crds::ring::RingState;
use tracing::{info, warn};

use super::{
    Driver, FlushReport, MAX_LAUNCH_BACKOFF, NodeMemory, PROVIDER_EVENT_INTERVAL, StartFailures,
    join_all,
};
use crate::events::{Event, reason};
use crate::metrics::ScaleDirection;
use crate::provider::{self, AdminToken, LaunchSpec, PoolProvider, ProviderNode};
use crate::rebalance::AdminClient;
use crate::reconcile::{NodeSettings, RingChange};

/// A failed hand-off is restarted at most this often per node.
const HANDOFF_RETRY: Duration = Duration::from_secs(2);

impl Driver {
    pub(super) async fn flush(&mut self) -> FlushReport {
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
        let results = join_all(
            requests
                .into_iter()
                .map(|(id, admin)| async move { (id, admin.flush().await) }),
        )
        .await;
        for (id, result) in results {
            match result {
                Ok(answer) => {
                    report.nodes += 1;
                    report.items_dropped += answer.flushed_items;
                }
                Err(e) => report.failed.push(format!("{id}: {e}")),
            }
        }
        info!(pool = %self.handle.pool, nodes = report.nodes, items = report.items_dropped, "flushed");
        report
    }

    /// Stops every node of the deleted pool, then forgets it.
    pub(super) async fn delete(&mut self) {
        let pool = self.handle.pool.clone();
        if let Some(Ok(provider)) = self.provider.clone() {
            match provider.list(&pool).await {
                Ok(nodes) => {
                    let mut stopped = 0;
                    for node in &nodes {
                        match provider.terminate(&pool, &node.id).await {
                            Ok(()) => stopped += 1,
                            Err(e) => {
                                warn!(pool = %pool, node = %node.id, error = %e, "stopping a node of a deleted pool");
                                self.event(Event::warning(
                                    reason::PROVIDER_ERROR,
                                    format!(
                                        "the pool is deleted, but stopping node {} failed: {e}",
                                        node.id
                                    ),
                                ));
                            }
                        }
                    }
                    if stopped == nodes.len() {
                        self.event(Event::normal(
                            reason::DELETED,
                            format!("the pool is deleted: its {stopped} node(s) stopped"),
                        ));
                    }
                }
                Err(e) => {
                    warn!(pool = %pool, error = %e, "listing the nodes of a deleted pool");
                    self.event(Event::warning(
                        reason::PROVIDER_ERROR,
                        format!("the pool is deleted, but listing its nodes failed: {e}"),
                    ));
                }
            }
        }
        if let Err(e) = self.ctx.store.forget(&pool).await {
            warn!(pool = %pool, error = %e, "forgetting a deleted pool");
        }
        self.handle.ring.send_replace(None);
        self.deleted = true;
    }

    pub(super) async fn launch(
        &mut self,
        provider: &PoolProvider,
        slot: u32,
        spec: &CachePoolSpec,
    ) {
        let settings = NodeSettings::of(spec);
        let pool = self.handle.pool.clone();
        let launch = LaunchSpec {
            pool: pool.clone(),
            uid: self.record.uid.clone(),
            slot,
            tags: LaunchSpec::standard_tags(&pool, slot, &self.ctx.operator_id),
            provider: spec.provider.clone(),
            capacity_mib: settings.capacity_mib,
            policy: settings.policy.clone(),
            max_item_size_kib: settings.max_item_size_kib,
            admin_token: AdminToken::generate(),
        };
        match provider.launch(&launch).await {
            Ok(node) => {
                info!(pool = %pool, slot, node = %node.id, address = %node.address, "node launched");
                self.metrics().node_launched(&self.label());
                let admin = AdminClient::new(&node.admin_address, Some(&node.admin_token));
                let probe = AdminClient::with_timeouts(
                    &node.admin_address,
                    Some(&node.admin_token),
                    self.options().probe_timeout,
                );
                self.nodes.insert(
                    node.id.clone(),
                    NodeMemory {
                        address: node.address.clone(),
                        admin,
                        probe,
                        fresh: true,
                        vetted: true,
                        settings: Some(settings),
                        first_seen: Instant::now(),
                        last_ok: None,
                        handoff: None,
                        handoff_started: None,
                    },
                );
            }
            Err(e) => {
                let action = format!("launching a node for slot {slot}");
                self.provider_error(&action, &e);
                self.launch_refused(slot, &format!("{action} failed ({}): {e}", e.kind()));
            }
        }
    }

    pub(super) async fn terminate(&mut self, provider: &PoolProvider, id: &str, why: &str) {
        let pool = self.handle.pool.clone();
        info!(pool = %pool, node = %id, reason = %why, "stopping node");
        match provider.terminate(&pool, id).await {
            Ok(()) => {
                self.nodes.remove(id);
            }
            Err(e) => self.provider_error(&format!("stopping node {id}"), &e),
        }
    }

    /// The pause before the next launch of `slot` after `count` failures in a row.
    fn launch_pause(&self, count: u32) -> Duration {
        self.options()
            .launch_backoff
            .saturating_mul(2u32.saturating_pow(count.saturating_sub(1)))
            .min(MAX_LAUNCH_BACKOFF)
    }

    /// The provider refused to launch a node for `slot` (its error already counted and told
    /// by [`Self::provider_error`]): the slot's next launch waits as after a node that never
    /// became ready, so a refusal that repeats (a subnet that does not exist, a quota
    /// reached) costs one call per back-off, not one per round, and the status says why.
    fn launch_refused(&mut self, slot: u32, message: &str) {
        let count = self.start_failures.get(&slot).map_or(1, |f| f.count + 1);
        let pause = self.launch_pause(count);
        warn!(pool = %self.handle.pool, slot, failures = count, retry_in = ?pause,
              "a launch was refused; backing off");
        self.start_failures.insert(
            slot,
            StartFailures {
                count,
                retry_at: Instant::now() + pause,
                reason: reason::PROVIDER_ERROR,
                message: format!("{message}; the slot is launched again in {pause:?}"),
            },
        );
    }

    /// Node `id` of `slot` never became ready and was terminated: the slot's next launch waits
    /// `launch_backoff`, doubled for each such node in a row (at most [`MAX_LAUNCH_BACKOFF`]),
    /// and the status and an event say why.
    pub(super) fn start_failed(&mut self, slot: u32, id: &str) {
        let options = self.options();
        let count = self.start_failures.get(&slot).map_or(1, |f| f.count + 1);
        let pause = self.launch_pause(count);
        let message = format!(
            "the node launched for slot {slot} ({id}) was not ready within {:?} and was \
             terminated ({count} in a row); the slot is launched again in {pause:?}",
            options.start_timeout
        );
        warn!(pool = %self.handle.pool, slot, node = %id, failures = count, retry_in = ?pause,
              "a node never became ready");
        self.metrics()
            .reconcile_failed(&self.label(), "start_timeout");
        self.event(Event::warning(reason::NODE_NOT_READY, message.clone()));
        self.start_failures.insert(
            slot,
            StartFailures {
                count,
                retry_at: Instant::now() + pause,
                reason: reason::NODE_NOT_READY,
                message,
            },
        );
    }

    /// Counts a provider failure under its kind, logs it and tells it as an event: the same
    /// message at most once a minute, so a provider failing every round does not flood events.
    pub(super) fn provider_error(&mut self, action: &str, error: &provider::Error) {
        let pool = self.handle.pool.clone();
        warn!(pool = %pool, error = %error, "{action} failed");
        let label = match error.kind() {
            // The labels the operator counted under before the kinds were shared.
            "launch" | "start_timeout" | "config" if action.starts_with("launching") => "launch",
            _ if action.starts_with("stopping") => "terminate",
            _ => "provider",
        };
        self.metrics().reconcile_failed(&self.label(), label);
        let message = format!("{action} failed ({}): {error}", error.kind());
        let repeated = self
            .provider_event
            .as_ref()
            .is_some_and(|(last, at)| *last == message && at.elapsed() < PROVIDER_EVENT_INTERVAL);
        if !repeated {
            self.event(Event::warning(reason::PROVIDER_ERROR, message.clone()));
            self.provider_event = Some((message, Instant::now()));
        }
    }

    pub(super) async fn push_config(&mut self, id: &str, spec: &CachePoolSpec) {
        let settings = NodeSettings::of(spec);
        let pool = self.handle.pool.clone();
        let label = self.label();
        let Some(memory) = self.nodes.get_mut(id) else {
            return;
        };
        let update = ConfigPatch {
            capacity_mib: Some(u64::from(settings.capacity_mib)),
            policy: Some(settings.policy.clone()),
            max_item_size_kib: Some(u64::from(settings.max_item_size_kib)),
        };
        match memory.admin.put_config(&update).await {
            Ok(_) => {
                info!(pool = %pool, node = %id, capacity_mib = settings.capacity_mib,
                      policy = %settings.policy, "configuration pushed");
                memory.settings = Some(settings);
            }
            Err(e) => {
                warn!(pool = %pool, node = %id, error = %e, "pushing configuration failed");
                self.ctx.metrics.reconcile_failed(&label, "config");
            }
        }
    }

    /// Publishes a new ring: stored with the status first, then told to clients, then as an
    /// event.
    pub(super) async fn publish_ring(
        &mut self,
        ring: &RingState,
        change: RingChange,
        why: &str,
        status: &mut CachePoolStatus,
        now: SystemTime,
    ) {
        let before = self.handle.ring.borrow().clone();
        info!(pool = %self.handle.pool, epoch = ring.current().epoch(),
              members = ring.current().len(), migrating = ring.is_migrating(), reason = why, "ring published");
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
        // What the finished hand-off moved, from this round's probes of the nodes that handed
        // off towards the migrating ring (the stored status lags a round behind).
        let moved = before
            .as_ref()
            .filter(|_| change == RingChange::Complete)
            .map(|migrating| {
                let target = migrating.current().epoch();
                self.nodes
                    .values()
                    .filter_map(|n| n.handoff.as_ref())
                    .filter(|h| h.epoch == Some(target))
                    .fold((0, 0), |(keys, bytes), h| {
                        (keys + h.keys_moved, bytes + h.bytes_moved)
                    })
            });
        // The status, with this ring, is stored before any client hears of the ring.
        self.record.status = status.clone();
        self.save().await;
        self.handle.ring.send_replace(Some(ring.clone()));
        if !ring.is_migrating() {
            self.autoscaler.settled(ring.current().len(), now);
        }
        let epoch = ring.current().epoch();
        let to = ring.current().len();
        match change {
            RingChange::First => {}
            RingChange::Replace => {
                self.metrics().node_replaced(&self.label());
                self.event(Event::normal(
                    reason::NODE_REPLACED,
                    format!("ring epoch {epoch}: {why}"),
                ));
            }
            RingChange::Begin => {
                let from = before.as_ref().map_or(0, |r| r.current().len());
                let (scaled, word, direction) = if to > from {
                    (reason::SCALED_UP, "grows", ScaleDirection::Up)
                } else {
                    (reason::SCALED_DOWN, "shrinks", ScaleDirection::Down)
                };
                // Every resize counts, whoever asked for it (the autoscaler, a spec change, a
                // scale call).
                self.metrics().scaled(&self.label(), direction);
                self.event(Event::normal(
                    scaled,
                    format!("the pool {word} from {from} to {to} nodes: {why}"),
                ));
                self.event(Event::normal(
                    reason::HANDOFF_STARTED,
                    format!("ring epoch {epoch} published with the previous ring attached; keys move to their new owners"),
                ));
            }
            RingChange::Complete => {
                let (keys, bytes) = moved.unwrap_or_default();
                self.event(Event::normal(
                    reason::HANDOFF_FINISHED,
                    format!(
                        "ring epoch {epoch}: every key is with its owner ({keys} keys, {bytes} bytes moved); {to} nodes serve"
                    ),
                ));
            }
        }
    }

    pub(super) async fn start_handoff(&mut self, id: &str, listed: &[ProviderNode]) {
        let Some(ring) = self.handle.ring.borrow().clone() else {
            return;
        };
        let Some(node) = listed.iter().find(|n| n.id == id) else {
            return;
        };
        let pool = self.handle.pool.clone();
        let label = self.label();
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
                info!(pool = %pool, node = %id, epoch, "hand-off started");
                memory.handoff = Some(status);
            }
            Err(e) => {
                warn!(pool = %pool, node = %id, error = %e, "starting a hand-off failed");
                self.ctx.metrics.reconcile_failed(&label, "handoff");
            }
        }
    }
}
