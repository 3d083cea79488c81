//! The manager's dashboard: the pool's status, its nodes and six charts, the settings forms
//! (filled from the pool, or as posted when a POST was refused), the message of the last
//! change (a signed cookie read once), and the JSON its script polls to refresh in place.

use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::{Cookie, SignedCookieJar};
use cache_node::admin::ApiError;
use cachepool_crds::pool::{CachePolicy, CachePool, ScalingMode};

use super::UiState;
use super::auth::Session;
use super::charts::{self, Chart};
use super::forms::{self, CacheForm, FieldErrors, ScalingForm};
use super::page::{page, see_other};

/// Name of the cookie that carries a message to the next page (signed, read once).
const FLASH_COOKIE: &str = "cachepool_flash";

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
pub(super) struct Rerender {
    pub(super) cache: Option<CacheForm>,
    pub(super) scaling: Option<ScalingForm>,
    pub(super) errors: FieldErrors,
    pub(super) form_error: Option<String>,
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
pub(super) fn done(state: &UiState, jar: SignedCookieJar, message: &str) -> Response {
    let cookie = state
        .ui
        .inner
        .auth
        .cookie(FLASH_COOKIE, encode_flash(message));
    (jar.add(cookie), see_other("/manager")).into_response()
}

pub(super) async fn manager(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    let Some(session) = state.ui.inner.auth.session(&jar) else {
        return see_other("/manager/login");
    };
    let flash = jar.get(FLASH_COOKIE).and_then(|c| decode_flash(c.value()));
    let jar = jar.remove(Cookie::build(FLASH_COOKIE).path("/"));
    let page_of = dashboard(&state, &session, flash, Rerender::default()).await;
    (jar, page(StatusCode::OK, &page_of)).into_response()
}

/// The dashboard again with the errors of a refused POST.
pub(super) async fn refused(
    state: &UiState,
    session: &Session,
    status: StatusCode,
    again: Rerender,
) -> Response {
    let page_of = dashboard(state, session, None, again).await;
    page(status, &page_of)
}

// ---- Refresh ---------------------------------------------------------------------------

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
pub(super) async fn status(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
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
}
