//! Standalone mode: the reconcile core over the CachePool manifests of a state directory,
//! with no Kubernetes — what `cachepool up` and `cachepool operator --standalone` run.
//!
//! The directory is scanned about once a second (a handful of small files; polling needs no
//! platform-specific watcher and sees edits made by any tool, editors that replace files
//! included). A new manifest starts a pool driver, a changed one hands the driver the new spec
//! (the driver validates it and keeps running on the last valid spec if it breaks a rule), a
//! deleted one stops the pool's nodes and forgets it — the finalizer of Kubernetes mode.
//! Nodes left by pools deleted while the operator was down are stopped at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::driver::{Driver, DriverOptions, PoolHandle};
use crate::metrics::OperatorMetrics;
use crate::provider::{PoolRef, Provider};
use crate::state::StateDir;

/// The pools the operator runs, for the API.
#[derive(Debug, Default)]
pub struct Registry {
    pools: RwLock<BTreeMap<PoolRef, Arc<PoolHandle>>>,
    ready: AtomicBool,
}

impl Registry {
    /// Every pool, by namespace and name.
    pub fn list(&self) -> Vec<Arc<PoolHandle>> {
        self.pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// One pool.
    pub fn get(&self, pool: &PoolRef) -> Option<Arc<PoolHandle>> {
        self.pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(pool)
            .cloned()
    }

    /// Whether the state directory has been read once (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn insert(&self, handle: Arc<PoolHandle>) {
        self.pools
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(handle.pool.clone(), handle);
    }

    fn remove(&self, pool: &PoolRef) {
        self.pools
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(pool);
    }
}

/// Settings of standalone mode.
#[derive(Clone, Copy, Debug)]
pub struct StandaloneOptions {
    pub driver: DriverOptions,
    /// How often the state directory is read.
    pub scan_interval: Duration,
}

impl Default for StandaloneOptions {
    fn default() -> Self {
        Self {
            driver: DriverOptions::default(),
            scan_interval: Duration::from_secs(1),
        }
    }
}

struct Running {
    handle: Arc<PoolHandle>,
    task: JoinHandle<()>,
    path: PathBuf,
}

/// Runs standalone mode until `shutdown` turns true; the pool drivers are stopped then (their
/// nodes are the provider's to stop or keep).
pub async fn run<P: Provider>(
    state: StateDir,
    provider: Arc<P>,
    registry: Arc<Registry>,
    metrics: OperatorMetrics,
    options: StandaloneOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut running: BTreeMap<PoolRef, Running> = BTreeMap::new();
    let mut first = true;
    loop {
        match state.scan() {
            Ok(manifests) => {
                for (path, manifest) in &manifests {
                    if seen.get(path) == Some(&manifest.content) {
                        continue;
                    }
                    seen.insert(path.clone(), manifest.content.clone());
                    let owner = running
                        .iter()
                        .find(|(_, r)| r.path == *path)
                        .map(|(pool, _)| pool.clone());
                    match &manifest.parsed {
                        Ok((pool, resource)) => {
                            if let Some(old) = owner.filter(|old| old != pool) {
                                // The file now declares another pool: the old one is deleted.
                                stop_pool(&registry, &mut running, &old).await;
                            }
                            if let Some(r) = running.get(pool) {
                                if r.path != *path {
                                    warn!(pool = %pool, file = %path.display(), other = %r.path.display(),
                                          "two manifests declare the same pool; ignoring this one");
                                    continue;
                                }
                                r.handle
                                    .manifest_changed(path.clone(), resource.clone())
                                    .await;
                            } else {
                                let (driver, handle) = Driver::new(
                                    pool.clone(),
                                    path.clone(),
                                    resource.clone(),
                                    provider.clone(),
                                    state.clone(),
                                    metrics.clone(),
                                    options.driver,
                                );
                                info!(pool = %pool, file = %path.display(), "pool found");
                                registry.insert(handle.clone());
                                let task = tokio::spawn(driver.run(shutdown.clone()));
                                running.insert(
                                    pool.clone(),
                                    Running {
                                        handle,
                                        task,
                                        path: path.clone(),
                                    },
                                );
                            }
                        }
                        Err(message) => match owner {
                            Some(pool) => {
                                if let Some(r) = running.get(&pool) {
                                    r.handle
                                        .manifest_unreadable(format!(
                                            "{}: {message}",
                                            path.display()
                                        ))
                                        .await;
                                }
                            }
                            None => warn!(file = %path.display(), error = %message,
                                          "not a usable CachePool manifest; fix the file"),
                        },
                    }
                }
                let gone: Vec<PathBuf> = seen
                    .keys()
                    .filter(|p| !manifests.contains_key(*p))
                    .cloned()
                    .collect();
                for path in gone {
                    seen.remove(&path);
                    let owner = running
                        .iter()
                        .find(|(_, r)| r.path == path)
                        .map(|(pool, _)| pool.clone());
                    if let Some(pool) = owner {
                        info!(pool = %pool, file = %path.display(), "manifest deleted");
                        stop_pool(&registry, &mut running, &pool).await;
                    }
                }
                if first {
                    first = false;
                    stop_orphans(&state, provider.as_ref(), &running).await;
                    registry.ready.store(true, Ordering::Release);
                }
            }
            Err(e) => warn!(error = %e, "reading the state directory failed"),
        }
        let stop = tokio::select! {
            stop = shutdown.wait_for(|stop| *stop) => {
                // A dropped sender stops too.
                drop(stop);
                true
            }
            () = tokio::time::sleep(options.scan_interval) => false,
        };
        if stop {
            break;
        }
    }
    for (_, r) in running {
        let _ = r.task.await;
    }
}

/// Deletes a pool: its driver stops every node and ends.
async fn stop_pool(registry: &Registry, running: &mut BTreeMap<PoolRef, Running>, pool: &PoolRef) {
    if let Some(r) = running.remove(pool) {
        r.handle.delete().await;
        let _ = r.task.await;
        registry.remove(pool);
    }
}

/// Nodes recorded for pools that have no manifest any more (deleted while the operator was
/// down) are stopped.
async fn stop_orphans<P: Provider>(
    state: &StateDir,
    provider: &P,
    running: &BTreeMap<PoolRef, Running>,
) {
    let run_dir = state.run_dir();
    let Ok(namespaces) = std::fs::read_dir(&run_dir) else {
        return;
    };
    for namespace in namespaces.flatten() {
        let Ok(pools) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for entry in pools.flatten() {
            if !entry.path().is_dir() {
                continue;
            }
            let pool = PoolRef::new(
                namespace.file_name().to_string_lossy(),
                entry.file_name().to_string_lossy(),
            );
            if running.contains_key(&pool) {
                continue;
            }
            let Ok(nodes) = provider.list(&pool).await else {
                continue;
            };
            for node in nodes {
                info!(pool = %pool, node = %node.id, "stopping a node of a pool with no manifest");
                if let Err(e) = provider.terminate(&pool, &node.id).await {
                    warn!(pool = %pool, node = %node.id, error = %e, "stopping an orphan node failed");
                }
            }
            let _ = state.remove_record(&pool);
        }
    }
}
