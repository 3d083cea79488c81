//! Rebalancing: moving a pool from one ring to the next without losing hits.
//!
//! The order is what makes a resize lossless (DESIGN.md, "The ring"):
//! 1. new nodes are started and ready (the caller's job: provider);
//! 2. the new ring is published with the previous one still attached, so clients read the
//!    new owner first and fall back to the old one, and write to the new owner;
//! 3. every node that may hold keys it no longer owns hands them off (`hand_off_all`);
//! 4. the previous ring is dropped, and removed nodes may stop.
//!
//! This module does step 3 against the nodes' admin APIs and offers the admin client the
//! operator uses for everything else it asks of a node.

use std::time::Duration;

use cache_node::handoff::{HandoffStatus, State};
use cachepool_crds::ring::Ring;
use serde_json::{Value, json};
use tracing::info;

/// Errors talking to a node's admin API or handing off.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin API of {node}: {source}")]
    Http {
        node: String,
        source: reqwest::Error,
    },
    #[error("admin API of {node} answered {status}: {body}")]
    Status {
        node: String,
        status: u16,
        body: String,
    },
    #[error("hand-off on {node} failed: {reason}")]
    HandoffFailed { node: String, reason: String },
    #[error("hand-off on {node} did not finish within {0:?}", .timeout)]
    Timeout { node: String, timeout: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client of one node's admin HTTP API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `admin_address` is `host:port` of the node's admin port.
    pub fn new(admin_address: &str, token: Option<&str>) -> AdminClient {
        Self::with_timeouts(admin_address, token, Duration::from_secs(10))
    }

    /// A client whose requests give up after `timeout` (probes want an answer quickly).
    pub fn with_timeouts(
        admin_address: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> AdminClient {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        AdminClient {
            base: format!("http://{admin_address}"),
            token: token.map(str::to_string),
            http,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let node = self.base.clone();
        let resp = req.send().await.map_err(|source| Error::Http {
            node: node.clone(),
            source,
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|source| Error::Http {
            node: node.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(Error::Status {
                node,
                status: status.as_u16(),
                body,
            });
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    /// Whether the node answers `/readyz`.
    pub async fn ready(&self) -> bool {
        matches!(self.request(reqwest::Method::GET, "/readyz").send().await, Ok(r) if r.status().is_success())
    }

    pub async fn stats(&self) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, "/stats"))
            .await
    }

    /// `PUT /config` with the given fields (`capacityMiB`, `policy`, `maxItemSizeKiB`).
    pub async fn put_config(&self, config: &Value) -> Result<Value> {
        self.send(self.request(reqwest::Method::PUT, "/config").json(config))
            .await
    }

    pub async fn flush(&self) -> Result<Value> {
        self.send(self.request(reqwest::Method::POST, "/flush"))
            .await
    }

    /// Starts (or restarts) a hand-off to `ring`; `self_address` is the node's data address
    /// as the ring names it.
    pub async fn start_handoff(
        &self,
        ring: &Ring,
        self_address: &str,
        rate_bytes_per_sec: u64,
    ) -> Result<HandoffStatus> {
        let body = json!({ "ring": ring, "selfAddress": self_address, "rateBytesPerSec": rate_bytes_per_sec });
        let v = self
            .send(self.request(reqwest::Method::POST, "/handoff").json(&body))
            .await?;
        Ok(serde_json::from_value(v).unwrap_or_default())
    }

    pub async fn handoff(&self) -> Result<HandoffStatus> {
        let v = self
            .send(self.request(reqwest::Method::GET, "/handoff"))
            .await?;
        Ok(serde_json::from_value(v).unwrap_or_default())
    }
}

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
