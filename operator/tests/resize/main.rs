//! Resizing a pool of real nodes under load (issue "The ring and rebalancing").
//!
//! Nodes run in-process on loopback ports; `harness::Pool` resizes them in the operator's
//! order (DESIGN.md, "The ring") while `load` drives cache-aside readers and versioned writers
//! through the pool client and checks every read. Each test prints what it measured (hit
//! ratio per one-second window, keys moved, hand-off counts): run with `-- --nocapture`.
//! Tests run one at a time (see `harness::run`).

mod contrast;
mod edge;
mod grow;
mod harness;
mod load;
mod scenario;
mod shrink;
