//! The site's HTML pages and the manager UI (the page contract of `docs/ui.md`).
//!
//! Public pages: the listing (`/`), the upload form (`/upload`) and an image's page
//! (`/images/KEY`). The manager (`/manager…`, login required) shows the pool, its nodes and six
//! charts of the last 30 minutes, and steers the pool through the operator's API. Pages are
//! askama templates (auto-escaped); one stylesheet and one small refresh script are embedded in
//! the binary and served from `/static/`, so the Content-Security-Policy can forbid inline
//! scripts. Every POST carries a CSRF token (see [`auth`]) and answers 403 without one, before
//! anything is read or changed.
//!
//! - [`auth`]: password, sessions, CSRF tokens, login back-off.
//! - [`forms`]: the manager's forms → merge patches, operator error fields → form fields.
//! - [`charts`]: the charts as server-side SVG (plotters).
//! - [`operator`]: the client of the operator's API.

pub mod auth;
pub mod charts;
pub mod forms;
pub mod operator;

use std::sync::Arc;

use askama::Template;
use axum::extract::{DefaultBodyLimit, FromRef, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use axum_extra::extract::cookie::{Cookie, Key, SignedCookieJar};
use cache_node::admin::ApiError;
use cachepool_crds::pool::{CachePolicy, CachePool, ScalingMode};
use serde::Deserialize;
use tracing::{error, info};

use crate::app::AppState;
use crate::image::{self, ImageKey, MAX_IMAGE_BYTES};
use crate::store::StoreError;
use auth::{Auth, AuthError, Session};
use charts::Chart;
use forms::{CacheForm, FieldErrors, ScalingForm, human_size};
use operator::{OperatorClient, OperatorError};

/// Images per listing page.
const PAGE_SIZE: u32 = 24;
/// Name of the cookie that carries a message to the next page (signed, read once).
const FLASH_COOKIE: &str = "cachepool_flash";

const STYLESHEET: &str = include_str!("../../static/site.css");
const MANAGER_SCRIPT: &str = include_str!("../../static/manager.js");

/// No inline script or style, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the pages and the manager are configured with.
#[derive(Debug)]
pub struct UiConfig {
    /// The admin password's argon2 hash (PHC string); `None`: nobody can log in.
    pub password_hash: Option<String>,
    /// Secret the cookie signing key is derived from; `None`: random per process.
    pub session_secret: Option<String>,
    /// Mark cookies `Secure` (the site is served over https).
    pub secure_cookies: bool,
    /// The operator's API with a token that may write.
    pub operator: OperatorClient,
}

/// The UI: its authentication and its operator client.
#[derive(Clone, Debug)]
pub struct Ui {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    auth: Auth,
    operator: OperatorClient,
}

/// Marks a request to the JSON API that a manager session with its CSRF token authorised
/// ([`Ui::authorize_api`]); `DELETE /api/v1/data` accepts it instead of the bearer token.
#[derive(Clone, Copy, Debug)]
pub struct ManagerAuthorized;

#[derive(Clone, Debug)]
struct UiState {
    app: AppState,
    ui: Ui,
}

impl FromRef<UiState> for Key {
    fn from_ref(state: &UiState) -> Key {
        state.ui.inner.auth.key().clone()
    }
}

impl Ui {
    /// Sets up from the configuration (checks the hash and the session secret).
    pub fn new(config: UiConfig) -> Result<Ui, AuthError> {
        let key = auth::session_key(config.session_secret.as_deref())?;
        let auth = Auth::new(config.password_hash, key, config.secure_cookies)?;
        Ok(Ui {
            inner: Arc::new(Inner {
                auth,
                operator: config.operator,
            }),
        })
    }

    /// The pages' routes, to merge into the site's router.
    pub fn router(&self, app: AppState) -> Router {
        let state = UiState {
            app,
            ui: self.clone(),
        };
        Router::new()
            .route("/", get(listing))
            .route(
                "/upload",
                get(upload_form)
                    .post(upload)
                    .layer(DefaultBodyLimit::max(UPLOAD_FORM_LIMIT)),
            )
            .route("/images/{key}", get(image_page))
            .route("/static/site.css", get(stylesheet))
            .route("/static/manager.js", get(script))
            // Browsers ask for it on every site; there is none, and a 404 would fill the logs.
            .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
            .route("/manager", get(manager))
            .route("/manager/login", get(login_form).post(login))
            .route("/manager/logout", post(logout))
            .route("/manager/status", get(status))
            .route("/manager/cache", post(cache_settings))
            .route("/manager/scaling", post(scaling_settings))
            .route("/manager/scale/grow", post(grow))
            .route("/manager/scale/shrink", post(shrink))
            .route("/manager/flush", post(flush))
            .route("/manager/delete", get(confirm_delete).post(delete_all))
            .layer(middleware::map_response(security_headers))
            .with_state(state)
    }

    /// Middleware for the JSON API's router: a `DELETE /api/v1/data` without a bearer token but
    /// with a manager session is marked [`ManagerAuthorized`] when its `X-CSRF-Token` header is
    /// the session's token, and refused (403) when it is not.
    pub async fn authorize_api(State(ui): State<Ui>, mut request: Request, next: Next) -> Response {
        let candidate = request.method() == Method::DELETE
            && request.uri().path() == "/api/v1/data"
            && !request.headers().contains_key(header::AUTHORIZATION);
        if candidate {
            let auth = &ui.inner.auth;
            let jar = SignedCookieJar::from_headers(request.headers(), auth.key().clone());
            if let Some(session) = auth.session(&jar) {
                let token = request
                    .headers()
                    .get("x-csrf-token")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !auth.check_csrf("session", &session.id, token) {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "csrf",
                        "a manager session needs the header X-CSRF-Token with the token of its pages",
                    )
                    .into_response();
                }
                request.extensions_mut().insert(ManagerAuthorized);
            }
        }
        next.run(request).await
    }
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Pages carry CSRF tokens and change with every upload: never from a cache.
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A rendered page with a status; a template failure is logged and answered 500.
fn page(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            error!(error = %e, "rendering a page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the page failed",
            )
                .into_response()
        }
    }
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: String,
    message: String,
}

fn error_page(status: StatusCode, title: &str, message: impl Into<String>) -> Response {
    page(
        status,
        &ErrorPage {
            title: title.to_owned(),
            message: message.into(),
        },
    )
}

fn internal_page(what: &str, e: &dyn std::fmt::Display) -> Response {
    error!(error = %e, "{what}");
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        format!("{what}; see the server's log."),
    )
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        MANAGER_SCRIPT,
    )
        .into_response()
}

// ---- Public pages ----------------------------------------------------------------------

struct ListItem {
    key: String,
    size: String,
}

#[derive(Template)]
#[template(path = "listing.html")]
struct ListingPage {
    items: Vec<ListItem>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct ListingQuery {
    cursor: Option<String>,
}

async fn listing(State(state): State<UiState>, Query(query): Query<ListingQuery>) -> Response {
    let page_of = state
        .app
        .storage
        .list(PAGE_SIZE, query.cursor.as_deref().filter(|c| !c.is_empty()))
        .await;
    match page_of {
        Ok(p) => page(
            StatusCode::OK,
            &ListingPage {
                items: p
                    .items
                    .into_iter()
                    .map(|m| ListItem {
                        size: human_size(m.size),
                        key: m.key,
                    })
                    .collect(),
                next: p.next,
            },
        ),
        Err(StoreError::BadCursor) => error_page(
            StatusCode::BAD_REQUEST,
            "No such page",
            "This page link is not valid (any more); start again from the first page.",
        ),
        Err(e) => internal_page("listing images failed", &e),
    }
}

#[derive(Template)]
#[template(path = "upload.html")]
struct UploadPage {
    key: String,
    csrf: String,
    errors: FieldErrors,
    form_error: Option<String>,
}

async fn upload_form(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    let auth = &state.ui.inner.auth;
    let (jar, visitor) = auth.visitor(jar);
    let form = UploadPage {
        key: String::new(),
        csrf: auth.csrf_token("visitor", &visitor),
        errors: FieldErrors::new(),
        form_error: None,
    };
    (jar, page(StatusCode::OK, &form)).into_response()
}

/// Largest upload form read to its end. An image over [`MAX_IMAGE_BYTES`] is read on and
/// discarded up to this size so that the browser, still sending, gets the page saying the
/// limit: answering early makes the server close the connection under the sender, which a
/// browser shows as a reset. Beyond this size the form is cut off (and the browser may show
/// that reset) rather than read for nothing.
const UPLOAD_FORM_LIMIT: usize = 4 * MAX_IMAGE_BYTES;

/// The fields of the upload form.
#[derive(Default)]
struct UploadFields {
    key: String,
    /// The image, when it is within [`MAX_IMAGE_BYTES`].
    image: Option<bytes::Bytes>,
    /// The image's size, when it is over [`MAX_IMAGE_BYTES`] (its bytes were discarded).
    too_large: Option<usize>,
    csrf: String,
}

async fn read_upload(mut multipart: Multipart) -> Result<UploadFields, (StatusCode, String)> {
    let mut fields = UploadFields::default();
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the form is larger than {}, and the image's limit is {}",
                    human_size(UPLOAD_FORM_LIMIT as u64),
                    human_size(MAX_IMAGE_BYTES as u64)
                ),
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                format!("the form could not be read: {e}"),
            )
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(failed)? {
        match field.name() {
            Some("key") => fields.key = field.text().await.map_err(failed)?,
            Some("csrf") => fields.csrf = field.text().await.map_err(failed)?,
            Some("image") => {
                let mut image = bytes::BytesMut::new();
                let mut size = 0;
                while let Some(chunk) = field.chunk().await.map_err(failed)? {
                    size += chunk.len();
                    if size <= MAX_IMAGE_BYTES {
                        image.extend_from_slice(&chunk);
                    }
                }
                if size > MAX_IMAGE_BYTES {
                    fields.too_large = Some(size);
                } else {
                    fields.image = Some(image.freeze());
                }
            }
            _ => {}
        }
    }
    Ok(fields)
}

async fn upload(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let auth = &state.ui.inner.auth;
    let csrf_ok = |fields: &UploadFields| auth.check_visitor_csrf(&jar, &fields.csrf);
    let read = match multipart {
        Ok(m) => read_upload(m).await,
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("send the form as multipart/form-data: {e}"),
        )),
    };
    // A form that could not be read to its end (over UPLOAD_FORM_LIMIT, or broken off): the
    // connection closes after the answer, and the answer says so.
    let cut_off = read.is_err();
    let (status, field, message, key) = match read {
        Err((status, message)) => (status, Some("image"), message, String::new()),
        Ok(fields) if !csrf_ok(&fields) => (
            StatusCode::FORBIDDEN,
            None,
            "The form's security token is missing or stale: nothing was uploaded. Reload the page and try again."
                .to_owned(),
            fields.key,
        ),
        Ok(fields) => match store_upload(&state, &fields).await {
            Ok(key) => return see_other(&format!("/images/{}", path_segment(key.as_str()))),
            Err((status, field, message)) => (status, field, message, fields.key),
        },
    };
    state.app.metrics.rejected();
    let (jar, visitor) = auth.visitor(jar.clone());
    let mut errors = FieldErrors::new();
    let mut form_error = None;
    match field {
        Some(field) => {
            errors.insert(field, message);
        }
        None => form_error = Some(message),
    }
    let form = UploadPage {
        key,
        csrf: auth.csrf_token("visitor", &visitor),
        errors,
        form_error,
    };
    let mut response = (jar, page(status, &form)).into_response();
    if cut_off {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

type UploadError = (StatusCode, Option<&'static str>, String);

/// Validates and stores an upload as the JSON API does; the error names the form field.
async fn store_upload(state: &UiState, fields: &UploadFields) -> Result<ImageKey, UploadError> {
    let key = ImageKey::parse(fields.key.trim()).map_err(|e| {
        (
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            Some("key"),
            e.to_string(),
        )
    })?;
    if let Some(size) = fields.too_large {
        let refusal = image::ImageError::TooLarge {
            size,
            limit: MAX_IMAGE_BYTES,
        };
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("image"),
            refusal.to_string(),
        ));
    }
    let Some(body) = fields.image.clone().filter(|b| !b.is_empty()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            Some("image"),
            "choose an image file (PNG, JPEG, GIF or WebP)".to_owned(),
        ));
    };
    let info = image::check_upload(&body).map_err(|e| {
        (
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            Some("image"),
            e.to_string(),
        )
    })?;
    let outcome = state
        .app
        .storage
        .put_image(key.as_str(), body, info.format.content_type())
        .await
        .map_err(|e| {
            error!(error = %e, "storing an uploaded image failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "storing the image failed; see the server's log".to_owned(),
            )
        })?;
    if !outcome.created
        && let Err(e) = state.app.cache.invalidate(&key).await
    {
        error!(key = key.as_str(), error = %e, "invalidating the cached image failed");
    }
    state.app.metrics.uploaded();
    info!(
        key = key.as_str(),
        size = outcome.meta.size,
        created = outcome.created,
        "image uploaded through the form"
    );
    Ok(key)
}

/// A key as one URL path segment. Checked keys need no encoding; encoding anyway keeps the
/// redirect safe should the key rule ever admit more characters.
fn path_segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage {
    key: String,
    size: String,
    bytes: u64,
    content_type: String,
    uploaded: String,
}

async fn image_page(State(state): State<UiState>, Path(key): Path<String>) -> Response {
    let Ok(parsed) = ImageKey::parse(&key) else {
        return error_page(
            StatusCode::NOT_FOUND,
            "No such image",
            format!("There is no image under the key {key:?}."),
        );
    };
    match state.app.storage.get_meta(parsed.as_str()).await {
        Ok(Some(meta)) => page(
            StatusCode::OK,
            &ImagePage {
                size: human_size(meta.size),
                bytes: meta.size,
                uploaded: jiff::Timestamp::try_from(meta.uploaded_at)
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default(),
                content_type: meta.content_type,
                key: meta.key,
            },
        ),
        Ok(None) => error_page(
            StatusCode::NOT_FOUND,
            "No such image",
            format!("There is no image under the key {key:?}."),
        ),
        Err(e) => internal_page("reading the image's details failed", &e),
    }
}

// ---- Manager: login, logout ------------------------------------------------------------

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    error: Option<String>,
}

fn login_page(
    state: &UiState,
    jar: SignedCookieJar,
    status: StatusCode,
    error: Option<String>,
) -> Response {
    let auth = &state.ui.inner.auth;
    let (jar, visitor) = auth.visitor(jar);
    let error = error.or_else(|| {
        (!auth.has_password()).then(|| {
            "No admin password is configured: start the site with --admin-password or CACHEPOOL_ADMIN_PASSWORD.".to_owned()
        })
    });
    let form = LoginPage {
        csrf: auth.csrf_token("visitor", &visitor),
        error,
    };
    (jar, page(status, &form)).into_response()
}

async fn login_form(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    if state.ui.inner.auth.session(&jar).is_some() {
        return see_other("/manager");
    }
    login_page(&state, jar, StatusCode::OK, None)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let auth = &state.ui.inner.auth;
    if !auth.check_visitor_csrf(&jar, &form.csrf) {
        return login_page(
            &state,
            jar,
            StatusCode::FORBIDDEN,
            Some(
                "The form's security token is missing or stale. Reload the page and try again."
                    .into(),
            ),
        );
    }
    if !auth.verify_password(form.password).await {
        return login_page(
            &state,
            jar,
            StatusCode::UNAUTHORIZED,
            Some("Wrong password.".into()),
        );
    }
    let session = Session::new(auth::unix_now());
    info!("manager login");
    let jar = jar.add(auth.session_cookie(&session));
    (jar, see_other("/manager")).into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Why a manager POST is not carried out.
enum Refused {
    /// No session: to the login page.
    NoSession,
    /// A missing or wrong CSRF token.
    BadToken,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::NoSession => see_other("/manager/login"),
            Refused::BadToken => error_page(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "The form's security token is missing or stale: nothing was changed. Reload the page and try again.",
            ),
        }
    }
}

/// The session and a checked CSRF token, or why not: 303 to the login page without a
/// session, 403 with a wrong or missing token.
fn authorise_post(state: &UiState, jar: &SignedCookieJar, csrf: &str) -> Result<Session, Refused> {
    let auth = &state.ui.inner.auth;
    let session = auth.session(jar).ok_or(Refused::NoSession)?;
    if !auth.check_csrf("session", &session.id, csrf) {
        return Err(Refused::BadToken);
    }
    Ok(session)
}

async fn logout(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = match authorise_post(&state, &jar, &form.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    state.ui.inner.auth.revoke(&session);
    info!("manager logout");
    let jar = jar.remove(Cookie::build(auth::SESSION_COOKIE).path("/"));
    (jar, see_other("/manager/login")).into_response()
}

// ---- Manager: dashboard ----------------------------------------------------------------

struct NodeRow {
    slot: u32,
    state: String,
    address: String,
}

/// The pool as the dashboard shows it.
struct PoolView {
    node_count: String,
    mode: String,
    policy: String,
    capacity: String,
    phase: String,
    grow_disabled: bool,
    shrink_disabled: bool,
    nodes: Vec<NodeRow>,
}

impl PoolView {
    fn of(pool: Option<&CachePool>) -> PoolView {
        let Some(pool) = pool else {
            return PoolView {
                node_count: String::new(),
                mode: String::new(),
                policy: String::new(),
                capacity: String::new(),
                phase: String::new(),
                grow_disabled: true,
                shrink_disabled: true,
                nodes: Vec::new(),
            };
        };
        let status = pool.status.clone().unwrap_or_default();
        let scaling = &pool.spec.scaling;
        let auto = scaling.mode == ScalingMode::Auto;
        PoolView {
            node_count: status.replicas.to_string(),
            mode: forms::mode_name(scaling.mode).to_owned(),
            policy: String::from(pool.spec.cache.policy.clone()),
            capacity: pool.spec.cache.capacity_mib.to_string(),
            phase: status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
            grow_disabled: auto || scaling.replicas >= scaling.max_replicas,
            shrink_disabled: auto || scaling.replicas <= scaling.min_replicas,
            nodes: status
                .nodes
                .iter()
                .map(|n| NodeRow {
                    slot: n.slot,
                    state: format!("{:?}", n.state),
                    address: n.address.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    csrf: String,
    flash: Option<String>,
    form_error: Option<String>,
    errors: FieldErrors,
    pool: PoolView,
    cache: CacheForm,
    scaling: ScalingForm,
    /// The policies the CRD accepts, and whether each is the form's.
    policies: Vec<(&'static str, bool)>,
    charts: Vec<Chart>,
}

/// What a failed POST puts back on the dashboard.
#[derive(Default)]
struct Rerender {
    cache: Option<CacheForm>,
    scaling: Option<ScalingForm>,
    errors: FieldErrors,
    form_error: Option<String>,
}

async fn dashboard(
    state: &UiState,
    session: &Session,
    flash: Option<String>,
    again: Rerender,
) -> Dashboard {
    let operator = &state.ui.inner.operator;
    let (pool, history) = tokio::join!(operator.pool(), operator.history(charts::WINDOW_MINUTES));
    let mut form_error = again.form_error;
    if let Err(e) = &pool {
        form_error.get_or_insert_with(|| format!("The operator's API did not answer: {e}"));
    }
    let pool = pool.ok();
    let history = history.unwrap_or_default();
    let now = jiff::Timestamp::now().as_second();
    let cache = again
        .cache
        .or_else(|| pool.as_ref().map(CacheForm::from_pool))
        .unwrap_or_default();
    Dashboard {
        csrf: state.ui.inner.auth.session_csrf(session),
        flash,
        form_error,
        errors: again.errors,
        policies: CachePolicy::NAMES
            .iter()
            .map(|name| (*name, cache.policy.trim() == *name))
            .collect(),
        cache,
        scaling: again
            .scaling
            .or_else(|| pool.as_ref().map(ScalingForm::from_pool))
            .unwrap_or_default(),
        pool: PoolView::of(pool.as_ref()),
        charts: charts::charts(&history, now),
    }
}

fn decode_flash(value: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..value.len())
        .step_by(2)
        .map(|i| {
            value
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

fn encode_flash(message: &str) -> String {
    message.bytes().map(|b| format!("{b:02x}")).collect()
}

/// 303 to the dashboard, which then shows `message`.
fn done(state: &UiState, jar: SignedCookieJar, message: &str) -> Response {
    let cookie = state
        .ui
        .inner
        .auth
        .cookie(FLASH_COOKIE, encode_flash(message));
    (jar.add(cookie), see_other("/manager")).into_response()
}

async fn manager(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    let Some(session) = state.ui.inner.auth.session(&jar) else {
        return see_other("/manager/login");
    };
    let flash = jar.get(FLASH_COOKIE).and_then(|c| decode_flash(c.value()));
    let jar = jar.remove(Cookie::build(FLASH_COOKIE).path("/"));
    let page_of = dashboard(&state, &session, flash, Rerender::default()).await;
    (jar, page(StatusCode::OK, &page_of)).into_response()
}

/// The dashboard again with the errors of a refused POST.
async fn refused(
    state: &UiState,
    session: &Session,
    status: StatusCode,
    again: Rerender,
) -> Response {
    let page_of = dashboard(state, session, None, again).await;
    page(status, &page_of)
}

/// A refusal by the operator: its field mapped onto the form's, else a form-level message.
fn operator_refusal(e: OperatorError, mut again: Rerender) -> (StatusCode, Rerender) {
    match e {
        OperatorError::Refused {
            status,
            message,
            field,
            ..
        } => {
            match field.as_deref().and_then(forms::form_field) {
                Some(f) => {
                    again.errors.insert(f, message);
                }
                None => again.form_error = Some(message),
            }
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                again,
            )
        }
        OperatorError::Unreachable(detail) => {
            again.form_error = Some(format!("The operator's API did not answer: {detail}"));
            (StatusCode::BAD_GATEWAY, again)
        }
    }
}

async fn cache_settings(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CacheForm>,
) -> Response {
    let session = match authorise_post(&state, &jar, &form.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    let saved = format!(
        "Cache settings saved: {} MiB per node, policy {}.",
        form.capacity_mib.trim(),
        form.policy.trim()
    );
    let patch = form.patch();
    let again = |errors| Rerender {
        cache: Some(form),
        errors,
        ..Rerender::default()
    };
    save_settings(&state, jar, &session, patch, again, &saved).await
}

async fn scaling_settings(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<ScalingForm>,
) -> Response {
    let session = match authorise_post(&state, &jar, &form.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    let saved = format!("Scaling settings saved: {} mode.", form.mode.trim());
    let patch = form.patch();
    let again = |errors| Rerender {
        scaling: Some(form),
        errors,
        ..Rerender::default()
    };
    save_settings(&state, jar, &session, patch, again, &saved).await
}

/// Sends a settings form's merge patch to the operator: back to the dashboard saying `saved`,
/// or the form again (built by `again` with its field errors) when the form's own checks or
/// the operator refuse it.
async fn save_settings(
    state: &UiState,
    jar: SignedCookieJar,
    session: &Session,
    patch: Result<serde_json::Value, FieldErrors>,
    again: impl FnOnce(FieldErrors) -> Rerender,
    saved: &str,
) -> Response {
    let patch = match patch {
        Ok(p) => p,
        Err(errors) => {
            return refused(
                state,
                session,
                StatusCode::UNPROCESSABLE_ENTITY,
                again(errors),
            )
            .await;
        }
    };
    match state.ui.inner.operator.patch(&patch).await {
        Ok(_) => {
            info!(settings = saved, "pool settings changed");
            done(state, jar, saved)
        }
        Err(e) => {
            let (status, again) = operator_refusal(e, again(FieldErrors::new()));
            refused(state, session, status, again).await
        }
    }
}

async fn scale(state: UiState, jar: SignedCookieJar, form: CsrfForm, delta: i32) -> Response {
    let session = match authorise_post(&state, &jar, &form.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    match state.ui.inner.operator.scale(delta).await {
        Ok(pool) => {
            let target = pool.spec.scaling.replicas;
            info!(delta, target, "manual scale");
            let verb = if delta > 0 { "Growing" } else { "Shrinking" };
            done(&state, jar, &format!("{verb} the pool to {target} nodes."))
        }
        Err(e) => {
            let (status, again) = operator_refusal(e, Rerender::default());
            refused(&state, &session, status, again).await
        }
    }
}

async fn grow(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    scale(state, jar, form, 1).await
}

async fn shrink(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    scale(state, jar, form, -1).await
}

async fn flush(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = match authorise_post(&state, &jar, &form.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    match state.ui.inner.operator.flush().await {
        Ok(_) => {
            info!("pool flushed from the manager");
            done(&state, jar, "The cache is cleared: every node was emptied.")
        }
        Err(e) => {
            let (status, again) = operator_refusal(e, Rerender::default());
            refused(&state, &session, status, again).await
        }
    }
}

#[derive(Template)]
#[template(path = "confirm_delete.html")]
struct ConfirmDelete {
    csrf: String,
    count: u64,
}

async fn confirm_delete(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    let Some(session) = state.ui.inner.auth.session(&jar) else {
        return see_other("/manager/login");
    };
    match state.app.storage.count().await {
        Ok(count) => page(
            StatusCode::OK,
            &ConfirmDelete {
                csrf: state.ui.inner.auth.session_csrf(&session),
                count,
            },
        ),
        Err(e) => internal_page("counting the images failed", &e),
    }
}

async fn delete_all(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = authorise_post(&state, &jar, &form.csrf) {
        return refused.into_response();
    }
    let deleted = match state.app.storage.delete_all().await {
        Ok(d) => d,
        Err(e) => return internal_page("deleting the data failed", &e),
    };
    let flushed = state.app.cache.invalidate_all().await;
    if let Err(e) = &flushed {
        error!(error = %e, "flushing the pool after deleting all data failed");
    }
    info!(
        rows = deleted.rows,
        objects = deleted.objects,
        "all application data deleted from the manager"
    );
    let cache = if flushed.is_ok() {
        "and the cache was flushed"
    } else {
        "but flushing the cache failed (cached copies expire on their own)"
    };
    done(
        &state,
        jar,
        &format!(
            "Deleted {} images and {} stored objects, {cache}.",
            deleted.rows, deleted.objects
        ),
    )
}

// ---- Manager: refresh ------------------------------------------------------------------

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    node_count: String,
    mode: String,
    policy: String,
    capacity: String,
    phase: String,
    charts: Vec<Chart>,
}

/// What the dashboard's script polls: the status fields and the charts.
async fn status(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    if state.ui.inner.auth.session(&jar).is_none() {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "log in to the manager first",
        )
        .into_response();
    }
    let operator = &state.ui.inner.operator;
    let (pool, history) = tokio::join!(operator.pool(), operator.history(charts::WINDOW_MINUTES));
    let pool = match pool {
        Ok(p) => p,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_GATEWAY, "operator", e.to_string())
                .into_response();
        }
    };
    let view = PoolView::of(Some(&pool));
    let now = jiff::Timestamp::now().as_second();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(StatusJson {
            node_count: view.node_count,
            mode: view.mode,
            policy: view.policy,
            capacity: view.capacity,
            phase: view.phase,
            charts: charts::charts(&history.unwrap_or_default(), now),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_round_trips_through_its_cookie_encoding() {
        let text = "Deleted 3 images; <b>ok</b> ü";
        assert_eq!(decode_flash(&encode_flash(text)).as_deref(), Some(text));
        assert_eq!(decode_flash("zz"), None);
    }

    #[test]
    fn keys_become_one_path_segment() {
        assert_eq!(path_segment("cat-1.png"), "cat-1.png");
        assert_eq!(path_segment("a b?#%"), "a%20b%3F%23%25");
    }
}
