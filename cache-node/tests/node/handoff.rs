//! Hand-off between real nodes: a node told the target ring streams the keys it no longer owns
//! to their owners with `add`, keeping flags and remaining TTL, and drops them locally.

use std::time::Duration;

use cachepool_crds::ring::Ring;
use serde_json::{Value, json};

use crate::support::{Client, TOKEN, eventually, http, start_node};

fn ring_json(ring: &Ring) -> Value {
    match serde_json::to_value(ring) {
        Ok(v) => v,
        Err(e) => panic!("ring does not serialize: {e}"),
    }
}

async fn handoff(admin: std::net::SocketAddr, ring: &Ring, me: &str, extra: Value) -> Value {
    let mut body = json!({ "ring": ring_json(ring), "selfAddress": me });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let answer = http(
        admin,
        "POST",
        "/handoff",
        Some(TOKEN),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    answer.json()
}

async fn wait_finished(admin: std::net::SocketAddr, epoch: u64) -> Value {
    eventually(
        Duration::from_secs(20),
        "hand-off finishes",
        || async move {
            let st = http(admin, "GET", "/handoff", Some(TOKEN), None)
                .await
                .json();
            st["epoch"] == epoch && st["state"] != "running"
        },
    )
    .await;
    http(admin, "GET", "/handoff", Some(TOKEN), None)
        .await
        .json()
}

async fn set_with(c: &mut Client, key: &str, flags: u32, exptime: u64, value: &[u8]) {
    let mut req = format!("set {key} {flags} {exptime} {}\r\n", value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    c.ask(req, "STORED\r\n").await;
}

/// `mg key f t`: (flags, ttl) or None.
async fn meta(c: &mut Client, key: &str) -> Option<(u32, i64)> {
    c.send(format!("mg {key} f t\r\n")).await;
    let line = c.line().await;
    if line == "EN\r\n" {
        return None;
    }
    let mut flags = None;
    let mut ttl = None;
    for tok in line.trim_end().split(' ').skip(1) {
        if let Some(f) = tok.strip_prefix('f') {
            flags = f.parse().ok();
        } else if let Some(t) = tok.strip_prefix('t') {
            ttl = t.parse().ok();
        }
    }
    match (flags, ttl) {
        (Some(f), Some(t)) => Some((f, t)),
        _ => panic!("mg {key} f t answered {line:?}"),
    }
}

#[tokio::test]
async fn grow_moves_exactly_the_new_slots_keys_with_flags_and_ttl_and_spares_newer_writes() {
    let a = start_node(64).await;
    let b = start_node(64).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let mut ca = Client::connect(a.addr).await;
    let mut cb = Client::connect(b.addr).await;
    let n = 3000;
    for i in 0..n {
        set_with(
            &mut ca,
            &format!("key:{i}"),
            i,
            if i % 2 == 0 { 0 } else { 3600 },
            format!("value {i}").as_bytes(),
        )
        .await;
    }
    let ring = Ring::from_addresses(2, [a_addr.as_str(), b_addr.as_str()]).unwrap();
    // A client already wrote a newer value of one moving key to its new owner.
    let newer = (0..n)
        .map(|i| format!("key:{i}"))
        .find(|k| ring.owner(k.as_bytes()).unwrap().address == b_addr)
        .unwrap();
    cb.set(&newer, b"newer").await;

    handoff(a.admin_addr, &ring, &a_addr, json!({})).await;
    let st = wait_finished(a.admin_addr, 2).await;
    assert_eq!(st["state"], "done", "{st}");

    let mut moved = 0;
    for i in 0..n {
        let key = format!("key:{i}");
        let owner = &ring.owner(key.as_bytes()).unwrap().address;
        let on_a = meta(&mut ca, &key).await;
        let on_b = meta(&mut cb, &key).await;
        if *owner == b_addr {
            moved += 1;
            assert!(on_a.is_none(), "{key} left on the old owner");
            let (flags, ttl) = on_b.unwrap_or_else(|| panic!("{key} missing on its new owner"));
            if key != newer {
                assert_eq!(flags, i, "flags of {key}");
                if i % 2 == 0 {
                    assert_eq!(ttl, -1, "{key} never expires");
                } else {
                    assert!(
                        (3590..=3600).contains(&ttl),
                        "remaining TTL of {key}: {ttl}"
                    );
                }
            }
        } else {
            assert!(
                on_a.is_some() && on_b.is_none(),
                "{key} must stay on a only"
            );
        }
    }
    assert_eq!(
        cb.get(&newer).await.unwrap(),
        b"newer",
        "hand-off never overwrites a newer write"
    );
    let share = moved as f64 / n as f64;
    assert!((share - 0.5).abs() < 0.5 * 0.06, "moved share {share}");
    assert_eq!(
        st["keysMoved"].as_u64().unwrap() + st["keysSkipped"].as_u64().unwrap(),
        moved as u64,
        "{st}"
    );
    assert_eq!(st["keysSkipped"], 1);
    assert_eq!(st["keysRemaining"], 0);

    // Shrink back: b hands everything to a and ends empty.
    let ring3 = Ring::from_addresses(3, [a_addr.as_str()]).unwrap();
    handoff(b.admin_addr, &ring3, &b_addr, json!({})).await;
    let st = wait_finished(b.admin_addr, 3).await;
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(crate::support::stat(&cb.stats().await, "curr_items"), 0);
    assert_eq!(
        crate::support::stat(&ca.stats().await, "curr_items"),
        n as u64
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn unreachable_owner_fails_the_hand_off_and_keeps_its_keys() {
    let a = start_node(16).await;
    let a_addr = a.addr.to_string();
    let mut ca = Client::connect(a.addr).await;
    for i in 0..200 {
        ca.set(&format!("k{i}"), b"v").await;
    }
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let ring = Ring::from_addresses(2, [a_addr.as_str(), dead.as_str()]).unwrap();
    handoff(a.admin_addr, &ring, &a_addr, json!({})).await;
    let st = wait_finished(a.admin_addr, 2).await;
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["unreachable"], json!([dead]));
    assert!(st["keysRemaining"].as_u64().unwrap() > 50);
    assert_eq!(
        crate::support::stat(&ca.stats().await, "curr_items"),
        200,
        "nothing lost"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn a_newer_ring_mid_hand_off_takes_over_and_completes() {
    let a = start_node(64).await;
    let b = start_node(64).await;
    let c = start_node(64).await;
    let addrs = [a.addr.to_string(), b.addr.to_string(), c.addr.to_string()];
    let mut ca = Client::connect(a.addr).await;
    let value = vec![b'x'; 1000];
    for i in 0..2000 {
        ca.set(&format!("k{i}"), &value).await;
    }
    // Slow first hand-off (200 KB/s for ~1 MB) ...
    let ring2 = Ring::from_addresses(2, [addrs[0].as_str(), addrs[1].as_str()]).unwrap();
    handoff(
        a.admin_addr,
        &ring2,
        &addrs[0],
        json!({ "rateBytesPerSec": 200_000, "batchBytes": 20_000 }),
    )
    .await;
    // ... under way (some keys moved, most not) ...
    eventually(
        Duration::from_secs(10),
        "the slow hand-off moves its first keys",
        || async move {
            let st = http(a.admin_addr, "GET", "/handoff", Some(TOKEN), None)
                .await
                .json();
            st["keysMoved"].as_u64().is_some_and(|moved| moved > 0)
        },
    )
    .await;
    // ... overtaken by a grow to three.
    let ring3 = Ring::from_addresses(3, addrs.iter().map(String::as_str)).unwrap();
    handoff(a.admin_addr, &ring3, &addrs[0], json!({})).await;
    let st = wait_finished(a.admin_addr, 3).await;
    assert_eq!(st["state"], "done", "{st}");
    // b may still hold keys that ring3 gives to c: its own hand-off moves them.
    handoff(b.admin_addr, &ring3, &addrs[1], json!({})).await;
    assert_eq!(wait_finished(b.admin_addr, 3).await["state"], "done");
    let mut clients = [
        ca,
        Client::connect(b.addr).await,
        Client::connect(c.addr).await,
    ];
    let mut total = 0;
    for i in 0..2000 {
        let key = format!("k{i}");
        let owner = ring3.owner(key.as_bytes()).unwrap().address.clone();
        for (idx, cl) in clients.iter_mut().enumerate() {
            let present = cl.get(&key).await.is_some();
            assert_eq!(
                present,
                addrs[idx] == owner,
                "{key} on node {idx}, owner {owner}"
            );
            total += usize::from(present);
        }
    }
    assert_eq!(total, 2000, "every key exactly once, on its owner");
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn handoff_rejects_bad_requests_and_needs_the_token() {
    let a = start_node(16).await;
    let bad = http(a.admin_addr, "POST", "/handoff", Some(TOKEN), Some(r#"{"ring": {"epoch": 1, "members": [{"slot": 1, "address": "x:1"}]}, "selfAddress": "x:1"}"#)).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.json()["message"].as_str().unwrap().contains("slot"),
        "{}",
        bad.body
    );
    let anon = http(a.admin_addr, "POST", "/handoff", None, Some("{}")).await;
    assert_eq!(anon.status, 401);
    let idle = http(a.admin_addr, "GET", "/handoff", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(idle["state"], "idle");
    a.shutdown().await;
}

/// Issue 16, "The last lost-hit case": a plain delete on the owner, the key's slot moved
/// away, a write on the new owner, and the slot moved back within the tombstone's life. The
/// hand-off back carries the write's time, which is newer than the delete: the owner takes
/// the copy (no lost hit). A copy written *before* a delete on the owner is still refused
/// (never a stale read).
#[tokio::test]
async fn a_write_newer_than_a_delete_moves_back_to_the_node_that_deleted_it() {
    let a = start_node(16).await;
    let b = start_node(16).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let mut ca = Client::connect(a.addr).await;
    let mut cb = Client::connect(b.addr).await;
    let alone = Ring::from_addresses(1, [a_addr.as_str()]).unwrap();
    let both = alone.grown([b_addr.as_str()]).unwrap();
    let keys: Vec<String> = (0..)
        .map(|i| format!("back:{i}"))
        .filter(|k| both.owner(k.as_bytes()).unwrap().address == b_addr)
        .take(2)
        .collect();
    let (rewritten, deleted_later) = (&keys[0], &keys[1]);

    // Ring 1 (a alone): a plain delete on the owner leaves a tombstone there.
    ca.set(rewritten, b"v1").await;
    ca.ask(format!("delete {rewritten}\r\n"), "DELETED\r\n")
        .await;
    // Ring 2 (grown): the key's owner is b. a hands off (nothing of these keys is left), a
    // client writes the key on its new owner (deleting on the previous one, without a
    // tombstone, as the pool client does).
    handoff(a.admin_addr, &both, &a_addr, json!({})).await;
    assert_eq!(wait_finished(a.admin_addr, 2).await["state"], "done");
    // The write comes later than the delete by more than the clocks may disagree.
    tokio::time::sleep(Duration::from_millis(cache_node::store::CLOCK_SKEW_MS + 20)).await;
    ca.ask(format!("md {rewritten} Y\r\n"), "NF\r\n").await;
    cb.set(rewritten, b"v2").await;
    // A value written on b before a delete of the key on a: its copy must not come back.
    cb.set(deleted_later, b"old").await;
    tokio::time::sleep(Duration::from_millis(cache_node::store::CLOCK_SKEW_MS + 20)).await;
    ca.ask(format!("delete {deleted_later}\r\n"), "NOT_FOUND\r\n")
        .await;

    // Ring 3 (shrunk back to a), well within the tombstones' 30 s: b hands everything back.
    let back = both.shrunk(1).unwrap();
    handoff(b.admin_addr, &back, &b_addr, json!({})).await;
    let st = wait_finished(b.admin_addr, 3).await;
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(
        ca.get(rewritten).await.as_deref(),
        Some(&b"v2"[..]),
        "the write after the delete was lost on its way back: {st}"
    );
    assert_eq!(
        ca.get(deleted_later).await,
        None,
        "a value written before the delete came back: {st}"
    );
    assert_eq!(crate::support::stat(&cb.stats().await, "curr_items"), 0);
    a.shutdown().await;
    b.shutdown().await;
}

/// What a `FakeOwner` has seen.
#[derive(Debug, Default)]
struct Seen {
    /// Adds in the order they came: key, value length, and the CAS the fake gave the copy.
    adds: Vec<(String, usize, u64)>,
    /// Key and value bytes of the adds, as the window counts them.
    add_bytes: usize,
    /// `md <key> C<cas>` commands.
    withdrawals: Vec<(String, u64)>,
    /// Connections the sender closed.
    closed: usize,
}

/// A scripted owner on loopback: it reads `ms` and `md` commands and holds every answer
/// until released, then answers each add `HD c<n>` (a CAS of its own, from 1000 up) and each
/// withdrawal `HD`, in order, as a node would.
struct FakeOwner {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOwner {
    async fn start() -> FakeOwner {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("the fake owner cannot listen: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the fake owner has no address: {e}"))
            .to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let (release, released) = tokio::sync::watch::channel(false);
        let task_seen = seen.clone();
        let task = tokio::spawn(async move {
            let cas = std::sync::Arc::new(std::sync::Mutex::new(1000u64));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_fake(
                    stream,
                    task_seen.clone(),
                    released.clone(),
                    cas.clone(),
                ));
            }
        });
        FakeOwner {
            addr,
            seen,
            release,
            task,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Waits until no add has arrived for `quiet`; returns the key and value bytes received.
    async fn settled(&self, quiet: Duration) -> usize {
        let mut last = self.seen().add_bytes;
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.seen().add_bytes;
            if now == last && now > 0 {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for FakeOwner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve_fake(
    mut stream: tokio::net::TcpStream,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    mut released: tokio::sync::watch::Receiver<bool>,
    cas: std::sync::Arc<std::sync::Mutex<u64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut input: Vec<u8> = Vec::new();
    let mut answers: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Parse every complete command buffered.
        while let Some(end) = crate::support::find(&input, b"\r\n") {
            let line = String::from_utf8_lossy(&input[..end]).into_owned();
            let tokens: Vec<&str> = line.split(' ').collect();
            match tokens.as_slice() {
                ["ms", key, len, ..] => {
                    let len: usize = len
                        .parse()
                        .unwrap_or_else(|e| panic!("ms with length {len:?}: {e}"));
                    if input.len() < end + 2 + len + 2 {
                        break;
                    }
                    let given = {
                        let mut c = lock(&cas);
                        *c += 1;
                        *c
                    };
                    let mut s = lock(&seen);
                    s.adds.push((key.to_string(), len, given));
                    s.add_bytes += key.len() + len;
                    answers.extend_from_slice(format!("HD c{given}\r\n").as_bytes());
                    input.drain(..end + 2 + len + 2);
                }
                ["md", key, c] => {
                    let c: u64 = c
                        .strip_prefix('C')
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("md without a CAS: {line:?}"));
                    lock(&seen).withdrawals.push((key.to_string(), c));
                    answers.extend_from_slice(b"HD\r\n");
                    input.drain(..end + 2);
                }
                other => panic!("the fake owner got {other:?}"),
            }
        }
        if *released.borrow() && !answers.is_empty() {
            if stream.write_all(&answers).await.is_err() {
                return;
            }
            answers.clear();
        }
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    lock(&seen).closed += 1;
                    return;
                }
                Ok(n) => input.extend_from_slice(&buf[..n]),
            },
            r = released.changed() => if r.is_err() { return },
        }
    }
}

/// Fills `c` with `n` keys `w:<i>` of `size`-byte values.
async fn fill(c: &mut Client, n: usize, size: usize) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("w:{i}")).collect();
    for key in &keys {
        c.set(key, &vec![b'v'; size]).await;
    }
    keys
}

/// The pipeline keeps several batches in flight to a slow owner, never more key and value
/// bytes than the window, matches the answers to their keys across the batches once they
/// come, and withdraws exactly its own copy of a key whose source changed while in flight.
#[tokio::test]
async fn several_batches_fly_within_the_window_and_a_changed_source_withdraws_only_our_copy() {
    let a = start_node(16).await;
    let a_addr = a.addr.to_string();
    let mut ca = Client::connect(a.addr).await;
    let keys = fill(&mut ca, 400, 1000).await;
    let owner = FakeOwner::start().await;
    let ring = Ring::from_addresses(2, [owner.addr.as_str()]).unwrap();
    let (batch, window) = (10_000usize, 50_000usize);
    handoff(
        a.admin_addr,
        &ring,
        &a_addr,
        json!({ "batchBytes": batch, "maxInFlightBytes": window }),
    )
    .await;

    // Nothing is answered yet: the sender fills its window and stops.
    let in_flight = owner.settled(Duration::from_millis(300)).await;
    assert!(
        in_flight <= window,
        "{in_flight} bytes in flight, more than the window of {window}"
    );
    assert!(
        in_flight > 2 * batch,
        "only {in_flight} bytes in flight: the batches were not overlapped"
    );
    let held = owner.seen().adds.clone();
    // A client changes one of the keys in flight on the source.
    let changed = held[held.len() / 2].0.clone();
    ca.set(&changed, b"newer").await;
    owner.release.send(true).unwrap();

    let st = wait_finished(a.admin_addr, 2).await;
    assert_eq!(st["state"], "done", "{st}");
    let seen = std::mem::take(&mut *owner.seen());
    let given = seen
        .adds
        .iter()
        .find(|(k, _, _)| *k == changed)
        .map(|(_, _, cas)| *cas)
        .unwrap();
    assert_eq!(
        seen.withdrawals,
        vec![(changed.clone(), given)],
        "exactly the copy of the changed key, by the CAS the owner gave it"
    );
    // Every key went over once, the changed one twice: its newer value went over later.
    assert_eq!(seen.adds.len(), keys.len() + 1);
    let lengths: Vec<usize> = seen
        .adds
        .iter()
        .filter(|(k, _, _)| *k == changed)
        .map(|(_, len, _)| *len)
        .collect();
    assert_eq!(lengths, vec![1000, 5]);
    assert_eq!(st["keysMoved"], keys.len() as u64, "{st}");
    assert_eq!(st["keysRetried"], 1, "{st}");
    assert_eq!(st["keysRemaining"], 0, "{st}");
    assert_eq!(crate::support::stat(&ca.stats().await, "curr_items"), 0);
    a.shutdown().await;
}

/// A window of one batch sends a batch only once the previous one is answered.
#[tokio::test]
async fn a_window_of_one_batch_sends_one_batch_at_a_time() {
    let a = start_node(16).await;
    let a_addr = a.addr.to_string();
    let mut ca = Client::connect(a.addr).await;
    fill(&mut ca, 200, 1000).await;
    let owner = FakeOwner::start().await;
    let ring = Ring::from_addresses(2, [owner.addr.as_str()]).unwrap();
    let batch = 10_000usize;
    handoff(
        a.admin_addr,
        &ring,
        &a_addr,
        json!({ "batchBytes": batch, "maxInFlightBytes": batch }),
    )
    .await;
    let in_flight = owner.settled(Duration::from_millis(300)).await;
    // A batch ends with the item that reaches its size, so it may pass it by one item.
    assert!(
        in_flight <= batch + 1010,
        "{in_flight} bytes in flight with a window of one batch"
    );
    owner.release.send(true).unwrap();
    let st = wait_finished(a.admin_addr, 2).await;
    assert_eq!(st["state"], "done", "{st}");
    assert_eq!(st["keysMoved"], 200, "{st}");
    a.shutdown().await;
}

/// A hand-off cancelled while answers are owed settles nothing more: no source is dropped
/// and no copy withdrawn after the cancel, even once the owner answers.
#[tokio::test]
async fn cancelling_mid_window_settles_nothing_more() {
    let a = start_node(16).await;
    let a_addr = a.addr.to_string();
    let mut ca = Client::connect(a.addr).await;
    let keys = fill(&mut ca, 300, 1000).await;
    let owner = FakeOwner::start().await;
    let ring = Ring::from_addresses(2, [owner.addr.as_str()]).unwrap();
    handoff(
        a.admin_addr,
        &ring,
        &a_addr,
        json!({ "batchBytes": 10_000, "maxInFlightBytes": 40_000 }),
    )
    .await;
    owner.settled(Duration::from_millis(300)).await;
    let st = http(a.admin_addr, "DELETE", "/handoff", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(st["state"], "cancelled", "{st}");
    owner.release.send(true).unwrap();
    // The sender closes its connection; whatever the owner answers is not read.
    eventually(Duration::from_secs(5), "the sender hangs up", || {
        let closed = owner.seen().closed;
        async move { closed > 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        crate::support::stat(&ca.stats().await, "curr_items"),
        keys.len() as u64,
        "a cancelled hand-off dropped sources"
    );
    assert!(owner.seen().withdrawals.is_empty());
    let st = http(a.admin_addr, "GET", "/handoff", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["keysMoved"], 0, "{st}");
    a.shutdown().await;
}
