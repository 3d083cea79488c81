//! The web app: an image-sharing site and the manager UI over a Cachepool pool, a SQL
//! database and an object store (issue "The web app").
//!
//! - [`app`]: the site's HTTP API over the three below.
//! - [`ui`]: the HTML pages and the manager UI (sessions, CSRF, charts, the operator client).
//! - [`ring`]: the pool's ring, followed from the operator's API.
//! - [`image`]: what an upload may be: keys and image formats, judged by their bytes.
//! - [`cache`]: cache-aside reads through the pool client, one fill per key at a time.
//! - [`store`]: image metadata in SQL (SQLite or PostgreSQL) and image bytes in an object store
//!   (a local directory or S3).

pub mod app;
pub mod cache;
pub mod image;
pub mod ring;
pub mod store;
pub mod ui;
