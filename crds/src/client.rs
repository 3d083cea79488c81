//! The typed client of the operator's HTTP API (feature `client`): what the web, the bench,
//! `cachepool up` and the tests use to read and steer pools, over the wire types of
//! [`crate::api`].
//!
//! A refusal keeps the operator's error body whole ([`ClientError::Refused`]) so a form can
//! show a 422's message next to the field it names; an answer that does not decode is an
//! error naming the path, never a default.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{self, ErrorBody, FlushReport, HistoryPoint, PoolList, ScaleRequest};
use crate::pool::CachePool;
use crate::ring::RingState;

/// How long one call may take unless it is a long-poll (a scale answers once the spec is
/// stored, not when the nodes are up).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the operator's longest ring wait (30 s) a long-poll may take.
const LONG_POLL_SLACK: Duration = Duration::from_secs(10);

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The operator could not be reached, or did not answer in time.
    #[error("the operator's API at {url} did not answer: {message}")]
    Unreachable { url: String, message: String },
    /// The operator refused the call, saying why.
    #[error("the operator refused {url} ({status}): {body}")]
    Refused {
        url: String,
        status: u16,
        body: ErrorBody,
    },
    /// The operator answered something that is not its API.
    #[error("{url} answered {status} with a body that is not the operator's API: {message}")]
    Unexpected {
        url: String,
        status: u16,
        message: String,
    },
}

impl ClientError {
    /// The operator's error body, when it refused the call.
    pub fn refusal(&self) -> Option<(u16, &ErrorBody)> {
        match self {
            ClientError::Refused { status, body, .. } => Some((*status, body)),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A client of one operator's API, with a bearer token.
#[derive(Clone, Debug)]
pub struct OperatorClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl OperatorClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7070`) with `token`.
    pub fn new(base: &str, token: &str) -> OperatorClient {
        OperatorClient {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                url: url.clone(),
                status,
                message: e.to_string(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Refused { url, status, body }),
            Err(_) => Err(ClientError::Unexpected {
                url,
                status,
                message: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
            }),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(reqwest::Method::GET, path, None, CALL_TIMEOUT)
            .await
    }

    /// `GET /api/v1/pools`.
    pub async fn pools(&self) -> Result<PoolList> {
        self.get(&api::pools_path()).await
    }

    /// `GET /api/v1/pools/{ns}/{name}`.
    pub async fn pool(&self, namespace: &str, name: &str) -> Result<CachePool> {
        self.get(&api::pool_path(namespace, name, "")).await
    }

    /// `PATCH /api/v1/pools/{ns}/{name}` with a JSON merge patch (RFC 7386), as
    /// `kubectl patch --type merge` sends it: `{"spec": {"scaling": {"replicas": 3}}}`.
    pub async fn patch(&self, namespace: &str, name: &str, patch: &Value) -> Result<CachePool> {
        let body = serde_json::to_vec(patch).unwrap_or_default();
        self.call(
            reqwest::Method::PATCH,
            &api::pool_path(namespace, name, ""),
            Some(("application/merge-patch+json", body)),
            CALL_TIMEOUT,
        )
        .await
    }

    /// `POST .../scale`: grows (`1`) or shrinks (`-1`) a manual pool by one node.
    pub async fn scale(&self, namespace: &str, name: &str, delta: i64) -> Result<CachePool> {
        let body = serde_json::to_vec(&ScaleRequest { delta }).unwrap_or_default();
        self.call(
            reqwest::Method::POST,
            &api::pool_path(namespace, name, "/scale"),
            Some(("application/json", body)),
            CALL_TIMEOUT,
        )
        .await
    }

    /// `POST .../flush`: empties every node.
    pub async fn flush(&self, namespace: &str, name: &str) -> Result<FlushReport> {
        self.call(
            reqwest::Method::POST,
            &api::pool_path(namespace, name, "/flush"),
            None,
            CALL_TIMEOUT,
        )
        .await
    }

    /// `GET .../ring`, or with `after` the long-poll that waits (up to 30 s) for a ring whose
    /// epoch exceeds it.
    pub async fn ring(&self, namespace: &str, name: &str, after: Option<u64>) -> Result<RingState> {
        let (path, timeout) = match after {
            Some(epoch) => (
                api::pool_path(namespace, name, &format!("/ring?after={epoch}")),
                Duration::from_secs(30) + LONG_POLL_SLACK,
            ),
            None => (api::pool_path(namespace, name, "/ring"), CALL_TIMEOUT),
        };
        self.call(reqwest::Method::GET, &path, None, timeout).await
    }

    /// `GET .../history?minutes=N`: per-minute points, oldest first.
    pub async fn history(
        &self,
        namespace: &str,
        name: &str,
        minutes: u32,
    ) -> Result<Vec<HistoryPoint>> {
        self.get(&api::pool_path(
            namespace,
            name,
            &format!("/history?minutes={minutes}"),
        ))
        .await
    }
}
