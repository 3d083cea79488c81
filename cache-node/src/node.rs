//! A whole node: configuration, the data port, the admin port and the expiry reaper, started
//! together and stopped together. Tests start nodes in-process through `Node::start`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

use crate::admin::{self, AdminState};
use crate::metrics::unix_now;
use crate::server::{self, Scheduling, ServerSettings, Shared};
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

    /// Largest item in KiB, counting key, value and the node's 20-byte item header, as
    /// memcached counts `-I`. The default is memcached's 1 MiB; pools pass their own
    /// `cache.maxItemSizeKiB` (16 MiB unless set: the pool caches images).
    #[arg(long, env = "CACHEPOOL_MAX_ITEM_SIZE_KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=admin::MAX_ITEM_SIZE_KIB))]
    pub max_item_size_kib: u64,

    /// Largest item as memcached's `-I` takes it: bytes, or with a k or m suffix (`512k`,
    /// `1m`, `2m`), from 1k to 1024m. Overrides --max-item-size-kib [default: 1m]
    #[arg(short = 'I', long, env = "CACHEPOOL_MAX_ITEM_SIZE",
          value_parser = parse_item_size, conflicts_with = "max_item_size_kib")]
    pub max_item_size: Option<usize>,

    /// Worker threads serving connections (0: one per CPU).
    #[arg(long, env = "CACHEPOOL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// How connections are spread over the worker threads: `pinned` (each thread its own
    /// event loop, a connection stays on one thread, as memcached) or `shared` (one
    /// work-stealing runtime).
    #[arg(long, env = "CACHEPOOL_SCHEDULING", default_value_t = Scheduling::Pinned)]
    pub scheduling: Scheduling,

    /// Most simultaneous client connections; further ones get memcached's
    /// "ERROR Too many open connections" and are closed.
    #[arg(long, env = "CACHEPOOL_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Close client connections idle for this many seconds (0: never, as memcached).
    #[arg(long, env = "CACHEPOOL_IDLE_TIMEOUT_SECS", default_value_t = 0)]
    pub idle_timeout_secs: u64,

    /// Once both ports are bound, write `{"pid", "address", "adminAddress"}` (JSON) to this
    /// file, atomically: with port 0 in the listen flags, this is how a supervisor learns the
    /// ports the node really got, without racing another process for a port it picked.
    #[arg(long, env = "CACHEPOOL_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
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
            max_item_size: None,
            threads: 2,
            scheduling: Scheduling::Pinned,
            max_connections: 4096,
            idle_timeout_secs: 0,
            addr_file: None,
        }
    }

    /// The item size limit in bytes: `--max-item-size` if given, else `--max-item-size-kib`.
    pub fn item_size_limit(&self) -> usize {
        self.max_item_size
            .unwrap_or((self.max_item_size_kib as usize) << 10)
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

/// Parses an item size the way memcached's `-I` does: a byte count, or kibibytes or
/// mebibytes with a `k` or `m` suffix (either case), between 1 KiB and 1 GiB.
pub fn parse_item_size(text: &str) -> std::result::Result<usize, String> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        _ => (text, 0),
    };
    let bad = || {
        format!(
            "invalid item size {text:?}: expected bytes or a size with a k or m suffix, \
             from 1k to 1024m (for example 1m, 512k, 2m)"
        )
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let size = digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(bad)?;
    if !(1 << 10..=1 << 30).contains(&size) {
        return Err(bad());
    }
    Ok(size)
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
        if let Some(path) = &config.addr_file {
            write_addr_file(path, addr, admin_addr)?;
        }
        let limit = usize::try_from(config.capacity_mib << 20)
            .map_err(|_| Error::Config("capacity too large".into()))?;
        let store = Arc::new(Store::new(limit, config.policy));
        let settings = ServerSettings {
            max_connections: config.max_connections,
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            threads: config.worker_threads(),
            scheduling: config.scheduling,
            listen: addr.to_string(),
        };
        let shared = Arc::new(Shared::new(store, settings, config.item_size_limit()));
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

/// Writes the bound addresses to `path` through a temporary file in the same directory and a
/// rename, so a reader polling for the file never sees it half written.
fn write_addr_file(path: &Path, addr: SocketAddr, admin_addr: SocketAddr) -> Result<()> {
    let body = serde_json::json!({
        "pid": std::process::id(),
        "address": addr.to_string(),
        "adminAddress": admin_addr.to_string(),
    });
    let fail = |source: std::io::Error| {
        Error::Config(format!(
            "cannot write the address file {}: {source}; check that its directory exists and is writable",
            path.display()
        ))
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, body.to_string()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        fail(err)
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeConfig,
    }

    fn limit_of(args: &[&str]) -> Result<usize, String> {
        let argv = std::iter::once("node").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.node.item_size_limit())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn item_size_flags_default_to_memcached_and_take_its_sizes() {
        assert_eq!(limit_of(&[]), Ok(1 << 20));
        assert_eq!(limit_of(&["-I", "2m"]), Ok(2 << 20));
        assert_eq!(limit_of(&["--max-item-size", "512k"]), Ok(512 << 10));
        assert_eq!(limit_of(&["--max-item-size", "1M"]), Ok(1 << 20));
        assert_eq!(limit_of(&["-I", "4096"]), Ok(4096));
        // What the operator passes for a pool's cache.maxItemSizeKiB.
        assert_eq!(limit_of(&["--max-item-size-kib", "16384"]), Ok(16 << 20));
        for bad in ["1.5m", "2x", "100", "0", "2048m", "-1", "", "m", "1g"] {
            let err = limit_of(&[&format!("--max-item-size={bad}")]).unwrap_err();
            assert!(err.contains("invalid item size"), "{bad}: {err}");
        }
        assert!(limit_of(&["-I", "1m", "--max-item-size-kib", "1024"]).is_err());
    }

    /// A directory of its own under the system temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir()
                .join(format!("cache-node-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn addr_file_names_the_bound_ports_and_pid() {
        let dir = TempDir::new("addr-file");
        let path = dir.0.join("node.addr");
        let config = NodeConfig {
            addr_file: Some(path.clone()),
            ..NodeConfig::ephemeral(1, Policy::Lru, None)
        };
        let node = Node::start(config).await.unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            written,
            serde_json::json!({
                "pid": std::process::id(),
                "address": node.addr.to_string(),
                "adminAddress": node.admin_addr.to_string(),
            })
        );
        assert_ne!(node.addr.port(), 0);
        assert_ne!(node.admin_addr.port(), 0);
        // Only the file itself is left: the temporary file was renamed over it.
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("node.addr")]);
        node.shutdown().await;
    }

    #[tokio::test]
    async fn unwritable_addr_file_fails_the_start_with_its_path() {
        let dir = TempDir::new("addr-file-missing");
        let path = dir.0.join("no-such-dir").join("node.addr");
        let config = NodeConfig {
            addr_file: Some(path.clone()),
            ..NodeConfig::ephemeral(1, Policy::Lru, None)
        };
        let err = Node::start(config).await.unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
