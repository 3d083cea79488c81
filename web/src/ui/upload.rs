//! The public upload form: read to its end (an image over the limit is discarded, not
//! refused mid-stream), its CSRF token checked, then validated and stored as the JSON API
//! does; a refusal is the form again with the message next to its field.

use askama::Template;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::SignedCookieJar;
use tracing::{error, info};

use super::UiState;
use super::forms::{FieldErrors, human_size};
use super::page::{page, see_other};
use crate::api::declared_length;
use crate::image::{self, ImageKey, MAX_IMAGE_BYTES};

#[derive(Template)]
#[template(path = "upload.html")]
struct UploadPage {
    key: String,
    csrf: String,
    errors: FieldErrors,
    form_error: Option<String>,
}

pub(super) async fn upload_form(State(state): State<UiState>, jar: SignedCookieJar) -> Response {
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
/// discarded up to this size, so that the form's other fields are still read and the page
/// says what to fix. A form that declares more than this is refused before it is read, and
/// one that turns out larger is cut off here; either way the connection's lingering close
/// (crate::listener) reads on what the browser still sends, so that it shows the page rather
/// than a reset.
pub(super) const UPLOAD_FORM_LIMIT: usize = 4 * MAX_IMAGE_BYTES;

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

/// A form over [`UPLOAD_FORM_LIMIT`]: 413, saying the image's limit.
fn form_too_large() -> (StatusCode, String) {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the form is larger than {}, and the image's limit is {}",
            human_size(UPLOAD_FORM_LIMIT as u64),
            human_size(MAX_IMAGE_BYTES as u64)
        ),
    )
}

async fn read_upload(mut multipart: Multipart) -> Result<UploadFields, (StatusCode, String)> {
    let mut fields = UploadFields::default();
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            form_too_large()
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

pub(super) async fn upload(
    State(state): State<UiState>,
    headers: HeaderMap,
    jar: SignedCookieJar,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let auth = &state.ui.inner.auth;
    let csrf_ok = |fields: &UploadFields| auth.check_visitor_csrf(&jar, &fields.csrf);
    let read = match multipart {
        // A form that declares itself over the limit is refused before it is read; the
        // connection's lingering close (crate::listener) reads what the browser still sends,
        // so the browser shows this page rather than a reset.
        _ if declared_length(&headers).is_some_and(|n| n > UPLOAD_FORM_LIMIT as u64) => {
            Err(form_too_large())
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_one_path_segment() {
        assert_eq!(path_segment("cat-1.png"), "cat-1.png");
        assert_eq!(path_segment("a b?#%"), "a%20b%3F%23%25");
    }
}
