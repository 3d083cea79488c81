//! `cachepool operator`: the operator's command line. The operator itself (front end,
//! providers, drivers, API) is `cachepool_operator::run`; this module only turns flags into its
//! `Config`, and `cachepool up` reuses the flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::kubernetes::{LeaderElection, LeaseTiming, OwnPod};
use cachepool_operator::run::{Config, FrontEnd, KubeClient, NodeBackend, Operator};

/// `cachepool operator` flags.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Reconcile the CachePool manifests (`*.yaml`) in this directory, with nodes as local
    /// processes. Runtime state goes to DIR/.cachepool.
    /// Without --standalone or --kubernetes, Kubernetes mode is chosen inside a pod
    /// (`KUBERNETES_SERVICE_HOST` set), and anywhere else the command asks for one of them.
    #[arg(long, value_name = "DIR")]
    pub standalone: Option<PathBuf>,

    /// Reconcile the CachePool objects of a Kubernetes cluster: the one this pod runs in, else
    /// the kubeconfig's (`KUBECONFIG`, ~/.kube/config). Pools with `provider: {process: {}}`
    /// are not served in this mode (they report Degraded/ProviderUnavailable).
    #[arg(long, env = "CACHEPOOL_KUBERNETES", conflicts_with = "standalone")]
    pub kubernetes: bool,

    #[command(flatten)]
    pub kube: KubeArgs,

    #[command(flatten)]
    pub run: RunArgs,

    /// EC2 and CloudWatch (`--aws`), in src/aws.rs.
    #[command(flatten)]
    pub aws: crate::aws::AwsArgs,
}

/// `cachepool operator --kubernetes` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// Watch CachePools of this namespace only (default: every namespace).
    #[arg(long, env = "CACHEPOOL_WATCH_NAMESPACE", requires = "kubernetes")]
    pub namespace: Option<String>,

    /// Run without leader election: for a single replica only (two replicas would both act).
    #[arg(long, env = "CACHEPOOL_NO_LEADER_ELECTION", requires = "kubernetes")]
    pub no_leader_election: bool,

    /// Namespace of the leader-election Lease [default: $POD_NAMESPACE, else the pod's service
    /// account namespace, else `default`].
    #[arg(
        long,
        env = "CACHEPOOL_LEADER_ELECTION_NAMESPACE",
        requires = "kubernetes"
    )]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease (coordination.k8s.io/v1).
    #[arg(
        long,
        env = "CACHEPOOL_LEASE_NAME",
        default_value = "cachepool-operator",
        requires = "kubernetes"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease and on its Events [default: $POD_NAME, else the
    /// host name].
    #[arg(long, env = "CACHEPOOL_IDENTITY", requires = "kubernetes")]
    pub identity: Option<String>,

    /// Image of node pods (`provider: {pod: …}` pools that name none): the operator's own
    /// image, which the Helm chart passes. Without it pod pools report
    /// Degraded/ProviderUnavailable.
    #[arg(long, env = "CACHEPOOL_NODE_IMAGE")]
    pub node_image: Option<String>,
}

/// This replica's pod, from the downward API (`POD_NAME`, `POD_NAMESPACE`): labelled while it
/// leads, so the chart's API Service routes to the leader alone.
fn own_pod() -> Option<OwnPod> {
    let read = |var: &str| {
        std::env::var(var)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    Some(OwnPod {
        namespace: read("POD_NAMESPACE")?,
        name: read("POD_NAME")?,
    })
}

impl KubeArgs {
    fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| format!("cachepool-operator-{:08x}", rand::random::<u32>()))
    }

    fn lease_namespace(&self) -> String {
        const SERVICE_ACCOUNT_NAMESPACE: &str =
            "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
        self.leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
            .map(|ns| ns.trim().to_owned())
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_owned())
    }

    /// The front end these flags describe.
    fn front_end(&self) -> FrontEnd {
        let identity = self.identity();
        FrontEnd::Kubernetes {
            namespace: self.namespace.clone(),
            leader_election: (!self.no_leader_election).then(|| LeaderElection {
                namespace: self.lease_namespace(),
                lease_name: self.lease_name.clone(),
                identity,
                timing: LeaseTiming::default(),
                pod: own_pod(),
            }),
            client: KubeClient::infer(),
            node_image: self.node_image.clone(),
        }
    }
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
        let Some(token) = self.run.api_token.clone() else {
            bail!("--api-token (or CACHEPOOL_API_TOKEN) is required: the API changes pools");
        };
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        if !self.kubernetes && self.standalone.is_none() && !in_pod {
            bail!(
                "say where pools come from: --standalone DIR (manifests in a directory) or \
                 --kubernetes (CachePool objects of the cluster in the kubeconfig)"
            );
        }
        let mut config = if self.kubernetes || self.standalone.is_none() {
            // The directory is never used: Kubernetes mode runs no local processes.
            let mut config = self.run.config(Path::new("."), token)?;
            config.front_end = self.kube.front_end();
            // One id for the installation, not per replica: the next leader adopts the nodes.
            config.operator_id = self.kube.lease_name.clone();
            config
        } else {
            let dir = self
                .standalone
                .clone()
                .context("--standalone DIR is required")?;
            self.run.config(&dir, token)?
        };
        self.aws.apply(&mut config).await?;
        let operator = Operator::start(config).await?;
        println!("api: {}", operator.api_url());
        operator.run_until(shutdown).await?;
        Ok(())
    }
}
