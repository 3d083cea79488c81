//! `cachepool up` — the real binary — as a test fixture, shared by the root crate's test
//! targets that drive the whole local stack (`tests/browser`, `tests/manager.rs`).
//!
//! The binary is the one cargo built for the calling test target (see [`cachepool_binary`]):
//! a library cannot name it with `env!("CARGO_BIN_EXE_cachepool")`, which only an integration
//! test of the root crate is compiled with.
//!
//! [`Stack`] starts it on a fresh data directory with the site and the operator's API on free
//! ports and reads the printed `site:`, `api:`, `api token:` and `admin password:` lines. A
//! test stops it with [`Stack::stop`] (SIGTERM, asserting a clean exit and no process left);
//! if the test panics, dropping it sends SIGTERM, then SIGKILL to whatever is left of it and
//! of the nodes it started (found in `/proc` by the data directory on their command lines, as
//! `tests/e2e` does), and keeps the directory for a post-mortem.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// How long `cachepool up` may take to print its lines and answer `/readyz` (the binary is
/// built; the margin is for a machine busy compiling).
pub const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd `cachepool up` may take to stop the site, the operator and its nodes.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Polling interval of the waits for the stack.
const POLL: Duration = Duration::from_millis(200);

/// The `cachepool` binary: `$CARGO_BIN_EXE_cachepool`, which cargo sets when it runs an
/// integration test of the root crate, or else `cachepool` in the profile directory above the
/// `deps/` directory the test binary sits in, where cargo builds the package's binaries for its
/// integration tests.
pub fn cachepool_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_cachepool") {
        return PathBuf::from(path);
    }
    let test = std::env::current_exe().unwrap_or_else(|e| panic!("the test's own path: {e}"));
    test.parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("cachepool"))
        .filter(|binary| binary.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no `cachepool` binary beside {}: run the test with `cargo test -p cachepool`, \
                 which builds it",
                test.display()
            )
        })
}

/// A fresh directory under the system's temporary directory.
fn scratch_dir(test: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "cachepool-stack-{test}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", dir.display()))
}

pub fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: plain integers; callers pass the pid (or negated process group) of a child they
    // have not reaped, so it cannot have been reused.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits for `child` up to `limit`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            Err(e) => panic!("waiting for a child process: {e}"),
        }
    }
}

/// Pids of live processes whose command line names `dir`: `cachepool up` and its nodes.
fn processes_naming(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .windows(needle.len())
                .any(|w| w == needle)
                .then_some(pid)
        })
        .collect()
}

/// A pool manifest for `default/local` (the pool the site follows) in manual mode with one
/// node, between `min` and `max` replicas.
pub fn manual_pool(min: u32, max: u32, policy: &str) -> String {
    format!(
        "apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata:
  name: local
  namespace: default
spec:
  cache:
    capacityMiB: 32
    policy: {policy}
  scaling:
    mode: manual
    replicas: {min}
    minReplicas: {min}
    maxReplicas: {max}
  provider:
    process: {{}}
"
    )
}

/// `cachepool up` on a fresh data directory.
#[derive(Debug)]
pub struct Stack {
    child: Child,
    dir: PathBuf,
    /// The site's base URL, without a trailing slash.
    pub site: String,
    /// The operator API's base URL, without a trailing slash.
    pub api: String,
    pub api_token: String,
    pub admin_password: String,
    stopped: bool,
}

impl Stack {
    /// Starts the stack with the default pool `cachepool up` seeds, or with `pool` as the
    /// manifest of `default/local` when given.
    pub async fn start(test: &str, pool: Option<&str>) -> Stack {
        let dir = scratch_dir(test);
        if let Some(manifest) = pool {
            let pools = dir.join("pools");
            std::fs::create_dir_all(&pools)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", pools.display()));
            std::fs::write(pools.join("local.yaml"), manifest)
                .unwrap_or_else(|e| panic!("cannot write the pool manifest: {e}"));
        }
        let log = std::fs::File::create(dir.join("up.log"))
            .unwrap_or_else(|e| panic!("cannot create the stack's log: {e}"));
        let mut child = Command::new(cachepool_binary())
            .arg("up")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--host", "127.0.0.1", "--site-port", "0", "--api-port", "0"])
            // A fresh data directory gets a generated password, printed once.
            .env_remove("CACHEPOOL_ADMIN_PASSWORD")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `cachepool up`: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("the stack's stdout is not piped"));
        // A thread reads the printed lines (and keeps draining them, so the pipe never fills).
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_tx.send(line);
            }
        });
        let mut stack = Stack {
            child,
            dir,
            site: String::new(),
            api: String::new(),
            api_token: String::new(),
            admin_password: String::new(),
            stopped: false,
        };
        let deadline = Instant::now() + START_LIMIT;
        while stack.site.is_empty()
            || stack.api.is_empty()
            || stack.api_token.is_empty()
            || stack.admin_password.is_empty()
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines_rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "`cachepool up` did not print its site, api, api token and admin password \
                     lines within {START_LIMIT:?} ({e}); its log:\n{}",
                    stack.log_tail(40)
                ),
            };
            let Some((name, value)) = line.split_once(": ") else {
                continue;
            };
            let value = value.trim().trim_end_matches('/').to_owned();
            match name {
                "site" => stack.site = value,
                "api" => stack.api = value,
                "api token" => stack.api_token = value,
                "admin password" => stack.admin_password = value,
                _ => {}
            }
        }
        stack.wait_ready(deadline).await;
        stack
    }

    /// Waits until the site answers `/readyz` with 200.
    async fn wait_ready(&self, deadline: Instant) {
        let http = reqwest::Client::new();
        let url = format!("{}/readyz", self.site);
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the site at {url} was not ready within {START_LIMIT:?}; the stack's log:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A directory for the test's own files (fixtures), removed with the stack's directory.
    pub fn files(&self) -> PathBuf {
        let files = self.dir.join("files");
        std::fs::create_dir_all(&files)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", files.display()));
        files
    }

    /// GET on the operator's API with the admin token; the JSON answer.
    pub async fn api_get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.api);
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&self.api_token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        assert!(status.is_success(), "GET {url}: {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    /// POST of a JSON body to the operator's API with the admin token; the JSON answer.
    pub async fn api_post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.api);
        let response = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&self.api_token)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = response.status();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: reading the body: {e}"));
        assert!(status.is_success(), "POST {url} {body}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}"))
    }

    /// The site's pool as the operator's API shows it.
    pub async fn pool(&self) -> Value {
        self.api_get("/api/v1/pools/default/local").await
    }

    /// The site's JSON listing of images (`GET /api/v1/images`).
    pub async fn site_images(&self) -> Value {
        let url = format!("{}/api/v1/images", self.site);
        let response = reqwest::get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        assert!(status.is_success(), "GET {url}: {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("up.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM; asserts that the stack exits cleanly and leaves no node behind.
    pub fn stop(mut self) {
        signal(self.child.id() as i32, libc::SIGTERM);
        let status = wait_bounded(&mut self.child, STOP_LIMIT);
        self.stopped = true;
        let Some(status) = status else {
            panic!("`cachepool up` did not exit within {STOP_LIMIT:?} of SIGTERM");
        };
        assert!(
            status.success(),
            "`cachepool up` exited with {status} on SIGTERM; its log:\n{}",
            self.log_tail(40)
        );
        let left = processes_naming(&self.dir);
        assert!(
            left.is_empty(),
            "processes of the stack still run after it exited: {left:?}"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.stopped {
            signal(self.child.id() as i32, libc::SIGTERM);
            if wait_bounded(&mut self.child, STOP_LIMIT).is_none() {
                signal(self.child.id() as i32, libc::SIGKILL);
                let _ = self.child.wait();
            }
        }
        // Nodes of a stack that was killed rather than stopped.
        for pid in processes_naming(&self.dir) {
            signal(pid, libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "stack directory kept for a post-mortem: {}\nlast lines of its log:\n{}",
                self.dir.display(),
                self.log_tail(60)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
