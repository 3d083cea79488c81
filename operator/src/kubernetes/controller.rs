//! The kube-rs runtime `Controller` over CachePools, feeding the per-pool drivers.
//!
//! `reconcile` is thin, as in controller-rs: it delegates to kube's `finalizer()`, which adds
//! [`FINALIZER`] to a new pool before anything runs and, when the pool is being deleted, calls
//! the cleanup and only then removes the finalizer. Apply starts the pool's driver the first
//! time (its record read from the object's status and last-valid-spec annotation, so a
//! restarted operator adopts the ring and nodes it finds) and afterwards hands the driver the
//! object (`observed`): the driver takes a new `metadata.generation` as a new spec and
//! ignores a repeat. Cleanup deletes the driver (it stops every node and forgets the pool),
//! waits for it, and checks with the provider that no node is left; an operator restarted
//! mid-deletion finds the object still carrying the finalizer and does the same with a driver
//! started just for that.
//!
//! Reconciles do not write the status: the drivers do, through [`KubeStore`], when it changed.
//! So the API server sees the finalizer patch once per pool, a status apply per meaningful
//! change, and nothing for a resync of an unchanged pool.
//!
//! Errors requeue the pool with a doubling back-off ([`KubernetesOptions::retry_min`] up to
//! `retry_max`) and are counted by kind in `cachepool_operator_reconcile_errors_total`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cachepool_crds::pool::CachePool;
use futures_util::StreamExt as _;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::store::{annotated_spec, record_of};
use super::{Error, FINALIZER, KubeEvents, KubeStore, KubernetesOptions, Result};
use crate::driver::{Context, Driver, PoolHandle};
use crate::provider::PoolRef;
use crate::registry::Registry;

/// How often the readiness task asks whether the pool cache has listed every pool.
const READY_POLL: Duration = Duration::from_millis(100);
/// First wait before labelling the leader's pod is tried again (doubling).
const LABEL_RETRY: Duration = Duration::from_secs(1);

/// A running pool driver.
#[derive(Debug)]
struct Running {
    uid: Option<String>,
    handle: Arc<PoolHandle>,
    task: JoinHandle<()>,
}

/// What every reconcile of one leadership term shares.
pub struct Controller {
    /// The (fenced) client the finalizer patches go through.
    client: kube::Client,
    ctx: Arc<Context>,
    store: Arc<KubeStore>,
    events: Arc<KubeEvents>,
    registry: Arc<Registry>,
    options: KubernetesOptions,
    /// Turns true when the drivers must stop (the term ends).
    stop: watch::Receiver<bool>,
    pools: Mutex<BTreeMap<PoolRef, Running>>,
    failures: Mutex<BTreeMap<PoolRef, u32>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller for one term: `ctx` is the drivers' context (its store is `store`, its
    /// events reach `events`), `stop` ends the drivers.
    pub fn new(
        client: kube::Client,
        ctx: Arc<Context>,
        store: Arc<KubeStore>,
        events: Arc<KubeEvents>,
        registry: Arc<Registry>,
        options: KubernetesOptions,
        stop: watch::Receiver<bool>,
    ) -> Controller {
        Controller {
            client,
            ctx,
            store,
            events,
            registry,
            options,
            stop,
            pools: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    /// Runs the controller until the stop signal, then waits for every driver to end.
    pub async fn run(self: Arc<Self>) {
        let api: Api<CachePool> = match &self.options.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        };
        let mut stop = self.stop.clone();
        let controller = kube::runtime::Controller::new(api, watcher::Config::default())
            .graceful_shutdown_on(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        let cache = controller.store();
        let registry = self.registry.clone();
        let leader_pod = self.options.leader_pod.clone();
        let label_client = self.client.clone();
        let label_stop = self.stop.clone();
        let ready = tokio::spawn(async move {
            // The controller's own runner waits on the same store. kube-runtime 5's readiness
            // signal is a oneshot behind a mutex that keeps only the last waiter's waker, so
            // one of two concurrent waiters may never be woken; asking again every 100 ms
            // finds the memoised answer.
            loop {
                match tokio::time::timeout(READY_POLL, cache.wait_until_ready()).await {
                    Ok(Ok(())) => {
                        debug!("every pool listed: ready");
                        registry.set_ready();
                        if let Some(own) = leader_pod {
                            super::role::keep_marking(label_client, own, LABEL_RETRY, label_stop)
                                .await;
                        }
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "the pool cache was dropped before its first list");
                        return;
                    }
                    Err(_) => {}
                }
            }
        });
        info!(
            namespace = self.options.namespace.as_deref().unwrap_or("(all)"),
            "controller started"
        );
        controller
            .run(reconcile, error_policy, self.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    debug!(error = %e, "controller");
                }
            })
            .await;
        ready.abort();
        self.registry.set_not_ready();
        let running: Vec<(PoolRef, Running)> =
            std::mem::take(&mut *self.pools.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect();
        for (pool, r) in running {
            let _ = r.task.await;
            self.registry.remove(&pool);
        }
        info!("controller stopped");
    }

    /// A pool exists (and is not being deleted): its driver runs and has seen `resource`.
    async fn apply(&self, pool: &PoolRef, resource: &CachePool) -> Result<Action> {
        let uid = resource.metadata.uid.clone();
        let running = {
            let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
            pools
                .get(pool)
                .filter(|r| !r.task.is_finished())
                .map(|r| (r.uid.clone(), r.handle.clone()))
        };
        match running {
            Some((running_uid, handle)) if running_uid == uid => {
                handle.observed(resource.clone()).await;
            }
            Some(_) => {
                // Another object of the same name: the old one went without our cleanup
                // (its finalizer removed by hand). Its nodes stop before the new pool starts.
                warn!(pool = %pool, "the pool was replaced by a new object; stopping the old one's nodes");
                self.delete(pool, resource).await?;
                self.start(pool, resource);
            }
            None => self.start(pool, resource),
        }
        Ok(Action::requeue(self.options.resync))
    }

    fn start(&self, pool: &PoolRef, resource: &CachePool) {
        let (handle, task) = self.spawn_driver(pool, resource);
        self.registry.insert(handle.clone());
        info!(pool = %pool, generation = ?resource.metadata.generation, "pool found");
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                pool.clone(),
                Running {
                    uid: resource.metadata.uid.clone(),
                    handle,
                    task,
                },
            );
    }

    fn spawn_driver(
        &self,
        pool: &PoolRef,
        resource: &CachePool,
    ) -> (Arc<PoolHandle>, JoinHandle<()>) {
        self.store.remember_annotation(pool, resource);
        let (driver, handle) = Driver::new(
            pool.clone(),
            resource.clone(),
            record_of(resource),
            self.ctx.clone(),
        );
        let task = tokio::spawn(driver.run(self.stop.clone()));
        (handle, task)
    }

    /// The pool is being deleted: its driver stops every node and ends; then no node of the
    /// pool may be left.
    async fn delete(&self, pool: &PoolRef, resource: &CachePool) -> Result<Action> {
        let running = self
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool);
        let (handle, task) = match running {
            Some(r) if !r.task.is_finished() => (r.handle, r.task),
            // Not running here (the operator restarted mid-deletion): a driver just for this.
            _ => self.spawn_driver(pool, resource),
        };
        info!(pool = %pool, "pool deleted: stopping its nodes");
        handle.delete().await;
        let _ = task.await;
        self.registry.remove(pool);
        let spec = annotated_spec(resource).unwrap_or_else(|| resource.spec.clone());
        if let Ok(provider) = self.ctx.providers.resolve(&spec.provider) {
            let left = provider.list(pool).await?;
            let alive = left.iter().filter(|n| n.alive).count();
            if alive > 0 {
                return Err(Error::NodesLeft {
                    pool: pool.to_string(),
                    nodes: alive,
                });
            }
        }
        self.events.untrack(pool);
        Ok(Action::await_change())
    }

    /// The wait before a pool's next attempt, doubling per consecutive failure.
    fn backoff(&self, pool: &PoolRef) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(pool.clone()).or_insert(0);
        let wait = self
            .options
            .retry_min
            .saturating_mul(1u32 << (*count).min(16))
            .min(self.options.retry_max);
        *count = count.saturating_add(1);
        wait
    }

    fn succeeded(&self, pool: &PoolRef) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool);
    }
}

fn pool_ref(resource: &CachePool) -> Result<PoolRef> {
    let meta = resource.meta();
    match (&meta.namespace, &meta.name) {
        (Some(namespace), Some(name)) => Ok(PoolRef::new(namespace, name)),
        _ => Err(Error::Unnamed),
    }
}

async fn reconcile(resource: Arc<CachePool>, controller: Arc<Controller>) -> Result<Action> {
    let pool = pool_ref(&resource)?;
    controller.events.track(&pool, &resource);
    let deleting = resource.metadata.deletion_timestamp.is_some();
    let action = if deleting && !resource.finalizers().iter().any(|f| f == FINALIZER) {
        // Deleted without our finalizer (removed by hand): nothing waits for the nodes, but
        // they are stopped all the same.
        let running = controller
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&pool);
        if running {
            controller.delete(&pool, &resource).await?;
        }
        Action::await_change()
    } else {
        let api: Api<CachePool> = Api::namespaced(controller.client.clone(), &pool.namespace);
        finalizer::finalizer(&api, FINALIZER, resource, |event| async {
            match event {
                Finalizer::Apply(resource) => controller.apply(&pool, &resource).await,
                Finalizer::Cleanup(resource) => controller.delete(&pool, &resource).await,
            }
        })
        .await
        .map_err(|e| match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })?
    };
    controller.succeeded(&pool);
    Ok(action)
}

fn error_policy(resource: Arc<CachePool>, error: &Error, controller: Arc<Controller>) -> Action {
    let Ok(pool) = pool_ref(&resource) else {
        return Action::await_change();
    };
    controller
        .ctx
        .metrics
        .reconcile_failed(&pool.to_string(), error.kind());
    let wait = controller.backoff(&pool);
    warn!(pool = %pool, error = %error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}
