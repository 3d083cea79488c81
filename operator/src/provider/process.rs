//! The process provider: each node is a `cachepool node` child process on loopback ports.
//!
//! It is what `cachepool up` runs pools on, so it has to behave like a supervisor that can be
//! killed at any moment:
//!
//! - **Ports without races.** Children listen on port 0 and write the addresses they bound to
//!   an address file (`--addr-file`, temp file + rename); `launch` polls for that file, so no
//!   port is ever picked by one process and bound by another.
//! - **Nothing leaks, nothing is killed by mistake.** Each node has a record file
//!   `RUN_DIR/<namespace>/<name>/<stem>.node.json` (mode 0600, since it holds the admin token)
//!   with its slot, id, pid, the process start time from `/proc/<pid>/stat` (field 22),
//!   addresses, token and launch time. Dropping the provider leaves the children running, as a
//!   `kill -9` of the operator would; [`ProcessProvider::open`] adopts every recorded process
//!   that is verifiably the same one (pid alive, same start time, command line `node` with the
//!   recorded address file) and forgets the records of the others. A process is signalled only
//!   after that check, through a pidfd, so a pid reused by an unrelated process is never hit.
//! - **Crashes are seen.** A child is owned by a task that waits on it, so it is reaped at
//!   once (no zombie) and listed `alive: false`; an adopted process, no longer our child, is
//!   checked through its `/proc` entry.
//! - **Ctrl-C reaches only the operator.** Children run in their own process group, so a
//!   terminal's SIGINT goes to the operator, which then stops them in order.
//!
//! The admin token reaches a child through `CACHEPOOL_ADMIN_TOKEN`, never its argv, which any
//! local user can read in `/proc/<pid>/cmdline`. Each child's output goes to `<stem>.log`
//! beside its record; the log of a node that stopped on request is removed with the record,
//! the log of a node that crashed is kept for a post-mortem.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    Error, LaunchSpec, PoolRef, Provider, ProviderKind, ProviderNode, Result, ShutdownPolicy,
};

/// How long a new node may take to bind its ports and write its address file. Binding takes
/// milliseconds; the margin is for a machine busy compiling.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for a process to disappear after SIGKILL before reporting it stuck.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Polling interval for address files and exits: short next to a node's start-up time.
const POLL: Duration = Duration::from_millis(10);
/// How much of a failed node's log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;
/// The operator's environment variables a node inherits; every other one is withheld.
const INHERITED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE", "TZ", "CACHEPOOL_LOG_FORMAT"];
/// File name ending of node records; everything else in a pool directory is left alone.
const RECORD_SUFFIX: &str = ".node.json";

/// How the process provider starts nodes and where it keeps their files.
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// The `cachepool` executable; children run `BINARY node …`.
    pub binary: PathBuf,
    /// Records, address files and logs of the nodes, one directory per pool.
    pub run_dir: PathBuf,
    /// Address both ports of every node listen on (with port 0).
    pub host: IpAddr,
    /// `--threads` of each node; 1 by default, since many nodes share one machine.
    pub node_threads: usize,
    /// How long a node may drain after SIGTERM before it gets SIGKILL.
    pub stop_grace: Duration,
}

impl ProcessOptions {
    /// Options with the defaults: loopback, one thread per node, 5 s stop grace.
    pub fn new(binary: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> ProcessOptions {
        ProcessOptions {
            binary: binary.into(),
            run_dir: run_dir.into(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            node_threads: 1,
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// Runs nodes as local child processes (see the module documentation).
///
/// Dropping it leaves every node running; [`ProcessProvider::open`] over the same run
/// directory adopts them again, and [`Provider::stop_all`] stops them.
pub struct ProcessProvider {
    opts: ProcessOptions,
    pools: Mutex<BTreeMap<PoolRef, BTreeMap<String, Entry>>>,
}

impl fmt::Debug for ProcessProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: usize = self.lock().values().map(BTreeMap::len).sum();
        f.debug_struct("ProcessProvider")
            .field("opts", &self.opts)
            .field("nodes", &nodes)
            .finish()
    }
}

/// What is stored about a node on disk. `startTime` is in clock ticks since boot, exactly as
/// `/proc/<pid>/stat` shows it, and is compared only with that.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    namespace: String,
    name: String,
    slot: u32,
    id: String,
    pid: u32,
    start_time: u64,
    address: String,
    admin_address: String,
    admin_token: String,
    launched_at_unix_ms: u64,
    addr_file: PathBuf,
    log_file: PathBuf,
}

/// A node the provider knows of.
#[derive(Clone)]
struct Entry {
    record: Record,
    record_path: PathBuf,
    watch: Watch,
}

/// How the provider learns that a node exited and how it signals it.
#[derive(Clone)]
enum Watch {
    /// Started by this provider: a task owns the `Child`, reaps it and publishes how it ended;
    /// signals go through that task, which sends them only while the child is unreaped (its
    /// pid cannot have been reused then).
    Child {
        exit: watch::Receiver<Option<String>>,
        signals: mpsc::UnboundedSender<libc::c_int>,
    },
    /// Found on disk at start: checked and signalled through `/proc` and a pidfd.
    Adopted,
}

impl Entry {
    fn alive(&self) -> bool {
        match &self.watch {
            Watch::Child { exit, .. } => exit.borrow().is_none(),
            Watch::Adopted => is_running(self.record.pid, self.record.start_time),
        }
    }

    fn signal(&self, signal: libc::c_int) {
        match &self.watch {
            // A closed channel means the child was reaped already: nothing to signal.
            Watch::Child { signals, .. } => {
                let _ = signals.send(signal);
            }
            Watch::Adopted => {
                signal_if_same(self.record.pid, self.record.start_time, signal);
            }
        }
    }

    fn node(&self) -> ProviderNode {
        let r = &self.record;
        ProviderNode {
            slot: r.slot,
            id: r.id.clone(),
            address: r.address.clone(),
            admin_address: r.admin_address.clone(),
            admin_token: r.admin_token.clone(),
            launched_at: UNIX_EPOCH + Duration::from_millis(r.launched_at_unix_ms),
            alive: self.alive(),
        }
    }

    fn pool(&self) -> PoolRef {
        PoolRef::new(&self.record.namespace, &self.record.name)
    }

    /// Removes the node's files; the log only if `keep_log` is false.
    fn remove_files(&self, keep_log: bool) {
        remove_quietly(&self.record_path);
        remove_quietly(&self.record.addr_file);
        if keep_log {
            warn!(pool = %self.pool(), id = %self.record.id, log = %self.record.log_file.display(),
                  "node had exited on its own; its log is kept");
        } else {
            remove_quietly(&self.record.log_file);
        }
    }
}

/// The announcement a node writes to its `--addr-file`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Announced {
    pid: u32,
    address: String,
    admin_address: String,
}

impl ProcessProvider {
    /// A provider that knows of no node yet and touches nothing on disk until a launch.
    /// Use [`ProcessProvider::open`] to take over the nodes of an earlier run.
    pub fn new(mut opts: ProcessOptions) -> ProcessProvider {
        // Records name files by absolute path, and children keep the operator's working
        // directory, so a relative run directory would tie adoption to where it was started.
        if let Ok(run_dir) = std::path::absolute(&opts.run_dir) {
            opts.run_dir = run_dir;
        }
        ProcessProvider {
            opts,
            pools: Mutex::new(BTreeMap::new()),
        }
    }

    /// A provider that adopts every node recorded under `opts.run_dir` that is still the same
    /// process, and forgets the records of nodes that are gone (their slots are simply empty;
    /// the reconcile core launches replacements).
    pub async fn open(opts: ProcessOptions) -> Result<ProcessProvider> {
        let provider = ProcessProvider::new(opts);
        provider.adopt()?;
        Ok(provider)
    }

    /// The options the provider was made with.
    pub fn options(&self) -> &ProcessOptions {
        &self.opts
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PoolRef, BTreeMap<String, Entry>>> {
        // Every critical section leaves the map consistent, so a panic elsewhere does not
        // make it unusable.
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool_dir(&self, pool: &PoolRef) -> PathBuf {
        self.opts.run_dir.join(&pool.namespace).join(&pool.name)
    }

    fn adopt(&self) -> Result<()> {
        let run_dir = &self.opts.run_dir;
        if !run_dir.exists() {
            return Ok(());
        }
        for namespace in subdirectories(run_dir)? {
            for pool_dir in subdirectories(&namespace)? {
                for path in list_dir(&pool_dir)? {
                    if path
                        .file_name()
                        .is_some_and(|n| n.as_bytes().ends_with(RECORD_SUFFIX.as_bytes()))
                    {
                        self.adopt_record(path);
                    }
                }
            }
        }
        Ok(())
    }

    fn adopt_record(&self, path: PathBuf) {
        let record: Record = match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(record) => record,
            Err(err) => {
                // Records are written atomically, so this is damage from outside; its process
                // cannot be verified, hence never signalled.
                warn!(path = %path.display(), %err, "unreadable node record removed");
                remove_quietly(&path);
                return;
            }
        };
        let entry = Entry {
            record,
            record_path: path,
            watch: Watch::Adopted,
        };
        let pool = entry.pool();
        if is_our_node(&entry.record) {
            info!(%pool, id = %entry.record.id, slot = entry.record.slot,
                  address = %entry.record.address, "adopted running node");
            self.lock()
                .entry(pool)
                .or_default()
                .insert(entry.record.id.clone(), entry);
        } else {
            info!(%pool, id = %entry.record.id, slot = entry.record.slot,
                  "recorded node is gone; record removed");
            entry.remove_files(true);
        }
    }

    async fn launch_node(&self, spec: &LaunchSpec) -> Result<Entry> {
        let (pool, slot) = (&spec.pool, spec.slot);
        if !is_directory_name(&pool.namespace) || !is_directory_name(&pool.name) {
            return Err(Error::PoolName { pool: pool.clone() });
        }
        let dir = self.pool_dir(pool);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create the directory", &dir))?;
        let stem = format!("slot{slot}-{:016x}", rand::random::<u64>());
        let addr_file = dir.join(format!("{stem}.addr"));
        let log_file = dir.join(format!("{stem}.log"));
        let record_path = dir.join(format!("{stem}{RECORD_SUFFIX}"));
        let log = create_private(&log_file)?;
        let log_err = log
            .try_clone()
            .map_err(io_error("open the log file", &log_file))?;
        let token = spec.admin_token.expose();
        let listen = SocketAddr::new(self.opts.host, 0).to_string();

        let mut command = Command::new(&self.opts.binary);
        command
            .arg("node")
            .args(["--listen", &listen, "--admin-listen", &listen])
            .args(["--capacity-mib", &spec.capacity_mib.to_string()])
            .args(["--policy", &spec.policy])
            .args(["--max-item-size-kib", &spec.max_item_size_kib.to_string()])
            .args(["--threads", &self.opts.node_threads.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            // A node gets its configuration from the operator alone: variables that configure
            // the operator (`CACHEPOOL_*` defaults, credentials) are not passed on, only the
            // ones that shape diagnostics.
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| {
                INHERITED_ENV
                    .iter()
                    .any(|name| k.as_os_str() == OsStr::new(name))
            }))
            .env("CACHEPOOL_ADMIN_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|source| {
            remove_quietly(&log_file);
            Error::Spawn {
                binary: self.opts.binary.clone(),
                source,
            }
        })?;
        // Read before the waiting task exists: until then nothing can reap the child, so its
        // /proc entry is there even if it already exited.
        let stat = child.id().and_then(proc_stat);
        let pid = child.id().unwrap_or_default();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let Some(stat) = stat else {
            let _ = child.start_kill();
            tokio::spawn(supervise(child, exit_tx, signal_rx));
            remove_quietly(&log_file);
            return Err(Error::Io {
                action: "read",
                path: PathBuf::from(format!("/proc/{pid}/stat")),
                source: io::Error::other("the process provider needs Linux's /proc"),
            });
        };
        tokio::spawn(supervise(child, exit_tx, signal_rx));
        let entry = Entry {
            record: Record {
                namespace: pool.namespace.clone(),
                name: pool.name.clone(),
                slot,
                id: format!("pid-{pid}"),
                pid,
                start_time: stat.start_time,
                address: String::new(),
                admin_address: String::new(),
                admin_token: token.to_owned(),
                launched_at_unix_ms: unix_ms(SystemTime::now()),
                addr_file,
                log_file,
            },
            record_path,
            watch: Watch::Child {
                exit: exit_rx.clone(),
                signals: signal_tx,
            },
        };
        match self.await_ports(pool, slot, entry.clone(), exit_rx).await {
            Ok(entry) => Ok(entry),
            Err(err) => {
                entry.signal(libc::SIGKILL);
                wait_exited(std::slice::from_ref(&entry), Instant::now() + KILL_WAIT).await;
                entry.remove_files(false);
                Err(err)
            }
        }
    }

    /// Waits for the address file, then writes the record.
    async fn await_ports(
        &self,
        pool: &PoolRef,
        slot: u32,
        mut entry: Entry,
        exit: watch::Receiver<Option<String>>,
    ) -> Result<Entry> {
        let addr_file = entry.record.addr_file.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        let announced = loop {
            match fs::read(&addr_file) {
                Ok(bytes) => {
                    break serde_json::from_slice::<Announced>(&bytes).map_err(|e| {
                        Error::AddrFile {
                            path: addr_file.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error("read", &addr_file)(err)),
            }
            let exited = exit.borrow().clone();
            if let Some(status) = exited {
                return Err(Error::NodeExited {
                    pool: pool.clone(),
                    slot,
                    status,
                    log_tail: log_tail(&entry.record.log_file),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    pool: pool.clone(),
                    slot,
                    timeout: START_TIMEOUT,
                    log_tail: log_tail(&entry.record.log_file),
                });
            }
            tokio::time::sleep(POLL).await;
        };
        if announced.pid != entry.record.pid {
            return Err(Error::AddrFile {
                path: addr_file,
                reason: format!(
                    "it names pid {} where the node started is pid {}",
                    announced.pid, entry.record.pid
                ),
            });
        }
        entry.record.address = announced.address;
        entry.record.admin_address = announced.admin_address;
        let json = serde_json::to_vec_pretty(&entry.record).map_err(|e| Error::Io {
            action: "encode",
            path: entry.record_path.clone(),
            source: io::Error::other(e),
        })?;
        write_private(&entry.record_path, &json)?;
        Ok(entry)
    }

    /// Stops `entries` (SIGTERM, `stop_grace`, SIGKILL), forgets the ones that exited and
    /// removes their files. Entries stay listed until they are gone, so a cancelled call
    /// loses track of nothing.
    async fn stop(&self, entries: Vec<Entry>) -> Result<()> {
        let was_alive: Vec<bool> = entries.iter().map(Entry::alive).collect();
        for (entry, alive) in entries.iter().zip(&was_alive) {
            if *alive {
                entry.signal(libc::SIGTERM);
            }
        }
        if !wait_exited(&entries, Instant::now() + self.opts.stop_grace).await {
            for entry in entries.iter().filter(|e| e.alive()) {
                warn!(pool = %entry.pool(), id = %entry.record.id, grace = ?self.opts.stop_grace,
                      "node did not stop on SIGTERM; sending SIGKILL");
                entry.signal(libc::SIGKILL);
            }
            wait_exited(&entries, Instant::now() + KILL_WAIT).await;
        }
        let mut first_error = None;
        for (entry, alive) in entries.iter().zip(was_alive) {
            let pool = entry.pool();
            if entry.alive() {
                first_error.get_or_insert(Error::StopTimeout {
                    pool,
                    id: entry.record.id.clone(),
                    timeout: self.opts.stop_grace + KILL_WAIT,
                });
                continue;
            }
            {
                let mut pools = self.lock();
                if let Some(nodes) = pools.get_mut(&pool) {
                    nodes.remove(&entry.record.id);
                    if nodes.is_empty() {
                        pools.remove(&pool);
                    }
                }
            }
            entry.remove_files(!alive);
            info!(%pool, id = %entry.record.id, slot = entry.record.slot, "node stopped");
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Provider for ProcessProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Process
    }

    fn shutdown_policy(&self) -> ShutdownPolicy {
        ShutdownPolicy::StopNodes
    }

    async fn list(&self, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        let mut nodes: Vec<ProviderNode> = self
            .lock()
            .get(pool)
            .map(|m| m.values().map(Entry::node).collect())
            .unwrap_or_default();
        nodes.sort_by(|a, b| (a.slot, a.launched_at, &a.id).cmp(&(b.slot, b.launched_at, &b.id)));
        Ok(nodes)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        let (pool, slot) = (&spec.pool, spec.slot);
        let entry = self.launch_node(spec).await?;
        let node = entry.node();
        info!(%pool, slot, id = %node.id, address = %node.address,
              admin_address = %node.admin_address, "node launched");
        let replaced = self
            .lock()
            .entry(pool.clone())
            .or_default()
            .insert(node.id.clone(), entry);
        if let Some(old) = replaced {
            // The kernel gave the new child the pid of a node that exited earlier and was
            // never terminated: that one is certainly gone.
            old.remove_files(true);
        }
        Ok(node)
    }

    async fn terminate(&self, pool: &PoolRef, id: &str) -> Result<()> {
        let entry = self.lock().get(pool).and_then(|m| m.get(id)).cloned();
        match entry {
            Some(entry) => self.stop(vec![entry]).await,
            None => Ok(()),
        }
    }

    async fn stop_all(&self) -> Result<()> {
        let entries: Vec<Entry> = self
            .lock()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        self.stop(entries).await
    }
}

/// Owns a child until it exits: forwards signals while it is unreaped, then reaps it and
/// publishes how it ended. Outlives the provider on purpose (a dropped provider must neither
/// kill its children nor leave them as zombies).
async fn supervise(
    mut child: Child,
    exit: watch::Sender<Option<String>>,
    mut signals: mpsc::UnboundedReceiver<libc::c_int>,
) {
    let mut listening = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.recv(), if listening => match signal {
                Some(signal) => signal_child(&child, signal),
                None => listening = false,
            },
        }
    };
    exit.send_replace(Some(match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("exit status unknown: {err}"),
    }));
}

fn signal_child(child: &Child, signal: libc::c_int) {
    // `id()` is None once the child is reaped; before that its pid cannot be reused.
    if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Waits until every entry has exited or `deadline` passes; true if all exited.
async fn wait_exited(entries: &[Entry], deadline: Instant) -> bool {
    loop {
        if entries.iter().all(|e| !e.alive()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The fields of `/proc/<pid>/stat` the provider uses.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    state: char,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 was the state; field 22 is 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Whether `pid` is still the process that started at `start_time` and has not exited
/// (a zombie has exited).
fn is_running(pid: u32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// Whether the recorded process is still running and is the node the record describes:
/// `… node … --addr-file <its address file>`. The address file is unique per launch.
fn is_our_node(record: &Record) -> bool {
    if !is_running(record.pid, record.start_time) {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", record.pid)) else {
        return false;
    };
    let args: Vec<&OsStr> = cmdline.split(|b| *b == 0).map(OsStr::from_bytes).collect();
    args.get(1) == Some(&OsStr::new("node"))
        && args
            .windows(2)
            .any(|w| w[0] == "--addr-file" && w[1] == record.addr_file.as_os_str())
}

/// Sends `signal` to `pid` only if it is still the process that started at `start_time`.
///
/// The pidfd pins whichever process had `pid` when it was opened. If, after opening it, `pid`
/// still shows the recorded start time, the pinned process is the recorded one, so the
/// signal cannot reach a process that reused the pid in between.
#[cfg(target_os = "linux")]
fn signal_if_same(pid: u32, start_time: u64, signal: libc::c_int) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: pidfd_open takes a pid and flags, touches no memory of ours, and returns a new
    // file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error().raw_os_error();
        // Kernels before 5.3 or a seccomp filter: fall back to check-then-kill, whose window
        // is the few microseconds between the two calls.
        if matches!(err, Some(libc::ENOSYS | libc::EPERM)) && is_running(pid, start_time) {
            // SAFETY: kill takes plain integers and touches no memory of ours.
            return unsafe { libc::kill(raw_pid, signal) } == 0;
        }
        return false;
    }
    let Ok(fd) = std::os::fd::RawFd::try_from(fd) else {
        return false;
    };
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !is_running(pid, start_time) {
        return false;
    }
    // SAFETY: pidfd_send_signal takes the pidfd, a signal, a null siginfo (meaning "as
    // kill would") and flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn signal_if_same(pid: u32, start_time: u64, signal: libc::c_int) -> bool {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill takes plain integers and touches no memory of ours.
    is_running(pid, start_time) && unsafe { libc::kill(raw_pid, signal) } == 0
}

/// Whether `name` is a Kubernetes-style name, hence a single harmless path component (no
/// `/`, no `..`, no hidden file).
fn is_directory_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// Creates (or truncates) a file only the operator's user can read.
fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename, so a reader
/// (a later `open`) sees the old record or the new one, never half of one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    remove_quietly(&tmp);
    let mut file = create_private(&tmp)?;
    file.write_all(bytes).map_err(io_error("write", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|err| {
        remove_quietly(&tmp);
        io_error("write", path)(err)
    })
}

fn remove_quietly(path: &Path) {
    if let Err(err) = fs::remove_file(path)
        && err.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), %err, "cannot remove file");
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for item in fs::read_dir(dir).map_err(io_error("read the directory", dir))? {
        paths.push(item.map_err(io_error("read the directory", dir))?.path());
    }
    paths.sort();
    Ok(paths)
}

fn subdirectories(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// The end of a log, at most `LOG_TAIL_BYTES`, starting at a line boundary.
fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(LOG_TAIL_BYTES);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let text = match (start > 0, text.find('\n')) {
            (true, Some(nl)) => text[nl + 1..].to_string(),
            _ => text,
        };
        Ok(text.trim_end().to_string())
    };
    match read() {
        Ok(text) if text.is_empty() => "(the log is empty)".into(),
        Ok(text) => text,
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (we(ird) n) ame) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 12345678 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("4242 (cut) S 1 2"), None);
    }

    #[test]
    fn own_process_is_running_with_its_start_time_and_not_with_another() {
        let pid = std::process::id();
        let stat = proc_stat(pid).unwrap();
        assert!(is_running(pid, stat.start_time));
        assert!(!is_running(pid, stat.start_time + 1));
    }

    #[test]
    fn signal_is_not_sent_when_the_start_time_differs() {
        let pid = std::process::id();
        let stat = proc_stat(pid).unwrap();
        // Signal 0 checks deliverability only; a mismatch must not even get that far.
        assert!(!signal_if_same(pid, stat.start_time + 1, 0));
        assert!(signal_if_same(pid, stat.start_time, 0));
    }

    #[test]
    fn only_kubernetes_names_become_directories() {
        for good in ["default", "web-cache", "a.b", "x1"] {
            assert!(is_directory_name(good), "{good}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", ".hidden", "Web", "a b"] {
            assert!(!is_directory_name(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (
            crate::provider::AdminToken::generate(),
            crate::provider::AdminToken::generate(),
        );
        let (a, b) = (a.expose(), b.expose());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn log_tail_keeps_the_last_whole_lines() {
        let dir = std::env::temp_dir().join(format!("provider-log-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.log");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("line {i}\n"));
        }
        fs::write(&path, &text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.len() <= LOG_TAIL_BYTES as usize);
        assert!(tail.starts_with("line "), "{tail:?}");
        assert!(tail.ends_with("line 999"), "{tail:?}");
        fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path), "(the log is empty)");
        fs::remove_dir_all(&dir).unwrap();
        assert!(log_tail(&path).starts_with("(cannot read"));
    }

    #[test]
    fn records_are_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("provider-record-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("slot0-1{RECORD_SUFFIX}"));
        write_private(&path, b"first").unwrap();
        write_private(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(list_dir(&dir).unwrap(), vec![path]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
