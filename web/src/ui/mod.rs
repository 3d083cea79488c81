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
//! This module holds what the rest of the site sees: the configuration, [`Ui`] and its
//! routes, and the middleware that lets a manager session use the JSON API. The pages and the
//! pieces they are built from live in one module per concern:
//!
//! - `images`, `upload`: the public pages.
//! - `login`: login, logout, and the session and CSRF check of every manager POST.
//! - `dashboard`: the manager's page and the JSON its script refreshes from.
//! - `controls`: the manager's settings forms and buttons.
//! - `page`, `assets`: rendering, error pages, security headers; the embedded static files.
//! - [`auth`]: password, sessions, CSRF tokens.
//! - [`throttle`]: the login back-off per client address, and which address a request is from.
//! - [`forms`]: the manager's forms → merge patches, operator error fields → form fields.
//! - [`charts`]: the charts as server-side SVG (plotters).
//! - [`operator`]: the client of the operator's API.

mod assets;
pub mod auth;
pub mod charts;
mod controls;
mod dashboard;
pub mod forms;
mod images;
mod login;
pub mod operator;
mod page;
pub mod throttle;
mod upload;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Key, SignedCookieJar};
use cache_node::admin::ApiError;

use crate::api::{AppState, ManagerAuthorized};
use auth::{Auth, AuthError};
use operator::OperatorClient;

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
    /// Reverse proxies whose `X-Forwarded-For` names the client (for the login back-off);
    /// from any other peer the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
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
    trusted_proxies: Vec<ipnet::IpNet>,
}

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
                trusted_proxies: config.trusted_proxies,
            }),
        })
    }

    /// How many client addresses the login back-off tracks (bounded).
    pub fn throttled_clients(&self) -> usize {
        self.inner.auth.throttled_clients()
    }

    /// The pages' routes, to merge into the site's router.
    pub fn router(&self, app: AppState) -> Router {
        let state = UiState {
            app,
            ui: self.clone(),
        };
        Router::new()
            .route("/", get(images::listing))
            .route(
                "/upload",
                get(upload::upload_form)
                    .post(upload::upload)
                    .layer(DefaultBodyLimit::max(upload::UPLOAD_FORM_LIMIT)),
            )
            .route("/images/{key}", get(images::image_page))
            .route("/static/site.css", get(assets::stylesheet))
            .route("/static/manager.js", get(assets::script))
            // Browsers ask for it on every site; there is none, and a 404 would fill the logs.
            .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
            .route("/manager", get(dashboard::manager))
            .route("/manager/login", get(login::login_form).post(login::login))
            .route("/manager/logout", post(login::logout))
            .route("/manager/status", get(dashboard::status))
            .route("/manager/cache", post(controls::cache_settings))
            .route("/manager/scaling", post(controls::scaling_settings))
            .route("/manager/scale/grow", post(controls::grow))
            .route("/manager/scale/shrink", post(controls::shrink))
            .route("/manager/flush", post(controls::flush))
            .route(
                "/manager/delete",
                get(controls::confirm_delete).post(controls::delete_all),
            )
            .layer(middleware::map_response(page::security_headers))
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
