//! `cachepool operator`: the operator's command line. The operator itself (front end,
//! providers, drivers, API) is `cachepool_operator::run`; this module only turns flags into its
//! `Config`, and `cachepool up` reuses the flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::run::{Config, NodeBackend, Operator};

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

    /// EC2 and CloudWatch (`--aws`), in src/aws.rs.
    #[command(flatten)]
    pub aws: crate::aws::AwsArgs,
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

impl RunArgs {
    /// The driver's timing from the flags.
    fn driver(&self) -> DriverOptions {
        DriverOptions {
            probe_interval: Duration::from_millis(self.probe_interval_ms),
            sample_interval: Duration::from_millis(self.sample_interval_ms),
            node_timeout: Duration::from_secs(self.node_timeout_secs),
            ..DriverOptions::default()
        }
    }

    /// The operator's configuration for a standalone operator over `dir` whose nodes are
    /// children of this executable.
    pub fn config(&self, dir: &Path, admin_token: String) -> anyhow::Result<Config> {
        let binary = std::env::current_exe().context("finding the cachepool executable")?;
        let mut config = Config::standalone(
            dir,
            NodeBackend::Process { binary },
            self.listen.clone(),
            admin_token,
        );
        config.tokens.read = self.api_read_token.clone();
        config.driver = self.driver();
        config.keep_nodes = self.keep_nodes;
        Ok(config)
    }
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
        let mut config = self.run.config(&dir, token)?;
        self.aws.apply(&mut config).await?;
        let operator = Operator::start(config).await?;
        println!("api: {}", operator.api_url());
        operator.run_until(shutdown).await?;
        Ok(())
    }
}
