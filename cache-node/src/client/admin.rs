//! The client of a node's admin HTTP API (`crate::admin`), beside the server it talks to and
//! over the same request and response types, so the two cannot drift apart: a field renamed
//! on one side breaks the build or the tests, never silently turns into a default.
//!
//! An answer that does not decode is an error ([`AdminError::Decode`]) naming the path and
//! the body, never a `Default`. The operator uses one client per node for commands (long
//! timeout) and one for probes (short timeout).

use std::time::Duration;

use cachepool_crds::ring::Ring;
use serde::de::DeserializeOwned;

use crate::admin::{ConfigPatch, ConfigView, FlushAnswer};
use crate::handoff::{HandoffRequest, HandoffStatus};

/// A node's `GET /stats`: memcached's counter names (`get_hits`, `curr_items`, ...) with
/// numeric values as JSON numbers. An open set by design (memcached adds counters over
/// releases), so it stays a map; readers check the counters they need
/// (`cachepool_operator::history::NodeSample::from_stats`).
pub type Stats = serde_json::Map<String, serde_json::Value>;

/// Errors talking to a node's admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No answer (connection refused, timeout).
    #[error("admin API of {node}: {source}")]
    Http {
        node: String,
        source: reqwest::Error,
    },
    /// An answer other than 2xx; `body` is the node's error body.
    #[error("admin API of {node} answered {status}: {body}")]
    Status {
        node: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer that is not what the API promises.
    #[error("admin API of {node}: {path} answered a body that does not decode ({source}): {body}")]
    Decode {
        node: String,
        path: &'static str,
        source: serde_json::Error,
        body: String,
    },
}

/// A client of one node's admin HTTP API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    node: String,
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `admin_address` is `host:port` of the node's admin port; requests give up after 10 s.
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
            node: admin_address.to_owned(),
            base: format!("http://{admin_address}"),
            token: token.map(str::to_string),
            http,
        }
    }

    /// The node's admin `host:port`.
    pub fn address(&self) -> &str {
        &self.node
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        path: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, AdminError> {
        let http = |source| AdminError::Http {
            node: self.node.clone(),
            source,
        };
        let resp = req.send().await.map_err(http)?;
        let status = resp.status();
        let body = resp.text().await.map_err(http)?;
        if !status.is_success() {
            return Err(AdminError::Status {
                node: self.node.clone(),
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_str(&body).map_err(|source| AdminError::Decode {
            node: self.node.clone(),
            path,
            source,
            body,
        })
    }

    /// Whether the node answers `/readyz` with 2xx.
    pub async fn ready(&self) -> bool {
        matches!(self.request(reqwest::Method::GET, "/readyz").send().await, Ok(r) if r.status().is_success())
    }

    /// `GET /stats`.
    pub async fn stats(&self) -> Result<Stats, AdminError> {
        self.send("/stats", self.request(reqwest::Method::GET, "/stats"))
            .await
    }

    /// `GET /config`.
    pub async fn config(&self) -> Result<ConfigView, AdminError> {
        self.send("/config", self.request(reqwest::Method::GET, "/config"))
            .await
    }

    /// `PUT /config`: changes the fields set in `patch`, answers the new configuration.
    pub async fn put_config(&self, patch: &ConfigPatch) -> Result<ConfigView, AdminError> {
        self.send(
            "/config",
            self.request(reqwest::Method::PUT, "/config").json(patch),
        )
        .await
    }

    /// `POST /flush`: empties the node.
    pub async fn flush(&self) -> Result<FlushAnswer, AdminError> {
        self.send("/flush", self.request(reqwest::Method::POST, "/flush"))
            .await
    }

    /// `POST /handoff`: starts (or restarts) a hand-off to `ring`; `self_address` is the
    /// node's data address as the ring names it.
    pub async fn start_handoff(
        &self,
        ring: &Ring,
        self_address: &str,
        rate_bytes_per_sec: u64,
    ) -> Result<HandoffStatus, AdminError> {
        let request = HandoffRequest::new(ring.clone(), self_address, rate_bytes_per_sec);
        self.handoff_with(&request).await
    }

    /// `POST /handoff` with every parameter (batch size included).
    pub async fn handoff_with(
        &self,
        request: &HandoffRequest,
    ) -> Result<HandoffStatus, AdminError> {
        self.send(
            "/handoff",
            self.request(reqwest::Method::POST, "/handoff")
                .json(request),
        )
        .await
    }

    /// `GET /handoff`: progress of the current or last hand-off.
    pub async fn handoff(&self) -> Result<HandoffStatus, AdminError> {
        self.send("/handoff", self.request(reqwest::Method::GET, "/handoff"))
            .await
    }

    /// `DELETE /handoff`: cancels the running hand-off.
    pub async fn cancel_handoff(&self) -> Result<HandoffStatus, AdminError> {
        self.send(
            "/handoff",
            self.request(reqwest::Method::DELETE, "/handoff"),
        )
        .await
    }
}
