//! Things dying: a node killed with SIGKILL is replaced in its slot; an operator killed with
//! SIGKILL in the middle of a resize leaves the nodes running, and the next operator on the
//! same directory adopts them and finishes the resize; an operator stopped with
//! `--keep-nodes` hands its nodes, data and ring to the next one unchanged; a SIGTERM right
//! after the operator announced its API still ends in a clean exit.

use std::collections::BTreeSet;
use std::sync::Arc;

use cache_node::client::PoolClient;
use tokio::time::Instant;

use crate::harness::{
    Manifest, NAMESPACE, Operator, OperatorOptions, POLL, TIMEOUT, TestDir, apply_and_start,
    items_per_node, pid_of, pool_client, ring_epoch, run, settled, shutdown, status_members,
    status_pids,
};
use cachepool_test_support::load::{self, Checker, Keys};

fn kill(pid: u32) {
    // SAFETY: plain integers; the pid is a node of this test, alive in the census just read.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// Reads every key of `checker` through `client`, `concurrency` at a time: (hits, misses,
/// values that are not the key's version 1).
async fn read_back(
    client: Arc<PoolClient>,
    checker: Arc<Checker>,
    concurrency: usize,
) -> (u64, u64, u64) {
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (client, checker) = (client.clone(), checker.clone());
            tokio::spawn(async move {
                let (mut hits, mut misses, mut wrong) = (0, 0, 0);
                let keys = checker.keys();
                for i in (t..keys.len()).step_by(concurrency) {
                    match client.get(keys.name(i)).await {
                        Ok(Some(value)) => {
                            hits += 1;
                            wrong += u64::from(keys.parse(i, &value.data) != Ok(1));
                        }
                        _ => misses += 1,
                    }
                }
                (hits, misses, wrong)
            })
        })
        .collect();
    let mut sum = (0, 0, 0);
    for task in tasks {
        let (h, m, w) = task.await.unwrap_or_else(|e| panic!("read task: {e}"));
        sum = (sum.0 + h, sum.1 + m, sum.2 + w);
    }
    sum
}

#[test]
fn node_killed_with_sigkill_is_replaced_in_its_slot() {
    run(async {
        const POOL: &str = "crash";
        let dir = TestDir::new("node-kill");
        let setup = apply_and_start(&dir, &Manifest::manual(POOL, 3), 3).await;
        let api = setup.operator.api.clone();
        let before = setup.status;
        let members = status_members(&before);
        let victim = before
            .nodes
            .iter()
            .find(|n| n.slot == 1)
            .unwrap_or_else(|| panic!("no node at slot 1: {before:#?}"))
            .clone();
        let victim_pid = pid_of(&victim.id);
        assert!(dir.node_pids().contains(&victim_pid));

        kill(victim_pid);
        let killed = Instant::now();
        // Watch slot 1 in the status until the pool has settled with a new node there.
        let mut seen = BTreeSet::new();
        let after = loop {
            let s = api.status(POOL).await;
            for node in s.nodes.iter().filter(|n| n.slot == 1) {
                let which = if node.id == victim.id {
                    "killed node"
                } else {
                    "replacement"
                };
                seen.insert(format!("{which} {:?}", node.state));
            }
            let replaced = s
                .nodes
                .iter()
                .any(|n| n.slot == 1 && n.id != victim.id && n.address != victim.address);
            if replaced && settled(&s, 3) {
                break s;
            }
            assert!(
                killed.elapsed() < TIMEOUT,
                "slot 1 not replaced within {TIMEOUT:?}: {s:#?}"
            );
            tokio::time::sleep(POLL).await;
        };
        let took = killed.elapsed();
        println!(
            "== e2e node kill: FIGURE kill -9 -> replaced and Ready {:.1} ms; slot 1 as the status \
             showed it: {seen:?}",
            took.as_secs_f64() * 1e3
        );

        assert_eq!(
            ring_epoch(&after),
            ring_epoch(&before) + 1,
            "a replacement is one ring change"
        );
        let now = status_members(&after);
        assert_eq!(now.len(), 3);
        assert_eq!(now[0], members[0], "slot 0 changed");
        assert_eq!(now[2], members[2], "slot 2 changed");
        assert_eq!(now[1].0, 1);
        assert_ne!(now[1].1, members[1].1, "slot 1 kept the dead address");
        let pids = dir.wait_node_count(3, TIMEOUT).await;
        assert_eq!(pids, status_pids(&after), "processes vs status");
        assert!(!pids.contains(&victim_pid));
        // The new ring serves: every member answers.
        let ring = api.ring(POOL, None).await;
        assert_eq!(items_per_node(&ring).await.len(), 3);
        shutdown(&dir, setup.operator).await;
    });
}

#[test]
fn operator_killed_mid_resize_is_finished_by_the_next_operator() {
    run(async {
        const POOL: &str = "resume";
        let dir = TestDir::new("operator-kill");
        let setup = apply_and_start(&dir, &Manifest::manual(POOL, 2), 2).await;
        let api = setup.operator.api.clone();
        let client = pool_client(&api, POOL).await;
        // Enough data (about 60 MB) that the hand-off of a grow takes a while.
        let keys = 60_000;
        let checker = Arc::new(Checker::new(Keys::new(keys, 800, 400)));
        assert_eq!(load::prefill(client.clone(), checker.clone(), 16).await, 0);
        let epoch = ring_epoch(&setup.status);

        let poll = {
            let api = api.clone();
            tokio::spawn(async move { api.ring(POOL, Some(epoch)).await })
        };
        let reply = api.scale(POOL, 1).await;
        assert!((200..300).contains(&reply.status), "scale +1: {reply:?}");
        let grown = tokio::time::timeout(TIMEOUT, poll)
            .await
            .unwrap_or_else(|_| panic!("no ring after {epoch} within {TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("long-poll task: {e}"));
        setup.operator.kill().await;
        assert!(
            grown.is_migrating() && grown.current().len() == 3,
            "the first ring after the scale is not the migrating 2->3 ring: {grown:?}"
        );
        // The killed operator's record of the pool (its runtime state, `.cachepool/pools/`)
        // shows the migration unfinished: the next operator has a resize to finish.
        let record = dir
            .pools()
            .join(".cachepool/pools")
            .join(NAMESPACE)
            .join(format!("{POOL}.json"));
        let text = std::fs::read_to_string(&record)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", record.display()));
        let record: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", record.display()));
        assert!(
            record["status"]["migration"].is_object(),
            "the operator was killed after the migration ended, not in the middle of it: {}",
            record["status"]
        );
        // The nodes outlive the operator: they run in process groups of their own.
        let orphans = dir.node_pids();
        assert_eq!(
            orphans.len(),
            3,
            "node processes after kill -9 of the operator"
        );

        let operator = Operator::start(&dir).await;
        let api = operator.api.clone();
        let restarted = Instant::now();
        let status = api.wait_settled(POOL, 3, TIMEOUT).await;
        println!(
            "== e2e operator kill: FIGURE restart -> resize finished and Ready {:.1} ms",
            restarted.elapsed().as_secs_f64() * 1e3
        );
        let ring = api.ring(POOL, None).await;
        assert!(!ring.is_migrating(), "{ring:?}");
        assert!(
            ring.current().epoch() > grown.current().epoch(),
            "completing the migration must raise the epoch: {ring:?} after {grown:?}"
        );
        let members: Vec<_> = ring
            .current()
            .members()
            .iter()
            .map(|m| (m.slot, m.address.clone()))
            .collect();
        let grown_members: Vec<_> = grown
            .current()
            .members()
            .iter()
            .map(|m| (m.slot, m.address.clone()))
            .collect();
        assert_eq!(members, grown_members, "the finished ring is the one begun");
        assert_eq!(members, status_members(&status));
        // The nodes were adopted: the same processes, no orphan, no duplicate.
        let pids = dir.wait_node_count(3, TIMEOUT).await;
        assert_eq!(pids, orphans, "processes were replaced instead of adopted");
        assert_eq!(pids, status_pids(&status));

        // Every key is on its owner and only there: all found through the final ring (no
        // fallback), and the nodes hold exactly as many items as there are keys.
        client.set_ring(ring.clone());
        let (hits, misses, wrong) = read_back(client.clone(), checker.clone(), 16).await;
        let items = items_per_node(&ring).await;
        println!(
            "   read back {keys} keys: {hits} hits, {misses} misses, {wrong} wrong values; items per \
             slot {items:?}"
        );
        assert_eq!((hits, misses, wrong), (keys as u64, 0, 0));
        assert_eq!(
            items.iter().sum::<u64>(),
            keys as u64,
            "items per slot {items:?}"
        );
        shutdown(&dir, operator).await;
    });
}

#[test]
fn operator_stopped_with_keep_nodes_hands_its_nodes_to_the_next_one() {
    run(async {
        const POOL: &str = "keep";
        let dir = TestDir::new("keep-nodes");
        let manifest = Manifest::manual(POOL, 2);
        dir.write_manifest(POOL, &manifest.yaml());
        let keep = OperatorOptions {
            keep_nodes: true,
            ..OperatorOptions::default()
        };
        let first = Operator::start_with(&dir, keep).await;
        let before = first.api.wait_settled(POOL, 2, TIMEOUT).await;
        let pids = dir.wait_node_count(2, TIMEOUT).await;
        let client = pool_client(&first.api, POOL).await;
        client
            .set("keep:probe", b"still here", 0, 0)
            .await
            .unwrap_or_else(|e| panic!("set: {e}"));
        first.shutdown().await;
        assert_eq!(dir.node_pids(), pids, "--keep-nodes stopped nodes");

        let second = Operator::start(&dir).await;
        let after = second.api.wait_settled(POOL, 2, TIMEOUT).await;
        assert_eq!(status_pids(&after), pids, "nodes relaunched, not adopted");
        assert_eq!(dir.node_pids(), pids);
        assert_eq!(status_members(&after), status_members(&before));
        assert_eq!(ring_epoch(&after), ring_epoch(&before), "the ring changed");
        let value = client
            .get("keep:probe")
            .await
            .unwrap_or_else(|e| panic!("get: {e}"));
        assert_eq!(value.map(|v| v.data.to_vec()), Some(b"still here".to_vec()));
        // Without --keep-nodes, SIGTERM stops the adopted nodes too.
        shutdown(&dir, second).await;
    });
}

/// The `api:` line tells a script the operator is up; a SIGTERM sent right after it must still
/// stop the nodes and end in exit 0, not kill the operator by the signal's default action and
/// leave its nodes behind.
#[test]
fn sigterm_right_after_the_api_line_stops_the_operator_cleanly() {
    run(async {
        const POOL: &str = "brief";
        for round in 0..20 {
            let dir = TestDir::new(&format!("early-term-{round}"));
            dir.write_manifest(POOL, &Manifest::manual(POOL, 1).yaml());
            let operator = Operator::start(&dir).await;
            let status = operator.stop().await;
            let left = dir.processes();
            assert!(
                status.success() && left.is_empty(),
                "round {round}: SIGTERM right after the api line: the operator exited with \
                 {status}, leaving {left:?}"
            );
        }
    });
}
