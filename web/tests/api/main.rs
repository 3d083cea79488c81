//! The site's JSON API against every backend it supports: SQLite with a local image
//! directory, and PostgreSQL (a throwaway cluster) with S3 (moto_server). Each case is a plain
//! async function over `(Db, Objects)` that a `matrix!` line instantiates per backend, so every
//! backend runs the same assertions. The site runs in-process on a loopback port in front of
//! in-process cache nodes and is called over HTTP; the servers each test starts are stopped
//! when it ends, also when it fails (their guards drop).
//!
//! The fixtures (the site, the store tests' servers and storages, `matrix!`) live in the crate
//! cachepool-test-support (`site`, `servers`, `store`).

#[cfg(test)]
mod images;
#[cfg(test)]
mod listing;
#[cfg(test)]
mod metrics;
#[cfg(test)]
mod rejections;
#[cfg(test)]
mod thumbnails;
