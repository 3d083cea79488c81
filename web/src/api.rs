//! The site's JSON API (DESIGN.md, "Web JSON API"): upload, view and list images, delete all
//! application data, and the probes and `/metrics`.
//!
//! Reads go to the in-process cache of hot images and then the pool through [`ImageCache`]; a
//! miss reads the database and the object store and fills the pool, one fill per key at a
//! time. An upload validates the key and the bytes (by their content, never their name or
//! declared type), writes the object and the row ([`Storage::put_image`]), then invalidates
//! the cached copies (and waits out the in-process lease) before answering, so nobody sees
//! the old image after the upload returned. Errors are `{"error", "message", "field"?}`
//! ([`ErrorBody`]) with the status the contract fixes (400, 401, 404, 413, 415).
//!
//! Thumbnails ([`crate::thumbnails`]): an upload makes the image's thumbnail (on a blocking
//! thread) and stores it with the image; `GET /api/v1/images/{key}/thumbnail` reads it like
//! the image (in-process cache, pool, store; one fill per key), making it on first request
//! for an image stored without one. The image's invalidation covers its thumbnail.
//!
//! Each `/api/v1` route is registered from its handler's `#[utoipa::path]` (path and methods,
//! by `documented`), which also feeds the OpenAPI document ([`crate::openapi`]), so the two
//! cannot disagree. The routes are assembled with the document's and the pages' into the
//! site's router by [`crate::app`], which depends on this module and not the other way round:
//! what the pages hand to these handlers ([`AppState`], [`ManagerAuthorized`]) is defined here.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest as _, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get};
use axum::{Extension, Json, Router};
use cache_node::admin::{ApiError, check_bearer};
use serde::{Deserialize, Serialize};
use tracing::{error, info};
use utoipa::openapi::path::HttpMethod;
use utoipa::{IntoParams, ToSchema};

use crate::cache::{CachedImage, Fetched, ImageCache};
use crate::image::{self, ImageKey, MAX_IMAGE_BYTES};
use crate::metrics::{self, WebMetrics};
use crate::store::{ImageMeta, Object, Storage, StoreError};
use crate::thumbnails::{self, Thumbnailer};

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
    /// The site's Prometheus metrics (`/metrics`).
    pub metrics: WebMetrics,
    /// Makes thumbnails, a few at a time, off the runtime's threads.
    pub thumbnailer: Thumbnailer,
}

impl AppState {
    /// The state over `storage` and `cache`, with fresh metrics that `storage` reports its
    /// database and object store latencies to, and `cache` its pool latencies.
    pub fn new(storage: Storage, cache: Arc<ImageCache>, admin_token: &str) -> AppState {
        let metrics = WebMetrics::new(cache.clone());
        cache.attach_metrics(metrics.store());
        AppState {
            storage: Arc::new(storage.with_metrics(metrics.store())),
            cache,
            admin_token: admin_token.into(),
            thumbnailer: Thumbnailer::new(metrics.clone(), Thumbnailer::default_concurrency()),
            metrics,
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// Marks a request to this API that a manager session with its CSRF token authorised (the
/// pages' middleware `ui::Ui::authorize_api` inserts it); `DELETE /api/v1/data` accepts it
/// instead of the bearer token.
#[derive(Clone, Copy, Debug)]
pub struct ManagerAuthorized;

/// Every JSON error: `{"error", "message", "field"?}`, as the OpenAPI document describes it.
/// The handlers answer with `cache_node::admin::ApiError`, whose body is
/// `cachepool_crds::api::ErrorBody`, the one error body of every Cachepool API; that type has
/// no OpenAPI schema, so this mirrors it for the document.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Short machine-readable code, e.g. `bad_request`, `invalid_key`, `unauthorized`.
    pub error: String,
    /// What is wrong and what is allowed, for people.
    pub message: String,
    /// The request field at fault (`key`, `image`, `limit`, `cursor`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The API's routes: the `/api/v1` image and data routes, the probes and `/metrics`. The
/// OpenAPI document's own route comes from [`crate::openapi::routes`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(v1())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The `/api/v1` routes, each taking its path and methods from its handler's
/// `#[utoipa::path]`, so the OpenAPI document lists exactly what is served.
fn v1() -> Router<AppState> {
    let router = Router::new();
    let router = documented::<__path_upload_image, _, _>(router, upload_image);
    let router = documented::<__path_view_image, _, _>(router, view_image);
    let router = documented::<__path_view_thumbnail, _, _>(router, view_thumbnail);
    let router = documented::<__path_list_images, _, _>(router, list_images);
    let router = documented::<__path_delete_data, _, _>(router, delete_data);
    // Only uploads read a body; one byte over the limit lets `check_upload` say by how much.
    router.layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES + 1))
}

/// Adds `handler` to `router` at the path and on the methods its `#[utoipa::path]` names
/// (axum merges the methods of routes added twice at one path).
pub(crate) fn documented<P, H, T>(router: Router<AppState>, handler: H) -> Router<AppState>
where
    P: utoipa::Path,
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = P::methods()
        .into_iter()
        .map(|method| match method {
            HttpMethod::Get => MethodFilter::GET,
            HttpMethod::Post => MethodFilter::POST,
            HttpMethod::Put => MethodFilter::PUT,
            HttpMethod::Delete => MethodFilter::DELETE,
            HttpMethod::Options => MethodFilter::OPTIONS,
            HttpMethod::Head => MethodFilter::HEAD,
            HttpMethod::Patch => MethodFilter::PATCH,
            HttpMethod::Trace => MethodFilter::TRACE,
        })
        .reduce(MethodFilter::or)
        .unwrap_or(MethodFilter::GET);
    router.route(&P::path(), axum::routing::on(filter, handler))
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
        state.metrics.rejected();
        ApiError::new(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
        )
        .field("key")
    })
}

/// An image as the JSON API describes it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ImageJson {
    /// The image key.
    key: String,
    /// Size in bytes.
    size: u64,
    /// `image/png`, `image/jpeg`, `image/gif` or `image/webp`, found from the bytes.
    content_type: String,
    /// The strong ETag of the bytes, quoted as in the `ETag` header.
    etag: String,
    /// When this version was uploaded (RFC 3339).
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

/// An upload over [`MAX_IMAGE_BYTES`]: 413.
fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the image is larger than the limit of {MAX_IMAGE_BYTES} bytes (10 MiB): \
             upload a smaller or more compressed image"
        ),
    )
    .field("image")
}

/// The body length a request declares (`Content-Length`), if it declares one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why an upload's body could not be read: over the limit (413) or broken off (400).
fn body_refusal(state: &AppState, e: &BytesRejection) -> ApiError {
    state.metrics.rejected();
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read the request body: {e}"),
        )
        .field("image")
    }
}

/// Stores the body under the key, replacing any image the key held; the bytes decide the
/// format, never the name or `Content-Type`.
#[utoipa::path(
    put,
    path = "/api/v1/images/{key}",
    tag = "images",
    params(("key" = String, Path, description = "1 to 200 characters: letters, digits, '.', '_' and '-', starting with a letter or digit")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The image file's bytes: PNG, JPEG, GIF or WebP, at most 10 MiB"),
    responses(
        (status = 201, description = "A new image stored", body = ImageJson),
        (status = 200, description = "The key's image replaced; readers see the new bytes from now on", body = ImageJson),
        (status = 400, description = "Invalid key, or an empty body", body = ErrorBody),
        (status = 413, description = "Larger than 10 MiB", body = ErrorBody),
        (status = 415, description = "Not an accepted image (SVG included)", body = ErrorBody),
    )
)]
pub(crate) async fn upload_image(
    State(state): State<AppState>,
    Path(key): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = parse_key(&state, &key)?;
    // A body that declares itself too large is refused before a byte of it is read (a client
    // that sent `Expect: 100-continue` then sends none); one that turns out too large is
    // refused at the limit.
    let body = if declared_length(request.headers()).is_some_and(|n| n > MAX_IMAGE_BYTES as u64) {
        state.metrics.rejected();
        Err(too_large())
    } else {
        Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_refusal(&state, &e))
    };
    let body = match body {
        Ok(body) => body,
        Err(refused) => {
            // The rest of the body may still be on its way: the server closes the connection
            // after answering, and says so, so that the client does not send its next
            // request on a connection about to close. The close lingers, reading what the
            // client still sends (crate::listener), so the client reads this answer instead
            // of a reset.
            let mut refused = refused.into_response();
            refused
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(refused);
        }
    };
    let info = image::check_upload(&body).map_err(|e| {
        state.metrics.rejected();
        ApiError::new(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
        )
        .field("image")
    })?;
    let content_type = info.format.content_type();
    // Made before the row is written, so that a reader of the new row finds it; an image it
    // cannot be made of is stored without one (and served as its own thumbnail).
    let thumbnail = state
        .thumbnailer
        .make(key.as_str(), body.clone())
        .await
        .map(|made| Object {
            content_type: made.format.content_type().to_owned(),
            bytes: Bytes::from(made.bytes),
        });
    let outcome = state
        .storage
        .put_image_with_thumbnail(key.as_str(), body, content_type, thumbnail)
        .await
        .map_err(|e| internal("storing the image failed", &e))?;
    // Before answering: nobody may see the old image, or its thumbnail, once the upload
    // returned. A new key has nothing cached (a missing image, and so its thumbnail, is never
    // cached), so only a replacement pays for the invalidation and its short uncached spell.
    if !outcome.created
        && let Err(e) = state.cache.invalidate(&key).await
    {
        // The pool's copy expires with its TTL; the tombstone could not be written now.
        error!(key = key.as_str(), error = %e, "invalidating the cached image failed");
    }
    state.metrics.uploaded();
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

/// The image's bytes, from the site's in-process cache of hot images (`X-Cache: local`), else
/// from the pool when it holds them (`X-Cache: hit`), else from the database and object store
/// (`X-Cache: miss`, and the pool is filled).
#[utoipa::path(
    get,
    path = "/api/v1/images/{key}",
    tag = "images",
    params(
        ("key" = String, Path, description = "The image key"),
        ("If-None-Match" = Option<String>, Header, description = "ETags the client holds; a match answers 304"),
    ),
    responses(
        (status = 200, description = "The image", content_type = "image/*", body = Vec<u8>,
            headers(
                ("ETag" = String, description = "Strong ETag of the bytes"),
                ("X-Cache" = String, description = "`local` when the site's in-process cache served the image, `hit` when the pool did, else `miss`"),
                ("Cache-Control" = String, description = "`no-cache`: a re-upload replaces the image under the same URL"),
            )
        ),
        (status = 304, description = "The client's copy is current"),
        (status = 400, description = "Invalid key", body = ErrorBody),
        (status = 404, description = "No image under the key", body = ErrorBody),
    )
)]
pub(crate) async fn view_image(
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
        return Err(no_image(&key));
    };
    state.metrics.viewed();
    Ok(served(fetched, &headers))
}

/// An image (or thumbnail) as the caches or a fill gave it, with its headers; 304 when the
/// client's `If-None-Match` names its ETag.
fn served(fetched: Fetched, headers: &HeaderMap) -> Response {
    let image = fetched.image;
    let etag = quoted(&image.etag);
    let x_cache = match (fetched.local, fetched.hit) {
        (true, _) => "local",
        (false, true) => "hit",
        (false, false) => "miss",
    };
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
    response
}

fn no_image(key: &ImageKey) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no image under the key {:?}", key.as_str()),
    )
}

/// The image's thumbnail: at most 320 pixels on its long side, never larger than the image,
/// the first frame of an animation; JPEG, or PNG when the image has transparency. Read like
/// the image (in-process cache, pool, store) and made on first request for an image stored
/// without one. An image no thumbnail can be made of (over 8192 pixels a side or 24
/// megapixels, or undecodable) is answered with its own bytes.
#[utoipa::path(
    get,
    path = "/api/v1/images/{key}/thumbnail",
    tag = "images",
    params(
        ("key" = String, Path, description = "The image key"),
        ("If-None-Match" = Option<String>, Header, description = "ETags the client holds; a match answers 304"),
    ),
    responses(
        (status = 200, description = "The thumbnail (`image/jpeg` or `image/png`), or the image itself when none can be made of it", content_type = "image/*", body = Vec<u8>,
            headers(
                ("ETag" = String, description = "Strong ETag of the bytes"),
                ("X-Cache" = String, description = "`local` when the site's in-process cache served it, `hit` when the pool did, else `miss`"),
                ("Cache-Control" = String, description = "`no-cache`: a re-upload replaces the thumbnail under the same URL"),
            )
        ),
        (status = 304, description = "The client's copy is current"),
        (status = 400, description = "Invalid key", body = ErrorBody),
        (status = 404, description = "No image under the key", body = ErrorBody),
    )
)]
pub(crate) async fn view_thumbnail(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(&state, &key)?;
    let fetched = thumbnails::fetch(
        &state.cache,
        state.storage.clone(),
        state.thumbnailer.clone(),
        &key,
    )
    .await
    .map_err(|e| internal("reading the thumbnail failed", &e))?;
    let Some(fetched) = fetched else {
        return Err(no_image(&key));
    };
    Ok(served(fetched, &headers))
}

/// A listing's query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Images per page, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// The `next` value of the previous page, unchanged.
    cursor: Option<String>,
}

/// One page of the listing.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ListJson {
    /// Up to `limit` images, newest first.
    items: Vec<ImageJson>,
    /// The cursor of the next page; null on the last page.
    next: Option<String>,
}

/// The images, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/images",
    tag = "images",
    params(ListQuery),
    responses(
        (status = 200, description = "One page, newest first", body = ListJson),
        (status = 400, description = "A limit outside 1..=200 or a cursor this API did not make", body = ErrorBody),
    )
)]
pub(crate) async fn list_images(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListJson>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "invalid query ({}): limit must be a whole number within [1, {MAX_LIMIT}] and \
                 cursor the `next` of the previous page",
                e.body_text()
            ),
        )
    })?;
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

/// What deleting all data removed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeletedJson {
    /// Rows deleted from the database.
    rows: u64,
    /// Objects deleted from the object store.
    objects: u64,
    /// Whether the pool was flushed too (its entries expire anyway when it could not be).
    cache_flushed: bool,
}

/// Deletes every image: rows, objects and the pool's entries.
#[utoipa::path(
    delete,
    path = "/api/v1/data",
    tag = "admin",
    security(("adminToken" = [])),
    responses(
        (status = 200, description = "Everything deleted", body = DeletedJson),
        (status = 401, description = "No bearer token, or the wrong one", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
    )
)]
pub(crate) async fn delete_data(
    State(state): State<AppState>,
    manager: Option<Extension<ManagerAuthorized>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A manager session with its CSRF token (checked by `ui::Ui::authorize_api`) may too.
    if manager.is_none() {
        check_bearer(&headers, &[&state.admin_token], "admin token")?;
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
    Ok(Json(DeletedJson {
        rows: deleted.rows,
        objects: deleted.objects,
        cache_flushed: cache.is_ok(),
    })
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
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => internal("encoding the metrics failed", &e).into_response(),
    }
}
