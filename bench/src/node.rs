//! `cachepool bench node`: a node and memcached, equal threads and memory, both prefilled
//! with every key (so both hit 100%), driven in turn by the same closed-loop load.
//!
//! Runs alternate (memcached, node, memcached, node, ...) so slow drift of a shared, noisy
//! machine lands on both servers alike; throughput is the median over rounds, latency
//! percentiles come from the requests of all rounds together.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use hdrhistogram::Histogram;
use serde_json::json;

use super::keys::{KeyDist, check_key_size};
use super::loadgen::{self, Load, LoadResult};
use super::report::{Table, median, mib, micros, thousands};
use super::servers::{ServerProcess, ServerSpec};

/// `cachepool bench node` flags.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Rounds; each runs every workload on memcached, then on the node.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per workload, server and round.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Unmeasured seconds before each measured run.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Worker threads of each server (memcached -t, node --threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Memory limit of each server in MiB (memcached -m, node --capacity-mib).
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Client connections, one task each.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Distinct keys; all are stored before measuring.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key length in bytes (keys are `k` and zero-padded digits).
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Fraction of requests that are gets (0.9: get:set 9:1).
    #[arg(long, default_value_t = 0.9)]
    get_ratio: f64,
    /// Key distributions to run, comma-separated: uniform, zipfS.
    #[arg(long, value_delimiter = ',', default_value = "uniform,zipf0.99")]
    dists: Vec<KeyDist>,
    /// Pipeline depths to run, comma-separated (16: send 16 requests, then read 16 replies).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    depths: Vec<usize>,
    /// The memcached binary to compare against.
    #[arg(long, default_value = "/usr/bin/memcached")]
    memcached: PathBuf,
    /// The node's replacement policy (default: the node's own default).
    #[arg(long)]
    policy: Option<String>,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also measure a node run from this binary (e.g. the previous commit's release build),
    /// in the same rounds and with the same load: before and after side by side.
    #[arg(long, value_name = "CACHEPOOL_BINARY")]
    baseline_node: Option<PathBuf>,
    /// The node's `--scheduling` (pinned or shared; default: the node's own default). Not
    /// passed to the baseline node, which may predate the flag.
    #[arg(long)]
    scheduling: Option<String>,
}

/// One workload on one server, over all rounds.
#[derive(Debug)]
struct Cell {
    throughputs: Vec<f64>,
    latency: Histogram<u64>,
    gets: u64,
    hits: u64,
    refused: u64,
    /// The server's CPU time over its runs (warm-up included), and the requests it answered
    /// in that time (warm-up included).
    cpu: Duration,
    cpu_requests: u64,
}

impl Cell {
    fn new() -> anyhow::Result<Cell> {
        Ok(Cell {
            throughputs: Vec::new(),
            latency: loadgen::new_histogram()?,
            gets: 0,
            hits: 0,
            refused: 0,
            cpu: Duration::ZERO,
            cpu_requests: 0,
        })
    }

    fn add(&mut self, r: &LoadResult, cpu: Duration) -> anyhow::Result<()> {
        self.throughputs.push(r.throughput());
        self.latency.add(&r.latency)?;
        self.gets += r.gets;
        self.hits += r.hits;
        self.refused += r.refused;
        self.cpu += cpu;
        self.cpu_requests += r.ops + r.warmup_ops;
        Ok(())
    }

    /// Server CPU microseconds per request.
    fn cpu_per_request_us(&self) -> f64 {
        if self.cpu_requests == 0 {
            f64::NAN
        } else {
            self.cpu.as_secs_f64() * 1e6 / self.cpu_requests as f64
        }
    }

    fn median_throughput(&self) -> f64 {
        median(&self.throughputs)
    }

    fn quantile(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }

    fn hit_ratio(&self) -> f64 {
        if self.gets == 0 {
            f64::NAN
        } else {
            self.hits as f64 / self.gets as f64
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "throughput_median_ops": self.median_throughput(),
            "throughput_rounds_ops": self.throughputs,
            "latency_ns": {
                "p50": self.quantile(0.5), "p99": self.quantile(0.99), "p999": self.quantile(0.999),
                "max": self.latency.max(), "mean": self.latency.mean(),
            },
            "requests": self.latency.len(),
            "hit_ratio": self.hit_ratio(),
            "refused": self.refused,
            "cpu_us_per_request": self.cpu_per_request_us(),
        })
    }
}

struct Workload {
    dist: KeyDist,
    depth: usize,
}

impl Workload {
    fn name(&self) -> String {
        format!("{} depth {}", self.dist, self.depth)
    }
}

/// Facts about one server after the runs.
struct ServerFacts {
    name: &'static str,
    rss_idle: u64,
    rss_filled: u64,
    rss_after: u64,
    version: String,
    policy: String,
}

pub fn run(rt: &tokio::runtime::Runtime, args: NodeArgs) -> anyhow::Result<()> {
    ensure!(
        args.rounds > 0 && args.duration_secs > 0,
        "--rounds and --duration-secs must be at least 1"
    );
    ensure!(
        args.threads > 0 && args.connections > 0,
        "--threads and --connections must be at least 1"
    );
    ensure!(
        (0.0..=1.0).contains(&args.get_ratio),
        "--get-ratio must be between 0 and 1"
    );
    ensure!(
        !args.dists.is_empty() && !args.depths.is_empty(),
        "give at least one --dists and one --depths"
    );
    ensure!(
        args.depths.iter().all(|&d| (1..=1024).contains(&d)),
        "--depths must be between 1 and 1024"
    );
    check_key_size(args.keys, args.key_size)?;
    // Runs on this (the main) thread: the children's death signal is tied to the thread that
    // spawned them, which must outlive them.
    rt.block_on(measure(args))
}

async fn measure(args: NodeArgs) -> anyhow::Result<()> {
    let spec = ServerSpec {
        threads: args.threads,
        memory_mib: args.memory_mib,
        policy: args.policy.clone(),
        admin_token: None,
    };
    let mut servers = vec![
        ServerProcess::memcached(&args.memcached, &spec).await?,
        ServerProcess::node_with(
            "node",
            None,
            &spec,
            args.scheduling
                .iter()
                .flat_map(|s| ["--scheduling", s.as_str()]),
        )
        .await?,
    ];
    if let Some(bin) = &args.baseline_node {
        servers.push(ServerProcess::node_with("baseline", Some(bin), &spec, []).await?);
    }
    let mut rss_idle = vec![0; servers.len()];
    let mut rss_filled = vec![0; servers.len()];
    for (i, server) in servers.iter().enumerate() {
        rss_idle[i] = server.rss_bytes()?;
        eprintln!(
            "{}: pid {} on {}; storing {} keys",
            server.name,
            server.pid(),
            server.addr,
            args.keys
        );
        let refused = loadgen::fill(
            server.addr,
            args.keys,
            args.key_size,
            args.value_size,
            8,
            64,
        )
        .await?;
        ensure!(
            refused == 0,
            "{} refused {refused} of the prefill sets",
            server.name
        );
        rss_filled[i] = server.rss_bytes()?;
    }

    let workloads: Vec<Workload> = args
        .dists
        .iter()
        .flat_map(|&dist| {
            args.depths
                .iter()
                .map(move |&depth| Workload { dist, depth })
        })
        .collect();
    let mut cells: Vec<Vec<Cell>> = Vec::new();
    for _ in &workloads {
        cells.push(
            servers
                .iter()
                .map(|_| Cell::new())
                .collect::<anyhow::Result<_>>()?,
        );
    }
    for round in 0..args.rounds {
        for (w, workload) in workloads.iter().enumerate() {
            for (s, server) in servers.iter_mut().enumerate() {
                server.check_alive()?;
                let load = Load {
                    addr: server.addr,
                    connections: args.connections,
                    warmup: Duration::from_secs(args.warmup_secs),
                    duration: Duration::from_secs(args.duration_secs),
                    depth: workload.depth,
                    get_ratio: args.get_ratio,
                    dist: workload.dist,
                    keys: args.keys,
                    key_size: args.key_size,
                    value_size: args.value_size,
                    // Same load for both servers within a round, a fresh one each round.
                    seed: args.seed.wrapping_add(round as u64 * 1_000_003),
                };
                let cpu_before = server.cpu_time()?;
                let r = loadgen::run(&load).await?;
                let cpu = server.cpu_time()?.since(cpu_before);
                eprintln!(
                    "round {}/{} {:<20} {:<9} {:>10} ops/s  p99 {:>8} us  hits {:.2}%",
                    round + 1,
                    args.rounds,
                    workload.name(),
                    server.name,
                    thousands(r.throughput()),
                    micros(r.latency.value_at_quantile(0.99)),
                    100.0 * r.hit_ratio(),
                );
                cells[w][s].add(&r, cpu.user + cpu.sys)?;
            }
        }
    }

    let mut facts = Vec::new();
    for (i, server) in servers.iter_mut().enumerate() {
        server.check_alive()?;
        let stats = server.stats().await?;
        facts.push(ServerFacts {
            name: server.name,
            rss_idle: rss_idle[i],
            rss_filled: rss_filled[i],
            rss_after: server.rss_bytes()?,
            version: stats.get("version").cloned().unwrap_or_default(),
            policy: stats
                .get("policy")
                .cloned()
                .unwrap_or_else(|| "lru (memcached segmented LRU)".into()),
        });
    }
    drop(servers);

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&args, &workloads, &cells, &facts))?
        );
    } else {
        print!("{}", render(&args, &workloads, &cells, &facts));
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn render(
    args: &NodeArgs,
    workloads: &[Workload],
    cells: &[Vec<Cell>],
    facts: &[ServerFacts],
) -> String {
    let mut out = format!(
        "bench node: {} rounds x {} s (+{} s warm-up), {} server threads, {} MiB, {} connections, \
         {} keys of {} B, values {} B, get ratio {}, client threads {}\n\
         latency: per request, from the write of its batch to the arrival of its reply; \
         percentiles over all rounds; CPU: the server process's user + system time per request, \
         warm-up included\n\n",
        args.rounds,
        args.duration_secs,
        args.warmup_secs,
        args.threads,
        args.memory_mib,
        args.connections,
        args.keys,
        args.key_size,
        args.value_size,
        args.get_ratio,
        args.client_threads,
    );
    let mut t = Table::new([
        "workload",
        "server",
        "ops/s (median)",
        "min..max",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "CPU us/req",
        "hit %",
    ]);
    for (w, row) in workloads.iter().zip(cells) {
        for (f, c) in facts.iter().zip(row) {
            let min = c.throughputs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = c.throughputs.iter().copied().fold(0.0, f64::max);
            t.row([
                w.name(),
                f.name.to_string(),
                thousands(c.median_throughput()),
                format!("{}..{}", thousands(min), thousands(max)),
                micros(c.quantile(0.5)),
                micros(c.quantile(0.99)),
                micros(c.quantile(0.999)),
                format!("{:.2}", c.cpu_per_request_us()),
                format!("{:.2}", 100.0 * c.hit_ratio()),
            ]);
        }
        for (label, a, b) in comparisons(facts, row) {
            t.row([
                String::new(),
                label,
                ratio(a.median_throughput(), b.median_throughput()),
                String::new(),
                ratio(a.quantile(0.5) as f64, b.quantile(0.5) as f64),
                ratio(a.quantile(0.99) as f64, b.quantile(0.99) as f64),
                ratio(a.quantile(0.999) as f64, b.quantile(0.999) as f64),
                ratio(a.cpu_per_request_us(), b.cpu_per_request_us()),
                String::new(),
            ]);
        }
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut m = Table::new([
        "server",
        "version",
        "policy",
        "RSS idle MiB",
        "RSS filled MiB",
        "RSS after runs MiB",
    ]);
    for f in facts {
        m.row([
            f.name.to_string(),
            f.version.clone(),
            f.policy.clone(),
            mib(f.rss_idle),
            mib(f.rss_filled),
            mib(f.rss_after),
        ]);
    }
    if let [a, b, ..] = facts {
        m.row([
            "node/memcached".to_string(),
            String::new(),
            String::new(),
            String::new(),
            ratio(b.rss_filled as f64, a.rss_filled as f64),
            ratio(b.rss_after as f64, a.rss_after as f64),
        ]);
    }
    out.push_str(&m.render());
    out
}

/// The ratios a table shows under a workload: every node against memcached (the first
/// server), and the node against the baseline node when there is one.
fn comparisons<'c>(facts: &[ServerFacts], row: &'c [Cell]) -> Vec<(String, &'c Cell, &'c Cell)> {
    let mut pairs: Vec<(String, &Cell, &Cell)> = facts
        .iter()
        .zip(row)
        .skip(1)
        .map(|(f, c)| (format!("{}/{}", f.name, facts[0].name), c, &row[0]))
        .collect();
    if let ([_, node, baseline], [_, n, b]) = (facts, row) {
        pairs.push((format!("{}/{}", node.name, baseline.name), n, b));
    }
    pairs
}

fn to_json(
    args: &NodeArgs,
    workloads: &[Workload],
    cells: &[Vec<Cell>],
    facts: &[ServerFacts],
) -> serde_json::Value {
    json!({
        "settings": {
            "rounds": args.rounds, "duration_secs": args.duration_secs, "warmup_secs": args.warmup_secs,
            "threads": args.threads, "memory_mib": args.memory_mib, "connections": args.connections,
            "keys": args.keys, "key_size": args.key_size, "value_size": args.value_size,
            "get_ratio": args.get_ratio, "client_threads": args.client_threads, "seed": args.seed,
            "scheduling": args.scheduling, "baseline_node": args.baseline_node,
            "latency": "per request, from the write of its batch to the arrival of its reply",
        },
        "workloads": workloads.iter().zip(cells).map(|(w, row)| {
            let mut entry = json!({
                "workload": w.name(),
                "key_distribution": w.dist.to_string(),
                "depth": w.depth,
            });
            for (f, c) in facts.iter().zip(row) {
                entry[f.name] = c.json();
            }
            for (label, a, b) in comparisons(facts, row) {
                entry[label.replace('/', "_over_")] = json!({
                    "throughput": a.median_throughput() / b.median_throughput(),
                    "p50": a.quantile(0.5) as f64 / b.quantile(0.5) as f64,
                    "p99": a.quantile(0.99) as f64 / b.quantile(0.99) as f64,
                    "cpu_per_request": a.cpu_per_request_us() / b.cpu_per_request_us(),
                });
            }
            entry
        }).collect::<Vec<_>>(),
        "servers": facts.iter().map(|f| json!({
            "server": f.name, "version": f.version, "policy": f.policy,
            "rss_idle_bytes": f.rss_idle, "rss_filled_bytes": f.rss_filled, "rss_after_bytes": f.rss_after,
        })).collect::<Vec<_>>(),
    })
}
