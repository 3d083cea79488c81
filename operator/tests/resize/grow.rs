//! Growing under load: every window keeps the steady hit ratio, exactly the new slots' share
//! of the keys moves and only to the new slots, no read is stale, and the pool ends clean.

use std::sync::Arc;

use crate::harness::{Pool, run};
use crate::load::{self, Checker, Keys};
use crate::scenario::{self, CAPACITY_MIB, Scenario, assert_lossless};

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

/// The operator tells how many keys and bytes a resize moved (`HandoffFinished`: "every key is
/// with its owner (N keys, B bytes moved)"), and that must be what its nodes' hand-offs
/// moved. A grow keeps every participant, so each one's final `GET /handoff` is read after
/// the fact and the sum is exact.
///
/// FAILS at the time of writing (an operator bug, reported rather than fixed here): the
/// driver takes the figures from the status of the round *before* the completing one
/// (`driver/act.rs`, `publish_ring`: `moved` is read from `self.record.status.migration`
/// before the completing round's status replaces it), and that round often saw the hand-offs
/// still counting their foreign keys, so the event says 0 keys, or the part moved by then.
#[test]
fn the_operator_tells_the_keys_and_bytes_its_hand_off_moved() {
    run(async {
        let mut pool = Pool::start(1, CAPACITY_MIB).await;
        let checker = Arc::new(Checker::new(Keys::new(20_000, 64, 384)));
        assert_eq!(load::prefill(pool.client(), checker, 16).await, 0);
        let resize = pool.resize_to(2).await;
        println!("   {}", resize.describe());
        assert!(resize.keys_moved() > 0, "{}", resize.describe());
        assert_eq!(
            (resize.reported_keys, resize.reported_bytes),
            (resize.keys_moved(), resize.bytes_moved()),
            "the operator's HandoffFinished event against its nodes' hand-off statuses"
        );
        pool.shutdown().await;
    });
}
