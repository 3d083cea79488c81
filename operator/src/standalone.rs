//! Standalone mode: the reconcile core over the CachePool manifests of a state directory,
//! with no Kubernetes — what `cachepool up` and `cachepool operator --standalone` run.
//!
//! Two halves, one per seam of the driver:
//! - [`StandaloneStore`] is the [`PoolStore`]: it plays the API server's part for the files,
//!   giving each pool a uid and a generation that grows when its spec changes (kept in the
//!   pool's record, so a restart does not reset them), writing API changes back to the
//!   manifest and records to `.cachepool/pools/`.
//! - [`run`] is the front end: the directory is scanned about once a second (a handful of
//!   small files; polling needs no platform-specific watcher and sees edits made by any tool,
//!   editors that replace files included). A new manifest starts a pool driver, a changed one
//!   hands the driver the new generation (the driver validates it and keeps running on the
//!   last valid spec if it breaks a rule), a deleted one stops the pool's nodes and forgets it
//!   — the finalizer of Kubernetes mode. Nodes left by pools deleted while the operator was
//!   down are stopped at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use cachepool_crds::pool::{CachePool, CachePoolSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::driver::{Context, Driver, PoolHandle};
use crate::provider::PoolRef;
use crate::registry::Registry;
use crate::state::StateDir;
use crate::store::{self, BoxFuture, PoolRecord, PoolStore};

/// What the store knows of a pool it has seen.
#[derive(Clone, Debug)]
struct Known {
    path: PathBuf,
    generation: i64,
    spec: CachePoolSpec,
    uid: String,
    created: Option<Time>,
}

/// The state directory as a [`PoolStore`] (see the module documentation).
#[derive(Debug)]
pub struct StandaloneStore {
    state: StateDir,
    known: Mutex<BTreeMap<PoolRef, Known>>,
}

impl StandaloneStore {
    /// A store over `state`.
    pub fn new(state: StateDir) -> StandaloneStore {
        StandaloneStore {
            state,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// The manifest at `path` declares `resource`: returns it with its generation, uid and
    /// creation time (a new generation when the spec differs from the last one seen), and on
    /// the first sight of the pool the record an earlier run kept.
    pub fn observe(
        &self,
        pool: &PoolRef,
        path: &Path,
        mut resource: CachePool,
    ) -> (CachePool, Option<PoolRecord>) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first_record = None;
        let entry = known.entry(pool.clone()).or_insert_with(|| {
            let record = self.state.load_record(pool);
            let entry = match &record {
                Some(r) => Known {
                    path: path.to_owned(),
                    generation: r.generation,
                    spec: r.spec.clone(),
                    uid: r.uid.clone(),
                    created: r.creation_timestamp.clone(),
                },
                None => Known {
                    path: path.to_owned(),
                    generation: 0,
                    spec: resource.spec.clone(),
                    uid: uuid::Builder::from_random_bytes(rand::random())
                        .into_uuid()
                        .to_string(),
                    created: Some(crate::reconcile::time(SystemTime::now())),
                },
            };
            first_record = record;
            entry
        });
        entry.path = path.to_owned();
        if entry.generation == 0 || entry.spec != resource.spec {
            entry.generation += 1;
            entry.spec = resource.spec.clone();
        }
        fill(&mut resource, entry);
        (resource, first_record)
    }

    /// Forgets what the store knows of a pool whose manifest is gone (its record stays until
    /// the driver has stopped the nodes and called [`PoolStore::forget`]).
    fn lose(&self, pool: &PoolRef) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool);
    }
}

fn fill(resource: &mut CachePool, known: &Known) {
    resource.metadata.generation = Some(known.generation);
    resource.metadata.uid = Some(known.uid.clone());
    resource.metadata.creation_timestamp = known.created.clone();
}

impl PoolStore for StandaloneStore {
    fn write_spec<'a>(
        &'a self,
        pool: &'a PoolRef,
        resource: &'a CachePool,
    ) -> BoxFuture<'a, store::Result<CachePool>> {
        Box::pin(async move {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = known
                .get_mut(pool)
                .ok_or_else(|| store::Error::NotFound(pool.clone()))?;
            self.state
                .write_manifest(&entry.path, resource)
                .map_err(|e| store::Error::Storage(e.to_string()))?;
            if entry.spec != resource.spec {
                entry.generation += 1;
                entry.spec = resource.spec.clone();
            }
            let mut stored = resource.clone();
            fill(&mut stored, entry);
            Ok(stored)
        })
    }

    fn save<'a>(
        &'a self,
        pool: &'a PoolRef,
        record: &'a PoolRecord,
    ) -> BoxFuture<'a, store::Result<()>> {
        Box::pin(async move {
            self.state
                .save_record(pool, record)
                .map_err(|e| store::Error::Storage(e.to_string()))
        })
    }

    fn forget<'a>(&'a self, pool: &'a PoolRef) -> BoxFuture<'a, store::Result<()>> {
        Box::pin(async move {
            self.lose(pool);
            self.state
                .remove_record(pool)
                .map_err(|e| store::Error::Storage(e.to_string()))
        })
    }
}

/// Settings of standalone mode's front end.
#[derive(Clone, Copy, Debug)]
pub struct StandaloneOptions {
    /// How often the state directory is read.
    pub scan_interval: Duration,
}

impl Default for StandaloneOptions {
    fn default() -> Self {
        Self {
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
pub async fn run(
    store: Arc<StandaloneStore>,
    ctx: Arc<Context>,
    registry: Arc<Registry>,
    options: StandaloneOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = store.state().clone();
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
                                stop_pool(&store, &registry, &mut running, &old).await;
                            }
                            if let Some(r) = running.get(pool) {
                                if r.path != *path {
                                    warn!(pool = %pool, file = %path.display(), other = %r.path.display(),
                                          "two manifests declare the same pool; ignoring this one");
                                    continue;
                                }
                                let (resource, _) = store.observe(pool, path, resource.clone());
                                r.handle.observed(resource).await;
                            } else {
                                let (resource, record) =
                                    store.observe(pool, path, resource.clone());
                                let (driver, handle) =
                                    Driver::new(pool.clone(), resource, record, ctx.clone());
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
                                        .unreadable(format!("{}: {message}", path.display()))
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
                        stop_pool(&store, &registry, &mut running, &pool).await;
                    }
                }
                if first {
                    first = false;
                    stop_orphans(&state, &ctx, &running).await;
                    registry.set_ready();
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
async fn stop_pool(
    store: &StandaloneStore,
    registry: &Registry,
    running: &mut BTreeMap<PoolRef, Running>,
    pool: &PoolRef,
) {
    if let Some(r) = running.remove(pool) {
        r.handle.delete().await;
        let _ = r.task.await;
        registry.remove(pool);
    }
    store.lose(pool);
}

/// Nodes recorded for pools that have no manifest any more (deleted while the operator was
/// down) are stopped.
async fn stop_orphans(state: &StateDir, ctx: &Context, running: &BTreeMap<PoolRef, Running>) {
    // Only local processes leave records in the run directory.
    let Some(provider) = &ctx.providers.process else {
        return;
    };
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
