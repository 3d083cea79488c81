//! The stylesheet and the dashboard's refresh script, embedded in the binary and served from
//! `/static/`, so the Content-Security-Policy can forbid inline scripts and styles.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const STYLESHEET: &str = include_str!("../../static/site.css");
const MANAGER_SCRIPT: &str = include_str!("../../static/manager.js");

pub(super) async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        STYLESHEET,
    )
        .into_response()
}

pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        MANAGER_SCRIPT,
    )
        .into_response()
}
