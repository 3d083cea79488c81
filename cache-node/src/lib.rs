//! A memcached-compatible cache node: the text protocol, the item store under a byte
//! capacity with live-switchable replacement policies, and the admin HTTP API.
//!
//! Layout: `protocol` parses bytes into commands without I/O, `store` holds items and makes
//! every decision about them without I/O or clocks, `server` connects the two to sockets,
//! `admin` is the HTTP side, `metrics` counts, and `node` starts and stops it all.

pub mod admin;
pub mod client;
pub mod handoff;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;
pub mod store;

pub use node::{Node, NodeConfig};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Io(std::io::Error),
}

/// Result with this crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
