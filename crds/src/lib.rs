//! CachePool resource types, their validation, and the ring that maps keys to nodes.
//!
//! - [`ring`]: which node owns a key (`jump_consistent_hash(xxh3_64(key), n)` over stable
//!   slots), the ring changes a resize or a replacement makes, and the two-ring state a pool
//!   is in while keys migrate. Pure functions over plain data, shared by the operator (which
//!   moves keys) and every client (which routes requests).
//!
//! - [`api`]: the operator's HTTP API on the wire (paths, bodies, the error body); with the
//!   `client` feature, [`client`](crate) holds its typed client.
//!
//! - [`pool`]: the CachePool custom resource (`cachepool.io/v1alpha1`): spec, status, defaults,
//!   [`pool::validate`] (the rules the operator always enforces) and the CRD, whose schema
//!   carries the same rules as bounds and CEL for the API server.
//!
//! - [`strict`]: reading a CachePool that a person wrote (a manifest, a patched resource) with
//!   every unknown field refused by its path, while the types themselves stay lenient for what
//!   kube reads from the API server.

pub mod api;
#[cfg(feature = "client")]
pub mod client;
pub mod pool;
pub mod ring;
pub mod strict;

pub use ring::{Member, Ring, RingError, RingState};
