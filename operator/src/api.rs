//! The operator's HTTP API, for the web app and for scripts (DESIGN.md, "Operator API").
//!
//! `/api/v1/...` needs `Authorization: Bearer TOKEN`: the read-only token may read, the admin
//! token may also change. `/healthz`, `/readyz` and `/metrics` are open, like a node's. Every
//! error is `{"error": CODE, "message": TEXT, "field": NAME?}`; client mistakes get a 4xx that
//! says what to fix, and internal failures are logged and answered without detail.
//!
//! A spec change is a JSON merge patch (RFC 7386) of the whole resource, as `kubectl patch
//! --type merge` sends it; the merged spec is validated with the same rules as a manifest and
//! refused with 422 naming the field. A field the CachePool does not have (say
//! `spec.scaling.minMissRate` for `spec.scaling.auto.minMissRate`) is refused the same way,
//! code `unknown_field`, as `kubectl apply --validate=strict` would. Only `spec`,
//! `metadata.labels` and `metadata.annotations` may change; status is the operator's.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cache_node::admin::{ApiError, check_bearer};
use cachepool_crds::api::{HistoryPoint, PoolList, ScaleRequest};
use cachepool_crds::pool::{CachePool, ScalingMode, SpecError};
use cachepool_crds::ring::RingState;
use cachepool_crds::strict::{self, StrictError};
use serde::Deserialize;
use serde_json::Value;

use crate::driver::{CommandError, PoolHandle};
use crate::metrics::{self, OperatorMetrics};
use crate::provider::PoolRef;
use crate::registry::Registry;

/// Longest a ring long-poll waits.
pub const RING_WAIT: Duration = Duration::from_secs(30);

/// Most history a request may ask for, in minutes (the retention: a day).
pub const MAX_HISTORY_MINUTES: u64 = 24 * 60;

/// Largest request body: a patch is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// The API's bearer tokens.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// May read and change.
    pub admin: String,
    /// May read only.
    pub read: Option<String>,
}

/// State of the API's handlers.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub tokens: Tokens,
    pub metrics: OperatorMetrics,
}

/// The router: `/api/v1/...` behind tokens, probes and metrics open.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/pools", get(list_pools))
        .route(
            "/api/v1/pools/{namespace}/{name}",
            get(get_pool).patch(patch_pool),
        )
        .route("/api/v1/pools/{namespace}/{name}/scale", post(scale_pool))
        .route("/api/v1/pools/{namespace}/{name}/flush", post(flush_pool))
        .route("/api/v1/pools/{namespace}/{name}/ring", get(get_ring))
        .route("/api/v1/pools/{namespace}/{name}/history", get(get_history))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

trait ApiErrorExt {
    fn invalid(errors: &[SpecError]) -> Self;
    fn not_found(pool: &PoolRef) -> Self;
}

impl ApiErrorExt for ApiError {
    fn invalid(errors: &[SpecError]) -> Self {
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let mut error = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec", message);
        if let Some(first) = errors.first() {
            error = error.field(format!("spec.{}", first.field));
        }
        error
    }

    fn not_found(pool: &PoolRef) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no pool {pool}"),
        )
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Invalid(errors) => Self::invalid(&errors),
            CommandError::Storage(message) => {
                tracing::error!(error = %message, "storing a spec change failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the change could not be stored; see the operator's log",
                )
            }
            CommandError::Gone => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "the pool is being deleted or the operator is stopping",
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let mut accepted = vec![state.tokens.admin.as_str()];
    accepted.extend(state.tokens.read.as_deref());
    let admin = match check_bearer(request.headers(), &accepted, "token") {
        Ok(which) => which == 0,
        Err(refused) => return refused.into_response(),
    };
    if !admin && request.method() != Method::GET {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read; changes need the admin token",
        )
        .into_response();
    }
    next.run(request).await
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.registry.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "reading the state directory\n",
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see DESIGN.md, \"Operator API\"",
    )
}

fn pool(state: &ApiState, namespace: String, name: String) -> ApiResult<Arc<PoolHandle>> {
    let pool = PoolRef::new(namespace, name);
    state
        .registry
        .get(&pool)
        .ok_or_else(|| ApiError::not_found(&pool))
}

async fn list_pools(State(state): State<ApiState>) -> Json<PoolList> {
    Json(PoolList::new(
        state.registry.list().iter().map(|p| p.resource()).collect(),
    ))
}

async fn get_pool(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
) -> ApiResult<Json<CachePool>> {
    Ok(Json(pool(&state, namespace, name)?.resource()))
}

async fn patch_pool(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<CachePool>> {
    let handle = pool(&state, namespace, name)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media != "application/merge-patch+json" && media != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "send a JSON merge patch with Content-Type: application/merge-patch+json (got {content_type:?})"
            ),
        ));
    }
    let patch: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !patch.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a merge patch is a JSON object, e.g. {\"spec\": {\"scaling\": {\"replicas\": 3}}}",
        ));
    }
    let current = handle.resource();
    let merged = merge(&current, &patch)?;
    Ok(Json(handle.set_spec(merged.spec).await?))
}

/// Applies a merge patch to a resource, refusing changes to anything but the spec, labels
/// and annotations.
fn merge(current: &CachePool, patch: &Value) -> ApiResult<CachePool> {
    for (key, value) in patch.as_object().into_iter().flatten() {
        match key.as_str() {
            "spec" => {}
            "apiVersion" | "kind" if current_field(current, key) == Some(value.clone()) => {}
            "status" => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "status is written by the operator; patch spec instead",
                )
                .field("status"));
            }
            "metadata" => {
                for (meta, _) in value.as_object().into_iter().flatten() {
                    if meta != "labels" && meta != "annotations" {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!(
                                "metadata.{meta} cannot be changed; only labels and annotations"
                            ),
                        )
                        .field(format!("metadata.{meta}")));
                    }
                }
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("{other} cannot be patched; patch spec"),
                )
                .field(other.to_owned()));
            }
        }
    }
    let mut document = serde_json::to_value(current)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    json_patch::merge(&mut document, patch);
    // Strictly: a field the resource does not have is refused by its path, as
    // `kubectl apply --validate=strict` refuses it, rather than dropped with a 200.
    strict::read_pool(document).map_err(|e| {
        let (code, message) = match &e {
            StrictError::Unknown(_) => ("unknown_field", e.to_string()),
            StrictError::Invalid { .. } => (
                "invalid_spec",
                format!("the patched resource is not a valid CachePool: {e}"),
            ),
        };
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).field(e.field())
    })
}

fn current_field(current: &CachePool, key: &str) -> Option<Value> {
    serde_json::to_value(current).ok()?.get(key).cloned()
}

async fn scale_pool(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<CachePool>> {
    let handle = pool(&state, namespace, name)?;
    let request: ScaleRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"delta\": 1}} or {{\"delta\": -1}}: {e}"),
        )
    })?;
    if request.delta != 1 && request.delta != -1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("delta must be 1 or -1, not {}", request.delta),
        )
        .field("delta"));
    }
    let mut spec = handle.resource().spec;
    let scaling = &spec.scaling;
    if scaling.mode == ScalingMode::Auto {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the pool is in auto mode: the autoscaler sets its size; switch scaling.mode to manual to scale by hand",
        )
        .field("spec.scaling.mode"));
    }
    let target = i64::from(scaling.replicas) + request.delta;
    if target < i64::from(scaling.min_replicas) || target > i64::from(scaling.max_replicas) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "the pool has {} nodes and may have {} to {}: it cannot {}",
                scaling.replicas,
                scaling.min_replicas,
                scaling.max_replicas,
                if request.delta > 0 { "grow" } else { "shrink" }
            ),
        )
        .field("spec.scaling.replicas"));
    }
    spec.scaling.replicas = u32::try_from(target).unwrap_or(scaling.replicas);
    Ok(Json(handle.set_spec(spec).await?))
}

async fn flush_pool(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let handle = pool(&state, namespace, name)?;
    let report = handle.flush().await?;
    Ok(Json(report).into_response())
}

#[derive(Deserialize)]
struct RingQuery {
    after: Option<u64>,
}

async fn get_ring(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<RingQuery>,
) -> ApiResult<Json<RingState>> {
    let handle = pool(&state, namespace, name)?;
    let mut ring = handle.ring();
    if let Some(after) = query.after {
        let newer = |r: &Option<RingState>| r.as_ref().is_some_and(|r| r.current().epoch() > after);
        // Waiting ends early when the epoch passes `after`; at the deadline the current ring
        // is answered and the client asks again.
        let _ = tokio::time::timeout(RING_WAIT, ring.wait_for(newer)).await;
    }
    let current = ring.borrow().clone();
    current.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_ring",
            "the pool has no ring yet: its first nodes are starting",
        )
    })
}

#[derive(Deserialize)]
struct HistoryQuery {
    minutes: Option<u64>,
}

async fn get_history(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<HistoryQuery>,
) -> ApiResult<Json<Vec<HistoryPoint>>> {
    let handle = pool(&state, namespace, name)?;
    let minutes = query.minutes.unwrap_or(30);
    if minutes == 0 || minutes > MAX_HISTORY_MINUTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("minutes must lie within [1, {MAX_HISTORY_MINUTES}]"),
        )
        .field("minutes"));
    }
    let now = SystemTime::now();
    let from = now
        .checked_sub(Duration::from_secs(minutes * 60))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(Json(handle.history(from, now + Duration::from_secs(60))))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool() -> CachePool {
        let (_, pool) =
            crate::state::parse_manifest(include_bytes!("../../examples/local.yaml")).unwrap();
        pool
    }

    #[test]
    fn merge_patch_changes_the_spec_fields_it_names_and_keeps_the_rest() {
        let before = pool();
        let after = merge(
            &before,
            &json!({"spec": {"scaling": {"mode": "manual", "replicas": 3}}}),
        )
        .unwrap();
        assert_eq!(after.spec.scaling.replicas, 3);
        assert_eq!(after.spec.scaling.mode, ScalingMode::Manual);
        assert_eq!(after.spec.cache, before.spec.cache);
        assert_eq!(after.spec.scaling.auto, before.spec.scaling.auto);
    }

    #[test]
    fn merge_patch_null_restores_a_default() {
        let after = merge(&pool(), &json!({"spec": {"cache": {"policy": null}}})).unwrap();
        assert_eq!(after.spec.cache.policy.as_str(), "lru");
    }

    #[test]
    fn merge_patch_refuses_what_is_not_the_spec() {
        for (patch, field) in [
            (json!({"status": {"replicas": 9}}), "status"),
            (json!({"metadata": {"name": "other"}}), "metadata.name"),
            (json!({"kind": "Pod"}), "kind"),
        ] {
            let error = merge(&pool(), &patch).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{patch}");
            assert_eq!(error.field_name(), Some(field), "{patch}");
        }
        let labels = merge(&pool(), &json!({"metadata": {"labels": {"team": "web"}}})).unwrap();
        assert_eq!(
            labels
                .metadata
                .labels
                .unwrap()
                .get("team")
                .map(String::as_str),
            Some("web")
        );
    }

    #[test]
    fn merge_patch_with_a_wrong_type_is_an_invalid_spec() {
        let error = merge(
            &pool(),
            &json!({"spec": {"scaling": {"replicas": "three"}}}),
        )
        .unwrap_err();
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error.field_name(), Some("spec.scaling.replicas"));
        assert!(
            error.message().contains("not a valid CachePool"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn merge_patch_with_an_unknown_field_is_refused_by_its_path() {
        for (patch, field) in [
            (
                json!({"spec": {"scaling": {"minMissRate": 0.2}}}),
                "spec.scaling.minMissRate",
            ),
            (json!({"spec": {"replicas": 3}}), "spec.replicas"),
            (
                json!({"spec": {"provider": {"process": {"port": 1}}}}),
                "spec.provider.process.port",
            ),
            (
                json!({"metadata": {"labels": {"a": "b"}}, "spec": {"cache": {"policyy": "lru"}}}),
                "spec.cache.policyy",
            ),
        ] {
            let error = merge(&pool(), &patch).unwrap_err();
            assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY, "{patch}");
            assert_eq!(error.field_name(), Some(field), "{patch}");
            assert!(
                error
                    .message()
                    .contains(&format!("unknown field \"{field}\"")),
                "{patch}: {}",
                error.message()
            );
        }
        let error =
            merge(&pool(), &json!({"spec": {"scaling": {"minMissRate": 0.2}}})).unwrap_err();
        assert!(
            error
                .message()
                .contains("did you mean spec.scaling.auto.minMissRate?"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn invalid_spec_error_names_the_first_field() {
        let error = ApiError::invalid(&[SpecError {
            field: "scaling.minReplicas".into(),
            message: "5 exceeds scaling.maxReplicas (3)".into(),
        }]);
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error.field_name(), Some("spec.scaling.minReplicas"));
        assert_eq!(
            error.message(),
            "scaling.minReplicas: 5 exceeds scaling.maxReplicas (3)"
        );
    }
}
