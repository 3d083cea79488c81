//! `cachepool bench operator`: how long the operator takes to act, with the process provider.
//!
//! An operator runs in this process over a temporary state directory (its nodes are child
//! processes, as in `cachepool up`). Each round scales the pool by one node through the API and
//! times, from the API call: the grown (or shrunk) ring being published — the new node serves
//! from that moment — and the pool being `Ready` again (hand-off done, removed node stopped).
//! The peer measured in the same run is the floor of a launch: a bare `cachepool node` process
//! started and polled until `/readyz` answers. Reconcile latency is read from the operator's own
//! histogram (`cachepool_operator_reconcile_duration_seconds`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::report::{Table, median};
use cachepool_operator::Operator;

/// `cachepool bench operator` flags.
#[derive(Debug, clap::Args)]
pub struct OperatorBenchArgs {
    /// Grow-and-shrink rounds (each: 1 -> 2 -> 3, then 3 -> 2 -> 1).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Bare node starts measured as the peer.
    #[arg(long, default_value_t = 10)]
    pub node_starts: u32,
}

const TOKEN: &str = "bench-operator-token";
const POOL: &str = "api/v1/pools/default/bench";

pub fn run(rt: &tokio::runtime::Runtime, args: OperatorBenchArgs) -> anyhow::Result<()> {
    rt.block_on(measure(args))
}

struct Step {
    kind: &'static str,
    to_ring: Duration,
    to_ready: Duration,
}

async fn measure(args: OperatorBenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cachepool-bench-operator-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("bench.yaml"),
        "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata:\n  name: bench\nspec:\n  \
         cache: {capacityMiB: 64}\n  scaling: {mode: manual, replicas: 1, minReplicas: 1, maxReplicas: 8}\n  \
         provider: {process: {}}\n",
    )?;
    let operator = Operator::start(super::operator_config(&dir, TOKEN)?).await?;
    let api = operator.api_url();
    let result = rounds(&api, &args).await;
    let reconcile = reconcile_latency(&api).await;
    operator.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let steps = result?;
    let peer = bare_node_starts(args.node_starts).await?;

    let mut table = Table::new([
        "step",
        "n",
        "to ring (ms, median)",
        "to Ready (ms, median)",
        "ring / bare node start",
    ]);
    let peer_ms = median(&peer);
    for kind in ["grow", "shrink"] {
        let ring: Vec<f64> = steps
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| ms(s.to_ring))
            .collect();
        let ready: Vec<f64> = steps
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| ms(s.to_ready))
            .collect();
        table.row([
            kind.to_owned(),
            ring.len().to_string(),
            format!("{:.1}", median(&ring)),
            format!("{:.1}", median(&ready)),
            format!("{:.2}x", median(&ring) / peer_ms),
        ]);
    }
    table.row([
        "bare node start (peer)".to_owned(),
        peer.len().to_string(),
        format!("{peer_ms:.1}"),
        "-".to_owned(),
        "1.00x".to_owned(),
    ]);
    println!("{}", table.render());
    match reconcile {
        Ok((count, mean, p99)) => println!(
            "reconcile rounds: {count}, mean {:.2} ms, p99 <= {:.2} ms (histogram bucket bound)",
            mean * 1e3,
            p99 * 1e3
        ),
        Err(e) => println!("reconcile latency unavailable: {e}"),
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn rounds(api: &str, args: &OperatorBenchArgs) -> anyhow::Result<Vec<Step>> {
    let http = reqwest::Client::new();
    wait_ready(&http, api, 1, Duration::from_secs(30)).await?;
    let mut steps = Vec::new();
    for _ in 0..args.rounds {
        for (delta, kind) in [(1, "grow"), (1, "grow"), (-1, "shrink"), (-1, "shrink")] {
            super::check_interrupted()?;
            let before = get(&http, &format!("{api}/{POOL}")).await?;
            let replicas = before["spec"]["scaling"]["replicas"].as_i64().unwrap_or(1);
            let target = usize::try_from(replicas + delta).unwrap_or(1);
            let epoch = before["status"]["ring"]["epoch"].as_u64().unwrap_or(0);
            let started = Instant::now();
            let answer = http
                .post(format!("{api}/{POOL}/scale"))
                .bearer_auth(TOKEN)
                .json(&json!({ "delta": delta }))
                .send()
                .await?;
            if !answer.status().is_success() {
                bail!(
                    "scale answered {}: {}",
                    answer.status(),
                    answer.text().await?
                );
            }
            // The first ring whose current members number `target`.
            let mut after = epoch;
            loop {
                let ring = get(&http, &format!("{api}/{POOL}/ring?after={after}")).await?;
                after = ring["epoch"].as_u64().unwrap_or(after);
                if ring["members"].as_array().map(Vec::len) == Some(target) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("no ring of {target} members within a minute");
                }
            }
            let to_ring = started.elapsed();
            wait_ready(&http, api, target, Duration::from_secs(60)).await?;
            steps.push(Step {
                kind,
                to_ring,
                to_ready: started.elapsed(),
            });
        }
    }
    Ok(steps)
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let answer = http.get(url).bearer_auth(TOKEN).send().await?;
    if !answer.status().is_success() {
        bail!("GET {url} answered {}", answer.status());
    }
    Ok(answer.json().await?)
}

/// Polls until the pool is `Ready` with `replicas` nodes.
async fn wait_ready(
    http: &reqwest::Client,
    api: &str,
    replicas: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(pool) = get(http, &format!("{api}/{POOL}")).await {
            let status = &pool["status"];
            if status["phase"] == "Ready"
                && status["readyReplicas"].as_u64() == Some(replicas as u64)
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("pool not Ready with {replicas} nodes within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Mean and an upper bound of the 99th percentile of reconcile rounds, from the histogram.
async fn reconcile_latency(api: &str) -> anyhow::Result<(u64, f64, f64)> {
    let text = reqwest::get(format!("{api}/metrics")).await?.text().await?;
    let name = "cachepool_operator_reconcile_duration_seconds";
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let sum = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}_sum")))
        .and_then(value)
        .context("no reconcile histogram sum")?;
    let count = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}_count")))
        .and_then(value)
        .context("no reconcile histogram count")?;
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, value(l)?))
        })
        .collect();
    let p99 = buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= 0.99 * count)
        .map_or(f64::NAN, |(bound, _)| *bound);
    Ok((count as u64, sum / count.max(1.0), p99))
}

/// The floor of a launch: start `cachepool node` and poll `/readyz` until it answers.
async fn bare_node_starts(n: u32) -> anyhow::Result<Vec<f64>> {
    let binary = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("cachepool-bench-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for i in 0..n {
        let addr_file = dir.join(format!("node-{i}.json"));
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&binary)
            .args([
                "node",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--threads",
                "1",
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a bare node")?;
        let admin = loop {
            if let Ok(bytes) = std::fs::read(&addr_file)
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && let Some(a) = v["adminAddress"].as_str()
            {
                break a.to_owned();
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("bare node did not write its address file");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        loop {
            if let Ok(r) = http.get(format!("http://{admin}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(ms(started.elapsed()));
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
