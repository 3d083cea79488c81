use std::num::NonZeroU32;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use super::*;

const SIZES: [u32; 5] = [1, 2, 3, 8, 100];

/// Keys with their XXH3-64 hash and owner slot for each of `SIZES`.
///
/// Produced by `crds/tests/ring_vectors.py` from the C reference libxxhash and a transcription
/// of the paper's jump hash, not by this crate, and asserted literally so that a change in
/// either hash (a dependency upgrade, a "harmless" refactor) fails here. The keys cover every
/// XXH3 length class: 0, 1-3, 4-8, 9-16, 17-128, 129-240 and over 240 bytes.
#[rustfmt::skip]
fn vectors() -> Vec<(Vec<u8>, u64, [u32; 5])> {
    vec![
        (b"".to_vec(), 0x2d06_8005_38d3_94c2, [0, 0, 0, 0, 52]),
        (b"a".to_vec(), 0xe6c6_32b6_1e96_4e1f, [0, 1, 1, 1, 14]),
        (b"foo".to_vec(), 0xab6e_5f64_077e_7d8a, [0, 1, 2, 2, 37]),
        (b"key:1".to_vec(), 0xbf2d_6d6b_8270_d37a, [0, 1, 1, 1, 99]),
        (b"key:2".to_vec(), 0xcccb_71f9_abe5_4869, [0, 1, 1, 7, 59]),
        (b"user:42".to_vec(), 0x9fc1_e605_fa71_74aa, [0, 1, 1, 1, 25]),
        (b"hello world".to_vec(), 0xd447_b1ea_40e6_988b, [0, 0, 0, 4, 97]),
        (b"image:cat.jpg".to_vec(), 0xbaea_d8fc_d71e_77c4, [0, 1, 1, 3, 9]),
        ("ключ-😀".as_bytes().to_vec(), 0xeb01_4371_f488_b034, [0, 0, 2, 2, 2]),
        // Binary: NUL, high bytes, CR LF and space, none of which the ring treats specially.
        (b"\x00\xff\x7f\x80\r\n \x00".to_vec(), 0x6b90_9db8_41b3_3e6b, [0, 0, 2, 2, 9]),
        (
            b"session:0123456789abcdef0123456789abcdef".to_vec(),
            0xb0a7_1133_9496_e8f9,
            [0, 0, 0, 7, 97],
        ),
        (
            b"abcdefghijklmnopqrstuvwxyz".repeat(8)[..200].to_vec(),
            0xe12d_ae8f_fe57_bbc9,
            [0, 1, 1, 3, 52],
        ),
        // The longest key memcached accepts.
        (b"0123456789".repeat(25), 0xbaa8_0fc0_0b9b_7d9e, [0, 0, 0, 3, 87]),
    ]
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn addresses(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("10.0.0.{i}:11211")).collect()
}

fn ring(n: u32) -> Ring {
    Ring::from_addresses(1, addresses(0..n)).unwrap()
}

/// Keys shaped like an application's (`user:{i}:avatar`) and random binary keys of 1 to 250
/// bytes, alternating, from a fixed seed.
fn for_each_sample_key(count: usize, seed: u64, mut f: impl FnMut(&[u8])) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = [0u8; 250];
    for i in 0..count {
        if i % 2 == 0 {
            f(format!("user:{i}:avatar").as_bytes());
        } else {
            let len = rng.random_range(1..=250);
            rng.fill_bytes(&mut buf[..len]);
            f(&buf[..len]);
        }
    }
}

fn sample_keys(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut keys = Vec::with_capacity(count);
    for_each_sample_key(count, seed, |key| keys.push(key.to_vec()));
    keys
}

fn sample_hashes(count: usize, seed: u64) -> Vec<u64> {
    let mut hashes = Vec::with_capacity(count);
    for_each_sample_key(count, seed, |key| hashes.push(key_hash(key)));
    hashes
}

// --- The hash contract --------------------------------------------------------------------

#[test]
fn test_vectors_match_the_reference_implementation() {
    let vectors = vectors();
    assert!(vectors.len() >= 10);
    assert!(vectors.iter().any(|(key, _, _)| key.is_empty()));
    assert!(vectors.iter().any(|(key, _, _)| key.len() == 250));
    for (key, hash, owners) in &vectors {
        assert_eq!(key_hash(key), *hash, "xxh3_64 of {key:?}");
        for (n, owner) in SIZES.into_iter().zip(owners) {
            assert_eq!(
                slot_for(key, n),
                Some(*owner),
                "owner of {key:?} among {n} slots"
            );
            assert_eq!(jump_consistent_hash(*hash, nz(n)), *owner);
            let ring = ring(n);
            assert_eq!(ring.owner_slot(key), Some(*owner));
            assert_eq!(ring.owner(key).map(|m| m.slot), Some(*owner));
        }
    }
}

#[test]
fn jump_hash_matches_published_vectors() {
    // The first three are the jump-consistent-hash crate's documented examples; the others
    // come from crds/tests/ring_vectors.py and exercise an all-ones key and the largest n.
    assert_eq!(jump_consistent_hash(0, nz(60)), 0);
    assert_eq!(jump_consistent_hash(1, nz(60)), 55);
    assert_eq!(jump_consistent_hash(2, nz(60)), 46);
    assert_eq!(jump_consistent_hash(u64::MAX, nz(1000)), 313);
    assert_eq!(
        jump_consistent_hash(0xdead_beef, nz(u32::MAX)),
        1_452_406_526
    );
}

#[test]
fn jump_hash_wraps_where_the_lcg_product_is_u64_max() {
    // 0x201997f8666313ab * JUMP_LCG_MULTIPLIER = u64::MAX (mod 2^64), so the LCG's `+ 1` wraps
    // to 0; the reference gives slot 0. The jump-consistent-hash crate panics here in builds
    // with overflow checks.
    let key = 0x2019_97f8_6663_13ab_u64;
    assert_eq!(key.wrapping_mul(JUMP_LCG_MULTIPLIER), u64::MAX);
    for n in SIZES {
        assert_eq!(jump_consistent_hash(key, nz(n)), 0);
    }
}

#[test]
fn jump_hash_equals_the_jump_consistent_hash_crate() {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    for i in 0..1_000_000u32 {
        let key: u64 = rng.random();
        // Mostly pool-sized rings, with some across the whole u32 range (long loops, large
        // doubles) to cover the conversions.
        let n: u32 = match i % 4 {
            0 => rng.random_range(1..=16),
            1 | 2 => rng.random_range(1..=1024),
            _ => rng.random_range(1..=u32::MAX),
        };
        assert_eq!(
            jump_consistent_hash(key, nz(n)),
            jump_consistent_hash::hash(key, n as usize),
            "key {key:#x}, {n} buckets"
        );
    }
}

#[test]
fn empty_ring_owns_nothing() {
    let empty = Ring::default();
    assert_eq!(slot_for(b"k", 0), None);
    assert_eq!(empty.owner_slot(b"k"), None);
    assert_eq!(empty.owner(b"k"), None);
    assert!(empty.is_empty());
    assert!(moves(0, 1, b"k"));
    assert!(moves(1, 0, b"k"));
    assert!(!moves(0, 0, b"k"));
}

#[test]
fn keys_spread_evenly_over_slots() {
    let hashes = sample_hashes(1_000_000, 1);
    for n in [3u32, 10, 37] {
        let mut counts = vec![0u64; n as usize];
        for &h in &hashes {
            counts[jump_consistent_hash(h, nz(n)) as usize] += 1;
        }
        let expected = hashes.len() as f64 / f64::from(n);
        for (slot, &count) in counts.iter().enumerate() {
            let error = (count as f64 - expected).abs() / expected;
            assert!(
                error < 0.03,
                "slot {slot} of {n} holds {count} keys, expected ~{expected}"
            );
        }
    }
}

// --- Resizes move only what they must -----------------------------------------------------

#[test]
fn grow_by_one_moves_one_in_n_plus_one_keys_all_to_the_new_slot() {
    // 2M keys: at n = 99 the moved fraction's standard deviation is 0.7% of 1/100, so the 3%
    // bound sits four deviations out; at smaller n it is looser still.
    const KEYS: usize = 2_000_000;
    let sizes = [1u32, 2, 3, 4, 5, 7, 8, 9, 15, 16, 31, 50, 99];
    let mut moved = [0u64; 13];
    for_each_sample_key(KEYS, 2, |key| {
        for (n, moved) in sizes.iter().zip(&mut moved) {
            let before = slot_for(key, *n);
            let after = slot_for(key, n + 1);
            if before != after {
                assert_eq!(
                    after,
                    Some(*n),
                    "{key:?} moved from {before:?} to an old slot"
                );
                *moved += 1;
            }
        }
    });
    for (n, moved) in sizes.into_iter().zip(moved) {
        let fraction = moved as f64 / KEYS as f64;
        let ideal = 1.0 / f64::from(n + 1);
        assert!(
            (fraction - ideal).abs() / ideal <= 0.03,
            "growing {n}->{} moved {fraction:.5} of keys, ideal {ideal:.5}",
            n + 1
        );
    }
}

#[test]
fn grow_moves_keys_only_to_the_added_slots() {
    let before = ring(5);
    let after = before
        .grown(["new-a:11211", "new-b:11211", "new-c:11211"])
        .unwrap();
    assert_eq!(after.len(), 8);
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert_eq!(&after.members()[..5], before.members());
    assert_eq!(after.member(7), Some(&Member::new(7, "new-c:11211")));
    let mut moved = 0;
    for key in sample_keys(100_000, 3) {
        let (old, new) = (before.owner(&key).unwrap(), after.owner(&key).unwrap());
        assert_eq!(moves(5, 8, &key), old.slot != new.slot);
        if old != new {
            assert!(
                new.slot >= 5,
                "{key:?} moved from slot {} to old slot {}",
                old.slot,
                new.slot
            );
            moved += 1;
        }
    }
    // 3 of 8 slots are new: about 37.5% of keys move.
    assert!(
        (35_000..40_000).contains(&moved),
        "{moved} of 100000 keys moved"
    );
}

#[test]
fn shrink_moves_only_keys_of_the_removed_slots() {
    let before = ring(8);
    let after = before.shrunk(3).unwrap();
    assert_eq!(after.len(), 5);
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert_eq!(after.members(), &before.members()[..5]);
    let mut moved = 0;
    for key in sample_keys(100_000, 4) {
        let (old, new) = (before.owner(&key).unwrap(), after.owner(&key).unwrap());
        if old.slot < 5 {
            assert_eq!(old, new, "{key:?} moved off a slot that was kept");
        } else {
            assert!(new.slot < 5);
            moved += 1;
        }
    }
    assert!(
        (35_000..40_000).contains(&moved),
        "{moved} of 100000 keys moved"
    );
}

#[test]
fn replace_keeps_every_key_on_its_slot() {
    let before = ring(6);
    let after = before.replaced(2, "10.0.9.9:11211").unwrap();
    assert_eq!(after.epoch(), before.epoch() + 1);
    assert_eq!(after.member(2), Some(&Member::new(2, "10.0.9.9:11211")));
    for slot in [0, 1, 3, 4, 5] {
        assert_eq!(after.member(slot), before.member(slot));
    }
    for key in sample_keys(50_000, 5) {
        assert_eq!(before.owner_slot(&key), after.owner_slot(&key));
    }
}

// --- Validation ---------------------------------------------------------------------------

#[test]
fn ring_accepts_members_in_any_order_and_keeps_them_in_slot_order() {
    let ring = Ring::new(
        4,
        vec![
            Member::new(2, "c:1"),
            Member::new(0, "a:1"),
            Member::new(1, "b:1"),
        ],
    )
    .unwrap();
    assert_eq!(ring.epoch(), 4);
    let slots: Vec<u32> = ring.members().iter().map(|m| m.slot).collect();
    assert_eq!(slots, [0, 1, 2]);
    assert_eq!(ring.member(1).map(|m| m.address.as_str()), Some("b:1"));
    assert_eq!(ring.member(3), None);
}

#[test]
fn ring_rejects_slots_other_than_zero_to_n_minus_one() {
    let gap = Ring::new(1, vec![Member::new(0, "a:1"), Member::new(2, "c:1")]);
    assert_eq!(
        gap,
        Err(RingError::SlotOutOfRange {
            slot: 2,
            members: 2
        })
    );
    assert_eq!(
        gap.unwrap_err().to_string(),
        "member slot 2 is out of range: a ring of 2 members must use exactly the slots 0..=1"
    );

    let twice = Ring::new(
        1,
        vec![
            Member::new(1, "a:1"),
            Member::new(0, "b:1"),
            Member::new(1, "c:1"),
        ],
    );
    assert_eq!(
        twice,
        Err(RingError::DuplicateSlot {
            slot: 1,
            first: "a:1".into(),
            second: "c:1".into()
        })
    );
    assert_eq!(
        twice.unwrap_err().to_string(),
        "slot 1 is given to two members (\"a:1\" and \"c:1\"); each slot holds one node"
    );
}

#[test]
fn ring_rejects_empty_and_repeated_addresses() {
    let empty = Ring::new(1, vec![Member::new(0, "a:1"), Member::new(1, "")]);
    assert_eq!(empty, Err(RingError::EmptyAddress { slot: 1 }));
    assert_eq!(
        empty.unwrap_err().to_string(),
        "member at slot 1 has an empty address; give its memcached host:port"
    );

    let repeated = Ring::from_addresses(1, ["a:1", "b:1", "a:1"]);
    assert_eq!(
        repeated,
        Err(RingError::DuplicateAddress {
            address: "a:1".into(),
            first: 0,
            second: 2
        })
    );
    assert_eq!(
        repeated.unwrap_err().to_string(),
        "address \"a:1\" is used by slots 0 and 2; each node must appear once"
    );
}

#[test]
fn ring_changes_reject_bad_requests() {
    let ring = ring(3);
    assert!(matches!(
        ring.grown(Vec::<String>::new()),
        Err(RingError::NoChange(_))
    ));
    assert_eq!(
        ring.grown(["10.0.0.1:11211"]),
        Err(RingError::DuplicateAddress {
            address: "10.0.0.1:11211".into(),
            first: 1,
            second: 3
        })
    );
    assert!(matches!(ring.shrunk(0), Err(RingError::NoChange(_))));
    assert_eq!(
        ring.shrunk(4),
        Err(RingError::ShrinkTooFar {
            remove: 4,
            members: 3
        })
    );
    assert!(ring.shrunk(3).unwrap().is_empty());
    assert_eq!(
        ring.replaced(3, "x:1"),
        Err(RingError::NoSuchSlot {
            slot: 3,
            members: 3
        })
    );
    assert!(matches!(
        ring.replaced(0, "10.0.0.0:11211"),
        Err(RingError::NoChange(_))
    ));
    assert_eq!(
        ring.replaced(0, "10.0.0.2:11211"),
        Err(RingError::DuplicateAddress {
            address: "10.0.0.2:11211".into(),
            first: 0,
            second: 2
        })
    );
    assert_eq!(
        ring.replaced(0, ""),
        Err(RingError::EmptyAddress { slot: 0 })
    );

    let last = Ring::from_addresses(u64::MAX, ["a:1"]).unwrap();
    assert_eq!(
        last.grown(["b:1"]),
        Err(RingError::EpochExhausted(u64::MAX))
    );
}

// --- Migration ----------------------------------------------------------------------------

#[test]
fn without_migration_plans_name_only_the_owner() {
    let state = RingState::new(ring(4));
    assert!(!state.is_migrating());
    for key in sample_keys(1_000, 6) {
        let owner = state.current().owner(&key).unwrap();
        assert_eq!(
            state.read_plan(&key),
            Some(ReadPlan {
                owner,
                fallback: None
            })
        );
        assert_eq!(
            state.write_plan(&key),
            Some(WritePlan {
                owner,
                also_delete: None
            })
        );
    }
    assert_eq!(RingState::default().read_plan(b"k"), None);
    assert_eq!(RingState::default().write_plan(b"k"), None);
}

#[test]
fn during_a_grow_moved_keys_read_from_and_delete_on_their_previous_owner() {
    let before = ring(4);
    let mut state = RingState::from(before.clone());
    state
        .begin(before.grown(["10.0.1.0:11211"]).unwrap())
        .unwrap();
    assert!(state.is_migrating());
    assert_eq!(state.previous(), Some(&before));
    let (mut moved, mut stayed) = (0, 0);
    for key in sample_keys(10_000, 7) {
        let read = state.read_plan(&key).unwrap();
        let write = state.write_plan(&key).unwrap();
        assert_eq!(read.owner, state.current().owner(&key).unwrap());
        assert_eq!(write.owner, read.owner);
        if moves(4, 5, &key) {
            let old = before.owner(&key).unwrap();
            assert_eq!(read.owner.slot, 4);
            assert_eq!(read.fallback, Some(old));
            assert_eq!(write.also_delete, Some(old));
            moved += 1;
        } else {
            assert_eq!(read.fallback, None);
            assert_eq!(write.also_delete, None);
            stayed += 1;
        }
    }
    assert!(
        moved > 1_000 && stayed > 1_000,
        "moved {moved}, stayed {stayed}"
    );
}

#[test]
fn during_a_shrink_keys_of_removed_slots_fall_back_to_them() {
    let before = ring(5);
    let mut state = RingState::new(before.clone());
    state.begin(before.shrunk(2).unwrap()).unwrap();
    for key in sample_keys(10_000, 8) {
        let read = state.read_plan(&key).unwrap();
        let write = state.write_plan(&key).unwrap();
        let old = before.owner(&key).unwrap();
        let expected = (old.slot >= 3).then_some(old);
        assert_eq!(read.fallback, expected);
        assert_eq!(write.also_delete, expected);
        assert!(read.owner.slot < 3);
    }
}

#[test]
fn during_a_replacement_the_replaced_slot_falls_back_to_the_old_node() {
    // The slot number is unchanged, but the node is new: its keys are still on the old one.
    let before = ring(3);
    let mut state = RingState::new(before.clone());
    state
        .begin(before.replaced(1, "10.0.2.0:11211").unwrap())
        .unwrap();
    let old = before.member(1).unwrap();
    for key in sample_keys(3_000, 9) {
        let read = state.read_plan(&key).unwrap();
        let write = state.write_plan(&key).unwrap();
        let expected = (read.owner.slot == 1).then_some(old);
        assert_eq!(read.fallback, expected);
        assert_eq!(write.also_delete, expected);
    }
}

#[test]
fn begin_requires_a_higher_epoch_and_no_running_migration() {
    let first = Ring::from_addresses(7, ["a:1"]).unwrap();
    let mut state = RingState::new(first.clone());

    let same_epoch = Ring::from_addresses(7, ["a:1", "b:1"]).unwrap();
    let err = state.begin(same_epoch).unwrap_err();
    assert_eq!(
        err,
        RingError::EpochNotIncreasing {
            current: 7,
            next: 7
        }
    );
    assert_eq!(
        err.to_string(),
        "the next ring's epoch 7 must be greater than the current epoch 7; every ring change \
         increases the epoch"
    );
    assert!(!state.is_migrating(), "a rejected begin changes nothing");

    let second = first.grown(["b:1"]).unwrap();
    state.begin(second.clone()).unwrap();
    let err = state.begin(second.grown(["c:1"]).unwrap()).unwrap_err();
    assert_eq!(err, RingError::MigrationInProgress { from: 7, to: 8 });
    assert_eq!(state.current(), &second);
}

#[test]
fn complete_drops_the_previous_ring() {
    let first = ring(2);
    let mut state = RingState::new(first.clone());
    assert_eq!(state.complete(), None);
    state.begin(first.grown(["x:1"]).unwrap()).unwrap();
    assert_eq!(state.complete(), Some(first));
    assert!(!state.is_migrating());
    for key in sample_keys(1_000, 10) {
        assert_eq!(state.read_plan(&key).unwrap().fallback, None);
    }
    // The next migration can start once the last one is complete.
    let next = state.current().shrunk(1).unwrap();
    state.begin(next).unwrap();
}

// --- JSON ---------------------------------------------------------------------------------

#[test]
fn ring_state_serializes_to_the_operator_api_shape() {
    let mut state = RingState::new(Ring::from_addresses(3, ["a:1"]).unwrap());
    assert_eq!(
        serde_json::to_value(&state).unwrap(),
        json!({"epoch": 3, "members": [{"slot": 0, "address": "a:1"}], "previous": null})
    );
    state
        .begin(state.current().grown(["b:1"]).unwrap())
        .unwrap();
    let value = serde_json::to_value(&state).unwrap();
    assert_eq!(
        value,
        json!({
            "epoch": 4,
            "members": [{"slot": 0, "address": "a:1"}, {"slot": 1, "address": "b:1"}],
            "previous": {"epoch": 3, "members": [{"slot": 0, "address": "a:1"}]}
        })
    );
    assert_eq!(serde_json::from_value::<RingState>(value).unwrap(), state);
}

#[test]
fn deserializing_validates_rings_and_states() {
    let missing_previous: RingState =
        serde_json::from_value(json!({"epoch": 1, "members": [{"slot": 0, "address": "a:1"}]}))
            .unwrap();
    assert_eq!(missing_previous.previous(), None);

    let gap = serde_json::from_value::<Ring>(json!({
        "epoch": 1, "members": [{"slot": 1, "address": "a:1"}]
    }));
    assert!(
        gap.unwrap_err()
            .to_string()
            .contains("member slot 1 is out of range"),
        "a ring with a slot gap must be rejected"
    );

    let bad_previous = serde_json::from_value::<RingState>(json!({
        "epoch": 2, "members": [],
        "previous": {"epoch": 1, "members": [{"slot": 0, "address": ""}]}
    }));
    assert!(
        bad_previous
            .unwrap_err()
            .to_string()
            .contains("empty address")
    );

    let stale_current = serde_json::from_value::<RingState>(json!({
        "epoch": 2, "members": [], "previous": {"epoch": 2, "members": []}
    }));
    assert!(
        stale_current
            .unwrap_err()
            .to_string()
            .contains("must be greater than")
    );
}

#[test]
fn migrating_rebuilds_a_stored_state_and_refuses_a_non_increasing_epoch() {
    let old = Ring::from_addresses(3, ["a:1"]).unwrap();
    let new = old.grown(["b:1"]).unwrap();
    let mut begun = RingState::new(old.clone());
    begun.begin(new.clone()).unwrap();
    assert_eq!(
        RingState::migrating(new.clone(), old.clone()).unwrap(),
        begun
    );
    assert!(matches!(
        RingState::migrating(old, new),
        Err(RingError::EpochNotIncreasing { .. })
    ));
}

#[test]
fn replacing_during_a_migration_keeps_the_previous_ring() {
    let old = Ring::from_addresses(1, ["a:1", "b:1"]).unwrap();
    let mut state = RingState::new(old.clone());
    state.begin(old.grown(["c:1"]).unwrap()).unwrap();
    let replaced = state.replaced(2, "d:1").unwrap();
    assert_eq!(replaced.previous(), Some(&old));
    assert_eq!(replaced.current().epoch(), 3);
    assert_eq!(replaced.current().member(2).unwrap().address, "d:1");
    assert_eq!(replaced.current().member(0).unwrap().address, "a:1");
    // Outside a migration a replacement has no previous ring: the failed node has nothing to hand over.
    let plain = RingState::new(old).replaced(0, "e:1").unwrap();
    assert!(!plain.is_migrating());
}

#[test]
fn completed_state_has_the_same_members_at_the_next_epoch() {
    let old = Ring::from_addresses(4, ["a:1"]).unwrap();
    let mut state = RingState::new(old.clone());
    state.begin(old.grown(["b:1"]).unwrap()).unwrap();
    let done = state.completed().unwrap();
    assert!(!done.is_migrating());
    assert_eq!(done.current().epoch(), 6);
    assert_eq!(done.current().members(), state.current().members());
}
