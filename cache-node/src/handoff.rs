//! Key hand-off: given a target ring, stream every key this node no longer owns to its new
//! owner over the memcached protocol, then drop it here.
//!
//! How it stays safe while clients keep reading and writing:
//! - Items go over as an add (meta `ms … ME Z c`), never a set: if a client already wrote the
//!   key to its new owner (clients write to the current owner during a migration), that newer
//!   value wins and the answer is `NS`, which counts as done; `Z` also refuses a key a client
//!   deleted there in the last 30 s, so a delete racing the hand-off is not undone, unless
//!   the copy's write time (`W<ms>`, sent for keys written in the last `store::WRITE_TIME_MS`)
//!   is newer than the delete: the key was deleted there, moved away, written on its new
//!   owner and is now moving back, and its newer value is kept rather than lost. The owner
//!   returns the stored copy's CAS value, so the copy can later be withdrawn without
//!   touching anything newer.
//! - Flags travel unchanged and the expiry as the *remaining* TTL (or as the absolute Unix time
//!   when more than 30 days remain, memcached's rule), so a moved item expires when it would
//!   have.
//! - The local copy is dropped only after its owner acknowledged it, and only if its CAS value
//!   is unchanged since it was copied (`Store::delete_if_cas`). If it changed or vanished
//!   meanwhile (a client on an old ring wrote or deleted it here), the copy just stored on the
//!   owner is withdrawn with `md <key> C<cas>`, which removes that copy only, never a value a
//!   client wrote there since; so neither an old value nor a deleted one is served, and no
//!   acknowledged write is erased. A changed key goes over in the next pass.
//!
//! Bounded and polite: items are copied out of the store in batches of about `batch_bytes`
//! (one shard locked at a time, briefly), pipelined to each owner on one connection, and an
//! optional byte rate keeps the hand-off from starving client traffic. Progress is counted for
//! `GET /handoff`.
//!
//! Overlapped: each owner's connection is driven by its own task (`pipe`), which writes the
//! next batches while the owner still answers earlier ones, up to `max_in_flight_bytes` of
//! values and keys sent but not yet answered (a batch larger than that goes alone). Answers
//! come back in the order the commands were written, so a queue of the in-flight batches
//! matches them; a batch is settled (sources dropped, copies withdrawn) once its last answer
//! is in. The task reads whenever it can, also while it writes, so neither side can block on
//! a full socket buffer. A window of one batch is the earlier behaviour: send a batch, wait
//! for all its answers, then send the next; the scan of the next batch still overlaps.
//!
//! Idempotent and restartable: the work is derived from what the store holds, so a second
//! request (the same ring after an operator restart, or a newer ring arriving mid-way) cancels
//! the running hand-off and starts over from the store's content; keys already moved are no
//! longer here and cost nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cachepool_crds::ring::Ring;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::unix_now;
use crate::store::{OwnedItem, ScanCursor, Store};

/// A hand-off request, as `POST /handoff` takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffRequest {
    /// The ring to conform to.
    pub ring: Ring,
    /// This node's data address as the ring names it (`host:port`). A node that is not in
    /// the ring (removed by a shrink) hands off everything.
    pub self_address: String,
    /// Bytes per second of values to send at most (0 or absent: unlimited).
    #[serde(default)]
    pub rate_bytes_per_sec: u64,
    /// Bytes of values copied out of the store per batch.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Bytes of keys and values written to an owner and not yet answered, at most (the
    /// window of the pipeline to each owner). A batch larger than this is sent alone; a
    /// window of one batch sends a batch only once the previous one is answered.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
}

/// Bytes of values copied out of the store per batch unless a request says otherwise.
pub fn default_batch_bytes() -> usize {
    4 << 20
}

/// Bytes in flight to one owner unless a request says otherwise: four default batches.
pub fn default_max_in_flight_bytes() -> usize {
    16 << 20
}

impl HandoffRequest {
    /// A request to conform to `ring`, at an optional byte rate, in default batches.
    pub fn new(ring: Ring, self_address: impl Into<String>, rate_bytes_per_sec: u64) -> Self {
        HandoffRequest {
            ring,
            self_address: self_address.into(),
            rate_bytes_per_sec,
            batch_bytes: default_batch_bytes(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
        }
    }
}

/// Passes over the store before giving up on keys whose owner cannot be reached.
const MAX_PASSES: u32 = 3;
/// Time an owner may go without reading or answering while answers are owed.
const BATCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Batches the scan may run ahead of an owner's pipe (beyond the one the pipe holds).
const QUEUED_BATCHES: usize = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Idle,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// Progress of the current (or last) hand-off.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoffStatus {
    pub state: State,
    pub epoch: Option<u64>,
    /// Keys and value bytes this node did not own when the hand-off started.
    pub keys_total: u64,
    pub bytes_total: u64,
    /// Stored on their owner by us.
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// The owner already had a value (a newer write): nothing sent, local copy dropped.
    pub keys_skipped: u64,
    /// Refused by the owner for good (e.g. larger than its capacity): dropped here.
    pub keys_dropped: u64,
    /// Expired before they could move: dropped here.
    pub keys_expired: u64,
    /// Changed here after being copied: kept for the next pass.
    pub keys_retried: u64,
    /// Foreign keys still here (estimate while running, exact when finished).
    pub keys_remaining: u64,
    pub passes: u32,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Owners that could not be reached in the last pass.
    pub unreachable: Vec<String>,
    pub last_error: Option<String>,
}

/// The node's hand-off controller: at most one hand-off runs at a time.
#[derive(Debug, Default)]
pub struct Handoff {
    status: Arc<Mutex<HandoffStatus>>,
    running: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Handoff {
    /// Starts a hand-off to `request.ring`, cancelling one in progress.
    pub fn start(&self, store: Arc<Store>, request: HandoffRequest) -> HandoffStatus {
        let mut running = lock(&self.running);
        let token = CancellationToken::new();
        {
            // Cancelled under the status lock: a pipe settles a batch under that lock only
            // if its token is not cancelled, so nothing of the old hand-off is settled once
            // this returns.
            let mut st = lock(&self.status);
            if let Some((old, _)) = running.take() {
                old.cancel();
            }
            *st = HandoffStatus {
                state: State::Running,
                epoch: Some(request.ring.epoch()),
                started_at: Some(unix_secs()),
                ..Default::default()
            };
        }
        let status = self.status.clone();
        let task_token = token.clone();
        let task = tokio::spawn(async move {
            let epoch = request.ring.epoch();
            let outcome = tokio::select! {
                r = run(store, request, status.clone(), task_token.clone()) => Some(r),
                () = task_token.cancelled() => None,
            };
            let mut st = lock(&status);
            // A newer hand-off may own the status already.
            if st.epoch != Some(epoch) || st.state != State::Running {
                return;
            }
            st.finished_at = Some(unix_secs());
            match outcome {
                None => st.state = State::Cancelled,
                Some(Ok(())) => st.state = State::Done,
                Some(Err(e)) => {
                    st.state = State::Failed;
                    st.last_error = Some(e);
                }
            }
            info!(epoch, state = ?st.state, moved = st.keys_moved, remaining = st.keys_remaining, "hand-off finished");
        });
        *running = Some((token, task));
        lock(&self.status).clone()
    }

    pub fn status(&self) -> HandoffStatus {
        lock(&self.status).clone()
    }

    /// Cancels a running hand-off (keys already moved stay moved).
    pub fn cancel(&self) -> HandoffStatus {
        if let Some((token, _)) = lock(&self.running).take() {
            let mut st = lock(&self.status);
            token.cancel();
            if st.state == State::Running {
                st.state = State::Cancelled;
                st.finished_at = Some(unix_secs());
            }
        }
        self.status()
    }
}

/// Who owns `key` under `ring`, if not this node.
fn foreign_owner<'r>(ring: &'r Ring, self_address: &str, key: &[u8]) -> Option<&'r str> {
    ring.owner(key)
        .map(|m| m.address.as_str())
        .filter(|a| *a != self_address)
}

async fn run(
    store: Arc<Store>,
    req: HandoffRequest,
    status: Arc<Mutex<HandoffStatus>>,
    token: CancellationToken,
) -> Result<(), String> {
    let ring = &req.ring;
    let me = req.self_address.as_str();
    if ring.is_empty() {
        return Err("the target ring is empty: there is nobody to hand keys to".into());
    }
    let (keys, bytes) = count_foreign(&store, ring, me);
    {
        let mut st = lock(&status);
        st.keys_total = keys;
        st.bytes_total = bytes;
        st.keys_remaining = keys;
    }
    info!(epoch = ring.epoch(), keys, bytes, "hand-off starting");
    let started = Instant::now();
    let mut sent_bytes: u64 = 0;
    let ctx = PipeContext {
        store: store.clone(),
        status: status.clone(),
        token,
        window: req.max_in_flight_bytes.max(1),
    };
    for pass in 1..=MAX_PASSES {
        lock(&status).passes = pass;
        let mut unreachable: Vec<String> = Vec::new();
        let mut pipes: HashMap<String, Pipe> = HashMap::new();
        let mut cursor = ScanCursor::default();
        let mut found = 0usize;
        while !cursor.is_done() {
            let now = unix_now();
            let batch = store.scan(&mut cursor, req.batch_bytes.max(1), now, |k| {
                foreign_owner(ring, me, k).is_some()
            });
            found += batch.len();
            let mut by_owner: HashMap<&str, Vec<OwnedItem>> = HashMap::new();
            for item in batch {
                if let Some(owner) = foreign_owner(ring, me, &item.key) {
                    by_owner.entry(owner).or_default().push(item);
                }
            }
            for (owner, items) in by_owner {
                if unreachable.iter().any(|u| u == owner) {
                    continue;
                }
                let batch_bytes: u64 = items.iter().map(|i| i.value.len() as u64).sum();
                let pipe = pipes
                    .entry(owner.to_string())
                    .or_insert_with(|| Pipe::start(owner.to_string(), ctx.clone()));
                if pipe.tx.send(Batch { items, now }).await.is_err() {
                    // The pipe ended early: its error says why.
                    if let Some(pipe) = pipes.remove(owner) {
                        let e = pipe.finish().await.err().unwrap_or_default();
                        mark_unreachable(&status, &mut unreachable, owner, &e);
                    }
                    continue;
                }
                sent_bytes += batch_bytes;
                if req.rate_bytes_per_sec > 0 {
                    let due =
                        Duration::from_secs_f64(sent_bytes as f64 / req.rate_bytes_per_sec as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        // Every batch of the pass settled (or its owner failed) before counting what is left.
        for (owner, pipe) in pipes {
            if let Err(e) = pipe.finish().await {
                mark_unreachable(&status, &mut unreachable, &owner, &e);
            }
        }
        let (left, _) = count_foreign(&store, ring, me);
        {
            let mut st = lock(&status);
            st.keys_remaining = left;
            st.unreachable = unreachable.clone();
        }
        if left == 0 {
            return Ok(());
        }
        if found == 0 && unreachable.is_empty() {
            // Foreign keys appeared after the scan passed them (writes from clients on an old
            // ring); the next pass picks them up.
            continue;
        }
    }
    let st = lock(&status);
    Err(format!(
        "{} keys could not be handed off after {MAX_PASSES} passes; unreachable owners: {}",
        st.keys_remaining,
        if st.unreachable.is_empty() {
            "none".to_string()
        } else {
            st.unreachable.join(", ")
        }
    ))
}

fn mark_unreachable(
    status: &Mutex<HandoffStatus>,
    unreachable: &mut Vec<String>,
    owner: &str,
    error: &str,
) {
    warn!(owner, error, "hand-off: owner unreachable");
    unreachable.push(owner.to_string());
    lock(status).last_error = Some(format!("{owner}: {error}"));
}

fn count_foreign(store: &Store, ring: &Ring, me: &str) -> (u64, u64) {
    let (mut keys, mut bytes) = (0u64, 0u64);
    let now = unix_now();
    store.for_each(|item| {
        if !item.is_expired(now) && foreign_owner(ring, me, item.key()).is_some() {
            keys += 1;
            bytes += item.value().len() as u64;
        }
    });
    (keys, bytes)
}

/// The owner's answer to one add.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// Stored, with the CAS value the owner gave the copy.
    Stored(u64),
    NotStored,
    Refused(String),
    /// Not sent: expired before it could move.
    Expired,
}

/// Drops what the owner acknowledged. Returns the keys whose copy must be withdrawn from the
/// owner: those the owner stored but that changed or vanished here meanwhile (a client wrote
/// or deleted through an old ring). Leaving such a copy would serve an old value, or bring a
/// deleted one back; withdrawing it costs at most a miss, and a changed key goes over again in
/// the next pass.
fn apply_replies(
    store: &Store,
    st: &mut HandoffStatus,
    items: &[Sent],
    now: u32,
) -> Vec<(Vec<u8>, u64)> {
    let mut withdraw = Vec::new();
    for item in items {
        let reply = item.reply.as_ref().unwrap_or(&Reply::Expired);
        let dropped = store.delete_if_cas(&item.key, item.cas, now);
        if !dropped {
            st.keys_retried += 1;
            if let Reply::Stored(cas) = reply {
                withdraw.push((item.key.clone(), *cas));
            }
            continue;
        }
        match reply {
            Reply::Stored(_) => {
                st.keys_moved += 1;
                st.bytes_moved += item.value_len as u64;
            }
            Reply::NotStored => st.keys_skipped += 1,
            Reply::Refused(e) => {
                st.keys_dropped += 1;
                st.last_error = Some(e.clone());
            }
            Reply::Expired => st.keys_expired += 1,
        }
        st.keys_remaining = st.keys_remaining.saturating_sub(1);
    }
    withdraw
}

/// Reads the owner's answer to one add: `HD c<cas>`, `NS c0`, or an error line.
fn parse_reply(line: &str) -> Result<Reply, String> {
    if line.starts_with("SERVER_ERROR") || line.starts_with("CLIENT_ERROR") {
        return Ok(Reply::Refused(line.to_string()));
    }
    let mut parts = line.split(' ');
    match parts.next() {
        Some("HD") => parts
            .find_map(|t| t.strip_prefix('c'))
            .and_then(|c| c.parse().ok())
            .map(Reply::Stored)
            .ok_or_else(|| format!("stored without a CAS value: {line:?}")),
        Some("NS") => Ok(Reply::NotStored),
        _ => Err(format!("unexpected answer to ms: {line:?}")),
    }
}

/// The exptime to send for an item expiring at `expiry` (absolute, 0 = never): the remaining
/// seconds, or the absolute time when more than 30 days remain (memcached reads larger values
/// as Unix times). `None` if already expired.
fn exptime_for(expiry: u32, now: u32) -> Option<u32> {
    const MONTH: u32 = 60 * 60 * 24 * 30;
    match expiry {
        0 => Some(0),
        e if e <= now => None,
        e if e - now > MONTH => Some(e),
        e => Some(e - now),
    }
}

/// Items copied out of the store for one owner, and the time they were copied at.
struct Batch {
    items: Vec<OwnedItem>,
    now: u32,
}

/// What a pipe keeps of an item it sent: enough to match the answer and settle the source.
struct Sent {
    key: Vec<u8>,
    cas: u64,
    value_len: usize,
    /// The owner's answer, or `Expired` set before sending for an item not sent at all.
    reply: Option<Reply>,
}

/// Commands written to an owner whose answers are still owed, in the order written.
enum InFlight {
    /// A batch of adds; `next` is the first item still waiting for its answer.
    Adds {
        items: Vec<Sent>,
        next: usize,
        now: u32,
        /// Keys and values written, counted against the window until the batch settles.
        bytes: usize,
    },
    /// `md` withdrawals: this many answers still owed.
    Withdrawals(usize),
}

/// What every pipe of one hand-off shares.
#[derive(Clone)]
struct PipeContext {
    store: Arc<Store>,
    status: Arc<Mutex<HandoffStatus>>,
    token: CancellationToken,
    window: usize,
}

/// The scan's end of one owner's pipe: batches go in, the task's outcome comes out.
struct Pipe {
    tx: mpsc::Sender<Batch>,
    task: JoinHandle<Result<(), String>>,
}

impl Pipe {
    fn start(owner: String, ctx: PipeContext) -> Pipe {
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        let task = tokio::spawn(async move {
            let stream = connect(&owner).await.map_err(|e| e.to_string())?;
            pipe(stream, rx, &ctx).await
        });
        Pipe { tx, task }
    }

    /// Closes the pipe's input and waits until everything sent is answered and settled.
    async fn finish(mut self) -> Result<(), String> {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(format!("hand-off pipe task failed: {e}")),
        }
    }
}

impl Drop for Pipe {
    /// A cancelled hand-off drops its pipes: their tasks end with it (a pipe also settles
    /// nothing once the token is cancelled).
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(owner: &str) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(owner))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Drives one owner's connection until `rx` closes and every answer is in: takes batches
/// while the window has room, writes them, reads answers whenever they come, settles each
/// batch once its last answer is in, and writes the withdrawals that settling asks for.
async fn pipe(
    mut stream: TcpStream,
    mut rx: mpsc::Receiver<Batch>,
    ctx: &PipeContext,
) -> Result<(), String> {
    let (mut rd, mut wr) = stream.split();
    let mut out: Vec<u8> = Vec::new();
    let mut written = 0usize;
    let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut queue: VecDeque<InFlight> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut next: Option<(Batch, usize)> = None;
    let mut closed = false;
    let mut deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
    loop {
        // Admit the waiting batch if the window has room, or if nothing is in flight (a
        // batch larger than the window goes alone).
        if let Some((_, bytes)) = &next
            && (in_flight == 0 || in_flight + bytes <= ctx.window)
            && let Some((batch, bytes)) = next.take()
        {
            if out.len() == written {
                out.clear();
                written = 0;
            }
            let now = batch.now;
            let items = encode_adds(batch, &mut out);
            let first = items.iter().position(|i| i.reply.is_none());
            in_flight += bytes;
            queue.push_back(InFlight::Adds {
                next: first.unwrap_or(items.len()),
                items,
                now,
                bytes,
            });
            settle_ready(&mut queue, &mut in_flight, &mut out, ctx)?;
            deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
        }
        if closed && next.is_none() && queue.is_empty() && written == out.len() {
            return Ok(());
        }
        let writing = written < out.len();
        let receiving = !closed && next.is_none();
        tokio::select! {
            () = ctx.token.cancelled() => return Err("cancelled".into()),
            r = rd.read_buf(&mut input) => {
                match r {
                    Ok(0) => return Err("owner closed the connection".into()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
                deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
                let used = take_answers(&input, &mut queue)?;
                input.drain(..used);
                settle_ready(&mut queue, &mut in_flight, &mut out, ctx)?;
            }
            r = wr.write(&out[written..]), if writing => {
                written += r.map_err(|e| e.to_string())?;
                if written == out.len() {
                    out.clear();
                    written = 0;
                }
                deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
            }
            b = rx.recv(), if receiving => match b {
                Some(batch) => {
                    let bytes = batch.items.iter().map(|i| i.key.len() + i.value.len()).sum();
                    next = Some((batch, bytes));
                }
                None => closed = true,
            },
            () = tokio::time::sleep_until(deadline), if !queue.is_empty() || writing => {
                return Err(format!("no answer within {BATCH_TIMEOUT:?}"));
            }
        }
    }
}

/// Appends an add (`ms <key> <len> F<flags> T<exptime> ME Z c [W<ms>]`) for every item of
/// `batch` to `out`; returns what must be kept to match the answers (expired items are not
/// sent and carry their outcome already).
fn encode_adds(batch: Batch, out: &mut Vec<u8>) -> Vec<Sent> {
    let items = batch.items;
    out.reserve(items.iter().map(|i| i.key.len() + i.value.len() + 48).sum());
    let mut sent = Vec::with_capacity(items.len());
    let mut num = itoa::Buffer::new();
    for item in items {
        let Some(exptime) = exptime_for(item.expiry, batch.now) else {
            sent.push(Sent {
                value_len: item.value.len(),
                key: item.key,
                cas: item.cas,
                reply: Some(Reply::Expired),
            });
            continue;
        };
        out.extend_from_slice(b"ms ");
        out.extend_from_slice(&item.key);
        out.push(b' ');
        out.extend_from_slice(num.format(item.value.len()).as_bytes());
        out.extend_from_slice(b" F");
        out.extend_from_slice(num.format(item.flags).as_bytes());
        out.extend_from_slice(b" T");
        out.extend_from_slice(num.format(exptime).as_bytes());
        out.extend_from_slice(b" ME Z c");
        if let Some(written) = item.written_ms {
            out.extend_from_slice(b" W");
            out.extend_from_slice(num.format(written).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&item.value);
        out.extend_from_slice(b"\r\n");
        sent.push(Sent {
            value_len: item.value.len(),
            key: item.key,
            cas: item.cas,
            reply: None,
        });
    }
    sent
}

/// Matches the complete answer lines in `input` to the in-flight commands, in order; returns
/// the bytes consumed.
fn take_answers(input: &[u8], queue: &mut VecDeque<InFlight>) -> Result<usize, String> {
    let mut used = 0;
    while let Some(end) = input[used..].iter().position(|&b| b == b'\n') {
        let raw = &input[used..used + end];
        used += end + 1;
        let line = std::str::from_utf8(raw.strip_suffix(b"\r").unwrap_or(raw))
            .map_err(|_| "an answer that is not text".to_string())?;
        let owed = queue.iter_mut().find(|f| match f {
            InFlight::Adds { items, next, .. } => *next < items.len(),
            InFlight::Withdrawals(left) => *left > 0,
        });
        match owed {
            Some(InFlight::Adds { items, next, .. }) => {
                items[*next].reply = Some(parse_reply(line)?);
                *next += 1;
                while *next < items.len() && items[*next].reply.is_some() {
                    *next += 1;
                }
            }
            Some(InFlight::Withdrawals(left)) => match line {
                "HD" | "NF" | "EX" => *left -= 1,
                other => return Err(format!("unexpected answer to md: {other:?}")),
            },
            None => return Err(format!("an answer to nothing sent: {line:?}")),
        }
    }
    Ok(used)
}

/// Settles the batches at the head of the queue whose answers are all in, under the status
/// lock and only while the hand-off is not cancelled; queues the withdrawals they ask for.
fn settle_ready(
    queue: &mut VecDeque<InFlight>,
    in_flight: &mut usize,
    out: &mut Vec<u8>,
    ctx: &PipeContext,
) -> Result<(), String> {
    let mut withdraw = Vec::new();
    while let Some(front) = queue.front_mut() {
        match front {
            InFlight::Withdrawals(0) => {}
            InFlight::Adds {
                items,
                next,
                now,
                bytes,
            } if *next == items.len() => {
                let mut st = lock(&ctx.status);
                if ctx.token.is_cancelled() {
                    return Err("cancelled".into());
                }
                withdraw.extend(apply_replies(&ctx.store, &mut st, items, *now));
                *in_flight -= *bytes;
            }
            _ => break,
        }
        queue.pop_front();
    }
    if !withdraw.is_empty() {
        let mut num = itoa::Buffer::new();
        for (key, cas) in &withdraw {
            out.extend_from_slice(b"md ");
            out.extend_from_slice(key);
            out.extend_from_slice(b" C");
            out.extend_from_slice(num.format(*cas).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        queue.push_back(InFlight::Withdrawals(withdraw.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exptime_follows_memcached_rules() {
        let now = 1_700_000_000;
        assert_eq!(exptime_for(0, now), Some(0));
        assert_eq!(exptime_for(now, now), None);
        assert_eq!(exptime_for(now + 10, now), Some(10));
        assert_eq!(exptime_for(now + 2_592_000, now), Some(2_592_000));
        assert_eq!(exptime_for(now + 2_592_001, now), Some(now + 2_592_001));
    }

    #[test]
    fn replies_parse_strictly() {
        assert_eq!(parse_reply("HD c42"), Ok(Reply::Stored(42)));
        assert_eq!(parse_reply("NS c0"), Ok(Reply::NotStored));
        assert!(matches!(
            parse_reply("SERVER_ERROR out of memory storing object"),
            Ok(Reply::Refused(_))
        ));
        assert!(parse_reply("HD").is_err());
        assert!(parse_reply("STORED").is_err());
    }

    #[test]
    fn foreign_owner_excludes_self_and_covers_removed_nodes() {
        let ring = Ring::from_addresses(1, ["a:1", "b:1"]).unwrap();
        let mut mine = 0;
        for i in 0..1000 {
            let key = format!("k{i}");
            match foreign_owner(&ring, "a:1", key.as_bytes()) {
                None => mine += 1,
                Some(o) => assert_eq!(o, "b:1"),
            }
            assert!(foreign_owner(&ring, "gone:1", key.as_bytes()).is_some());
        }
        assert!((400..600).contains(&mine));
    }
}
