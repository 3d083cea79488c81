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
//! Idempotent and restartable: the work is derived from what the store holds, so a second
//! request (the same ring after an operator restart, or a newer ring arriving mid-way) cancels
//! the running hand-off and starts over from the store's content; keys already moved are no
//! longer here and cost nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cachepool_crds::ring::Ring;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
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
}

/// Bytes of values copied out of the store per batch unless a request says otherwise.
pub fn default_batch_bytes() -> usize {
    4 << 20
}

impl HandoffRequest {
    /// A request to conform to `ring`, at an optional byte rate, in default batches.
    pub fn new(ring: Ring, self_address: impl Into<String>, rate_bytes_per_sec: u64) -> Self {
        HandoffRequest {
            ring,
            self_address: self_address.into(),
            rate_bytes_per_sec,
            batch_bytes: default_batch_bytes(),
        }
    }
}

/// Passes over the store before giving up on keys whose owner cannot be reached.
const MAX_PASSES: u32 = 3;
/// Time allowed for one batch to one owner.
const BATCH_TIMEOUT: Duration = Duration::from_secs(15);

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
        if let Some((token, _)) = running.take() {
            token.cancel();
        }
        let token = CancellationToken::new();
        {
            let mut st = lock(&self.status);
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
                r = run(store, request, status.clone()) => Some(r),
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
            token.cancel();
            let mut st = lock(&self.status);
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
    let mut conns: HashMap<String, Conn> = HashMap::new();
    let started = Instant::now();
    let mut sent_bytes: u64 = 0;
    for pass in 1..=MAX_PASSES {
        lock(&status).passes = pass;
        let mut unreachable: Vec<String> = Vec::new();
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
                match send_batch(&mut conns, owner, &items, now).await {
                    Ok(replies) => {
                        let withdraw = apply_replies(&store, &status, &items, &replies, now);
                        if !withdraw.is_empty()
                            && let Err(e) = delete_batch(&mut conns, owner, &withdraw).await
                        {
                            warn!(owner, error = %e, "hand-off: could not withdraw copies");
                            conns.remove(owner);
                            lock(&status).last_error = Some(format!("{owner}: {e}"));
                        }
                    }
                    Err(e) => {
                        warn!(owner, error = %e, "hand-off: owner unreachable");
                        conns.remove(owner);
                        unreachable.push(owner.to_string());
                        lock(&status).last_error = Some(format!("{owner}: {e}"));
                    }
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
    status: &Mutex<HandoffStatus>,
    items: &[OwnedItem],
    replies: &[Reply],
    now: u32,
) -> Vec<(Vec<u8>, u64)> {
    let mut withdraw = Vec::new();
    let mut st = lock(status);
    for (item, reply) in items.iter().zip(replies) {
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
                st.bytes_moved += item.value.len() as u64;
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

/// Withdraws copies on `owner`, pipelined: `md <key> C<cas>` deletes each only if it is
/// still the copy the hand-off stored.
async fn delete_batch(
    conns: &mut HashMap<String, Conn>,
    owner: &str,
    keys: &[(Vec<u8>, u64)],
) -> Result<(), String> {
    let Some(conn) = conns.get_mut(owner) else {
        return Err("no connection".into());
    };
    let mut out = Vec::new();
    let mut num = itoa::Buffer::new();
    for (key, cas) in keys {
        out.extend_from_slice(b"md ");
        out.extend_from_slice(key);
        out.extend_from_slice(b" C");
        out.extend_from_slice(num.format(*cas).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    conn.exchange(&out, keys.len(), |line| match line {
        "HD" | "NF" | "EX" => Ok(()),
        other => Err(format!("unexpected answer to md: {other:?}")),
    })
    .await
    .map(drop)
}

/// One connection to an owner's data port.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    /// Writes a pipelined batch and reads `replies` answer lines, each through `parse`,
    /// within `BATCH_TIMEOUT`.
    async fn exchange<T>(
        &mut self,
        out: &[u8],
        replies: usize,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        let io = async {
            self.stream
                .get_mut()
                .write_all(out)
                .await
                .map_err(|e| e.to_string())?;
            let mut answers = Vec::with_capacity(replies);
            let mut line = String::new();
            for _ in 0..replies {
                line.clear();
                if self
                    .stream
                    .read_line(&mut line)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Err("owner closed the connection".to_string());
                }
                answers.push(parse(line.trim_end())?);
            }
            Ok(answers)
        };
        match tokio::time::timeout(BATCH_TIMEOUT, io).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {BATCH_TIMEOUT:?}")),
        }
    }
}

async fn connect(owner: &str) -> std::io::Result<Conn> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(owner))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(Conn {
        stream: BufReader::with_capacity(64 * 1024, stream),
    })
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

/// Sends an add (`ms <key> <len> F<flags> T<exptime> ME Z c [W<ms>]`) for every item in one
/// pipelined write and reads the answers in order.
async fn send_batch(
    conns: &mut HashMap<String, Conn>,
    owner: &str,
    items: &[OwnedItem],
    now: u32,
) -> Result<Vec<Reply>, String> {
    if !conns.contains_key(owner) {
        let conn = connect(owner).await.map_err(|e| e.to_string())?;
        conns.insert(owner.to_string(), conn);
    }
    let Some(conn) = conns.get_mut(owner) else {
        return Err("connection vanished".into());
    };
    let mut out = Vec::with_capacity(items.iter().map(|i| i.key.len() + i.value.len() + 48).sum());
    let mut replies: Vec<Option<Reply>> = Vec::with_capacity(items.len());
    let mut num = itoa::Buffer::new();
    for item in items {
        let Some(exptime) = exptime_for(item.expiry, now) else {
            replies.push(Some(Reply::Expired));
            continue;
        };
        replies.push(None);
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
    }
    let expected = replies.iter().filter(|r| r.is_none()).count();
    let mut answers = conn
        .exchange(&out, expected, parse_reply)
        .await?
        .into_iter();
    Ok(replies
        .into_iter()
        .map(|r| r.or_else(|| answers.next()).unwrap_or(Reply::Expired))
        .collect())
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
