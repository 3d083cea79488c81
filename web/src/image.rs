//! Upload rules (being written).
