//! The site's OpenAPI 3.1 document, generated from the code by `utoipa` and served at
//! `GET /api/v1/openapi.json`.
//!
//! Each `/api/v1` handler in [`crate::api`] carries a `#[utoipa::path]` that states its method,
//! path, parameters, bodies and answers, and the router takes each route's path and methods
//! from that same annotation (as does [`routes`] for the document's own route), so the
//! document and the routes the site serves cannot drift apart. The JSON bodies are the
//! handlers' own types (deriving `ToSchema`); the error body every Cachepool API shares
//! (`cachepool_crds::api::ErrorBody`) is mirrored by [`ErrorBody`].

use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{self, AppState, ErrorBody};

/// Name of the security scheme of the admin token (`security(("adminToken" = []))` in
/// [`crate::api`] spells it out: the macro takes only a literal).
pub const ADMIN_TOKEN_SCHEME: &str = "adminToken";

/// The document's route, `GET /api/v1/openapi.json`, registered from its `#[utoipa::path]`
/// like the API's.
pub fn routes() -> Router<AppState> {
    api::documented::<__path_openapi_json, _, _>(Router::new(), openapi_json)
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "admin",
    responses((status = 200, description = "The OpenAPI 3.1 document of /api/v1", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Response {
    Json(document()).into_response()
}

/// Adds the bearer scheme that `DELETE /api/v1/data` requires.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_TOKEN_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The site's admin token (`cachepool up` prints it as `api token:`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document's source: the handlers and schemas of `/api/v1`.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Cachepool image site",
        description = "Upload, view and list images; reads are served from a Cachepool pool \
                       in front of a SQL database and an object store.",
    ),
    paths(
        api::upload_image,
        api::view_image,
        api::view_thumbnail,
        api::list_images,
        api::delete_data,
        openapi_json,
    ),
    components(schemas(ErrorBody, api::ImageJson, api::ListJson, api::DeletedJson)),
    modifiers(&AdminToken),
    tags((name = "images", description = "Images by key"), (name = "admin", description = "Site administration"))
)]
pub struct ApiDoc;

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
