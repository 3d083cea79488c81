//! The manager's client of the operator's HTTP API: the pool, its history, and the calls that
//! change it (merge PATCH, scale by one, flush).
//!
//! The manager talks to the operator only through this API (the design's rule), with a token
//! that may write. The operator's JSON errors (`{"error", "message", "field"}`) are kept whole
//! so that the forms can show a 422's message next to the field it names.

use std::time::Duration;

use cachepool_crds::pool::CachePool;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long one call to the operator may take (a scale answers once the spec is stored, not
/// when the nodes are up).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the operator is and which pool the manager steers.
#[derive(Clone, Debug)]
pub struct OperatorClient {
    http: reqwest::Client,
    api: String,
    token: String,
    namespace: String,
    pool: String,
}

/// A failed call to the operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The operator could not be reached or answered something that is not its API.
    #[error("the operator's API did not answer: {0}")]
    Unreachable(String),
    /// The operator refused the call, saying why.
    #[error("{message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
}

/// One point of the operator's per-minute history.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPoint {
    /// Start of the minute, RFC 3339.
    pub t: String,
    pub nodes: u32,
    pub miss_rate: Option<f64>,
    pub hit_rate: Option<f64>,
    pub items: u64,
    pub bytes: u64,
    pub requests_per_minute: f64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
    field: Option<String>,
}

impl OperatorClient {
    /// A client of the API at `api` (base URL) for the pool `namespace/pool`.
    pub fn new(api: &str, token: &str, namespace: &str, pool: &str) -> Result<Self, OperatorError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| OperatorError::Unreachable(e.to_string()))?;
        Ok(OperatorClient {
            http,
            api: api.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            namespace: namespace.to_owned(),
            pool: pool.to_owned(),
        })
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/api/v1/pools/{}/{}{tail}",
            self.api, self.namespace, self.pool
        )
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, OperatorError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| OperatorError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| OperatorError::Unreachable(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| OperatorError::Unreachable(format!("unexpected answer: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(OperatorError::Refused {
                status: status.as_u16(),
                code: e.error,
                message: e.message,
                field: e.field,
            }),
            Err(_) => Err(OperatorError::Unreachable(format!(
                "status {status} without an error body"
            ))),
        }
    }

    /// The pool resource.
    pub async fn pool(&self) -> Result<CachePool, OperatorError> {
        self.call(self.http.get(self.url(""))).await
    }

    /// The last `minutes` of per-minute history.
    pub async fn history(&self, minutes: u32) -> Result<Vec<HistoryPoint>, OperatorError> {
        self.call(
            self.http
                .get(self.url(&format!("/history?minutes={minutes}"))),
        )
        .await
    }

    /// Applies a JSON merge patch to the pool.
    pub async fn patch(&self, patch: &Value) -> Result<CachePool, OperatorError> {
        let body = serde_json::to_vec(patch)
            .map_err(|e| OperatorError::Unreachable(format!("encoding the patch: {e}")))?;
        self.call(
            self.http
                .patch(self.url(""))
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/merge-patch+json",
                )
                .body(body),
        )
        .await
    }

    /// Grows (`1`) or shrinks (`-1`) the pool by one node.
    pub async fn scale(&self, delta: i32) -> Result<CachePool, OperatorError> {
        self.call(
            self.http
                .post(self.url("/scale"))
                .json(&serde_json::json!({ "delta": delta })),
        )
        .await
    }

    /// Empties every node of the pool.
    pub async fn flush(&self) -> Result<Value, OperatorError> {
        self.call(self.http.post(self.url("/flush"))).await
    }
}
