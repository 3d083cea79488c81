//! Resizing a pool of real nodes under load, through the real operator (issue "The ring and
//! rebalancing"; issue 11, "One resize path").
//!
//! `harness::Pool` starts the operator in-process (standalone front end over a temporary state
//! directory, nodes embedded in the test process) and resizes by changing the pool's spec, as
//! the API does; the operator's reconcile core and driver do the rest. `load` drives
//! cache-aside readers and versioned writers through the pool client, which follows the
//! operator's ring, and checks every read. Each test prints what it measured (hit ratio per
//! one-second window, keys moved, hand-off counts, the resize's timing): run with
//! `-- --nocapture`. Tests run one at a time (see `harness::run`).

mod contrast;
mod edge;
mod grow;
mod harness;
mod scenario;
mod shrink;

use cachepool_test_support::load;
