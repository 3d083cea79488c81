//! The leader's pod label: which replica the operator API's Service routes to.
//!
//! Every replica serves the API, but only the leader runs the pools, so the chart's API
//! Service selects pods labelled [`ROLE_LABEL`]`=leader`. A new leader, once its watch has
//! listed every pool (when its `/readyz` turns ready), first takes the label off every other
//! pod that carries it (a deposed leader that could not clean up after itself: it is fenced,
//! or was partitioned), then puts it on its own pod. Both are JSON merge patches of
//! `metadata.labels` through the fenced client, so a replica that lost the Lease cannot label
//! itself back. A leader that stops gracefully needs no clean-up: a terminating pod leaves the
//! Service's endpoints at once.
//!
//! Why a label and not readiness: with readiness only on the leader, the follower would never
//! be Ready, and `kubectl rollout status`, `helm --wait` and PodDisruptionBudgets would treat a
//! healthy two-replica Deployment as half broken.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

/// The label the leader's pod carries (value [`LEADER`]).
pub const ROLE_LABEL: &str = "cachepool.io/operator-role";

/// [`ROLE_LABEL`]'s value on the leader's pod.
pub const LEADER: &str = "leader";

/// A replica's own pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnPod {
    /// Its namespace (`POD_NAMESPACE`).
    pub namespace: String,
    /// Its name (`POD_NAME`).
    pub name: String,
}

/// Moves the leader label to `own`: off every other pod of its namespace, then onto it.
pub async fn mark_leader(client: &kube::Client, own: &OwnPod) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &own.namespace);
    let selector = format!("{ROLE_LABEL}={LEADER}");
    let labelled = pods.list(&ListParams::default().labels(&selector)).await?;
    for pod in &labelled.items {
        let Some(name) = pod.metadata.name.as_deref() else {
            continue;
        };
        if name == own.name {
            continue;
        }
        let unlabel = json!({"metadata": {"labels": {ROLE_LABEL: null}}});
        match pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&unlabel))
            .await
        {
            Ok(_) => info!(
                pod = name,
                "took the leader label off a former leader's pod"
            ),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    if labelled
        .items
        .iter()
        .any(|p| p.metadata.name.as_deref() == Some(own.name.as_str()))
    {
        return Ok(());
    }
    let label = json!({"metadata": {"labels": {ROLE_LABEL: LEADER}}});
    pods.patch(&own.name, &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    info!(pod = %own.name, "labelled this pod as the leader: the API Service routes here");
    Ok(())
}

/// [`mark_leader`] until it succeeds or `stop` is set, waiting `retry` between attempts
/// (doubling up to 30 s): without the label the API is unreachable through its Service.
pub async fn keep_marking(
    client: kube::Client,
    own: OwnPod,
    retry: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = retry;
    loop {
        match mark_leader(&client, &own).await {
            Ok(()) => return,
            Err(e) => {
                warn!(pod = %own.name, error = %e, retry_in = ?wait,
                      "could not label this pod as the leader");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}
