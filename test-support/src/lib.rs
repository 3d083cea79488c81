//! Fixtures shared by Cachepool's integration tests, in one library rather than included into
//! each test target by path: a fixture that only some targets use is simply `pub` here, so no
//! target needs a blanket `dead_code` allowance, and each fixture is compiled once.
//!
//! - [`serial`] and [`stack`]: one test at a time on its own runtime, and `cachepool up` (the
//!   real binary) as a fixture; for the root crate's `tests/browser`, `tests/manager.rs` and
//!   `tests/e2e`.
//! - [`images`]: a one-pixel GIF per shade, for uploads.
//! - [`load`]: the load generator and stale-read checker of the resize suite
//!   (`operator/tests/resize`) and `tests/e2e`.
//! - [`placement`]: what each in-process node holds, and the keys not on their owner.
//! - [`servers`]: throwaway PostgreSQL clusters and moto servers (S3 for the web's tests;
//!   EC2, SSM and CloudWatch for the operator's), with nothing but std and libc.
//! - With the `web` feature, the fixtures of cachepool-web's tests: [`store`] (databases,
//!   object stores and storages over them, and the `matrix!` macro) and [`site`] (the site
//!   in-process on one backend).
//!
//! A dev-dependency only; never published.

pub mod images;
pub mod load;
pub mod placement;
pub mod serial;
pub mod servers;
#[cfg(feature = "web")]
pub mod site;
pub mod stack;
#[cfg(feature = "web")]
pub mod store;
