//! The web app: an image-sharing site and the manager UI over a Cachepool pool, a SQL
//! database and an object store (issue "The web app").
//!
//! - [`app`]: the site's router: the JSON API, its document and the pages behind one layer
//!   that counts, times ([`metrics`]) and logs every request.
//! - [`api`]: the site's JSON API over [`image`], [`cache`] and [`store`]; [`openapi`] documents
//!   it.
//! - [`ui`]: the HTML pages and the manager UI (sessions, CSRF, charts, the operator client).
//! - [`ring`]: the pool's ring, followed from the operator's API.
//! - [`serve`]: the whole site started from its flags ([`serve::WebArgs`]), for `cachepool web`,
//!   `cachepool up` and the benchmarks; [`listener`]: its connections (client addresses, and a
//!   lingering close so that a refusal sent before the body was read reaches the client).
//! - [`image`]: what an upload may be: keys and image formats, judged by their bytes.
//! - [`cache`]: cache-aside reads through the pool client, one fill per key at a time.
//! - [`latency`]: the latency histograms the stores and the cache record into.
//! - [`store`]: image metadata in SQL (SQLite or PostgreSQL) and image bytes in an object store
//!   (a local directory or S3).

pub mod api;
pub mod app;
pub mod cache;
pub mod image;
pub mod latency;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod ring;
pub mod serve;
pub mod store;
pub mod thumbnails;
pub mod ui;
