//! `cachepool bench routing`: what the pool client's ring routing costs per request.
//!
//! One node (a child process), every key stored first so every get hits. The same closed-loop
//! get load is driven through `NodeClient` straight to the node, and through a `PoolClient`
//! over a one-member ring of that node. Both end in the same `NodeClient::get` on the same
//! node, so the difference is the pool's own work: a routing-table load, the key's hash and
//! ring lookup, and the extra checks. Runs alternate node, pool, node, pool, ... so drift of
//! the shared machine lands on both; each variant keeps its own connections across rounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use cache_node::client::{ClientOptions, NodeClient, PoolClient, Value};
use cachepool_crds::ring::Ring;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use super::keys::{Permutation, check_key_size, write_key};
use super::loadgen;
use super::report::{Table, median, micros, thousands};
use super::servers::{ServerProcess, ServerSpec};

/// `cachepool bench routing` flags.
#[derive(Debug, clap::Args)]
pub struct RoutingArgs {
    /// Gets per measured run (one variant, one round).
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Concurrent requests: one task each, and as many pooled connections per client.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Rounds; each runs the node client, then the pool client.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct keys; all are stored before measuring.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Key length in bytes (keys are `k` and zero-padded digits).
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Worker threads of the node.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The two ways of reaching the node.
#[derive(Debug)]
enum Client {
    Node(NodeClient),
    Pool(PoolClient),
}

impl Client {
    fn name(&self) -> &'static str {
        match self {
            Client::Node(_) => "NodeClient",
            Client::Pool(_) => "PoolClient, ring [node]",
        }
    }

    async fn get(&self, key: &[u8]) -> cache_node::client::Result<Option<Value>> {
        match self {
            Client::Node(c) => c.get(key).await,
            Client::Pool(c) => c.get(key).await,
        }
    }
}

/// One variant over all rounds.
#[derive(Debug)]
struct Cell {
    throughputs: Vec<f64>,
    /// CPU time of this (the client) process per request, in ns, one entry per round.
    cpu_per_request: Vec<f64>,
    latency: Histogram<u64>,
    hits: u64,
    misses: u64,
    errors: u64,
}

impl Cell {
    fn new() -> anyhow::Result<Cell> {
        Ok(Cell {
            throughputs: Vec::new(),
            cpu_per_request: Vec::new(),
            latency: loadgen::new_histogram()?,
            hits: 0,
            misses: 0,
            errors: 0,
        })
    }

    fn q(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }
}

/// What one task measured.
struct Part {
    latency: Histogram<u64>,
    hits: u64,
    misses: u64,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(rt: &tokio::runtime::Runtime, args: RoutingArgs) -> anyhow::Result<()> {
    ensure!(
        args.requests > 0 && args.rounds > 0,
        "--requests and --rounds must be at least 1"
    );
    ensure!(
        args.connections > 0 && args.threads > 0,
        "--connections and --threads must be at least 1"
    );
    ensure!(
        args.keys > 0 && args.value_size > 0,
        "--keys and --value-size must be at least 1"
    );
    check_key_size(args.keys, args.key_size)?;
    // Runs on this (the main) thread: the child's death signal is tied to the thread that
    // spawned it, which must outlive it.
    rt.block_on(measure(args))
}

async fn measure(args: RoutingArgs) -> anyhow::Result<()> {
    let data_mib = (args.keys * (args.key_size + args.value_size + 64) as u64).div_ceil(1 << 20);
    let spec = ServerSpec {
        threads: args.threads,
        memory_mib: (4 * data_mib).max(64),
        policy: None,
        admin_token: None,
    };
    let mut server = ServerProcess::node(&spec).await?;
    eprintln!(
        "node: pid {} on {}; storing {} keys",
        server.pid(),
        server.addr,
        args.keys
    );
    let refused = loadgen::fill(
        server.addr,
        args.keys,
        args.key_size,
        args.value_size,
        4,
        64,
    )
    .await?;
    ensure!(
        refused == 0,
        "the node refused {refused} of the prefill sets"
    );

    let options = ClientOptions {
        max_connections_per_node: args.connections,
        ..ClientOptions::default()
    };
    let addr = server.addr.to_string();
    let ring = Ring::from_addresses(1, [addr.clone()]).context("building the one-member ring")?;
    let clients = [
        Arc::new(Client::Node(NodeClient::new(addr, options)?)),
        Arc::new(Client::Pool(PoolClient::from_ring(ring, options)?)),
    ];
    // Unmeasured: opens every connection of both clients and warms the node's and the
    // clients' code paths.
    let warmup = (args.requests / 10).clamp(1, 20_000);
    for client in &clients {
        drive(client, &args, warmup, args.seed ^ 0x5eed).await?;
    }

    let mut cells = [Cell::new()?, Cell::new()?];
    for round in 0..args.rounds {
        for (client, cell) in clients.iter().zip(&mut cells) {
            server.check_alive()?;
            // Same key sequence for both variants within a round.
            let seed = args.seed.wrapping_add(round as u64 * 1_000_003);
            let cpu_before = own_cpu_time()?;
            let started = Instant::now();
            let parts = drive(client, &args, args.requests, seed).await?;
            let elapsed = started.elapsed();
            let cpu = own_cpu_time()?.saturating_sub(cpu_before);
            cell.cpu_per_request
                .push(cpu.as_nanos() as f64 / args.requests as f64);
            let throughput = args.requests as f64 / elapsed.as_secs_f64();
            let mut run_latency = loadgen::new_histogram()?;
            for part in parts {
                run_latency.add(&part.latency)?;
                cell.hits += part.hits;
                cell.misses += part.misses;
                cell.errors += part.errors;
                if let Some(err) = part.first_error {
                    eprintln!("  {}: {err}", client.name());
                }
            }
            cell.latency.add(&run_latency)?;
            cell.throughputs.push(throughput);
            eprintln!(
                "round {}/{} {:<24} {:>9} req/s  p50 {:>7} us  p99 {:>7} us  client CPU {:>5} us/req",
                round + 1,
                args.rounds,
                client.name(),
                thousands(throughput),
                micros(run_latency.value_at_quantile(0.5)),
                micros(run_latency.value_at_quantile(0.99)),
                micros(cell.cpu_per_request.last().copied().unwrap_or_default() as u64),
            );
        }
    }
    server.check_alive()?;
    drop(server);
    print!("{}", render(&args, &clients, &cells));
    let [node, pool] = &cells;
    if node.misses + node.errors + pool.misses + pool.errors > 0 {
        bail!("not every get hit: the comparison assumes 100% hits (see the table)");
    }
    Ok(())
}

/// CPU time (user + system) of this process so far: the clients' work, not the node's (a
/// child, counted only once reaped). Less disturbed by a busy machine than wall-clock
/// throughput, so it shows a small per-request cost that throughput hides.
fn own_cpu_time() -> anyhow::Result<Duration> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Runs `requests` gets through `client` from `args.connections` tasks in a closed loop.
async fn drive(
    client: &Arc<Client>,
    args: &RoutingArgs,
    requests: u64,
    seed: u64,
) -> anyhow::Result<Vec<Part>> {
    let next = Arc::new(AtomicU64::new(0));
    let order = Permutation::new(args.keys, seed);
    let mut tasks = JoinSet::new();
    for _ in 0..args.connections {
        let (client, next) = (client.clone(), next.clone());
        let (keys, key_size, value_size) = (args.keys, args.key_size, args.value_size);
        tasks.spawn(async move {
            let mut part = Part {
                latency: loadgen::new_histogram()?,
                hits: 0,
                misses: 0,
                errors: 0,
                first_error: None,
            };
            let mut key = Vec::with_capacity(key_size);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || super::interrupted() {
                    return anyhow::Ok(part);
                }
                key.clear();
                write_key(&mut key, order.apply(i % keys), key_size);
                let sent = Instant::now();
                let reply = client.get(&key).await;
                let ns = u64::try_from(sent.elapsed().as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1);
                part.latency.saturating_record(ns);
                match reply {
                    Ok(Some(v)) if v.data.len() == value_size => part.hits += 1,
                    Ok(Some(v)) => bail!(
                        "a {}-byte value where {value_size} bytes were stored",
                        v.data.len()
                    ),
                    Ok(None) => part.misses += 1,
                    Err(err) => {
                        part.errors += 1;
                        part.first_error.get_or_insert_with(|| err.to_string());
                    }
                }
            }
        });
    }
    let mut parts = Vec::with_capacity(args.connections);
    while let Some(joined) = tasks.join_next().await {
        parts.push(joined.context("a load task panicked")??);
    }
    super::check_interrupted()?;
    Ok(parts)
}

fn render(args: &RoutingArgs, clients: &[Arc<Client>; 2], cells: &[Cell; 2]) -> String {
    let mut out = format!(
        "bench routing: {} rounds x {} gets per client, {} connections (closed loop), {} keys of {} B, \
         values {} B, node threads {}, client threads {}\n\
         latency: per get, from the call to its return; percentiles over all rounds\n\n",
        args.rounds,
        args.requests,
        args.connections,
        args.keys,
        args.key_size,
        args.value_size,
        args.threads,
        args.client_threads,
    );
    let mut t = Table::new([
        "client",
        "req/s (median)",
        "min..max",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "client CPU us/req (median)",
        "hit %",
    ]);
    for (client, c) in clients.iter().zip(cells) {
        let min = c.throughputs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = c.throughputs.iter().copied().fold(0.0, f64::max);
        let total = c.hits + c.misses + c.errors;
        t.row([
            client.name().to_string(),
            thousands(median(&c.throughputs)),
            format!("{}..{}", thousands(min), thousands(max)),
            micros(c.q(0.5)),
            micros(c.q(0.99)),
            micros(c.q(0.999)),
            micros(median(&c.cpu_per_request) as u64),
            format!("{:.2}", 100.0 * c.hits as f64 / total.max(1) as f64),
        ]);
    }
    out.push_str(&t.render());
    let [node, pool] = cells;
    // Rounds are paired (same seed, back to back), so the per-round ratio cancels the drift
    // between rounds that the medians above still carry.
    let ratios: Vec<f64> = pool
        .throughputs
        .iter()
        .zip(&node.throughputs)
        .map(|(p, n)| p / n)
        .collect();
    let cpu_diffs: Vec<f64> = pool
        .cpu_per_request
        .iter()
        .zip(&node.cpu_per_request)
        .map(|(p, n)| p - n)
        .collect();
    let diff = |q: f64| (pool.q(q) as f64 - node.q(q) as f64) / 1000.0;
    let list = |v: &[f64], f: &dyn Fn(f64) -> String| {
        v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(", ")
    };
    out.push_str(&format!(
        "\npool over node: throughput {:.3}x (median of per-round ratios {}), \
         p50 {:+.1} us, p99 {:+.1} us, client CPU {:+.2} us/req (median of per-round differences {})\n",
        median(&ratios),
        list(&ratios, &|r| format!("{r:.3}")),
        diff(0.5),
        diff(0.99),
        median(&cpu_diffs) / 1000.0,
        list(&cpu_diffs, &|d| format!("{:+.2}", d / 1000.0)),
    ));
    if node.misses + node.errors + pool.misses + pool.errors > 0 {
        out.push_str(&format!(
            "misses/errors: NodeClient {}/{}, PoolClient {}/{}\n",
            node.misses, node.errors, pool.misses, pool.errors
        ));
    }
    out
}
