//! The operator's grows beside the same ring change made the naive way, for the record. The
//! operator has no switch to skip its hand-off, so the comparison is a `PlainPool` the test
//! builds itself: plain nodes, and clients switched straight to the grown ring (the same jump
//! hash, no previous ring, no hand-off), as a memcached client does when a server is added.
//! Keys stay on their old nodes, so every moved key misses once. (The harness this suite had
//! before the operator ran the resize published the previous ring but skipped the hand-off;
//! the plain pool also has no fallback reads, so its dip is the larger, and the honest, one.)
//!
//! Two figures tell the story. The *window* hit ratio (reads weighted by popularity) dips
//! less than the moved share `1/(n+1)`, because a cache-aside reader refills a hot key on its
//! first miss and Zipf traffic is mostly hot keys; how much less depends on reads per second
//! against the key space. The *cold* hit ratio (the first read of each cached key after the
//! resize, every key weighted alike) shows the moved share itself.

use std::sync::Arc;

use crate::harness::{PlainPool, run};
use crate::load::{self, Checker, Keys, Load, LoadConfig};
use crate::scenario::{self, CAPACITY_MIB, HIT_RATIO_POINTS, Outcome, Scenario};

fn summary(o: &Outcome) -> String {
    let windows: Vec<String> = o
        .since_resize()
        .iter()
        .map(|w| format!("{:.2}", w.hit_pct()))
        .collect();
    format!(
        "steady {:.2} %, windows from the resize on [{}] %, first-read hit ratio {:.2} %",
        o.steady_pct,
        windows.join(", "),
        o.cold_pct()
    )
}

async fn contrast(from: u32, to: u32) {
    let with = scenario::run(Scenario::new(from, to)).await;
    let without = scenario::run(Scenario::new(from, to).without_handoff()).await;
    let theory = 100.0 * scenario::expected_share(from, to);
    println!("== grow {from}->{to}: moved share {theory:.2} %");
    println!("   the operator:                 {}", summary(&with));
    println!("   plain nodes, no hand-off:     {}", summary(&without));

    for o in [&with, &without] {
        assert_eq!(o.verdict.stale, 0, "stale reads: {:?}", o.verdict.samples);
        assert_eq!(
            o.verdict.corrupt, 0,
            "corrupt reads: {:?}",
            o.verdict.samples
        );
    }
    let cold_drop = 100.0 - without.cold_pct();
    assert!(
        cold_drop >= theory / 2.0,
        "without hand-off the first reads of cached keys lost {cold_drop:.2} %, expected at least \
         half the moved share {theory:.2} %"
    );
    assert!(
        100.0 - with.cold_pct() <= HIT_RATIO_POINTS,
        "with hand-off the first reads of cached keys lost {:.2} %",
        100.0 - with.cold_pct()
    );
    let window_drop = without.steady_pct - without.min_pct();
    assert!(
        window_drop > 2.0 * HIT_RATIO_POINTS,
        "without hand-off the lowest window is only {window_drop:.2} points below steady"
    );
}

#[test]
fn grow_1_to_2_without_handoff_loses_the_moved_half_of_the_cached_keys() {
    run(contrast(1, 2));
}

#[test]
fn grow_2_to_3_without_handoff_loses_the_moved_third_of_the_cached_keys() {
    run(contrast(2, 3));
}

/// The checker can fail: grow 1 -> 2 and shrink back, both without hand-off (a plain pool),
/// while writers update keys. Keys written on slot 1 during the two-node spell still have
/// their older versions on slot 0, which serves them again after the shrink: stale reads, and
/// the checker must count them.
#[test]
fn skipping_the_handoff_there_and_back_serves_stale_values_that_the_checker_catches() {
    run(async {
        let mut pool = PlainPool::start(1, CAPACITY_MIB).await;
        let checker = Arc::new(Checker::new(Keys::new(20_000, 64, 384)));
        assert_eq!(load::prefill(pool.client(), checker.clone(), 16).await, 0);
        let load = Load::start(pool.client(), checker.clone(), LoadConfig::default());
        load.until_window(1).await;
        pool.resize_to(2).await;
        load.until_window(2).await;
        pool.resize_to(1).await;
        load.stop_at(3).await;
        let verdict = checker.verdict();
        println!(
            "== grow 1->2 and back without hand-off: {} stale reads of {}",
            verdict.stale, verdict.reads
        );
        for sample in verdict
            .samples
            .iter()
            .filter(|s| s.starts_with("STALE"))
            .take(3)
        {
            println!("   ! {sample}");
        }
        assert!(
            verdict.stale > 0,
            "the checker saw no stale read where there must be some"
        );
        pool.shutdown().await;
    });
}
