//! [`KubePods`]: the pod provider's [`PodApi`] over the API server.
//!
//! Each call is one request through the operator's (fenced) client: a deposed leader cannot
//! create or delete a pod. Creating a Secret that already exists answers with the existing one
//! (another replica, or an earlier attempt, made it first), so every node of a pool gets the
//! same admin token; deleting a pod that is already gone is success.

use std::fmt;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::provider::pod::PodApi;
use crate::provider::{Error, ProviderKind, Result};
use crate::store::BoxFuture;

/// The pod provider's calls, made to the Kubernetes API.
#[derive(Clone)]
pub struct KubePods {
    client: kube::Client,
}

impl fmt::Debug for KubePods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubePods").finish_non_exhaustive()
    }
}

impl KubePods {
    /// Calls made through `client`.
    pub fn new(client: kube::Client) -> KubePods {
        KubePods { client }
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

fn failed(action: &'static str, error: &kube::Error) -> Error {
    Error::Api {
        provider: ProviderKind::Pod,
        action,
        message: error.to_string(),
    }
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

impl PodApi for KubePods {
    fn create_pod(&self, pod: Pod) -> BoxFuture<'_, Result<Pod>> {
        Box::pin(async move {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            self.pods(&namespace)
                .create(&PostParams::default(), &pod)
                .await
                .map_err(|e| failed("creating a pod", &e))
        })
    }

    fn list_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Pod>>> {
        Box::pin(async move {
            self.pods(namespace)
                .list(&ListParams::default().labels(selector))
                .await
                .map(|list| list.items)
                .map_err(|e| failed("listing pods", &e))
        })
    }

    fn delete_pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self
                .pods(namespace)
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 404) => Ok(()),
                Err(e) => Err(failed("deleting a pod", &e)),
            }
        })
    }

    fn ensure_secret<'a>(
        &'a self,
        namespace: &'a str,
        secret: Secret,
    ) -> BoxFuture<'a, Result<Secret>> {
        Box::pin(async move {
            let api = self.secrets(namespace);
            let name = secret.metadata.name.clone().unwrap_or_default();
            if let Some(existing) = api
                .get_opt(&name)
                .await
                .map_err(|e| failed("reading the admin-token Secret", &e))?
            {
                return Ok(existing);
            }
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => Ok(created),
                // Made by someone else since the read: theirs is the pool's token.
                Err(e) if is_status(&e, 409) => api
                    .get(&name)
                    .await
                    .map_err(|e| failed("reading the admin-token Secret", &e)),
                Err(e) => Err(failed("creating the admin-token Secret", &e)),
            }
        })
    }
}
