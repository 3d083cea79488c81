//! Growing under load: every window keeps the steady hit ratio, exactly the new slots' share
//! of the keys moves and only to the new slots, no read is stale, and the pool ends clean.

use crate::harness::run;
use crate::scenario::{self, Scenario, assert_lossless};

async fn grow(from: u32, to: u32) {
    let outcome = scenario::run(Scenario::new(from, to)).await;
    assert_lossless(&outcome);
}

#[test]
fn grow_1_to_2_under_load_keeps_hit_ratio_and_moves_half_the_keys_to_the_new_node() {
    run(grow(1, 2));
}

#[test]
fn grow_2_to_3_under_load_keeps_hit_ratio_and_moves_a_third_of_the_keys_to_the_new_node() {
    run(grow(2, 3));
}

#[test]
fn grow_3_to_4_under_load_keeps_hit_ratio_and_moves_a_quarter_of_the_keys_to_the_new_node() {
    run(grow(3, 4));
}

#[test]
fn grow_4_to_8_under_load_keeps_hit_ratio_and_moves_half_the_keys_to_the_new_nodes() {
    run(grow(4, 8));
}

/// DESIGN.md: "a resize adds no misses for keys that were cached before it". Values of 1 to
/// 3 KiB make the hand-off several batches long, so readers copying keys forward meet it.
/// An unexplained miss is a key the pool held, acknowledged and untouched, that a read then
/// missed (see `load`).
#[test]
fn grow_adds_no_misses_for_keys_cached_before_it() {
    run(async {
        let outcome = scenario::run(Scenario {
            pad: (1024, 2048),
            ..Scenario::new(1, 2)
        })
        .await;
        assert_eq!(
            outcome.verdict.stale, 0,
            "stale reads: {:?}",
            outcome.verdict.samples
        );
        assert_eq!(
            outcome.verdict.unexplained_misses, 0,
            "the resize lost cached keys: {:#?}",
            outcome.verdict.samples
        );
    });
}
