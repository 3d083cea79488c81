//! The CachePool operator as a library: one reconcile core, a seam for every front end.
//!
//! - [`run`]: start-up and shutdown of a whole operator from a [`run::Config`]; the
//!   `cachepool operator` and `cachepool up` commands and the tests all start it this way.
//! - [`driver`]: one task per pool that observes its nodes and carries out the core's plan.
//! - [`reconcile`]: the pure reconcile core: spec + status + observed nodes -> actions + status.
//! - [`autoscaler`]: the miss-rate autoscaler, a pure decision over closed windows.
//! - [`history`]: folds node stats samples into pool counters, windows and per-minute history.
//!
//! The seams, each a trait or enum the driver holds and a front end or deployment fills in:
//! - [`store`]: where specs (with generation and uid) come from and where status goes
//!   ([`standalone::StandaloneStore`] over a state directory, [`kubernetes::KubeStore`] over
//!   the Kubernetes API);
//! - [`events`]: what happened to a pool, for the people who run it (log and event file;
//!   Kubernetes Events through [`kubernetes::KubeEvents`]);
//! - [`provider`]: where nodes run, chosen per pool from `spec.provider` (local processes, or
//!   in-process nodes for tests; EC2 and pods next);
//! - [`traffic`]: the autoscaler's windows and the per-minute points (direct, or CloudWatch
//!   through `cloudwatch` with the `cloudwatch` feature).
//!
//! Around them: [`standalone`] (the state-directory front end), [`kubernetes`] (the
//! Controller front end with finalizer, Events and leader election), [`registry`] (the pools the
//! API serves), [`api`] (the HTTP API), [`metrics`] (the operator's Prometheus metrics),
//! [`rebalance`] (the node admin client, re-exported for the driver and the bench),
//! [`state`] (the state directory's files) and, with the `ec2` or `cloudwatch` feature, `aws`
//! (what the AWS clients share: configuration, call metrics).

pub mod api;
pub mod autoscaler;
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "cloudwatch")]
pub mod cloudwatch;
pub mod driver;
pub mod events;
pub mod history;
pub mod kubernetes;
pub mod metrics;
pub mod provider;
pub mod rebalance;
pub mod reconcile;
pub mod registry;
pub mod run;
pub mod standalone;
pub mod state;
pub mod store;
pub mod traffic;

pub use run::{Config, Operator};
