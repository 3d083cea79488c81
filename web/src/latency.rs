//! Latency histograms of the site's backends: the metadata database, the object store and the
//! cache pool, one series per operation (`get`, `put`, `list`, `add`…).
//!
//! [`Storage`](crate::store::Storage) and [`ImageCache`](crate::cache::ImageCache) time their
//! calls into a [`StoreMetrics`]; [`crate::metrics`] registers it with the site's other series
//! and reads the cache's counters at each scrape. Living below all three keeps the dependencies
//! one way: the stores need only these histograms, never the site's metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Labels of the storage series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// Histograms by label set, each made by [`latency_histogram`].
pub(crate) type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 100 µs to about 6.5 s: a pool hit is well under a millisecond, an S3 call
/// or a 10 MiB upload takes up to seconds.
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Which store an observation is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The metadata database.
    Database,
    /// The object store.
    Objects,
    /// The cache pool.
    Pool,
}

/// The storage latency histograms, handed to [`Storage`](crate::store::Storage) and
/// [`ImageCache`](crate::cache::ImageCache). Clones share the same series.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    database: Histograms<OperationLabels>,
    objects: Histograms<OperationLabels>,
    pool: Histograms<OperationLabels>,
}

impl StoreMetrics {
    /// The three histograms, registered in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> StoreMetrics {
        let database = Histograms::<OperationLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "cachepool_web_db_duration",
            "Time one database operation took, by operation",
            Unit::Seconds,
            database.clone(),
        );
        let objects = Histograms::<OperationLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "cachepool_web_object_store_duration",
            "Time one object store operation took, by operation",
            Unit::Seconds,
            objects.clone(),
        );
        let pool = Histograms::<OperationLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "cachepool_web_pool_request_duration",
            "Time one request to the cache pool took, by operation",
            Unit::Seconds,
            pool.clone(),
        );
        StoreMetrics {
            database,
            objects,
            pool,
        }
    }

    /// Records that one `operation` on `part` took `elapsed`.
    pub fn observe(&self, part: Part, operation: &'static str, elapsed: Duration) {
        let family = match part {
            Part::Database => &self.database,
            Part::Objects => &self.objects,
            Part::Pool => &self.pool,
        };
        family
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }
}
