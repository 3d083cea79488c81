//! A whole node: configuration, the data port, the admin port and the expiry reaper, started
//! together and stopped together. Tests start nodes in-process through `Node::start`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

use crate::admin::{self, AdminState};
use crate::metrics::unix_now;
use crate::server::{self, ServerSettings, Shared};
use crate::store::{Policy, Store};
use crate::{Error, Result};

/// `cachepool node` flags; every one also reads an environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeConfig {
    /// Address of the memcached data port (keep it on a private network: like memcached's,
    /// it has no authentication).
    #[arg(long, env = "CACHEPOOL_LISTEN", default_value = "127.0.0.1:11211")]
    pub listen: String,

    /// Address of the admin HTTP port (health, metrics, stats, config, flush).
    #[arg(
        long,
        env = "CACHEPOOL_ADMIN_LISTEN",
        default_value = "127.0.0.1:11212"
    )]
    pub admin_listen: String,

    /// Capacity in MiB, counting every byte an item costs (key, value and metadata).
    #[arg(long, env = "CACHEPOOL_CAPACITY_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=admin::MAX_CAPACITY_MIB))]
    pub capacity_mib: u64,

    /// Replacement policy: lru, random or sieve. Changeable live through PUT /config.
    #[arg(long, env = "CACHEPOOL_POLICY", default_value = "lru")]
    pub policy: Policy,

    /// Bearer token for the admin API. Without one, the admin API serves reads but refuses
    /// every change.
    #[arg(long, env = "CACHEPOOL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Largest value accepted, in KiB (the pool caches images, hence 16 MiB).
    #[arg(long, env = "CACHEPOOL_MAX_ITEM_SIZE_KIB", default_value_t = 16384,
          value_parser = clap::value_parser!(u64).range(1..=admin::MAX_ITEM_SIZE_KIB))]
    pub max_item_size_kib: u64,

    /// Worker threads serving connections (0: one per CPU).
    #[arg(long, env = "CACHEPOOL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Most simultaneous client connections; further ones get memcached's
    /// "ERROR Too many open connections" and are closed.
    #[arg(long, env = "CACHEPOOL_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Close client connections idle for this many seconds (0: never, as memcached).
    #[arg(long, env = "CACHEPOOL_IDLE_TIMEOUT_SECS", default_value_t = 0)]
    pub idle_timeout_secs: u64,
}

impl NodeConfig {
    /// A configuration for tests and embedding: loopback, ephemeral ports.
    pub fn ephemeral(capacity_mib: u64, policy: Policy, admin_token: Option<&str>) -> NodeConfig {
        NodeConfig {
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            capacity_mib,
            policy,
            admin_token: admin_token.map(str::to_string),
            max_item_size_kib: 16384,
            threads: 2,
            max_connections: 4096,
            idle_timeout_secs: 0,
        }
    }

    /// The worker thread count after resolving 0.
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Node {
    /// Binds both ports and starts serving on the current runtime.
    pub async fn start(config: NodeConfig) -> Result<Node> {
        let data = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let admin = TcpListener::bind(&config.admin_listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.admin_listen.clone(),
                source,
            })?;
        let addr = data.local_addr().map_err(Error::Io)?;
        let admin_addr = admin.local_addr().map_err(Error::Io)?;
        let limit = usize::try_from(config.capacity_mib << 20)
            .map_err(|_| Error::Config("capacity too large".into()))?;
        let store = Arc::new(Store::new(limit, config.policy));
        let settings = ServerSettings {
            max_connections: config.max_connections,
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            threads: config.worker_threads(),
            listen: addr.to_string(),
        };
        let shared = Arc::new(Shared::new(
            store,
            settings,
            (config.max_item_size_kib as usize) << 10,
        ));
        let ready = Arc::new(AtomicBool::new(true));
        let handoff = Arc::new(crate::handoff::Handoff::default());
        let state = AdminState {
            shared: shared.clone(),
            token: config
                .admin_token
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(Arc::from),
            ready: ready.clone(),
            handoff: handoff.clone(),
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task_shared = shared.clone();
        info!(%addr, %admin_addr, capacity_mib = config.capacity_mib, policy = %config.policy, "node starting");
        let task = tokio::spawn(async move {
            let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
            let admin_task = tokio::spawn(async move {
                let app = admin::router(state);
                let _ = axum::serve(admin, app)
                    .with_graceful_shutdown(async {
                        let _ = admin_stop_rx.await;
                    })
                    .await;
            });
            let reaper = tokio::spawn(reap_expired(task_shared.store.clone()));
            server::serve(
                data,
                task_shared,
                async {
                    let _ = stop_rx.await;
                    ready.store(false, Ordering::Relaxed);
                },
                Duration::from_secs(5),
            )
            .await;
            reaper.abort();
            // A stopped node must not keep moving keys behind the operator's back.
            handoff.cancel();
            let _ = admin_stop_tx.send(());
            let _ = admin_task.await;
            info!("node stopped");
        });
        Ok(Node {
            addr,
            admin_addr,
            shared,
            stop: Some(stop_tx),
            task,
        })
    }

    /// Stops accepting, lets open connections finish their batch (up to 5 s), and waits for
    /// every task of the node to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the node stops by itself (it does not, short of a panic) or `signal` fires.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Reclaims expired items in the background, a bounded batch per shard every 100 ms, so
/// memory held by items nobody reads again comes back without waiting for eviction.
async fn reap_expired(store: Arc<Store>) {
    let mut cursors = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = store.clone();
        let mut c = std::mem::take(&mut cursors);
        let Ok(c) = tokio::task::spawn_blocking(move || {
            store.reap_expired(&mut c, 2048, unix_now());
            c
        })
        .await
        else {
            return;
        };
        cursors = c;
    }
}
