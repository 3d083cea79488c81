//! The site's JSON API against every backend it supports: SQLite with a local image
//! directory, and PostgreSQL (a throwaway cluster) with S3 (moto_server). Each case is a plain
//! async function over `(Db, Objects)` that a `matrix!` line instantiates per backend, so every
//! backend runs the same assertions. The site runs in-process on a loopback port in front of
//! in-process cache nodes and is called over HTTP; the servers each test starts are stopped
//! when it ends, also when it fails (their guards drop).
//!
//! The server fixtures are the store tests' own (`tests/store/servers.rs` and `support.rs`),
//! included by path rather than copied; this target uses only part of them.

#[cfg(test)]
#[allow(
    dead_code,
    reason = "shared with the store tests, which use the rest of the fixtures"
)]
#[path = "../store/servers.rs"]
mod servers;
#[cfg(test)]
#[allow(
    dead_code,
    reason = "shared with the store tests, which use the rest of the fixtures"
)]
#[macro_use]
#[path = "../store/support.rs"]
mod support;

#[cfg(test)]
mod images;
#[cfg(test)]
mod metrics;
#[cfg(test)]
mod rejections;
#[cfg(test)]
mod site;
