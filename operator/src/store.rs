//! Where pools come from and where their status goes: the seam between the pool drivers and
//! a front end (the state directory of standalone mode; the Kubernetes API next).
//!
//! A front end delivers each pool to its driver as a [`CachePool`] with `metadata.generation`,
//! `metadata.uid` and `metadata.creationTimestamp` set, exactly as a Kubernetes watch delivers
//! it: a new generation is a new spec. The driver never mints those fields; the store does
//! (Kubernetes' API server, or [`standalone::StandaloneStore`](crate::standalone) for files).
//! Writes go back through a [`PoolStore`]: a spec change made through the operator's API, the
//! pool's record (status, last valid spec) after a meaningful change, and forgetting a deleted
//! pool. The driver decides *when* to write (see `driver::status`): a store is told only about
//! changes a reader would want to see, never about every probe round.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use cachepool_crds::pool::{CachePool, CachePoolSpec, CachePoolStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::provider::PoolRef;

/// A boxed future, so that stores can be trait objects chosen at start-up.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a store could not read or write.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backing storage failed (a file, the API server).
    #[error("{0}")]
    Storage(String),
    /// Someone else changed the pool first; the caller may retry on the newer object.
    #[error("the pool changed meanwhile: {0}")]
    Conflict(String),
    /// The pool is not in the store (deleted).
    #[error("no pool {0}")]
    NotFound(PoolRef),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the operator keeps about a pool besides its spec: enough for a restarted operator to
/// know the pool's ring, its running migration and the nodes it must adopt.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    /// `metadata.generation` of the newest spec seen.
    pub generation: i64,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Time>,
    /// The newest spec seen, valid or not.
    pub spec: CachePoolSpec,
    /// The newest valid spec: what the pool runs on.
    pub valid_spec: Option<CachePoolSpec>,
    #[serde(default)]
    pub status: CachePoolStatus,
}

/// Where specs come from and status goes (see the module documentation).
pub trait PoolStore: Send + Sync + fmt::Debug + 'static {
    /// Stores a spec change made through the operator's API (`resource` is the whole object,
    /// spec merged) and returns it as stored, with its new generation. The front end will
    /// deliver the same generation again; the driver takes it once.
    fn write_spec<'a>(
        &'a self,
        pool: &'a PoolRef,
        resource: &'a CachePool,
    ) -> BoxFuture<'a, Result<CachePool>>;

    /// Stores the pool's record after a meaningful change of its status.
    fn save<'a>(&'a self, pool: &'a PoolRef, record: &'a PoolRecord) -> BoxFuture<'a, Result<()>>;

    /// Forgets a deleted pool (its nodes are already stopped).
    fn forget<'a>(&'a self, pool: &'a PoolRef) -> BoxFuture<'a, Result<()>>;
}
