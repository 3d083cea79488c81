//! CloudWatch as the operator's metrics sink and the autoscaler's source, against moto.
//!
//! - The sink: a pool's closed minutes, published with `PutMetricData`, read back from moto
//!   with `GetMetricData` equal the history's points, metric by metric, with the units and
//!   dimensions of the docs; the source sums what the sink wrote.
//! - The source: the real operator (in-process, nodes embedded) runs an `auto` pool on
//!   `metrics.source: cloudwatch` while the test replays a miss-rate series into moto with
//!   timestamped `PutMetricData` — each second's hits and misses depend on the pool's size at
//!   that second, as a cache's would. The pool grows once when the load does not fit, stays
//!   put, shrinks once when the load falls, and stays put again: no flapping. The series is
//!   written at one-second resolution so the test takes seconds per window, not minutes; the
//!   source is the production code with a one-second period and a two-second settle delay.
//! - The operator's `/metrics` shows the CloudWatch calls by API and outcome, with latency.
//! - Failures: a loopback proxy in front of moto answers `PutMetricData` from a script
//!   (throttling, 5xx, a request held open, `AccessDenied`, `InvalidParameterValue`) and
//!   forwards the rest. Retryable failures lose nothing and are retried with back-off (every
//!   attempt counted), `publish` returns while a request hangs, refusals are dropped at once
//!   and counted, and a full buffer drops its oldest datums, counted.
//!
//! Each test starts its own moto on a free loopback port and stops it when it ends; the
//! operator and every embedded node are stopped before the test returns.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{
    Metric, MetricDataQuery, MetricDatum, MetricStat, ScanBy, StandardUnit,
};
use cachepool_crds::pool::{CachePool, MetricsSpec};
use cachepool_operator::aws::SharedCredentialsProvider;
use cachepool_operator::cloudwatch::{self, CloudWatch, CloudWatchOptions, metric};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::history::{ClosedMinute, NodeSample, PoolHistory};
use cachepool_operator::metrics::{
    AWS_OK, AwsCalls, DROPPED_OVERFLOW, DROPPED_REFUSED, OperatorMetrics,
};
use cachepool_operator::provider::PoolRef;
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_operator::traffic::{TrafficSink as _, TrafficSource as _};
use cachepool_test_support::servers::{Moto, TempDir};

const REGION: &str = "us-east-1";
const NAMESPACE: &str = "CachepoolTest";
const TOKEN: &str = "cloudwatch-test-token";
const POLL: Duration = Duration::from_millis(50);
const MINUTE: Duration = Duration::from_secs(60);
/// How long a one-node pool of embedded nodes may take to publish its first ring.
const RING_TIMEOUT: Duration = Duration::from_secs(30);

fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
        "testing", "testing", None, None, "test",
    ))
}

/// The test's own CloudWatch client (not the operator's).
async fn client(moto: &Moto) -> aws_sdk_cloudwatch::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .credentials_provider(credentials())
        .endpoint_url(moto.endpoint())
        .load()
        .await;
    aws_sdk_cloudwatch::Client::new(&shared)
}

fn options(moto: &Moto, calls: &AwsCalls) -> CloudWatchOptions {
    CloudWatchOptions {
        endpoint: Some(moto.endpoint().to_owned()),
        region: Some(REGION.to_owned()),
        credentials: Some(credentials()),
        calls: calls.clone(),
        ..CloudWatchOptions::default()
    }
}

fn publishing(namespace: &str, publish: bool) -> MetricsSpec {
    let mut spec = MetricsSpec::default();
    spec.cloudwatch.namespace = namespace.to_owned();
    spec.cloudwatch.publish = publish;
    spec
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Every datapoint of `name` for `pool` in `[from, to)` at `period`, with `stat`.
async fn read(
    cw: &aws_sdk_cloudwatch::Client,
    pool: &PoolRef,
    name: &str,
    stat: &str,
    period: i32,
    (from, to): (SystemTime, SystemTime),
) -> BTreeMap<i64, f64> {
    let mut points = BTreeMap::new();
    let mut next = None;
    loop {
        let page = cw
            .get_metric_data()
            .metric_data_queries(
                MetricDataQuery::builder()
                    .id("q")
                    .metric_stat(
                        MetricStat::builder()
                            .metric(
                                Metric::builder()
                                    .namespace(NAMESPACE)
                                    .metric_name(name)
                                    .set_dimensions(Some(cloudwatch::dimensions(pool)))
                                    .build(),
                            )
                            .period(period)
                            .stat(stat)
                            .build(),
                    )
                    .build(),
            )
            .start_time(DateTime::from(from))
            .end_time(DateTime::from(to))
            .scan_by(ScanBy::TimestampAscending)
            .set_next_token(next)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GetMetricData {name}: {e:?}"));
        for result in page.metric_data_results() {
            for (t, v) in result.timestamps().iter().zip(result.values()) {
                points.insert(t.secs(), *v);
            }
        }
        next = page.next_token().map(str::to_owned);
        if next.as_deref().is_none_or(str::is_empty) {
            return points;
        }
    }
}

/// A pool history of `minutes` whole minutes ending at `end` (a minute boundary): one node
/// sampled every 10 s, its miss rate changing from minute to minute, and one minute without
/// gets (no rates).
fn history(end: SystemTime, minutes: u64) -> PoolHistory {
    let mut history = PoolHistory::new(Duration::from_secs(24 * 3600));
    let start = end - MINUTE * u32::try_from(minutes).unwrap_or(u32::MAX);
    let mut sample = NodeSample {
        slot: 0,
        pid: 4242,
        uptime: 3600,
        get_hits: 0,
        get_misses: 0,
        requests: 0,
        items: 0,
        bytes: 0,
        evictions: 0,
        limit_bytes: 64 << 20,
    };
    // A baseline at the start, then a round every 10 s whose end falls in each minute.
    history.record(start, 1, std::slice::from_ref(&sample));
    for step in 1..=minutes * 6 {
        // The minute the round's end falls in, which is the minute it counts in.
        let minute = (10 * step) / 60;
        let gets = if minute == 2 { 0 } else { 100 + 37 * minute };
        let misses = gets * ((minute * 13) % 10) / 10;
        sample.uptime += 10;
        sample.get_hits += gets - misses;
        sample.get_misses += misses;
        sample.requests += gets + 20;
        sample.items = 1000 + 10 * step;
        sample.bytes = sample.items * 150;
        let nodes = 1 + u32::try_from(minute % 3).unwrap_or(0);
        history.record(
            start + Duration::from_secs(10 * step),
            nodes,
            std::slice::from_ref(&sample),
        );
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_minutes_read_back_from_moto_equal_the_history_and_the_source_sums_them() {
    let moto = Moto::start();
    let cw = client(&moto).await;
    let calls = AwsCalls::new();
    let sink = CloudWatch::new(options(&moto, &calls)).await;
    assert_eq!(sink.unavailable(), None);
    let pool = PoolRef::new("prod", "images");

    let now = unix(SystemTime::now());
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(now - now % 60 - 600);
    // 130 minutes: 1034 datums, more than one PutMetricData takes.
    let minutes = 130;
    let history = history(end, minutes);
    let start = end - MINUTE * 130;
    let closed: Vec<ClosedMinute> = history.closed_minutes(start, end);
    assert_eq!(closed.len(), 130);

    // A pool that does not ask to publish sends nothing.
    sink.publish(&pool, &publishing(NAMESPACE, false), &closed)
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    sink.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(calls.by_api("cloudwatch").get("PutMetricData"), None);

    // `publish` only queues: it returns before any request is made.
    let queued = Instant::now();
    sink.publish(&pool, &publishing(NAMESPACE, true), &closed)
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let queueing = queued.elapsed();
    sink.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
    let puts = calls.count("cloudwatch", "PutMetricData", AWS_OK);
    let datums = cloudwatch::datums(&pool, &closed).len();
    println!(
        "{} minutes, {datums} datums: {puts} PutMetricData calls; publish returned in {queueing:?}",
        closed.len()
    );
    assert_eq!(datums, 130 * 8 - 2, "one minute has no gets, so no rates");
    assert_eq!(
        puts,
        datums.div_ceil(cloudwatch::MAX_DATUMS_PER_REQUEST) as u64
    );

    // Every metric of every minute reads back as the history has it. One datum per minute,
    // so the minute's Average is the value published.
    let span = (start, end);
    type Field = fn(&ClosedMinute) -> Option<f64>;
    let fields: [(&str, Field); 8] = [
        (metric::MISS_RATE, |m| m.point.miss_rate),
        (metric::HIT_RATE, |m| m.point.hit_rate),
        (metric::NODES, |m| Some(f64::from(m.point.nodes))),
        (metric::ITEMS, |m| Some(m.point.items as f64)),
        (metric::BYTES, |m| Some(m.point.bytes as f64)),
        (metric::REQUESTS, |m| Some(m.point.requests_per_minute)),
        (metric::HITS, |m| Some(m.hits as f64)),
        (metric::MISSES, |m| Some(m.misses as f64)),
    ];
    for (name, field) in fields {
        let got = read(&cw, &pool, name, "Average", 60, span).await;
        let want: BTreeMap<i64, f64> = closed
            .iter()
            .filter_map(|m| Some((m.point.t.as_second(), field(m)?)))
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: the minutes published"
        );
        for (t, v) in &want {
            assert!(
                (got[t] - v).abs() <= 1e-9 * v.abs().max(1.0),
                "{name} at {t}: CloudWatch has {}, the history {v}",
                got[t]
            );
        }
    }

    // Units and dimensions as the docs say: what moto stored for the pool's metrics.
    let listed = cw
        .list_metrics()
        .namespace(NAMESPACE)
        .send()
        .await
        .unwrap_or_else(|e| panic!("ListMetrics: {e:?}"));
    let mut names: Vec<&str> = listed
        .metrics()
        .iter()
        .filter_map(|m| m.metric_name())
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "Bytes", "HitRate", "Hits", "Items", "MissRate", "Misses", "Nodes", "Requests"
        ]
    );
    for m in listed.metrics() {
        let dims: BTreeMap<&str, &str> = m
            .dimensions()
            .iter()
            .map(|d| (d.name().unwrap_or_default(), d.value().unwrap_or_default()))
            .collect();
        assert_eq!(
            dims,
            BTreeMap::from([("Namespace", "prod"), ("Pool", "images")])
        );
    }
    let units: BTreeMap<String, StandardUnit> = cloudwatch::datums(&pool, &closed[..1])
        .iter()
        .map(|d: &MetricDatum| {
            (
                d.metric_name().unwrap_or_default().to_owned(),
                d.unit().cloned().unwrap_or(StandardUnit::None),
            )
        })
        .collect();
    assert_eq!(units["Bytes"], StandardUnit::Bytes);
    assert_eq!(units["MissRate"], StandardUnit::None);
    for counted in ["Nodes", "Items", "Requests", "Hits", "Misses"] {
        assert_eq!(units[counted], StandardUnit::Count, "{counted}");
    }

    // The source reads back what the sink wrote: over the last 30 minutes, the hits and misses
    // the history counted, in one GetMetricData call.
    let length = Duration::from_secs(30 * 60);
    let window_start = end - length;
    let last: Vec<&ClosedMinute> = closed
        .iter()
        .filter(|m| m.point.t.as_second() >= i64::try_from(unix(window_start)).unwrap_or(0))
        .collect();
    assert_eq!(last.len(), 30);
    let before = calls.count("cloudwatch", "GetMetricData", AWS_OK);
    let totals = sink
        .window(&pool, &publishing(NAMESPACE, true), end, length)
        .await
        .unwrap_or_else(|e| panic!("window: {e}"))
        .unwrap_or_else(|| panic!("the window has data"));
    assert_eq!(
        calls.count("cloudwatch", "GetMetricData", AWS_OK) - before,
        1,
        "one GetMetricData call per window"
    );
    let misses: u64 = last.iter().map(|m| m.misses).sum();
    let gets: u64 = last.iter().map(|m| m.hits + m.misses).sum();
    assert_eq!((totals.gets, totals.misses), (gets, misses));
    assert_eq!(totals.covered, length);
    // A window CloudWatch has no data for is no window; nor is one with data for half of it.
    let empty = sink
        .window(&pool, &publishing(NAMESPACE, true), start, length)
        .await
        .unwrap_or_else(|e| panic!("window: {e}"));
    assert_eq!(empty, None);
    let half = sink
        .window(
            &pool,
            &publishing(NAMESPACE, true),
            start + MINUTE * 2,
            Duration::from_secs(4 * 60),
        )
        .await
        .unwrap_or_else(|e| panic!("window: {e}"));
    assert_eq!(
        half, None,
        "two minutes of data do not make a four-minute window"
    );
    drop(moto);
}

/// An auto pool whose windows come from CloudWatch: 3-second windows, a 3-second cooldown.
const AUTO_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: replay}
spec:
  cache: {capacityMiB: 8, maxItemSizeKiB: 512}
  scaling:
    mode: auto
    minReplicas: 1
    maxReplicas: 4
    auto:
      maxMissRate: 0.4
      minMissRate: 0.1
      expandRatio: 2.0
      shrinkRatio: 0.5
      windowSeconds: 3
      cooldownSeconds: 3
      minRequestsPerWindow: 100
  provider: {process: {}}
  metrics:
    source: cloudwatch
    cloudwatch: {namespace: CachepoolTest}
";

/// The replayed load: gets per second, and the miss rate at each pool size.
#[derive(Clone, Copy, Debug)]
struct Load {
    gets_per_second: u64,
    miss_rate: fn(u32) -> f64,
}

/// Too big for one node, fits two: 60 % misses on one node, 25 % on two, 15 % beyond.
const BUSY: Load = Load {
    gets_per_second: 1000,
    miss_rate: |nodes| match nodes {
        0 | 1 => 0.6,
        2 => 0.25,
        _ => 0.15,
    },
};

/// A fifth of the traffic, which one node holds: 5 % misses at any size.
const QUIET: Load = Load {
    gets_per_second: 200,
    miss_rate: |_| 0.05,
};

/// Writes, for every second that closes, the hits and misses the current load has at the
/// pool's size during that second, timestamped with the second (high resolution). Stops when
/// `stop` is set.
async fn replay(
    cw: aws_sdk_cloudwatch::Client,
    pool: PoolRef,
    size: Arc<AtomicU32>,
    load: Arc<Mutex<Load>>,
    written: Arc<AtomicUsize>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = unix(SystemTime::now());
    loop {
        let now = unix(SystemTime::now());
        while next < now {
            let load = *load.lock().unwrap_or_else(PoisonError::into_inner);
            let gets = load.gets_per_second;
            let misses = (gets as f64 * (load.miss_rate)(size.load(Ordering::SeqCst))).round();
            let at = DateTime::from_secs(i64::try_from(next).unwrap_or(i64::MAX));
            let datum = |name: &str, value: f64| {
                MetricDatum::builder()
                    .metric_name(name)
                    .set_dimensions(Some(cloudwatch::dimensions(&pool)))
                    .timestamp(at)
                    .value(value)
                    .unit(StandardUnit::Count)
                    .storage_resolution(1)
                    .build()
            };
            cw.put_metric_data()
                .namespace(NAMESPACE)
                .metric_data(datum(metric::HITS, gets as f64 - misses))
                .metric_data(datum(metric::MISSES, misses))
                .metric_data(datum(metric::REQUESTS, gets as f64))
                .send()
                .await
                .unwrap_or_else(|e| panic!("seeding PutMetricData: {e:?}"));
            written.fetch_add(1, Ordering::SeqCst);
            next += 1;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The value of the series `series` (name and labels, as exposed) in an OpenMetrics text.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn ring_size(operator: &Operator, pool: &PoolRef) -> Option<u32> {
    let handle = operator.registry().get(pool)?;
    let ring = handle.ring().borrow().clone()?;
    Some(ring.current().len())
}

fn resource(operator: &Operator, pool: &PoolRef) -> Option<CachePool> {
    Some(operator.registry().get(pool)?.resource())
}

/// The sizes the ring went through, without repeats.
#[derive(Debug, Default)]
struct Sizes(Vec<u32>);

impl Sizes {
    fn see(&mut self, size: u32) {
        if self.0.last() != Some(&size) {
            self.0.push(size);
        }
    }
}

/// Follows the pool's ring: the sizes it went through, and how long each autoscaler decision
/// (a desired size different from the ring's) took to reach the ring: `None` when the ring
/// changed in the driver round that decided (the status showed the decision no earlier than
/// the ring), as a shrink's ring does.
struct Watcher<'a> {
    operator: &'a Operator,
    pool: &'a PoolRef,
    /// The size the replay writes for.
    size: &'a AtomicU32,
    sizes: Sizes,
    decided: Option<(Instant, u32)>,
    decision_to_ring: Vec<Option<Duration>>,
}

impl Watcher<'_> {
    /// Watches for `duration`, or until `done` holds for the ring's size.
    async fn watch(&mut self, duration: Duration, done: impl Fn(u32) -> bool) {
        let deadline = Instant::now() + duration;
        loop {
            if let Some(n) = ring_size(self.operator, self.pool) {
                self.size.store(n, Ordering::SeqCst);
                let changed = self.sizes.0.last().is_some_and(|&last| last != n);
                self.sizes.see(n);
                let desired = resource(self.operator, self.pool)
                    .and_then(|r| r.status)
                    .map_or(n, |s| s.desired_replicas);
                match self.decided {
                    Some((at, target)) if n == target => {
                        self.decision_to_ring.push(Some(at.elapsed()));
                        self.decided = None;
                    }
                    None if changed => self.decision_to_ring.push(None),
                    None if desired != n => self.decided = Some((Instant::now(), desired)),
                    _ => {}
                }
                if done(n) {
                    return;
                }
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_on_cloudwatch_grows_and_shrinks_on_a_replayed_series_without_flapping() {
    let moto = Moto::start();
    let cw = client(&moto).await;
    let dir = TempDir::new("cloudwatch-replay");
    dir.write("pool.yaml", AUTO_POOL);
    let pool = PoolRef::new("default", "replay");

    let nodes = Arc::new(EmbeddedProvider::new());
    let mut config = Config::standalone(
        dir.path(),
        NodeBackend::Embedded(nodes.clone()),
        "127.0.0.1:0",
        TOKEN,
    );
    config.driver = DriverOptions {
        probe_interval: Duration::from_millis(50),
        sample_interval: Duration::from_millis(100),
        ..DriverOptions::default()
    };
    config.standalone = StandaloneOptions {
        scan_interval: Duration::from_millis(50),
    };
    // One-second periods (the replay is high resolution) and two seconds for the replay's
    // writes to land: the production source with the test's time scale.
    let source = CloudWatch::new(CloudWatchOptions {
        period: Duration::from_secs(1),
        settle: Duration::from_secs(2),
        ..options(&moto, &config.aws_calls)
    })
    .await;
    config.traffic.cloudwatch = Some(source.clone());
    let calls = config.aws_calls.clone();
    let operator = Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"));

    let size = Arc::new(AtomicU32::new(1));
    let load = Arc::new(Mutex::new(BUSY));
    let written = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let replayer = tokio::spawn(replay(
        cw.clone(),
        pool.clone(),
        size.clone(),
        load.clone(),
        written.clone(),
        stopped,
    ));

    let started = Instant::now();
    let mut watcher = Watcher {
        operator: &operator,
        pool: &pool,
        size: &size,
        sizes: Sizes::default(),
        decided: None,
        decision_to_ring: Vec::new(),
    };
    // The busy load does not fit one node: one grow, to two.
    watcher.watch(Duration::from_secs(60), |n| n == 2).await;
    assert_eq!(
        watcher.sizes.0,
        [1, 2],
        "grown once, to two nodes, after {:?}",
        started.elapsed()
    );
    // At two nodes the miss rate is within the band: it stays (several windows and cooldowns).
    watcher.watch(Duration::from_secs(15), |_| false).await;
    assert_eq!(
        watcher.sizes.0,
        [1, 2],
        "no change while the load fits two nodes"
    );

    // The load falls well below the one that filled the pool: one shrink, to one node.
    *load.lock().unwrap_or_else(PoisonError::into_inner) = QUIET;
    watcher.watch(Duration::from_secs(60), |n| n == 1).await;
    assert_eq!(watcher.sizes.0, [1, 2, 1], "shrunk once, to one node");
    watcher.watch(Duration::from_secs(12), |_| false).await;
    assert_eq!(
        watcher.sizes.0,
        [1, 2, 1],
        "no flapping: one grow and one shrink"
    );
    let decision_to_ring = std::mem::take(&mut watcher.decision_to_ring);
    assert_eq!(decision_to_ring.len(), 2, "two decisions reached the ring");

    let elapsed = started.elapsed();
    let reads = calls
        .by_api("cloudwatch")
        .get("GetMetricData")
        .copied()
        .unwrap_or(0);
    let errors: u64 = calls.by_api("cloudwatch").values().sum::<u64>()
        - calls.count("cloudwatch", "GetMetricData", AWS_OK);
    println!(
        "replayed {} seconds over {elapsed:?}; GetMetricData calls: {reads} (one per 3 s \
         window: {} windows), failed calls: {errors}; decision to ring: {decision_to_ring:?}",
        written.load(Ordering::SeqCst),
        elapsed.as_secs() / 3
    );
    assert_eq!(errors, 0);
    // One call per decision window, give or take the windows at the edges.
    assert!(
        reads as f64 <= elapsed.as_secs_f64() / 3.0 + 2.0,
        "{reads} GetMetricData calls in {elapsed:?}"
    );

    // A call CloudWatch refuses is counted under its error code: an empty window (start =
    // end) is one GetMetricData refuses with ValidationError.
    let refused = source
        .window(
            &pool,
            &publishing(NAMESPACE, false),
            SystemTime::now(),
            Duration::ZERO,
        )
        .await;
    match refused {
        Err(e) => assert!(e.to_string().contains("ValidationError"), "{e}"),
        Ok(totals) => panic!("CloudWatch answered an empty window: {totals:?}"),
    }
    assert_eq!(
        calls.count("cloudwatch", "GetMetricData", "ValidationError"),
        1
    );

    // /metrics shows the calls by API and outcome, and their latency. The autoscaler goes on
    // reading while the page is fetched: its figures lie between the counts before and after.
    let ok_before = calls.count("cloudwatch", "GetMetricData", AWS_OK);
    let text = reqwest::get(format!("{}/metrics", operator.api_url()))
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("/metrics: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("/metrics body: {e}"));
    let ok_after = calls.count("cloudwatch", "GetMetricData", AWS_OK);
    let within = |value: Option<f64>, extra: u64| {
        value.is_some_and(|v| (ok_before + extra) as f64 <= v && v <= (ok_after + extra) as f64)
    };
    let ok_series = "cachepool_operator_aws_calls_total{service=\"cloudwatch\",api=\"GetMetricData\",outcome=\"ok\"}";
    assert!(
        within(metric_value(&text, ok_series), 0),
        "{ok_series} not within {ok_before}..={ok_after} in\n{text}"
    );
    let refused_series = "cachepool_operator_aws_calls_total{service=\"cloudwatch\",api=\"GetMetricData\",outcome=\"ValidationError\"}";
    assert_eq!(
        metric_value(&text, refused_series),
        Some(1.0),
        "{refused_series} in\n{text}"
    );
    let latency_series = "cachepool_operator_aws_call_duration_seconds_count{service=\"cloudwatch\",api=\"GetMetricData\"}";
    assert!(
        within(metric_value(&text, latency_series), 1),
        "{latency_series}: one latency per call, refused one included, in\n{text}"
    );
    // The autoscaler decided exactly twice: no decision was taken back before it reached
    // the ring.
    for direction in ["up", "down"] {
        let series = format!(
            "cachepool_operator_scale_events_total{{pool=\"{pool}\",direction=\"{direction}\"}}"
        );
        assert_eq!(
            metric_value(&text, &series),
            Some(1.0),
            "{series} in\n{text}"
        );
    }

    let _ = stop.send(true);
    replayer
        .await
        .unwrap_or_else(|e| panic!("the replay failed: {e}"));
    operator
        .stop()
        .await
        .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
    assert_eq!(nodes.running(), 0, "every embedded node is stopped");
    drop(moto);
}

/// A manual pool that publishes to CloudWatch.
const PUBLISHED_POOL: &str = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {name: published}
spec:
  cache: {capacityMiB: 8, maxItemSizeKiB: 512}
  scaling: {mode: manual, replicas: 1}
  provider: {process: {}}
  metrics:
    cloudwatch: {namespace: CachepoolTest, publish: true}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_publishes_each_closed_minute_of_a_pool_as_its_history_has_it() {
    let moto = Moto::start();
    let cw = client(&moto).await;
    let dir = TempDir::new("cloudwatch-published");
    dir.write("pool.yaml", PUBLISHED_POOL);
    let pool = PoolRef::new("default", "published");
    let nodes = Arc::new(EmbeddedProvider::new());
    let mut config = Config::standalone(
        dir.path(),
        NodeBackend::Embedded(nodes.clone()),
        "127.0.0.1:0",
        TOKEN,
    );
    config.driver = DriverOptions {
        probe_interval: Duration::from_millis(50),
        sample_interval: Duration::from_millis(200),
        ..DriverOptions::default()
    };
    config.standalone = StandaloneOptions {
        scan_interval: Duration::from_millis(50),
    };
    let sink = CloudWatch::new(options(&moto, &config.aws_calls)).await;
    config.traffic.sinks.push(sink.clone());
    let calls = config.aws_calls.clone();
    let operator = Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"));

    // Traffic until a minute has closed and been published: a few sets, hits and misses a
    // second, so the minute has every metric.
    let waiting = Instant::now();
    let ring = loop {
        if let Some(ring) = operator
            .registry()
            .get(&pool)
            .and_then(|h| h.ring().borrow().clone())
        {
            break ring;
        }
        assert!(
            waiting.elapsed() < RING_TIMEOUT,
            "no ring after {RING_TIMEOUT:?}: {:?}",
            resource(&operator, &pool).map(|r| r.status)
        );
        tokio::time::sleep(POLL).await;
    };
    let client =
        cache_node::client::PoolClient::new(ring, cache_node::client::ClientOptions::default())
            .unwrap_or_else(|e| panic!("pool client: {e}"));
    let started = Instant::now();
    let mut round = 0u64;
    while calls.count("cloudwatch", "PutMetricData", AWS_OK) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "no minute published after {:?}: {:?}",
            started.elapsed(),
            calls.by_api("cloudwatch")
        );
        round += 1;
        let key = format!("key-{}", round % 50);
        client
            .set(&key, b"value", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));
        for probe in [key.as_str(), "never-set"] {
            client
                .get(probe)
                .await
                .unwrap_or_else(|e| panic!("get: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent_after = started.elapsed();

    // What CloudWatch holds for the pool equals the operator's history of those minutes.
    let now = unix(SystemTime::now());
    let to = SystemTime::UNIX_EPOCH + Duration::from_secs(now - now % 60);
    let from = to - MINUTE * 5;
    let history = operator
        .registry()
        .get(&pool)
        .unwrap_or_else(|| panic!("no pool {pool}"))
        .history(from, to);
    let nodes_read = read(&cw, &pool, metric::NODES, "Average", 60, (from, to)).await;
    let miss_read = read(&cw, &pool, metric::MISS_RATE, "Average", 60, (from, to)).await;
    let requests_read = read(&cw, &pool, metric::REQUESTS, "Average", 60, (from, to)).await;
    println!(
        "first PutMetricData after {sent_after:?}; history {history:?}; CloudWatch nodes \
         {nodes_read:?}, miss rate {miss_read:?}, requests {requests_read:?}"
    );
    assert!(!nodes_read.is_empty(), "a minute was published");
    for (t, nodes) in &nodes_read {
        let point = history
            .iter()
            .find(|p| p.t.as_second() == *t)
            .unwrap_or_else(|| panic!("CloudWatch has minute {t}, the history does not"));
        assert_eq!(*nodes, f64::from(point.nodes));
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            (a, b) => a == b,
        };
        assert!(
            close(miss_read.get(t).copied(), point.miss_rate),
            "miss rate at {t}: {:?} vs {:?}",
            miss_read.get(t),
            point.miss_rate
        );
        let requests = requests_read[t];
        assert!(
            (requests - point.requests_per_minute).abs() < 1e-6,
            "requests at {t}: {requests} vs {}",
            point.requests_per_minute
        );
    }
    // One request per closed minute of the pool (eight datums each).
    let puts = calls.count("cloudwatch", "PutMetricData", AWS_OK);
    assert!((1..=2).contains(&puts), "{puts} PutMetricData calls");

    operator
        .stop()
        .await
        .unwrap_or_else(|e| panic!("stopping the operator: {e}"));
    assert_eq!(nodes.running(), 0, "every embedded node is stopped");
    drop(moto);
}

/// What the proxy does with one `PutMetricData` request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Answer with this HTTP status and AWS error code (the Query protocol's error document),
    /// without forwarding.
    Fail(u16, &'static str),
    /// Hold the request until the test releases it, then answer like `Fail`.
    Hold(u16, &'static str),
}

/// One `PutMetricData` request as the proxy saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    datums: usize,
    /// The status answered.
    status: u16,
}

struct ProxyState {
    moto: String,
    http: reqwest::Client,
    /// Answers for the next `PutMetricData` requests, in order; when empty, forwarded.
    script: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<Seen>>,
    /// Whether a request is being held, and the test's release of it.
    holding: tokio::sync::watch::Sender<bool>,
    release: tokio::sync::Notify,
}

/// A loopback HTTP proxy in front of moto (see the module documentation). Every request but
/// the scripted `PutMetricData` ones is forwarded as it came (moto does not check signatures,
/// so the `Host` the SDK signed for the proxy does not matter).
struct Proxy {
    url: String,
    state: Arc<ProxyState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(moto: &Moto) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding the proxy: {e}"));
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .unwrap_or_else(|e| panic!("the proxy's address: {e}"))
        );
        let state = Arc::new(ProxyState {
            moto: moto.endpoint().trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            script: Mutex::new(VecDeque::new()),
            seen: Mutex::new(Vec::new()),
            holding: tokio::sync::watch::Sender::new(false),
            release: tokio::sync::Notify::new(),
        });
        let router = axum::Router::new()
            .fallback(proxy_request)
            .with_state(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap_or_else(|e| panic!("the proxy failed: {e}"));
        });
        Proxy {
            url,
            state,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(answers);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until a request is held.
    async fn until_holding(&self) {
        let mut holding = self.state.holding.subscribe();
        tokio::time::timeout(Duration::from_secs(30), holding.wait_for(|h| *h))
            .await
            .unwrap_or_else(|_| panic!("no PutMetricData reached the proxy to be held"))
            .unwrap_or_else(|e| panic!("the proxy is gone: {e}"));
    }

    fn holding(&self) -> bool {
        *self.state.holding.borrow()
    }

    fn release(&self) {
        self.state.release.notify_one();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .unwrap_or_else(|e| panic!("the proxy task: {e}"));
        }
    }
}

/// The error document of CloudWatch's Query protocol.
fn aws_error(status: u16, code: &str) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let body = format!(
        "<ErrorResponse xmlns=\"http://monitoring.amazonaws.com/doc/2010-08-01/\"><Error>\
         <Type>{kind}</Type><Code>{code}</Code><Message>injected by the test proxy</Message>\
         </Error><RequestId>proxy</RequestId></ErrorResponse>"
    );
    (
        axum::http::StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{status}: {e}")),
        [(axum::http::header::CONTENT_TYPE, "text/xml")],
        body,
    )
        .into_response()
}

async fn proxy_request(
    axum::extract::State(proxy): axum::extract::State<Arc<ProxyState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_else(|e| panic!("reading a request: {e}"));
    let form = String::from_utf8_lossy(&body);
    // Only PutMetricData is ever compressed (bodies over 10 KB; the test's stay below).
    let put = form.contains("Action=PutMetricData")
        || parts
            .headers
            .get(axum::http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() == b"gzip");
    let answer = if put {
        proxy
            .script
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    } else {
        None
    };
    let record = |status: u16| {
        if put {
            proxy
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Seen {
                    at: Instant::now(),
                    datums: form.matches(".MetricName=").count(),
                    status,
                });
        }
    };
    match answer {
        Some(Answer::Fail(status, code)) => {
            record(status);
            aws_error(status, code)
        }
        Some(Answer::Hold(status, code)) => {
            record(status);
            proxy.holding.send_replace(true);
            proxy.release.notified().await;
            proxy.holding.send_replace(false);
            aws_error(status, code)
        }
        None => {
            let url = format!(
                "{}{}",
                proxy.moto,
                parts.uri.path_and_query().map_or("/", |p| p.as_str())
            );
            let mut forward = proxy
                .http
                .request(parts.method.clone(), url)
                .body(body.clone());
            for (name, value) in &parts.headers {
                if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
                    forward = forward.header(name, value);
                }
            }
            let answer = forward
                .send()
                .await
                .unwrap_or_else(|e| panic!("forwarding to moto: {e}"));
            let status = answer.status();
            record(status.as_u16());
            let mut response = axum::http::Response::builder().status(status);
            for (name, value) in answer.headers() {
                if name != axum::http::header::CONTENT_LENGTH
                    && name != axum::http::header::TRANSFER_ENCODING
                {
                    response = response.header(name, value);
                }
            }
            let bytes = answer
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("moto's answer: {e}"));
            response
                .body(axum::body::Body::from(bytes))
                .unwrap_or_else(|e| panic!("the proxied answer: {e}"))
        }
    }
}

/// The minute starts (unix seconds) moto holds `Misses` for, in `span`: the minutes published.
async fn minutes_held(
    cw: &aws_sdk_cloudwatch::Client,
    pool: &PoolRef,
    span: (SystemTime, SystemTime),
) -> BTreeSet<i64> {
    read(cw, pool, metric::MISSES, "SampleCount", 60, span)
        .await
        .into_keys()
        .collect()
}

/// Every metric of every minute in `minutes` reads back from moto as the history has it.
async fn assert_held_as_published(
    cw: &aws_sdk_cloudwatch::Client,
    pool: &PoolRef,
    minutes: &[ClosedMinute],
    span: (SystemTime, SystemTime),
) {
    type Field = fn(&ClosedMinute) -> Option<f64>;
    let fields: [(&str, Field); 8] = [
        (metric::MISS_RATE, |m| m.point.miss_rate),
        (metric::HIT_RATE, |m| m.point.hit_rate),
        (metric::NODES, |m| Some(f64::from(m.point.nodes))),
        (metric::ITEMS, |m| Some(m.point.items as f64)),
        (metric::BYTES, |m| Some(m.point.bytes as f64)),
        (metric::REQUESTS, |m| Some(m.point.requests_per_minute)),
        (metric::HITS, |m| Some(m.hits as f64)),
        (metric::MISSES, |m| Some(m.misses as f64)),
    ];
    for (name, field) in fields {
        // Sum and SampleCount: a datum sent twice would show as a count of 2.
        let sums = read(cw, pool, name, "Sum", 60, span).await;
        let counts = read(cw, pool, name, "SampleCount", 60, span).await;
        for m in minutes {
            let t = m.point.t.as_second();
            let Some(want) = field(m) else {
                continue;
            };
            assert_eq!(counts.get(&t), Some(&1.0), "{name} at {t}: datums held");
            let got = sums[&t];
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{name} at {t}: moto has {got}, the history {want}"
            );
        }
    }
}

/// Times `publish` of one minute, which must not wait for CloudWatch.
async fn publish_timed(
    sink: &CloudWatch,
    pool: &PoolRef,
    minute: &ClosedMinute,
    slowest: &mut Duration,
) {
    let started = Instant::now();
    sink.publish(
        pool,
        &publishing(NAMESPACE, true),
        std::slice::from_ref(minute),
    )
    .await
    .unwrap_or_else(|e| panic!("publish: {e}"));
    *slowest = (*slowest).max(started.elapsed());
}

/// Polls until `check` holds.
async fn until(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_metric_data_failures_are_retried_with_back_off_and_refusals_are_dropped_and_counted() {
    const ATTEMPTS: u32 = 5;
    const PAUSE: Duration = Duration::from_millis(400);
    const WAIT: Duration = Duration::from_secs(60);
    let moto = Moto::start();
    let cw = client(&moto).await;
    let proxy = Proxy::start(&moto).await;
    let calls = AwsCalls::new();
    let through_proxy = |max_pending: usize| CloudWatchOptions {
        endpoint: Some(proxy.url.clone()),
        // The SDK's standard retry with its back-off scaled down; the sink's own pause too.
        retry: aws_config::retry::RetryConfig::standard()
            .with_max_attempts(ATTEMPTS)
            .with_initial_backoff(Duration::from_millis(10)),
        retry_pause: PAUSE,
        longest_retry_pause: Duration::from_secs(10),
        max_pending,
        ..options(&moto, &calls)
    };
    let sink = CloudWatch::new(through_proxy(1000)).await;
    let now = unix(SystemTime::now());
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(now - now % 60 - 600);
    let start = end - MINUTE * 10;
    let span = (start, end);
    let minutes = history(end, 10).closed_minutes(start, end);
    // Minutes with gets: eight datums each.
    let minutes: Vec<ClosedMinute> = minutes
        .into_iter()
        .filter(|m| m.point.miss_rate.is_some())
        .collect();
    assert!(minutes.len() >= 8);
    let mut slowest = Duration::ZERO;
    let get = |calls: &AwsCalls, outcome: &str| calls.count("cloudwatch", "PutMetricData", outcome);

    // 1. Throttling, then 5xx: 12 failed attempts over three calls, then success. The first
    // request is held open: publishing goes on meanwhile.
    let pool = PoolRef::new("default", "retried");
    proxy.script(
        std::iter::once(Answer::Hold(400, "Throttling"))
            .chain(std::iter::repeat_n(Answer::Fail(400, "Throttling"), 4))
            .chain(std::iter::repeat_n(
                Answer::Fail(500, "InternalServiceFault"),
                5,
            ))
            .chain(std::iter::repeat_n(
                Answer::Fail(503, "ServiceUnavailable"),
                2,
            )),
    );
    publish_timed(&sink, &pool, &minutes[0], &mut slowest).await;
    proxy.until_holding().await;
    // Published while the first request hangs: queued behind it, then sent with it. (Two
    // minutes, 16 datums, stay under the 10 KB above which the SDK compresses the body, so
    // the proxy can count them.)
    publish_timed(&sink, &pool, &minutes[1], &mut slowest).await;
    assert!(
        proxy.holding(),
        "publish returned while a PutMetricData hangs"
    );
    proxy.release();
    until("the datums sent", WAIT, || get(&calls, AWS_OK) == 1).await;
    sink.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
    let seen = proxy.seen();
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    let gaps: Vec<Duration> = seen
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    eprintln!(
        "PutMetricData retry: {} attempts {statuses:?}, gaps {gaps:?}, datums per attempt {:?}; \
         calls {:?}; slowest publish {slowest:?}",
        seen.len(),
        seen.iter().map(|s| s.datums).collect::<Vec<_>>(),
        calls.by_api("cloudwatch"),
    );
    assert_eq!(
        statuses,
        [
            400, 400, 400, 400, 400, 500, 500, 500, 500, 500, 503, 503, 200
        ],
        "five attempts per call (the SDK's), three calls, no attempt beyond"
    );
    // Three calls: two the SDK gave up on, and one whose 503s its retry absorbed.
    for (outcome, n) in [
        ("Throttling", 1),
        ("InternalServiceFault", 1),
        ("ServiceUnavailable", 0),
        (AWS_OK, 1),
    ] {
        assert_eq!(get(&calls, outcome), n, "calls ending {outcome}");
    }
    // The sink's own pause after the SDK gave up: at least PAUSE, then doubled.
    assert!(
        gaps[4] >= PAUSE,
        "pause after the first call: {:?}",
        gaps[4]
    );
    assert!(
        gaps[9] >= PAUSE * 2,
        "pause after the second call: {:?}",
        gaps[9]
    );
    // The first call's five attempts carried the first minute; the minute published
    // meanwhile joined it in the next calls.
    let datums: Vec<usize> = seen.iter().map(|s| s.datums).collect();
    let want: Vec<usize> = std::iter::repeat_n(8, 5)
        .chain(std::iter::repeat_n(16, 8))
        .collect();
    assert_eq!(datums, want);
    assert_held_as_published(&cw, &pool, &minutes[..2], span).await;
    assert_eq!(
        minutes_held(&cw, &pool, span).await.len(),
        2,
        "nothing else"
    );
    assert_eq!(calls.dropped(DROPPED_REFUSED), 0);
    assert_eq!(calls.dropped(DROPPED_OVERFLOW), 0);
    assert_eq!(calls.datums_pending(), 0);

    // 2. Refusals no retry fixes: one attempt each, the datums dropped and counted, never
    // sent again.
    let pool = PoolRef::new("default", "refused");
    for (n, (status, code)) in [(403, "AccessDenied"), (400, "InvalidParameterValue")]
        .into_iter()
        .enumerate()
    {
        let before = proxy.seen().len();
        proxy.script([Answer::Fail(status, code)]);
        publish_timed(&sink, &pool, &minutes[3 + 2 * n], &mut slowest).await;
        until(code, WAIT, || get(&calls, code) == 1).await;
        // Nothing waits for a retry: a flush finds nothing to send.
        sink.flush()
            .await
            .unwrap_or_else(|e| panic!("flush after {code}: {e}"));
        assert_eq!(proxy.seen().len(), before + 1, "{code}: one attempt");
        assert_eq!(get(&calls, code), 1);
        assert_eq!(calls.dropped(DROPPED_REFUSED), 8 * (n as u64 + 1));
        // The next minute goes alone: the refused one is not retried.
        publish_timed(&sink, &pool, &minutes[4 + 2 * n], &mut slowest).await;
        sink.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
        let seen = proxy.seen();
        assert_eq!(seen.len(), before + 2);
        assert_eq!((seen[before + 1].status, seen[before + 1].datums), (200, 8));
    }
    let held = minutes_held(&cw, &pool, span).await;
    let want: BTreeSet<i64> = [&minutes[4], &minutes[6]]
        .iter()
        .map(|m| m.point.t.as_second())
        .collect();
    assert_eq!(held, want, "the refused minutes are not in CloudWatch");
    let text = OperatorMetrics::with_aws_calls(calls.clone()).encode();
    for (series, value) in [
        (
            "cachepool_operator_cloudwatch_datums_dropped_total{reason=\"refused\"}",
            16.0,
        ),
        (
            "cachepool_operator_aws_calls_total{service=\"cloudwatch\",api=\"PutMetricData\",outcome=\"AccessDenied\"}",
            1.0,
        ),
        ("cachepool_operator_cloudwatch_datums_pending", 0.0),
    ] {
        assert_eq!(
            metric_value(&text, series),
            Some(value),
            "{series} in\n{text}"
        );
    }
    drop(sink);

    // 3. A buffer of two minutes while CloudWatch fails: a third drops the oldest, counted.
    let bounded = CloudWatch::new(through_proxy(16)).await;
    let pool = PoolRef::new("default", "bounded");
    let before = proxy.seen().len();
    proxy.script(
        std::iter::repeat_n(Answer::Fail(500, "InternalServiceFault"), 4)
            .chain(std::iter::once(Answer::Hold(500, "InternalServiceFault"))),
    );
    publish_timed(&bounded, &pool, &minutes[0], &mut slowest).await;
    proxy.until_holding().await;
    publish_timed(&bounded, &pool, &minutes[1], &mut slowest).await;
    publish_timed(&bounded, &pool, &minutes[2], &mut slowest).await;
    assert_eq!(calls.dropped(DROPPED_OVERFLOW), 0, "two minutes fit");
    proxy.release();
    until("the oldest minute dropped", WAIT, || {
        calls.dropped(DROPPED_OVERFLOW) == 8
    })
    .await;
    until("the two newest sent", WAIT, || get(&calls, AWS_OK) == 4).await;
    bounded
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    let seen = proxy.seen();
    assert_eq!(seen.len(), before + 6, "five failed attempts, one sent");
    assert_eq!(seen[before + 5].datums, 16);
    let held = minutes_held(&cw, &pool, span).await;
    let want: BTreeSet<i64> = minutes[1..3]
        .iter()
        .map(|m| m.point.t.as_second())
        .collect();
    assert_eq!(held, want, "the oldest minute was dropped, the newest kept");
    let text = OperatorMetrics::with_aws_calls(calls.clone()).encode();
    assert_eq!(
        metric_value(
            &text,
            "cachepool_operator_cloudwatch_datums_dropped_total{reason=\"overflow\"}"
        ),
        Some(8.0),
        "{text}"
    );
    eprintln!("PutMetricData failures: slowest publish {slowest:?}");
    drop(bounded);
    proxy.stop().await;
    drop(moto);
}
