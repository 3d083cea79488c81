//! Starting and stopping a whole operator: front end, providers, pool drivers and HTTP API,
//! from one [`Config`]. The `cachepool operator` and `cachepool up` commands only turn flags
//! into a `Config`; tests start operators in-process the same way (with
//! [`NodeBackend::Embedded`], without any binary).
//!
//! Two front ends: the state directory ([`FrontEnd::Standalone`]) and the Kubernetes API
//! ([`FrontEnd::Kubernetes`], see [`crate::kubernetes`]). In Kubernetes mode every replica
//! serves the API, metrics and probes, but only the leader runs the controller and the pool
//! drivers, and only the leader's `/readyz` answers ready (once its watch has listed every
//! pool), so a Service in front of the replicas routes API calls to the leader alone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{self, ApiState, Tokens};
use crate::driver::{Context, DriverOptions};
use crate::events::{EventSink, Fanout, FileEvents};
use crate::kubernetes::{
    self, Controller, Fence, KubeEvents, KubePods, KubeStore, KubernetesOptions,
};
use crate::metrics::{AwsCalls, OperatorMetrics};
use crate::provider::embedded::EmbeddedProvider;
use crate::provider::pod::{PodOptions, PodProvider};
use crate::provider::process::{ProcessOptions, ProcessProvider};
use crate::provider::{PoolProvider, Providers, ShutdownPolicy};
use crate::registry::Registry;
use crate::standalone::{self, StandaloneOptions, StandaloneStore};
use crate::state::StateDir;
use crate::traffic::Traffic;

/// Why an operator could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: crate::state::Error,
    },
    #[error("opening the process provider's run directory: {0}")]
    Provider(#[source] crate::provider::Error),
    #[error("binding the API to {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("stopping the nodes: {0}")]
    Stop(#[source] crate::provider::Error),
    #[error("starting Kubernetes mode: {0}")]
    Kubernetes(#[source] crate::kubernetes::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What runs `provider: {process: {}}` pools.
#[derive(Clone, Debug)]
pub enum NodeBackend {
    /// `BINARY node …` child processes (the `cachepool` executable).
    Process { binary: PathBuf },
    /// Nodes inside this process (tests, benchmarks): the given provider, so the caller can
    /// look inside its nodes.
    Embedded(Arc<EmbeddedProvider>),
}

/// Where the operator finds its pools.
#[derive(Clone, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value, built once at start-up: boxing would only cost its readers"
)]
pub enum FrontEnd {
    /// CachePool manifests in a directory (`cachepool operator --standalone DIR`).
    Standalone { dir: PathBuf },
    /// CachePool objects of a Kubernetes cluster (`cachepool operator --kubernetes`).
    /// `provider: {process: {}}` is not served there (nodes as local processes of an operator
    /// pod would die with it), except by an embedded backend in tests.
    Kubernetes {
        /// Watch this namespace only; every namespace when `None`.
        namespace: Option<String>,
        /// Act only while holding this Lease; `None` acts at once (a single replica).
        leader_election: Option<kubernetes::LeaderElection>,
        /// The API server; [`KubeClient::infer`] finds it from the pod or the kubeconfig.
        client: KubeClient,
        /// The image node pods run (`provider: {pod: …}` pools without their own image):
        /// the operator's own. Without it, and without [`Config::pods`], pod pools are
        /// refused (Degraded/ProviderUnavailable).
        node_image: Option<String>,
    },
}

/// Garbage collection of instances no pool knows, with the provider's own interval and grace
/// (`--ec2-gc-grace-secs`), in either front end; it acts only while the registry is ready.
#[cfg_attr(
    not(feature = "ec2"),
    allow(
        unused_variables,
        reason = "without the EC2 provider there is nothing to collect"
    )
)]
fn spawn_ec2_collector(config: &Config, registry: &Arc<Registry>, stopped: &watch::Receiver<bool>) {
    #[cfg(feature = "ec2")]
    if let Some(ec2) = &config.ec2 {
        tokio::spawn(crate::provider::ec2::collect_periodically(
            ec2.clone(),
            registry.clone(),
            config.operator_id.clone(),
            ec2.options().gc_interval,
            ec2.options().gc_grace,
            stopped.clone(),
        ));
    }
}

/// The Kubernetes client an operator uses: given (tests: a scripted API server), or found at
/// start-up.
#[derive(Clone, Default)]
pub struct KubeClient(Option<kube::Client>);

impl KubeClient {
    /// In-cluster configuration, else the kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    pub fn infer() -> KubeClient {
        KubeClient(None)
    }

    /// This client.
    pub fn given(client: kube::Client) -> KubeClient {
        KubeClient(Some(client))
    }

    async fn resolve(&self) -> Result<kube::Client> {
        match &self.0 {
            Some(client) => Ok(client.clone()),
            None => kubernetes::infer_client().await.map_err(Error::Kubernetes),
        }
    }
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "KubeClient(given)"
        } else {
            "KubeClient(infer)"
        })
    }
}

/// Everything an operator is started with.
#[derive(Clone, Debug)]
pub struct Config {
    pub front_end: FrontEnd,
    pub nodes: NodeBackend,
    /// Address of the HTTP API, metrics and probes (port 0: any free port).
    pub listen: String,
    pub tokens: Tokens,
    pub driver: DriverOptions,
    pub standalone: StandaloneOptions,
    /// Leave local nodes running on stop, for the next operator on the same directory.
    pub keep_nodes: bool,
    /// Extra event sinks beside the log and the event file (tests record events).
    pub events: Vec<Arc<dyn EventSink>>,
    /// Metrics sources and sinks beside the direct one.
    pub traffic: Traffic,
    /// Identifies this operator on the nodes it starts (tag `cachepool.io/operator`).
    pub operator_id: String,
    /// Serves `provider: {pod: …}` pools when set.
    pub pods: Option<Arc<PodProvider>>,
    /// Serves `provider: {ec2: …}` pools when set (built with `Ec2Provider::new`).
    #[cfg(feature = "ec2")]
    pub ec2: Option<Arc<crate::provider::ec2::Ec2Provider>>,
    /// Counts the AWS calls shown on `/metrics`: give the EC2 provider and the CloudWatch
    /// client this same handle.
    pub aws_calls: AwsCalls,
}

impl Config {
    /// A standalone operator over `dir` with the given node backend, API on `listen` and
    /// admin token `admin_token`; every other setting at its default.
    pub fn standalone(
        dir: impl Into<PathBuf>,
        nodes: NodeBackend,
        listen: impl Into<String>,
        admin_token: impl Into<String>,
    ) -> Config {
        Config {
            front_end: FrontEnd::Standalone { dir: dir.into() },
            nodes,
            listen: listen.into(),
            tokens: Tokens {
                admin: admin_token.into(),
                read: None,
            },
            driver: DriverOptions::default(),
            standalone: StandaloneOptions::default(),
            keep_nodes: false,
            events: Vec::new(),
            traffic: Traffic::default(),
            operator_id: "standalone".to_owned(),
            pods: None,
            #[cfg(feature = "ec2")]
            ec2: None,
            aws_calls: AwsCalls::new(),
        }
    }
}

/// A running operator.
#[derive(Debug)]
pub struct Operator {
    api_addr: SocketAddr,
    registry: Arc<Registry>,
    metrics: OperatorMetrics,
    providers: Providers,
    keep_nodes: bool,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    front_end: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// Opens the front end, adopts the nodes a previous operator left, starts the API and the
    /// pool drivers.
    pub async fn start(config: Config) -> Result<Operator> {
        match &config.front_end {
            FrontEnd::Standalone { dir } => Operator::start_standalone(dir.clone(), config).await,
            FrontEnd::Kubernetes {
                namespace,
                leader_election,
                client,
                node_image,
            } => {
                let client = client.resolve().await?;
                Operator::start_kubernetes(
                    namespace.clone(),
                    leader_election.clone(),
                    client,
                    node_image.clone(),
                    config,
                )
                .await
            }
        }
    }

    async fn start_standalone(dir: PathBuf, config: Config) -> Result<Operator> {
        let dir = &dir;
        let state = StateDir::open(dir).map_err(|source| Error::State {
            path: dir.clone(),
            source,
        })?;
        let provider = match &config.nodes {
            NodeBackend::Process { binary } => PoolProvider::Process(Arc::new(
                ProcessProvider::open(ProcessOptions::new(binary.clone(), state.run_dir()))
                    .await
                    .map_err(Error::Provider)?,
            )),
            NodeBackend::Embedded(provider) => PoolProvider::Embedded(provider.clone()),
        };
        let mut providers = Providers::process_only(provider);
        providers.pod = config.pods.clone().map(PoolProvider::Pod);
        #[cfg(feature = "ec2")]
        {
            use crate::provider::ec2::Ec2Pool;
            providers.ec2 = config
                .ec2
                .clone()
                .map(|p| PoolProvider::Ec2(Ec2Pool::new(p)));
        }
        let registry = Arc::new(Registry::default());
        let metrics = OperatorMetrics::with_aws_calls(config.aws_calls.clone());
        let (stop, stopped) = watch::channel(false);
        let (api_addr, server) = serve_api(&config, &registry, &metrics, stopped.clone()).await?;
        let mut sinks: Vec<Arc<dyn EventSink>> =
            vec![Arc::new(FileEvents::new(state.events_path()))];
        sinks.extend(config.events.iter().cloned());
        let store = Arc::new(StandaloneStore::new(state.clone()));
        let ctx = Arc::new(Context {
            providers: providers.clone(),
            store: store.clone(),
            events: Arc::new(Fanout(sinks)),
            traffic: config.traffic.clone(),
            metrics: metrics.clone(),
            options: config.driver,
            operator_id: config.operator_id.clone(),
        });
        spawn_ec2_collector(&config, &registry, &stopped);
        let front_end = tokio::spawn(standalone::run(
            store,
            ctx,
            registry.clone(),
            config.standalone,
            stopped,
        ));
        info!(api = %api_addr, dir = %state.path().display(), "operator started");
        Ok(Operator {
            api_addr,
            registry,
            metrics,
            providers,
            keep_nodes: config.keep_nodes,
            stop,
            server,
            front_end,
        })
    }

    async fn start_kubernetes(
        namespace: Option<String>,
        leader_election: Option<kubernetes::LeaderElection>,
        client: kube::Client,
        node_image: Option<String>,
        config: Config,
    ) -> Result<Operator> {
        // Nodes as local processes of an operator pod would die with the pod: `process` is not
        // served here, except by the embedded backend tests run with.
        let mut providers = Providers::default();
        if let NodeBackend::Embedded(provider) = &config.nodes {
            providers.process = Some(PoolProvider::Embedded(provider.clone()));
        }
        let fence = match leader_election {
            Some(_) => Fence::new(),
            None => Fence::open(),
        };
        let fenced = fence.client(&client);
        providers.pod = config
            .pods
            .clone()
            .or_else(|| {
                node_image.map(|image| {
                    Arc::new(PodProvider::new(
                        Arc::new(KubePods::new(fenced.clone())),
                        PodOptions {
                            operator_id: config.operator_id.clone(),
                            ..PodOptions::new(image)
                        },
                    ))
                })
            })
            .map(PoolProvider::Pod);
        #[cfg(feature = "ec2")]
        {
            use crate::provider::ec2::Ec2Pool;
            providers.ec2 = config
                .ec2
                .clone()
                .map(|p| PoolProvider::Ec2(Ec2Pool::new(p)));
        }
        let registry = Arc::new(Registry::default());
        let metrics = OperatorMetrics::with_aws_calls(config.aws_calls.clone());
        let (stop, stopped) = watch::channel(false);
        let (api_addr, server) = serve_api(&config, &registry, &metrics, stopped.clone()).await?;
        // Instances no pool knows: collected only while this replica leads (the registry is
        // ready only then, see `Controller::run`).
        spawn_ec2_collector(&config, &registry, &stopped);
        let instance = leader_election
            .as_ref()
            .map(|e| e.identity.clone())
            .unwrap_or_else(|| config.operator_id.clone());
        let store = Arc::new(KubeStore::new(fenced.clone()));
        let (events, events_task) = KubeEvents::start(fenced.clone(), instance.clone());
        let mut sinks: Vec<Arc<dyn EventSink>> = vec![events.clone()];
        sinks.extend(config.events.iter().cloned());
        let ctx = Arc::new(Context {
            providers: providers.clone(),
            store: store.clone(),
            events: Arc::new(Fanout(sinks)),
            traffic: config.traffic.clone(),
            metrics: metrics.clone(),
            options: config.driver,
            operator_id: config.operator_id.clone(),
        });
        let options = KubernetesOptions {
            namespace,
            instance,
            leader_pod: leader_election.as_ref().and_then(|e| e.pod.clone()),
            ..KubernetesOptions::default()
        };
        let term_registry = registry.clone();
        let term = move |stop: watch::Receiver<bool>| {
            Arc::new(Controller::new(
                fenced.clone(),
                ctx.clone(),
                store.clone(),
                events.clone(),
                term_registry.clone(),
                options.clone(),
                stop,
            ))
            .run()
        };
        let front_end = tokio::spawn(async move {
            match leader_election {
                Some(election) => {
                    kubernetes::leader::run(client, election, fence, stopped, term).await;
                }
                None => {
                    let controller = term(stopped);
                    drop(term);
                    controller.await;
                }
            }
            // Every sender is gone with the controller: the queue drains, then the task ends.
            if tokio::time::timeout(EVENT_DRAIN, events_task)
                .await
                .is_err()
            {
                warn!("events still queued at shutdown were dropped");
            }
        });
        info!(api = %api_addr, "operator started in Kubernetes mode");
        Ok(Operator {
            api_addr,
            registry,
            metrics,
            providers,
            keep_nodes: config.keep_nodes,
            stop,
            server,
            front_end,
        })
    }

    /// The API's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The pools it runs.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Its metrics.
    pub fn metrics(&self) -> &OperatorMetrics {
        &self.metrics
    }

    /// Runs until `shutdown` resolves, then stops.
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        shutdown.await;
        self.stop().await
    }

    /// Stops the drivers and the API, then each provider's nodes as its shutdown policy says
    /// (local nodes stop unless kept; pods and instances stay for the next leader).
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let _ = self.front_end.await;
        let _ = self.server.await;
        for provider in self.providers.all() {
            let keep = match provider.shutdown_policy() {
                ShutdownPolicy::KeepNodes => true,
                ShutdownPolicy::StopNodes => self.keep_nodes,
            };
            if keep {
                info!(provider = %provider.kind(), "leaving the nodes running for the next operator");
                continue;
            }
            provider.stop_all().await.map_err(Error::Stop)?;
            info!(provider = %provider.kind(), "every node stopped");
        }
        Ok(())
    }
}

/// How long queued Kubernetes Events may take to go out when the operator stops.
const EVENT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds the API (with metrics and probes) and serves it until `stopped` turns true.
async fn serve_api(
    config: &Config,
    registry: &Arc<Registry>,
    metrics: &OperatorMetrics,
    mut stopped: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| Error::Bind {
            address: config.listen.clone(),
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| Error::Bind {
        address: config.listen.clone(),
        source,
    })?;
    let router = api::router(ApiState {
        registry: registry.clone(),
        tokens: config.tokens.clone(),
        metrics: metrics.clone(),
    });
    let server = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            warn!(error = %e, "the API server failed");
        }
    });
    Ok((api_addr, server))
}

/// Starts an operator and runs it until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    Operator::start(config).await?.run_until(shutdown).await
}
