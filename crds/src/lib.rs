//! CachePool resource types, their validation, and the ring that maps keys to nodes.
//!
//! - [`ring`]: which node owns a key (`jump_consistent_hash(xxh3_64(key), n)` over stable
//!   slots), the ring changes a resize or a replacement makes, and the two-ring state a pool
//!   is in while keys migrate. Pure functions over plain data, shared by the operator (which
//!   moves keys) and every client (which routes requests).
//!
//! The CachePool custom resource types and their validation land here next, beside the ring
//! whose state their status reports.

pub mod ring;

pub use ring::{Member, Ring, RingError, RingState};
