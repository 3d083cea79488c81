//! `cachepool bench handoff`: how fast a node hands its keys to another.
//!
//! Two nodes run as child processes. Node A is filled with `--gib` of values, then told over
//! its admin API (`POST /handoff`, the call the operator makes during a resize) to conform to
//! a one-member ring `[B]`: every key is foreign to A, so all of them move A -> B. The bench
//! polls `GET /handoff` until A reports the hand-off done, and checks the outcome on both
//! sides (`curr_items`: all keys on B, none left on A).
//!
//! Elapsed time runs from sending the request to the first poll that sees it done (polls
//! every 10 ms), so it includes A's initial count of foreign keys and the final recount, as
//! a resize waits for them too.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use cache_node::handoff::{HandoffStatus, State};
use cachepool_crds::ring::Ring;
use serde_json::json;

use super::admin_node::{self, AdminNode};
use super::keys::check_key_size;
use super::loadgen;
use super::report::{Table, mib, thousands};
use super::servers::CpuTime;

/// `cachepool bench handoff` flags.
#[derive(Debug, clap::Args)]
pub struct HandoffArgs {
    /// GiB of values stored on A and handed to B (fractions allowed: 0.25).
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Bytes per value; keys are `k` and zero-padded digits, as short as the count allows.
    #[arg(long, default_value_t = 4096)]
    value_size: usize,
    /// Worker threads of each node.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// KiB of values A copies out of its store per batch (`batchBytes` of the request).
    #[arg(long, default_value_t = 4096)]
    batch_kib: usize,
    /// Give up if the hand-off has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Worker threads of the bench's own runtime (fill and polling).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
}

/// Per-item bytes assumed on top of key and value when sizing the nodes; generous, since
/// the nodes get three times this anyway so that nothing is ever evicted.
const ITEM_OVERHEAD: u64 = 64;
/// Connections and pipeline bytes of the fill.
const FILL_CONNECTIONS: usize = 4;
const FILL_BATCH_BYTES: usize = 256 << 10;

pub fn run(rt: &tokio::runtime::Runtime, args: HandoffArgs) -> anyhow::Result<()> {
    ensure!(
        args.gib > 0.0 && args.gib.is_finite(),
        "--gib must be a positive number"
    );
    ensure!(args.value_size > 0, "--value-size must be at least 1");
    ensure!(
        args.threads > 0 && args.batch_kib > 0,
        "--threads and --batch-kib must be at least 1"
    );
    // Runs on this (the main) thread: the children's death signal is tied to the thread that
    // spawned them, which must outlive them.
    rt.block_on(measure(args))
}

/// What the bench saw, for the report.
struct Outcome {
    keys: u64,
    key_size: usize,
    capacity_mib: u64,
    fill: Duration,
    cpu_fill: CpuTime,
    elapsed: Duration,
    status: HandoffStatus,
    cpu_a: CpuTime,
    cpu_b: CpuTime,
    items_a: u64,
    items_b: u64,
    rss_a: u64,
    rss_b: u64,
}

async fn measure(args: HandoffArgs) -> anyhow::Result<()> {
    let keys = (args.gib * f64::from(1u32 << 30) / args.value_size as f64) as u64;
    ensure!(
        keys > 0,
        "--gib {} holds no value of {} bytes",
        args.gib,
        args.value_size
    );
    let key_size = 1 + keys.saturating_sub(1).max(1).ilog10() as usize + 1;
    check_key_size(keys, key_size)?;
    let item_bytes = key_size as u64 + args.value_size as u64 + ITEM_OVERHEAD;
    let capacity_mib = (3 * keys * item_bytes).div_ceil(1 << 20).max(64);

    let mut a = AdminNode::start("node-a", capacity_mib, args.threads).await?;
    let mut b = AdminNode::start("node-b", capacity_mib, args.threads).await?;
    eprintln!(
        "node A: pid {} on {}, node B: pid {} on {}, {capacity_mib} MiB each; storing {keys} keys on A",
        a.pid(),
        a.addr,
        b.pid(),
        b.addr
    );

    let batch = (FILL_BATCH_BYTES / args.value_size).clamp(16, 1024);
    let cpu_fill0 = a.cpu_time()?;
    let started = Instant::now();
    let refused = loadgen::fill(
        a.addr,
        keys,
        key_size,
        args.value_size,
        FILL_CONNECTIONS,
        batch,
    )
    .await?;
    let fill = started.elapsed();
    let cpu_fill = a.cpu_time()?.since(cpu_fill0);
    ensure!(refused == 0, "node A refused {refused} of the fill's sets");
    let held = a.stat("curr_items").await?;
    ensure!(
        held == keys,
        "node A holds {held} items after storing {keys} (evictions? raise its capacity)"
    );
    eprintln!(
        "filled A in {:.1} s; handing everything to B",
        fill.as_secs_f64()
    );

    let ring = Ring::from_addresses(1, [b.addr.to_string()])
        .context("building the one-member ring [B]")?;
    let (cpu_a0, cpu_b0) = (a.cpu_time()?, b.cpu_time()?);
    let started = Instant::now();
    post_handoff(&a, &ring, args.batch_kib << 10).await?;
    let status = wait_done(
        &mut a,
        &mut b,
        ring.epoch(),
        Duration::from_secs(args.timeout_secs),
    )
    .await?;
    let elapsed = started.elapsed();
    let (cpu_a, cpu_b) = (a.cpu_time()?.since(cpu_a0), b.cpu_time()?.since(cpu_b0));

    let outcome = Outcome {
        keys,
        key_size,
        capacity_mib,
        fill,
        cpu_fill,
        elapsed,
        cpu_a,
        cpu_b,
        items_a: a.stat("curr_items").await?,
        items_b: b.stat("curr_items").await?,
        rss_a: a.rss_bytes()?,
        rss_b: b.rss_bytes()?,
        status,
    };
    drop((a, b));
    print!("{}", render(&args, &outcome));
    let failed = checks(&outcome)
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what)
        .collect::<Vec<_>>();
    if !failed.is_empty() {
        bail!("hand-off incomplete: {}", failed.join("; "));
    }
    Ok(())
}

/// `POST /handoff` with a batch size. The operator's `AdminClient::start_handoff` leaves
/// `batchBytes` to the node's default, so this one request is sent directly.
async fn post_handoff(a: &AdminNode, ring: &Ring, batch_bytes: usize) -> anyhow::Result<()> {
    let body = json!({
        "ring": ring,
        "selfAddress": a.addr.to_string(),
        "rateBytesPerSec": 0,
        "batchBytes": batch_bytes,
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{}/handoff", a.admin_addr))
        .bearer_auth(admin_node::TOKEN)
        .json(&body)
        .send()
        .await
        .context("POST /handoff to node A")?;
    let code = resp.status();
    if !code.is_success() {
        bail!(
            "node A answered POST /handoff with {code}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Polls A's `GET /handoff` until the hand-off to `epoch` ends; an error unless it is done.
async fn wait_done(
    a: &mut AdminNode,
    b: &mut AdminNode,
    epoch: u64,
    timeout: Duration,
) -> anyhow::Result<HandoffStatus> {
    let started = Instant::now();
    let mut reported = started;
    loop {
        super::check_interrupted()?;
        a.check_alive()?;
        b.check_alive()?;
        let st = a.admin.handoff().await?;
        if st.epoch == Some(epoch) {
            match st.state {
                State::Done => return Ok(st),
                State::Failed | State::Cancelled => {
                    bail!(
                        "the hand-off ended {:?}: {}",
                        st.state,
                        st.last_error.unwrap_or_default()
                    )
                }
                State::Running | State::Idle => {}
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "the hand-off did not finish within {timeout:?} ({} of {} keys moved)",
                st.keys_moved,
                st.keys_total
            );
        }
        if reported.elapsed() >= Duration::from_secs(2) {
            reported = Instant::now();
            eprintln!(
                "  {:5.1} s: {} of {} keys moved, pass {}",
                started.elapsed().as_secs_f64(),
                st.keys_moved,
                st.keys_total,
                st.passes
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What must hold after a complete hand-off, each with whether it does.
fn checks(o: &Outcome) -> Vec<(String, bool)> {
    vec![
        (
            format!("keysMoved {} == keys {}", o.status.keys_moved, o.keys),
            o.status.keys_moved == o.keys,
        ),
        (
            format!("B curr_items {} == keys {}", o.items_b, o.keys),
            o.items_b == o.keys,
        ),
        (format!("A curr_items {} == 0", o.items_a), o.items_a == 0),
    ]
}

fn per_sec(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64()
}

fn render(args: &HandoffArgs, o: &Outcome) -> String {
    let st = &o.status;
    let mut out = format!(
        "bench handoff: {} keys of {} B, values {} B ({} MiB of values) from A to B, \
         batch {} KiB, {} threads and {} MiB per node, client threads {}\n\
         fill of A: {:.1} s, {} sets/s, node A CPU s {}\n\n",
        o.keys,
        o.key_size,
        args.value_size,
        mib(o.keys * args.value_size as u64),
        args.batch_kib,
        args.threads,
        o.capacity_mib,
        args.client_threads,
        o.fill.as_secs_f64(),
        thousands(per_sec(o.keys as f64, o.fill)),
        o.cpu_fill.render(),
    );
    let mut t = Table::new(["hand-off A -> B", "value"]);
    t.row(["keys moved".to_string(), thousands(st.keys_moved as f64)]);
    t.row(["value MiB moved".to_string(), mib(st.bytes_moved)]);
    t.row([
        "elapsed s".to_string(),
        format!("{:.2}", o.elapsed.as_secs_f64()),
    ]);
    t.row([
        "MB/s (values, 10^6 B)".to_string(),
        format!("{:.1}", per_sec(st.bytes_moved as f64 / 1e6, o.elapsed)),
    ]);
    t.row([
        "keys/s".to_string(),
        thousands(per_sec(st.keys_moved as f64, o.elapsed)),
    ]);
    t.row(["passes".to_string(), st.passes.to_string()]);
    t.row([
        "skipped/dropped/retried".to_string(),
        format!(
            "{}/{}/{}",
            st.keys_skipped, st.keys_dropped, st.keys_retried
        ),
    ]);
    t.row(["CPU s node A (sender)".to_string(), o.cpu_a.render()]);
    t.row(["CPU s node B (receiver)".to_string(), o.cpu_b.render()]);
    t.row([
        "curr_items A after".to_string(),
        thousands(o.items_a as f64),
    ]);
    t.row([
        "curr_items B after".to_string(),
        thousands(o.items_b as f64),
    ]);
    t.row([
        "RSS MiB A / B after".to_string(),
        format!("{} / {}", mib(o.rss_a), mib(o.rss_b)),
    ]);
    out.push_str(&t.render());
    for (what, ok) in checks(o) {
        out.push_str(&format!(
            "check {}: {what}\n",
            if ok { "ok  " } else { "FAIL" }
        ));
    }
    out
}
