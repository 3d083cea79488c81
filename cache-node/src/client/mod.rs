//! The pool client: how an application talks to a Cachepool.
//!
//! - [`NodeClient`] speaks the memcached text protocol to one node over a small, bounded pool
//!   of reused TCP connections, with a connect timeout and a per-request timeout, and parses
//!   every reply strictly: an answer it did not expect is a [`ClientError::Protocol`] and the
//!   connection that carried it is closed, never reused.
//! - [`PoolClient`] routes each key to its node with the ring from `cachepool-crds`, and during
//!   a migration reads the previous owner on a miss and copies hits forward (see [`pool`] for
//!   the rules and the race they leave open).
//!
//! - [`AdminClient`] is the typed client of a node's admin HTTP API, over the server's own
//!   request and response types.
//!
//! Layout follows the node's: `codec` turns requests into bytes and bytes into replies without
//! I/O (unit-tested on byte strings), `conn` runs one request over one socket and pools
//! sockets, `node` is the per-node API, `pool` the ring-aware one.

pub mod admin;
pub mod codec;
mod conn;
mod node;
pub mod pool;

use std::time::Duration;

use bytes::Bytes;

pub use admin::{AdminClient, AdminError};
pub use node::NodeClient;
pub use pool::PoolClient;

/// Longest key the protocol accepts (and the node, [`crate::protocol::MAX_KEY_LEN`]).
pub const MAX_KEY_LEN: usize = crate::protocol::MAX_KEY_LEN;

/// Largest exptime the protocol carries (a signed 32-bit number on the wire).
pub const MAX_EXPTIME: u32 = i32::MAX as u32;

/// Errors of the pool client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key cannot be sent: memcached keys are 1 to 250 bytes without spaces or control
    /// characters.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// An argument is outside what the protocol can carry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client options cannot work.
    #[error("invalid client options: {0}")]
    Options(String),
    /// The node did not answer (or accept the connection) in time.
    #[error("{addr}: {op} timed out after {after:?}")]
    Timeout {
        /// The node's address.
        addr: String,
        /// What was being done (`connect`, or the command).
        op: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The node could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The node's address.
        addr: String,
        /// Why the connection failed.
        source: std::io::Error,
    },
    /// Reading or writing the connection failed, or the node closed it mid-reply.
    #[error("{addr}: connection failed: {source}")]
    Io {
        /// The node's address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node's answer is not a reply to what was asked; the connection was closed.
    #[error("{addr}: protocol error: {detail}")]
    Protocol {
        /// The node's address.
        addr: String,
        /// What was wrong with the reply.
        detail: String,
    },
    /// The node refused the command (`SERVER_ERROR`, `CLIENT_ERROR` or `ERROR`), for example
    /// a value larger than the node's item size limit.
    #[error("{addr}: node answered {message:?}")]
    Server {
        /// The node's address.
        addr: String,
        /// The node's error line.
        message: String,
    },
    /// The ring has no members, so no node can take a write.
    #[error("the pool's ring has no members; nothing can be stored until nodes join it")]
    EmptyRing,
}

/// Result with the client's error.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Settings of the client, shared by every node connection pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Time allowed to open a TCP connection to a node.
    pub connect_timeout: Duration,
    /// Time allowed for one request to one node, from waiting for a pooled connection to the
    /// last byte of the reply (a connect happens within it, bounded by `connect_timeout`).
    pub request_timeout: Duration,
    /// Most open connections to one node; requests beyond that wait for one to be free.
    pub max_connections_per_node: usize,
    /// Largest value a reply may announce; a longer one is a protocol error. The default is
    /// the largest item size a node can be configured for, so it only guards against a
    /// corrupt length, never against a real value.
    pub max_value_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_millis(250),
            request_timeout: Duration::from_secs(1),
            max_connections_per_node: 16,
            max_value_bytes: (crate::admin::MAX_ITEM_SIZE_KIB as usize) << 10,
        }
    }
}

impl ClientOptions {
    /// Checks that the options can work: non-zero timeouts, at least one connection.
    pub fn validate(&self) -> Result<()> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(ClientError::Options(
                "connect_timeout and request_timeout must be greater than zero".into(),
            ));
        }
        if self.max_connections_per_node == 0 {
            return Err(ClientError::Options(
                "max_connections_per_node must be at least 1".into(),
            ));
        }
        if self.max_value_bytes == 0 {
            return Err(ClientError::Options(
                "max_value_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A cached value and its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    /// The value's bytes, exactly as stored.
    pub data: Bytes,
    /// The client flags stored with it.
    pub flags: u32,
    /// The node's CAS value for it (meaningful only on the node that answered).
    pub cas: u64,
}

/// A value with what a copy of it must carry (`NodeClient::get_held`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub value: Value,
    /// Remaining time to live in seconds; `None` for an item that never expires.
    pub ttl: Option<u32>,
    /// When the value was written (Unix ms on the answering node's clock), if the node still
    /// knows (it keeps write times for about half a minute).
    pub written_ms: Option<u64>,
}

/// Checks a key the way the node does, so a bad key fails here with a clear message instead
/// of as a protocol error that costs the connection.
pub(crate) fn check_key(key: &[u8]) -> Result<&[u8]> {
    if key.is_empty() {
        return Err(ClientError::InvalidKey("a key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ClientError::InvalidKey("a key must be at most 250 bytes"));
    }
    if key.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(ClientError::InvalidKey(
            "a key must not contain spaces or control characters",
        ));
    }
    Ok(key)
}

/// Checks an exptime against what the protocol can carry.
pub(crate) fn check_exptime(exptime: u32) -> Result<()> {
    if exptime > MAX_EXPTIME {
        return Err(ClientError::InvalidArgument(format!(
            "exptime {exptime} is larger than {MAX_EXPTIME}; give seconds (up to 30 days) or a \
             Unix time"
        )));
    }
    Ok(())
}
