//! `bench resize` end to end at small sizes: every experiment runs with in-process nodes (a
//! few seconds each) and the shapes that must hold are checked — not the figures, which
//! depend on the machine.
//!
//! - This product loses no hits beyond the pool client's documented rare case (a copy
//!   forward withdrawn in a race, cache-node `client::pool`) and serves nothing stale.
//! - A ring whose new nodes start empty loses the share of keys a grow gives the new nodes
//!   ((m - n) / m, 1/(n+1) for one node), and this product loses none of them.
//! - In experiment 5 the operator's autoscaler settles, while the naive rule (same thresholds,
//!   no memory) flaps on the same replayed series.

use std::sync::Mutex;

use cachepool_bench::keys::KeyDist;
use cachepool_bench::resize::pool::{Design, NodeKind};
use cachepool_bench::resize::{Experiment, Run, Settings, run_experiment, summary};

/// One experiment at a time: they measure, and the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn settings() -> Settings {
    Settings {
        rate: 700.0,
        keys: 3000,
        min_value: 300,
        max_value: 100 << 10,
        read_ratio: 0.9,
        dist: KeyDist::Zipf(0.99),
        secs: 8,
        auto_secs: 24,
        window_secs: 2,
        cooldown_secs: 1,
        seed: 7,
        nodes: NodeKind::InProcess,
    }
}

fn run(exp: Experiment, design: Design) -> anyhow::Result<Run> {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run = rt.block_on(run_experiment(&settings(), exp, design))?;
    eprintln!(
        "{} {}: {}",
        exp.slug(),
        design.name(),
        summary::one_line(&run)
    );
    Ok(run)
}

#[test]
fn cachepool_loses_no_hits_and_serves_nothing_stale_in_any_experiment() {
    for exp in Experiment::ALL {
        let run = run(exp, Design::Product).unwrap();
        let t = summary::totals(&run);
        assert!(t.gets > 1000, "{}: only {} reads", exp.slug(), t.gets);
        assert_eq!(t.stale, 0, "{}: stale reads", exp.slug());
        assert_eq!(t.corrupt, 0, "{}: corrupt reads", exp.slug());
        assert_eq!(t.errors, 0, "{}: request errors", exp.slug());
        // The documented rare case: at most a few per ten thousand reads.
        assert!(
            t.lost * 2000 <= t.gets,
            "{}: {} lost hits in {} reads",
            exp.slug(),
            t.lost,
            t.gets
        );
        if matches!(exp, Experiment::Shrink | Experiment::Grow) {
            let (probes, missed) = summary::probe_loss(&run);
            assert!(probes > 100, "{}: {probes} probes", exp.slug());
            assert!(
                missed * 200 <= probes,
                "{}: {missed} of {probes} first reads after the resize missed",
                exp.slug()
            );
            let r = &run.resizes[0];
            assert!(
                r.keys_moved <= r.ideal + r.ideal / 5 + 50,
                "{}: moved {} keys where jump hash moves {}",
                exp.slug(),
                r.keys_moved,
                r.ideal
            );
        }
        if exp == Experiment::Constant {
            assert!(run.resizes.is_empty());
        }
        if exp == Experiment::AutoGrow {
            assert!(
                run.final_size >= 4,
                "the autoscaler stopped at {} nodes",
                run.final_size
            );
        }
    }
}

#[test]
fn a_new_empty_node_loses_the_share_of_keys_it_takes_over_at_a_grow() {
    let empty = run(Experiment::Grow, Design::Empty).unwrap();
    let (probes, missed) = summary::probe_loss(&empty);
    let share = missed as f64 / probes.max(1) as f64;
    // 1 -> 3 nodes: jump hash gives the two new nodes 2/3 of the keys, and they start empty.
    assert!(probes > 100, "{probes} probes");
    assert!(
        (0.55..0.8).contains(&share),
        "{missed} of {probes} first reads missed"
    );
    assert_eq!(empty.resizes[0].keys_moved, 0);
    let t = summary::totals(&empty);
    assert!(t.lost > 0, "the empty nodes lost no hits");

    let original = run(Experiment::Grow, Design::Original).unwrap();
    let r = &original.resizes[0];
    // Modulo placement moves far more than jump hash does (1 -> 3: every key whose hash mod 3
    // is not 0, against 2/3 for jump hash, from the same keys).
    assert!(
        r.keys_moved > r.ideal / 2,
        "{} moved, ideal {}",
        r.keys_moved,
        r.ideal
    );
}

#[test]
fn the_autoscaler_settles_in_experiment_5_where_the_naive_rule_flaps() {
    let run = run(Experiment::AutoShrink, Design::Product).unwrap();
    for w in &run.windows {
        eprintln!(
            "  t={:5.1} n={} miss={:.3} steady={} {}",
            w.end,
            w.replicas,
            w.miss_rate(),
            w.steady,
            w.decision
        );
    }
    assert!(
        run.resizes.len() <= 2,
        "the autoscaler resized {} times",
        run.resizes.len()
    );
    let (naive, auto) = run.replay.clone().unwrap();
    assert!(!naive.unmeasured && !auto.unmeasured, "{naive:?} {auto:?}");
    assert!(auto.changes <= 2, "replayed autoscaler: {auto:?}");
    assert!(naive.changes >= 6, "replayed naive rule: {naive:?}");
}
