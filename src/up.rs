//! `cachepool up`: the whole local stack on embedded defaults, in one command.
//!
//! Everything lives under one data directory: the pool manifests (`pools/`, seeded with the
//! local example pool on first run), the operator's state and the nodes' files, and the
//! generated credentials (`credentials.json`, mode 0600, kept so that scripts and bookmarks
//! keep working across runs). The URLs and credentials are printed one per line, then it runs
//! until Ctrl-C or SIGTERM and stops every process it started. The site follows the default
//! pool `default/local`; its database is SQLite and its images a directory, both under
//! `web/` in the data directory.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::operator::{Operator, RunArgs};
use crate::web::{Web, WebArgs};

/// The pool `cachepool up` creates when its pool directory has none.
const DEFAULT_POOL: &str = include_str!("../examples/local.yaml");

/// `cachepool up` flags.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where pools, node state and credentials live (default: $XDG_DATA_HOME/cachepool or
    /// ~/.local/share/cachepool).
    #[arg(long, env = "CACHEPOOL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address every service listens on.
    #[arg(long, env = "CACHEPOOL_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port of the web site (0: any free port).
    #[arg(long, env = "CACHEPOOL_SITE_PORT", default_value_t = 8080)]
    pub site_port: u16,

    /// Port of the operator's API (0: any free port).
    #[arg(long, env = "CACHEPOOL_API_PORT", default_value_t = 7070)]
    pub api_port: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    api_token: String,
    api_read_token: String,
    admin_password: String,
}

impl UpArgs {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let credentials = credentials(&data_dir)?;
        let pools = data_dir.join("pools");
        seed_pools(&pools)?;
        let args = RunArgs {
            listen: format!("{}:{}", self.host, self.api_port),
            api_token: Some(credentials.api_token.clone()),
            api_read_token: Some(credentials.api_read_token.clone()),
            sample_interval_ms: 2000,
            probe_interval_ms: 500,
            node_timeout_secs: 10,
            keep_nodes: false,
        };
        let operator = Operator::start(&pools, &args, credentials.api_token.clone()).await?;
        let web_args = WebArgs {
            listen: format!("{}:{}", self.host, self.site_port),
            database_url: None,
            data_dir: data_dir.join("web"),
            s3_bucket: None,
            s3_prefix: "images/".into(),
            s3_region: None,
            s3_endpoint: None,
            operator_api: operator.api_url(),
            operator_token: credentials.api_read_token.clone(),
            pool: "default/local".into(),
            admin_token: credentials.api_token.clone(),
        };
        let web = match Web::start(&web_args).await {
            Ok(web) => web,
            Err(e) => {
                let _ = operator.stop().await;
                return Err(e.context("starting the site"));
            }
        };
        println!("site: {}", web.url());
        println!("api: {}", operator.api_url());
        println!("api token: {}", credentials.api_token);
        println!("api read token: {}", credentials.api_read_token);
        println!("admin password: {}", credentials.admin_password);
        println!("pools: {}", pools.display());
        let api = operator.api_url();
        let token = credentials.api_token.clone();
        let announce = tokio::spawn(async move {
            if let Some(addresses) = first_ring(&api, &token).await {
                println!("memcached: {}", addresses.join(" "));
            }
        });
        shutdown.await;
        announce.abort();
        web.stop().await;
        operator.stop().await
    }
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("cachepool"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no HOME: pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/cachepool"))
}

/// The stored credentials, generated on first run.
fn credentials(data_dir: &Path) -> anyhow::Result<Credentials> {
    let path = data_dir.join("credentials.json");
    if let Ok(bytes) = std::fs::read(&path) {
        return serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not valid; delete it to generate new credentials",
                path.display()
            )
        });
    }
    let credentials = Credentials {
        api_token: secret(),
        api_read_token: secret(),
        admin_password: secret(),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(&serde_json::to_vec_pretty(&credentials)?)?;
    Ok(credentials)
}

/// 128 random bits, hex.
fn secret() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the default pool when the pool directory holds no manifest.
fn seed_pools(pools: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(pools).with_context(|| format!("creating {}", pools.display()))?;
    let has_manifest = std::fs::read_dir(pools)?.flatten().any(|e| {
        e.path()
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml")
    });
    if !has_manifest {
        std::fs::write(pools.join("local.yaml"), DEFAULT_POOL)?;
    }
    Ok(())
}

/// Waits (up to a minute) for the first pool's first ring and returns its addresses.
async fn first_ring(api: &str, token: &str) -> Option<Vec<String>> {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        let pools: serde_json::Value = client
            .get(format!("{api}/api/v1/pools"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let members = pools["items"]
            .as_array()
            .and_then(|items| items.first())
            .and_then(|pool| pool["status"]["ring"]["members"].as_array().cloned());
        if let Some(members) = members.filter(|m| !m.is_empty()) {
            return Some(
                members
                    .iter()
                    .filter_map(|m| m["address"].as_str().map(str::to_owned))
                    .collect(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
