//! The site's HTTP API (DESIGN.md, "Web JSON API"): upload, view and list images, delete all
//! application data, and the probes.
//!
//! Reads go to the pool first through [`ImageCache`]; a miss reads the database and the object
//! store and fills the pool, one fill per key at a time. An upload validates the key and the
//! bytes (by their content, never their name or declared type), writes the object and the row
//! ([`Storage::put_image`]), then invalidates the pool's copy before answering, so nobody sees
//! the old image after the upload returned. Errors are `{"error", "message", "field"?}` with
//! the status the contract fixes (400, 401, 404, 413, 415).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use cache_node::admin::{ApiError, constant_time_eq};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::cache::{CachedImage, ImageCache};
use crate::image::{self, ImageKey, MAX_IMAGE_BYTES};
use crate::store::{ImageMeta, Storage, StoreError};

/// Default and largest page of a listing.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;

/// State of the site's handlers.
#[derive(Clone)]
pub struct AppState {
    pub storage: Arc<Storage>,
    pub cache: Arc<ImageCache>,
    /// Bearer token that may delete all data through the API.
    pub admin_token: Arc<str>,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// Request counters of the site (exported by `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    pub uploads: AtomicU64,
    pub views: AtomicU64,
    pub rejected: AtomicU64,
}

/// The site's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/api/v1/images/{key}",
            get(view_image)
                .put(upload_image)
                .layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES + 1)),
        )
        .route("/api/v1/images", get(list_images))
        .route("/api/v1/data", delete(delete_data))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A failure the caller cannot fix: logged with its detail, answered without it.
fn internal(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    error!(error = %e, "{what}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{what}; see the server's log"),
    )
}

fn parse_key(state: &AppState, key: &str) -> Result<ImageKey, ApiError> {
    ImageKey::parse(key).map_err(|e| {
        state.counters.rejected.fetch_add(1, Ordering::Relaxed);
        ApiError::new(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
        )
        .field("key")
    })
}

/// An image as the JSON API describes it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageJson {
    key: String,
    size: u64,
    content_type: String,
    etag: String,
    uploaded_at: String,
}

impl From<&ImageMeta> for ImageJson {
    fn from(meta: &ImageMeta) -> Self {
        Self {
            key: meta.key.clone(),
            size: meta.size,
            content_type: meta.content_type.clone(),
            etag: quoted(&meta.etag),
            uploaded_at: rfc3339(meta.uploaded_at),
        }
    }
}

fn quoted(etag: &str) -> String {
    format!("\"{etag}\"")
}

fn rfc3339(at: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(at).map_or_else(|_| String::new(), |t| t.to_string())
}

async fn upload_image(
    State(state): State<AppState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = parse_key(&state, &key)?;
    let info = image::check_upload(&body).map_err(|e| {
        state.counters.rejected.fetch_add(1, Ordering::Relaxed);
        ApiError::new(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
        )
        .field("image")
    })?;
    let content_type = info.format.content_type();
    let outcome = state
        .storage
        .put_image(key.as_str(), body, content_type)
        .await
        .map_err(|e| internal("storing the image failed", &e))?;
    // Before answering: nobody may see the old image once the upload returned. A new key
    // has nothing cached (a missing image is never cached), so only a replacement pays for
    // the invalidation and its short uncached spell.
    if !outcome.created
        && let Err(e) = state.cache.invalidate(&key).await
    {
        // The pool's copy expires with its TTL; the tombstone could not be written now.
        error!(key = key.as_str(), error = %e, "invalidating the cached image failed");
    }
    state.counters.uploads.fetch_add(1, Ordering::Relaxed);
    info!(
        key = key.as_str(),
        size = outcome.meta.size,
        created = outcome.created,
        "image uploaded"
    );
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ImageJson::from(&outcome.meta))).into_response())
}

async fn view_image(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(&state, &key)?;
    let storage = state.storage.clone();
    let lookup = key.as_str().to_owned();
    let fetched = state
        .cache
        .get_or_fill(&key, move || async move {
            let image = storage.get_image(&lookup).await?;
            Ok::<_, StoreError>(image.map(|image| CachedImage {
                content_type: image.meta.content_type,
                etag: image.meta.etag,
                body: image.bytes,
            }))
        })
        .await
        .map_err(|e| internal("reading the image failed", &e))?;
    let Some(fetched) = fetched else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no image under the key {:?}", key.as_str()),
        ));
    };
    state.counters.views.fetch_add(1, Ordering::Relaxed);
    let image = fetched.image;
    let etag = quoted(&image.etag);
    let x_cache = if fetched.hit { "hit" } else { "miss" };
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Response::new(Body::from(image.body))
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&image.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // Re-uploads replace an image under the same URL: caches must revalidate (cheap: ETag).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-cache", HeaderValue::from_static(x_cache));
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListJson {
    items: Vec<ImageJson>,
    next: Option<String>,
}

async fn list_images(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<ListJson>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit must lie within [1, {MAX_LIMIT}]"),
        )
        .field("limit"));
    }
    let page = state
        .storage
        .list(limit, query.cursor.as_deref())
        .await
        .map_err(|e| match e {
            StoreError::BadCursor => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()).field("cursor")
            }
            e => internal("listing images failed", &e),
        })?;
    Ok(Json(ListJson {
        items: page.items.iter().map(ImageJson::from).collect(),
        next: page.next,
    }))
}

async fn delete_data(
    State(state): State<AppState>,
    manager: Option<axum::Extension<crate::ui::ManagerAuthorized>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A manager session with its CSRF token (checked by `ui::Ui::authorize_api`) may too.
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        _ if manager.is_some() => {}
        Some(token) if constant_time_eq(token.as_bytes(), state.admin_token.as_bytes()) => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong bearer token",
            ));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing Authorization: Bearer <admin token>",
            ));
        }
    }
    let deleted = state
        .storage
        .delete_all()
        .await
        .map_err(|e| internal("deleting the data failed", &e))?;
    let cache = state.cache.invalidate_all().await;
    if let Err(e) = &cache {
        error!(error = %e, "flushing the pool after deleting all data failed");
    }
    info!(
        rows = deleted.rows,
        objects = deleted.objects,
        "all application data deleted"
    );
    Ok(Json(serde_json::json!({
        "rows": deleted.rows,
        "objects": deleted.objects,
        "cacheFlushed": cache.is_ok(),
    }))
    .into_response())
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.storage.count().await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            error!(error = %e, "readiness: the database does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database does not answer\n",
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write as _;
    let c = &state.counters;
    let s = state.cache.stats();
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = write!(
            text,
            "# HELP cachepool_web_{name} {help}\n# TYPE cachepool_web_{name} counter\ncachepool_web_{name}_total {value}\n"
        );
    };
    counter(
        "uploads",
        "Images stored.",
        c.uploads.load(Ordering::Relaxed),
    );
    counter("views", "Images served.", c.views.load(Ordering::Relaxed));
    counter(
        "rejected",
        "Uploads and requests refused for a bad key or image.",
        c.rejected.load(Ordering::Relaxed),
    );
    counter("pool_hits", "Image reads the pool served.", s.hits);
    counter(
        "pool_misses",
        "Image reads the pool did not serve.",
        s.misses,
    );
    counter(
        "pool_fills",
        "Fills from the database and object store.",
        s.fills,
    );
    counter(
        "pool_fills_collapsed",
        "Readers served by another reader's fill.",
        s.collapsed,
    );
    counter("pool_fill_errors", "Fills that failed.", s.fill_errors);
    counter("pool_errors", "Pool requests that failed.", s.pool_errors);
    counter(
        "pool_invalidations",
        "Invalidations after uploads and deletes.",
        s.invalidations,
    );
    text.push_str("# EOF\n");
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
