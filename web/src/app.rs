//! The site as one router: the JSON API ([`crate::api`]) and its OpenAPI document
//! ([`crate::openapi`]), with the HTML pages and the manager ([`crate::ui`]) when the site has
//! them, all behind one middleware (`observe`) that counts and times every request by route
//! template ([`crate::metrics`]) and writes the one log event of the request.
//!
//! The top of the crate's HTTP modules: it depends on the API, the document and the pages, and
//! none of them on it. The document depends on the API it describes and the pages on the state
//! and the marker the API defines; the API on neither.

use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tracing::{debug, info, warn};

use crate::api::{self, AppState};
use crate::openapi;
use crate::ui::Ui;

/// Longest error body the request log reads back for its message.
const LOGGED_ERROR_BYTES: usize = 16 * 1024;

/// The site's router: `/api/v1`, the probes and `/metrics`, every route counted and timed by
/// `observe`.
pub fn router(state: AppState) -> Router {
    observed(state.clone(), api_routes().with_state(state))
}

/// The site with its HTML pages and manager ([`Ui`]): the JSON API, where a manager session
/// with its CSRF token may also delete all data, and the pages, all counted, timed and logged
/// by one layer.
pub fn router_with_pages(state: AppState, ui: &Ui) -> Router {
    let api = api_routes()
        .layer(middleware::from_fn_with_state(
            ui.clone(),
            Ui::authorize_api,
        ))
        .with_state(state.clone());
    observed(state.clone(), api.merge(ui.router(state)))
}

/// The JSON API with its OpenAPI document.
fn api_routes() -> Router<AppState> {
    api::routes().merge(openapi::routes())
}

/// The outermost layer: it counts, times and logs every request, including what inner
/// layers refuse (a body over the limit) and requests no route matched.
fn observed(state: AppState, router: Router) -> Router {
    router.layer(middleware::from_fn_with_state(state, observe))
}

/// Counts and times every request by route template, and logs one event per request:
/// reads at debug, writes at info, refusals at info with their message, server errors at
/// warn (their detail is logged where they happen). Headers are never logged: they carry
/// the admin token.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status();
    state
        .metrics
        .request(method.as_str(), route.as_deref(), status.as_u16(), elapsed);
    let route = route.as_deref().unwrap_or("unmatched");
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    if !status.is_client_error() && !status.is_server_error() {
        if method == Method::GET || method == Method::HEAD {
            debug!(%method, route, status = status.as_u16(), latency_ms, "request");
        } else {
            info!(%method, route, status = status.as_u16(), latency_ms, "request");
        }
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let (response, code, message) = if is_json {
        let (parts, body) = response.into_parts();
        match axum::body::to_bytes(body, LOGGED_ERROR_BYTES).await {
            Ok(bytes) => {
                let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
                let field = |name: &str| {
                    parsed
                        .as_ref()
                        .and_then(|v| v.get(name))
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                        .unwrap_or_default()
                };
                let (code, message) = (field("error"), field("message"));
                (
                    Response::from_parts(parts, Body::from(bytes)),
                    code,
                    message,
                )
            }
            Err(e) => {
                warn!(%method, route, error = %e, "cannot read back an error body");
                (
                    StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    String::new(),
                    String::new(),
                )
            }
        }
    } else {
        (response, String::new(), String::new())
    };
    if status.is_server_error() {
        warn!(%method, route, status = status.as_u16(), latency_ms, error = code, reason = message, "request failed");
    } else {
        info!(%method, route, status = status.as_u16(), latency_ms, error = code, reason = message, "request refused");
    }
    response
}
