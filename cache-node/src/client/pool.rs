//! [`PoolClient`]: requests routed by the ring, including while keys migrate.
//!
//! # Routing
//!
//! Each key goes to its owner in the current ring (`cachepool_crds::RingState::read_plan` and
//! `write_plan`). While a migration runs, the key's owner in the previous ring (when it is a
//! different node) is also involved:
//!
//! - **get**: read the current owner. On a miss, or if the owner fails, read the previous
//!   owner with `mg v f t c`; on a hit there, copy the item forward to the current owner with
//!   `add` (flags kept, expiry set to the remaining TTL, 0 for items that never expire), check
//!   the previous owner again (below), and return the value.
//! - **set**: delete on the previous owner, then set on the current owner.
//! - **delete**: delete on the previous owner, then on the current owner. True if either had it.
//! - **add**: first pull the key forward from the previous owner as a get does, then `add` on
//!   the current owner, so `add` still means "only if the pool does not hold the key" (the
//!   first-writer-wins uses of `add` survive a resize).
//!
//! A node that is down or slow is a miss for a read (after at most one request timeout per
//! node asked) and an error for a write: a write is acknowledged only when every step of it
//! succeeded, so an error means "possibly not applied", never "applied and stale elsewhere".
//!
//! # The copy-forward race and how it is narrowed
//!
//! Client A misses on the current owner `N` and reads `v1` from the previous owner `P`.
//! Before A's `add` reaches `N`, client B deletes the key on both nodes. A's `add` then finds
//! `N` empty and stores `v1`: a value B's acknowledged delete removed is back. (`add` already
//! protects a *set* racing a copy-forward: B's newer value on `N` makes A's `add` answer
//! `NOT_STORED`. Only a delete leaves no trace on `N` for `add` to see.)
//!
//! Two rules together turn the permanent resurrection into a short window:
//!
//! 1. Writers touch `P` before `N` (set and delete above). So if B's delete finished before
//!    A's `add` landed, B's delete on `P` also finished before it.
//! 2. After a successful `add`, A asks `P` for the key's CAS (`mg <key> c`). If its CAS
//!    differs from the one A read (it was rewritten there, e.g. by a client still on the old
//!    ring), A deletes its forwarded copy from `N` and returns a miss. If the key is gone from
//!    `P`, or the check fails (`P` stopping as the migration ends), the copy stays: the
//!    node-side hand-off drops
//!    its source once the owner holds the key (A's copy included), and a delete by a client
//!    on the current ring also deletes on `N`, whose tombstone refuses A's `add` (`ms … Z`)
//!    or whose delete lands after it.
//!
//! What remains, stated plainly:
//! - **Window**: between A's `add` landing on `N` and A's corrective delete landing (about
//!   two round trips), a reader of `N` can see `v1` after B's delete was acknowledged. It
//!   requires B's whole delete to fall between A's read of `P` and A's `add`.
//! - **Abandoned check**: if A's future is dropped (caller cancelled, or its request timed
//!   out) between the `add` and the check, or the corrective delete fails, the resurrected
//!   copy stays on `N` until it expires or is evicted or overwritten. Copies forward are not
//!   spawned as separate tasks, so this needs A cancelled mid-copy; the failure is logged.
//! - **Conditional withdrawal**: the corrective delete is conditional (`md <key> C<cas>` on
//!   the copy A stored), so it never removes a newer value a third client set on `N`. (An
//!   earlier version also withdrew when the key was gone from `P`; the hand-off then often
//!   dropped the source because of A's copy, and A withdrew the key's last copy: a lost hit
//!   that the operator's end-to-end resize tests counted at about 0.01–0.03 % of reads.)
//! - **A client on the old ring that deletes on `P` alone** while the key is being copied
//!   forward or handed off is not seen by `N`; that is the stale-ring case below.
//! - **Stale rings**: a client that has not yet learnt the new ring still reads and writes
//!   `P` alone; rule 2 catches its writes that land during a copy-forward, not those after.
//!
//! Closing the window entirely needs tombstones or a conditional `add` on the node; the
//! text protocol's `add` plus a re-check is the cheapest protection it allows.
//!
//! # Tombstones
//!
//! A plain delete leaves a tombstone on the node for 30 s, and copies carried forward (`ms …
//! Z`, by this client or by a node's hand-off) are refused where one lies, so a copy read
//! before a delete cannot land after it. A write lifts the node's tombstone for the key. During
//! a migration copies only ever go *to* current owners, so the deletes this client sends to
//! the previous owner (in `set` and `delete`) leave none (`md <key> Y`): a tombstone there
//! protects nothing, and would refuse the key's newer value if a later resize moved the key
//! back within 30 s — a lost hit the operator's end-to-end resize tests counted (about 50 per
//! million reads). A plain delete on the owner, then within 30 s a resize away, a write on the
//! new owner and a resize back: the hand-off back carries the write's time (`ms … Z W<ms>`),
//! newer than the delete, and the owner takes it. This client's own copies forward carry the
//! write time too: it asks the previous owner for it (`mg … w`, Cachepool's extension) and
//! sends it with the copy (`ms … Z W<ms>`). Without it the copy would be stored as of unknown
//! age, and when a later resize moved the key back to a node that had deleted it before the
//! write, that node's tombstone would refuse the hand-off's copy: an acknowledged write lost
//! (found by the store's property test, `store::proptests`).
//!
//! # Ring changes
//!
//! [`PoolClient::set_ring`] may be called from any task at any time. The routing table (the
//! ring state and a [`NodeClient`] per member) sits behind an `ArcSwap`: a request loads it
//! once (one atomic load) and uses that snapshot to the end, while a swap builds the next
//! table beside it, reusing the `NodeClient` (and its open connections) of every address that
//! stays. Clients of removed nodes close their connections when the last request using them
//! ends. Swaps are serialised by a mutex that readers never touch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use cachepool_crds::ring::{Member, Ring, RingState};
use tracing::{debug, info, warn};

use super::{ClientError, ClientOptions, Held, NodeClient, Result, Value, check_key};

/// Remaining TTLs above this are sent as a Unix time: memcached reads an exptime over 30
/// days as absolute.
const MAX_RELATIVE_EXPTIME: u32 = 60 * 60 * 24 * 30;

/// A client of the whole pool: routes each key to its node by the ring.
///
/// Share it (`Arc<PoolClient>`) between tasks; every method takes `&self`.
#[derive(Debug)]
pub struct PoolClient {
    routing: ArcSwap<Routing>,
    options: ClientOptions,
    /// Serialises `set_ring`, so two swaps cannot both build from the same old table.
    swap: Mutex<()>,
}

/// A ring state and the node clients for its members, indexed by slot.
#[derive(Debug)]
struct Routing {
    state: RingState,
    current: Vec<NodeClient>,
    previous: Vec<NodeClient>,
}

impl Routing {
    fn build(
        state: RingState,
        options: ClientOptions,
        reuse: &HashMap<&str, &NodeClient>,
    ) -> Routing {
        let mut made: HashMap<String, NodeClient> = HashMap::new();
        let mut client = |member: &Member| match reuse.get(member.address.as_str()) {
            Some(&client) => client.clone(),
            None => made
                .entry(member.address.clone())
                .or_insert_with(|| NodeClient::with_valid_options(member.address.clone(), options))
                .clone(),
        };
        let current = state.current().members().iter().map(&mut client).collect();
        let previous = state
            .previous()
            .map(|ring| ring.members().iter().map(&mut client).collect())
            .unwrap_or_default();
        Routing {
            state,
            current,
            previous,
        }
    }

    fn by_address(&self) -> HashMap<&str, &NodeClient> {
        self.current
            .iter()
            .chain(&self.previous)
            .map(|client| (client.addr(), client))
            .collect()
    }

    /// The current owner's client and, during a migration, the previous owner's.
    fn route(&self, key: &[u8]) -> Option<(&NodeClient, Option<&NodeClient>)> {
        // `read_plan` and `write_plan` name the same nodes; members index by slot.
        let plan = self.state.read_plan(key)?;
        let owner = self.current.get(plan.owner.slot as usize)?;
        let previous = plan
            .fallback
            .and_then(|member| self.previous.get(member.slot as usize));
        Some((owner, previous))
    }
}

/// What a copy forward came to.
#[derive(Debug)]
enum Forward {
    /// Stored on the current owner and confirmed still current on the previous one.
    Stored,
    /// The current owner already held the key (a newer write, or another copy).
    AlreadyThere,
    /// The previous owner's copy was rewritten meanwhile: the copy was deleted again.
    Withdrawn,
    /// The re-check failed: the copy stays (the value read was current when read).
    Unconfirmed,
    /// Not copied: the item expires within the second.
    Expiring,
    /// The current owner failed to take the copy.
    Failed(ClientError),
}

impl PoolClient {
    /// A client routing by `state`.
    pub fn new(state: RingState, options: ClientOptions) -> Result<PoolClient> {
        options.validate()?;
        let routing = Routing::build(state, options, &HashMap::new());
        Ok(PoolClient {
            routing: ArcSwap::from_pointee(routing),
            options,
            swap: Mutex::new(()),
        })
    }

    /// A client for a pool with no migration running.
    pub fn from_ring(ring: Ring, options: ClientOptions) -> Result<PoolClient> {
        Self::new(RingState::new(ring), options)
    }

    /// The ring state requests are routed by.
    pub fn ring(&self) -> RingState {
        self.routing.load().state.clone()
    }

    /// Routes by `state` from now on; requests already running finish on the ring they
    /// started with. Keeps the connections of nodes that stay in the pool.
    ///
    /// A state whose current epoch is lower than the one in force is ignored (an update that
    /// arrived late) and `false` returned. An equal epoch is applied: that is how a migration
    /// completes (the same ring without its previous one).
    pub fn set_ring(&self, state: RingState) -> bool {
        let _swap = self.swap.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.routing.load_full();
        let (old_epoch, new_epoch) = (old.state.current().epoch(), state.current().epoch());
        if new_epoch < old_epoch {
            debug!(
                old_epoch,
                new_epoch, "ignoring a ring older than the one in force"
            );
            return false;
        }
        let next = Routing::build(state, self.options, &old.by_address());
        info!(
            epoch = new_epoch,
            members = next.current.len(),
            migrating_from = next.state.previous().map(Ring::epoch),
            "pool client ring updated"
        );
        self.routing.store(Arc::new(next));
        true
    }

    /// The value of `key`, or `None` on a miss. A node that fails or times out counts as a
    /// miss (and is logged); only an invalid key is an error.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        let key = check_key(key.as_ref())?;
        let routing = self.routing.load_full();
        let Some((owner, previous)) = routing.route(key) else {
            return Ok(None);
        };
        let owner_ok = match owner.get(key).await {
            Ok(Some(value)) => return Ok(Some(value)),
            Ok(None) => true,
            Err(err) => {
                debug!(node = owner.addr(), %err, "get failed; counted as a miss");
                false
            }
        };
        let Some(previous) = previous else {
            return Ok(None);
        };
        let held = match previous.get_held(key).await {
            Ok(Some(hit)) => hit,
            // Missed on both: the key may have been handed from the previous owner to the
            // current one between our two reads (the hand-off stores on the owner before it
            // drops its copy), so the owner is asked once more. Without this, a resize loses
            // hits it should not (DESIGN.md: "a resize adds no misses").
            Ok(None) if owner_ok => return Ok(reread(owner, key).await),
            Ok(None) => return Ok(None),
            Err(err) => {
                debug!(node = previous.addr(), %err, "get from the previous owner failed; counted as a miss");
                return Ok(None);
            }
        };
        if !owner_ok {
            // The owner just failed: a copy would most likely fail too, after another timeout.
            return Ok(Some(held.value));
        }
        match copy_forward(key, owner, previous, &held).await {
            // A newer write or delete reached the owner meanwhile: it has the answer.
            Forward::Withdrawn => Ok(reread(owner, key).await),
            Forward::Failed(err) => {
                debug!(node = owner.addr(), %err, "copy forward failed");
                Ok(Some(held.value))
            }
            Forward::Stored | Forward::AlreadyThere | Forward::Unconfirmed | Forward::Expiring => {
                Ok(Some(held.value))
            }
        }
    }

    /// Stores `data` under `key` on its owner (during a migration, after deleting the
    /// previous owner's copy). `exptime` follows memcached (0 never, up to 30 days relative,
    /// else a Unix time).
    pub async fn set(
        &self,
        key: impl AsRef<[u8]>,
        data: &[u8],
        flags: u32,
        exptime: u32,
    ) -> Result<()> {
        let key = check_key(key.as_ref())?;
        let routing = self.routing.load_full();
        let (owner, previous) = routing.route(key).ok_or(ClientError::EmptyRing)?;
        if let Some(previous) = previous {
            // No tombstone on the previous owner (see "Tombstones" above).
            previous.delete_without_tombstone(key).await?;
        }
        owner.set(key, data, flags, exptime).await
    }

    /// Stores `data` under `key` only if the pool does not hold the key; true if stored.
    /// During a migration a copy on the previous owner counts (it is pulled forward first).
    pub async fn add(
        &self,
        key: impl AsRef<[u8]>,
        data: &[u8],
        flags: u32,
        exptime: u32,
    ) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        let routing = self.routing.load_full();
        let (owner, previous) = routing.route(key).ok_or(ClientError::EmptyRing)?;
        if let Some(previous) = previous
            && let Some(held) = previous.get_held(key).await?
        {
            match copy_forward(key, owner, previous, &held).await {
                // Now on the owner, where `add` below finds it.
                Forward::Stored | Forward::AlreadyThere => {}
                // Gone from the pool after all.
                Forward::Withdrawn => {}
                // Held by the pool, so not absent.
                Forward::Unconfirmed | Forward::Expiring => return Ok(false),
                Forward::Failed(err) => return Err(err),
            }
        }
        owner.add(key, data, flags, exptime).await
    }

    /// Deletes `key` from its owner and, during a migration, first from the previous owner.
    /// True if any of them held it.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = check_key(key.as_ref())?;
        let routing = self.routing.load_full();
        let (owner, previous) = routing.route(key).ok_or(ClientError::EmptyRing)?;
        let mut found = false;
        if let Some(previous) = previous {
            // The owner's tombstone stops copies carried to it; the previous owner gets none
            // (see "Tombstones" above).
            found |= previous.delete_without_tombstone(key).await?;
        }
        found |= owner.delete(key).await?;
        Ok(found)
    }

    /// Empties every node of the current and (during a migration) previous ring. Tries every
    /// node, then reports the first failure.
    pub async fn flush_all(&self) -> Result<()> {
        let routing = self.routing.load_full();
        let nodes = routing.by_address();
        let mut first_error = None;
        for node in nodes.values() {
            if let Err(err) = node.flush_all().await {
                warn!(node = node.addr(), %err, "flush_all failed");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A second read of the current owner during a migration; a failure is a miss.
async fn reread(owner: &NodeClient, key: &[u8]) -> Option<Value> {
    match owner.get(key).await {
        Ok(value) => value,
        Err(err) => {
            debug!(node = owner.addr(), %err, "second read of the owner failed; counted as a miss");
            None
        }
    }
}

/// Copies `held`, read from `previous`, to `owner` with an add that keeps its write time
/// (so a tombstone judges the copy by the write it carries, not by the copy), then checks that
/// `previous` still holds the same item (CAS unchanged) and withdraws the copy if not. See the
/// module documentation for why.
async fn copy_forward(
    key: &[u8],
    owner: &NodeClient,
    previous: &NodeClient,
    held: &Held,
) -> Forward {
    let Some(exptime) = exptime_for_remaining(held.ttl, unix_now()) else {
        return Forward::Expiring;
    };
    let value = &held.value;
    let copy_cas = match owner
        .add_copy(key, &value.data, value.flags, exptime, held.written_ms)
        .await
    {
        Ok(Some(cas)) => cas,
        Ok(None) => return Forward::AlreadyThere,
        Err(err) => return Forward::Failed(err),
    };
    let recheck = previous.cas_of(key).await;
    match recheck {
        Ok(Some(cas)) if cas == value.cas => return Forward::Stored,
        // Gone from the previous owner: most often the node's hand-off found our copy on the
        // owner and dropped its source, and the copy is the key's only home now. A delete by a
        // client on the current ring cannot be behind it: such a delete reaches the owner too,
        // where its tombstone refuses our `add` (`ms … Z`) or removes the copy after it.
        Ok(None) => return Forward::Stored,
        // Unknown (the previous owner is stopping as its migration ends, or slow): the copy
        // may be the key's only home already, for the same reason; keep it.
        Err(err) => {
            debug!(node = previous.addr(), %err, "re-check after copy forward failed; copy kept");
            return Forward::Unconfirmed;
        }
        Ok(Some(_)) => {}
    }
    // Withdraw our copy only (`md … C<cas>`): a value a client set on the owner since is
    // newer and stays.
    if let Err(err) = owner.delete_if_cas(key, copy_cas).await {
        warn!(
            node = owner.addr(), %err,
            "could not withdraw a copied-forward item whose source changed; it stays until it \
             expires or is overwritten"
        );
    }
    // The source was rewritten after we read it: report a miss.
    Forward::Withdrawn
}

/// The exptime that gives a copy `ttl` seconds to live (`None` ttl: never expires). `None`
/// when the item expires within the current second and is not worth copying.
fn exptime_for_remaining(ttl: Option<u32>, now: u32) -> Option<u32> {
    match ttl {
        None => Some(0),
        Some(0) => None,
        Some(ttl) if ttl <= MAX_RELATIVE_EXPTIME => Some(ttl),
        Some(ttl) => now.checked_add(ttl).filter(|&t| t <= super::MAX_EXPTIME),
    }
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_ttl_becomes_an_exptime_the_protocol_reads_the_same_way() {
        let now = 1_700_000_000;
        assert_eq!(exptime_for_remaining(None, now), Some(0));
        assert_eq!(exptime_for_remaining(Some(0), now), None);
        assert_eq!(exptime_for_remaining(Some(5), now), Some(5));
        assert_eq!(
            exptime_for_remaining(Some(MAX_RELATIVE_EXPTIME), now),
            Some(MAX_RELATIVE_EXPTIME)
        );
        let long = MAX_RELATIVE_EXPTIME + 1;
        assert_eq!(exptime_for_remaining(Some(long), now), Some(now + long));
        assert_eq!(exptime_for_remaining(Some(u32::MAX - 10), now), None);
    }

    #[test]
    fn routes_to_ring_owner_and_previous_owner_by_slot() {
        let options = ClientOptions::default();
        let old = Ring::from_addresses(1, ["a:1", "b:1"]).unwrap();
        let new = old.grown(["c:1"]).unwrap();
        let mut state = RingState::new(old);
        state.begin(new).unwrap();
        let routing = Routing::build(state.clone(), options, &HashMap::new());
        let mut moved = 0;
        for i in 0..300 {
            let key = format!("key-{i}");
            let plan = state.read_plan(key.as_bytes()).unwrap();
            let (owner, previous) = routing.route(key.as_bytes()).unwrap();
            assert_eq!(owner.addr(), plan.owner.address);
            assert_eq!(
                previous.map(NodeClient::addr),
                plan.fallback.map(|m| m.address.as_str())
            );
            moved += usize::from(previous.is_some());
        }
        assert!(
            moved > 50 && moved < 150,
            "about a third of the keys move, got {moved}"
        );
    }

    #[test]
    fn a_swap_keeps_the_clients_of_addresses_that_stay() {
        let options = ClientOptions::default();
        let old = Ring::from_addresses(1, ["a:1", "b:1"]).unwrap();
        let first = Routing::build(RingState::new(old.clone()), options, &HashMap::new());
        let second = Routing::build(
            RingState::new(old.shrunk(1).unwrap()),
            options,
            &first.by_address(),
        );
        assert_eq!(second.current.len(), 1);
        assert_eq!(second.current[0].addr(), "a:1");
        assert!(second.current[0].same_pool(&first.current[0]));
    }
}
