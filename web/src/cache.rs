//! Cache-aside reads through the pool (being written).
