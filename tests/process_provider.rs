//! The process provider against real `cachepool node` processes on loopback ports.
//!
//! Every test works in a run directory of its own, and a guard kills (SIGKILL) every process
//! whose command line names that directory when the test ends, passed or panicked, so a
//! failing test leaves nothing running. Process checks read `/proc` directly: they are what
//! the provider promises about real processes (gone, reaped, spared), not about its own
//! bookkeeping.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachepool_crds::pool::{ProcessProvider as ProcessSpec, ProviderSpec};
use cachepool_operator::provider::process::{ProcessOptions, ProcessProvider};
use cachepool_operator::provider::{AdminToken, LaunchSpec, PoolRef, Provider, ProviderNode};
use cachepool_operator::rebalance::AdminClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(15);

/// A run directory of its own; on drop, kills every process that names it and removes it.
struct RunDir {
    path: PathBuf,
    others: Mutex<Vec<std::process::Child>>,
}

impl RunDir {
    fn new(test: &str) -> RunDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "cachepool-provider-{test}-{}-{nanos}",
            std::process::id()
        ));
        RunDir {
            path,
            others: Mutex::new(Vec::new()),
        }
    }

    fn options(&self) -> ProcessOptions {
        ProcessOptions::new(env!("CARGO_BIN_EXE_cachepool"), &self.path)
    }

    /// Starts a process that has nothing to do with the provider and is killed with the dir.
    fn unrelated_process(&self) -> u32 {
        let child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sleep: {e}"));
        let pid = child.id();
        self.others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        pid
    }

    /// Pids of live processes whose command line mentions this directory: the nodes started
    /// in it (their `--addr-file` lies inside).
    fn processes(&self) -> BTreeSet<u32> {
        let needle = self.path.as_os_str().as_encoded_bytes();
        let mut pids = BTreeSet::new();
        let proc = std::fs::read_dir("/proc").unwrap_or_else(|e| panic!("cannot list /proc: {e}"));
        for entry in proc.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.windows(needle.len()).any(|w| w == needle) {
                pids.insert(pid);
            }
        }
        pids
    }

    /// Record files of one pool.
    fn records(&self, pool: &PoolRef) -> Vec<PathBuf> {
        self.files(pool, ".node.json")
    }

    fn files(&self, pool: &PoolRef, suffix: &str) -> Vec<PathBuf> {
        let dir = self.path.join(&pool.namespace).join(&pool.name);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        for pid in self.processes() {
            // SAFETY: plain integers; these pids name this test's run directory.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        for mut child in self
            .others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn spec(pool: &PoolRef, slot: u32) -> LaunchSpec {
    LaunchSpec {
        pool: pool.clone(),
        uid: "test-uid".into(),
        slot,
        tags: LaunchSpec::standard_tags(pool, slot, "test"),
        provider: ProviderSpec {
            process: Some(ProcessSpec::default()),
            ..ProviderSpec::default()
        },
        capacity_mib: 8,
        policy: "lru".into(),
        max_item_size_kib: 1024,
        admin_token: AdminToken::generate(),
    }
}

fn pid_of(node: &ProviderNode) -> u32 {
    node.id
        .strip_prefix("pid-")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{} is not pid-<number>", node.id))
}

/// State and start time (fields 3 and 22) of `/proc/<pid>/stat`, if the pid exists.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields[0].chars().next()?, fields[19].parse().ok()?))
}

fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

async fn poll_until(what: &str, mut condition: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

async fn wait_ready(node: &ProviderNode) {
    let admin = AdminClient::new(&node.admin_address, Some(&node.admin_token));
    poll_until(&format!("{} to be ready", node.id), async || {
        admin.ready().await
    })
    .await;
}

/// The node's answer to memcached's `version`.
async fn memcached_version(address: &str) -> String {
    let ask = async {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(b"version\r\n").await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        std::io::Result::Ok(line)
    };
    match tokio::time::timeout(TIMEOUT, ask).await {
        Ok(Ok(line)) => line,
        Ok(Err(err)) => panic!("memcached `version` to {address} failed: {err}"),
        Err(_) => panic!("memcached `version` to {address} timed out"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launched_nodes_serve_and_terminate_stops_them() {
    let dir = RunDir::new("launch");
    let provider = ProcessProvider::open(dir.options()).await.unwrap();
    let pool = PoolRef::new("default", "web");
    let a = provider.launch(&spec(&pool, 0)).await.unwrap();
    let b = provider.launch(&spec(&pool, 1)).await.unwrap();
    assert_eq!((a.slot, b.slot), (0, 1));
    assert_ne!(a.address, b.address);
    assert_ne!(a.admin_token, b.admin_token);
    assert!(a.alive && b.alive);

    for node in [&a, &b] {
        wait_ready(node).await;
        assert!(
            memcached_version(&node.address)
                .await
                .starts_with("VERSION ")
        );
        let pid = pid_of(node);
        // The token reaches the node through its environment, never its argv.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let token = node.admin_token.as_bytes();
        assert!(!cmdline.windows(token.len()).any(|w| w == token));
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let var = format!("CACHEPOOL_ADMIN_TOKEN={}", node.admin_token).into_bytes();
        assert!(environ.windows(var.len()).any(|w| w == var));
        // The operator's own environment is withheld (PATH stands for all of it).
        assert!(std::env::var_os("PATH").is_some());
        assert!(!environ.split(|b| *b == 0).any(|v| v.starts_with(b"PATH=")));
        // The node holds that token: a mutating call passes with it and fails without it.
        let admin = AdminClient::new(&node.admin_address, Some(&node.admin_token));
        admin.flush().await.unwrap();
        let anonymous = AdminClient::new(&node.admin_address, None);
        assert!(anonymous.flush().await.is_err());
        // Its own process group: a terminal's Ctrl-C reaches only the operator.
        // SAFETY: plain integer in, plain integer out.
        assert_eq!(
            unsafe { libc::getpgid(pid as libc::pid_t) },
            pid as libc::pid_t
        );
    }

    let records = dir.records(&pool);
    assert_eq!(records.len(), 2);
    for record in &records {
        let mode = std::fs::metadata(record).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", record.display());
    }
    assert_eq!(
        provider.list(&pool).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(dir.processes(), BTreeSet::from([pid_of(&a), pid_of(&b)]));

    let start = Instant::now();
    provider.terminate(&pool, &a.id).await.unwrap();
    // SIGTERM alone stopped it: well inside the 5 s grace that would end in SIGKILL.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The child was reaped before terminate returned: no /proc entry, not even a zombie.
    assert_eq!(proc_stat(pid_of(&a)), None);
    assert_eq!(provider.list(&pool).await.unwrap(), vec![b.clone()]);
    assert_eq!(dir.records(&pool).len(), 1);
    // Idempotent; an id the provider does not know is Ok.
    provider.terminate(&pool, &a.id).await.unwrap();
    provider.terminate(&pool, "pid-1").await.unwrap();

    provider.stop_all().await.unwrap();
    assert!(dir.processes().is_empty());
    assert!(provider.list(&pool).await.unwrap().is_empty());
    // Nodes that stopped on request leave no file behind: no record, address file or log.
    assert!(
        dir.files(&pool, "").is_empty(),
        "{:?}",
        dir.files(&pool, "")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_listed_dead_and_reaped() {
    let dir = RunDir::new("crash");
    let provider = ProcessProvider::open(dir.options()).await.unwrap();
    let pool = PoolRef::new("default", "crash");
    let victim = provider.launch(&spec(&pool, 0)).await.unwrap();
    let survivor = provider.launch(&spec(&pool, 1)).await.unwrap();
    wait_ready(&victim).await;
    let pid = pid_of(&victim);
    // SAFETY: plain integers; the pid is a node this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);

    let took = poll_until("the killed node to be listed dead", async || {
        let nodes = provider.list(&pool).await.unwrap();
        nodes.iter().any(|n| n.id == victim.id && !n.alive)
    })
    .await;
    assert!(took < Duration::from_secs(1), "crash seen after {took:?}");
    // Reaped, not a zombie: the /proc entry is gone entirely.
    assert_eq!(proc_stat(pid), None);
    let nodes = provider.list(&pool).await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().any(|n| n.id == survivor.id && n.alive));

    // Forgetting the dead node removes its record but keeps its log for a post-mortem.
    provider.terminate(&pool, &victim.id).await.unwrap();
    assert_eq!(dir.records(&pool).len(), 1);
    assert_eq!(dir.files(&pool, ".log").len(), 2);
    provider.stop_all().await.unwrap();
    assert!(dir.processes().is_empty());
    assert_eq!(dir.files(&pool, ".log").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopened_provider_adopts_survivors_and_forgets_the_dead() {
    let dir = RunDir::new("adopt");
    let web = PoolRef::new("default", "web");
    let other = PoolRef::new("team", "sessions");
    let first = ProcessProvider::open(dir.options()).await.unwrap();
    let mut launched = Vec::new();
    for slot in 0..3 {
        launched.push(first.launch(&spec(&web, slot)).await.unwrap());
    }
    let lone = first.launch(&spec(&other, 0)).await.unwrap();
    for node in launched.iter().chain([&lone]) {
        wait_ready(node).await;
    }
    // What a kill -9 of the operator looks like: the provider is gone, its nodes are not.
    drop(first);
    assert_eq!(dir.processes().len(), 4);
    let dead = launched.pop().unwrap();
    // SAFETY: plain integers; the pid is a node this test started.
    assert_eq!(
        unsafe { libc::kill(pid_of(&dead) as libc::pid_t, libc::SIGKILL) },
        0
    );
    poll_until("the killed node to be reaped", async || {
        proc_stat(pid_of(&dead)).is_none()
    })
    .await;

    let second = ProcessProvider::open(dir.options()).await.unwrap();
    assert_eq!(second.list(&web).await.unwrap(), launched);
    assert_eq!(second.list(&other).await.unwrap(), vec![lone.clone()]);
    assert_eq!(
        dir.records(&web).len(),
        2,
        "only the survivors keep a record"
    );
    // Adopted, not relaunched: the same processes and no others.
    let expected: BTreeSet<u32> = launched.iter().chain([&lone]).map(pid_of).collect();
    assert_eq!(dir.processes(), expected);
    for node in &launched {
        wait_ready(node).await;
    }

    // An adopted node is stopped through /proc checks and a pidfd, and forgotten.
    let stopped = launched.remove(0);
    second.terminate(&web, &stopped.id).await.unwrap();
    assert!(!running(pid_of(&stopped)));
    assert_eq!(second.list(&web).await.unwrap(), launched);
    assert_eq!(dir.records(&web).len(), 1);

    second.stop_all().await.unwrap();
    assert!(dir.processes().is_empty());
    assert!(second.list(&web).await.unwrap().is_empty());
    assert!(second.list(&other).await.unwrap().is_empty());
    assert!(dir.records(&web).is_empty() && dir.records(&other).is_empty());
}

fn or_panic<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("cannot {what}: {e}"))
}

/// Rewrites fields of a record as a pid reuse would make it look.
fn rewrite_record(path: &Path, pid: u32, start_time: Option<u64>) {
    let what = format!("rewrite {}", path.display());
    let bytes = or_panic(std::fs::read(path), &what);
    let mut record: serde_json::Value = or_panic(serde_json::from_slice(&bytes), &what);
    record["pid"] = pid.into();
    if let Some(start_time) = start_time {
        record["startTime"] = start_time.into();
    }
    or_panic(std::fs::write(path, record.to_string()), &what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_of_a_reused_pid_is_neither_adopted_nor_signalled() {
    let dir = RunDir::new("reuse");
    let pool = PoolRef::new("default", "reuse");
    let first = ProcessProvider::open(dir.options()).await.unwrap();
    let a = first.launch(&spec(&pool, 0)).await.unwrap();
    let b = first.launch(&spec(&pool, 1)).await.unwrap();
    for node in [&a, &b] {
        // SAFETY: plain integers; the pid is a node this test started.
        assert_eq!(
            unsafe { libc::kill(pid_of(node) as libc::pid_t, libc::SIGKILL) },
            0
        );
        poll_until("the killed node to be reaped", async || {
            proc_stat(pid_of(node)).is_none()
        })
        .await;
    }
    drop(first);

    // Both pids now "belong" to an unrelated process: one record keeps its own start time
    // (mismatch), the other even carries the stranger's (only the command line tells).
    let stranger = dir.unrelated_process();
    let (_, stranger_start) = proc_stat(stranger).unwrap();
    let records = dir.records(&pool);
    assert_eq!(records.len(), 2);
    rewrite_record(&records[0], stranger, None);
    rewrite_record(&records[1], stranger, Some(stranger_start));

    let second = ProcessProvider::open(dir.options()).await.unwrap();
    assert!(second.list(&pool).await.unwrap().is_empty());
    assert!(dir.records(&pool).is_empty());
    second
        .terminate(&pool, &format!("pid-{stranger}"))
        .await
        .unwrap();
    second.stop_all().await.unwrap();
    assert!(running(stranger), "an unrelated process was signalled");
    assert_eq!(proc_stat(stranger).map(|(_, t)| t), Some(stranger_start));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_failures_name_their_cause() {
    let dir = RunDir::new("fail");
    let pool = PoolRef::new("default", "fail");

    let missing = dir.path.join("no-such-binary");
    let mut options = dir.options();
    options.binary = missing.clone();
    let err = ProcessProvider::new(options)
        .launch(&spec(&pool, 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let provider = ProcessProvider::open(dir.options()).await.unwrap();
    let zero = LaunchSpec {
        capacity_mib: 0,
        ..spec(&pool, 0)
    };
    let err = provider.launch(&zero).await.unwrap_err().to_string();
    // The node's own complaint, from its log.
    assert!(err.contains("exited"), "{err}");
    assert!(err.contains("--capacity-mib"), "{err}");

    let bad_policy = LaunchSpec {
        policy: "fifo-ish".into(),
        ..spec(&pool, 0)
    };
    let err = provider.launch(&bad_policy).await.unwrap_err().to_string();
    assert!(err.contains("fifo-ish"), "{err}");

    // Namespace and name become directories: nothing may climb out of the run directory.
    let escape = PoolRef::new("..", "etc");
    let err = provider
        .launch(&spec(&escape, 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("../etc"), "{err}");

    assert!(provider.list(&pool).await.unwrap().is_empty());
    assert!(dir.processes().is_empty());
    assert!(
        dir.files(&pool, "").is_empty(),
        "{:?}",
        dir.files(&pool, "")
    );
}

/// A stand-in for `cachepool node` that announces made-up ports and ignores SIGTERM, as a node
/// stuck in a long drain would. It keeps its own command line (no exec), so the guard finds it.
const STUBBORN_NODE: &str = r#"#!/bin/sh
trap '' TERM
while [ "$#" -gt 0 ]; do
  if [ "$1" = --addr-file ]; then file=$2; fi
  shift
done
printf '{"pid":%d,"address":"127.0.0.1:9","adminAddress":"127.0.0.1:9"}' $$ > "$file.tmp"
mv "$file.tmp" "$file"
while :; do sleep 1; done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = RunDir::new("stubborn");
    let pool = PoolRef::new("default", "stubborn");
    let script = dir.path.join("stubborn-node");
    or_panic(std::fs::create_dir_all(&dir.path), "create the run dir");
    or_panic(std::fs::write(&script, STUBBORN_NODE), "write the stub");
    or_panic(
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)),
        "make the stub executable",
    );
    let mut options = dir.options();
    options.binary = script;
    options.stop_grace = Duration::from_millis(300);
    let provider = ProcessProvider::new(options);
    // Another test forking while the stub was open for writing makes exec fail with "text
    // file busy" until that child execs; that passes within moments.
    let mut tries = 0;
    let node = loop {
        match provider.launch(&spec(&pool, 0)).await {
            Ok(node) => break node,
            Err(err) if err.to_string().contains("busy") && tries < 50 => tries += 1,
            Err(err) => panic!("launching the stub failed: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(node.address, "127.0.0.1:9");
    let pid = pid_of(&node);

    let start = Instant::now();
    provider.terminate(&pool, &node.id).await.unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "SIGKILL came after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "terminate took {took:?}");
    assert_eq!(proc_stat(pid), None);
    assert!(provider.list(&pool).await.unwrap().is_empty());
    assert!(dir.records(&pool).is_empty());
}
