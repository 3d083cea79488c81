//! The node's admin HTTP API: health probes, Prometheus metrics, JSON stats, live
//! configuration and flush. Everything but the probes and `/metrics` needs the bearer token
//! when one is configured; without a token, reads are open and changes are refused.
//! `/metrics` is open because one Prometheus scrape configuration covers the nodes of every
//! pool and each pool has its own token; it holds counters, no keys or values.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use cachepool_crds::api::ErrorBody;
use serde::{Deserialize, Serialize};

use crate::handoff::{Handoff, HandoffRequest};
use crate::metrics::{self, unix_now};
use crate::server::{self, Shared};
use crate::store::Policy;

/// Largest capacity accepted by `PUT /config` (1 TiB).
pub const MAX_CAPACITY_MIB: u64 = 1 << 20;
/// Largest maximum item size accepted (1 GiB, memcached's ceiling).
pub const MAX_ITEM_SIZE_KIB: u64 = 1 << 20;

/// State of the admin API.
#[derive(Clone, Debug)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub token: Option<Arc<str>>,
    /// False once shutdown began, so load balancers stop sending traffic.
    pub ready: Arc<AtomicBool>,
    pub handoff: Arc<Handoff>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let guarded = Router::new()
        .route("/stats", get(stats))
        .route("/config", put(put_config).get(get_config))
        .route("/flush", post(flush))
        .route(
            "/handoff",
            post(start_handoff)
                .get(handoff_status)
                .delete(cancel_handoff),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        // Open: one Prometheus scrape config covers every pool, each with its own token.
        .route("/metrics", get(metrics_text))
        .merge(guarded)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .with_state(state)
}

/// A JSON error as the HTTP contract defines it, `{"error", "message", "field"?}` (the body
/// is [`ErrorBody`], shared with every client); the node's, the operator's and the site's
/// APIs all answer with it (401 adds `WWW-Authenticate`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with its status, short code and a message saying what to fix.
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_owned(),
                message: message.into(),
                field: None,
            },
        }
    }

    /// Names the request field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.body.message
    }

    pub fn field_name(&self) -> Option<&str> {
        self.body.field.as_deref()
    }

    /// The body as it goes on the wire.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(&self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Compares in constant time (`subtle`), so response time does not reveal how much of a
/// token matched; only the length may differ in time. Every token check of the project
/// goes through it (via [`check_bearer`] for bearer tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The token of an `Authorization: Bearer <token>` header, trimmed; `None` without one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The one bearer-token check of every Cachepool HTTP API (node admin, operator, site): which
/// of `accepted` the request presents (its index), or the 401 to answer — naming `what` token
/// is expected when none was sent, and saying it is wrong otherwise.
pub fn check_bearer(
    headers: &axum::http::HeaderMap,
    accepted: &[&str],
    what: &str,
) -> Result<usize, ApiError> {
    let Some(presented) = bearer(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing Authorization: Bearer <{what}>"),
        ));
    };
    // Every accepted token is compared, so timing does not tell which one matched.
    let matched = accepted.iter().enumerate().fold(None, |found, (i, token)| {
        let same = constant_time_eq(presented.as_bytes(), token.as_bytes());
        found.or(same.then_some(i))
    });
    matched.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong bearer token",
        )
    })
}

async fn authorize(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let mutating = req.method() != axum::http::Method::GET;
    let Some(token) = &state.token else {
        if mutating {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this node has no admin token; start it with --admin-token to allow changes",
            )
            .into_response();
        }
        return next.run(req).await;
    };
    match check_bearer(req.headers(), &[token], "admin token") {
        Ok(_) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    let registry = metrics::registry(state.shared.store.clone(), state.shared.stats.clone());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "metrics encoding failed",
        )
        .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn stats(State(state): State<AdminState>) -> Response {
    let general: serde_json::Map<String, serde_json::Value> = server::general_stats(&state.shared)
        .into_iter()
        .map(|(k, v)| {
            let value = v
                .parse::<u64>()
                .map_or(serde_json::Value::String(v), serde_json::Value::from);
            (k.to_string(), value)
        })
        .collect();
    axum::Json(serde_json::Value::Object(general)).into_response()
}

/// The live configuration, as `GET /config` returns it and `PUT /config` accepts it (every
/// field optional on PUT).
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigPatch {
    #[serde(rename = "capacityMiB")]
    pub capacity_mib: Option<u64>,
    pub policy: Option<String>,
    #[serde(rename = "maxItemSizeKiB")]
    pub max_item_size_kib: Option<u64>,
}

/// The live configuration, as `GET /config` and `PUT /config` answer it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    #[serde(rename = "capacityMiB")]
    pub capacity_mib: u64,
    pub capacity_bytes: u64,
    pub policy: String,
    #[serde(rename = "maxItemSizeKiB")]
    pub max_item_size_kib: u64,
}

/// What `POST /flush` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushAnswer {
    /// Items the store held before the flush.
    pub flushed_items: u64,
}

fn current_config(shared: &Shared) -> ConfigView {
    ConfigView {
        capacity_mib: shared.store.limit() as u64 >> 20,
        capacity_bytes: shared.store.limit() as u64,
        policy: shared.store.policy().to_string(),
        max_item_size_kib: shared.max_item_size() as u64 >> 10,
    }
}

async fn get_config(State(state): State<AdminState>) -> Response {
    axum::Json(current_config(&state.shared)).into_response()
}

async fn put_config(State(state): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    let patch: ConfigPatch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("body must be JSON like {{\"capacityMiB\": 64, \"policy\": \"lru\", \"maxItemSizeKiB\": 16384}}: {e}"),
        )
    })?;
    // Validate everything before changing anything.
    let policy = patch
        .policy
        .as_deref()
        .map(str::parse::<Policy>)
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e).field("policy"))?;
    if let Some(mib) = patch.capacity_mib
        && !(1..=MAX_CAPACITY_MIB).contains(&mib)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("capacityMiB must be between 1 and {MAX_CAPACITY_MIB}, got {mib}"),
        )
        .field("capacityMiB"));
    }
    if let Some(kib) = patch.max_item_size_kib
        && !(1..=MAX_ITEM_SIZE_KIB).contains(&kib)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("maxItemSizeKiB must be between 1 and {MAX_ITEM_SIZE_KIB}, got {kib}"),
        )
        .field("maxItemSizeKiB"));
    }
    let shared = &state.shared;
    if let Some(kib) = patch.max_item_size_kib {
        shared.set_max_item_size((kib as usize) << 10);
    }
    if let Some(policy) = policy {
        shared.store.set_policy(policy);
    }
    if let Some(mib) = patch.capacity_mib {
        let store = shared.store.clone();
        // Shrinking evicts, which may take a while for a large store: keep it off the
        // async workers.
        tokio::task::spawn_blocking(move || store.set_limit((mib as usize) << 20, unix_now()))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
    }
    tracing::info!(?patch, "configuration changed");
    Ok(axum::Json(current_config(shared)).into_response())
}

async fn flush(State(state): State<AdminState>) -> Response {
    let before = state.shared.store.stats().curr_items;
    state.shared.store.flush_all(0, unix_now());
    state.shared.stats.cmd_flush.fetch_add(1, Ordering::Relaxed);
    axum::Json(FlushAnswer {
        flushed_items: before,
    })
    .into_response()
}

/// The largest `batchBytes` and `maxInFlightBytes` a hand-off request may ask for.
const MAX_HANDOFF_BYTES: usize = 1 << 30;

async fn start_handoff(State(state): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    let request: HandoffRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "body must be JSON like {{\"ring\": {{\"epoch\": 2, \"members\": [{{\"slot\": 0, \"address\": \"10.0.0.1:11211\"}}]}}, \"selfAddress\": \"10.0.0.1:11211\"}}: {e}"
            ),
        )
    })?;
    // Both bound what the hand-off holds in memory besides the store (a batch copied out,
    // the items in flight to each owner).
    for (field, value) in [
        ("batchBytes", request.batch_bytes),
        ("maxInFlightBytes", request.max_in_flight_bytes),
    ] {
        if !(1..=MAX_HANDOFF_BYTES).contains(&value) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{field} must be between 1 and {MAX_HANDOFF_BYTES} (1 GiB), got {value}"),
            )
            .field(field));
        }
    }
    let status = state.handoff.start(state.shared.store.clone(), request);
    Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response())
}

async fn handoff_status(State(state): State<AdminState>) -> Response {
    axum::Json(state.handoff.status()).into_response()
}

async fn cancel_handoff(State(state): State<AdminState>) -> Response {
    axum::Json(state.handoff.cancel()).into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn check_bearer_tells_which_token_was_presented() {
        let accepted = ["admin-secret", "read-secret"];
        assert_eq!(
            check_bearer(&with("Bearer admin-secret"), &accepted, "token").unwrap(),
            0
        );
        assert_eq!(
            check_bearer(&with("Bearer  read-secret "), &accepted, "token").unwrap(),
            1
        );
        let wrong = check_bearer(&with("Bearer admin-secreT"), &accepted, "token").unwrap_err();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.message(), "wrong bearer token");
        let basic = check_bearer(&with("Basic YWRtaW4="), &accepted, "admin token").unwrap_err();
        assert_eq!(
            basic.message(),
            "missing Authorization: Bearer <admin token>"
        );
        let none = check_bearer(&HeaderMap::new(), &accepted, "token").unwrap_err();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn constant_time_eq_compares_whole_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
