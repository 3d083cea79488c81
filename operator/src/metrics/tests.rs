use std::time::SystemTime;

use cachepool_crds::pool::RingStatus;

use super::*;
use crate::history::WindowTotals;

/// One sample line of OpenMetrics text: name, labels, value.
#[derive(Debug, PartialEq)]
struct Line {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads the sample lines back (no escapes needed: our label values have no quotes).
fn parse(text: &str) -> Vec<Line> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').unwrap();
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Line {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The value of the one series with this name and these labels.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<f64> = parse(text)
        .into_iter()
        .filter(|l| l.name == name && l.labels == want)
        .map(|l| l.value)
        .collect();
    assert!(found.len() <= 1, "{name} {labels:?} twice in\n{text}");
    found.first().copied()
}

const A: &str = "default/alpha";
const B: &str = "prod/beta";

#[test]
fn counters_and_reconcile_histogram_carry_pool_labels() {
    let m = OperatorMetrics::new();
    m.reconciled(A, Duration::from_millis(3));
    m.reconciled(A, Duration::from_millis(40));
    m.reconciled(B, Duration::from_secs(100));
    m.reconcile_failed(A, "provider");
    m.reconcile_failed(A, "provider");
    m.reconcile_failed(A, "invalid_spec");
    m.scaled(A, ScaleDirection::Up);
    m.scaled(A, ScaleDirection::Up);
    m.scaled(B, ScaleDirection::Down);
    m.node_launched(A);
    m.node_replaced(A);
    m.sample_failed(B);
    let text = m.encode();
    assert!(text.ends_with("# EOF\n"), "{text}");

    let pool = |p| [("pool", p)];
    assert_eq!(
        value(&text, "cachepool_operator_reconciles_total", &pool(A)),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "cachepool_operator_reconciles_total", &pool(B)),
        Some(1.0)
    );
    let errors = "cachepool_operator_reconcile_errors_total";
    assert_eq!(
        value(&text, errors, &[("pool", A), ("kind", "provider")]),
        Some(2.0)
    );
    assert_eq!(
        value(&text, errors, &[("pool", A), ("kind", "invalid_spec")]),
        Some(1.0)
    );
    let scale = "cachepool_operator_scale_events_total";
    assert_eq!(
        value(&text, scale, &[("pool", A), ("direction", "up")]),
        Some(2.0)
    );
    assert_eq!(
        value(&text, scale, &[("pool", B), ("direction", "down")]),
        Some(1.0)
    );
    assert_eq!(
        value(&text, scale, &[("pool", A), ("direction", "down")]),
        None
    );
    assert_eq!(
        value(&text, "cachepool_operator_node_launches_total", &pool(A)),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "cachepool_operator_node_replacements_total",
            &pool(A)
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "cachepool_operator_node_sample_failures_total",
            &pool(B)
        ),
        Some(1.0)
    );

    let duration = "cachepool_operator_reconcile_duration_seconds";
    assert!(
        text.contains(&format!("# TYPE {duration} histogram")),
        "{text}"
    );
    assert!(
        text.contains(&format!("# UNIT {duration} seconds")),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("{duration}_count"), &pool(A)),
        Some(2.0)
    );
    let sum = value(&text, &format!("{duration}_sum"), &pool(A)).unwrap();
    assert!((sum - 0.043).abs() < 1e-9, "{sum}");
    let bucket = |le| {
        value(
            &text,
            &format!("{duration}_bucket"),
            &[("pool", A), ("le", le)],
        )
    };
    assert_eq!(bucket("0.004"), Some(1.0), "3 ms is under 4 ms");
    assert_eq!(bucket("0.064"), Some(2.0));
    // 100 s is beyond the last bound: only +Inf holds it.
    let b_bucket = |le| {
        value(
            &text,
            &format!("{duration}_bucket"),
            &[("pool", B), ("le", le)],
        )
    };
    assert_eq!(b_bucket("32.768"), Some(0.0));
    assert_eq!(b_bucket("+Inf"), Some(1.0));
}

#[test]
fn reconcile_timer_counts_when_dropped() {
    let m = OperatorMetrics::new();
    {
        let _timer = m.start_reconcile(A);
        assert_eq!(
            value(
                &m.encode(),
                "cachepool_operator_reconciles_total",
                &[("pool", A)]
            ),
            None
        );
    }
    let text = m.encode();
    assert_eq!(
        value(&text, "cachepool_operator_reconciles_total", &[("pool", A)]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "cachepool_operator_reconcile_duration_seconds_count",
            &[("pool", A)]
        ),
        Some(1.0)
    );
}

#[test]
fn pool_gauges_follow_status_and_traffic() {
    let m = OperatorMetrics::new();
    let status = CachePoolStatus {
        replicas: 3,
        ready_replicas: 2,
        desired_replicas: 4,
        ring: Some(RingStatus {
            epoch: 7,
            members: Vec::new(),
        }),
        migration: Some(MigrationStatus {
            from_epoch: 6,
            to_epoch: 7,
            started_at: None,
            keys_moved: 1200,
            bytes_moved: 5 << 20,
            from_members: Vec::new(),
        }),
        ..CachePoolStatus::default()
    };
    m.observe_status(A, &status);
    let window = WindowTotals {
        gets: 400,
        misses: 100,
        requests: 900,
        evictions: 0,
        covered: Duration::from_secs(60),
    };
    let summary = Summary {
        sampled_at: Some(SystemTime::UNIX_EPOCH),
        nodes: 3,
        answered: 3,
        items: 5000,
        bytes: 3 << 30,
        window: Some(window),
        miss_rate: window.miss_rate(),
        hit_rate: window.hit_rate(),
        requests_per_minute: window.requests_per_minute(),
    };
    m.set_traffic(A, &summary);

    let text = m.encode();
    let a = [("pool", A)];
    for (name, want) in [
        ("cachepool_pool_nodes", 3.0),
        ("cachepool_pool_ready_nodes", 2.0),
        ("cachepool_pool_desired_nodes", 4.0),
        ("cachepool_pool_ring_epoch", 7.0),
        ("cachepool_pool_migrating", 1.0),
        ("cachepool_pool_migration_keys_moved", 1200.0),
        (
            "cachepool_pool_migration_bytes_moved",
            f64::from(5u32 << 20),
        ),
        ("cachepool_pool_items", 5000.0),
        ("cachepool_pool_bytes", 3.0 * f64::from(1u32 << 30)),
        ("cachepool_pool_miss_rate", 0.25),
        ("cachepool_pool_hit_rate", 0.75),
        ("cachepool_pool_requests_per_minute", 900.0),
    ] {
        assert_eq!(value(&text, name, &a), Some(want), "{name} in\n{text}");
    }
    assert!(
        text.contains("# TYPE cachepool_pool_miss_rate gauge"),
        "{text}"
    );

    // The hand-off ends: not migrating, the last totals stay. A quiet window drops the rates.
    m.observe_status(
        A,
        &CachePoolStatus {
            migration: None,
            ..status
        },
    );
    m.set_traffic(
        A,
        &Summary {
            window: None,
            miss_rate: None,
            hit_rate: None,
            requests_per_minute: None,
            ..summary
        },
    );
    let text = m.encode();
    assert_eq!(value(&text, "cachepool_pool_migrating", &a), Some(0.0));
    assert_eq!(
        value(&text, "cachepool_pool_migration_keys_moved", &a),
        Some(1200.0)
    );
    assert_eq!(value(&text, "cachepool_pool_miss_rate", &a), None);
    assert_eq!(value(&text, "cachepool_pool_hit_rate", &a), None);
    assert_eq!(value(&text, "cachepool_pool_requests_per_minute", &a), None);
    assert_eq!(value(&text, "cachepool_pool_items", &a), Some(5000.0));
}

#[test]
fn forget_pool_removes_every_series_of_that_pool_only() {
    let m = OperatorMetrics::new();
    for pool in [A, B] {
        m.reconciled(pool, Duration::from_millis(5));
        m.reconcile_failed(pool, "node_unreachable");
        m.scaled(pool, ScaleDirection::Up);
        m.scaled(pool, ScaleDirection::Down);
        m.autoscaler_decided(pool, "hold", "cooldown");
        m.node_launched(pool);
        m.node_replaced(pool);
        m.sample_failed(pool);
        m.observe_status(
            pool,
            &CachePoolStatus {
                replicas: 1,
                ring: Some(RingStatus::default()),
                ..CachePoolStatus::default()
            },
        );
        m.set_traffic(
            pool,
            &Summary {
                miss_rate: Some(0.5),
                hit_rate: Some(0.5),
                requests_per_minute: Some(10.0),
                ..Summary::default()
            },
        );
    }
    let before = parse(&m.encode());
    let series_of = |lines: &[Line], pool: &str| {
        lines
            .iter()
            .filter(|l| l.labels.get("pool").map(String::as_str) == Some(pool))
            .count()
    };
    let of_a = series_of(&before, A);
    // 8 counter series, 19 of the histogram (17 buckets, sum, count), 12 gauges.
    assert_eq!(of_a, 8 + 19 + 12);
    assert_eq!(of_a, series_of(&before, B));

    m.forget_pool(A);
    let after = parse(&m.encode());
    assert_eq!(series_of(&after, A), 0);
    assert_eq!(series_of(&after, B), of_a);
    // Every other sample line belongs to a pool (nothing of A hides under another label),
    // but the operator-wide ones.
    let global: Vec<&str> = after
        .iter()
        .filter(|l| !l.labels.contains_key("pool"))
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(global, ["cachepool_operator_cloudwatch_datums_pending"]);
    assert_eq!(after.len(), of_a + global.len());
}

#[test]
fn clones_share_series() {
    let m = OperatorMetrics::new();
    let other = m.clone();
    other.node_launched(A);
    m.node_launched(A);
    assert_eq!(
        value(
            &m.encode(),
            "cachepool_operator_node_launches_total",
            &[("pool", A)]
        ),
        Some(2.0)
    );
    assert_eq!(m.encode(), other.encode());
}

#[test]
fn aws_calls_are_counted_by_service_api_and_outcome_with_latency() {
    let aws = AwsCalls::new();
    let m = OperatorMetrics::with_aws_calls(aws.clone());
    aws.record("ec2", "RunInstances", AWS_OK, Duration::from_millis(30));
    aws.record(
        "ec2",
        "RunInstances",
        "InsufficientInstanceCapacity",
        Duration::from_millis(40),
    );
    aws.record(
        "cloudwatch",
        "PutMetricData",
        AWS_OK,
        Duration::from_millis(3),
    );
    let text = m.encode();
    let calls = |service: &str, api: &str, outcome: &str| {
        value(
            &text,
            "cachepool_operator_aws_calls_total",
            &[("service", service), ("api", api), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("ec2", "RunInstances", AWS_OK), Some(1.0));
    assert_eq!(
        calls("ec2", "RunInstances", "InsufficientInstanceCapacity"),
        Some(1.0)
    );
    assert_eq!(calls("cloudwatch", "PutMetricData", AWS_OK), Some(1.0));
    assert_eq!(
        value(
            &text,
            "cachepool_operator_aws_call_duration_seconds_count",
            &[("service", "ec2"), ("api", "RunInstances")]
        ),
        Some(2.0)
    );
    // The 5 ms bucket holds the 3 ms call only.
    assert_eq!(
        value(
            &text,
            "cachepool_operator_aws_call_duration_seconds_bucket",
            &[
                ("service", "cloudwatch"),
                ("api", "PutMetricData"),
                ("le", "0.005")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        aws.by_api("ec2"),
        BTreeMap::from([("RunInstances".to_owned(), 2)])
    );
    assert_eq!(aws.count("ec2", "RunInstances", AWS_OK), 1);
}

#[test]
fn cloudwatch_datums_pending_and_dropped_are_exposed_by_reason() {
    let aws = AwsCalls::new();
    let m = OperatorMetrics::with_aws_calls(aws.clone());
    aws.set_datums_pending(24);
    aws.datums_dropped(DROPPED_OVERFLOW, 8);
    aws.datums_dropped(DROPPED_REFUSED, 8);
    aws.datums_dropped(DROPPED_REFUSED, 16);
    let text = m.encode();
    assert_eq!(
        value(&text, "cachepool_operator_cloudwatch_datums_pending", &[]),
        Some(24.0)
    );
    let dropped = |reason: &str| {
        value(
            &text,
            "cachepool_operator_cloudwatch_datums_dropped_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(dropped(DROPPED_OVERFLOW), Some(8.0));
    assert_eq!(dropped(DROPPED_REFUSED), Some(24.0));
    assert_eq!(
        (aws.datums_pending(), aws.dropped(DROPPED_REFUSED)),
        (24, 24)
    );
}
