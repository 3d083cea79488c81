//! `cachepool bench memory`: resident memory per item. Each server is started alone, its RSS
//! read, N items stored with pipelined sets, its RSS read again; the difference over N is
//! what an item really costs, and what exceeds key plus value is the server's overhead.
//! Both readings wait for the RSS to settle (see `settled_rss`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;

use super::keys::check_key_size;
use super::loadgen;
use super::report::{Table, mib, thousands};
use super::servers::{ServerProcess, ServerSpec};

/// `cachepool bench memory` flags.
#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// Items to store.
    #[arg(long, default_value_t = 1_000_000)]
    items: u64,
    /// Key length in bytes (keys are `k` and zero-padded digits).
    #[arg(long, default_value_t = 32)]
    key_size: usize,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Memory limit of each server in MiB; large enough that nothing is evicted.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Worker threads of each server.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Keys fetched afterwards to check that the items are still there.
    #[arg(long, default_value_t = 100_000)]
    sample: u64,
    /// The memcached binary to compare against.
    #[arg(long, default_value = "/usr/bin/memcached")]
    memcached: PathBuf,
    /// The node's replacement policy (default: the node's own default).
    #[arg(long)]
    policy: Option<String>,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug)]
struct Measured {
    name: &'static str,
    rss_before: u64,
    rss_after: u64,
    curr_items: u64,
    bytes_stat: u64,
    sampled: u64,
    present: u64,
}

impl Measured {
    fn per_item(&self, items: u64) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / items as f64
    }
}

/// RSS once it has stopped changing: memcached grows its hash table in a background thread
/// after a load, and allocators may return memory late, so an immediate reading would favour
/// whichever server defers more work. Gives up waiting after 10 s.
async fn settled_rss(server: &ServerProcess) -> anyhow::Result<u64> {
    let mut last = server.rss_bytes()?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        super::check_interrupted()?;
        let now = server.rss_bytes()?;
        if now.abs_diff(last) <= 256 << 10 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

pub fn run(rt: &tokio::runtime::Runtime, args: MemoryArgs) -> anyhow::Result<()> {
    ensure!(args.items > 0, "--items must be at least 1");
    check_key_size(args.items, args.key_size)?;
    // On the main thread: see `node::run`.
    rt.block_on(measure(args))
}

async fn measure(args: MemoryArgs) -> anyhow::Result<()> {
    let spec = ServerSpec {
        threads: args.threads,
        memory_mib: args.memory_mib,
        policy: args.policy.clone(),
        admin_token: None,
    };
    let mut results = Vec::new();
    for which in ["memcached", "node"] {
        // One server at a time, stopped before the next starts.
        let mut server = if which == "memcached" {
            ServerProcess::memcached(&args.memcached, &spec).await?
        } else {
            ServerProcess::node(&spec).await?
        };
        let rss_before = settled_rss(&server).await?;
        eprintln!(
            "{}: pid {}, RSS {} MiB; storing {} items",
            server.name,
            server.pid(),
            mib(rss_before),
            args.items
        );
        let refused = loadgen::fill(
            server.addr,
            args.items,
            args.key_size,
            args.value_size,
            4,
            100,
        )
        .await?;
        server.check_alive()?;
        let rss_after = settled_rss(&server).await?;
        let stats = server.stats().await?;
        let stat = |name: &str| {
            stats
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut rng = SmallRng::seed_from_u64(7);
        let sample: Vec<u64> = (0..args.sample.min(args.items))
            .map(|_| rng.random_range(0..args.items))
            .collect();
        let present =
            loadgen::count_present(server.addr, &sample, args.key_size, args.value_size, 100)
                .await?;
        let m = Measured {
            name: server.name,
            rss_before,
            rss_after,
            curr_items: stat("curr_items"),
            bytes_stat: stat("bytes"),
            sampled: sample.len() as u64,
            present,
        };
        eprintln!(
            "{}: RSS {} MiB, {:.1} bytes per item, {} refused, {}/{} sampled keys present",
            m.name,
            mib(rss_after),
            m.per_item(args.items),
            refused,
            present,
            m.sampled
        );
        results.push(m);
    }
    let payload = (args.key_size + args.value_size) as f64;
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|m| {
                json!({
                    "server": m.name,
                    "rss_before_bytes": m.rss_before,
                    "rss_after_bytes": m.rss_after,
                    "bytes_per_item": m.per_item(args.items),
                    "overhead_per_item": m.per_item(args.items) - payload,
                    "curr_items": m.curr_items,
                    "bytes_stat": m.bytes_stat,
                    "sampled": m.sampled,
                    "present": m.present,
                })
            })
            .collect();
        let doc = json!({
            "settings": {"items": args.items, "key_size": args.key_size, "value_size": args.value_size,
                         "memory_mib": args.memory_mib, "threads": args.threads},
            "servers": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "bench memory: {} items, keys {} B, values {} B ({} B of payload per item), {} MiB limit, {} threads\n\
         overhead per item = RSS delta / items - payload\n",
        args.items, args.key_size, args.value_size, payload, args.memory_mib, args.threads
    );
    let mut t = Table::new([
        "server",
        "RSS before MiB",
        "RSS after MiB",
        "bytes/item",
        "overhead/item",
        "curr_items",
        "bytes stat",
        "bytes stat/item",
        "sampled present",
    ]);
    for m in &results {
        t.row([
            m.name.to_string(),
            mib(m.rss_before),
            mib(m.rss_after),
            format!("{:.1}", m.per_item(args.items)),
            format!("{:.1}", m.per_item(args.items) - payload),
            thousands(m.curr_items as f64),
            thousands(m.bytes_stat as f64),
            format!("{:.1}", m.bytes_stat as f64 / args.items as f64),
            format!("{}/{}", m.present, m.sampled),
        ]);
    }
    if let [a, b] = results.as_slice() {
        t.row([
            "node/memcached".to_string(),
            String::new(),
            String::new(),
            format!("{:.2}x", b.per_item(args.items) / a.per_item(args.items)),
            format!(
                "{:.2}x",
                (b.per_item(args.items) - payload) / (a.per_item(args.items) - payload)
            ),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
