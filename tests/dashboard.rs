//! The Grafana dashboard (`charts/cachepool/dashboards/cachepool.json`) against the code: every
//! metric a panel's query or a variable names exists on a running stack's `/metrics` (the
//! operator's, a node's and the site's), with every label the query filters, groups or
//! legends by.
//!
//! The stack is `cachepool up` with an auto-scaled pool that is made to grow (its minimum
//! raised), one of its nodes killed and replaced, an image uploaded and viewed until the
//! operator has sampled the traffic and judged windows, so counters, histograms and hand-off
//! gauges have series. Labels a Prometheus scrape adds are allowed on every metric (`job`,
//! `instance`, `namespace`), and `pod`/`slot` on the nodes' series, which the chart's
//! PodMonitor adds along with their `pool` (the chart test checks those relabellings exist).
//! AWS call metrics and the Kubernetes controller's reconcile errors have no series on a local
//! stack: for them the test checks that `operator/src/metrics.rs` registers the family with
//! exactly the labels the dashboard uses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cachepool_test_support::images::gif;
use cachepool_test_support::stack::Stack;

/// Labels any Prometheus scrape adds to every series.
const SCRAPE_LABELS: &[&str] = &["job", "instance", "namespace"];
/// Labels the chart's PodMonitor adds to the nodes' series.
const NODE_TARGET_LABELS: &[&str] = &["pool", "pod", "slot"];
/// Families that have no series on a local stack: (series name, name registered in
/// `operator/src/metrics.rs`, its label struct there, the labels a query may use, why).
const NO_LOCAL_SERIES: &[(&str, &str, &str, &[&str], &str)] = &[
    (
        "cachepool_operator_aws_calls_total",
        "cachepool_operator_aws_calls",
        "AwsCallLabels",
        &["service", "api", "outcome"],
        "AWS calls: an operator started with --aws",
    ),
    (
        "cachepool_operator_aws_call_duration_seconds_bucket",
        "cachepool_operator_aws_call_duration",
        "AwsApiLabels",
        &["service", "api"],
        "AWS calls: an operator started with --aws",
    ),
    (
        "cachepool_operator_reconcile_errors_total",
        "cachepool_operator_reconcile_errors",
        "ErrorLabels",
        &["pool", "kind"],
        "failed reconciles of the Kubernetes controller",
    ),
];
/// Series a query needs that appear only after traffic is sampled, a window is judged or a
/// node is replaced: the test waits for them before it reads the stack's metrics.
const AWAITED: &[&str] = &[
    "cachepool_pool_miss_rate",
    "cachepool_pool_items",
    "cachepool_operator_autoscaler_decisions_total",
    "cachepool_operator_scale_events_total",
    "cachepool_operator_node_replacements_total",
];
/// PromQL words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "label_values",
    "avg",
    "max",
    "min",
    "count",
];

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/cachepool/dashboards/cachepool.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Every query of the dashboard: panel targets (rows' nested panels too) and variables.
fn queries(board: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&board["panels"], &mut out);
    for variable in board["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = variable["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// What one query uses: each metric with the labels matched on it, and the labels grouped by
/// or shown in the legend (which must exist on every metric of the query).
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeMap<String, BTreeSet<String>>,
    grouped: BTreeSet<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A small PromQL reader, enough for the dashboard's queries: identifiers, `{…}` matchers,
/// `by (…)` groupings, and `label_values(selector, label)`; string literals skipped.
fn uses(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut u = Uses::default();
    let mut i = 0;
    let mut last_metric: Option<String> = None;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            i += 1;
        } else if c == '[' {
            // A range ([5m], [$__rate_interval]): no names inside.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let start = i + 1;
            let mut depth_quote = false;
            while i < chars.len() && (chars[i] != '}' || depth_quote) {
                if chars[i] == '"' {
                    depth_quote = !depth_quote;
                }
                i += 1;
            }
            let inside: String = chars[start..i].iter().collect();
            let labels = matcher_labels(&inside);
            if let Some(metric) = &last_metric {
                u.metrics.entry(metric.clone()).or_default().extend(labels);
            }
            i += 1;
        } else if c == '(' && (last_word == "by" || last_word == "without") {
            let start = i + 1;
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            let inside: String = chars[start..i].iter().collect();
            u.grouped.extend(
                inside
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
            last_word.clear();
            i += 1;
        } else if is_ident(c) && !c.is_ascii_digit() && c != '$' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if !PROMQL_WORDS.contains(&word.as_str()) && word.starts_with("cachepool_") {
                u.metrics.entry(word.clone()).or_default();
                last_metric = Some(word.clone());
            } else if !PROMQL_WORDS.contains(&word.as_str())
                && expr.starts_with("label_values(")
                && last_metric.is_some()
            {
                // label_values(selector, LABEL): the label must exist on the metric.
                u.grouped.insert(word.clone());
            }
            last_word = word;
        } else {
            if !c.is_whitespace() {
                last_word.clear();
                if c != '{' {
                    // `metric {` with a space is not a thing; a metric ends at any operator.
                }
            }
            i += 1;
        }
    }
    u
}

/// Label names in a `{…}` matcher list.
fn matcher_labels(inside: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut in_string = false;
    let mut current = String::new();
    for c in inside.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '=' | '!' | '~' => {
                if !current.trim().is_empty() {
                    labels.push(current.trim().to_owned());
                }
                current.clear();
            }
            ',' => current.clear(),
            c => current.push(c),
        }
    }
    labels
}

/// Legend labels: `{{label}}` in every target's legendFormat.
fn legend_labels(board: &Value) -> Vec<(String, BTreeSet<String>)> {
    fn walk(list: &Value, out: &mut Vec<(String, BTreeSet<String>)>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let (Some(expr), Some(legend)) =
                    (target["expr"].as_str(), target["legendFormat"].as_str())
                else {
                    continue;
                };
                let labels = legend
                    .split("{{")
                    .skip(1)
                    .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_owned()))
                    .collect();
                out.push((expr.to_owned(), labels));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&board["panels"], &mut out);
    out
}

/// Series names and their label names in a Prometheus/OpenMetrics text exposition.
fn exposition(text: &str, into: &mut BTreeMap<String, BTreeSet<String>>) {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = into.entry(name.to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let inside = &line[name_end + 1..line.rfind('}').unwrap_or(line.len())];
            labels.extend(matcher_labels(inside));
        }
    }
}

/// Whether `operator/src/metrics.rs` registers `name` with the label struct `labels`, whose
/// fields are exactly `fields` (plus the histogram's `le`, which is not a field).
fn registered(name: &str, labels: &str, fields: &[&str]) -> Result<(), String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/operator/src/metrics.rs");
    let source = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    if !source.contains(&format!("\"{name}\"")) {
        return Err(format!("{name} is not registered in {path}"));
    }
    let Some(at) = source.find(&format!("struct {labels} {{")) else {
        return Err(format!("no struct {labels} in {path}"));
    };
    let body = &source[at..at + source[at..].find('}').unwrap_or(0)];
    let found: BTreeSet<&str> = body
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .filter_map(|l| l.split_once(':').map(|(field, _)| field.trim()))
        .collect();
    let wanted: BTreeSet<&str> = fields.iter().copied().collect();
    if found == wanted {
        Ok(())
    } else {
        Err(format!(
            "{labels} has fields {found:?}, the test expects {wanted:?}"
        ))
    }
}

async fn get_text(url: &str) -> String {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"))
}

async fn wait_for_pool(stack: &Stack, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let pool = stack.pool().await;
        if check(&pool) {
            return pool;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {pool}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const POOL: &str = "apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata:
  name: local
  namespace: default
spec:
  cache:
    capacityMiB: 16
  scaling:
    mode: auto
    minReplicas: 1
    maxReplicas: 3
    auto:
      windowSeconds: 1
      cooldownSeconds: 0
      minRequestsPerWindow: 100
  provider:
    process: {}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboard_queries_exists_on_a_running_stack() {
    let board = dashboard();
    let stack = Stack::start("dashboard", Some(POOL)).await;
    wait_for_pool(&stack, "one ready node", |p| {
        p["status"]["readyReplicas"] == 1
    })
    .await;

    // Site traffic: an upload and two views (a miss, then a hit through the pool).
    let http = reqwest::Client::new();
    let image = format!("{}/api/v1/images/dashboard-test", stack.site);
    let put = http.put(&image).body(gif(7)).send().await.unwrap();
    assert!(put.status().is_success(), "upload: {}", put.status());
    for _ in 0..2 {
        let got = http.get(&image).send().await.unwrap();
        assert!(got.status().is_success(), "view: {}", got.status());
    }

    // A grow into raised bounds: scale events, autoscaler decisions, a hand-off.
    let patch = http
        .patch(format!("{}/api/v1/pools/default/local", stack.api))
        .bearer_auth(&stack.api_token)
        .header("content-type", "application/merge-patch+json")
        .body(json!({"spec": {"scaling": {"minReplicas": 2}}}).to_string())
        .send()
        .await
        .unwrap();
    assert!(patch.status().is_success(), "patch: {}", patch.status());
    let pool = wait_for_pool(&stack, "two ready nodes", |p| {
        p["status"]["readyReplicas"] == 2 && p["status"]["migration"].is_null()
    })
    .await;

    // A node replaced: kill the process of slot 1; the operator launches another.
    let epoch = pool["status"]["ring"]["epoch"].as_u64().unwrap_or(0);
    let victim = pool["status"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["slot"] == 1)
        .and_then(|n| n["id"].as_str()?.strip_prefix("pid-"))
        .unwrap_or_else(|| panic!("no process node in slot 1: {pool}"))
        .to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(killed.success(), "kill -KILL {victim}: {killed}");
    let pool = wait_for_pool(&stack, "the node of slot 1 replaced", |p| {
        p["status"]["readyReplicas"] == 2
            && p["status"]["ring"]["epoch"].as_u64().unwrap_or(0) > epoch
            && p["status"]["migration"].is_null()
    })
    .await;

    // Views until the operator has sampled the traffic and judged windows.
    let deadline = Instant::now() + Duration::from_secs(60);
    let operator_text = loop {
        for _ in 0..20 {
            let got = http.get(&image).send().await.unwrap();
            assert!(got.status().is_success(), "view: {}", got.status());
        }
        let text = get_text(&format!("{}/metrics", stack.api)).await;
        let missing: Vec<&&str> = AWAITED
            .iter()
            .filter(|m| !text.lines().any(|l| l.starts_with(&format!("{m}{{"))))
            .collect();
        if missing.is_empty() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no series for {missing:?} after 60 s; the operator's /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let site_text = get_text(&format!("{}/metrics", stack.site)).await;
    let admin = pool["status"]["nodes"][0]["adminAddress"]
        .as_str()
        .unwrap_or_else(|| panic!("no node admin address: {pool}"));
    let node_text = get_text(&format!("http://{admin}/metrics")).await;

    let mut series = BTreeMap::new();
    exposition(&operator_text, &mut series);
    exposition(&site_text, &mut series);
    let mut node_series = BTreeMap::new();
    exposition(&node_text, &mut node_series);

    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    let legends = legend_labels(&board);
    for expr in queries(&board) {
        let u = uses(&expr);
        assert!(
            !u.metrics.is_empty(),
            "a query names no cachepool metric: {expr}"
        );
        let legend: BTreeSet<String> = legends
            .iter()
            .filter(|(e, _)| *e == expr)
            .flat_map(|(_, l)| l.iter().cloned())
            .collect();
        for (metric, matched) in &u.metrics {
            checked.insert(metric.clone());
            let (available, extra): (BTreeSet<String>, &[&str]) = if let Some(labels) =
                series.get(metric)
            {
                (labels.clone(), SCRAPE_LABELS)
            } else if let Some(labels) = node_series.get(metric) {
                let mut all = labels.clone();
                all.extend(NODE_TARGET_LABELS.iter().map(|l| (*l).to_owned()));
                (all, SCRAPE_LABELS)
            } else if let Some((_, name, struct_name, labels, _)) =
                NO_LOCAL_SERIES.iter().find(|(m, ..)| m == metric)
            {
                if let Err(problem) = registered(name, struct_name, labels) {
                    problems.push(format!("{metric}: {problem} ({expr})"));
                }
                let mut all: BTreeSet<String> = labels.iter().map(|l| (*l).to_owned()).collect();
                if metric.ends_with("_bucket") {
                    all.insert("le".to_owned());
                }
                (all, SCRAPE_LABELS)
            } else {
                problems.push(format!("{metric}: no such series on the stack ({expr})"));
                continue;
            };
            // Labels matched on the metric, grouped by (outside histogram_quantile's `le`)
            // and shown in the legend must exist on it. Legend labels and groupings apply to
            // every metric of the query.
            let needed = matched.iter().chain(&u.grouped).chain(&legend);
            for label in needed {
                if !available.contains(label) && !extra.contains(&label.as_str()) {
                    problems.push(format!(
                        "{metric}: no label {label:?} (has {available:?}) in {expr}"
                    ));
                }
            }
        }
    }
    stack.stop();
    assert!(
        problems.is_empty(),
        "the dashboard does not match the code:\n{}\n\nthe operator's /metrics:\n{operator_text}",
        problems.join("\n")
    );
    println!(
        "dashboard: {} queries, {} metrics checked against the stack: {checked:?}",
        queries(&board).len(),
        checked.len()
    );
}

#[test]
fn the_promql_reader_finds_metrics_and_labels() {
    let u = uses(
        r#"histogram_quantile(0.99, sum by (le, pool) (rate(cachepool_x_bucket{pool=~"$pool", a!="b"}[$__rate_interval]))) / cachepool_y"#,
    );
    assert_eq!(
        u.metrics.keys().cloned().collect::<Vec<_>>(),
        ["cachepool_x_bucket", "cachepool_y"]
    );
    assert_eq!(
        u.metrics["cachepool_x_bucket"],
        BTreeSet::from(["pool".to_owned(), "a".to_owned()])
    );
    assert_eq!(
        u.grouped,
        BTreeSet::from(["le".to_owned(), "pool".to_owned()])
    );
    let v = uses(r#"label_values(cachepool_pool_nodes{pool=~"($namespace)/.*"}, pool)"#);
    assert!(v.grouped.contains("pool"), "{v:?}");
}
