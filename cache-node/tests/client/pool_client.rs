//! `PoolClient` against real nodes: routing by the ring, the migration rules, ring swaps
//! under load. Each node is also read directly, so placement is checked, not assumed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_node::Node;
use cache_node::client::{ClientError, Held, NodeClient, PoolClient};
use cachepool_crds::ring::{Ring, RingState};

use crate::support::{
    Action, REQUEST_TIMEOUT, SLACK, accepted_by, client, dead_addr, ok, options, scripted,
    silent_listener, start_node, stop, within,
};

const LIMIT: Duration = Duration::from_secs(5);

async fn start_nodes(n: usize) -> (Vec<Node>, Vec<NodeClient>) {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(start_node().await);
    }
    let clients = nodes.iter().map(client).collect();
    (nodes, clients)
}

fn addrs(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|n| n.addr.to_string()).collect()
}

/// `from` migrating to `to`.
fn migrating(from: &Ring, to: &Ring) -> RingState {
    let mut state = RingState::new(from.clone());
    ok(state.begin(to.clone()), "begin migration");
    state
}

/// Keys whose owner differs between the two rings of `state`.
fn moving_keys(state: &RingState, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| {
            state
                .read_plan(k.as_bytes())
                .is_some_and(|plan| plan.fallback.is_some())
        })
        .take(n)
        .collect()
}

fn client_for<'a>(clients: &'a [NodeClient], address: &str) -> &'a NodeClient {
    match clients.iter().find(|c| c.addr() == address) {
        Some(client) => client,
        None => panic!("no client for {address}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_on_their_ring_owner_only() {
    let (nodes, clients) = start_nodes(3).await;
    let ring = Ring::from_addresses(1, addrs(&nodes)).unwrap();
    let pool = PoolClient::from_ring(ring.clone(), options()).unwrap();
    within(LIMIT, async {
        let mut per_node = [0; 3];
        for i in 0..150 {
            let key = format!("user:{i}");
            pool.set(&key, key.as_bytes(), i, 0).await.unwrap();
            let owner = ring.owner(key.as_bytes()).unwrap();
            per_node[owner.slot as usize] += 1;
            for c in &clients {
                let held = c.get(&key).await.unwrap();
                assert_eq!(
                    held.is_some(),
                    c.addr() == owner.address,
                    "{key} on {}",
                    c.addr()
                );
            }
            let value = pool.get(&key).await.unwrap().unwrap();
            assert_eq!((&value.data[..], value.flags), (key.as_bytes(), i));
        }
        assert!(
            per_node.iter().all(|&n| n > 20),
            "keys spread over the nodes: {per_node:?}"
        );
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_key_is_read_from_its_previous_owner_and_copied_forward_with_flags_ttl_and_write_time()
 {
    let (nodes, clients) = start_nodes(3).await;
    let all = addrs(&nodes);
    let old = Ring::from_addresses(1, &all[..2]).unwrap();
    let new = old.grown([all[2].clone()]).unwrap();
    let state = migrating(&old, &new);
    let pool = PoolClient::from_ring(old.clone(), options()).unwrap();
    within(LIMIT, async {
        let keys = moving_keys(&state, 20);
        for (i, key) in keys.iter().enumerate() {
            // Written before the migration: only the old owner has them.
            let exptime = if i % 2 == 0 { 1000 } else { 0 };
            pool.set(key, format!("v{i}").as_bytes(), i as u32, exptime)
                .await
                .unwrap();
        }
        assert!(pool.set_ring(state.clone()));
        for (i, key) in keys.iter().enumerate() {
            let value = pool
                .get(key)
                .await
                .unwrap()
                .expect("found on the previous owner");
            assert_eq!(
                (&value.data[..], value.flags),
                (format!("v{i}").as_bytes(), i as u32)
            );
            let owner = client_for(&clients, &new.owner(key.as_bytes()).unwrap().address);
            let Held {
                value: copy,
                ttl,
                written_ms,
            } = owner.get_held(key).await.unwrap().expect("copied forward");
            assert_eq!(
                (&copy.data[..], copy.flags),
                (format!("v{i}").as_bytes(), i as u32)
            );
            // The copy carries the time of the write, not of the copy: a tombstone on a node
            // the key moves to later judges it by that.
            let source = client_for(&clients, &old.owner(key.as_bytes()).unwrap().address);
            let original = source
                .get_held(key)
                .await
                .unwrap()
                .expect("the source stays");
            assert!(written_ms.is_some(), "a fresh write's time is known");
            assert_eq!(written_ms, original.written_ms, "{key}: the write's time");
            if i % 2 == 0 {
                let ttl = ttl.expect("the copy keeps its expiry");
                assert!((995..=1000).contains(&ttl), "remaining ttl {ttl}");
            } else {
                assert_eq!(ttl, None, "an item that never expired still never expires");
            }
        }
        // Keys that do not move are read from their owner as before.
        assert!(pool.get("no-such-key").await.unwrap().is_none());
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_during_a_migration_deletes_the_previous_owners_copy() {
    let (nodes, clients) = start_nodes(3).await;
    let all = addrs(&nodes);
    let old = Ring::from_addresses(1, &all[..2]).unwrap();
    let new = old.grown([all[2].clone()]).unwrap();
    let state = migrating(&old, &new);
    let pool = PoolClient::new(state.clone(), options()).unwrap();
    within(LIMIT, async {
        for key in moving_keys(&state, 10) {
            let plan = state.write_plan(key.as_bytes()).unwrap();
            let previous = client_for(&clients, &plan.also_delete.unwrap().address);
            let owner = client_for(&clients, &plan.owner.address);
            previous.set(&key, b"old", 0, 0).await.unwrap();
            pool.set(&key, b"new", 0, 0).await.unwrap();
            assert_eq!(
                previous.get(&key).await.unwrap(),
                None,
                "stale copy left on the previous owner"
            );
            assert_eq!(&owner.get(&key).await.unwrap().unwrap().data[..], b"new");
            assert_eq!(&pool.get(&key).await.unwrap().unwrap().data[..], b"new");
        }
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_during_a_migration_removes_the_key_from_both_owners() {
    let (nodes, clients) = start_nodes(3).await;
    let all = addrs(&nodes);
    let old = Ring::from_addresses(1, &all[..2]).unwrap();
    let new = old.grown([all[2].clone()]).unwrap();
    let state = migrating(&old, &new);
    let pool = PoolClient::new(state.clone(), options()).unwrap();
    within(LIMIT, async {
        for key in moving_keys(&state, 10) {
            let plan = state.write_plan(key.as_bytes()).unwrap();
            let previous = client_for(&clients, &plan.also_delete.unwrap().address);
            let owner = client_for(&clients, &plan.owner.address);
            previous.set(&key, b"old", 0, 0).await.unwrap();
            owner.set(&key, b"copied", 0, 0).await.unwrap();
            assert!(pool.delete(&key).await.unwrap());
            assert_eq!(previous.get(&key).await.unwrap(), None);
            assert_eq!(owner.get(&key).await.unwrap(), None);
            assert_eq!(pool.get(&key).await.unwrap(), None);
            assert!(!pool.delete(&key).await.unwrap());
        }
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_during_a_migration_sees_the_previous_owners_copy() {
    let (nodes, clients) = start_nodes(3).await;
    let all = addrs(&nodes);
    let old = Ring::from_addresses(1, &all[..2]).unwrap();
    let new = old.grown([all[2].clone()]).unwrap();
    let state = migrating(&old, &new);
    let pool = PoolClient::new(state.clone(), options()).unwrap();
    within(LIMIT, async {
        let keys = moving_keys(&state, 2);
        let plan = state.write_plan(keys[0].as_bytes()).unwrap();
        let previous = client_for(&clients, &plan.also_delete.unwrap().address);
        previous.set(&keys[0], b"first", 0, 0).await.unwrap();
        assert!(
            !pool.add(&keys[0], b"second", 0, 0).await.unwrap(),
            "the pool already holds it"
        );
        assert_eq!(
            &pool.get(&keys[0]).await.unwrap().unwrap().data[..],
            b"first"
        );
        assert!(pool.add(&keys[1], b"only", 0, 0).await.unwrap());
        assert_eq!(
            &pool.get(&keys[1]).await.unwrap().unwrap().data[..],
            b"only"
        );
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_forward_is_withdrawn_when_the_source_changed_meanwhile() {
    // The previous owner is scripted: its item reads as CAS 5, and the re-check after the
    // copy finds it rewritten ("changed"), gone ("gone": handed off meanwhile) or untouched
    // ("same"), as if another client or the hand-off had acted between the read and the copy.
    // The item was written a second ago; the copy must carry that time.
    let written = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 1_000;
    let (fake, _, _peer) = scripted(move |_, line| {
        let words: Vec<&str> = line.split(' ').collect();
        let reply: &[u8] = match (words.as_slice(), words.get(1).copied()) {
            (["mg", _, "c"], Some("gone")) => b"EN\r\n",
            (["mg", _, "c"], Some("changed")) => b"HD c6\r\n",
            (["mg", _, "c"], Some(_)) => b"HD c5\r\n",
            (["mg", _, "v", "f", "t", "c", "w"], _) => {
                return Action::Reply(format!("VA 3 f7 t-1 c5 w{written}\r\nold\r\n").into());
            }
            _ => b"ERROR\r\n",
        };
        Action::Reply(reply.to_vec())
    })
    .await;
    let node = start_node().await;
    let owner = client(&node);
    let old = Ring::from_addresses(1, [fake.to_string()]).unwrap();
    let new = old.replaced(0, node.addr.to_string()).unwrap();
    let pool = PoolClient::new(migrating(&old, &new), options()).unwrap();
    within(LIMIT, async {
        assert_eq!(
            pool.get("changed").await.unwrap(),
            None,
            "a miss, not the stale value"
        );
        assert_eq!(
            owner.get("changed").await.unwrap(),
            None,
            "the forwarded copy was withdrawn"
        );
        for key in ["same", "gone"] {
            let value = pool.get(key).await.unwrap().unwrap();
            assert_eq!((&value.data[..], value.flags), (&b"old"[..], 7), "{key}");
            let held = owner.get_held(key).await.unwrap().unwrap();
            assert_eq!(
                (&held.value.data[..], held.value.flags, held.ttl),
                (&b"old"[..], 7, None),
                "{key}: the copy stays on the owner"
            );
            assert_eq!(
                held.written_ms,
                Some(written),
                "{key}: with the write's time"
            );
        }
    })
    .await;
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_or_silent_node_is_a_miss_for_reads_and_an_error_for_writes() {
    let (silent, _peer) = silent_listener().await;
    let bound = REQUEST_TIMEOUT + SLACK;
    for addr in [dead_addr().await, silent.to_string()] {
        let pool =
            PoolClient::from_ring(Ring::from_addresses(1, [addr.clone()]).unwrap(), options())
                .unwrap();
        assert_eq!(within(bound, pool.get("k")).await.unwrap(), None, "{addr}");
        assert!(within(bound, pool.set("k", b"v", 0, 0)).await.is_err());
        assert!(within(bound, pool.delete("k")).await.is_err());
    }

    // During a migration, a down current owner still lets reads reach the previous owner,
    // and a down previous owner fails writes (the stale copy there could not be deleted).
    let node = start_node().await;
    let live = client(&node);
    live.set("k", b"v", 0, 0).await.unwrap();
    let dead = dead_addr().await;
    let up = Ring::from_addresses(1, [node.addr.to_string()]).unwrap();
    let pool = PoolClient::new(
        migrating(&up, &up.replaced(0, dead.clone()).unwrap()),
        options(),
    )
    .unwrap();
    assert_eq!(
        &within(bound, pool.get("k")).await.unwrap().unwrap().data[..],
        b"v"
    );
    let down = Ring::from_addresses(1, [dead]).unwrap();
    let pool = PoolClient::new(
        migrating(&down, &down.replaced(0, node.addr.to_string()).unwrap()),
        options(),
    )
    .unwrap();
    let err = within(bound, pool.set("k", b"w", 0, 0)).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert_eq!(
        &live.get("k").await.unwrap().unwrap().data[..],
        b"v",
        "nothing written"
    );

    let empty = PoolClient::new(RingState::default(), options()).unwrap();
    assert_eq!(empty.get("k").await.unwrap(), None);
    assert!(matches!(
        empty.set("k", b"v", 0, 0).await,
        Err(ClientError::EmptyRing)
    ));
    stop([node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_swap_keeps_connections_to_nodes_that_stay_and_ignores_older_rings() {
    let (nodes, _clients) = start_nodes(2).await;
    let all = addrs(&nodes);
    let one = Ring::from_addresses(1, &all[..1]).unwrap();
    let two = one.grown([all[1].clone()]).unwrap();
    let pool = PoolClient::from_ring(one.clone(), options()).unwrap();
    within(LIMIT, async {
        pool.set("a", b"1", 0, 0).await.unwrap();
        assert_eq!(accepted_by(&nodes[0]), 1);
        assert!(pool.set_ring(migrating(&one, &two)));
        assert!(
            pool.set_ring(RingState::new(two.clone())),
            "completing keeps the epoch"
        );
        assert!(
            !pool.set_ring(RingState::new(one.clone())),
            "an older ring is ignored"
        );
        assert_eq!(pool.ring(), RingState::new(two.clone()));
        for i in 0..40 {
            pool.set(format!("k{i}"), b"v", 0, 0).await.unwrap();
        }
        assert_eq!(
            accepted_by(&nodes[0]),
            1,
            "node 0's connection survived the swaps"
        );
        assert_eq!(accepted_by(&nodes[1]), 1);
        pool.flush_all().await.unwrap();
        assert_eq!(pool.get("k0").await.unwrap(), None);
    })
    .await;
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_swaps_during_a_load_of_gets_and_sets_neither_panic_nor_hang() {
    let (nodes, _clients) = start_nodes(3).await;
    let all = addrs(&nodes);
    // Grow to three, complete, shrink to two, complete, and again: every state a client
    // can be handed, with increasing epochs.
    let mut states = Vec::new();
    let mut ring = Ring::from_addresses(1, &all[..2]).unwrap();
    states.push(RingState::new(ring.clone()));
    for _ in 0..15 {
        let next = if ring.len() == 2 {
            ring.grown([all[2].clone()]).unwrap()
        } else {
            ring.shrunk(1).unwrap()
        };
        states.push(migrating(&ring, &next));
        states.push(RingState::new(next.clone()));
        ring = next;
    }
    let pool = Arc::new(PoolClient::new(states[0].clone(), options()).unwrap());
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8u32 {
        let pool = pool.clone();
        workers.spawn(async move {
            for i in 0..300u32 {
                let key = format!("load-{}", (i * 7 + w) % 64);
                match i % 4 {
                    0 => pool
                        .set(&key, format!("{w}-{i}").as_bytes(), w, 0)
                        .await
                        .map(drop),
                    1 => pool.delete(&key).await.map(drop),
                    2 => pool.add(&key, b"a", w, 60).await.map(drop),
                    _ => pool.get(&key).await.map(drop),
                }?;
            }
            Ok::<_, ClientError>(())
        });
    }
    let swapper = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for state in states.into_iter().skip(1) {
                assert!(pool.set_ring(state));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    within(Duration::from_secs(10), async {
        while let Some(done) = workers.join_next().await {
            done.unwrap().unwrap();
        }
        swapper.await.unwrap();
    })
    .await;
    println!(
        "load with ring swaps: 2400 requests and 30 swaps in {:?}",
        started.elapsed()
    );
    // After the swaps every key is where the final ring says.
    let pool = Arc::try_unwrap(pool).unwrap();
    within(LIMIT, async {
        for i in 0..64 {
            let key = format!("load-{i}");
            pool.set(&key, b"final", 0, 0).await.unwrap();
            assert_eq!(&pool.get(&key).await.unwrap().unwrap().data[..], b"final");
        }
    })
    .await;
    stop(nodes).await;
}

/// Not a benchmark: prints what routing through the ring adds to a get, for the report.
/// Rounds alternate which client goes first and the medians are compared, so warm-up lands
/// on neither side; one thread runs node and clients, so which worker picks up which
/// connection (worth ±15 µs on two cores) does not either.
#[tokio::test(flavor = "current_thread")]
async fn pool_get_overhead_over_node_get() {
    const ROUNDS: usize = 10;
    const GETS: u32 = 1000;
    let node = start_node().await;
    let direct = client(&node);
    let ring = ok(Ring::from_addresses(1, [node.addr.to_string()]), "ring");
    let pool = ok(PoolClient::from_ring(ring.clone(), options()), "pool");
    ok(direct.set("bench", &[b'x'; 100], 0, 0).await, "set");
    let (mut via_node, mut via_pool) = (Vec::new(), Vec::new());
    within(Duration::from_secs(15), async {
        for round in 0..ROUNDS {
            for first in [round % 2 == 0, round % 2 == 1] {
                let t = Instant::now();
                for _ in 0..GETS {
                    let hit = if first {
                        direct.get("bench").await
                    } else {
                        pool.get("bench").await
                    };
                    assert!(hit.unwrap().is_some());
                }
                let per_get = t.elapsed().as_secs_f64() * 1e6 / f64::from(GETS);
                if first {
                    via_node.push(per_get)
                } else {
                    via_pool.push(per_get)
                }
            }
        }
    })
    .await;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (n, p) = (median(&mut via_node), median(&mut via_pool));
    // The routing computation alone (hash, jump, member lookup), without I/O.
    let keys: Vec<String> = (0..100_000).map(|i| format!("user:{i}")).collect();
    let t = Instant::now();
    for key in &keys {
        std::hint::black_box(ring.owner(std::hint::black_box(key.as_bytes())));
    }
    let route_ns = t.elapsed().as_secs_f64() * 1e9 / keys.len() as f64;
    println!(
        "get, sequential, one loopback node (median of {ROUNDS} x {GETS}): NodeClient {n:.1} µs, \
         PoolClient {p:.1} µs, difference {:+.2} µs; ring lookup alone {route_ns:.0} ns/key",
        p - n
    );
    stop([node]).await;
}
