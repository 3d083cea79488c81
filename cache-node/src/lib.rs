//! A memcached-compatible cache node: the text protocol, the item store under a byte
//! capacity with live-switchable replacement policies, and the admin HTTP API.

pub mod store;
