//! Observing a pool: probing its nodes, sampling their traffic into the history, and the
//! autoscaler's windows (from the history or from the pool's metrics source).

use std::sync::PoisonError;
use std::time::{Duration, Instant, SystemTime};

use cachepool_crds::pool::{CachePoolSpec, MetricsSource, ScalingMode};
use tracing::{info, warn};

use super::{Driver, NodeMemory, join_all};
use crate::autoscaler::{Decision, Window};
use crate::events::{Event, reason};
use crate::history::{NodeSample, WindowTotals};
use crate::provider::ProviderNode;
use crate::rebalance::AdminClient;
use crate::reconcile::{Health, NodeView};

/// Window of the status's miss rate, hit rate and requests per minute in manual mode (auto
/// mode uses the autoscaler's window).
const STATUS_WINDOW: Duration = Duration::from_secs(60);

/// Length of one history point.
const MINUTE: Duration = Duration::from_secs(60);

impl Driver {
    pub(super) async fn observe(&mut self, listed: &[ProviderNode]) -> Vec<NodeView> {
        let now = Instant::now();
        let options = *self.options();
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
                    // Not launched by this driver: adopted after a restart, fresh only
                    // once it shows it never held an item.
                    fresh: false,
                    vetted: false,
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
        let results = join_all(probes).await;
        for (id, ready, handoff) in results {
            if let Some(memory) = self.nodes.get_mut(&id) {
                if ready {
                    memory.last_ok = Some(Instant::now());
                }
                memory.handoff = handoff;
            }
        }
        let provisional = self.vet_adopted(listed).await;
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
                    fresh: memory.is_some_and(|m| m.fresh) || provisional.contains(&node.id),
                    handoff: memory.and_then(|m| m.handoff.clone()),
                }
            })
            .collect()
    }

    /// Settles whether adopted nodes outside the rings are fresh, and returns the ones taken as
    /// fresh until they can tell: those still starting.
    ///
    /// An operator killed between a launch and its record leaves a live node that no ring
    /// names; the next operator must take it as its slot's new node, not launch a second one
    /// and stop the first. A node that left a ring before a crash is not fresh: it may hold
    /// values written before it left, stale once the ring moved on. The node's own counter
    /// tells them apart: `total_items` counts every item ever stored (by clients or a
    /// hand-off), so a node at 0 holds nothing that could be stale. A starting node counts as
    /// fresh (the slot waits for it, up to the start timeout, instead of launching another);
    /// a ready node is asked once, and is not fresh while its answer is missing.
    async fn vet_adopted(&mut self, listed: &[ProviderNode]) -> std::collections::HashSet<String> {
        let mut provisional = std::collections::HashSet::new();
        // Settled for good once each node has answered: the usual round stops here.
        if self.nodes.values().all(|m| m.vetted) {
            return provisional;
        }
        let members: Vec<String> = self
            .handle
            .ring
            .borrow()
            .as_ref()
            .map(|state| {
                state
                    .current()
                    .members()
                    .iter()
                    .chain(state.previous().map_or(&[][..], |r| r.members()))
                    .map(|m| m.address.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut asks = Vec::new();
        for node in listed.iter().filter(|n| n.alive) {
            let Some(memory) = self.nodes.get_mut(&node.id) else {
                continue;
            };
            if memory.vetted {
                continue;
            }
            if members.contains(&memory.address) {
                // A member: never fresh.
                memory.vetted = true;
            } else if memory.last_ok.is_none() {
                provisional.insert(node.id.clone());
            } else {
                let probe = memory.probe.clone();
                let id = node.id.clone();
                asks.push(async move { (id, probe.stats().await) });
            }
        }
        for (id, stats) in join_all(asks).await {
            let Some(memory) = self.nodes.get_mut(&id) else {
                continue;
            };
            match stats {
                Ok(stats) => {
                    let stored = stats.get("total_items").and_then(serde_json::Value::as_u64);
                    memory.vetted = true;
                    memory.fresh = stored == Some(0);
                    info!(pool = %self.handle.pool, node = %id, total_items = ?stored,
                          fresh = memory.fresh,
                          "adopted a node outside the rings{}",
                          if memory.fresh { ": it never stored an item and joins as a new node" }
                          else { ": it held items and is not reused" });
                }
                Err(e) => warn!(pool = %self.handle.pool, node = %id, error = %e,
                                "asking an adopted node whether it ever stored an item"),
            }
        }
        provisional
    }

    /// Samples every live node's stats into the history, every sampling interval.
    pub(super) async fn sample(&mut self, listed: &[ProviderNode], now: SystemTime) {
        let due = self
            .last_sample
            .is_none_or(|at| at.elapsed() >= self.options().sample_interval);
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
        let results = join_all(requests).await;
        let label = self.label();
        let mut samples = Vec::new();
        for (slot, result) in results {
            match result
                .map(|stats| NodeSample::from_stats(slot, &serde_json::Value::Object(stats)))
            {
                Ok(Ok(sample)) => samples.push(sample),
                Ok(Err(e)) => {
                    warn!(pool = %self.handle.pool, slot, error = %e, "unreadable stats");
                    self.ctx.metrics.sample_failed(&label);
                }
                Err(_) => self.ctx.metrics.sample_failed(&label),
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
        self.ctx.metrics.set_traffic(&label, &summary);
        self.publish_minutes(now).await;
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
    pub(super) async fn autoscale(&mut self, now: SystemTime) {
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
        // The window judged: the last `length` for the pool's own history; for a source that
        // ingests late (CloudWatch), an earlier, aligned one. Steadiness and "began after the
        // pool settled" are judged against that window, so data from before a resize that
        // arrives after it never counts as the new size's.
        let (window_start, window_end) = match (&spec.metrics.source, &self.ctx.traffic.cloudwatch)
        {
            (MetricsSource::Cloudwatch, Some(source)) => source.span(now, length),
            _ => (
                now.checked_sub(length).unwrap_or(SystemTime::UNIX_EPOCH),
                now,
            ),
        };
        let length = window_end.duration_since(window_start).unwrap_or(length);
        let totals = match self.window_totals(&spec, window_end, length).await {
            Ok(totals) => totals,
            Err(message) => {
                // The autoscaler holds; the status says why (`Degraded`).
                if self.traffic_unavailable.as_deref() != Some(message.as_str()) {
                    warn!(pool = %self.handle.pool, error = %message, "the autoscaler has no window");
                    self.event(Event::warning(
                        reason::PROVIDER_UNAVAILABLE,
                        message.clone(),
                    ));
                }
                self.traffic_unavailable = Some(message);
                return;
            }
        };
        self.traffic_unavailable = None;
        let window = Window {
            end: window_end,
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
                let (decided, by_miss_rate) = if replicas > from {
                    ("grow", "above_max_miss_rate")
                } else {
                    ("shrink", "below_min_miss_rate")
                };
                // A scale into changed bounds says which bound in its reason.
                let rule = if reason.contains("scaling.minReplicas")
                    || reason.contains("scaling.maxReplicas")
                {
                    "bounds"
                } else {
                    by_miss_rate
                };
                self.ctx
                    .metrics
                    .autoscaler_decided(&self.label(), decided, rule);
                self.record.status.desired_replicas = replicas;
                self.pending_reason = Some(reason);
            }
            Decision::Hold { rule, reason } => {
                self.ctx
                    .metrics
                    .autoscaler_decided(&self.label(), "hold", rule);
                tracing::debug!(pool = %self.handle.pool, reason = %reason, "autoscaler holds");
            }
        }
    }

    /// Gets and misses of the window `[now - length, now)` from the pool's metrics source, or
    /// why there are none.
    async fn window_totals(
        &self,
        spec: &CachePoolSpec,
        now: SystemTime,
        length: Duration,
    ) -> Result<Option<WindowTotals>, String> {
        match spec.metrics.source {
            MetricsSource::Direct => Ok(self
                .handle
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .window(now, length)),
            MetricsSource::Cloudwatch => match &self.ctx.traffic.cloudwatch {
                Some(source) => source
                    .window(&self.handle.pool, &spec.metrics, now, length)
                    .await
                    .map_err(|e| format!("reading the autoscaler's window failed: {e}")),
                None => Err(
                    "metrics.source is cloudwatch but this operator has no CloudWatch source; \
                     the autoscaler holds (use metrics.source: direct, or start the operator \
                     with CloudWatch)"
                        .to_owned(),
                ),
            },
        }
    }

    /// Offers every minute closed since the last call to the traffic sinks.
    async fn publish_minutes(&mut self, now: SystemTime) {
        if self.ctx.traffic.sinks.is_empty() {
            return;
        }
        let Some(spec) = self.record.valid_spec.clone() else {
            return;
        };
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let this_minute =
            SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch - since_epoch % 60);
        let from = self
            .published_minute
            .map_or(this_minute - MINUTE, |last| last + MINUTE);
        if from >= this_minute {
            return;
        }
        let points = self
            .handle
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed_minutes(from, this_minute);
        self.published_minute = Some(this_minute - MINUTE);
        if points.is_empty() {
            return;
        }
        for sink in self.ctx.traffic.sinks.clone() {
            if let Err(e) = sink
                .publish(&self.handle.pool, &spec.metrics, &points)
                .await
            {
                warn!(pool = %self.handle.pool, error = %e, "publishing the pool's metrics failed");
                self.ctx
                    .metrics
                    .reconcile_failed(&self.label(), "metrics_sink");
            }
        }
    }
}
