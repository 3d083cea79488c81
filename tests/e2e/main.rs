//! End-to-end tests of `cachepool operator --standalone`: the real binary, its manifest
//! directory, its HTTP API and the `cachepool node` processes it runs.
//!
//! Each test starts its own operator on a fresh directory, drives it the way a user or an
//! application would (write or edit a manifest, call the API, follow the ring with the pool
//! client) and judges it by what can be observed from outside: the API's answers, the ring,
//! the data the nodes hold, and the processes in `/proc`. Each test stops its operator (and
//! asserts that no process is left); a guard SIGKILLs whatever is left if it panics.
//!
//! The resize and autoscaling tests run the resize suite's load generator and stale-read
//! checker (`cachepool_test_support::load`, a copy of `operator/tests/resize/load.rs`) and print what they measured (times from an API
//! call to the new ring and to a Ready pool, per-second hit ratios): run with
//! `cargo test -p cachepool --test e2e -- --nocapture`. Tests run one at a time
//! (`harness::run`). A failing test keeps its directory (manifests, the operator's log, node
//! logs) and prints its path; `CACHEPOOL_E2E_KEEP=1` keeps every test's.

mod api;
mod autoscale;
mod failure;
mod harness;
mod invalid;
mod manual;
