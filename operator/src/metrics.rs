//! The operator's Prometheus metrics (being written).
