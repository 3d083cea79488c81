//! Entering and leaving the manager, and the check every manager POST passes first: a
//! session, and the CSRF token of its pages (the primitives are in [`super::auth`]).

use askama::Template;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use axum_extra::extract::cookie::{Cookie, SignedCookieJar};
use serde::Deserialize;
use tracing::info;

use super::UiState;
use super::auth::{self, LoginVerdict, Session};
use super::page::{error_page, page, see_other};
use super::throttle;
use crate::listener::ClientAddr;

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

pub(super) async fn login_form(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
    if state.ui.inner.auth.session(&jar).is_some() {
        return see_other("/manager");
    }
    login_page(&state, jar, StatusCode::OK, None)
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

pub(super) async fn login(
    State(state): State<UiState>,
    connection: Option<Extension<ConnectInfo<ClientAddr>>>,
    headers: HeaderMap,
    jar: SignedCookieJar,
    Form(form): Form<LoginForm>,
) -> Response {
    let auth = &state.ui.inner.auth;
    let peer = connection.map(|Extension(ConnectInfo(ClientAddr(addr)))| addr.ip());
    let client = throttle::client_ip(peer, &headers, &state.ui.inner.trusted_proxies);
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
    match auth.verify_password(client, form.password).await {
        LoginVerdict::Accepted => {}
        LoginVerdict::Refused => {
            return login_page(
                &state,
                jar,
                StatusCode::UNAUTHORIZED,
                Some("Wrong password.".into()),
            );
        }
        LoginVerdict::TooSoon(wait) => {
            // Whole seconds, rounded up: `Retry-After` has no fractions.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut page = login_page(
                &state,
                jar,
                StatusCode::TOO_MANY_REQUESTS,
                Some(format!(
                    "Too many failed logins from your address: try again in {seconds} s."
                )),
            );
            page.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return page;
        }
    }
    let session = Session::new(auth::unix_now());
    info!("manager login");
    let jar = jar.add(auth.session_cookie(&session));
    (jar, see_other("/manager")).into_response()
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

/// Why a manager POST is not carried out.
pub(super) enum Refused {
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
pub(super) fn authorise_post(
    state: &UiState,
    jar: &SignedCookieJar,
    csrf: &str,
) -> Result<Session, Refused> {
    let auth = &state.ui.inner.auth;
    let session = auth.session(jar).ok_or(Refused::NoSession)?;
    if !auth.check_csrf("session", &session.id, csrf) {
        return Err(Refused::BadToken);
    }
    Ok(session)
}

pub(super) async fn logout(
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
