//! CachePool resource types, their validation, and the ring that maps keys to nodes.
//!
//! Empty until the ring and operator issues land: the crate exists so the workspace layout
//! matches the design brief from the start.
