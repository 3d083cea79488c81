//! The CachePool operator: reconcile core, autoscaler, providers, metrics and HTTP API.
//!
//! - [`autoscaler`]: the miss-rate autoscaler, a pure decision over closed windows.
//! - [`history`]: folds node stats samples into pool counters, windows and per-minute history.
//! - [`metrics`]: the operator's own Prometheus metrics.
//! - [`provider`]: where nodes run; [`provider::process`] spawns local `cachepool node` children.
//! - [`reconcile`]: the pure reconcile core: spec + status + observed nodes -> actions + status.
//! - [`rebalance`]: the node admin client and the hand-off step of a resize.

pub mod api;
pub mod autoscaler;
pub mod driver;
pub mod history;
pub mod metrics;
pub mod provider;
pub mod rebalance;
pub mod reconcile;
pub mod standalone;
pub mod state;
