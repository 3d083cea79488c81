//! Integration tests of the web app's storage against real servers: SQLite files and a
//! throwaway PostgreSQL cluster for the metadata, a local directory and S3 served by moto for
//! the bytes. Each test starts the servers it needs and stops them when it ends; without
//! PostgreSQL or moto installed the tests fail and say to run `scripts/test`.
//!
//! One test binary with a module per part (as in cache-node's tests), so the suite links once.
//! The fixtures (`servers`, `store` and `matrix!`) live in the crate cachepool-test-support,
//! shared with the API tests. The test bodies are plain async functions that a `matrix!`
//! line instantiates per database and object store; the modules are `cfg(test)` so that
//! clippy treats those bodies, which are not `#[test]` functions themselves, as test code.

#[cfg(test)]
mod database;
#[cfg(test)]
mod objects;
#[cfg(test)]
mod storage;
