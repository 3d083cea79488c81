//! Rebalancing: moving a pool from one ring to the next without losing hits.
//!
//! The order is what makes a resize lossless (DESIGN.md, "The ring"):
//! 1. new nodes are started and ready (the provider);
//! 2. the new ring is published with the previous one still attached, so clients read the
//!    new owner first and fall back to the old one, and write to the new owner;
//! 3. every node of the previous ring hands off the keys it no longer owns (`POST /handoff`
//!    on the node, which streams them to their owners itself);
//! 4. once every live previous member reports its hand-off done, the previous ring is
//!    dropped, and removed nodes stop.
//!
//! The operator has one resize path: [`reconcile`](crate::reconcile) decides each step from
//! what it observes and the [`driver`](crate::driver) carries it out (it starts, watches and
//! restarts the hand-offs through the node's admin API). The resize suite
//! (`operator/tests/resize`) drives that path, so its figures are the operator's. What is left
//! here is the node's typed admin client ([`AdminClient`], re-exported from
//! `cache_node::client`), which the driver, the bench and the tests reach by this name.

pub use cache_node::client::{AdminClient, AdminError};
