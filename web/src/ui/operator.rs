//! The manager's view of the operator: the shared typed client of the operator's HTTP API
//! (`cachepool_crds::client`), bound to the one pool the manager steers.
//!
//! The manager talks to the operator only through this API (the design's rule), with a token
//! that may write. A refusal keeps the operator's error body (`{"error", "message", "field"}`)
//! so that the forms can show a 422's message next to the field it names.

use cachepool_crds::api::FlushReport;
use cachepool_crds::client::{ClientError, OperatorClient as ApiClient};
use cachepool_crds::pool::CachePool;
use serde_json::Value;

pub use cachepool_crds::api::HistoryPoint;

/// The operator's API, for the pool `namespace/pool`.
#[derive(Clone, Debug)]
pub struct OperatorClient {
    api: ApiClient,
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

impl From<ClientError> for OperatorError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Refused { status, body, .. } => OperatorError::Refused {
                status,
                code: body.error,
                message: body.message,
                field: body.field,
            },
            other => OperatorError::Unreachable(other.to_string()),
        }
    }
}

impl OperatorClient {
    /// A client of the API at `api` (base URL) for the pool `namespace/pool`.
    pub fn new(api: &str, token: &str, namespace: &str, pool: &str) -> Result<Self, OperatorError> {
        Ok(OperatorClient {
            api: ApiClient::new(api, token),
            namespace: namespace.to_owned(),
            pool: pool.to_owned(),
        })
    }

    /// The pool resource.
    pub async fn pool(&self) -> Result<CachePool, OperatorError> {
        Ok(self.api.pool(&self.namespace, &self.pool).await?)
    }

    /// The last `minutes` of per-minute history.
    pub async fn history(&self, minutes: u32) -> Result<Vec<HistoryPoint>, OperatorError> {
        Ok(self
            .api
            .history(&self.namespace, &self.pool, minutes)
            .await?)
    }

    /// Applies a JSON merge patch to the pool.
    pub async fn patch(&self, patch: &Value) -> Result<CachePool, OperatorError> {
        Ok(self.api.patch(&self.namespace, &self.pool, patch).await?)
    }

    /// Grows (`1`) or shrinks (`-1`) the pool by one node.
    pub async fn scale(&self, delta: i32) -> Result<CachePool, OperatorError> {
        Ok(self
            .api
            .scale(&self.namespace, &self.pool, i64::from(delta))
            .await?)
    }

    /// Empties every node of the pool.
    pub async fn flush(&self) -> Result<FlushReport, OperatorError> {
        Ok(self.api.flush(&self.namespace, &self.pool).await?)
    }
}
