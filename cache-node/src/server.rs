//! The memcached data port: an accept loop with a connection cap, and one task per connection
//! that parses every complete command in its buffer, executes it against the store, and
//! writes all answers with one write (so pipelined requests cost one syscall per batch).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::metrics::{Cmd, NodeStats, unix_now};
use crate::protocol::{self, Command, DetailCmd, Frame, Limits, StatsCmd, StoreCmd};
use crate::store::classes::{self, MAX_CLASS};
use crate::store::{ArithOutcome, DeleteOutcome, ItemMeta, Now, Store, StoreMode, StoreOutcome};

/// The version string `version` and `stats` report. memcached's major.minor first, so client
/// libraries that gate features on the server version treat the node as a 1.6 server.
pub const VERSION: &str = concat!("1.6.0-cachepool-", env!("CARGO_PKG_VERSION"));

/// Settings of the data port.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub max_connections: usize,
    /// Close connections idle this long (0: never, as memcached's default).
    pub idle_timeout: Duration,
    pub threads: usize,
    /// How connections are spread over the `threads` worker threads.
    pub scheduling: Scheduling,
    pub listen: String,
}

/// How the data port's connections are scheduled on the worker threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// Each worker thread runs its own event loop; a connection is handed to one of them at
    /// accept (round-robin) and stays there, as memcached's worker threads do. A request is
    /// read, executed and answered on one thread, with no hand-over between threads.
    #[default]
    Pinned,
    /// Connections are tasks on one work-stealing runtime shared by the worker threads: an
    /// idle worker takes over a busy one's connections, at the cost of waking each other.
    Shared,
}

impl std::fmt::Display for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scheduling::Pinned => "pinned",
            Scheduling::Shared => "shared",
        })
    }
}

/// The worker threads of [`Scheduling::Pinned`]: each runs a single-threaded runtime until
/// the set is dropped.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: usize,
    stop: watch::Sender<bool>,
}

impl Workers {
    fn start(threads: usize, running: &Arc<AtomicUsize>) -> std::io::Result<Workers> {
        let (stop, stopped) = watch::channel(false);
        let mut workers = Workers {
            handles: Vec::with_capacity(threads),
            next: 0,
            stop,
        };
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            running.fetch_add(1, Ordering::Relaxed);
            let done = running.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("node-data-{i}"))
                .spawn(move || {
                    // Connection tasks run while this thread waits here; dropping the runtime
                    // afterwards drops whatever is left of them.
                    runtime.block_on(async {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    });
                    drop(runtime);
                    done.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(err) = spawned {
                running.fetch_sub(1, Ordering::Relaxed);
                return Err(err);
            }
        }
        Ok(workers)
    }

    /// The next worker, round-robin.
    fn next(&mut self) -> &tokio::runtime::Handle {
        let handle = &self.handles[self.next % self.handles.len()];
        self.next = self.next.wrapping_add(1);
        handle
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// State shared by every connection and the admin API.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<Store>,
    pub stats: Arc<NodeStats>,
    pub settings: ServerSettings,
    max_item_size: AtomicUsize,
    /// Open connections by socket descriptor (`stats conns`); touched on connect and close.
    conns: Mutex<BTreeMap<i32, Arc<ConnInfo>>>,
    /// The listening socket's descriptor, once `serve` runs (`stats conns`).
    listener_fd: AtomicI32,
    /// `stats sizes_enable`: whether `stats sizes` shows the histogram.
    sizes_enabled: AtomicBool,
    /// `stats detail on`: count gets, hits, sets and deletes per key prefix.
    detail_enabled: AtomicBool,
    detail: Mutex<HashMap<Vec<u8>, PrefixStats>>,
    /// Worker threads of [`Scheduling::Pinned`] currently running.
    data_threads: Arc<AtomicUsize>,
}

/// What `stats conns` shows of one connection.
#[derive(Debug)]
struct ConnInfo {
    peer: SocketAddr,
    /// Unix second of the last batch of commands.
    last_cmd: AtomicU32,
}

/// `stats detail dump` counters of one key prefix.
#[derive(Clone, Copy, Debug, Default)]
struct PrefixStats {
    gets: u64,
    hits: u64,
    sets: u64,
    deletes: u64,
}

/// memcached's key prefix delimiter for `stats detail`.
const PREFIX_DELIMITER: u8 = b':';
/// Most prefixes `stats detail` tracks, so a client cannot grow the table without bound.
const MAX_PREFIXES: usize = 4096;
/// Largest `stats cachedump` answer, memcached's bound too.
const CACHEDUMP_MAX_BYTES: usize = 2 << 20;

impl Shared {
    pub fn new(store: Arc<Store>, settings: ServerSettings, max_item_size: usize) -> Shared {
        store.set_max_item_size(max_item_size);
        Shared {
            store,
            stats: Arc::new(NodeStats::default()),
            settings,
            max_item_size: AtomicUsize::new(max_item_size),
            conns: Mutex::default(),
            listener_fd: AtomicI32::new(-1),
            sizes_enabled: AtomicBool::new(false),
            detail_enabled: AtomicBool::new(false),
            detail: Mutex::default(),
            data_threads: Arc::default(),
        }
    }

    /// Worker threads of `--scheduling pinned` running now (0 with `shared`, and once the
    /// data port has stopped).
    pub fn data_threads(&self) -> usize {
        self.data_threads.load(Ordering::Relaxed)
    }

    pub fn max_item_size(&self) -> usize {
        self.max_item_size.load(Ordering::Relaxed)
    }

    pub fn set_max_item_size(&self, bytes: usize) {
        self.max_item_size.store(bytes, Ordering::Relaxed);
        self.store.set_max_item_size(bytes);
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Arc<ConnInfo>>> {
        // The map is complete after every insert or remove, so a poisoned lock is still sound.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one operation on `key` for `stats detail`, when it is on and the key has a
    /// prefix (memcached counts only keys holding the delimiter).
    fn detail(&self, key: &[u8], update: impl FnOnce(&mut PrefixStats)) {
        if !self.detail_enabled.load(Ordering::Relaxed) {
            return;
        }
        let Some(end) = key.iter().position(|&b| b == PREFIX_DELIMITER) else {
            return;
        };
        let mut map = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = &key[..end];
        if let Some(s) = map.get_mut(prefix) {
            update(s);
        } else if map.len() < MAX_PREFIXES {
            update(map.entry(prefix.to_vec()).or_default());
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_item_size: self.max_item_size(),
            ..Limits::default()
        }
    }
}

/// Accepts connections until `shutdown` resolves, then closes the listener and waits (up to
/// `drain`) for open connections to finish their current batch.
///
/// With [`Scheduling::Pinned`] (the default) connections are spread over worker threads of
/// their own, each a single-threaded runtime, and the calling runtime only accepts. With
/// [`Scheduling::Shared`] they are tasks on the calling runtime. Pinned answers a depth-1
/// request with no wake-up of another thread, which is where the shared runtime's median
/// latency went (docs/benchmarks.md §1); a descheduled worker delays the connections pinned
/// to it, which is the price.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut workers = match shared.settings.scheduling {
        Scheduling::Shared => None,
        Scheduling::Pinned => match Workers::start(shared.settings.threads, &shared.data_threads) {
            Ok(workers) => Some(workers),
            Err(err) => {
                // Out of threads or memory for a runtime: serve, on the shared runtime,
                // rather than not at all.
                warn!(%err, "cannot start the data port's worker threads; connections run on the shared runtime");
                None
            }
        },
    };
    tokio::pin!(shutdown);
    shared
        .listener_fd
        .store(listener.as_raw_fd(), Ordering::Relaxed);
    info!(addr = ?listener.local_addr().ok(), scheduling = %shared.settings.scheduling, "memcached port listening");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(ok) => ok,
                    Err(err) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let stats = &shared.stats;
                if stats.curr_connections.load(Ordering::Relaxed) as usize >= shared.settings.max_connections {
                    stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
                    // memcached's answer at its connection limit.
                    let _ = stream.try_write(b"ERROR Too many open connections\r\n");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                stats.curr_connections.fetch_add(1, Ordering::Relaxed);
                stats.total_connections.fetch_add(1, Ordering::Relaxed);
                let fd = stream.as_raw_fd();
                let info = Arc::new(ConnInfo { peer, last_cmd: AtomicU32::new(unix_now()) });
                shared.conns().insert(fd, info.clone());
                let (shared, stop) = (shared.clone(), stop_rx.clone());
                match workers.as_mut() {
                    None => {
                        conns.spawn(connection(Ok(stream), shared, info, fd, stop));
                    }
                    Some(workers) => {
                        // The socket leaves this runtime's reactor and joins the worker's, so
                        // that its readiness wakes the worker's own thread.
                        let stream = stream.into_std();
                        conns.spawn_on(
                            async move {
                                let stream = stream.and_then(TcpStream::from_std);
                                connection(stream, shared, info, fd, stop).await;
                            },
                            workers.next(),
                        );
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    drop(workers);
}

/// Serves one accepted connection to its end, then forgets it.
async fn connection(
    stream: std::io::Result<TcpStream>,
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    fd: i32,
    stop: watch::Receiver<bool>,
) {
    let peer = info.peer;
    let served = match stream {
        Ok(stream) => {
            Connection::new(stream, &shared, info.clone())
                .run(stop)
                .await
        }
        Err(err) => Err(err),
    };
    if let Err(err) = served {
        debug!(%peer, %err, "connection ended with an error");
    }
    // The socket is closed by now and its descriptor may already belong to a newer
    // connection: remove the entry only if it is still this one's.
    let mut open = shared.conns();
    if open.get(&fd).is_some_and(|c| Arc::ptr_eq(c, &info)) {
        open.remove(&fd);
    }
    drop(open);
    shared
        .stats
        .curr_connections
        .fetch_sub(1, Ordering::Relaxed);
}

struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    info: Arc<ConnInfo>,
    input: BytesMut,
    output: Vec<u8>,
    /// Bytes of a rejected data block still to discard.
    swallow: u64,
}

enum Next {
    /// Everything buffered is done; read more.
    Continue,
    /// Answers are piling up: write them before executing more, so a pipeline of large
    /// reads cannot grow the output without bound.
    Flush,
    Close,
}

/// Output size at which answers are written before more commands run.
const FLUSH_AT: usize = 1 << 20;

impl<'a> Connection<'a> {
    fn new(stream: TcpStream, shared: &'a Shared, info: Arc<ConnInfo>) -> Self {
        Connection {
            stream,
            shared,
            info,
            input: BytesMut::with_capacity(16 * 1024),
            output: Vec::with_capacity(16 * 1024),
            swallow: 0,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
        let idle = self.shared.settings.idle_timeout;
        loop {
            // Grow by doubling so that a large value arrives in O(log n) reallocations.
            let spare = self.input.capacity() - self.input.len();
            if spare < 4096 {
                self.input.reserve(self.input.len().max(16 * 1024));
            }
            let read = async {
                if idle.is_zero() {
                    self.stream.read_buf(&mut self.input).await.map(Some)
                } else {
                    match tokio::time::timeout(idle, self.stream.read_buf(&mut self.input)).await {
                        Ok(r) => r.map(Some),
                        Err(_) => Ok(None),
                    }
                }
            };
            let n = tokio::select! {
                r = read => r?,
                _ = stop.changed() => return Ok(()),
            };
            match n {
                None | Some(0) => return Ok(()),
                Some(n) => {
                    self.shared
                        .stats
                        .bytes_read
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            loop {
                let next = self.process();
                if !self.output.is_empty() {
                    self.stream.write_all(&self.output).await?;
                    self.shared
                        .stats
                        .bytes_written
                        .fetch_add(self.output.len() as u64, Ordering::Relaxed);
                    self.output.clear();
                    // Do not keep a large answer's buffer for the connection's lifetime.
                    if self.output.capacity() > 4 * FLUSH_AT {
                        self.output = Vec::with_capacity(16 * 1024);
                    }
                }
                match next {
                    Next::Continue => break,
                    Next::Flush => continue,
                    Next::Close => return Ok(()),
                }
            }
            if self.input.is_empty() && self.input.capacity() > 1 << 20 {
                self.input = BytesMut::with_capacity(16 * 1024);
            }
        }
    }

    /// Executes every complete command in the input buffer.
    fn process(&mut self) -> Next {
        let limits = self.shared.limits();
        // Once per batch, not per command: `stats conns` shows whole seconds.
        self.info.last_cmd.store(unix_now(), Ordering::Relaxed);
        loop {
            if self.swallow > 0 {
                let n = (self.swallow as usize).min(self.input.len());
                self.input.advance(n);
                self.swallow -= n as u64;
                if self.swallow > 0 {
                    return Next::Continue;
                }
            }
            let Some((frame, used)) = protocol::parse(&self.input, &limits) else {
                return Next::Continue;
            };
            let next = match frame {
                Frame::Command(cmd) => execute(self.shared, &self.info, cmd, &mut self.output),
                Frame::Error(reply) => {
                    self.shared
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    line(&mut self.output, reply);
                    Next::Continue
                }
                Frame::Swallow {
                    reply,
                    bytes,
                    unlink,
                } => {
                    self.shared
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = reply {
                        line(&mut self.output, reply);
                    }
                    if let Some(key) = unlink {
                        self.shared.store.delete(key, Now::system());
                    }
                    self.swallow = bytes;
                    Next::Continue
                }
                Frame::Silent => {
                    self.shared
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    Next::Continue
                }
                Frame::Close(reply) => {
                    self.shared
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    line(&mut self.output, reply);
                    Next::Close
                }
                Frame::Hangup => {
                    self.shared
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    // Nothing goes back to an HTTP peer, not even answers to commands that
                    // came before in the same packet (memcached drops those too).
                    self.output.clear();
                    Next::Close
                }
            };
            self.input.advance(used);
            if let Next::Close = next {
                return next;
            }
            if self.output.len() >= FLUSH_AT {
                return Next::Flush;
            }
        }
    }
}

fn line(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn reply(out: &mut Vec<u8>, noreply: bool, text: &str) {
    if !noreply {
        line(out, text);
    }
}

/// Runs one command from connection `conn`, appending its answer to `out`.
fn execute(shared: &Shared, conn: &Arc<ConnInfo>, cmd: Command<'_>, out: &mut Vec<u8>) -> Next {
    let start = Instant::now();
    // One reading of the clock per command: seconds for expiry, milliseconds for the order
    // of writes and deletes (tombstones, hand-off write times).
    let clock = Now::system();
    let now = clock.secs;
    let store = &shared.store;
    let kind = match cmd {
        Command::Get { keys, cas, touch } => {
            let touch = touch.map(|t| protocol::absolute_expiry(t, now));
            for key in keys.iter() {
                let hit = store.get(key, touch, now, |meta, value| {
                    // itoa rather than `write!`: the formatting machinery showed up in
                    // profiles of the get path.
                    let mut num = itoa::Buffer::new();
                    out.reserve(key.len() + value.len() + 64);
                    out.extend_from_slice(b"VALUE ");
                    out.extend_from_slice(key);
                    out.push(b' ');
                    out.extend_from_slice(num.format(meta.flags).as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(num.format(value.len()).as_bytes());
                    if cas {
                        out.push(b' ');
                        out.extend_from_slice(num.format(meta.cas).as_bytes());
                    }
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                });
                shared.detail(key, |s| {
                    s.gets += 1;
                    s.hits += u64::from(hit);
                });
            }
            out.extend_from_slice(b"END\r\n");
            if touch.is_some() { Cmd::Gat } else { Cmd::Get }
        }
        Command::Store {
            cmd,
            key,
            flags,
            exptime,
            data,
            noreply,
        } => {
            let (mode, kind) = match cmd {
                StoreCmd::Set => (StoreMode::Set, Cmd::Set),
                StoreCmd::Add => (StoreMode::Add, Cmd::Add),
                StoreCmd::Replace => (StoreMode::Replace, Cmd::Replace),
                StoreCmd::Append => (StoreMode::Append, Cmd::Append),
                StoreCmd::Prepend => (StoreMode::Prepend, Cmd::Prepend),
                StoreCmd::Cas(v) => (StoreMode::Cas(v), Cmd::Cas),
            };
            let expiry = protocol::absolute_expiry(exptime, now);
            let outcome = store.store(mode, key, data, flags, expiry, clock);
            shared.detail(key, |s| s.sets += 1);
            match outcome {
                StoreOutcome::Stored => reply(out, noreply, "STORED"),
                StoreOutcome::NotStored => reply(out, noreply, "NOT_STORED"),
                StoreOutcome::Exists => reply(out, noreply, "EXISTS"),
                StoreOutcome::NotFound => reply(out, noreply, "NOT_FOUND"),
                StoreOutcome::TooLarge => {
                    reply(out, noreply, "SERVER_ERROR out of memory storing object")
                }
            }
            kind
        }
        Command::Delete { key, noreply } => {
            let found = store.delete(key, clock);
            shared.detail(key, |s| s.deletes += 1);
            reply(out, noreply, if found { "DELETED" } else { "NOT_FOUND" });
            Cmd::Delete
        }
        Command::Arith {
            incr,
            key,
            delta,
            noreply,
        } => {
            match store.arith(key, incr, delta, clock) {
                ArithOutcome::Value(v) => reply(out, noreply, &v.to_string()),
                ArithOutcome::NotFound => reply(out, noreply, "NOT_FOUND"),
                ArithOutcome::NonNumeric => reply(
                    out,
                    noreply,
                    "CLIENT_ERROR cannot increment or decrement non-numeric value",
                ),
            }
            if incr { Cmd::Incr } else { Cmd::Decr }
        }
        Command::Touch {
            key,
            exptime,
            noreply,
        } => {
            let found = store.touch(key, protocol::absolute_expiry(exptime, now), now);
            reply(out, noreply, if found { "TOUCHED" } else { "NOT_FOUND" });
            Cmd::Touch
        }
        Command::FlushAll { delay, noreply } => {
            let deadline = if delay <= 0 {
                0
            } else {
                protocol::absolute_expiry(delay, now)
            };
            store.flush_all(deadline, now);
            shared.stats.cmd_flush.fetch_add(1, Ordering::Relaxed);
            reply(out, noreply, "OK");
            Cmd::FlushAll
        }
        Command::Stats(which) => {
            match which {
                StatsCmd::General => write_stats(out, &general_stats(shared)),
                StatsCmd::Settings => write_stats(out, &settings_stats(shared)),
                StatsCmd::Reset => {
                    store.reset_stats();
                    shared.stats.reset();
                    line(out, "RESET");
                }
                StatsCmd::Items => items_stats(shared, now, out),
                StatsCmd::Slabs => slabs_stats(shared, now, out),
                StatsCmd::Sizes => sizes_stats(shared, now, out),
                StatsCmd::SizesEnable(on) => {
                    shared.sizes_enabled.store(on, Ordering::Relaxed);
                    // memcached sends this line without END; END is added so that a client
                    // reading a stats answer (to END) does not wait forever.
                    line(
                        out,
                        if on {
                            "STAT sizes_status enabled"
                        } else {
                            "STAT sizes_status disabled"
                        },
                    );
                    line(out, "END");
                }
                StatsCmd::Conns => conns_stats(shared, conn, out),
                StatsCmd::CacheDump { class, limit } => cachedump(shared, class, limit, now, out),
                StatsCmd::Detail(DetailCmd::On | DetailCmd::Off) => {
                    let on = which == StatsCmd::Detail(DetailCmd::On);
                    shared.detail_enabled.store(on, Ordering::Relaxed);
                    line(out, "OK");
                }
                StatsCmd::Detail(DetailCmd::Dump) => detail_dump(shared, out),
                // No external storage: an empty set of statistics, as memcached without
                // extstore configured answers.
                StatsCmd::Extstore => line(out, "END"),
            }
            Cmd::Stats
        }
        Command::Version => {
            line(out, &format!("VERSION {VERSION}"));
            Cmd::Other
        }
        Command::Verbosity { noreply } => {
            reply(out, noreply, "OK");
            Cmd::Other
        }
        Command::CacheMemlimit { mib, noreply } => {
            let bytes = usize::try_from(mib)
                .unwrap_or(usize::MAX / 2)
                .saturating_mul(1 << 20);
            store.set_limit(bytes, now);
            reply(out, noreply, "OK");
            Cmd::Other
        }
        Command::Quit => return Next::Close,
        Command::MetaGet { key, flags } => {
            meta_get(store, key, &flags, clock, out);
            if flags.touch.is_some() {
                Cmd::Gat
            } else {
                Cmd::Get
            }
        }
        Command::MetaNoop => {
            line(out, "MN");
            Cmd::Other
        }
        Command::MetaSet { key, data, flags } => {
            let mode = match (flags.compare_cas, flags.mode) {
                (Some(cas), _) => StoreMode::Cas(cas),
                (None, StoreCmd::Add) if flags.unless_deleted => StoreMode::AddUnlessDeleted {
                    written_ms: flags.written_ms,
                },
                (None, StoreCmd::Add) => StoreMode::Add,
                (None, StoreCmd::Replace) => StoreMode::Replace,
                (None, StoreCmd::Append) => StoreMode::Append,
                (None, StoreCmd::Prepend) => StoreMode::Prepend,
                (None, _) => StoreMode::Set,
            };
            let expiry = protocol::absolute_expiry(flags.ttl, now);
            let (outcome, cas) =
                store.store_cas(mode, key, data, flags.client_flags, expiry, clock);
            let code = match outcome {
                StoreOutcome::Stored => "HD",
                StoreOutcome::NotStored => "NS",
                StoreOutcome::Exists => "EX",
                StoreOutcome::NotFound => "NF",
                StoreOutcome::TooLarge => {
                    line(out, "SERVER_ERROR out of memory storing object");
                    return Next::Continue;
                }
            };
            if !(flags.quiet && outcome == StoreOutcome::Stored) {
                // memcached answers `c0` when nothing was stored.
                let cas = flags.return_cas.then_some(cas);
                meta_reply(
                    out,
                    code,
                    cas,
                    flags.return_key.then_some(key),
                    flags.opaque,
                );
            }
            if flags.compare_cas.is_some() {
                Cmd::Cas
            } else {
                Cmd::Set
            }
        }
        Command::MetaDelete { key, flags } => {
            let tombstone = !flags.no_tombstone;
            let code = match store.delete_cas(key, flags.compare_cas, tombstone, clock) {
                DeleteOutcome::Deleted => "HD",
                DeleteOutcome::NotFound => "NF",
                DeleteOutcome::Exists => "EX",
            };
            if !(flags.quiet && code == "HD") {
                meta_reply(
                    out,
                    code,
                    None,
                    flags.return_key.then_some(key),
                    flags.opaque,
                );
            }
            Cmd::Delete
        }
    };
    shared.stats.record(kind, start.elapsed());
    Next::Continue
}

/// `mg`: `VA <size> <flags>` and the value when `v` is asked, `HD <flags>` otherwise, `EN`
/// on a miss (nothing with `q`).
fn meta_get(
    store: &Store,
    key: &[u8],
    f: &protocol::MetaGetFlags<'_>,
    clock: Now,
    out: &mut Vec<u8>,
) {
    let now = clock.secs;
    let touch = f.touch.map(|t| protocol::absolute_expiry(t, now));
    let reply = |meta: ItemMeta, value: &[u8]| {
        let mut num = itoa::Buffer::new();
        if f.value {
            out.extend_from_slice(b"VA ");
            out.extend_from_slice(num.format(value.len()).as_bytes());
        } else {
            out.extend_from_slice(b"HD");
        }
        if f.client_flags {
            out.extend_from_slice(b" f");
            out.extend_from_slice(num.format(meta.flags).as_bytes());
        }
        if f.ttl {
            out.extend_from_slice(b" t");
            let ttl = if meta.expiry == 0 {
                -1
            } else {
                i64::from(meta.expiry.saturating_sub(now))
            };
            out.extend_from_slice(num.format(ttl).as_bytes());
        }
        if f.cas {
            out.extend_from_slice(b" c");
            out.extend_from_slice(num.format(meta.cas).as_bytes());
        }
        if f.size {
            out.extend_from_slice(b" s");
            out.extend_from_slice(num.format(value.len()).as_bytes());
        }
        if f.key {
            out.extend_from_slice(b" k");
            out.extend_from_slice(key);
        }
        if let Some(written) = meta.written_ms {
            out.extend_from_slice(b" w");
            out.extend_from_slice(num.format(written).as_bytes());
        }
        if let Some(opaque) = f.opaque {
            out.extend_from_slice(b" O");
            out.extend_from_slice(opaque);
        }
        out.extend_from_slice(b"\r\n");
        if f.value {
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    };
    let hit = if f.written {
        store.get_with_write_time(key, touch, clock, reply)
    } else {
        store.get(key, touch, now, reply)
    };
    if !hit && !f.quiet {
        out.extend_from_slice(b"EN\r\n");
    }
}

/// A meta command's status line: the code, then the requested return flags.
fn meta_reply(
    out: &mut Vec<u8>,
    code: &str,
    cas: Option<u64>,
    key: Option<&[u8]>,
    opaque: Option<&[u8]>,
) {
    out.extend_from_slice(code.as_bytes());
    if let Some(cas) = cas {
        out.extend_from_slice(b" c");
        out.extend_from_slice(itoa::Buffer::new().format(cas).as_bytes());
    }
    if let Some(key) = key {
        out.extend_from_slice(b" k");
        out.extend_from_slice(key);
    }
    if let Some(opaque) = opaque {
        out.extend_from_slice(b" O");
        out.extend_from_slice(opaque);
    }
    out.extend_from_slice(b"\r\n");
}

fn write_stats(out: &mut Vec<u8>, stats: &[(&'static str, String)]) {
    for (name, value) in stats {
        let _ = write!(out, "STAT {name} {value}\r\n");
    }
    out.extend_from_slice(b"END\r\n");
}

/// `stats`, with memcached's field names.
pub fn general_stats(shared: &Shared) -> Vec<(&'static str, String)> {
    let s = shared.store.stats();
    let c = s.counters;
    let n = &shared.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
    let usage = rusage();
    vec![
        ("pid", std::process::id().to_string()),
        ("uptime", n.uptime().as_secs().to_string()),
        ("time", unix_now().to_string()),
        ("version", VERSION.to_string()),
        ("pointer_size", (usize::BITS).to_string()),
        ("rusage_user", usage.0),
        ("rusage_system", usage.1),
        ("curr_connections", load(&n.curr_connections)),
        ("total_connections", load(&n.total_connections)),
        ("rejected_connections", load(&n.rejected_connections)),
        ("cmd_get", (c.get_hits + c.get_misses).to_string()),
        ("cmd_set", c.cmd_set.to_string()),
        ("cmd_flush", load(&n.cmd_flush)),
        ("cmd_touch", c.cmd_touch.to_string()),
        ("get_hits", c.get_hits.to_string()),
        ("get_misses", c.get_misses.to_string()),
        ("get_expired", c.get_expired.to_string()),
        ("get_flushed", c.get_flushed.to_string()),
        ("delete_misses", c.delete_misses.to_string()),
        ("delete_hits", c.delete_hits.to_string()),
        ("incr_misses", c.incr_misses.to_string()),
        ("incr_hits", c.incr_hits.to_string()),
        ("decr_misses", c.decr_misses.to_string()),
        ("decr_hits", c.decr_hits.to_string()),
        ("cas_misses", c.cas_misses.to_string()),
        ("cas_hits", c.cas_hits.to_string()),
        ("cas_badval", c.cas_badval.to_string()),
        ("touch_hits", c.touch_hits.to_string()),
        ("touch_misses", c.touch_misses.to_string()),
        ("bytes_read", load(&n.bytes_read)),
        ("bytes_written", load(&n.bytes_written)),
        ("limit_maxbytes", s.limit_maxbytes.to_string()),
        ("threads", shared.settings.threads.to_string()),
        ("bytes", s.bytes.to_string()),
        ("curr_items", s.curr_items.to_string()),
        ("total_items", c.total_items.to_string()),
        ("expired_unfetched", c.expired_unfetched.to_string()),
        ("evictions", c.evictions.to_string()),
        ("policy", shared.store.policy().to_string()),
    ]
}

/// `stats settings`.
pub fn settings_stats(shared: &Shared) -> Vec<(&'static str, String)> {
    let set = &shared.settings;
    vec![
        ("maxbytes", shared.store.limit().to_string()),
        ("maxconns", set.max_connections.to_string()),
        (
            "tcpport",
            set.listen.rsplit(':').next().unwrap_or("0").to_string(),
        ),
        ("interface", set.listen.clone()),
        ("evictions", "on".to_string()),
        ("num_threads", set.threads.to_string()),
        ("idle_timeout", set.idle_timeout.as_secs().to_string()),
        ("cas_enabled", "yes".to_string()),
        ("item_size_max", shared.max_item_size().to_string()),
        (
            "detail_enabled",
            yes_no(shared.detail_enabled.load(Ordering::Relaxed)),
        ),
        (
            "track_sizes",
            yes_no(shared.sizes_enabled.load(Ordering::Relaxed)),
        ),
        ("stat_key_prefix", (PREFIX_DELIMITER as char).to_string()),
        ("binding_protocol", "ascii".to_string()),
        ("policy", shared.store.policy().to_string()),
    ]
}

fn yes_no(on: bool) -> String {
    if on { "yes" } else { "no" }.to_string()
}

/// User and system CPU seconds of this process, as memcached formats them.
fn rusage() -> (String, String) {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let fmt = |t: libc::timeval| format!("{}.{:06}", t.tv_sec, t.tv_usec);
    (fmt(usage.ru_utime), fmt(usage.ru_stime))
}

/// One `STAT <name> <value>` line.
fn stat_line(out: &mut Vec<u8>, name: std::fmt::Arguments<'_>, value: impl std::fmt::Display) {
    let _ = write!(out, "STAT {name} {value}\r\n");
}

/// `stats items`, memcached's fields per size class (`store::classes` for the mapping). The
/// node has one queue per shard rather than memcached's hot/warm/cold segments, and counts
/// evictions, hits and reclaims per shard rather than per class: those per-class fields are
/// 0 here and their node-wide totals are in `stats`.
fn items_stats(shared: &Shared, now: u32, out: &mut Vec<u8>) {
    for (class, u) in shared.store.size_classes(now) {
        if u.items == 0 {
            continue;
        }
        // memcached's fields in memcached's order. The single queue is where evictions
        // happen, memcached's cold segment.
        let fields: [(&str, u64); 28] = [
            ("number", u.items),
            ("number_hot", 0),
            ("number_warm", 0),
            ("number_cold", u.items),
            ("age_hot", 0),
            ("age_warm", 0),
            ("age", 0),
            ("mem_requested", u.requested),
            ("evicted", 0),
            ("evicted_nonzero", 0),
            ("evicted_time", 0),
            ("outofmemory", 0),
            ("tailrepairs", 0),
            ("reclaimed", 0),
            ("expired_unfetched", 0),
            ("evicted_unfetched", 0),
            ("evicted_active", 0),
            ("crawler_reclaimed", 0),
            ("crawler_items_checked", 0),
            ("lrutail_reflocked", 0),
            ("moves_to_cold", 0),
            ("moves_to_warm", 0),
            ("moves_within_lru", 0),
            ("direct_reclaims", 0),
            ("hits_to_hot", 0),
            ("hits_to_warm", 0),
            ("hits_to_cold", 0),
            ("hits_to_temp", 0),
        ];
        for (field, value) in fields {
            stat_line(out, format_args!("items:{class}:{field}"), value);
        }
    }
    out.extend_from_slice(b"END\r\n");
}

/// `stats slabs`: memory per size class, then `active_slabs` and `total_malloced`.
fn slabs_stats(shared: &Shared, now: u32, out: &mut Vec<u8>) {
    const ZERO_FIELDS: [&str; 8] = [
        "get_hits",
        "cmd_set",
        "delete_hits",
        "incr_hits",
        "decr_hits",
        "cas_hits",
        "cas_badval",
        "touch_hits",
    ];
    let usage = shared.store.size_classes(now);
    let mut malloced = 0;
    for (&class, u) in &usage {
        let total = u.total_chunks(class);
        stat_line(
            out,
            format_args!("{class}:chunk_size"),
            classes::chunk_size(class),
        );
        stat_line(
            out,
            format_args!("{class}:chunks_per_page"),
            classes::chunks_per_page(class),
        );
        stat_line(out, format_args!("{class}:total_pages"), u.pages);
        stat_line(out, format_args!("{class}:total_chunks"), total);
        stat_line(out, format_args!("{class}:used_chunks"), u.items);
        let free = total.saturating_sub(u.items);
        stat_line(
            out,
            format_args!("{class}:free_chunks"),
            free.saturating_sub(u.free_at_end),
        );
        stat_line(out, format_args!("{class}:free_chunks_end"), u.free_at_end);
        for field in ZERO_FIELDS {
            stat_line(out, format_args!("{class}:{field}"), 0);
        }
        malloced += u.malloced;
    }
    stat_line(out, format_args!("active_slabs"), usage.len());
    stat_line(out, format_args!("total_malloced"), malloced);
    out.extend_from_slice(b"END\r\n");
}

/// `stats sizes`: live items by size in 32-byte buckets, once `stats sizes_enable` was sent.
/// The node computes the histogram when asked, so it also counts items stored before.
fn sizes_stats(shared: &Shared, now: u32, out: &mut Vec<u8>) {
    if shared.sizes_enabled.load(Ordering::Relaxed) {
        for (bucket, count) in shared.store.size_histogram(now) {
            stat_line(out, format_args!("{bucket}"), count);
        }
    } else {
        line(out, "STAT sizes_status disabled");
    }
    out.extend_from_slice(b"END\r\n");
}

/// `stats conns`: the listening socket, then every open connection by descriptor.
fn conns_stats(shared: &Shared, me: &Arc<ConnInfo>, out: &mut Vec<u8>) {
    let listen = &shared.settings.listen;
    let fd = shared.listener_fd.load(Ordering::Relaxed);
    if fd >= 0 {
        stat_line(
            out,
            format_args!("{fd}:addr"),
            format_args!("{}:{listen}", transport(listen)),
        );
        stat_line(out, format_args!("{fd}:state"), "conn_listening");
        stat_line(
            out,
            format_args!("{fd}:secs_since_last_cmd"),
            shared.stats.uptime().as_secs(),
        );
    }
    let now = unix_now();
    let open: Vec<_> = shared
        .conns()
        .iter()
        .map(|(&fd, c)| (fd, c.clone()))
        .collect();
    for (fd, c) in open {
        stat_line(
            out,
            format_args!("{fd}:addr"),
            format_args!(
                "{}:{}",
                if c.peer.is_ipv6() { "tcp6" } else { "tcp" },
                c.peer
            ),
        );
        stat_line(
            out,
            format_args!("{fd}:listen_addr"),
            format_args!("{}:{listen}", transport(listen)),
        );
        // The asking connection is parsing; the others wait for their next command.
        let state = if Arc::ptr_eq(&c, me) {
            "conn_parse_cmd"
        } else {
            "conn_read"
        };
        stat_line(out, format_args!("{fd}:state"), state);
        let last = c.last_cmd.load(Ordering::Relaxed);
        stat_line(
            out,
            format_args!("{fd}:secs_since_last_cmd"),
            now.saturating_sub(last),
        );
    }
    out.extend_from_slice(b"END\r\n");
}

/// memcached's name for the transport of a `host:port` address (`[::1]:11211` is IPv6).
fn transport(addr: &str) -> &'static str {
    if addr.starts_with('[') { "tcp6" } else { "tcp" }
}

/// `stats cachedump <class> <limit>`: `ITEM <key> [<bytes> b; <expiry> s]` per item, expiry
/// as an absolute Unix time (0: never). Class ids past the highest class are refused as
/// memcached refuses ids past its own.
fn cachedump(shared: &Shared, class: u32, limit: u32, now: u32, out: &mut Vec<u8>) {
    if class > MAX_CLASS {
        line(out, "CLIENT_ERROR Illegal slab id");
        return;
    }
    let items = shared
        .store
        .cachedump(class, limit as usize, CACHEDUMP_MAX_BYTES, now);
    for (key, len, expiry) in items {
        out.extend_from_slice(b"ITEM ");
        out.extend_from_slice(&key);
        let _ = write!(out, " [{len} b; {expiry} s]\r\n");
    }
    out.extend_from_slice(b"END\r\n");
}

/// `stats detail dump`: `PREFIX <prefix> get <n> hit <n> set <n> del <n>` per prefix, in
/// prefix order.
fn detail_dump(shared: &Shared, out: &mut Vec<u8>) {
    let map = shared.detail.lock().unwrap_or_else(|e| e.into_inner());
    let mut prefixes: Vec<_> = map.iter().collect();
    prefixes.sort_by(|a, b| a.0.cmp(b.0));
    for (prefix, s) in prefixes {
        out.extend_from_slice(b"PREFIX ");
        out.extend_from_slice(prefix);
        let _ = write!(
            out,
            " get {} hit {} set {} del {}\r\n",
            s.gets, s.hits, s.sets, s.deletes
        );
    }
    out.extend_from_slice(b"END\r\n");
}
