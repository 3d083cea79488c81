//! Integration tests of the cache node: every test starts a real node in-process on ephemeral
//! ports, talks to it over sockets the way a memcached client or an operator would, and stops
//! it.
//!
//! One test binary with a module per concern, rather than a binary per file, so the suite links
//! once and the helpers in `support` are shared without per-binary dead code. Ground truth for
//! the protocol is memcached 1.6; where the node answers differently on purpose, the test says
//! so and points at `cache_node::protocol`'s module comment.

mod admin;
mod bad_input;
mod conformance;
mod handoff;
mod limits;
mod memcached_diff;
mod meta;
mod protocol;
mod support;
