//! `cachepool`: one binary for every role of an elastic, memcached-compatible cache pool.

mod aws;
mod operator;
mod up;
mod web;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "cachepool",
    version,
    about = "Elastic, memcached-compatible cache pool"
)]
struct Cli {
    /// How log lines are written to stderr: `text` for people (coloured only when stderr is a
    /// terminal and NO_COLOR is unset) or `json`, one object per line, for log shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CACHEPOOL_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// The format of the log on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event: time, level, target, message and fields.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, the event's fields and
    /// `target` at the top level, and the spans the event happened in.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole local stack (operator, a default pool of local nodes) until Ctrl-C.
    Up(up::UpArgs),
    /// Run the operator: reconcile CachePool resources into live pools.
    Operator(operator::OperatorArgs),
    /// Run the web site (image site and its JSON API) over a pool run by the operator.
    Web(web::WebArgs),
    /// Run one cache node: memcached text protocol plus the admin HTTP API.
    Node(cache_node::NodeConfig),
    /// Print the CachePool CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Benchmarks against Debian's memcached and between policies (see docs/benchmarks.md).
    #[cfg(feature = "bench")]
    Bench(cachepool_bench::BenchArgs),
    /// Benchmarks: not in this build (it was built without the `bench` feature).
    #[cfg(not(feature = "bench"))]
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A benchmark's report is its output: the parts it starts in-process (operator, site) log
    // warnings only, unless RUST_LOG asks for more.
    let default_level = match cli.command {
        #[cfg(feature = "bench")]
        Command::Bench(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        // The signal handlers are installed before anything starts, so a SIGTERM that comes
        // right after the first line is printed still stops everything in order.
        Command::Up(args) => runtime()?.block_on(async {
            let stop = shutdown_signal_now()?;
            args.run(stop).await
        }),
        Command::Operator(args) => runtime()?.block_on(async {
            let stop = shutdown_signal_now()?;
            args.run(stop).await
        }),
        Command::Web(args) => runtime()?.block_on(async {
            let stop = shutdown_signal_now()?;
            web::run(args, stop).await
        }),
        Command::Node(config) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads())
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                // As for the other roles: a SIGTERM that comes as soon as the node has logged
                // its start drains it rather than killing it.
                let stop = shutdown_signal_now()?;
                let node = cache_node::Node::start(config).await?;
                node.run_until(stop).await;
                anyhow::Ok(())
            })
        }
        Command::Crd => {
            print!("{}", cachepool_crds::pool::crd_yaml());
            Ok(())
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => cachepool_bench::run(args),
        #[cfg(not(feature = "bench"))]
        Command::Bench { .. } => anyhow::bail!(
            "this cachepool was built without its benchmarks (a production build); build it \
             with the default `bench` feature, e.g. `cargo build --release`, to run them"
        ),
    }
}

/// The log subscriber for every subcommand: `RUST_LOG` or `default_level`, on stderr, in
/// `format`. Colour codes only reach a terminal: in a file, a pipe or a log collector they are
/// noise that breaks searching (and `NO_COLOR` turns them off on a terminal too).
fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal as _;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).init();
        }
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// The runtime of the operator and the local stack: little CPU, mostly waiting on nodes.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Installs the Ctrl-C and SIGTERM handlers at once (inside the runtime) and returns a future
/// that resolves on either.
fn shutdown_signal_now() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}
