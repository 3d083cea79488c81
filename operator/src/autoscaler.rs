//! The miss-rate autoscaler (being written).
