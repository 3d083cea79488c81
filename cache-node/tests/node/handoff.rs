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
