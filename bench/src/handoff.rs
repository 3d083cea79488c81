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
//!
//! Side by side: `--in-flight-kib 4096,16384 --rounds 2` runs one hand-off per setting of the
//! window (`maxInFlightBytes`) per round, alternating settings, the same data moving back and
//! forth between the two nodes (A -> B, then B -> A, ...; the order of the settings reversed
//! every other round, so each runs in both directions), so that settings are compared in one
//! run on one binary. The first hand-off's receiver starts empty; later ones receive
//! into a store that held the data before.

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
    /// KiB in flight to the receiver (`maxInFlightBytes` of the request); a list runs one
    /// hand-off per value, alternating. Absent: the node's default (16 MiB).
    #[arg(long, value_delimiter = ',')]
    in_flight_kib: Vec<usize>,
    /// Times to run the list of `--in-flight-kib` settings.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Give up if the hand-off has not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Worker threads of the bench's own runtime (fill and polling).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Run both nodes from this cachepool binary (another build, for a before/after) instead
    /// of this one. Leave out `--in-flight-kib` for a build older than the hand-off window.
    #[arg(long, value_name = "BIN")]
    node_binary: Option<std::path::PathBuf>,
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
    ensure!(
        args.rounds > 0 && args.in_flight_kib.iter().all(|&k| k > 0),
        "--rounds and every --in-flight-kib must be at least 1"
    );
    // Runs on this (the main) thread: the children's death signal is tied to the thread that
    // spawned them, which must outlive them.
    rt.block_on(measure(args))
}

/// What the bench saw of one hand-off, for the report.
struct Outcome {
    keys: u64,
    key_size: usize,
    capacity_mib: u64,
    fill: Duration,
    cpu_fill: CpuTime,
    /// `--in-flight-kib` of this run (None: the node's default).
    in_flight_kib: Option<usize>,
    /// Sender and receiver, e.g. `A -> B`.
    direction: String,
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

    let exe = args.node_binary.as_deref();
    let a = AdminNode::start_from("node-a", exe, capacity_mib, args.threads).await?;
    let b = AdminNode::start_from("node-b", exe, capacity_mib, args.threads).await?;
    eprintln!(
        "node A: pid {} on {}, node B: pid {} on {}, {capacity_mib} MiB each, run from {}; storing {keys} keys on A",
        a.pid(),
        a.addr,
        b.pid(),
        b.addr,
        exe.map_or_else(|| "this binary".to_owned(), |p| p.display().to_string()),
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

    let settings: Vec<Option<usize>> = if args.in_flight_kib.is_empty() {
        vec![None]
    } else {
        args.in_flight_kib.iter().copied().map(Some).collect()
    };
    // nodes[0] holds the data, nodes[1] receives it; they swap after every hand-off.
    let mut nodes = [a, b];
    let mut outcomes = Vec::new();
    let mut epoch = 0;
    for round in 0..args.rounds {
        // With an even number of settings each would always run in the same direction;
        // reversing the order every other round sends each both ways.
        let order: Vec<Option<usize>> = if round % 2 == 0 {
            settings.clone()
        } else {
            settings.iter().rev().copied().collect()
        };
        for &in_flight_kib in &order {
            epoch += 1;
            let [from, to] = &mut nodes;
            let ring = Ring::from_addresses(epoch, [to.addr.to_string()])
                .context("building the one-member ring of the receiver")?;
            let (cpu_from0, cpu_to0) = (from.cpu_time()?, to.cpu_time()?);
            let started = Instant::now();
            post_handoff(
                from,
                &ring,
                args.batch_kib << 10,
                in_flight_kib.map(|k| k << 10),
            )
            .await?;
            let status = wait_done(from, to, epoch, Duration::from_secs(args.timeout_secs)).await?;
            let elapsed = started.elapsed();
            let (cpu_from, cpu_to) = (
                from.cpu_time()?.since(cpu_from0),
                to.cpu_time()?.since(cpu_to0),
            );
            let outcome = Outcome {
                keys,
                key_size,
                capacity_mib,
                fill,
                cpu_fill,
                in_flight_kib,
                direction: format!("{} -> {}", letter(from), letter(to)),
                elapsed,
                cpu_a: cpu_from,
                cpu_b: cpu_to,
                items_a: from.stat("curr_items").await?,
                items_b: to.stat("curr_items").await?,
                rss_a: from.rss_bytes()?,
                rss_b: to.rss_bytes()?,
                status,
            };
            eprintln!(
                "hand-off {} (in flight {}): {:.2} s",
                outcome.direction,
                kib_setting(in_flight_kib),
                elapsed.as_secs_f64()
            );
            outcomes.push(outcome);
            nodes.swap(0, 1);
        }
    }
    drop(nodes);
    for o in &outcomes {
        print!("{}", render(&args, o));
    }
    if outcomes.len() > 1 {
        print!("{}", render_summary(&outcomes));
    }
    let failed = outcomes
        .iter()
        .flat_map(checks)
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what)
        .collect::<Vec<_>>();
    if !failed.is_empty() {
        bail!("hand-off incomplete: {}", failed.join("; "));
    }
    Ok(())
}

/// `A` or `B`, from the node's name.
fn letter(node: &AdminNode) -> &'static str {
    if node.name == "node-a" { "A" } else { "B" }
}

fn kib_setting(kib: Option<usize>) -> String {
    kib.map_or_else(|| "default".to_string(), |k| format!("{k} KiB"))
}

/// `POST /handoff` with a batch size and, if given, a window. The operator's
/// `AdminClient::start_handoff` leaves both to the node's defaults, so this one request is
/// sent directly.
async fn post_handoff(
    a: &AdminNode,
    ring: &Ring,
    batch_bytes: usize,
    in_flight_bytes: Option<usize>,
) -> anyhow::Result<()> {
    let mut body = json!({
        "ring": ring,
        "selfAddress": a.addr.to_string(),
        "rateBytesPerSec": 0,
        "batchBytes": batch_bytes,
    });
    if let Some(bytes) = in_flight_bytes {
        body["maxInFlightBytes"] = json!(bytes);
    }
    let resp = reqwest::Client::new()
        .post(format!("http://{}/handoff", a.admin_addr))
        .bearer_auth(admin_node::TOKEN)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST /handoff to {}", a.name))?;
    let code = resp.status();
    if !code.is_success() {
        bail!(
            "{} answered POST /handoff with {code}: {}",
            a.name,
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Polls the sender's `GET /handoff` until the hand-off to `epoch` ends; an error unless it
/// is done.
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
            format!(
                "{}: keysMoved {} == keys {}",
                o.direction, o.status.keys_moved, o.keys
            ),
            o.status.keys_moved == o.keys,
        ),
        (
            format!(
                "{}: receiver curr_items {} == keys {}",
                o.direction, o.items_b, o.keys
            ),
            o.items_b == o.keys,
        ),
        (
            format!("{}: sender curr_items {} == 0", o.direction, o.items_a),
            o.items_a == 0,
        ),
    ]
}

fn per_sec(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64()
}

fn render(args: &HandoffArgs, o: &Outcome) -> String {
    let st = &o.status;
    let mut out = format!(
        "bench handoff: {} keys of {} B, values {} B ({} MiB of values) {}, \
         batch {} KiB, in flight {}, {} threads and {} MiB per node, client threads {}\n\
         fill of A: {:.1} s, {} sets/s, node A CPU s {}\n\n",
        o.keys,
        o.key_size,
        args.value_size,
        mib(o.keys * args.value_size as u64),
        o.direction,
        args.batch_kib,
        kib_setting(o.in_flight_kib),
        args.threads,
        o.capacity_mib,
        args.client_threads,
        o.fill.as_secs_f64(),
        thousands(per_sec(o.keys as f64, o.fill)),
        o.cpu_fill.render(),
    );
    let mut t = Table::new([format!("hand-off {}", o.direction), "value".to_string()]);
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
    t.row(["CPU s sender".to_string(), o.cpu_a.render()]);
    t.row(["CPU s receiver".to_string(), o.cpu_b.render()]);
    t.row([
        "minor page faults sender / receiver".to_string(),
        format!(
            "{} / {}",
            thousands(o.cpu_a.minor_faults as f64),
            thousands(o.cpu_b.minor_faults as f64)
        ),
    ]);
    t.row([
        "curr_items sender after".to_string(),
        thousands(o.items_a as f64),
    ]);
    t.row([
        "curr_items receiver after".to_string(),
        thousands(o.items_b as f64),
    ]);
    t.row([
        "RSS MiB sender / receiver after".to_string(),
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

/// One row per hand-off, in the order they ran, and each setting's median against the
/// first setting's.
fn render_summary(outcomes: &[Outcome]) -> String {
    let mut t = Table::new([
        "run",
        "in flight",
        "direction",
        "elapsed s",
        "MB/s",
        "keys/s",
        "CPU s sender",
        "CPU s receiver",
        "minor faults sender / receiver",
    ]);
    for (i, o) in outcomes.iter().enumerate() {
        t.row([
            (i + 1).to_string(),
            kib_setting(o.in_flight_kib),
            o.direction.clone(),
            format!("{:.2}", o.elapsed.as_secs_f64()),
            format!(
                "{:.1}",
                per_sec(o.status.bytes_moved as f64 / 1e6, o.elapsed)
            ),
            thousands(per_sec(o.status.keys_moved as f64, o.elapsed)),
            o.cpu_a.render(),
            o.cpu_b.render(),
            format!(
                "{} / {}",
                thousands(o.cpu_a.minor_faults as f64),
                thousands(o.cpu_b.minor_faults as f64)
            ),
        ]);
    }
    let mut out = format!("\nside by side\n{}", t.render());
    let mut settings: Vec<Option<usize>> = Vec::new();
    for o in outcomes {
        if !settings.contains(&o.in_flight_kib) {
            settings.push(o.in_flight_kib);
        }
    }
    let median = |s: Option<usize>| {
        let mut rates: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.in_flight_kib == s)
            .map(|o| per_sec(o.status.keys_moved as f64, o.elapsed))
            .collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let base = median(settings[0]);
    for s in &settings {
        out.push_str(&format!(
            "in flight {}: median {} keys/s, {:.2}x of in flight {}\n",
            kib_setting(*s),
            thousands(median(*s)),
            median(*s) / base,
            kib_setting(settings[0])
        ));
    }
    out
}
