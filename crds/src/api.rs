//! The operator's HTTP API on the wire (DESIGN.md, "Operator API"): paths, request and
//! response bodies, and the error body every Cachepool HTTP API answers with.
//!
//! One definition for the server (`cachepool-operator`), its typed client ([`crate::client`],
//! feature `client`) and everything else that reads these bodies (the web, the bench, the
//! tests), so a renamed field breaks the build instead of decoding into a default.

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::pool::CachePool;

/// `apiVersion` of CachePool objects and lists.
pub const API_VERSION: &str = "cachepool.io/v1alpha1";

/// Every path of the API starts with this.
pub const PREFIX: &str = "/api/v1";

/// `kind` of the pool list.
pub const POOL_LIST_KIND: &str = "CachePoolList";

/// Path of the pool list: `/api/v1/pools`.
pub fn pools_path() -> String {
    format!("{PREFIX}/pools")
}

/// Path of one pool: `/api/v1/pools/{namespace}/{name}`, with `tail` appended
/// (`""`, `"/scale"`, `"/flush"`, `"/ring"`, `"/history"`).
pub fn pool_path(namespace: &str, name: &str, tail: &str) -> String {
    format!("{PREFIX}/pools/{namespace}/{name}{tail}")
}

/// The error body of every Cachepool HTTP API (operator, node admin, site):
/// `{"error": CODE, "message": TEXT, "field": NAME?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code (`invalid_spec`, `not_found`, `conflict`, `unauthorized`, ...).
    pub error: String,
    /// What went wrong and what to fix, for people.
    pub message: String,
    /// The request field at fault, when there is one (`spec.scaling.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({field}): {}", self.error, self.message),
            None => write!(f, "{}: {}", self.error, self.message),
        }
    }
}

/// `GET /api/v1/pools`: every pool, as Kubernetes lists them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolList {
    pub api_version: String,
    pub kind: String,
    pub items: Vec<CachePool>,
}

impl PoolList {
    /// A list of `items`.
    pub fn new(items: Vec<CachePool>) -> PoolList {
        PoolList {
            api_version: API_VERSION.to_owned(),
            kind: POOL_LIST_KIND.to_owned(),
            items,
        }
    }
}

/// `POST .../scale`: grow or shrink a manual pool by one. Any other field is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// `1` or `-1`.
    pub delta: i64,
}

/// `POST .../flush`: what emptying every node did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushReport {
    /// Nodes flushed.
    pub nodes: u32,
    /// Items they held before.
    pub items_dropped: u64,
    /// Nodes that could not be flushed, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// `GET .../history`: one minute of a pool's traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPoint {
    /// Start of the minute, serialised as RFC 3339 UTC (`2026-11-26T01:02:00Z`).
    pub t: Timestamp,
    /// Ring size at the minute's last sample.
    pub nodes: u32,
    /// Misses / gets of the minute; `null` when it had no gets.
    pub miss_rate: Option<f64>,
    /// Hits / gets of the minute; `null` when it had no gets.
    pub hit_rate: Option<f64>,
    /// Items at the minute's last sample.
    pub items: u64,
    /// Bytes at the minute's last sample.
    pub bytes: u64,
    /// Requests of the minute, scaled to a full minute when only part of it was covered.
    pub requests_per_minute: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_design_brief() {
        assert_eq!(pools_path(), "/api/v1/pools");
        assert_eq!(
            pool_path("default", "local", "/ring"),
            "/api/v1/pools/default/local/ring"
        );
    }

    #[test]
    fn scale_request_refuses_a_field_it_does_not_have() {
        let ok: ScaleRequest = serde_json::from_str(r#"{"delta": -1}"#).unwrap();
        assert_eq!(ok.delta, -1);
        let error = serde_json::from_str::<ScaleRequest>(r#"{"delta": 1, "replicas": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `replicas`"), "{error}");
    }

    #[test]
    fn error_body_leaves_out_an_absent_field() {
        let body = ErrorBody {
            error: "not_found".into(),
            message: "no pool default/x".into(),
            field: None,
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"not_found","message":"no pool default/x"}"#
        );
        let back: ErrorBody =
            serde_json::from_str(r#"{"error":"invalid_spec","message":"m","field":"spec.x"}"#)
                .unwrap();
        assert_eq!(back.field.as_deref(), Some("spec.x"));
    }
}
