//! Shrinking under load: every window keeps the steady hit ratio, only the removed slots' keys
//! move, the removed nodes end empty, no read is stale, and the pool ends clean.

use crate::harness::run;
use crate::scenario::{self, Scenario, assert_lossless};

async fn shrink(from: u32, to: u32) {
    let outcome = scenario::run(Scenario::new(from, to)).await;
    assert_lossless(&outcome);
}

#[test]
fn shrink_4_to_3_under_load_keeps_hit_ratio_and_moves_only_the_removed_nodes_keys() {
    run(shrink(4, 3));
}

#[test]
fn shrink_3_to_1_under_load_keeps_hit_ratio_and_moves_only_the_removed_nodes_keys() {
    run(shrink(3, 1));
}
