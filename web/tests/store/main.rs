//! Integration tests of the web app's storage against real servers: SQLite files and a
//! throwaway PostgreSQL cluster for the metadata, a local directory and S3 served by moto for
//! the bytes. Each test starts the servers it needs and stops them when it ends; without
//! PostgreSQL or moto installed the tests fail and say to run `scripts/test`.
//!
//! One test binary with a module per part (as in cache-node's tests), so the suite links once
//! and the fixtures are shared.

#[macro_use]
mod support;

mod database;
mod objects;
mod servers;
mod storage;
