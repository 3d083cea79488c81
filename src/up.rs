//! `cachepool up`: the whole local stack on embedded defaults, in one command.
//!
//! Everything lives under one data directory: the pool manifests (`pools/`, seeded with the
//! local example pool on first run), the operator's state and the nodes' files, and the
//! generated credentials (`credentials.json`, mode 0600, kept so that scripts and bookmarks
//! keep working across runs; the manager's password only as its argon2 hash, so it is printed
//! once, when generated). The URLs and credentials are printed one per line, then it runs
//! until Ctrl-C or SIGTERM and stops every process it started. The site follows the default
//! pool `default/local`; its database is SQLite and its images a directory, both under
//! `web/` in the data directory.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use cachepool_crds::client::OperatorClient;
use serde::{Deserialize, Serialize};

use cachepool_operator::Operator;

use crate::operator::RunArgs;
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

    /// Set the manager's password (stored hashed; default: generated on the first run and
    /// printed once).
    #[arg(long, env = "CACHEPOOL_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    api_token: String,
    api_read_token: String,
    /// The manager's password as an argon2 PHC string; the password itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    admin_password_hash: Option<String>,
    /// The plain password earlier versions stored: hashed and dropped from the file on the
    /// next run.
    #[serde(default, skip_serializing)]
    admin_password: Option<String>,
    /// What the site's session cookies are signed with, so sessions survive a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_secret: Option<String>,
}

impl UpArgs {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let data_dir = match self.data_dir {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let (credentials, password_line) = {
            let data_dir = data_dir.clone();
            let given = self.admin_password.clone();
            // argon2 hashing is deliberately slow: off the runtime's threads.
            tokio::task::spawn_blocking(move || credentials(&data_dir, given.as_deref())).await??
        };
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
        let operator = Operator::start(args.config(&pools, credentials.api_token.clone())?).await?;
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
            operator_admin_token: Some(credentials.api_token.clone()),
            admin_password: None,
            admin_password_hash: credentials.admin_password_hash.clone(),
            session_secret: credentials.session_secret.clone(),
            secure_cookies: false,
            trusted_proxies: Vec::new(),
            local_cache_mib: cachepool_web::cache::DEFAULT_LOCAL_BYTES >> 20,
            local_cache_lease_ms: cachepool_web::cache::DEFAULT_LEASE.as_millis() as u64,
        };
        let web = match Web::start(&web_args).await {
            Ok(web) => web,
            Err(e) => {
                let _ = operator.stop().await;
                return Err(anyhow::Error::new(e).context("starting the site"));
            }
        };
        println!("site: {}", web.url());
        println!("manager: {}/manager", web.url());
        println!("api: {}", operator.api_url());
        println!("api token: {}", credentials.api_token);
        println!("api read token: {}", credentials.api_read_token);
        println!("admin password: {password_line}");
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
        operator.stop().await?;
        Ok(())
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

/// The stored credentials, generated on first run, and what to print after `admin password:`.
///
/// The manager's password is stored only as its argon2 hash, so it is printed once: when it
/// is generated. A password given in the configuration replaces the stored hash.
fn credentials(data_dir: &Path, given: Option<&str>) -> anyhow::Result<(Credentials, String)> {
    let path = data_dir.join("credentials.json");
    let stored: Option<Credentials> = match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not valid; delete it to generate new credentials",
                path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let fresh = stored.is_none();
    let mut credentials = stored.unwrap_or_else(|| Credentials {
        api_token: secret(),
        api_read_token: secret(),
        admin_password_hash: None,
        admin_password: None,
        session_secret: None,
    });
    let mut changed = fresh;
    let hash = |plain: &str| cachepool_web::ui::auth::hash_password(plain);
    let line = if let Some(plain) = given {
        credentials.admin_password_hash = Some(hash(plain)?);
        changed = true;
        "(from CACHEPOOL_ADMIN_PASSWORD / --admin-password)".to_owned()
    } else if credentials
        .admin_password_hash
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        "(unchanged; set CACHEPOOL_ADMIN_PASSWORD to change it)".to_owned()
    } else {
        // A plain password of an earlier version's file is kept as the password, now hashed.
        let plain = credentials.admin_password.take().unwrap_or_else(secret);
        credentials.admin_password_hash = Some(hash(&plain)?);
        changed = true;
        plain
    };
    if credentials.admin_password.take().is_some() {
        changed = true;
    }
    if credentials.session_secret.is_none() {
        credentials.session_secret = Some(format!("{}{}", secret(), secret()));
        changed = true;
    }
    if changed {
        write_private(&path, &serde_json::to_vec_pretty(&credentials)?)?;
    }
    Ok((credentials, line))
}

/// Replaces `path` with `bytes` through a 0600 temporary file and a rename, so the file is
/// never readable by others nor half-written.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
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
    let client = OperatorClient::new(api, token);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let first = client
            .pools()
            .await
            .ok()
            .and_then(|list| list.items.into_iter().next());
        if let Some(pool) = first {
            let namespace = pool.metadata.namespace.unwrap_or_default();
            let name = pool.metadata.name.unwrap_or_default();
            // 409 until the first nodes serve.
            if let Ok(ring) = client.ring(&namespace, &name, None).await {
                return Some(
                    ring.current()
                        .members()
                        .iter()
                        .map(|m| m.address.clone())
                        .collect(),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_password_is_printed_once_and_stored_only_hashed() {
        let dir = std::env::temp_dir().join(format!(
            "cachepool-up-credentials-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (first, line) = credentials(&dir, None).unwrap();
        assert_eq!(line.len(), 32, "a generated password: {line}");
        let file = std::fs::read_to_string(dir.join("credentials.json")).unwrap();
        assert!(!file.contains(&line), "the password itself is not stored");
        let hash = first.admin_password_hash.clone().unwrap();
        assert!(hash.starts_with("$argon2id$") && file.contains(&hash));
        let secret = first.session_secret.clone().unwrap();
        assert_eq!(secret.len(), 64);

        let (again, line) = credentials(&dir, None).unwrap();
        assert!(line.starts_with("(unchanged;"), "{line}");
        assert_eq!(again.admin_password_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(again.session_secret.as_deref(), Some(secret.as_str()));
        assert_eq!(again.api_token, first.api_token);

        let (given, line) = credentials(&dir, Some("a new password")).unwrap();
        assert!(line.contains("CACHEPOOL_ADMIN_PASSWORD"), "{line}");
        assert_ne!(given.admin_password_hash.as_deref(), Some(hash.as_str()));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join("credentials.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        // A file of an earlier version with the plain password: kept as the password, hashed.
        std::fs::write(
            dir.join("credentials.json"),
            r#"{"apiToken":"a","apiReadToken":"b","adminPassword":"old-plain"}"#,
        )
        .unwrap();
        let (old, line) = credentials(&dir, None).unwrap();
        assert_eq!(line, "old-plain");
        assert!(old.admin_password_hash.is_some());
        let file = std::fs::read_to_string(dir.join("credentials.json")).unwrap();
        assert!(!file.contains("old-plain"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
