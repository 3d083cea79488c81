//! The pools an operator runs, by namespace and name: what the HTTP API reads, whatever the
//! front end (state directory or Kubernetes) that found them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::driver::PoolHandle;
use crate::provider::PoolRef;

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
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// One pool.
    pub fn get(&self, pool: &PoolRef) -> Option<Arc<PoolHandle>> {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pool)
            .cloned()
    }

    /// Whether the front end has read every pool once (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The front end has read every pool once.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The front end stopped serving (a Kubernetes leader stepped down).
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Adds (or replaces) a pool.
    pub fn insert(&self, handle: Arc<PoolHandle>) {
        self.pools
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle.pool.clone(), handle);
    }

    /// Removes a deleted pool.
    pub fn remove(&self, pool: &PoolRef) {
        self.pools
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pool);
    }
}
