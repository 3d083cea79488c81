//! The public pages that show images: the listing, newest first a page at a time, and an
//! image's own page with its details.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::UiState;
use super::forms::human_size;
use super::page::{error_page, internal_page, page};
use crate::image::ImageKey;
use crate::store::StoreError;

/// Images per listing page.
const PAGE_SIZE: u32 = 24;

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
pub(super) struct ListingQuery {
    cursor: Option<String>,
}

pub(super) async fn listing(
    State(state): State<UiState>,
    Query(query): Query<ListingQuery>,
) -> Response {
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
#[template(path = "image.html")]
struct ImagePage {
    key: String,
    size: String,
    bytes: u64,
    content_type: String,
    uploaded: String,
}

pub(super) async fn image_page(State(state): State<UiState>, Path(key): Path<String>) -> Response {
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
