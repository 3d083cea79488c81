//! The CachePool operator: reconcile core, autoscaler, providers and HTTP API.
//!
//! Empty until the operator issue lands; the crate exists so the workspace layout matches the
//! design brief.
