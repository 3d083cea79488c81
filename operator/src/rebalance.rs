//! Rebalancing: moving a pool from one ring to the next without losing hits.
//!
//! The order is what makes a resize lossless (DESIGN.md, "The ring"):
//! 1. new nodes are started and ready (the caller's job: provider);
//! 2. the new ring is published with the previous one still attached, so clients read the
//!    new owner first and fall back to the old one, and write to the new owner;
//! 3. every node that may hold keys it no longer owns hands them off (`hand_off_all`);
//! 4. the previous ring is dropped, and removed nodes may stop.
//!
//! This module does step 3 against the nodes' admin APIs, through the node's own typed
//! client ([`AdminClient`], re-exported from `cache_node::client`).

use std::time::Duration;

use cache_node::handoff::{HandoffStatus, State};
use cachepool_crds::ring::Ring;
use tracing::info;

pub use cache_node::client::{AdminClient, AdminError};

/// Errors of a hand-off.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("hand-off on {node} failed: {reason}")]
    HandoffFailed { node: String, reason: String },
    #[error("hand-off on {node} did not finish within {0:?}", .timeout)]
    Timeout { node: String, timeout: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One node taking part in a hand-off: its data address (as in the ring) and admin client.
#[derive(Clone, Debug)]
pub struct Participant {
    pub address: String,
    pub admin: AdminClient,
}

/// Options of `hand_off_all`.
#[derive(Clone, Copy, Debug)]
pub struct HandoffOptions {
    pub rate_bytes_per_sec: u64,
    pub poll: Duration,
    pub timeout: Duration,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        HandoffOptions {
            rate_bytes_per_sec: 0,
            poll: Duration::from_millis(50),
            timeout: Duration::from_secs(600),
        }
    }
}

/// Has every participant hand off the keys it does not own under `target`, in parallel, and
/// waits until all are done. Participants are the nodes of the previous ring (a grow moves
/// keys away from them; a shrink empties the removed ones).
pub async fn hand_off_all(
    participants: &[Participant],
    target: &Ring,
    opts: HandoffOptions,
) -> Result<Vec<HandoffStatus>> {
    for p in participants {
        p.admin
            .start_handoff(target, &p.address, opts.rate_bytes_per_sec)
            .await?;
    }
    // The nodes hand off concurrently; waiting for them one after the other costs nothing.
    let mut statuses = Vec::with_capacity(participants.len());
    for p in participants {
        statuses.push(wait_handoff(p, target.epoch(), opts).await?);
    }
    let moved: u64 = statuses.iter().map(|s| s.keys_moved).sum();
    let bytes: u64 = statuses.iter().map(|s| s.bytes_moved).sum();
    info!(epoch = target.epoch(), moved, bytes, "hand-off complete");
    Ok(statuses)
}

async fn wait_handoff(p: &Participant, epoch: u64, opts: HandoffOptions) -> Result<HandoffStatus> {
    let deadline = tokio::time::Instant::now() + opts.timeout;
    loop {
        let st = p.admin.handoff().await?;
        if st.epoch == Some(epoch) {
            match st.state {
                State::Done => return Ok(st),
                State::Failed | State::Cancelled => {
                    return Err(Error::HandoffFailed {
                        node: p.address.clone(),
                        reason: st.last_error.unwrap_or_else(|| format!("{:?}", st.state)),
                    });
                }
                State::Running | State::Idle => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                node: p.address.clone(),
                timeout: opts.timeout,
            });
        }
        tokio::time::sleep(opts.poll).await;
    }
}
