//! The site's OpenAPI 3.1 document, generated from the code by `utoipa` and served at
//! `GET /api/v1/openapi.json`.
//!
//! Each `/api/v1` handler in [`crate::app`] carries a `#[utoipa::path]` that states its method,
//! path, parameters, bodies and answers, and the router takes each route's path and methods
//! from that same annotation ([`crate::app::router`]), so the document and the routes the
//! site serves cannot drift apart. The JSON bodies are the handlers' own types (deriving
//! `ToSchema`); the error body, which lives in `cache_node::admin` shared by three APIs, is
//! mirrored here by [`ErrorBody`].

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::app;

/// Name of the security scheme of the admin token (`security(("adminToken" = []))` in
/// [`crate::app`] spells it out: the macro takes only a literal).
pub const ADMIN_TOKEN_SCHEME: &str = "adminToken";

/// Every JSON error: `{"error", "message", "field"?}` (`cache_node::admin::ApiError`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Short machine-readable code, e.g. `bad_request`, `invalid_key`, `unauthorized`.
    pub error: String,
    /// What is wrong and what is allowed, for people.
    pub message: String,
    /// The request field at fault (`key`, `image`, `limit`, `cursor`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
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
        app::upload_image,
        app::view_image,
        app::list_images,
        app::delete_data,
        app::openapi_json,
    ),
    components(schemas(ErrorBody, app::ImageJson, app::ListJson, app::DeletedJson)),
    modifiers(&AdminToken),
    tags((name = "images", description = "Images by key"), (name = "admin", description = "Site administration"))
)]
pub struct ApiDoc;

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
