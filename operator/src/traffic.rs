//! Where a pool's traffic figures come from and where they go: the seam between the driver's
//! sampling and the autoscaler on one side, and metrics systems (CloudWatch, in
//! [`crate::cloudwatch`]) on the other.
//!
//! - **Source** (`spec.metrics.source`): the gets and misses of the autoscaler's windows.
//!   `direct` is the pool's own history, which the driver fills by sampling every node's
//!   `/stats`; any other source is a [`TrafficSource`] given to the operator at start-up
//!   ([`Traffic::cloudwatch`]). A pool naming a source the operator does not have keeps its
//!   nodes and manual size, and its autoscaler holds (the status says why).
//!   A source whose data arrives late (CloudWatch ingests for a minute or two) says which
//!   window it can answer at an instant ([`TrafficSource::span`]); the driver judges that
//!   window, so a window is only called steady when no resize touched *it*.
//! - **Sinks**: every closed per-minute point of every pool (nodes, miss and hit rate, items,
//!   bytes, requests per minute, and the hit and miss counts behind the rates) is offered to
//!   each [`TrafficSink`], which decides from the pool's `spec.metrics` whether to publish it.
//!   The driver awaits `publish` inside its round, so a sink that talks to a remote system
//!   queues and returns. The Prometheus gauges are not a sink: they show the latest sample,
//!   not closed minutes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cachepool_crds::pool::MetricsSpec;

use crate::history::{ClosedMinute, Point, WindowTotals};
use crate::provider::PoolRef;
use crate::store::BoxFuture;

/// Why a source or sink failed.
#[derive(Debug, thiserror::Error)]
#[error("{system}: {message}")]
pub struct Error {
    /// The metrics system (`cloudwatch`).
    pub system: &'static str,
    pub message: String,
}

/// Gets and misses of a pool over a window, from outside the operator.
pub trait TrafficSource: Send + Sync + fmt::Debug + 'static {
    /// Totals of `pool` over `[end - length, end)`; `None` when the source has no data for
    /// the window (a window without data decides nothing).
    fn window<'a>(
        &'a self,
        pool: &'a PoolRef,
        spec: &'a MetricsSpec,
        end: SystemTime,
        length: Duration,
    ) -> BoxFuture<'a, Result<Option<WindowTotals>, Error>>;

    /// The window `[start, end)` of length about `length` that a decision at `now` should
    /// judge. The default is `[now - length, now)`; a source that ingests late answers an
    /// earlier one.
    fn span(&self, now: SystemTime, length: Duration) -> (SystemTime, SystemTime) {
        (
            now.checked_sub(length).unwrap_or(SystemTime::UNIX_EPOCH),
            now,
        )
    }
}

/// Somewhere closed per-minute points are published.
pub trait TrafficSink: Send + Sync + fmt::Debug + 'static {
    /// Publishes the closed minutes `minutes` of `pool` (oldest first) if `spec` asks for it.
    /// It must not wait on a remote system: the driver's round awaits it.
    fn publish<'a>(
        &'a self,
        pool: &'a PoolRef,
        spec: &'a MetricsSpec,
        minutes: &'a [ClosedMinute],
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// The sources and sinks an operator runs with.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    /// Serves `metrics.source: cloudwatch`.
    pub cloudwatch: Option<Arc<dyn TrafficSource>>,
    /// Every closed minute goes to each of them.
    pub sinks: Vec<Arc<dyn TrafficSink>>,
}

/// Closed minutes kept in memory, for tests.
#[derive(Clone, Debug, Default)]
pub struct RecordedPoints {
    points: Arc<std::sync::Mutex<Vec<(PoolRef, Point)>>>,
}

impl RecordedPoints {
    /// Nothing recorded yet.
    pub fn new() -> RecordedPoints {
        RecordedPoints::default()
    }

    /// Every point published so far, oldest first.
    pub fn all(&self) -> Vec<(PoolRef, Point)> {
        self.points
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl TrafficSink for RecordedPoints {
    fn publish<'a>(
        &'a self,
        pool: &'a PoolRef,
        _spec: &'a MetricsSpec,
        minutes: &'a [ClosedMinute],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.points
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(minutes.iter().map(|m| (pool.clone(), m.point.clone())));
            Ok(())
        })
    }
}
