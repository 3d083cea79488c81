//! The operator as a user runs it: `cachepool operator --standalone DIR` in a process of its
//! own, driven through its manifest files and its HTTP API, judged by what it publishes and by
//! the processes that really run.
//!
//! - [`TestDir`] is a test's state directory. Every process of a test names it on its command
//!   line (the operator's `--standalone DIR`, each node's `--addr-file DIR/.cachepool/run/…`),
//!   so `/proc` tells which processes a test owns, and dropping the guard SIGKILLs them all,
//!   whether the test passed or panicked. The census is read from `/proc`, not from anything
//!   the operator says, because it is what the operator promises about real processes.
//! - [`Operator`] starts the binary, reads the `api:` line it prints, and stops it with
//!   SIGTERM (asserting exit 0) or SIGKILL.
//! - [`Api`] speaks the operator API; [`RingFollower`] long-polls the ring and feeds a pool
//!   client, as an application embedding the client would.
//! - [`run`] runs one test at a time on its own runtime: the tests measure hit ratios and
//!   hand-off times, which mean nothing when two tests share the machine's two cores.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cache_node::client::{ClientOptions, NodeClient, PoolClient};
use cachepool_crds::pool::{CachePoolSpec, CachePoolStatus, NodeState, PoolPhase};
use cachepool_crds::ring::RingState;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bearer token of every call that may change something.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";
/// Bearer token that may only read.
pub const READ_TOKEN: &str = "e2e-read-token-9876543210";
/// The namespace of every pool in standalone mode.
pub const NAMESPACE: &str = "default";

/// A test that takes longer than this has hung.
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// Default limit of a wait for the operator to reach a state: generous, since node start-up
/// and hand-offs share two cores with the load generator.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Status and census polling interval: short next to a node's start-up time.
pub const POLL: Duration = Duration::from_millis(20);
/// How long the operator may take to start and print its `api:` line (the binary is already
/// built; the margin is for a machine busy compiling).
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd operator may take to stop its nodes and exit (each node has a 5 s
/// grace before SIGKILL).
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Runs one test: alone, on its own runtime, within [`TEST_LIMIT`] (`cachepool_test_support::serial`).
pub fn run(test: impl Future<Output = ()>) {
    cachepool_test_support::serial::run(TEST_LIMIT, test);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `check` every [`POLL`] until it yields a value; panics naming `what` after `limit`.
pub async fn until<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A test's directory: `root/pools` is the operator's state directory (manifests, and its
/// runtime state under `.cachepool/`), `root/operator.log` the operator's stderr.
#[derive(Debug)]
pub struct TestDir {
    root: PathBuf,
    pools: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let root = std::env::temp_dir().join(format!(
            "cachepool-e2e-{test}-{}-{nanos}",
            std::process::id()
        ));
        let pools = root.join("pools");
        std::fs::create_dir_all(&pools)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", pools.display()));
        // The operator resolves its directory, and the nodes' command lines name the resolved
        // path: the census must look for that one.
        let pools = pools
            .canonicalize()
            .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", pools.display()));
        TestDir { root, pools }
    }

    /// The operator's state directory.
    pub fn pools(&self) -> &Path {
        &self.pools
    }

    pub fn log(&self) -> PathBuf {
        self.root.join("operator.log")
    }

    pub fn manifest(&self, name: &str) -> PathBuf {
        self.pools.join(format!("{name}.yaml"))
    }

    /// Writes a manifest the way an editor that saves safely does: a temporary file (not
    /// `*.yaml`, so the operator never reads it half-written) renamed over the real one.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.pools.join(format!(".{name}.yaml.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(yaml.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, self.manifest(name))
        };
        write().unwrap_or_else(|e| panic!("cannot write the manifest of {name}: {e}"));
    }

    pub fn read_manifest(&self, name: &str) -> String {
        let path = self.manifest(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    /// Live processes whose command line names this directory, with their arguments: the
    /// operator and every node it started.
    pub fn processes(&self) -> BTreeMap<u32, Vec<String>> {
        let needle = self.pools.as_os_str().as_encoded_bytes();
        let mut out = BTreeMap::new();
        let proc = std::fs::read_dir("/proc").unwrap_or_else(|e| panic!("cannot list /proc: {e}"));
        for entry in proc.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A zombie's command line is empty, so a process that exited is not counted.
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.windows(needle.len()).any(|w| w == needle) {
                let args = cmdline
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                out.insert(pid, args);
            }
        }
        out
    }

    /// Pids of the `cachepool node` processes of this directory.
    pub fn node_pids(&self) -> BTreeSet<u32> {
        self.processes()
            .into_iter()
            .filter(|(_, args)| args.get(1).is_some_and(|a| a == "node"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Waits until exactly `n` node processes run, and returns their pids.
    pub async fn wait_node_count(&self, n: usize, limit: Duration) -> BTreeSet<u32> {
        until(&format!("{n} node processes"), limit, async || {
            let pids = self.node_pids();
            (pids.len() == n).then_some(pids)
        })
        .await
    }

    fn tail_of_log(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for pid in self.processes().into_keys() {
            // SAFETY: plain integers; these pids name this test's directory.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if std::env::var_os("CACHEPOOL_E2E_KEEP").is_some() {
            eprintln!("test directory kept: {}", self.root.display());
        } else if std::thread::panicking() {
            eprintln!(
                "test directory kept for a post-mortem: {}\nlast lines of the operator's log:\n{}",
                self.root.display(),
                self.tail_of_log(60)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// How to start the operator.
#[derive(Debug, Clone, Copy)]
pub struct OperatorOptions {
    /// Pass the tokens through `CACHEPOOL_API_TOKEN` / `CACHEPOOL_API_READ_TOKEN` rather
    /// than flags.
    pub tokens_in_env: bool,
    /// `--keep-nodes`: leave the nodes running on SIGTERM.
    pub keep_nodes: bool,
    pub sample_interval_ms: u64,
    pub probe_interval_ms: u64,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        OperatorOptions {
            tokens_in_env: false,
            keep_nodes: false,
            sample_interval_ms: 250,
            probe_interval_ms: 200,
        }
    }
}

/// A running `cachepool operator --standalone` process.
#[derive(Debug)]
pub struct Operator {
    child: Child,
    pid: u32,
    pub api: Api,
    stdout: JoinHandle<()>,
}

impl Operator {
    pub async fn start(dir: &TestDir) -> Operator {
        Operator::start_with(dir, OperatorOptions::default()).await
    }

    pub async fn start_with(dir: &TestDir, options: OperatorOptions) -> Operator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.log())
            .unwrap_or_else(|e| panic!("cannot open the operator log: {e}"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_cachepool"));
        command
            .arg("operator")
            .arg("--standalone")
            .arg(dir.pools())
            .args(["--listen", "127.0.0.1:0"])
            .args([
                "--sample-interval-ms",
                &options.sample_interval_ms.to_string(),
            ])
            .args([
                "--probe-interval-ms",
                &options.probe_interval_ms.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if options.tokens_in_env {
            command
                .env("CACHEPOOL_API_TOKEN", ADMIN_TOKEN)
                .env("CACHEPOOL_API_READ_TOKEN", READ_TOKEN);
        } else {
            command
                .args(["--api-token", ADMIN_TOKEN])
                .args(["--api-read-token", READ_TOKEN]);
        }
        if options.keep_nodes {
            command.arg("--keep-nodes");
        }
        // The log is a file: plain text reads better there than colour codes.
        command.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the operator: {e}"));
        let pid = child
            .id()
            .unwrap_or_else(|| panic!("the operator has no pid"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("the operator's stdout is not piped"));
        let mut lines = BufReader::new(stdout).lines();
        let find_url = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("api: ") {
                    return Ok(Some(url.trim().trim_end_matches('/').to_owned()));
                }
            }
            std::io::Result::Ok(None)
        };
        let url = match tokio::time::timeout(START_LIMIT, find_url).await {
            Ok(Ok(Some(url))) => url,
            Ok(Ok(None)) => panic!(
                "the operator closed its stdout without printing `api: URL`; its log:\n{}",
                dir.tail_of_log(40)
            ),
            Ok(Err(e)) => panic!("reading the operator's stdout: {e}"),
            Err(_) => panic!("the operator printed no `api: URL` within {START_LIMIT:?}"),
        };
        // Keep draining stdout, so a chatty operator never blocks on a full pipe.
        let stdout =
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Operator {
            child,
            pid,
            api: Api::new(url),
            stdout,
        }
    }

    /// SIGTERM, then waits for the exit; returns how it exited.
    pub async fn stop(mut self) -> ExitStatus {
        // SAFETY: plain integers; the pid is our unreaped child, so it cannot have been reused.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let status = match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for the operator: {e}"),
            Err(_) => panic!("the operator did not exit within {STOP_LIMIT:?} of SIGTERM"),
        };
        self.stdout.abort();
        status
    }

    /// SIGTERM and asserts a clean exit (status 0).
    pub async fn shutdown(self) {
        let status = self.stop().await;
        assert!(
            status.success(),
            "the operator exited with {status} on SIGTERM"
        );
    }

    /// SIGKILL (`kill -9`), and reaps it.
    pub async fn kill(mut self) {
        // SAFETY: as in `stop`.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
        if let Err(e) = self.child.wait().await {
            panic!("waiting for the killed operator: {e}");
        }
        self.stdout.abort();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // `kill_on_drop` covers the process; the drain task goes with it.
        self.stdout.abort();
    }
}

/// An answer of the API: status code and JSON body (`Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// The body, after asserting the status.
    pub fn expect(self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        self.body
    }

    /// Asserts an error answer: the status and the `{"error", "message"}` body.
    pub fn expect_error(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        assert!(
            self.body["error"].is_string() && self.body["message"].is_string(),
            "{what}: the error body is not {{\"error\", \"message\"}}: {}",
            self.body
        );
    }
}

/// A client of the operator API.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Api {
    fn new(base: String) -> Api {
        let http = reqwest::Client::builder()
            // Past the 30 s of a ring long-poll.
            .timeout(Duration::from_secs(40))
            .build()
            .unwrap_or_else(|e| panic!("http client: {e}"));
        Api { http, base }
    }

    pub fn pool_path(name: &str) -> String {
        format!("/api/v1/pools/{NAMESPACE}/{name}")
    }

    /// One request; `body` is (content type, text).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, String)>,
    ) -> Reply {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, text)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"));
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, body }
    }

    /// GET with the read token.
    pub async fn get(&self, path: &str) -> Reply {
        self.call(reqwest::Method::GET, path, Some(READ_TOKEN), None)
            .await
    }

    /// GET of something that need not be JSON, without a token: (status, text).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: reading the body: {e}"));
        (status, text)
    }

    /// The pool as the API shows it (status 200 asserted).
    pub async fn pool(&self, name: &str) -> Value {
        self.get(&Self::pool_path(name))
            .await
            .expect(200, &format!("GET pool {name}"))
    }

    pub async fn status(&self, name: &str) -> CachePoolStatus {
        self.try_status(name)
            .await
            .unwrap_or_else(|e| panic!("status of {name}: {e}"))
    }

    /// The pool's status, or why there is none (e.g. 404 for a pool not yet found).
    pub async fn try_status(&self, name: &str) -> Result<CachePoolStatus, String> {
        let reply = self.get(&Self::pool_path(name)).await;
        if reply.status != 200 {
            return Err(format!("GET answered {}: {}", reply.status, reply.body));
        }
        serde_json::from_value(reply.body["status"].clone())
            .map_err(|e| format!("does not parse: {e}: {}", reply.body["status"]))
    }

    pub async fn spec(&self, name: &str) -> CachePoolSpec {
        let pool = self.pool(name).await;
        serde_json::from_value(pool["spec"].clone())
            .unwrap_or_else(|e| panic!("spec of {name} does not parse: {e}: {}", pool["spec"]))
    }

    pub async fn scale(&self, name: &str, delta: i32) -> Reply {
        self.call(
            reqwest::Method::POST,
            &format!("{}/scale", Self::pool_path(name)),
            Some(ADMIN_TOKEN),
            Some((
                "application/json",
                serde_json::json!({ "delta": delta }).to_string(),
            )),
        )
        .await
    }

    /// A JSON merge patch of the resource, as `kubectl patch --type merge` sends it.
    pub async fn patch(&self, name: &str, patch: &Value) -> Reply {
        self.call(
            reqwest::Method::PATCH,
            &Self::pool_path(name),
            Some(ADMIN_TOKEN),
            Some(("application/merge-patch+json", patch.to_string())),
        )
        .await
    }

    pub async fn flush(&self, name: &str) -> Reply {
        self.call(
            reqwest::Method::POST,
            &format!("{}/flush", Self::pool_path(name)),
            Some(ADMIN_TOKEN),
            None,
        )
        .await
    }

    /// The ring now, or with `after`, the first ring whose epoch exceeds it (long-poll).
    pub async fn ring(&self, name: &str, after: Option<u64>) -> RingState {
        let path = match after {
            Some(epoch) => format!("{}/ring?after={epoch}", Self::pool_path(name)),
            None => format!("{}/ring", Self::pool_path(name)),
        };
        let body = self.get(&path).await.expect(200, &format!("GET {path}"));
        serde_json::from_value(body.clone())
            .unwrap_or_else(|e| panic!("GET {path}: not a ring state: {e}: {body}"))
    }

    /// Waits until the pool's status satisfies `check`; returns that status.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&CachePoolStatus) -> bool,
    ) -> CachePoolStatus {
        let mut last = Err("not asked yet".to_owned());
        let found = tokio::time::timeout(limit, async {
            loop {
                match self.try_status(name).await {
                    Ok(status) if check(&status) => return status,
                    other => last = other,
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out after {limit:?} waiting for {name} to be {what}; last status: {last:#?}"
            )
        })
    }

    /// Waits until the pool has settled at `n` nodes (see [`settled`]).
    pub async fn wait_settled(&self, name: &str, n: u32, limit: Duration) -> CachePoolStatus {
        self.wait_status(name, &format!("settled at {n} nodes"), limit, |s| {
            settled(s, n)
        })
        .await
    }
}

/// Whether a status shows a pool at rest with `n` serving nodes: phase Ready, every count at
/// `n`, `n` ring members, no migration, every node Ready.
pub fn settled(status: &CachePoolStatus, n: u32) -> bool {
    status.phase == Some(PoolPhase::Ready)
        && status.replicas == n
        && status.ready_replicas == n
        && status.desired_replicas == n
        && status.migration.is_none()
        && status
            .ring
            .as_ref()
            .is_some_and(|r| r.members.len() == n as usize)
        && status.nodes.len() == n as usize
        && status
            .nodes
            .iter()
            .all(|node| node.state == NodeState::Ready)
}

/// The pid of a node of the process provider, from its id (`pid-<number>`).
pub fn pid_of(id: &str) -> u32 {
    id.strip_prefix("pid-")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("node id {id:?} is not the process provider's pid-<number>"))
}

/// The pids of the nodes a status lists.
pub fn status_pids(status: &CachePoolStatus) -> BTreeSet<u32> {
    status.nodes.iter().map(|n| pid_of(&n.id)).collect()
}

/// Ring members as (slot, address), from a status.
pub fn status_members(status: &CachePoolStatus) -> Vec<(u32, String)> {
    status
        .ring
        .as_ref()
        .map(|r| {
            r.members
                .iter()
                .map(|m| (m.slot, m.address.clone()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn ring_epoch(status: &CachePoolStatus) -> u64 {
    status.ring.as_ref().map_or(0, |r| r.epoch)
}

/// Client options of every pool client of the tests: generous timeouts, so that a busy
/// machine gives slow answers rather than errors (which would be misses nobody caused).
pub fn client_options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    }
}

/// A pool client routing by the pool's ring as the API serves it now.
pub async fn pool_client(api: &Api, name: &str) -> Arc<PoolClient> {
    let state = api.ring(name, None).await;
    Arc::new(
        PoolClient::new(state, client_options()).unwrap_or_else(|e| panic!("pool client: {e}")),
    )
}

/// Every member of `ring` answers `stats` on its data port; returns their `curr_items`.
pub async fn items_per_node(ring: &RingState) -> Vec<u64> {
    let mut out = Vec::new();
    for member in ring.current().members() {
        let client = NodeClient::new(member.address.clone(), client_options())
            .unwrap_or_else(|e| panic!("client of {}: {e}", member.address));
        let stats = client.stats().await.unwrap_or_else(|e| {
            panic!(
                "slot {} ({}) does not answer: {e}",
                member.slot, member.address
            )
        });
        out.push(
            stats
                .get("curr_items")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no curr_items from {}", member.address)),
        );
    }
    out
}

/// One ring a [`RingFollower`] received.
#[derive(Debug, Clone)]
pub struct RingEvent {
    pub at: Instant,
    pub epoch: u64,
    pub members: u32,
    /// The ring named a previous ring (a migration was running).
    pub migrating: bool,
}

/// A task that long-polls `ring?after=EPOCH` and hands every new ring to a pool client,
/// recording when each arrived. Ends when dropped.
#[derive(Debug)]
pub struct RingFollower {
    task: JoinHandle<()>,
    events: Arc<Mutex<Vec<RingEvent>>>,
}

impl RingFollower {
    pub fn start(api: Api, name: &str, client: Arc<PoolClient>) -> RingFollower {
        let events = Arc::new(Mutex::new(Vec::new()));
        let (sink, name) = (events.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let path = Api::pool_path(&name);
            loop {
                let epoch = client.ring().current().epoch();
                let reply = api.get(&format!("{path}/ring?after={epoch}")).await;
                let state = match serde_json::from_value::<RingState>(reply.body.clone()) {
                    Ok(state) if reply.status == 200 => state,
                    // A failed poll is retried; a test that needs the ring notices it missing.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let event = RingEvent {
                    at: Instant::now(),
                    epoch: state.current().epoch(),
                    members: state.current().len(),
                    migrating: state.is_migrating(),
                };
                if event.epoch > epoch {
                    client.set_ring(state);
                    lock(&sink).push(event);
                }
            }
        });
        RingFollower { task, events }
    }

    pub fn events(&self) -> Vec<RingEvent> {
        lock(&self.events).clone()
    }

    /// The first ring received at or after `since` that satisfies `check`, waiting for it.
    pub async fn wait_for(
        &self,
        what: &str,
        since: Instant,
        limit: Duration,
        check: impl Fn(&RingEvent) -> bool,
    ) -> RingEvent {
        until(what, limit, async || {
            self.events()
                .into_iter()
                .find(|e| e.at >= since && check(e))
        })
        .await
    }
}

impl Drop for RingFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CachePool manifest, as a user writes one.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub auto: bool,
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub capacity_mib: u32,
    pub policy: &'static str,
    pub max_miss_rate: f64,
    pub min_miss_rate: f64,
    pub window_seconds: u32,
    pub cooldown_seconds: u32,
    pub min_requests_per_window: u64,
}

impl Manifest {
    /// A manual-mode pool of `replicas` process nodes of 64 MiB, bounds `[1, 4]`.
    pub fn manual(name: &str, replicas: u32) -> Manifest {
        Manifest {
            name: name.to_owned(),
            auto: false,
            replicas,
            min_replicas: 1,
            max_replicas: 4,
            capacity_mib: 64,
            policy: "lru",
            max_miss_rate: 0.4,
            min_miss_rate: 0.1,
            window_seconds: 2,
            cooldown_seconds: 4,
            min_requests_per_window: 50,
        }
    }

    /// The manifest's YAML, in the layout of `examples/local.yaml`.
    pub fn yaml(&self) -> String {
        let mode = if self.auto { "auto" } else { "manual" };
        format!(
            "apiVersion: cachepool.io/v1alpha1\n\
             kind: CachePool\n\
             metadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
             spec:\n\
             \x20 cache:\n    capacityMiB: {capacity}\n    policy: {policy}\n    maxItemSizeKiB: 1024\n\
             \x20 scaling:\n    mode: {mode}\n    replicas: {replicas}\n    minReplicas: {min}\n    maxReplicas: {max}\n\
             \x20   auto:\n      maxMissRate: {max_miss}\n      minMissRate: {min_miss}\n      expandRatio: 2.0\n      shrinkRatio: 0.5\n      windowSeconds: {window}\n      cooldownSeconds: {cooldown}\n      minRequestsPerWindow: {min_requests}\n\
             \x20 provider:\n    process: {{}}\n\
             \x20 metrics:\n    source: direct\n",
            name = self.name,
            capacity = self.capacity_mib,
            policy = self.policy,
            replicas = self.replicas,
            min = self.min_replicas,
            max = self.max_replicas,
            max_miss = self.max_miss_rate,
            min_miss = self.min_miss_rate,
            window = self.window_seconds,
            cooldown = self.cooldown_seconds,
            min_requests = self.min_requests_per_window,
        )
    }
}

/// A test's operator with one pool applied and settled: the usual start of a test.
#[derive(Debug)]
pub struct Setup {
    pub operator: Operator,
    pub status: CachePoolStatus,
}

/// Writes `manifest`, starts an operator on `dir`, and waits until the pool has settled at
/// `expect` nodes with exactly that many node processes running.
pub async fn apply_and_start(dir: &TestDir, manifest: &Manifest, expect: u32) -> Setup {
    dir.write_manifest(&manifest.name, &manifest.yaml());
    let operator = Operator::start(dir).await;
    let status = operator
        .api
        .wait_settled(&manifest.name, expect, TIMEOUT)
        .await;
    let pids = dir.wait_node_count(expect as usize, TIMEOUT).await;
    assert_eq!(pids, status_pids(&status), "node processes vs the status");
    Setup { operator, status }
}

/// Stops the operator with SIGTERM, asserts exit 0, and that no process of the test's
/// directory is left.
pub async fn shutdown(dir: &TestDir, operator: Operator) {
    operator.shutdown().await;
    let left = dir.processes();
    assert!(
        left.is_empty(),
        "processes left after the operator exited: {left:?}"
    );
}
