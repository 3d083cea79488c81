//! Integration tests of the pool client: real nodes started in-process on ephemeral ports,
//! plus fake peers that a test owns (one that never answers, scripted ones that answer wrongly,
//! late or not at all), so every failure path runs against a real socket.
//!
//! One test binary with a module per concern, as for the node's own tests.

mod node_client;
mod pool_client;
mod support;
