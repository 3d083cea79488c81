//! The manager's controls: the cache and scaling settings, grow and shrink, flush, and
//! deleting all data behind a confirmation. Each POST passes [`authorise_post`] first; the
//! operator's API (or the store) then acts, and the answer is a redirect to the dashboard
//! with a message, or the dashboard again with the refusal next to its field.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::SignedCookieJar;
use tracing::{error, info};

use super::UiState;
use super::auth::Session;
use super::dashboard::{Rerender, done, refused};
use super::forms::{self, CacheForm, FieldErrors, ScalingForm};
use super::login::{CsrfForm, authorise_post};
use super::operator::OperatorError;
use super::page::{internal_page, page, see_other};

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

pub(super) async fn cache_settings(
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

pub(super) async fn scaling_settings(
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

pub(super) async fn grow(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    scale(state, jar, form, 1).await
}

pub(super) async fn shrink(
    State(state): State<UiState>,
    jar: SignedCookieJar,
    Form(form): Form<CsrfForm>,
) -> Response {
    scale(state, jar, form, -1).await
}

pub(super) async fn flush(
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

pub(super) async fn confirm_delete(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
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

pub(super) async fn delete_all(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_refused_by_the_operator_is_shown_as_the_forms_message() {
        let message = "unknown field \"spec.scaling.minMissRate\" (did you mean \
                       spec.scaling.auto.minMissRate?): a CachePool has no such field";
        let (status, again) = operator_refusal(
            OperatorError::Refused {
                status: 422,
                code: "unknown_field".into(),
                message: message.into(),
                field: Some("spec.scaling.minMissRate".into()),
            },
            Rerender::default(),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // No form field is named so: the message goes above the form, whole.
        assert!(again.errors.is_empty());
        assert_eq!(again.form_error.as_deref(), Some(message));
    }
}
