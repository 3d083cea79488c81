//! Node statistics: connection counters, per-command latency histograms, and their export as
//! Prometheus text and as memcached `stats` / JSON.
//!
//! Histograms are fixed power-of-two buckets of relaxed atomics, so recording a latency on
//! the request path is two clock reads and one atomic add; they are exported through a
//! `prometheus-client` collector that reads the atomics at scrape time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::store::Store;

/// Command families with their own latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Get,
    Gat,
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas,
    Delete,
    Incr,
    Decr,
    Touch,
    FlushAll,
    Stats,
    Other,
}

impl Cmd {
    pub const ALL: [Cmd; 15] = [
        Cmd::Get,
        Cmd::Gat,
        Cmd::Set,
        Cmd::Add,
        Cmd::Replace,
        Cmd::Append,
        Cmd::Prepend,
        Cmd::Cas,
        Cmd::Delete,
        Cmd::Incr,
        Cmd::Decr,
        Cmd::Touch,
        Cmd::FlushAll,
        Cmd::Stats,
        Cmd::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cmd::Get => "get",
            Cmd::Gat => "gat",
            Cmd::Set => "set",
            Cmd::Add => "add",
            Cmd::Replace => "replace",
            Cmd::Append => "append",
            Cmd::Prepend => "prepend",
            Cmd::Cas => "cas",
            Cmd::Delete => "delete",
            Cmd::Incr => "incr",
            Cmd::Decr => "decr",
            Cmd::Touch => "touch",
            Cmd::FlushAll => "flush_all",
            Cmd::Stats => "stats",
            Cmd::Other => "other",
        }
    }
}

/// Bucket upper bounds: 1 µs · 2^i, i = 0..BUCKETS-1 (1 µs to ~1 s), then +Inf.
const BUCKETS: usize = 21;

/// A lock-free latency histogram.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, elapsed: Duration) {
        let micros = elapsed.as_micros() as u64;
        // Bucket i holds values <= 2^i µs.
        let i = if micros <= 1 {
            0
        } else {
            (64 - (micros - 1).leading_zeros()) as usize
        };
        self.buckets[i.min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Per-bucket counts (prometheus-client accumulates them when encoding; the last bound,
    /// `f64::MAX`, is printed as `+Inf`), with the total count and the sum in seconds.
    fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(BUCKETS + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            let bound = if i == BUCKETS {
                f64::MAX
            } else {
                (1u64 << i) as f64 * 1e-6
            };
            out.push((bound, n));
        }
        (
            out,
            total,
            self.sum_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }
}

/// Everything the node counts outside the store.
#[derive(Debug)]
pub struct NodeStats {
    pub curr_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub cmd_flush: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    latency: Vec<Histogram>,
    started: Instant,
    started_unix: u64,
}

impl Default for NodeStats {
    fn default() -> Self {
        NodeStats {
            curr_connections: AtomicU64::new(0),
            total_connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            cmd_flush: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            latency: Cmd::ALL.iter().map(|_| Histogram::default()).collect(),
            started: Instant::now(),
            started_unix: unix_now() as u64,
        }
    }
}

impl NodeStats {
    pub fn record(&self, cmd: Cmd, elapsed: Duration) {
        self.latency[cmd as usize].record(elapsed);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    /// Zeroes what `stats reset` resets in memcached (connection totals and command counts).
    pub fn reset(&self) {
        self.total_connections.store(0, Ordering::Relaxed);
        self.rejected_connections.store(0, Ordering::Relaxed);
        self.cmd_flush.store(0, Ordering::Relaxed);
        self.bytes_read.store(0, Ordering::Relaxed);
        self.bytes_written.store(0, Ordering::Relaxed);
    }
}

/// Current Unix time in seconds (the store's clock).
pub fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// Exposes a node's store and counters to a Prometheus registry.
#[derive(Debug)]
pub struct NodeCollector {
    pub store: Arc<Store>,
    pub stats: Arc<NodeStats>,
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.store.stats();
        let c = &s.counters;
        let n = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut e,
            "cachepool_node_get_hits",
            "Reads that found a live item",
            c.get_hits,
        )?;
        counter(
            &mut e,
            "cachepool_node_get_misses",
            "Reads that found nothing (expired included)",
            c.get_misses,
        )?;
        counter(
            &mut e,
            "cachepool_node_get_expired",
            "Reads that found an expired item",
            c.get_expired,
        )?;
        counter(
            &mut e,
            "cachepool_node_evictions",
            "Items evicted to make room",
            c.evictions,
        )?;
        counter(
            &mut e,
            "cachepool_node_expired_reclaimed",
            "Expired items reclaimed before being read",
            c.expired_unfetched,
        )?;
        counter(
            &mut e,
            "cachepool_node_stored_items",
            "Items stored since start",
            c.total_items,
        )?;
        counter(
            &mut e,
            "cachepool_node_connections",
            "Connections accepted since start",
            load(&n.total_connections),
        )?;
        counter(
            &mut e,
            "cachepool_node_rejected_connections",
            "Connections refused at the limit",
            load(&n.rejected_connections),
        )?;
        counter(
            &mut e,
            "cachepool_node_protocol_errors",
            "Commands answered with ERROR, CLIENT_ERROR or SERVER_ERROR",
            load(&n.protocol_errors),
        )?;
        counter(
            &mut e,
            "cachepool_node_read_bytes",
            "Bytes read from clients",
            load(&n.bytes_read),
        )?;
        counter(
            &mut e,
            "cachepool_node_written_bytes",
            "Bytes written to clients",
            load(&n.bytes_written),
        )?;
        gauge(
            &mut e,
            "cachepool_node_current_connections",
            "Open client connections",
            load(&n.curr_connections) as i64,
        )?;
        gauge(
            &mut e,
            "cachepool_node_items",
            "Items held",
            s.curr_items as i64,
        )?;
        gauge(
            &mut e,
            "cachepool_node_used_bytes",
            "Bytes held, counting per-item overhead",
            s.bytes as i64,
        )?;
        gauge(
            &mut e,
            "cachepool_node_limit_bytes",
            "Capacity in bytes",
            s.limit_maxbytes as i64,
        )?;
        gauge(
            &mut e,
            "cachepool_node_uptime_seconds",
            "Seconds since start",
            n.uptime().as_secs() as i64,
        )?;

        let per_cmd = [
            ("get", c.get_hits + c.get_misses),
            ("set", c.cmd_set),
            ("touch", c.cmd_touch),
            ("delete", c.delete_hits + c.delete_misses),
            ("incr", c.incr_hits + c.incr_misses),
            ("decr", c.decr_hits + c.decr_misses),
            ("cas", c.cas_hits + c.cas_misses + c.cas_badval),
            ("flush_all", load(&n.cmd_flush)),
        ];
        let mut family = e.encode_descriptor(
            "cachepool_node_commands",
            "Commands (keys, for retrievals) by command",
            None,
            MetricType::Counter,
        )?;
        for (name, v) in per_cmd {
            ConstCounter::new(v).encode(family.encode_family(&[("command", name)])?)?;
        }
        let mut family = e.encode_descriptor(
            "cachepool_node_command_duration_seconds",
            "Time from a command parsed to its answer buffered, by command",
            None,
            MetricType::Histogram,
        )?;
        for cmd in Cmd::ALL {
            let (buckets, count, sum) = n.latency[cmd as usize].snapshot();
            if count == 0 {
                continue;
            }
            family
                .encode_family(&[("command", cmd.name())])?
                .encode_histogram::<Vec<(String, String)>>(
                    sum,
                    count,
                    &buckets,
                    None::<&HashMap<_, _>>,
                )?;
        }
        Ok(())
    }
}

/// A registry holding a node's collector.
pub fn registry(store: Arc<Store>, stats: Arc<NodeStats>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector { store, stats }));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Policy, StoreMode};

    #[test]
    fn histogram_buckets_count_each_range_once() {
        let h = Histogram::default();
        h.record(Duration::from_nanos(500));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_secs(10));
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], (1e-6, 1));
        assert_eq!(buckets[2].1, 1, "3 µs lands in the 4 µs bucket");
        assert_eq!(buckets.last().copied(), Some((f64::MAX, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        assert!((sum - 10.0000035).abs() < 1e-6);
    }

    #[test]
    fn prometheus_text_names_units_and_commands() {
        let store = Arc::new(Store::new(1 << 20, Policy::Lru));
        store.store(StoreMode::Set, b"k", b"v", 0, 0, unix_now());
        let stats = Arc::new(NodeStats::default());
        stats.record(Cmd::Set, Duration::from_micros(5));
        let reg = registry(store, stats);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for needle in [
            "cachepool_node_items 1",
            "cachepool_node_commands_total{command=\"set\"} 1",
            "cachepool_node_command_duration_seconds_count{command=\"set\"} 1",
            "# TYPE cachepool_node_used_bytes gauge",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
