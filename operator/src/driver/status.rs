//! When a pool's status is written, and the resource the API shows.
//!
//! Every round computes a status, and most rounds compute the same one. A store is written
//! only when the status changed in a way a reader cares about: phase, conditions, nodes, ring,
//! migration start and end, desired size, observed generation, what the autoscaler learned.
//! Some fields change on their own all the time and are *fast counters*: the hand-off's
//! `keysMoved` and `bytesMoved` (every busy round while keys move), the traffic figures
//! `missRate`, `hitRate` and `requestsPerMinute` (every sample), and the figures of the
//! autoscaler's too-small marks (refreshed by every window that finds the size still too
//! small). A change in fast counters alone is written at most once per [`StatusPolicy`]
//! interval, so a Kubernetes API server sees a few writes a minute from a busy pool, not one
//! per probe round; the latest counters always reach the store with the next meaningful
//! change or when the driver stops. The API's view of the resource (`PoolHandle::resource`)
//! is refreshed every round regardless: it is memory.

use std::time::{Duration, Instant};

use cachepool_crds::pool::{CachePool, CachePoolStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tracing::warn;

use super::Driver;

/// Decides which status changes are written (see the module documentation).
#[derive(Clone, Debug)]
pub struct StatusPolicy {
    counter_interval: Duration,
    written: Option<CachePoolStatus>,
    written_at: Option<Instant>,
}

impl StatusPolicy {
    /// A policy writing fast-counter changes at most every `counter_interval`, starting from
    /// the status last stored (if any).
    pub fn new(counter_interval: Duration, stored: Option<CachePoolStatus>) -> StatusPolicy {
        StatusPolicy {
            counter_interval,
            written: stored,
            written_at: None,
        }
    }

    /// Whether `status` should be written now.
    pub fn wants(&self, status: &CachePoolStatus, now: Instant) -> bool {
        let Some(written) = &self.written else {
            return true;
        };
        if written == status {
            return false;
        }
        if without_counters(written) != without_counters(status) {
            return true;
        }
        self.written_at
            .is_none_or(|at| now.duration_since(at) >= self.counter_interval)
    }

    /// Whether `status` differs from the one last written.
    pub fn is_dirty(&self, status: &CachePoolStatus) -> bool {
        self.written.as_ref() != Some(status)
    }

    /// Notes that `status` was written at `now`.
    pub fn written(&mut self, status: &CachePoolStatus, now: Instant) {
        self.written = Some(status.clone());
        self.written_at = Some(now);
    }
}

/// `status` with its fast counters blanked.
fn without_counters(status: &CachePoolStatus) -> CachePoolStatus {
    let mut status = status.clone();
    status.miss_rate = None;
    status.hit_rate = None;
    status.requests_per_minute = None;
    if let Some(migration) = &mut status.migration {
        migration.keys_moved = 0;
        migration.bytes_moved = 0;
    }
    // A size that stays too small is marked again by every window (new time, miss rate and
    // load): that refresh is a fast counter too. A mark made or cleared, a back-off or a grow
    // to judge is not.
    if let Some(memory) = &mut status.autoscaler {
        for mark in &mut memory.too_small {
            mark.miss_rate = 0.0;
            mark.requests_per_second = 0.0;
            mark.at = Time(Timestamp::UNIX_EPOCH);
        }
    }
    status
}

impl Driver {
    /// The plan's status keeps the traffic figures sampled since the last round, and what
    /// the autoscaler has learned so far (a restarted operator picks it up from there).
    pub(super) fn keep_traffic(&self, status: &mut CachePoolStatus) {
        status.autoscaler = self.autoscaler.memory();
        status.selector = Some(cachepool_crds::pool::selector_for(&self.handle.pool.name));
        let sampled = &self.record.status;
        status.miss_rate = sampled.miss_rate;
        status.hit_rate = sampled.hit_rate;
        status.requests_per_minute = sampled.requests_per_minute;
    }

    /// Takes the round's status: shown at once, written when the policy says so.
    pub(super) async fn set_status(&mut self, status: CachePoolStatus) {
        let label = self.label();
        self.metrics().observe_status(&label, &status);
        self.metrics()
            .set_migration(&label, status.migration.as_ref());
        self.record.status = status;
        if self
            .status_policy
            .wants(&self.record.status, Instant::now())
        {
            self.save().await;
        }
        self.publish_resource();
    }

    /// Writes what the policy held back (the driver is stopping).
    pub(super) async fn flush_status(&mut self) {
        if self.status_policy.is_dirty(&self.record.status) {
            self.save().await;
        }
    }

    pub(super) fn publish_resource(&self) {
        let mut metadata = self.metadata.clone();
        metadata.generation = Some(self.record.generation);
        metadata.uid = Some(self.record.uid.clone()).filter(|uid| !uid.is_empty());
        metadata.creation_timestamp = self.record.creation_timestamp.clone();
        let mut resource = CachePool::new(&self.handle.pool.name, self.record.spec.clone());
        resource.metadata = metadata;
        resource.status = Some(self.record.status.clone());
        self.handle.resource.send_replace(resource);
    }

    /// Writes the record now.
    pub(super) async fn save(&mut self) {
        match self.ctx.store.save(&self.handle.pool, &self.record).await {
            Ok(()) => {
                self.status_policy
                    .written(&self.record.status, Instant::now());
                self.metrics().status_written(&self.label());
            }
            Err(e) => {
                warn!(pool = %self.handle.pool, error = %e, "saving the pool record failed");
                self.metrics().reconcile_failed(&self.label(), "storage");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cachepool_crds::pool::{MigrationStatus, PoolPhase};

    use super::*;

    fn status() -> CachePoolStatus {
        CachePoolStatus {
            phase: Some(PoolPhase::Ready),
            replicas: 2,
            ..CachePoolStatus::default()
        }
    }

    #[test]
    fn an_unchanged_status_is_not_written() {
        let now = Instant::now();
        let mut policy = StatusPolicy::new(Duration::from_secs(15), None);
        assert!(policy.wants(&status(), now));
        policy.written(&status(), now);
        assert!(!policy.wants(&status(), now + Duration::from_secs(3600)));
    }

    #[test]
    fn fast_counters_alone_are_written_at_most_once_per_interval() {
        let start = Instant::now();
        let mut policy = StatusPolicy::new(Duration::from_secs(15), None);
        policy.written(&status(), start);
        let mut busy = status();
        busy.miss_rate = Some(0.5);
        let migration = |keys_moved| MigrationStatus {
            from_epoch: 1,
            to_epoch: 2,
            from_members: Vec::new(),
            started_at: None,
            keys_moved,
            bytes_moved: keys_moved * 100,
        };
        busy.migration = Some(migration(10));
        let mut quiet = busy.clone();
        quiet.migration = Some(migration(0));
        quiet.miss_rate = None;
        policy.written(&quiet, start);
        assert!(!policy.wants(&busy, start + Duration::from_secs(14)));
        assert!(policy.is_dirty(&busy));
        assert!(policy.wants(&busy, start + Duration::from_secs(15)));
    }

    #[test]
    fn a_meaningful_change_is_written_at_once() {
        let start = Instant::now();
        let mut policy = StatusPolicy::new(Duration::from_secs(15), None);
        policy.written(&status(), start);
        let mut scaling = status();
        scaling.phase = Some(PoolPhase::Scaling);
        scaling.miss_rate = Some(0.2);
        assert!(policy.wants(&scaling, start + Duration::from_millis(1)));
    }
}
