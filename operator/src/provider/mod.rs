//! Where nodes run (being written).
