//! [`KubeStore`]: the API server as the [`PoolStore`] of Kubernetes mode.
//!
//! - `save` writes `.status` by server-side apply on the status subresource under the field
//!   manager [`FIELD_MANAGER`], forced (the operator is the status' only owner, so a conflict
//!   can only be a leftover of an older manager name). It is called only when the driver
//!   decides the status changed meaningfully (`driver::status`), never per probe round. When
//!   the pool's last valid spec changed too, it is applied to the annotation
//!   [`LAST_VALID_SPEC`] on the object itself (the status subresource ignores metadata); that
//!   happens once per accepted spec, not per status write.
//! - `write_spec` is the operator API's `PATCH` and `scale` path: the driver hands over the
//!   whole merged spec, and it replaces `.spec` with a JSON patch (a merge patch could not
//!   remove a field the API patch removed), which bumps `metadata.generation`; the stored
//!   object comes back and the watch delivers the same generation again, which the driver
//!   takes once.
//! - A restarted operator gets each pool's record from the object the watch delivers: the
//!   controller makes it from the status and annotation with [`record_of`]. (The store has no
//!   read of its own; the watch is the only reader, so RBAC needs no `get` on cachepools.)
//! - `forget` drops what the store caches of the pool: the object is on its way out (the
//!   controller removes the finalizer once the driver has stopped every node).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use cachepool_crds::pool::{CachePool, CachePoolSpec};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{FIELD_MANAGER, LAST_VALID_SPEC};
use crate::provider::PoolRef;
use crate::store::{self, BoxFuture, PoolRecord, PoolStore};

/// The Kubernetes API as a [`PoolStore`] (see the module documentation).
pub struct KubeStore {
    client: kube::Client,
    /// The valid spec last written to (or read from) each pool's annotation.
    annotated: Mutex<BTreeMap<PoolRef, CachePoolSpec>>,
}

impl fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store writing through `client`.
    pub fn new(client: kube::Client) -> KubeStore {
        KubeStore {
            client,
            annotated: Mutex::new(BTreeMap::new()),
        }
    }

    fn api(&self, pool: &PoolRef) -> Api<CachePool> {
        Api::namespaced(self.client.clone(), &pool.namespace)
    }

    /// Notes the valid spec the object's annotation already holds (the controller read it).
    pub(crate) fn remember_annotation(&self, pool: &PoolRef, resource: &CachePool) {
        if let Some(spec) = annotated_spec(resource) {
            self.annotated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(pool.clone(), spec);
        }
    }

    fn annotation_is(&self, pool: &PoolRef, spec: &CachePoolSpec) -> bool {
        self.annotated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(pool)
            == Some(spec)
    }
}

/// The valid spec kept in the object's [`LAST_VALID_SPEC`] annotation, if it parses.
pub fn annotated_spec(resource: &CachePool) -> Option<CachePoolSpec> {
    let text = resource
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_VALID_SPEC)?;
    serde_json::from_str(text).ok()
}

/// The record an earlier operator left on the object: `None` for a pool never reconciled
/// (no status yet). Its generation is the one the status reflects, so a newer
/// `metadata.generation` reaches the driver as a new spec.
pub fn record_of(resource: &CachePool) -> Option<PoolRecord> {
    let status = resource.status.clone()?;
    let generation = status.observed_generation?;
    Some(PoolRecord {
        generation,
        uid: resource.metadata.uid.clone().unwrap_or_default(),
        creation_timestamp: resource.metadata.creation_timestamp.clone(),
        spec: resource.spec.clone(),
        valid_spec: annotated_spec(resource),
        status,
    })
}

fn storage_error(pool: &PoolRef, error: kube::Error) -> store::Error {
    match &error {
        kube::Error::Api(status) if status.code == 404 => store::Error::NotFound(pool.clone()),
        kube::Error::Api(status) if status.code == 409 => store::Error::Conflict(error.to_string()),
        _ => store::Error::Storage(error.to_string()),
    }
}

impl PoolStore for KubeStore {
    fn write_spec<'a>(
        &'a self,
        pool: &'a PoolRef,
        resource: &'a CachePool,
    ) -> BoxFuture<'a, store::Result<CachePool>> {
        Box::pin(async move {
            let spec = serde_json::to_value(&resource.spec)
                .map_err(|e| store::Error::Storage(e.to_string()))?;
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "replace", "path": "/spec", "value": spec}
            ]))
            .map_err(|e| store::Error::Storage(e.to_string()))?;
            self.api(pool)
                .patch(
                    &pool.name,
                    &PatchParams::default(),
                    &Patch::Json::<()>(patch),
                )
                .await
                .map_err(|e| storage_error(pool, e))
        })
    }

    fn save<'a>(
        &'a self,
        pool: &'a PoolRef,
        record: &'a PoolRecord,
    ) -> BoxFuture<'a, store::Result<()>> {
        Box::pin(async move {
            let api = self.api(pool);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            if let Some(valid) = &record.valid_spec
                && !self.annotation_is(pool, valid)
            {
                let text = serde_json::to_string(valid)
                    .map_err(|e| store::Error::Storage(e.to_string()))?;
                let annotation = json!({
                    "apiVersion": "cachepool.io/v1alpha1",
                    "kind": "CachePool",
                    "metadata": {"name": pool.name, "annotations": {LAST_VALID_SPEC: text}},
                });
                api.patch(&pool.name, &params, &Patch::Apply(annotation))
                    .await
                    .map_err(|e| storage_error(pool, e))?;
                self.annotated
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(pool.clone(), valid.clone());
            }
            let status = json!({
                "apiVersion": "cachepool.io/v1alpha1",
                "kind": "CachePool",
                "status": record.status,
            });
            api.patch_status(&pool.name, &params, &Patch::Apply(status))
                .await
                .map(drop)
                .map_err(|e| storage_error(pool, e))
        })
    }

    fn forget<'a>(&'a self, pool: &'a PoolRef) -> BoxFuture<'a, store::Result<()>> {
        Box::pin(async move {
            self.annotated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(pool);
            Ok(())
        })
    }
}
