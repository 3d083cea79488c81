//! Starting and stopping the whole site from its configuration: database, object store, the
//! pool client following the operator's ring, the JSON API, the pages and the manager, the
//! HTTP server. `cachepool web`, `cachepool up` and the benchmarks all start the site this way
//! ([`Web::start`]); the flags are [`WebArgs`] (clap, each with an environment variable, like
//! the node's `NodeConfig`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cache_node::client::ClientOptions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::api::AppState;
use crate::app;
use crate::cache::{CacheConfig, DEFAULT_LEASE, DEFAULT_LOCAL_BYTES, ImageCache};
use crate::listener::{ClientAddr, SiteListener};
use crate::ring::RingSource;
use crate::store::{Database, ObjectStore, Storage};
use crate::ui::auth::hash_password;
use crate::ui::operator::OperatorClient;
use crate::ui::{Ui, UiConfig};

/// Why the site could not start: what it was doing, and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag cannot work as given.
    #[error("{0}")]
    Config(String),
    /// A step of the start-up failed.
    #[error("{action}: {source}")]
    Failed {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn failed<E: std::error::Error + Send + Sync + 'static>(
    action: impl Into<String>,
) -> impl FnOnce(E) -> ServeError {
    let action = action.into();
    move |e| ServeError::Failed {
        action,
        source: Box::new(e),
    }
}

/// `cachepool web` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct WebArgs {
    /// Address of the site.
    #[arg(long, env = "CACHEPOOL_WEB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Metadata database: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB (default: a SQLite
    /// file in --data-dir).
    #[arg(long, env = "CACHEPOOL_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the default SQLite file and image directory live.
    #[arg(
        long,
        env = "CACHEPOOL_WEB_DATA_DIR",
        default_value = "cachepool-web-data"
    )]
    pub data_dir: PathBuf,

    /// Keep images in this S3 bucket instead of a local directory.
    #[arg(long, env = "CACHEPOOL_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Object key prefix in the bucket.
    #[arg(long, env = "CACHEPOOL_S3_PREFIX", default_value = "images/")]
    pub s3_prefix: String,

    /// The bucket's region (default: the AWS default chain's).
    #[arg(long, env = "CACHEPOOL_S3_REGION")]
    pub s3_region: Option<String>,

    /// An S3-compatible endpoint instead of AWS (path-style addressing).
    #[arg(long, env = "CACHEPOOL_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// The operator's API, where the pool's ring comes from.
    #[arg(
        long,
        env = "CACHEPOOL_OPERATOR_API",
        default_value = "http://127.0.0.1:7070"
    )]
    pub operator_api: String,

    /// A token of the operator's API that may read.
    #[arg(long, env = "CACHEPOOL_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: String,

    /// The pool the site caches in, as NAMESPACE/NAME.
    #[arg(long, env = "CACHEPOOL_POOL", default_value = "default/local")]
    pub pool: String,

    /// Bearer token that may delete all application data through the site's API.
    #[arg(long, env = "CACHEPOOL_WEB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    /// A token of the operator's API that may write, for the manager's forms and buttons
    /// (default: --operator-token, which then must be an admin token for them to work).
    #[arg(long, env = "CACHEPOOL_OPERATOR_ADMIN_TOKEN", hide_env_values = true)]
    pub operator_admin_token: Option<String>,

    /// The manager's password; hashed with argon2 at start, the plain text is not kept.
    #[arg(
        long,
        env = "CACHEPOOL_ADMIN_PASSWORD",
        hide_env_values = true,
        conflicts_with = "admin_password_hash"
    )]
    pub admin_password: Option<String>,

    /// The manager's password as an argon2 PHC string ($argon2id$v=19$...). Without this or
    /// --admin-password nobody can log in to the manager.
    #[arg(long, env = "CACHEPOOL_ADMIN_PASSWORD_HASH", hide_env_values = true)]
    pub admin_password_hash: Option<String>,

    /// Secret (at least 32 characters) the session cookies are signed with; give every replica
    /// the same one (default: random per process, so a restart logs everybody out).
    #[arg(long, env = "CACHEPOOL_SESSION_SECRET", hide_env_values = true)]
    pub session_secret: Option<String>,

    /// Mark the cookies Secure (set when the site is served over https).
    #[arg(long, env = "CACHEPOOL_SECURE_COOKIES")]
    pub secure_cookies: bool,

    /// A reverse proxy (address or block, e.g. 10.0.0.0/8) whose X-Forwarded-For names the
    /// client, for the login back-off per address; repeat it or separate with commas. From any
    /// other peer the header is ignored. Default: none, the connection's peer is the client.
    #[arg(
        long = "trusted-proxy",
        env = "CACHEPOOL_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_net
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// MiB of hot images kept in the site's memory in front of the pool (0: off, every read
    /// asks the pool). Larger images than an eighth of it are not kept.
    #[arg(long, env = "CACHEPOOL_WEB_LOCAL_CACHE_MIB", default_value_t = DEFAULT_LOCAL_BYTES >> 20)]
    pub local_cache_mib: usize,

    /// Milliseconds an image kept in memory is served before the pool is asked again; every
    /// re-upload and delete-all waits this long before answering, so that no replica serves
    /// the old image afterwards. Give every replica the same value (also one with
    /// --local-cache-mib 0); at most 10000.
    #[arg(
        long,
        env = "CACHEPOOL_WEB_LOCAL_CACHE_LEASE_MS",
        default_value_t = DEFAULT_LEASE.as_millis() as u64
    )]
    pub local_cache_lease_ms: u64,
}

impl WebArgs {
    /// The image cache's settings from the flags.
    pub fn cache_config(&self) -> Result<CacheConfig, ServeError> {
        let local_bytes = self
            .local_cache_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| ServeError::Config("--local-cache-mib is too large".to_owned()))?;
        let config = CacheConfig {
            local_bytes,
            lease: Duration::from_millis(self.local_cache_lease_ms),
            ..CacheConfig::default()
        };
        config.validate().map_err(|e| {
            ServeError::Config(format!("--local-cache-mib/--local-cache-lease-ms: {e}"))
        })?;
        Ok(config)
    }
}

/// An address block (`10.0.0.0/8`) or one address (`10.0.0.7`, a block of one).
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("{text:?} is neither an IP address nor an address block like 10.0.0.0/8")
        })
}

/// A running site.
#[derive(Debug)]
pub struct Web {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

impl Web {
    /// Opens the stores, joins the pool and starts serving.
    pub async fn start(args: &WebArgs) -> Result<Web, ServeError> {
        let cache_config = args.cache_config()?;
        std::fs::create_dir_all(&args.data_dir)
            .map_err(failed(format!("creating {}", args.data_dir.display())))?;
        let database_url = match &args.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", args.data_dir.join("web.db").display()),
        };
        let db = Database::connect(&database_url)
            .await
            .map_err(failed("opening the metadata database"))?;
        db.migrate()
            .await
            .map_err(failed("migrating the metadata database"))?;
        let objects = match &args.s3_bucket {
            Some(bucket) => s3_store(args, bucket).await?,
            None => ObjectStore::local(args.data_dir.join("images"))
                .map_err(failed("opening the image directory"))?,
        };
        let storage = Storage::new(db, objects);
        let (namespace, name) = args
            .pool
            .split_once('/')
            .ok_or_else(|| ServeError::Config("--pool must be NAMESPACE/NAME".to_owned()))?;
        let source = RingSource {
            api: args.operator_api.clone(),
            token: args.operator_token.clone(),
            namespace: namespace.to_owned(),
            pool: name.to_owned(),
        };
        let pool = source
            .connect(ClientOptions::default(), Duration::from_secs(60))
            .await
            .map_err(failed("joining the pool"))?;
        let pool = Arc::new(pool);
        let cache = Arc::new(
            ImageCache::new(pool.clone(), cache_config)
                .map_err(failed("configuring the image cache"))?,
        );
        let (stop, stopped) = watch::channel(false);
        let follower = tokio::spawn(source.follow(pool, stopped.clone()));
        let state = AppState::new(storage, cache, &args.admin_token);
        let ui = manager_ui(args, namespace, name).await?;
        let router = app::router_with_pages(state, &ui);
        let listener = TcpListener::bind(&args.listen)
            .await
            .map_err(failed(format!("binding the site to {}", args.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(failed("reading the site's address"))?;
        let mut server_stop = stopped;
        let server = tokio::spawn(async move {
            let served = axum::serve(
                SiteListener::new(listener),
                router.into_make_service_with_connect_info::<ClientAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the site's server failed");
            }
        });
        info!(site = %addr, "site started");
        Ok(Web {
            addr,
            stop,
            server,
            follower,
        })
    }

    /// The site's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving (requests in flight finish) and stops following the ring.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.follower.await;
    }
}

/// The pages and the manager: the password hashed (argon2 is slow, so off the runtime's
/// threads), the session key, the operator client with a token that may write.
async fn manager_ui(args: &WebArgs, namespace: &str, name: &str) -> Result<Ui, ServeError> {
    let password_hash = match (&args.admin_password, &args.admin_password_hash) {
        (Some(plain), _) => {
            let plain = plain.clone();
            Some(
                tokio::task::spawn_blocking(move || hash_password(&plain))
                    .await
                    .map_err(failed("hashing the manager's password"))?
                    .map_err(failed("hashing the manager's password"))?,
            )
        }
        (None, Some(hash)) => Some(hash.clone()),
        (None, None) => {
            tracing::warn!(
                "no admin password configured (--admin-password or --admin-password-hash): nobody can log in to the manager"
            );
            None
        }
    };
    let token = args
        .operator_admin_token
        .as_deref()
        .unwrap_or(&args.operator_token);
    let operator = OperatorClient::new(&args.operator_api, token, namespace, name)
        .map_err(failed("the operator's API client"))?;
    Ui::new(UiConfig {
        password_hash,
        session_secret: args.session_secret.clone(),
        secure_cookies: args.secure_cookies,
        operator,
        trusted_proxies: args.trusted_proxies.clone(),
    })
    .map_err(failed("the manager"))
}

#[cfg(feature = "s3")]
async fn s3_store(args: &WebArgs, bucket: &str) -> Result<ObjectStore, ServeError> {
    ObjectStore::s3(crate::store::S3Config {
        bucket: bucket.to_owned(),
        prefix: args.s3_prefix.clone(),
        region: args.s3_region.clone(),
        endpoint: args.s3_endpoint.clone(),
        force_path_style: args.s3_endpoint.is_some(),
        access_key_id: None,
        secret_access_key: None,
    })
    .await
    .map_err(failed("opening the S3 bucket"))
}

#[cfg(not(feature = "s3"))]
async fn s3_store(_: &WebArgs, bucket: &str) -> Result<ObjectStore, ServeError> {
    Err(ServeError::Config(format!(
        "--s3-bucket {bucket}: this build has no S3 support; build with `--features s3` (or `production`)"
    )))
}
