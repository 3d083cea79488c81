//! Following the pool's ring from the operator's API.
//!
//! The web app talks to the operator only through its HTTP API (DESIGN.md): it fetches the
//! pool's ring once to build its [`PoolClient`], then long-polls `ring?after=EPOCH` and hands
//! every newer ring to the client, so it learns a resize within a round trip of its publication.
//! A failed poll is retried after a short pause that doubles up to a few seconds; the client
//! keeps routing by the last ring it has meanwhile.

use std::sync::Arc;
use std::time::Duration;

use cache_node::client::{ClientOptions, PoolClient};
use cachepool_crds::client::{ClientError, OperatorClient};
use cachepool_crds::ring::RingState;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Where the ring comes from: the operator's API URL, a token that may read, and the pool.
#[derive(Clone, Debug)]
pub struct RingSource {
    /// The operator API's base URL, e.g. `http://127.0.0.1:7070`.
    pub api: String,
    /// A bearer token that may read (the read-only token is enough).
    pub token: String,
    pub namespace: String,
    pub pool: String,
}

/// Why the ring could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("asking the operator at {url} for the ring: {message}")]
    Fetch { url: String, message: String },
    #[error("the operator's ring is not valid: {0}")]
    Invalid(String),
    #[error("the pool client refused the ring: {0}")]
    Client(String),
}

impl RingSource {
    async fn fetch(
        &self,
        api: &OperatorClient,
        after: Option<u64>,
    ) -> Result<RingState, RingError> {
        api.ring(&self.namespace, &self.pool, after)
            .await
            .map_err(|e| match e {
                ClientError::Unexpected { message, .. } => RingError::Invalid(message),
                other => RingError::Fetch {
                    url: self.api.clone(),
                    message: other.to_string(),
                },
            })
    }

    fn client(&self) -> OperatorClient {
        OperatorClient::new(&self.api, &self.token)
    }

    /// Waits (retrying) until the pool has a ring, and builds a pool client on it.
    pub async fn connect(
        &self,
        options: ClientOptions,
        patience: Duration,
    ) -> Result<PoolClient, RingError> {
        let http = self.client();
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.fetch(&http, None).await {
                Ok(ring) => {
                    info!(
                        epoch = ring.current().epoch(),
                        members = ring.current().len(),
                        "pool ring fetched"
                    );
                    return PoolClient::new(ring, options)
                        .map_err(|e| RingError::Client(e.to_string()));
                }
                Err(e) if tokio::time::Instant::now() + pause < deadline => {
                    debug!(error = %e, "no ring yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `client` on the newest ring until `stop` turns true.
    pub async fn follow(self, client: Arc<PoolClient>, mut stop: watch::Receiver<bool>) {
        let http = self.client();
        let mut pause = Duration::from_millis(100);
        loop {
            let epoch = client.ring().current().epoch();
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                next = self.fetch(&http, Some(epoch)) => next,
            };
            match next {
                Ok(ring) => {
                    pause = Duration::from_millis(100);
                    if ring.current().epoch() > epoch {
                        client.set_ring(ring);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "following the ring failed; retrying");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
