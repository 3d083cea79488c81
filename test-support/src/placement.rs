//! Where a pool's keys are: what each node's store holds, read in-process, and which of those
//! keys sit on a slot that does not own them. The "every key on its owner and only there"
//! check of the resize suite (`operator/tests/resize`) and of the EC2 tests
//! (`operator/tests/ec2.rs`), whose nodes run inside the test process.
//!
//! The owner is a function rather than a ring so that this crate needs no ring type: callers
//! pass `|key| ring.owner_slot(key)`.

use std::collections::HashMap;

use cache_node::server::Shared;

/// What one node holds: key -> value.
pub type Items = HashMap<Vec<u8>, Vec<u8>>;

/// Every item a node's store holds.
pub fn items(shared: &Shared) -> Items {
    let mut out = HashMap::new();
    shared.store.for_each(|item| {
        out.insert(item.key().to_vec(), item.value().to_vec());
    });
    out
}

/// The keys held by a slot other than their owner's, each described as `key on slot S, owner
/// O`; empty when every key is on its owner. `slots` pairs each slot with what it holds.
pub fn misplaced<'a>(
    slots: impl IntoIterator<Item = (u32, &'a Items)>,
    owner: impl Fn(&[u8]) -> Option<u32>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (slot, held) in slots {
        for key in held.keys() {
            let owner = owner(key);
            if owner != Some(slot) {
                out.push(format!(
                    "{} on slot {slot}, owner {owner:?}",
                    String::from_utf8_lossy(key)
                ));
            }
        }
    }
    out
}
