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
//!
//! Each test starts its own moto on a free loopback port and stops it when it ends; the
//! operator and every embedded node are stopped before the test returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
use cachepool_operator::metrics::{AWS_OK, AwsCalls};
use cachepool_operator::provider::PoolRef;
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_operator::traffic::{TrafficSink as _, TrafficSource as _};
use cachepool_test_support::servers::Moto;

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

/// A state directory that is removed when the test ends.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!(
            "cachepool-cloudwatch-{name}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        StateDir(dir)
    }

    fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.0.join(file), yaml).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
    let dir = StateDir::new("replay");
    dir.write("pool.yaml", AUTO_POOL);
    let pool = PoolRef::new("default", "replay");

    let nodes = Arc::new(EmbeddedProvider::new());
    let mut config = Config::standalone(
        &dir.0,
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
    let dir = StateDir::new("published");
    dir.write("pool.yaml", PUBLISHED_POOL);
    let pool = PoolRef::new("default", "published");
    let nodes = Arc::new(EmbeddedProvider::new());
    let mut config = Config::standalone(
        &dir.0,
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
