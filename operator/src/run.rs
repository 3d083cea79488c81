//! Starting and stopping a whole operator: front end, providers, pool drivers and HTTP API,
//! from one [`Config`]. The `cachepool operator` and `cachepool up` commands only turn flags
//! into a `Config`; tests start operators in-process the same way (with
//! [`NodeBackend::Embedded`], without any binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{self, ApiState, Tokens};
use crate::driver::{Context, DriverOptions};
use crate::events::{EventSink, Fanout, FileEvents};
use crate::metrics::{AwsCalls, OperatorMetrics};
use crate::provider::embedded::EmbeddedProvider;
use crate::provider::pod::PodProvider;
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
pub enum FrontEnd {
    /// CachePool manifests in a directory (`cachepool operator --standalone DIR`).
    Standalone { dir: PathBuf },
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
        let FrontEnd::Standalone { dir } = &config.front_end;
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
        #[cfg(feature = "ec2")]
        if let Some(ec2) = &config.ec2 {
            use crate::provider::ec2::collect_periodically;
            tokio::spawn(collect_periodically(
                ec2.clone(),
                registry.clone(),
                config.operator_id.clone(),
                ec2.options().gc_interval,
                ec2.options().gc_grace,
                stopped.clone(),
            ));
        }
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

/// Starts an operator and runs it until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    Operator::start(config).await?.run_until(shutdown).await
}
