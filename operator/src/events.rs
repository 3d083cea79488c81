//! What happened to a pool, told to the people who run it: the seam between the pool drivers
//! and where events are shown (the log and an event file in standalone mode; Kubernetes Events
//! on the CachePool next, where `kubectl describe cp` reads them).
//!
//! The driver emits an event for every scale, node replacement, hand-off start and finish,
//! rejected spec, and provider failure; the reasons are the stable names below, as a Kubernetes
//! Event's `reason` is. Emitting never blocks a driver and never fails it: a sink that needs
//! I/O does it on its own time, and a sink that cannot keep up drops events (and says so in
//! the log), since events inform and never steer.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use tracing::{info, warn};

use crate::provider::PoolRef;

/// Whether an event is routine or asks for attention (Kubernetes' `Normal` / `Warning`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// Stable event reasons (a Kubernetes Event's `reason`).
pub mod reason {
    /// The pool grew.
    pub const SCALED_UP: &str = "ScaledUp";
    /// The pool shrank.
    pub const SCALED_DOWN: &str = "ScaledDown";
    /// A failed node was replaced in its slot.
    pub const NODE_REPLACED: &str = "NodeReplaced";
    /// A new ring was published with the previous one attached: keys start moving.
    pub const HANDOFF_STARTED: &str = "HandoffStarted";
    /// Every key reached its owner and the previous ring was dropped.
    pub const HANDOFF_FINISHED: &str = "HandoffFinished";
    /// A spec was rejected; the pool keeps running on its last valid spec.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The provider failed to start, list or stop a node.
    pub const PROVIDER_ERROR: &str = "ProviderError";
    /// The pool was deleted and every one of its nodes stopped.
    pub const DELETED: &str = "Deleted";
    /// The pool names a provider (or metrics source) this operator cannot serve.
    pub const PROVIDER_UNAVAILABLE: &str = "ProviderUnavailable";
    /// A launched node did not become ready within the start timeout: it was terminated and
    /// its slot is launched again after a back-off.
    pub const NODE_NOT_READY: &str = "NodeNotReady";
}

/// One event about one pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// One of [`reason`].
    pub reason: &'static str,
    pub message: String,
}

impl Event {
    /// A routine event.
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Event {
        Event {
            kind: EventType::Normal,
            reason,
            message: message.into(),
        }
    }

    /// An event that asks for attention.
    pub fn warning(reason: &'static str, message: impl Into<String>) -> Event {
        Event {
            kind: EventType::Warning,
            reason,
            message: message.into(),
        }
    }
}

/// Where events go (see the module documentation).
pub trait EventSink: Send + Sync + fmt::Debug + 'static {
    /// Records `event` about `pool`; must return quickly and never fail.
    fn emit(&self, pool: &PoolRef, event: Event);
}

/// Events as log lines: `info` for normal ones, `warn` for warnings.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogEvents;

impl EventSink for LogEvents {
    fn emit(&self, pool: &PoolRef, event: Event) {
        match event.kind {
            EventType::Normal => {
                info!(pool = %pool, reason = event.reason, "event: {}", event.message);
            }
            EventType::Warning => {
                warn!(pool = %pool, reason = event.reason, "event: {}", event.message);
            }
        }
    }
}

/// Largest event file before it is rotated to `events.jsonl.1` (one older file is kept).
const EVENT_FILE_LIMIT: u64 = 1024 * 1024;

/// Standalone mode's events: logged, and appended as JSON lines to `events.jsonl` in the
/// state directory (`{"time", "pool", "type", "reason", "message"}`), so that what happened
/// while nobody watched the log can be read back (`tail -f`, `jq`).
#[derive(Debug)]
pub struct FileEvents {
    path: PathBuf,
    lock: Mutex<()>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    pool: String,
    #[serde(flatten)]
    event: &'a Event,
}

impl FileEvents {
    /// Events appended to `path`.
    pub fn new(path: impl Into<PathBuf>) -> FileEvents {
        FileEvents {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if fs::metadata(&self.path).is_ok_and(|m| m.len() + line.len() as u64 > EVENT_FILE_LIMIT) {
            let mut older = self.path.clone().into_os_string();
            older.push(".1");
            fs::rename(&self.path, older)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(line)
    }
}

impl EventSink for FileEvents {
    fn emit(&self, pool: &PoolRef, event: Event) {
        LogEvents.emit(pool, event.clone());
        let time = rfc3339(SystemTime::now());
        let line = Line {
            time,
            pool: pool.to_string(),
            event: &event,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "an event could not be encoded");
                return;
            }
        };
        bytes.push(b'\n');
        if let Err(e) = self.append(&bytes) {
            warn!(path = %self.path.display(), error = %e, "an event could not be written");
        }
    }
}

/// RFC 3339 time of `t` (UTC), through the Kubernetes time type the crate already uses.
fn rfc3339(t: SystemTime) -> String {
    serde_json::to_value(crate::reconcile::time(t))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Events kept in memory, for tests and for front ends that show recent events.
#[derive(Clone, Debug, Default)]
pub struct RecordedEvents {
    events: Arc<Mutex<Vec<(PoolRef, Event)>>>,
}

impl RecordedEvents {
    /// An empty record.
    pub fn new() -> RecordedEvents {
        RecordedEvents::default()
    }

    /// Every event so far, oldest first.
    pub fn all(&self) -> Vec<(PoolRef, Event)> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The reasons of the events about `pool`, oldest first.
    pub fn reasons(&self, pool: &PoolRef) -> Vec<&'static str> {
        self.all()
            .into_iter()
            .filter(|(p, _)| p == pool)
            .map(|(_, e)| e.reason)
            .collect()
    }
}

impl EventSink for RecordedEvents {
    fn emit(&self, pool: &PoolRef, event: Event) {
        LogEvents.emit(pool, event.clone());
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((pool.clone(), event));
    }
}

/// Several sinks at once.
#[derive(Debug, Default)]
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn emit(&self, pool: &PoolRef, event: Event) {
        for sink in &self.0 {
            sink.emit(pool, event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_events_are_json_lines_and_rotate_at_the_limit() {
        let dir = std::env::temp_dir().join(format!(
            "cachepool-events-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        let sink = FileEvents::new(dir.join("events.jsonl"));
        let pool = PoolRef::new("default", "web");
        sink.emit(&pool, Event::normal(reason::SCALED_UP, "1 -> 2"));
        sink.emit(&pool, Event::warning(reason::PROVIDER_ERROR, "boom"));
        let text = fs::read_to_string(sink.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["pool"], "default/web");
        assert_eq!(lines[0]["type"], "Normal");
        assert_eq!(lines[0]["reason"], "ScaledUp");
        assert_eq!(lines[1]["type"], "Warning");
        assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));

        let big = "x".repeat(64 * 1024);
        for _ in 0..20 {
            sink.emit(&pool, Event::normal(reason::SCALED_UP, big.clone()));
        }
        let current = fs::metadata(sink.path()).unwrap().len();
        assert!(current <= EVENT_FILE_LIMIT, "{current}");
        assert!(dir.join("events.jsonl.1").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
