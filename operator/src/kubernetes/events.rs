//! [`KubeEvents`]: the pool events as Kubernetes Events on the CachePool, where
//! `kubectl describe cp` shows them.
//!
//! A driver emits an event and carries on: `emit` only puts it on a bounded queue, and one
//! task publishes the queue through kube's `Recorder` (which also folds repeats into an
//! event series). A full queue (the API server slow or unreachable) drops the event with a
//! log line, since events inform and never steer; every event is logged anyway.
//!
//! An Event names its object by uid, which the driver's [`PoolRef`] does not carry: the
//! controller tells the sink each pool's object reference as it reconciles it
//! ([`KubeEvents::track`]), and forgets it when the pool is gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use cachepool_crds::pool::CachePool;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::CONTROLLER_NAME;
use crate::events::{Event, EventSink, EventType, LogEvents};
use crate::provider::PoolRef;

/// Events waiting to be published; beyond this, new ones are dropped.
pub const QUEUE: usize = 256;

/// Publishes pool events as Kubernetes Events (see the module documentation).
#[derive(Debug)]
pub struct KubeEvents {
    queue: mpsc::Sender<(ObjectReference, Event)>,
    references: Mutex<BTreeMap<PoolRef, ObjectReference>>,
}

impl KubeEvents {
    /// A sink publishing through `client` as `cachepool-operator`, instance `instance` (the
    /// pod name), and the task that publishes; the task ends when the sink is dropped.
    pub fn start(client: kube::Client, instance: String) -> (Arc<KubeEvents>, JoinHandle<()>) {
        let (queue, mut receiver) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: CONTROLLER_NAME.to_owned(),
                instance: Some(instance),
            },
        );
        let task = tokio::spawn(async move {
            while let Some((reference, event)) = receiver.recv().await {
                let published = KubeEvent {
                    type_: match event.kind {
                        EventType::Normal => KubeEventType::Normal,
                        EventType::Warning => KubeEventType::Warning,
                    },
                    reason: event.reason.to_owned(),
                    note: Some(truncate(&event.message, 1024)),
                    action: event.reason.to_owned(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&published, &reference).await {
                    debug!(pool = ?reference.name, reason = event.reason, error = %e,
                           "publishing an event failed");
                }
            }
        });
        let sink = Arc::new(KubeEvents {
            queue,
            references: Mutex::new(BTreeMap::new()),
        });
        (sink, task)
    }

    /// The controller saw `resource`: events about it name this object.
    pub fn track(&self, pool: &PoolRef, resource: &CachePool) {
        let reference = resource.object_ref(&());
        self.references
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pool.clone(), reference);
    }

    /// The pool is gone.
    pub fn untrack(&self, pool: &PoolRef) {
        self.references
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool);
    }
}

/// `text` cut to at most `limit` bytes on a character boundary (an Event's note is limited).
fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl EventSink for KubeEvents {
    fn emit(&self, pool: &PoolRef, event: Event) {
        LogEvents.emit(pool, event.clone());
        let reference = self
            .references
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pool)
            .cloned();
        let Some(reference) = reference else {
            warn!(pool = %pool, reason = event.reason, "an event about an unknown pool was dropped");
            return;
        };
        if let Err(e) = self.queue.try_send((reference, event)) {
            warn!(pool = %pool, error = %e,
                  "the event queue is full (the API server is slow); an event was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate(&"x".repeat(2000), 1024).len(), 1024);
    }
}
