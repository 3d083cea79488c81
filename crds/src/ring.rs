//! The ring: which cache node owns a key, and how ownership changes when the pool resizes.
//!
//! A pool of `n` nodes gives each node a stable **slot** `0..n-1`. The owner of a key is
//! `jump_consistent_hash(xxh3_64(key), n)`: no table, no virtual nodes, nothing to distribute
//! beyond the member list, and any client in any language can compute it from the recipe
//! below. Jump hash (Lamping & Veach, 2014) is chosen because it moves the minimum on a resize
//! *at the top end*: growing `n -> n+1` moves exactly the keys that now belong to the new slot
//! `n` (1/(n+1) of them), and removing the highest slot moves only that slot's keys. So the
//! ring only ever grows and shrinks at the highest slots, and a failed node is replaced in
//! place, keeping its slot ([`Ring::grown`], [`Ring::shrunk`], [`Ring::replaced`]).
//!
//! Everything here is pure: plain data in, decisions out, no I/O. The operator owns the
//! [`RingState`], moves keys between nodes, and serves it to clients as JSON.
//!
//! # Computing the owner of a key (for clients in any language)
//!
//! 1. Hash the key's bytes exactly as sent on the memcached wire (no encoding, no
//!    terminator) with **XXH3 64-bit, seed 0**: `XXH3_64bits(data, len)` in the C reference
//!    library, which equals `XXH3_64bits_withSeed(data, len, 0)`. Not XXH64, not XXH3-128,
//!    not a custom secret.
//! 2. Feed that unsigned 64-bit hash and the member count `n >= 1` to jump consistent hash.
//!    An empty ring (`n = 0`) has no owner.
//! 3. The result is a slot; the member with that slot owns the key, at its `address`
//!    (memcached `host:port`).
//!
//! Jump consistent hash, exactly as in the paper:
//!
//! ```text
//! jump(key: u64, n: integer >= 1) -> slot:
//!     b = -1; j = 0
//!     while j < n:
//!         b = j
//!         key = (key * 2862933555777941757 + 1) mod 2^64      # 64-bit LCG, unsigned, wrapping
//!         j = trunc( double(b + 1) * ( double(2^31) / double((key >> 33) + 1) ) )
//!     return b
//! ```
//!
//! Pitfalls when porting: `key` is an *unsigned* 64-bit integer (Java: `long` with `>>>`;
//! JavaScript: `BigInt` masked to 64 bits; Python: mask with `2**64 - 1`); `>> 33` is a logical
//! shift; the last line is IEEE-754 double arithmetic in that order (divide, then multiply),
//! truncated toward zero. `crds/tests/ring_vectors.py` is a second, independent implementation.
//!
//! # Test vectors
//!
//! | key (bytes)          | xxh3_64 (seed 0)     | n=1 | n=2 | n=3 | n=8 | n=100 |
//! |----------------------|----------------------|-----|-----|-----|-----|-------|
//! | `""` (empty)         | `0x2d06800538d394c2` | 0   | 0   | 0   | 0   | 52    |
//! | `"a"`                | `0xe6c632b61e964e1f` | 0   | 1   | 1   | 1   | 14    |
//! | `"foo"`              | `0xab6e5f64077e7d8a` | 0   | 1   | 2   | 2   | 37    |
//! | `"user:42"`          | `0x9fc1e605fa7174aa` | 0   | 1   | 1   | 1   | 25    |
//! | `"hello world"`      | `0xd447b1ea40e6988b` | 0   | 0   | 0   | 4   | 97    |
//! | `"0123456789"` × 25  | `0xbaa80fc00b9b7d9e` | 0   | 0   | 0   | 3   | 87    |
//!
//! Jump hash alone: `jump(0, 60) = 0`, `jump(1, 60) = 55`, `jump(2, 60) = 46`,
//! `jump(0xffffffffffffffff, 1000) = 313`. The full table (binary, UTF-8, 200- and 250-byte
//! keys) is in the unit tests.
//!
//! # Epochs and migration
//!
//! Every change produces a ring with a higher **epoch**. While keys are being handed from the
//! previous ring's owners to the current ones, the pool is in a [`RingState`] with both rings:
//! clients read from the current owner and, on a miss, from the previous owner (copying a hit
//! forward); they write to the current owner and delete on both ([`RingState::read_plan`],
//! [`RingState::write_plan`]). Copies forward and hand-offs should store with `add`, so that they
//! never overwrite a newer write. When the hand-off is complete the previous ring is dropped
//! ([`RingState::complete`]).
//!
//! On the operator's API the state travels as
//! `{"epoch", "members": [{"slot", "address"}], "previous": {"epoch", "members"} | null}`;
//! deserializing validates it, so a malformed ring never reaches the key-placement code.

use std::collections::HashMap;
use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// The multiplier of jump hash's 64-bit linear congruential generator (from the paper).
pub const JUMP_LCG_MULTIPLIER: u64 = 2_862_933_555_777_941_757;

/// Why a ring, a ring change or a migration step was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A member's slot is not below the member count.
    #[error(
        "member slot {slot} is out of range: a ring of {members} members must use exactly the \
         slots 0..={max}",
        max = members.saturating_sub(1)
    )]
    SlotOutOfRange {
        /// The offending slot.
        slot: u32,
        /// How many members the ring has.
        members: u32,
    },
    /// Two members claim the same slot.
    #[error(
        "slot {slot} is given to two members ({first:?} and {second:?}); each slot holds one node"
    )]
    DuplicateSlot {
        /// The slot claimed twice.
        slot: u32,
        /// Address of the first member with that slot.
        first: String,
        /// Address of the second member with that slot.
        second: String,
    },
    /// A member has an empty address.
    #[error("member at slot {slot} has an empty address; give its memcached host:port")]
    EmptyAddress {
        /// The slot of the member without an address.
        slot: u32,
    },
    /// Two members share an address.
    #[error(
        "address {address:?} is used by slots {first} and {second}; each node must appear once"
    )]
    DuplicateAddress {
        /// The repeated address.
        address: String,
        /// The lower slot using it.
        first: u32,
        /// The higher slot using it.
        second: u32,
    },
    /// More members than 32-bit slot numbers can name.
    #[error("a ring holds at most {max} members, got {got}", max = u32::MAX)]
    TooManyMembers {
        /// How many members were given.
        got: usize,
    },
    /// A change was asked for that changes nothing.
    #[error("{0}")]
    NoChange(&'static str),
    /// A shrink asked to remove more members than the ring has.
    #[error("cannot remove {remove} members from a ring of {members}")]
    ShrinkTooFar {
        /// How many members were to be removed.
        remove: u32,
        /// How many the ring has.
        members: u32,
    },
    /// A replacement named a slot the ring does not have.
    #[error("slot {slot} is not in the ring (it has {members} members, slots 0..{members})")]
    NoSuchSlot {
        /// The slot asked for.
        slot: u32,
        /// How many members the ring has.
        members: u32,
    },
    /// The epoch cannot be advanced any further.
    #[error("ring epoch {0} is the largest possible; it cannot be advanced")]
    EpochExhausted(u64),
    /// A new ring does not have a higher epoch than the one it follows.
    #[error(
        "the next ring's epoch {next} must be greater than the current epoch {current}; \
         every ring change increases the epoch"
    )]
    EpochNotIncreasing {
        /// The epoch of the ring in force.
        current: u64,
        /// The epoch of the ring that was to follow it.
        next: u64,
    },
    /// A migration was started while another is still running.
    #[error(
        "a migration from epoch {from} to epoch {to} is still in progress; complete it before \
         starting another"
    )]
    MigrationInProgress {
        /// Epoch of the previous ring of the running migration.
        from: u64,
        /// Epoch of the current ring of the running migration.
        to: u64,
    },
}

/// One node of the ring: its slot and its memcached `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Stable position of the node, `0..n-1`; the value jump hash returns.
    pub slot: u32,
    /// The node's memcached data address, `host:port`.
    pub address: String,
}

impl Member {
    /// A member at `slot` serving at `address`.
    pub fn new(slot: u32, address: impl Into<String>) -> Self {
        Self {
            slot,
            address: address.into(),
        }
    }
}

/// The key hash of the ring: XXH3 64-bit with seed 0 over the key's bytes.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Lamping & Veach's jump consistent hash: the bucket in `0..buckets` for a 64-bit key.
///
/// Written here rather than taken from the `jump-consistent-hash` crate (a dev-dependency
/// that a test proves this equal to): that crate increments the LCG with a checked `+ 1`, so
/// builds with overflow checks (our dev and test profiles) panic on the one 64-bit value whose
/// product is `u64::MAX`, and a lookup must not panic for any key; it also takes `usize`
/// buckets and answers bucket 0 for zero buckets, where a ring needs "no owner". The function
/// is also the cross-language contract, so it sits beside the pseudocode it must match.
pub fn jump_consistent_hash(mut key: u64, buckets: NonZeroU32) -> u32 {
    let buckets = u64::from(buckets.get());
    // `b` starts at 0 rather than the paper's -1: the loop runs at least once because
    // `buckets >= 1`, so the value is always overwritten and never returned.
    let mut b: u64 = 0;
    let mut j: u64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(JUMP_LCG_MULTIPLIER).wrapping_add(1);
        // Double arithmetic in the paper's order, so every port rounds the same way. The
        // result is at most 2^32 * 2^31 < 2^64, so the cast truncates without saturating.
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as u64;
    }
    // `b` is the last `j` below `buckets`, which is a u32.
    b as u32
}

/// The slot owning `key` in a ring of `n` members, or `None` when `n` is 0.
pub fn slot_for(key: &[u8], n: u32) -> Option<u32> {
    NonZeroU32::new(n).map(|buckets| jump_consistent_hash(key_hash(key), buckets))
}

/// Whether `key` changes slot when a ring of `from_n` members becomes one of `to_n`.
///
/// Going to or from an empty ring counts as a move (the key gains or loses its owner).
pub fn moves(from_n: u32, to_n: u32, key: &[u8]) -> bool {
    slot_for(key, from_n) != slot_for(key, to_n)
}

/// The key → node mapping at one epoch: members in slots `0..n-1`.
///
/// Always valid: every constructor, and deserialization, checks that the slots are exactly
/// `0..n-1` and that addresses are non-empty and distinct. Members are kept in slot order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RingWire")]
pub struct Ring {
    epoch: u64,
    members: Vec<Member>,
}

/// The unchecked JSON form of a ring; `Ring` deserializes through it to validate.
#[derive(Deserialize)]
struct RingWire {
    epoch: u64,
    members: Vec<Member>,
}

impl TryFrom<RingWire> for Ring {
    type Error = RingError;

    fn try_from(wire: RingWire) -> Result<Self, RingError> {
        Ring::new(wire.epoch, wire.members)
    }
}

impl Ring {
    /// A ring at `epoch` with `members` in any order; they are stored in slot order.
    pub fn new(epoch: u64, mut members: Vec<Member>) -> Result<Self, RingError> {
        let n = u32::try_from(members.len())
            .map_err(|_| RingError::TooManyMembers { got: members.len() })?;
        members.sort_by_key(|m| m.slot);
        // Sorted, with every slot below n and no slot twice, means exactly 0..n-1.
        for (i, member) in members.iter().enumerate() {
            if member.slot >= n {
                return Err(RingError::SlotOutOfRange {
                    slot: member.slot,
                    members: n,
                });
            }
            if i > 0 && members[i - 1].slot == member.slot {
                return Err(RingError::DuplicateSlot {
                    slot: member.slot,
                    first: members[i - 1].address.clone(),
                    second: member.address.clone(),
                });
            }
        }
        let mut seen: HashMap<&str, u32> = HashMap::with_capacity(members.len());
        for member in &members {
            if member.address.is_empty() {
                return Err(RingError::EmptyAddress { slot: member.slot });
            }
            if let Some(&first) = seen.get(member.address.as_str()) {
                return Err(RingError::DuplicateAddress {
                    address: member.address.clone(),
                    first,
                    second: member.slot,
                });
            }
            seen.insert(&member.address, member.slot);
        }
        Ok(Self { epoch, members })
    }

    /// A ring at `epoch` whose members take slots `0, 1, ...` in the order given.
    pub fn from_addresses<I, S>(epoch: u64, addresses: I) -> Result<Self, RingError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut members = Vec::new();
        for (slot, address) in (0u32..).zip(addresses) {
            members.push(Member::new(slot, address));
        }
        Self::new(epoch, members)
    }

    /// The epoch of this ring; it increases at every change.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The members, in slot order (`members()[s].slot == s`).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many members the ring has.
    pub fn len(&self) -> u32 {
        // Bounded by `new`, which rejects more than u32::MAX members.
        self.members.len() as u32
    }

    /// Whether the ring has no members (and so no key has an owner).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member at `slot`, if the ring has that slot.
    pub fn member(&self, slot: u32) -> Option<&Member> {
        self.members.get(slot as usize)
    }

    /// The slot owning `key`, or `None` for an empty ring.
    pub fn owner_slot(&self, key: &[u8]) -> Option<u32> {
        slot_for(key, self.len())
    }

    /// The member owning `key`, or `None` for an empty ring.
    pub fn owner(&self, key: &[u8]) -> Option<&Member> {
        self.owner_slot(key).and_then(|slot| self.member(slot))
    }

    /// The next ring with `addresses` added at the next free (highest) slots.
    pub fn grown<I, S>(&self, addresses: I) -> Result<Self, RingError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut members = self.members.clone();
        for (slot, address) in (self.len()..).zip(addresses) {
            members.push(Member::new(slot, address));
        }
        if members.len() == self.members.len() {
            return Err(RingError::NoChange(
                "growing the ring needs at least one address to add",
            ));
        }
        Self::new(self.next_epoch()?, members)
    }

    /// The next ring without its `k` highest slots.
    pub fn shrunk(&self, k: u32) -> Result<Self, RingError> {
        if k == 0 {
            return Err(RingError::NoChange(
                "shrinking the ring needs at least one member to remove",
            ));
        }
        let n = self.len();
        let keep = n.checked_sub(k).ok_or(RingError::ShrinkTooFar {
            remove: k,
            members: n,
        })?;
        let members = self.members[..keep as usize].to_vec();
        Self::new(self.next_epoch()?, members)
    }

    /// The next ring with the node at `slot` replaced by one at `address` (same slot).
    pub fn replaced(&self, slot: u32, address: impl Into<String>) -> Result<Self, RingError> {
        let address = address.into();
        let current = self.member(slot).ok_or(RingError::NoSuchSlot {
            slot,
            members: self.len(),
        })?;
        if current.address == address {
            return Err(RingError::NoChange(
                "the replacement has the same address as the node it replaces",
            ));
        }
        let mut members = self.members.clone();
        members[slot as usize].address = address;
        Self::new(self.next_epoch()?, members)
    }

    fn next_epoch(&self) -> Result<u64, RingError> {
        self.epoch
            .checked_add(1)
            .ok_or(RingError::EpochExhausted(self.epoch))
    }
}

/// Where a client reads a key during (or outside) a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPlan<'a> {
    /// Read here first: the key's owner in the current ring.
    pub owner: &'a Member,
    /// On a miss at `owner`, read here (and copy a hit forward to `owner`): the key's owner in
    /// the previous ring, when a migration is running and that is a different node.
    pub fallback: Option<&'a Member>,
}

/// Where a client writes or deletes a key during (or outside) a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePlan<'a> {
    /// Store (or delete) here: the key's owner in the current ring.
    pub owner: &'a Member,
    /// Also delete here, so a stale copy cannot be read or handed forward: the key's owner in
    /// the previous ring, when a migration is running and that is a different node.
    pub also_delete: Option<&'a Member>,
}

/// The pool's ring, and during a migration the ring it is migrating from.
///
/// Invariant: `previous`, when present, has a lower epoch than `current`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RingStateWire")]
pub struct RingState {
    #[serde(flatten)]
    current: Ring,
    previous: Option<Ring>,
}

/// The unchecked JSON form of a ring state: the current ring's fields at the top level.
#[derive(Deserialize)]
struct RingStateWire {
    epoch: u64,
    members: Vec<Member>,
    #[serde(default)]
    previous: Option<Ring>,
}

impl TryFrom<RingStateWire> for RingState {
    type Error = RingError;

    fn try_from(wire: RingStateWire) -> Result<Self, RingError> {
        let current = Ring::new(wire.epoch, wire.members)?;
        if let Some(previous) = &wire.previous
            && previous.epoch >= current.epoch
        {
            return Err(RingError::EpochNotIncreasing {
                current: previous.epoch,
                next: current.epoch,
            });
        }
        Ok(Self {
            current,
            previous: wire.previous,
        })
    }
}

impl From<Ring> for RingState {
    fn from(current: Ring) -> Self {
        Self::new(current)
    }
}

impl RingState {
    /// A state with `current` in force and no migration running.
    pub fn new(current: Ring) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// The ring in force: owners for writes and first reads.
    pub fn current(&self) -> &Ring {
        &self.current
    }

    /// The ring being migrated from, while a migration runs.
    pub fn previous(&self) -> Option<&Ring> {
        self.previous.as_ref()
    }

    /// Whether a migration is running.
    pub fn is_migrating(&self) -> bool {
        self.previous.is_some()
    }

    /// Where to read `key`; `None` when the current ring is empty.
    pub fn read_plan(&self, key: &[u8]) -> Option<ReadPlan<'_>> {
        let (owner, fallback) = self.owners(key)?;
        Some(ReadPlan { owner, fallback })
    }

    /// Where to write or delete `key`; `None` when the current ring is empty.
    pub fn write_plan(&self, key: &[u8]) -> Option<WritePlan<'_>> {
        let (owner, also_delete) = self.owners(key)?;
        Some(WritePlan { owner, also_delete })
    }

    /// The current owner, and the previous owner when it is a different node. Nodes are told
    /// apart by address, not slot: a replaced slot keeps its number but is a new node.
    fn owners(&self, key: &[u8]) -> Option<(&Member, Option<&Member>)> {
        let owner = self.current.owner(key)?;
        let previous = self
            .previous
            .as_ref()
            .and_then(|ring| ring.owner(key))
            .filter(|previous| previous.address != owner.address);
        Some((owner, previous))
    }

    /// Start migrating to `next`: it becomes current and the current ring becomes previous.
    ///
    /// Fails if `next` does not have a higher epoch, or if a migration is still running
    /// (dropping its previous ring would strand the keys not yet handed off).
    pub fn begin(&mut self, next: Ring) -> Result<(), RingError> {
        if let Some(previous) = &self.previous {
            return Err(RingError::MigrationInProgress {
                from: previous.epoch,
                to: self.current.epoch,
            });
        }
        if next.epoch <= self.current.epoch {
            return Err(RingError::EpochNotIncreasing {
                current: self.current.epoch,
                next: next.epoch,
            });
        }
        self.previous = Some(std::mem::replace(&mut self.current, next));
        Ok(())
    }

    /// A state in the middle of a migration from `previous` to `current`, as read back from a
    /// stored status. Fails unless `previous` has the lower epoch.
    pub fn migrating(current: Ring, previous: Ring) -> Result<Self, RingError> {
        if previous.epoch >= current.epoch {
            return Err(RingError::EpochNotIncreasing {
                current: previous.epoch,
                next: current.epoch,
            });
        }
        Ok(Self {
            current,
            previous: Some(previous),
        })
    }

    /// The next state with the node at `slot` of the current ring replaced by one at `address`
    /// (a failed node replaced in place). A running migration keeps its previous ring: keys
    /// still on their way go to the replacement.
    pub fn replaced(&self, slot: u32, address: impl Into<String>) -> Result<Self, RingError> {
        Ok(Self {
            current: self.current.replaced(slot, address)?,
            previous: self.previous.clone(),
        })
    }

    /// The state that ends the running migration, as the operator publishes it: the current
    /// members at the next epoch, without a previous ring. Raising the epoch lets clients that
    /// watch the epoch (the operator's ring long-poll) learn that the fallback ring is gone.
    pub fn completed(&self) -> Result<Self, RingError> {
        Ok(Self::new(Ring::new(
            self.current.next_epoch()?,
            self.current.members.clone(),
        )?))
    }

    /// Finish the migration: drop the previous ring and return it (`None` if none was running).
    pub fn complete(&mut self) -> Option<Ring> {
        self.previous.take()
    }
}

#[cfg(test)]
mod tests;
