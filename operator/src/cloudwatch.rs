//! CloudWatch as a metrics sink (`metrics.cloudwatch.publish`) and as the autoscaler's source
//! (`metrics.source: cloudwatch`), through `aws-sdk-cloudwatch`.
//!
//! The system this product grew from read its miss rate from CloudWatch once a minute. Here
//! the sink and the source are one [`CloudWatch`] so that the source reads exactly what the
//! sink writes:
//!
//! - **What is published**: for each closed minute of a pool, in the pool's
//!   `metrics.cloudwatch.namespace`, with dimensions `Pool` (name) and `Namespace` (Kubernetes
//!   namespace): `MissRate` and `HitRate` (ratios 0–1, unit `None`, absent in a minute without
//!   gets), `Nodes`, `Items` and `Requests` (`Count`; `Requests` per minute), `Bytes`
//!   (`Bytes`), and the counts behind the rates, `Hits` and `Misses` (`Count`). Rates cannot be
//!   added up over a window; counts can.
//! - **Never blocking a round**: the driver awaits [`TrafficSink::publish`] inside its round,
//!   so `publish` only queues the datums; one task per operator sends them with
//!   `PutMetricData`, as many per request as CloudWatch takes ([`MAX_DATUMS_PER_REQUEST`]),
//!   grouped by metric namespace. The SDK's standard retry (back-off with jitter) handles
//!   throttling and 5xx; a batch that still fails that way is kept and tried again after a
//!   pause that doubles ([`CloudWatchOptions::retry_pause`] up to
//!   [`CloudWatchOptions::longest_retry_pause`]), and nothing else is sent until then (what
//!   failed once would fail again). A batch refused with an error no retry fixes (a 4xx other
//!   than throttling: `AccessDenied`, `InvalidParameterValue`; [`crate::aws::retryable`]) is
//!   dropped at once, never retried. Queued and kept datums share one bounded buffer
//!   ([`CloudWatchOptions::max_pending`]): while CloudWatch is away it fills, and beyond the
//!   bound the oldest datums go. Both kinds of loss are counted on `/metrics`
//!   (`cachepool_operator_cloudwatch_datums_dropped_total{reason}`), beside the backlog
//!   (`cachepool_operator_cloudwatch_datums_pending`).
//! - **Reading a window**: one `GetMetricData` per decision, summing `Hits` and `Misses` (and
//!   `Requests`) over the window at the source's period. CloudWatch answers in whole periods
//!   and ingests late, and the sink itself publishes a minute only once it closed: so the
//!   window judged at `now` is the last whole `length` (rounded up to periods) ending
//!   [`CloudWatchOptions::settle`] before `now`, aligned to the period
//!   ([`TrafficSource::span`]). The driver checks steadiness against that earlier window, so
//!   traffic from before a resize that CloudWatch delivers after it is never taken for the new
//!   size's. Like the pool's own history, a window with data for half of it or less is no
//!   window.
//! - **No credentials**: the operator still starts; every publish and read fails with a
//!   message naming what is missing (the autoscaler holds, the pool is `Degraded`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::config::SharedInterceptor;
use aws_sdk_cloudwatch::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{
    Dimension, Metric, MetricDataQuery, MetricDatum, MetricStat, ScanBy, StandardUnit,
};
use cachepool_crds::pool::MetricsSpec;
use tokio::sync::{Notify, oneshot};
use tracing::{debug, warn};

use aws_config::retry::RetryConfig;

use crate::aws::{Region, SharedCredentialsProvider};
use crate::history::{ClosedMinute, WindowTotals};
use crate::metrics::{AwsCalls, DROPPED_OVERFLOW, DROPPED_REFUSED};
use crate::provider::PoolRef;
use crate::store::BoxFuture;
use crate::traffic::{Error, TrafficSink, TrafficSource};

/// The `system` of this module's errors.
const SYSTEM: &str = "cloudwatch";

/// `PutMetricData` takes up to 1000 datums per request (and 1 MB; ours are ~100 bytes each).
pub const MAX_DATUMS_PER_REQUEST: usize = 1000;

/// Dimension naming the pool.
pub const POOL_DIMENSION: &str = "Pool";
/// Dimension naming the pool's namespace.
pub const NAMESPACE_DIMENSION: &str = "Namespace";

/// Metric names, as published.
pub mod metric {
    pub const MISS_RATE: &str = "MissRate";
    pub const HIT_RATE: &str = "HitRate";
    pub const NODES: &str = "Nodes";
    pub const ITEMS: &str = "Items";
    pub const BYTES: &str = "Bytes";
    pub const REQUESTS: &str = "Requests";
    pub const HITS: &str = "Hits";
    pub const MISSES: &str = "Misses";
}

/// How the CloudWatch client reaches AWS and how it times its windows.
#[derive(Clone)]
pub struct CloudWatchOptions {
    /// Endpoint (moto in tests, a VPC endpoint); `None`: AWS's own.
    pub endpoint: Option<String>,
    /// Region; `None`: the default chain's (`AWS_REGION`, the profile, IMDS).
    pub region: Option<String>,
    /// Credentials; `None`: the default chain.
    pub credentials: Option<SharedCredentialsProvider>,
    /// Counts and times every call (share it with the operator: `Config::aws_calls`).
    pub calls: AwsCalls,
    /// Extra SDK interceptors (tests count or disturb calls).
    pub interceptors: Vec<SharedInterceptor>,
    /// The period windows are read at and aligned to: 60 s (CloudWatch's standard resolution,
    /// and the sink's minutes). Shorter periods (1, 5, 10, 30 s) only make sense for
    /// high-resolution data that something else publishes.
    pub period: Duration,
    /// How long after a period closes its data is trusted to be in CloudWatch: the sink's own
    /// delay (a minute is published at the first sampling round after it closed) plus
    /// CloudWatch's ingestion, which AWS puts at "typically under a minute" and sometimes two.
    pub settle: Duration,
    /// Datums kept for sending (queued or waiting for a retry); beyond it the oldest are
    /// dropped, counted and logged.
    pub max_pending: usize,
    /// The SDK's retry of one `PutMetricData` or `GetMetricData` (default
    /// [`crate::aws::retry_config`]: standard, 5 attempts).
    pub retry: RetryConfig,
    /// The sink's pause after a `PutMetricData` the SDK gave up on, before it tries again;
    /// doubled after each further failure.
    pub retry_pause: Duration,
    /// The longest such pause.
    pub longest_retry_pause: Duration,
}

impl Default for CloudWatchOptions {
    fn default() -> CloudWatchOptions {
        CloudWatchOptions {
            endpoint: None,
            region: None,
            credentials: None,
            calls: AwsCalls::new(),
            interceptors: Vec::new(),
            period: Duration::from_secs(60),
            settle: Duration::from_secs(120),
            // A day of minutes for about three pools.
            max_pending: 10_000,
            retry: crate::aws::retry_config(),
            retry_pause: Duration::from_secs(5),
            longest_retry_pause: Duration::from_secs(300),
        }
    }
}

impl fmt::Debug for CloudWatchOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudWatchOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<provider>"),
            )
            .field("interceptors", &self.interceptors.len())
            .field("period", &self.period)
            .field("settle", &self.settle)
            .field("max_pending", &self.max_pending)
            .field("retry", &self.retry)
            .field("retry_pause", &self.retry_pause)
            .field("longest_retry_pause", &self.longest_retry_pause)
            .finish_non_exhaustive()
    }
}

/// What the sink and its sending task share: the bounded buffer of datums and the flushes
/// waiting for them. `publish` only appends under a lock held for microseconds, so a round is
/// never held up by CloudWatch; the bound is enforced where datums are added, so no state of
/// the sending task (an attempt in flight, a pause before the next) lets it grow.
struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the sending task (a permit is kept if it is busy, so no wake-up is lost).
    wake: Notify,
    max_pending: usize,
    calls: AwsCalls,
}

#[derive(Default)]
struct Queue {
    /// Oldest first: the namespace and the datum.
    datums: VecDeque<(String, MetricDatum)>,
    /// Answered once everything queued before them was sent (`Ok`) or failed (`Err`).
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// The sink is gone: one last attempt, then the task ends.
    closed: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the oldest datums beyond the bound, counted; publishes the backlog.
    fn bound(&self, queue: &mut Queue) {
        let excess = queue.datums.len().saturating_sub(self.max_pending);
        if excess > 0 {
            queue.datums.drain(..excess);
            self.calls.datums_dropped(DROPPED_OVERFLOW, excess);
            warn!(
                dropped = excess,
                bound = self.max_pending,
                "CloudWatch datums dropped, the oldest first: more wait than the bound"
            );
        }
        self.calls.set_datums_pending(queue.datums.len());
    }
}

/// CloudWatch sink and source (see the module documentation). Dropping it (and every clone of
/// the `Arc` the operator holds) ends its sending task after one last attempt.
pub struct CloudWatch {
    client: aws_sdk_cloudwatch::Client,
    options: CloudWatchOptions,
    /// Why nothing can be published or read (no credentials or region), if so.
    unavailable: Option<String>,
    outbox: Arc<Outbox>,
}

impl Drop for CloudWatch {
    fn drop(&mut self) {
        self.outbox.lock().closed = true;
        self.outbox.wake.notify_one();
    }
}

impl fmt::Debug for CloudWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudWatch")
            .field("options", &self.options)
            .field("unavailable", &self.unavailable)
            .finish_non_exhaustive()
    }
}

impl CloudWatch {
    /// Loads the AWS configuration, checks that it can sign requests (no call is made) and
    /// starts the sending task. Must run inside a Tokio runtime.
    pub async fn new(options: CloudWatchOptions) -> Arc<CloudWatch> {
        let base =
            crate::aws::sdk_config(options.credentials.clone(), options.region.clone()).await;
        let mut unavailable = crate::aws::credentials_problem(&base).await;
        if unavailable.is_none() && base.region().is_none() {
            unavailable = Some(
                "no AWS region for CloudWatch: set --aws-region (AWS_REGION) or a profile's region"
                    .to_owned(),
            );
        }
        if let Some(why) = &unavailable {
            warn!(reason = %why, "CloudWatch cannot be used");
        }
        let mut config = aws_sdk_cloudwatch::config::Builder::from(&base);
        if base.region().is_none() {
            // Never used (the client is unavailable), but the builder wants one.
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint.clone());
        }
        config = config.retry_config(options.retry.clone());
        for interceptor in &options.interceptors {
            config.push_interceptor(interceptor.clone());
        }
        let client = aws_sdk_cloudwatch::Client::from_conf(config.build());
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            max_pending: options.max_pending.max(1),
            calls: options.calls.clone(),
        });
        tokio::spawn(send_datums(
            client.clone(),
            outbox.clone(),
            Backoff {
                first: options.retry_pause,
                longest: options.longest_retry_pause.max(options.retry_pause),
            },
        ));
        Arc::new(CloudWatch {
            client,
            options,
            unavailable,
            outbox,
        })
    }

    /// Why CloudWatch cannot be used, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Waits until every datum queued so far was sent, or the attempt to send it failed (at
    /// once while the sink pauses before a retry).
    pub async fn flush(&self) -> Result<(), Error> {
        let (answer, answered) = oneshot::channel();
        self.outbox.lock().waiters.push(answer);
        self.outbox.wake.notify_one();
        answered
            .await
            .map_err(|_| error("the sending task has stopped".to_owned()))?
            .map_err(error)
    }

    /// The client's calls, as counted.
    pub fn calls(&self) -> &AwsCalls {
        &self.options.calls
    }
}

fn error(message: String) -> Error {
    Error {
        system: SYSTEM,
        message,
    }
}

/// The dimensions every metric of `pool` carries.
pub fn dimensions(pool: &PoolRef) -> Vec<Dimension> {
    vec![
        Dimension::builder()
            .name(POOL_DIMENSION)
            .value(&pool.name)
            .build(),
        Dimension::builder()
            .name(NAMESPACE_DIMENSION)
            .value(&pool.namespace)
            .build(),
    ]
}

/// The datums of `minutes` of `pool`: eight per minute (six without gets), timestamped at the
/// minute's start, standard resolution.
pub fn datums(pool: &PoolRef, minutes: &[ClosedMinute]) -> Vec<MetricDatum> {
    let dimensions = dimensions(pool);
    let mut datums = Vec::with_capacity(minutes.len() * 8);
    for minute in minutes {
        let p = &minute.point;
        let at = DateTime::from_secs(p.t.as_second());
        let mut push = |name: &str, value: f64, unit: StandardUnit| {
            datums.push(
                MetricDatum::builder()
                    .metric_name(name)
                    .set_dimensions(Some(dimensions.clone()))
                    .timestamp(at)
                    .value(value)
                    .unit(unit)
                    .storage_resolution(60)
                    .build(),
            );
        };
        if let Some(rate) = p.miss_rate {
            push(metric::MISS_RATE, rate, StandardUnit::None);
        }
        if let Some(rate) = p.hit_rate {
            push(metric::HIT_RATE, rate, StandardUnit::None);
        }
        push(metric::NODES, f64::from(p.nodes), StandardUnit::Count);
        push(metric::ITEMS, p.items as f64, StandardUnit::Count);
        push(metric::BYTES, p.bytes as f64, StandardUnit::Bytes);
        push(metric::REQUESTS, p.requests_per_minute, StandardUnit::Count);
        push(metric::HITS, minute.hits as f64, StandardUnit::Count);
        push(metric::MISSES, minute.misses as f64, StandardUnit::Count);
    }
    datums
}

impl TrafficSink for CloudWatch {
    fn publish<'a>(
        &'a self,
        pool: &'a PoolRef,
        spec: &'a MetricsSpec,
        minutes: &'a [ClosedMinute],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if !spec.cloudwatch.publish || minutes.is_empty() {
                return Ok(());
            }
            if let Some(why) = &self.unavailable {
                return Err(error(format!("not published: {why}")));
            }
            let datums = datums(pool, minutes);
            let namespace = &spec.cloudwatch.namespace;
            {
                let mut queue = self.outbox.lock();
                queue
                    .datums
                    .extend(datums.into_iter().map(|d| (namespace.clone(), d)));
                self.outbox.bound(&mut queue);
            }
            self.outbox.wake.notify_one();
            Ok(())
        })
    }
}

impl TrafficSource for CloudWatch {
    fn window<'a>(
        &'a self,
        pool: &'a PoolRef,
        spec: &'a MetricsSpec,
        end: SystemTime,
        length: Duration,
    ) -> BoxFuture<'a, Result<Option<WindowTotals>, Error>> {
        Box::pin(async move {
            if let Some(why) = &self.unavailable {
                return Err(error(why.clone()));
            }
            self.read_window(pool, &spec.cloudwatch.namespace, end, length)
                .await
        })
    }

    fn span(&self, now: SystemTime, length: Duration) -> (SystemTime, SystemTime) {
        aligned_span(now, length, self.options.period, self.options.settle)
    }
}

/// The window a decision at `now` judges: `length` rounded up to whole periods (at least
/// one), ending at the last period boundary at or before `now - settle`.
pub fn aligned_span(
    now: SystemTime,
    length: Duration,
    period: Duration,
    settle: Duration,
) -> (SystemTime, SystemTime) {
    let period = period.as_secs().max(1);
    let periods = length.as_secs().div_ceil(period).max(1);
    let trusted = now
        .checked_sub(settle)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(trusted - trusted % period);
    let start = end
        .checked_sub(Duration::from_secs(periods * period))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    (start, end)
}

impl CloudWatch {
    /// Sums of `Hits`, `Misses` and `Requests` of `pool` over `[end - length, end)`.
    async fn read_window(
        &self,
        pool: &PoolRef,
        namespace: &str,
        end: SystemTime,
        length: Duration,
    ) -> Result<Option<WindowTotals>, Error> {
        let period = i32::try_from(self.options.period.as_secs().max(1)).unwrap_or(60);
        let start = end.checked_sub(length).unwrap_or(SystemTime::UNIX_EPOCH);
        let query = |id: &str, name: &str| {
            MetricDataQuery::builder()
                .id(id)
                .metric_stat(
                    MetricStat::builder()
                        .metric(
                            Metric::builder()
                                .namespace(namespace)
                                .metric_name(name)
                                .set_dimensions(Some(dimensions(pool)))
                                .build(),
                        )
                        .period(period)
                        .stat("Sum")
                        .build(),
                )
                .return_data(true)
                .build()
        };
        let queries = vec![
            query("hits", metric::HITS),
            query("misses", metric::MISSES),
            query("requests", metric::REQUESTS),
        ];
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut periods_seen = std::collections::BTreeSet::new();
        let mut next = None;
        loop {
            let page = crate::aws::observe(
                &self.options.calls,
                SYSTEM,
                "GetMetricData",
                self.client
                    .get_metric_data()
                    .set_metric_data_queries(Some(queries.clone()))
                    .start_time(DateTime::from(start))
                    .end_time(DateTime::from(end))
                    .scan_by(ScanBy::TimestampAscending)
                    .set_next_token(next)
                    .send(),
            )
            .await
            .map_err(|e| {
                error(format!(
                    "GetMetricData failed: {}",
                    describe(&e).unwrap_or_else(|| DisplayErrorContext(&e).to_string())
                ))
            })?;
            for result in page.metric_data_results() {
                let id = result.id().unwrap_or_default().to_owned();
                if id != "requests" {
                    periods_seen.extend(result.timestamps().iter().map(|t| t.secs()));
                }
                *sums.entry(id).or_default() += result.values().iter().sum::<f64>();
            }
            next = page.next_token().map(str::to_owned);
            if next.as_deref().is_none_or(str::is_empty) {
                break;
            }
        }
        let covered = Duration::from_secs(periods_seen.len() as u64 * period as u64).min(length);
        debug!(pool = %pool, periods = periods_seen.len(), ?sums, "CloudWatch window read");
        if periods_seen.is_empty() || covered * 2 <= length {
            return Ok(None);
        }
        let count = |id: &str| sums.get(id).copied().unwrap_or(0.0).round().max(0.0) as u64;
        let misses = count("misses");
        Ok(Some(WindowTotals {
            gets: count("hits").saturating_add(misses),
            misses,
            requests: count("requests"),
            evictions: 0,
            covered,
        }))
    }
}

/// `CODE: message` of an AWS error, if it has a code.
fn describe<E: ProvideErrorMetadata>(e: &E) -> Option<String> {
    e.code()
        .map(|code| format!("{code}: {}", e.message().unwrap_or("(no message)")))
}

/// The sink's pause between `PutMetricData` calls the SDK gave up on.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    first: Duration,
    longest: Duration,
}

/// The sending task: sends whatever is queued, keeps what failed and can succeed later for an
/// attempt after a growing pause, and ends (after one last attempt) when the sink is dropped.
async fn send_datums(client: aws_sdk_cloudwatch::Client, outbox: Arc<Outbox>, backoff: Backoff) {
    let mut pause = Duration::ZERO;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        // Wait for datums, a flush or the end; while pausing before a retry, flushes are
        // answered at once and datums wait.
        let (taken, waiters, closed) = loop {
            let waiting = retry_at.filter(|at| tokio::time::Instant::now() < *at);
            {
                let mut queue = outbox.lock();
                if waiting.is_some() && !queue.closed {
                    let why = format!("{} datums wait for a retry", queue.datums.len());
                    for waiter in queue.waiters.drain(..) {
                        let _ = waiter.send(Err(why.clone()));
                    }
                } else if !queue.datums.is_empty() || !queue.waiters.is_empty() || queue.closed {
                    let taken: Vec<(String, MetricDatum)> = queue.datums.drain(..).collect();
                    break (taken, std::mem::take(&mut queue.waiters), queue.closed);
                }
            }
            match waiting {
                Some(at) => tokio::select! {
                    () = outbox.wake.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                },
                None => outbox.wake.notified().await,
            }
        };
        let sent = put_all(&client, &outbox.calls, taken).await;
        if sent.refused > 0 {
            outbox.calls.datums_dropped(DROPPED_REFUSED, sent.refused);
        }
        {
            // What is kept is older than anything queued meanwhile: it goes first.
            let mut queue = outbox.lock();
            let kept = !sent.kept.is_empty();
            for datum in sent.kept.into_iter().rev() {
                queue.datums.push_front(datum);
            }
            outbox.bound(&mut queue);
            if kept {
                pause = (pause * 2).clamp(backoff.first, backoff.longest);
                retry_at = Some(tokio::time::Instant::now() + pause);
            } else {
                pause = Duration::ZERO;
                retry_at = None;
            }
            if let Some(why) = &sent.error {
                warn!(error = %why, pending = queue.datums.len(), refused = sent.refused,
                      retry_in = ?retry_at.map(|_| pause),
                      "publishing metrics to CloudWatch failed");
            }
        }
        let outcome = sent.error.map_or(Ok(()), Err);
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
        if closed {
            return;
        }
    }
}

/// What one sending attempt did with the datums it took.
struct Sent {
    /// Not sent, or failed in a way a later attempt can fix: in their original order.
    kept: Vec<(String, MetricDatum)>,
    /// Datums CloudWatch refused with an error no retry fixes.
    refused: usize,
    /// The first failure, if any.
    error: Option<String>,
}

/// Sends `datums`, grouped by metric namespace, [`MAX_DATUMS_PER_REQUEST`] per request. A
/// request the SDK gave up on with a retryable error ends the attempt: it and every datum not
/// yet sent are kept. A request refused for good drops its datums (counted by the caller) and
/// the others go on (an IAM condition may refuse one namespace only).
async fn put_all(
    client: &aws_sdk_cloudwatch::Client,
    calls: &AwsCalls,
    datums: Vec<(String, MetricDatum)>,
) -> Sent {
    let mut by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (namespace, _)) in datums.iter().enumerate() {
        by_namespace.entry(namespace).or_default().push(i);
    }
    let mut done = vec![false; datums.len()];
    let mut refused = 0;
    let mut first_error = None;
    'sending: for (namespace, indices) in &by_namespace {
        for batch in indices.chunks(MAX_DATUMS_PER_REQUEST) {
            let sent = crate::aws::observe(
                calls,
                SYSTEM,
                "PutMetricData",
                client
                    .put_metric_data()
                    .namespace(*namespace)
                    .set_metric_data(Some(batch.iter().map(|&i| datums[i].1.clone()).collect()))
                    .send(),
            )
            .await;
            match sent {
                Ok(_) => batch.iter().for_each(|&i| done[i] = true),
                Err(e) => {
                    let why = format!(
                        "PutMetricData ({namespace}, {} datums): {}",
                        batch.len(),
                        describe(&e).unwrap_or_else(|| DisplayErrorContext(&e).to_string())
                    );
                    first_error.get_or_insert(why.clone());
                    if crate::aws::retryable(&e) {
                        break 'sending;
                    }
                    warn!(error = %why, "CloudWatch refused the datums for good; they are dropped");
                    refused += batch.len();
                    batch.iter().for_each(|&i| done[i] = true);
                }
            }
        }
    }
    let kept = datums
        .into_iter()
        .zip(done)
        .filter_map(|(datum, done)| (!done).then_some(datum))
        .collect();
    Sent {
        kept,
        refused,
        error: first_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn windows_end_at_the_last_whole_period_before_the_settle_time() {
        let minute = Duration::from_secs(60);
        // 10:05:30 with two minutes to settle: data up to 10:03:00 is trusted.
        let now = at(36_000 + 5 * 60 + 30);
        let (start, end) = aligned_span(now, minute, minute, 2 * minute);
        assert_eq!(end, at(36_000 + 3 * 60));
        assert_eq!(start, at(36_000 + 2 * 60));
        // 90 s rounds up to two whole minutes.
        let (start, end) = aligned_span(now, Duration::from_secs(90), minute, 2 * minute);
        assert_eq!(end.duration_since(start).ok(), Some(2 * minute));
        // A zero-length window still reads one period.
        let (start, end) = aligned_span(now, Duration::ZERO, minute, Duration::ZERO);
        assert_eq!((start, end), (at(36_000 + 4 * 60), at(36_000 + 5 * 60)));
    }

    #[test]
    fn a_minute_becomes_eight_datums_with_units_and_the_pools_dimensions() {
        let pool = PoolRef {
            namespace: "prod".to_owned(),
            name: "images".to_owned(),
        };
        // 1_800_000_000 is a minute boundary (30,000,000 minutes).
        let minute = ClosedMinute {
            point: crate::history::Point {
                t: k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
                nodes: 3,
                miss_rate: Some(0.25),
                hit_rate: Some(0.75),
                items: 10,
                bytes: 2048,
                requests_per_minute: 600.0,
            },
            hits: 300,
            misses: 100,
            requests: 600,
            covered: Duration::from_secs(60),
        };
        let made = datums(&pool, std::slice::from_ref(&minute));
        let by_name: BTreeMap<&str, &MetricDatum> = made
            .iter()
            .map(|d| (d.metric_name().unwrap_or_default(), d))
            .collect();
        assert_eq!(by_name.len(), 8);
        assert_eq!(by_name["MissRate"].value(), Some(0.25));
        assert_eq!(by_name["Bytes"].unit(), Some(&StandardUnit::Bytes));
        assert_eq!(by_name["Misses"].value(), Some(100.0));
        assert_eq!(by_name["Requests"].unit(), Some(&StandardUnit::Count));
        for d in &made {
            let dims: Vec<(&str, &str)> = d
                .dimensions()
                .iter()
                .map(|d| (d.name().unwrap_or_default(), d.value().unwrap_or_default()))
                .collect();
            assert_eq!(dims, [("Pool", "images"), ("Namespace", "prod")]);
            assert_eq!(
                d.timestamp().map(DateTime::secs),
                Some(minute.point.t.as_second())
            );
        }
        // A minute without gets has no rates.
        let quiet = ClosedMinute {
            point: crate::history::Point {
                miss_rate: None,
                hit_rate: None,
                ..minute.point.clone()
            },
            hits: 0,
            misses: 0,
            ..minute
        };
        assert_eq!(datums(&pool, &[quiet]).len(), 6);
    }
}
