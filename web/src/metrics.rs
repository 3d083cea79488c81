//! The site's Prometheus metrics, served by `/metrics` as OpenMetrics text.
//!
//! Three kinds of series, all registered once in one `prometheus-client` [`Registry`] behind
//! an `Arc`, so handlers, the request middleware and [`Storage`](crate::store::Storage) update
//! the same series through cheap clones:
//!
//! - **Requests**: a count and a latency histogram per route *template* (axum's
//!   `MatchedPath`, e.g. `/api/v1/images/{key}`), method and status class (`2xx`…). Never the
//!   raw path: image keys would make every upload a new series. Requests no route matched
//!   share the route label `unmatched`.
//! - **Storage and pool**: latency histograms of the database and the object store per
//!   operation (`get`, `put`, `list`, `delete`…), observed in
//!   [`Storage`](crate::store::Storage), and of pool requests (`get`, `add`, `set`,
//!   `flush_all`), observed in [`ImageCache`]: together they split a miss's time. They are
//!   [`StoreMetrics`] of [`crate::latency`], a module below the stores and this one, so the
//!   stores never depend on the site's metrics while these read the cache's counters.
//! - **The pool and the site's events**: the counters the site had before this module
//!   (`cachepool_web_uploads_total`, `_views_total`, `_rejected_total`, and the pool's
//!   `cachepool_web_pool_hits_total`, `_misses_total`, `_fills_total`…) under their old names.
//!   The pool's come from [`ImageCache::stats`] at scrape time through a collector, so the
//!   cache keeps its own plain atomics for them. Beside them, when the site's in-process
//!   cache of hot images is on, its counters and sizes ([`ImageCache::local_stats`]):
//!   `cachepool_web_local_hits_total`, `_misses_total`, `_expired_total`,
//!   `_evictions_total`, and the gauges `cachepool_web_local_bytes`, `_entries` and
//!   `_capacity_bytes`. A read the in-process cache serves never reaches the pool, so the
//!   pool's hits and misses count only the reads it missed.
//!
//! - **Thumbnails** ([`crate::thumbnails`]): `cachepool_web_thumbnails_made_total`, the
//!   histogram `cachepool_web_thumbnail_make_duration_seconds` (decode, scale and encode, on
//!   the blocking thread), and `cachepool_web_thumbnails_refused_total{reason}` with the
//!   reasons of `image::thumb::ThumbError::reason` (`dimensions`, `memory`, `corrupt`,
//!   `unsupported`, `encode`).
//!
//! Names carry the `cachepool_web_` prefix and their unit (`_seconds`; `_total` is added by
//! the encoder to counters).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::cache::ImageCache;
use crate::latency::{Histograms, StoreMetrics, latency_histogram};

/// The `Content-Type` of [`WebMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of the request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route template, or `unmatched`.
    route: String,
    /// `1xx` to `5xx`.
    status: &'static str,
}

/// The status class label of a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Label of refused thumbnails.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histograms<RequestLabels>,
    uploads: Counter,
    views: Counter,
    rejected: Counter,
    store: StoreMetrics,
    thumbnails_made: Counter,
    thumbnail_duration: Histogram,
    thumbnails_refused: Family<ReasonLabel, Counter>,
}

/// The site's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct WebMetrics {
    inner: Arc<Inner>,
}

impl WebMetrics {
    /// Every metric registered, no series yet; the pool's counters read from `cache` at each
    /// scrape.
    pub fn new(cache: Arc<ImageCache>) -> WebMetrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "cachepool_web_http_requests",
            "HTTP requests answered, by method, route template and status class",
            requests.clone(),
        );
        let request_duration = Histograms::<RequestLabels>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "cachepool_web_http_request_duration",
            "Time from a request's arrival to its response head, by method, route template and \
             status class",
            Unit::Seconds,
            request_duration.clone(),
        );
        let store = StoreMetrics::register(&mut registry);
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let uploads = counter("cachepool_web_uploads", "Images stored");
        let views = counter("cachepool_web_views", "Images served");
        let rejected = counter(
            "cachepool_web_rejected",
            "Uploads and requests refused for a bad key or image",
        );
        let thumbnails_made = counter(
            "cachepool_web_thumbnails_made",
            "Thumbnails made, at upload or on first request",
        );
        // 1 ms to 8 s: a small GIF to a 24-megapixel photograph on a slow core.
        let thumbnail_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "cachepool_web_thumbnail_make_duration",
            "Time to decode, scale and encode one thumbnail (made or refused)",
            Unit::Seconds,
            thumbnail_duration.clone(),
        );
        let thumbnails_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "cachepool_web_thumbnails_refused",
            "Images no thumbnail was made of (the original is served instead), by reason",
            thumbnails_refused.clone(),
        );
        registry.register_collector(Box::new(PoolCollector { cache }));
        WebMetrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                request_duration,
                uploads,
                views,
                rejected,
                store,
                thumbnails_made,
                thumbnail_duration,
                thumbnails_refused,
            }),
        }
    }

    /// The storage and pool histograms, for
    /// [`Storage::with_metrics`](crate::store::Storage::with_metrics) and
    /// [`ImageCache::attach_metrics`].
    pub fn store(&self) -> StoreMetrics {
        self.inner.store.clone()
    }

    /// Records one answered request. `route` is the route template or `None` when no route
    /// matched; never pass the raw path.
    pub fn request(&self, method: &str, route: Option<&str>, status: u16, elapsed: Duration) {
        let labels = RequestLabels {
            method: method.to_owned(),
            route: route.unwrap_or("unmatched").to_owned(),
            status: status_class(status),
        };
        self.inner.requests.get_or_create(&labels).inc();
        self.inner
            .request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a stored image.
    pub fn uploaded(&self) {
        self.inner.uploads.inc();
    }

    /// Counts a served image.
    pub fn viewed(&self) {
        self.inner.views.inc();
    }

    /// Counts a request refused for a bad key or image.
    pub fn rejected(&self) {
        self.inner.rejected.inc();
    }

    /// Counts a thumbnail made in `elapsed`.
    pub fn thumbnail_made(&self, elapsed: Duration) {
        self.inner.thumbnails_made.inc();
        self.inner.thumbnail_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts an image no thumbnail could be made of, after `elapsed`, for `reason`.
    pub fn thumbnail_refused(&self, reason: &'static str, elapsed: Duration) {
        self.inner
            .thumbnails_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
        self.inner.thumbnail_duration.observe(elapsed.as_secs_f64());
    }

    /// Every series as OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }
}

/// The pool's counters, read from the cache at each scrape.
#[derive(Debug)]
struct PoolCollector {
    cache: Arc<ImageCache>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.cache.stats();
        for (name, help, value) in [
            ("pool_hits", "Image reads the pool served", s.hits),
            (
                "pool_misses",
                "Image reads the pool did not serve",
                s.misses,
            ),
            (
                "pool_fills",
                "Fills from the database and object store",
                s.fills,
            ),
            (
                "pool_fills_collapsed",
                "Readers served by another reader's fill",
                s.collapsed,
            ),
            ("pool_fill_errors", "Fills that failed", s.fill_errors),
            ("pool_errors", "Pool requests that failed", s.pool_errors),
            (
                "pool_invalidations",
                "Invalidations after uploads and deletes",
                s.invalidations,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let name = format!("cachepool_web_{name}");
            let metric = encoder.encode_descriptor(&name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let Some(l) = self.cache.local_stats() else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "local_hits",
                "Image reads the in-process cache served",
                l.hits,
            ),
            (
                "local_misses",
                "Image reads the in-process cache did not serve (absent or lease run out)",
                l.misses,
            ),
            (
                "local_expired",
                "In-process entries found with their lease run out",
                l.expired,
            ),
            (
                "local_evictions",
                "In-process entries pushed out to keep within the byte budget",
                l.evictions,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let name = format!("cachepool_web_{name}");
            let metric = encoder.encode_descriptor(&name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (name, help, unit, value) in [
            (
                "local",
                "Bytes the in-process cache holds (images plus overhead)",
                Some(&Unit::Bytes),
                l.bytes,
            ),
            (
                "local_capacity",
                "The in-process cache's byte budget",
                Some(&Unit::Bytes),
                l.capacity_bytes,
            ),
            (
                "local_entries",
                "Images the in-process cache holds",
                None,
                l.entries,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let name = format!("cachepool_web_{name}");
            let metric = encoder.encode_descriptor(&name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::status_class;

    #[test]
    fn status_classes_cover_every_code() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(304), "3xx");
        assert_eq!(status_class(413), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(999), "5xx");
    }
}
