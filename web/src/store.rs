//! Metadata and object storage (being written).
