//! `cachepool bench`: measurements of the node against Debian's memcached, of the store's
//! replacement policies against each other, of the hand-off between nodes and of the pool
//! client's routing, of the operator's reaction times, of the web site's image GET against
//! nginx, and of its listing page with and without thumbnails (results and commands in
//! docs/benchmarks.md).
//!
//! A crate of its own so that the production binary carries none of it: the `cachepool`
//! binary links it only with its default `bench` feature (`cachepool bench …`), and an image
//! built with `--no-default-features --features production` has no benchmark code. It is a
//! harness whose product is a report, so it uses `anyhow` the way a binary does.
//!
//! Layout: `keys` is pure (key naming, key distributions, unit-tested); requests and replies go
//! through the node client's own codec (`cache_node::client::codec`: `encode_get`,
//! `encode_set`, `parse_pipelined`, `parse_stats`); `servers` and `admin_node` start and stop the measured
//! processes; `loadgen` is the closed-loop client; `node`, `memory`, `policies`, `handoff`
//! and `routing` each run one subcommand; `report` formats tables. `web` runs the site's
//! benchmark with `wrk` (script and output parsing), `nginx` (configuration and process) and
//! `procs` (CPU time per process group, from /proc) as its helpers; `thumbnails` reuses its
//! site and scratch directory to weigh the listing page with and without thumbnails. `resize` runs the resize
//! and autoscaler experiments (open-loop traffic, three designs, figures).
//!
//! Servers under test are child processes, the node included (this same binary's `node`
//! subcommand), so that both servers are measured the same way: their own address space for
//! RSS, their own threads, and a client that shares nothing with them but the loopback.

mod admin_node;
mod handoff;
pub mod keys;
mod loadgen;
mod memory;
mod nginx;
mod node;
mod operator;
mod policies;
mod procs;
mod report;
pub mod resize;
mod routing;
mod servers;
mod thumbnails;
mod web;
mod wrk;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

/// `cachepool bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Throughput and latency of a node and memcached under the same closed-loop load.
    Node(node::NodeArgs),
    /// Resident memory per item of a node and memcached after loading N items.
    Memory(memory::MemoryArgs),
    /// Hit ratio of every replacement policy on Zipf traces, in-process (no network).
    Policies(policies::PoliciesArgs),
    /// Time and rate of a node handing all its keys to another (POST /handoff, ring [B]).
    Handoff(handoff::HandoffArgs),
    /// Per-request cost of the pool client's ring routing, against a plain node client.
    Routing(routing::RoutingArgs),
    /// Time from a scale call to the new ring and to a Ready pool (process provider), against
    /// a bare node start; reconcile latency.
    Operator(operator::OperatorBenchArgs),
    /// Latency, throughput and hit rate through resizes and autoscaling, for this product, a
    /// ring whose new nodes start empty and the original modulo design (docs/results.md).
    Resize(resize::ResizeArgs),
    /// The site's cached image GET under wrk against nginx serving the same files, and the
    /// miss path broken down (pool, database, object store, fill).
    Web(web::WebBenchArgs),
    /// Bytes and time of the listing's first page with the full images as thumbnails and
    /// with real thumbnails (issue 17), in one run.
    Thumbnails(thumbnails::ThumbnailBenchArgs),
}

/// A standalone operator over `dir` whose nodes are children of this executable (its `node`
/// subcommand), API on any free loopback port with admin token `token`, and the default
/// timing of `cachepool operator`.
fn operator_config(
    dir: &std::path::Path,
    token: &str,
) -> anyhow::Result<cachepool_operator::Config> {
    let binary = std::env::current_exe().context("finding the cachepool executable")?;
    Ok(cachepool_operator::Config::standalone(
        dir,
        cachepool_operator::run::NodeBackend::Process { binary },
        "127.0.0.1:0",
        token,
    ))
}

/// Runs the selected benchmark.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Node(a) => with_client_runtime(a.client_threads, |rt| node::run(rt, a)),
        BenchCommand::Memory(a) => with_client_runtime(a.client_threads, |rt| memory::run(rt, a)),
        BenchCommand::Handoff(a) => with_client_runtime(a.client_threads, |rt| handoff::run(rt, a)),
        BenchCommand::Routing(a) => with_client_runtime(a.client_threads, |rt| routing::run(rt, a)),
        BenchCommand::Resize(a) => with_client_runtime(a.client_threads, |rt| resize::run(rt, a)),
        BenchCommand::Operator(a) => with_client_runtime(2, |rt| operator::run(rt, a)),
        // The control side (operator, uploads, miss path); the site gets its own runtime.
        BenchCommand::Web(a) => with_client_runtime(2, |rt| web::run(rt, a)),
        BenchCommand::Thumbnails(a) => with_client_runtime(2, |rt| thumbnails::run(rt, a)),
        // CPU-bound and in-process: no runtime, no children, so the default Ctrl-C is right.
        BenchCommand::Policies(a) => policies::run(&a),
    }
}

/// Set once Ctrl-C or SIGTERM arrives; every loop of the network benchmarks checks it so
/// they return an error promptly and the server guards kill their processes on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Builds the load generator's own runtime (the servers run in other processes) and runs
/// `f` with it, watching for Ctrl-C and SIGTERM meanwhile.
fn with_client_runtime<T>(
    threads: usize,
    f: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    rt.spawn(async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        INTERRUPTED.store(true, Ordering::Relaxed);
        eprintln!("interrupted: stopping the servers");
    });
    f(&rt)
}
