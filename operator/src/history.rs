//! Pool counters, windows and per-minute history (being written).
