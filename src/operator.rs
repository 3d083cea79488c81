//! `cachepool operator`: the operator's command line and its assembly (state directory,
//! process provider, pool drivers, HTTP API), shared with `cachepool up`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cachepool_operator::api::{self, ApiState, Tokens};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::metrics::OperatorMetrics;
use cachepool_operator::provider::Provider as _;
use cachepool_operator::provider::process::{ProcessOptions, ProcessProvider};
use cachepool_operator::standalone::{self, Registry, StandaloneOptions};
use cachepool_operator::state::StateDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// `cachepool operator` flags.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Reconcile the CachePool manifests (`*.yaml`) in this directory, with nodes as local
    /// processes. Runtime state goes to DIR/.cachepool.
    #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
    pub standalone: Option<PathBuf>,

    /// Reconcile CachePool objects of the Kubernetes cluster in the kubeconfig.
    #[arg(long, conflicts_with = "standalone")]
    pub kubernetes: bool,

    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags shared by `cachepool operator` and `cachepool up`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Address of the HTTP API, metrics and health probes (port 0: any free port).
    #[arg(
        long,
        env = "CACHEPOOL_OPERATOR_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    pub listen: String,

    /// Bearer token that may read and change pools through the API.
    #[arg(long, env = "CACHEPOOL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Bearer token that may only read (for dashboards and the web's charts).
    #[arg(long, env = "CACHEPOOL_API_READ_TOKEN", hide_env_values = true)]
    pub api_read_token: Option<String>,

    /// How often every node's stats are sampled, in milliseconds.
    #[arg(long, env = "CACHEPOOL_SAMPLE_INTERVAL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub sample_interval_ms: u64,

    /// How often nodes are probed when nothing is in progress, in milliseconds.
    #[arg(long, env = "CACHEPOOL_PROBE_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(20..=60_000))]
    pub probe_interval_ms: u64,

    /// A ready node that stops answering for this many seconds is replaced.
    #[arg(long, env = "CACHEPOOL_NODE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub node_timeout_secs: u64,

    /// Leave the nodes running on exit, for the next operator on the same directory to adopt
    /// (an upgrade that keeps the cache). By default every node is stopped.
    #[arg(long, env = "CACHEPOOL_KEEP_NODES")]
    pub keep_nodes: bool,
}

impl OperatorArgs {
    /// Runs the operator until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        if self.kubernetes {
            bail!(
                "Kubernetes mode is not available in this build yet; run `cachepool operator --standalone DIR`"
            );
        }
        let dir = self.standalone.context("--standalone DIR is required")?;
        let Some(token) = self.run.api_token.clone() else {
            bail!("--api-token (or CACHEPOOL_API_TOKEN) is required: the API changes pools");
        };
        let operator = Operator::start(&dir, &self.run, token).await?;
        println!("api: {}", operator.api_url());
        operator.run_until(shutdown).await
    }
}

/// A running standalone operator: API server, pool drivers and their nodes.
pub struct Operator {
    api_addr: SocketAddr,
    keep_nodes: bool,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    standalone: tokio::task::JoinHandle<()>,
    provider: Arc<ProcessProvider>,
}

impl Operator {
    /// Opens the state directory, adopts the nodes a previous operator left, starts the API and
    /// the pool drivers.
    pub async fn start(
        dir: &std::path::Path,
        args: &RunArgs,
        admin_token: String,
    ) -> anyhow::Result<Operator> {
        let state = StateDir::open(dir)
            .with_context(|| format!("opening the state directory {}", dir.display()))?;
        let binary = std::env::current_exe().context("finding the cachepool executable")?;
        let provider = Arc::new(
            ProcessProvider::open(ProcessOptions::new(binary, state.run_dir()))
                .await
                .context("opening the process provider's run directory")?,
        );
        let registry = Arc::new(Registry::default());
        let metrics = OperatorMetrics::new();
        let listener = TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding the API to {}", args.listen))?;
        let api_addr = listener.local_addr()?;
        let router = api::router(ApiState {
            registry: registry.clone(),
            tokens: Tokens {
                admin: admin_token,
                read: args.api_read_token.clone(),
            },
            metrics: metrics.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let mut server_stop = stopped.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "the API server failed");
            }
        });
        let options = StandaloneOptions {
            driver: DriverOptions {
                probe_interval: Duration::from_millis(args.probe_interval_ms),
                sample_interval: Duration::from_millis(args.sample_interval_ms),
                node_timeout: Duration::from_secs(args.node_timeout_secs),
                ..DriverOptions::default()
            },
            ..StandaloneOptions::default()
        };
        let standalone = tokio::spawn(standalone::run(
            state.clone(),
            provider.clone(),
            registry,
            metrics,
            options,
            stopped,
        ));
        info!(api = %api_addr, dir = %state.path().display(), "operator started");
        Ok(Operator {
            api_addr,
            keep_nodes: args.keep_nodes,
            stop,
            server,
            standalone,
            provider,
        })
    }

    /// The API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Runs until `shutdown` resolves, then stops the drivers, the API and (unless kept)
    /// every node.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        shutdown.await;
        self.stop().await
    }

    /// Stops everything this operator started.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let _ = self.standalone.await;
        let _ = self.server.await;
        if self.keep_nodes {
            info!("leaving the nodes running for the next operator to adopt");
            return Ok(());
        }
        self.provider
            .terminate_all()
            .await
            .context("stopping the nodes")?;
        info!("every node stopped");
        Ok(())
    }
}
