//! The CachePool operator: reconcile core, autoscaler, providers and HTTP API.
//!
//! So far it holds `rebalance`, the resize sequence the reconcile core will drive (issue "The
//! operator"); the ring's own tests and the resize harness use it directly.

pub mod rebalance;
