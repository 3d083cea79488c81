//! The operator's own Prometheus metrics: how its reconciles go, what it does to each pool,
//! and each pool's state and traffic as the operator sees them.
//!
//! Everything lives in `prometheus-client` families keyed by a `pool` label
//! (`namespace/name`), registered once in a [`Registry`] behind an `Arc`, so every task of the
//! operator updates the same series through a cheap clone of [`OperatorMetrics`] and
//! `/metrics` encodes them as OpenMetrics text. A deleted pool's series are removed by
//! [`OperatorMetrics::forget_pool`]; for the one label whose values are open-ended (the error
//! `kind`), the values seen are remembered per pool so that removal is complete.
//!
//! Names carry the `cachepool_` prefix and their unit (`_seconds`, `_bytes`, `_total`, the
//! latter added by the encoder to counters).
//!
//! Calls to AWS (EC2, SSM, CloudWatch) are counted by [`AwsCalls`], a handle of its own: the
//! providers and metrics sinks that make the calls are built before the operator (they come in
//! its `Config`), so they share one `AwsCalls` with it and the operator registers it here. The
//! same handle carries the CloudWatch sink's backlog: datums waiting to be sent, and those it
//! gave up on, by reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cachepool_crds::pool::{CachePoolStatus, MigrationStatus};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::history::Summary;

/// The `Content-Type` of [`OperatorMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which way a pool was resized.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ScaleDirection {
    /// Nodes were added.
    Up,
    /// Nodes were removed.
    Down,
}

impl ScaleDirection {
    /// The label value: `up` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleDirection::Up => "up",
            ScaleDirection::Down => "down",
        }
    }
}

impl EncodeLabelValue for ScaleDirection {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    pool: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    pool: String,
    /// `grow`, `shrink` or `hold`.
    decision: String,
    /// The rule that decided (see `autoscaler::Decision`).
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScaleLabels {
    pool: String,
    direction: ScaleDirection,
}

type IntGauges = Family<PoolLabels, Gauge>;
type FloatGauges = Family<PoolLabels, Gauge<f64, AtomicU64>>;
type Counters = Family<PoolLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct AwsCallLabels {
    service: String,
    api: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsApiLabels {
    service: String,
    api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct DropLabels {
    reason: String,
}

/// `reason` of datums the CloudWatch sink dropped because more than its bound waited: the
/// oldest go first.
pub const DROPPED_OVERFLOW: &str = "overflow";
/// `reason` of datums CloudWatch refused with an error no retry fixes (a 4xx other than
/// throttling: `AccessDenied`, `InvalidParameterValue`, …).
pub const DROPPED_REFUSED: &str = "refused";

/// AWS call latencies from 5 ms to ~80 s: a call answered at once, or one that the SDK retried
/// with back-off (its standard retry waits up to 20 s between attempts).
fn aws_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Outcome label of a call that succeeded.
pub const AWS_OK: &str = "ok";

/// Counts and times calls to AWS APIs, by service (`ec2`, `ssm`, `cloudwatch`), API
/// (`RunInstances`, `PutMetricData`, …) and outcome (`ok`, or the AWS error code such as
/// `Throttling`; `timeout`, `unreachable` or `other` when there is no code). A call is what
/// the operator asked for: the SDK's retries of it are inside one count and one latency.
/// Clones share the same series.
#[derive(Clone, Debug)]
pub struct AwsCalls {
    calls: Family<AwsCallLabels, Counter>,
    duration: Family<AwsApiLabels, Histogram, fn() -> Histogram>,
    /// The same counts, readable (a `Family` cannot be iterated): tests and `api_calls()`.
    seen: Arc<Mutex<BTreeMap<AwsCallLabels, u64>>>,
    /// CloudWatch datums queued or waiting for a retry.
    pending: Gauge,
    /// CloudWatch datums given up on, by reason ([`DROPPED_OVERFLOW`], [`DROPPED_REFUSED`]).
    dropped: Family<DropLabels, Counter>,
    dropped_seen: Arc<Mutex<BTreeMap<DropLabels, u64>>>,
}

impl Default for AwsCalls {
    fn default() -> AwsCalls {
        AwsCalls::new()
    }
}

impl AwsCalls {
    /// No call counted yet.
    pub fn new() -> AwsCalls {
        AwsCalls {
            calls: Family::default(),
            duration: Family::new_with_constructor(aws_duration_histogram),
            seen: Arc::default(),
            pending: Gauge::default(),
            dropped: Family::default(),
            dropped_seen: Arc::default(),
        }
    }

    /// Sets how many CloudWatch datums wait to be sent.
    pub fn set_datums_pending(&self, n: usize) {
        self.pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// CloudWatch datums waiting to be sent, as last set.
    pub fn datums_pending(&self) -> u64 {
        u64::try_from(self.pending.get()).unwrap_or(0)
    }

    /// Counts `n` CloudWatch datums dropped for `reason`.
    pub fn datums_dropped(&self, reason: &str, n: usize) {
        let labels = DropLabels {
            reason: reason.to_owned(),
        };
        let n = n as u64;
        self.dropped.get_or_create(&labels).inc_by(n);
        *self
            .dropped_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels)
            .or_default() += n;
    }

    /// CloudWatch datums dropped for `reason` so far.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&DropLabels {
                reason: reason.to_owned(),
            })
            .copied()
            .unwrap_or(0)
    }

    /// Records one call of `service`'s `api` that ended with `outcome` after `took`.
    pub fn record(&self, service: &str, api: &str, outcome: &str, took: Duration) {
        let labels = AwsCallLabels {
            service: service.to_owned(),
            api: api.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.calls.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&AwsApiLabels {
                service: service.to_owned(),
                api: api.to_owned(),
            })
            .observe(took.as_secs_f64());
        *self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels)
            .or_default() += 1;
    }

    /// Calls made to `service`, by API, whatever their outcome.
    pub fn by_api(&self, service: &str) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (labels, n) in self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(l, _)| l.service == service)
        {
            *counts.entry(labels.api.clone()).or_default() += n;
        }
        counts
    }

    /// Calls of `service`'s `api` that ended with `outcome`.
    pub fn count(&self, service: &str, api: &str, outcome: &str) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&AwsCallLabels {
                service: service.to_owned(),
                api: api.to_owned(),
                outcome: outcome.to_owned(),
            })
            .copied()
            .unwrap_or(0)
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "cachepool_operator_aws_calls",
            "Calls to AWS APIs, by service, API and outcome (ok or the AWS error code); \
             SDK retries are inside one call",
            self.calls.clone(),
        );
        registry.register_with_unit(
            "cachepool_operator_aws_call_duration",
            "Time one AWS call took, SDK retries included, by service and API",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "cachepool_operator_cloudwatch_datums_pending",
            "CloudWatch datums queued or waiting for a retry (bounded; the oldest are dropped \
             beyond the bound)",
            self.pending.clone(),
        );
        registry.register(
            "cachepool_operator_cloudwatch_datums_dropped",
            "CloudWatch datums given up on, by reason: overflow (more waited than the bound; \
             the oldest went) or refused (an error no retry fixes, such as AccessDenied)",
            self.dropped.clone(),
        );
    }
}

/// Reconcile durations from 1 ms to ~33 s: a reconcile that waits on a node launch or a
/// hand-off step is long, a steady-state one is a few milliseconds.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    reconciles: Counters,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Family<PoolLabels, Histogram, fn() -> Histogram>,
    scale_events: Family<ScaleLabels, Counter>,
    node_launches: Counters,
    node_replacements: Counters,
    sample_failures: Counters,
    status_writes: Counters,
    nodes: IntGauges,
    ready_nodes: IntGauges,
    desired_nodes: IntGauges,
    ring_epoch: IntGauges,
    items: IntGauges,
    bytes: IntGauges,
    miss_rate: FloatGauges,
    hit_rate: FloatGauges,
    requests_per_minute: FloatGauges,
    migrating: IntGauges,
    keys_moved: IntGauges,
    bytes_moved: IntGauges,
    autoscaler_decisions: Family<DecisionLabels, Counter>,
    /// Error kinds seen per pool, so `forget_pool` can remove each of their series.
    error_kinds: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// (decision, rule) pairs seen per pool, likewise.
    decision_kinds: Mutex<BTreeMap<String, BTreeSet<(String, String)>>>,
    aws: AwsCalls,
}

/// The operator's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct OperatorMetrics {
    inner: Arc<Inner>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        OperatorMetrics::new()
    }
}

impl OperatorMetrics {
    /// Every metric registered, no series yet.
    pub fn new() -> OperatorMetrics {
        OperatorMetrics::with_aws_calls(AwsCalls::new())
    }

    /// Every metric registered, the AWS calls counted by `aws` among them (the handle the
    /// operator's EC2 provider and CloudWatch client were built with).
    pub fn with_aws_calls(aws: AwsCalls) -> OperatorMetrics {
        let mut registry = Registry::default();
        aws.register(&mut registry);
        let reconciles = Counters::default();
        registry.register(
            "cachepool_operator_reconciles",
            "Reconciles run, by pool (failed ones included)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "cachepool_operator_reconcile_errors",
            "Reconciles that failed, by pool and error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration =
            Family::<PoolLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register_with_unit(
            "cachepool_operator_reconcile_duration",
            "Time one reconcile took, by pool",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let scale_events = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "cachepool_operator_scale_events",
            "Resizes started, by pool and direction",
            scale_events.clone(),
        );
        let autoscaler_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "cachepool_operator_autoscaler_decisions",
            "Autoscaler windows judged, by pool, decision (grow, shrink, hold) and the rule that \
             decided (e.g. cooldown, within_thresholds, too_few_requests, above_max_miss_rate)",
            autoscaler_decisions.clone(),
        );
        let node_launches = Counters::default();
        registry.register(
            "cachepool_operator_node_launches",
            "Nodes launched, by pool (replacements included)",
            node_launches.clone(),
        );
        let node_replacements = Counters::default();
        registry.register(
            "cachepool_operator_node_replacements",
            "Failed nodes replaced in their slot, by pool",
            node_replacements.clone(),
        );
        let sample_failures = Counters::default();
        registry.register(
            "cachepool_operator_node_sample_failures",
            "Node stats requests that failed or returned unreadable stats, by pool",
            sample_failures.clone(),
        );

        let status_writes = Counters::default();
        registry.register(
            "cachepool_operator_status_writes",
            "Pool records (status) written to the store, by pool: only meaningful changes, \
             fast counters at most every status counter interval",
            status_writes.clone(),
        );

        let mut gauge = |name: &str, help: &str| {
            let family = IntGauges::default();
            registry.register(name, help, family.clone());
            family
        };
        let nodes = gauge("cachepool_pool_nodes", "Nodes that exist");
        let ready_nodes = gauge("cachepool_pool_ready_nodes", "Nodes that serve");
        let desired_nodes = gauge(
            "cachepool_pool_desired_nodes",
            "Nodes the operator is driving towards",
        );
        let ring_epoch = gauge("cachepool_pool_ring_epoch", "Epoch of the published ring");
        let items = gauge("cachepool_pool_items", "Items held by the pool's nodes");
        let bytes = gauge(
            "cachepool_pool_bytes",
            "Bytes held by the pool's nodes, per-item overhead included",
        );
        let migrating = gauge(
            "cachepool_pool_migrating",
            "1 while keys are handed off between two rings, else 0",
        );
        let keys_moved = gauge(
            "cachepool_pool_migration_keys_moved",
            "Keys moved by the current hand-off, or by the last one when idle",
        );
        let bytes_moved = gauge(
            "cachepool_pool_migration_bytes_moved",
            "Bytes moved by the current hand-off, or by the last one when idle",
        );

        let mut float_gauge = |name: &str, help: &str| {
            let family = FloatGauges::default();
            registry.register(name, help, family.clone());
            family
        };
        let miss_rate = float_gauge(
            "cachepool_pool_miss_rate",
            "Misses / gets over the last window; absent without gets",
        );
        let hit_rate = float_gauge(
            "cachepool_pool_hit_rate",
            "Hits / gets over the last window; absent without gets",
        );
        let requests_per_minute = float_gauge(
            "cachepool_pool_requests_per_minute",
            "Commands per minute over the last window; absent without samples",
        );

        OperatorMetrics {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_errors,
                reconcile_duration,
                scale_events,
                autoscaler_decisions,
                node_launches,
                node_replacements,
                sample_failures,
                status_writes,
                nodes,
                ready_nodes,
                desired_nodes,
                ring_epoch,
                items,
                bytes,
                miss_rate,
                hit_rate,
                requests_per_minute,
                migrating,
                keys_moved,
                bytes_moved,
                error_kinds: Mutex::new(BTreeMap::new()),
                decision_kinds: Mutex::new(BTreeMap::new()),
                aws,
            }),
        }
    }

    /// Counts one reconcile of `pool` and records how long it took.
    pub fn reconciled(&self, pool: &str, took: Duration) {
        let labels = labels(pool);
        self.inner.reconciles.get_or_create(&labels).inc();
        self.inner
            .reconcile_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Starts timing a reconcile of `pool`; it is counted when the timer is dropped, whichever
    /// way the reconcile ends.
    pub fn start_reconcile(&self, pool: &str) -> ReconcileTimer {
        ReconcileTimer {
            metrics: self.clone(),
            pool: pool.to_string(),
            started: Instant::now(),
        }
    }

    /// Counts a failed reconcile of `pool`; `kind` names the error's class (a short, fixed
    /// word such as `provider` or `invalid_spec`, never a message: every value is a series).
    pub fn reconcile_failed(&self, pool: &str, kind: &str) {
        self.inner
            .error_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pool.to_string())
            .or_default()
            .insert(kind.to_string());
        self.inner
            .reconcile_errors
            .get_or_create(&ErrorLabels {
                pool: pool.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts a resize of `pool` that started.
    pub fn scaled(&self, pool: &str, direction: ScaleDirection) {
        self.inner
            .scale_events
            .get_or_create(&ScaleLabels {
                pool: pool.to_string(),
                direction,
            })
            .inc();
    }

    /// Counts one autoscaler decision of `pool`: `decision` is `grow`, `shrink` or `hold`,
    /// `rule` a short fixed word naming the rule that decided.
    pub fn autoscaler_decided(&self, pool: &str, decision: &str, rule: &str) {
        self.inner
            .decision_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pool.to_string())
            .or_default()
            .insert((decision.to_string(), rule.to_string()));
        self.inner
            .autoscaler_decisions
            .get_or_create(&DecisionLabels {
                pool: pool.to_string(),
                decision: decision.to_string(),
                rule: rule.to_string(),
            })
            .inc();
    }

    /// Counts a node launched for `pool`.
    pub fn node_launched(&self, pool: &str) {
        self.inner.node_launches.get_or_create(&labels(pool)).inc();
    }

    /// Counts a failed node of `pool` replaced in its slot.
    pub fn node_replaced(&self, pool: &str) {
        self.inner
            .node_replacements
            .get_or_create(&labels(pool))
            .inc();
    }

    /// Reconciles of `pool` so far.
    pub fn reconciles(&self, pool: &str) -> u64 {
        self.inner.reconciles.get_or_create(&labels(pool)).get()
    }

    /// Counts a write of `pool`'s record (status) to the store.
    pub fn status_written(&self, pool: &str) {
        self.inner.status_writes.get_or_create(&labels(pool)).inc();
    }

    /// Status writes of `pool` so far.
    pub fn status_writes(&self, pool: &str) -> u64 {
        self.inner.status_writes.get_or_create(&labels(pool)).get()
    }

    /// Counts a node of `pool` whose stats could not be sampled.
    pub fn sample_failed(&self, pool: &str) {
        self.inner
            .sample_failures
            .get_or_create(&labels(pool))
            .inc();
    }

    /// Sets the node counts, ring epoch and hand-off gauges of `pool` from its status.
    pub fn observe_status(&self, pool: &str, status: &CachePoolStatus) {
        let labels = labels(pool);
        let i = &self.inner;
        i.nodes
            .get_or_create(&labels)
            .set(i64::from(status.replicas));
        i.ready_nodes
            .get_or_create(&labels)
            .set(i64::from(status.ready_replicas));
        i.desired_nodes
            .get_or_create(&labels)
            .set(i64::from(status.desired_replicas));
        if let Some(ring) = &status.ring {
            i.ring_epoch
                .get_or_create(&labels)
                .set(saturate(ring.epoch));
        }
        self.set_migration(pool, status.migration.as_ref());
    }

    /// Sets the hand-off gauges of `pool`: `Some` while keys move, `None` when idle (the
    /// moved counts then keep the last hand-off's totals).
    pub fn set_migration(&self, pool: &str, migration: Option<&MigrationStatus>) {
        let labels = labels(pool);
        let i = &self.inner;
        let keys = i.keys_moved.get_or_create(&labels);
        let bytes = i.bytes_moved.get_or_create(&labels);
        let migrating = i.migrating.get_or_create(&labels);
        match migration {
            Some(m) => {
                keys.set(saturate(m.keys_moved));
                bytes.set(saturate(m.bytes_moved));
                migrating.set(1);
            }
            None => {
                migrating.set(0);
            }
        }
    }

    /// Sets the traffic gauges of `pool` from its history. A rate the summary lacks (no
    /// gets, or too little data) removes its series rather than report a made-up value.
    pub fn set_traffic(&self, pool: &str, summary: &Summary) {
        let labels = labels(pool);
        let i = &self.inner;
        i.items.get_or_create(&labels).set(saturate(summary.items));
        i.bytes.get_or_create(&labels).set(saturate(summary.bytes));
        for (family, value) in [
            (&i.miss_rate, summary.miss_rate),
            (&i.hit_rate, summary.hit_rate),
            (&i.requests_per_minute, summary.requests_per_minute),
        ] {
            match value {
                Some(v) => {
                    family.get_or_create(&labels).set(v);
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
    }

    /// Removes every series of `pool` (it was deleted).
    pub fn forget_pool(&self, pool: &str) {
        let labels = labels(pool);
        let i = &self.inner;
        for family in [
            &i.reconciles,
            &i.node_launches,
            &i.node_replacements,
            &i.sample_failures,
            &i.status_writes,
        ] {
            family.remove(&labels);
        }
        i.reconcile_duration.remove(&labels);
        for family in [
            &i.nodes,
            &i.ready_nodes,
            &i.desired_nodes,
            &i.ring_epoch,
            &i.items,
            &i.bytes,
            &i.migrating,
            &i.keys_moved,
            &i.bytes_moved,
        ] {
            family.remove(&labels);
        }
        for family in [&i.miss_rate, &i.hit_rate, &i.requests_per_minute] {
            family.remove(&labels);
        }
        for direction in [ScaleDirection::Up, ScaleDirection::Down] {
            i.scale_events.remove(&ScaleLabels {
                pool: pool.to_string(),
                direction,
            });
        }
        let kinds = i
            .error_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool)
            .unwrap_or_default();
        for kind in kinds {
            i.reconcile_errors.remove(&ErrorLabels {
                pool: pool.to_string(),
                kind,
            });
        }
        let decisions = i
            .decision_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool)
            .unwrap_or_default();
        for (decision, rule) in decisions {
            i.autoscaler_decisions.remove(&DecisionLabels {
                pool: pool.to_string(),
                decision,
                rule,
            });
        }
    }

    /// The AWS calls counted in these metrics.
    pub fn aws_calls(&self) -> &AwsCalls {
        &self.inner.aws
    }

    /// Every metric as OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail and no metric here has a fallible encoder; should
        // one appear, a scrape gets what was written and the log says why it is short.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            tracing::error!(%error, "encoding the operator's metrics failed");
        }
        text
    }
}

/// Times one reconcile; see [`OperatorMetrics::start_reconcile`].
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: OperatorMetrics,
    pool: String,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics.reconciled(&self.pool, self.started.elapsed());
    }
}

fn labels(pool: &str) -> PoolLabels {
    PoolLabels {
        pool: pool.to_string(),
    }
}

/// Gauges are i64; counts beyond it (never in practice) read as the maximum.
fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
