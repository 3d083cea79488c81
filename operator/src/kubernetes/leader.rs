//! Leader election on a `coordination.k8s.io/v1` Lease, with `kube-lease-manager` (the
//! maintained crate that supports kube 5), and the fence that keeps a deposed leader quiet.
//!
//! Only the leader runs the controller, the pool drivers and the operator API; a follower
//! waits for the lease. Two pieces make "a leader that loses its lease stops acting before
//! another can start" hold even when the API server is unreachable or slow, which the crate
//! alone does not give (it reports a lost lease only when it can read the lease):
//!
//! - **The fence** ([`Fence`]): every request the controller, the store, the event sink and
//!   the providers make goes through one client whose layer refuses every mutating request
//!   (anything but GET) the moment the fence is down. Stepping down drops the fence first, so
//!   it takes effect at once; stopping the controller and the drivers comes after and may take
//!   as long as it likes, since none of them can write any more.
//! - **The renewal witness**: the lease manager talks through its own client whose layer
//!   notes when the last successful lease PATCH was *sent*, and bounds each lease request to
//!   the retry period. A watchdog drops the fence when no renewal succeeded for the renew
//!   deadline.
//!
//! Timing (client-go's figures: lease 15 s, renew deadline 10 s, retry 2 s). The leader
//! renews every `retry` (the crate's `grace` is `lease - retry`: it renews when that much of
//! the lease is left). Let `t` be the moment the last successful renewal was sent; the
//! lease's `renewTime` in it was taken just before `t`, by the leader's clock. A follower
//! takes the lease only once *its* clock passes `renewTime + lease`, then releases the
//! expired lock, waits 0.1–1 s and acquires: no earlier than `t + 15 s − skew`. The leader's
//! watchdog drops the fence by `t + renew deadline = t + 10 s` at the latest. So the old
//! leader is silent before the new one starts as long as the clocks of the two operator pods
//! differ by less than 5 s (the same assumption client-go makes). Writes already in flight
//! when the fence drops may still land; each is idempotent in effect (status by apply, the
//! finalizer patch guarded by a `test`, pods created by name), and the new leader re-reads
//! every pool before it writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Lease timing (see the module documentation for why these figures are safe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a lease is valid after its last renewal (`leaseDurationSeconds`).
    pub lease: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often the leader renews; also the time limit of one lease request.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Who competes for which lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This operator's identity in the lease (`holderIdentity`): the pod name.
    pub identity: String,
    pub timing: LeaseTiming,
    /// This replica's own pod, labelled while it leads (see [`super::role`]); `None` outside
    /// a pod.
    pub pod: Option<super::OwnPod>,
}

/// Whether this operator may write to the API server (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<AtomicBool>);

impl Fence {
    /// A fence that is down (nothing may be written) until [`Fence::raise`].
    pub fn new() -> Fence {
        Fence::default()
    }

    /// A fence that is up for good (no leader election).
    pub fn open() -> Fence {
        let fence = Fence::new();
        fence.raise();
        fence
    }

    /// Writes are allowed.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Writes are refused from now on.
    pub fn drop_now(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// Whether writes are allowed.
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// A client sending through `client` that refuses every mutating request while the fence
    /// is down.
    pub fn client(&self, client: &kube::Client) -> kube::Client {
        kube::Client::new(
            Gate {
                inner: client.clone(),
                mode: Mode::Fence(self.clone()),
            },
            client.default_namespace().to_owned(),
        )
    }
}

/// When the last lease renewal that succeeded was sent.
#[derive(Clone, Debug, Default)]
struct Witness(Arc<Mutex<Option<Instant>>>);

impl Witness {
    fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn note(&self, sent: Instant) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|l| l < sent) {
            *last = Some(sent);
        }
    }
}

#[derive(Clone, Debug)]
enum Mode {
    Fence(Fence),
    Witness { witness: Witness, timeout: Duration },
}

/// The layer of [`Fence::client`] and of the lease manager's client.
#[derive(Clone)]
struct Gate {
    inner: kube::Client,
    mode: Mode,
}

type GateFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

/// The error a fenced request fails with.
#[derive(Debug, thiserror::Error)]
#[error("this operator is not the leader: {method} {path} was not sent")]
pub struct Fenced {
    method: Method,
    path: String,
}

impl tower::Service<Request<Body>> for Gate {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = GateFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner client buffers; readiness is its business when the request is sent.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client = self.inner.clone();
        match &self.mode {
            Mode::Fence(fence) => {
                if request.method() != Method::GET && !fence.is_up() {
                    let refused = Fenced {
                        method: request.method().clone(),
                        path: request.uri().path().to_owned(),
                    };
                    return Box::pin(async move { Err(kube::Error::Service(Box::new(refused))) });
                }
                Box::pin(async move { client.send(request).await })
            }
            Mode::Witness { witness, timeout } => {
                let witness = witness.clone();
                let timeout = *timeout;
                let renewal = request.method() == Method::PATCH;
                Box::pin(async move {
                    let sent = Instant::now();
                    let response = tokio::time::timeout(timeout, client.send(request))
                        .await
                        .map_err(|e| kube::Error::Service(Box::new(e)))??;
                    if renewal && response.status().is_success() {
                        witness.note(sent);
                    }
                    Ok(response)
                })
            }
        }
    }
}

/// Runs `act` whenever this operator leads, until `shutdown` turns true.
///
/// `act` is given a receiver that turns true when it must stop (the lease is lost, or the
/// operator is shutting down) and must return once it has stopped. `fence` is raised while
/// `act` runs and dropped before it is told to stop.
pub async fn run<F, Fut>(
    client: kube::Client,
    election: LeaderElection,
    fence: Fence,
    mut shutdown: watch::Receiver<bool>,
    mut act: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let timing = election.timing;
    let witness = Witness::default();
    let lease_client = kube::Client::new(
        Gate {
            inner: client.clone(),
            mode: Mode::Witness {
                witness: witness.clone(),
                timeout: timing.retry,
            },
        },
        client.default_namespace().to_owned(),
    );
    fence.drop_now();
    loop {
        // A new manager per term: the crate remembers whether it led, and a term that ended
        // by the watchdog must start from "not leading".
        let manager = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => None,
            manager = build_manager(&lease_client, &election) => Some(manager),
        };
        let Some(manager) = manager else {
            return;
        };
        info!(lease = %election.lease_name, identity = %election.identity, "waiting for the lease");
        let led = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => false,
            () = acquire(&manager, timing.retry) => true,
        };
        if !led {
            release(&manager).await;
            return;
        }
        info!(lease = %election.lease_name, identity = %election.identity, "leading");
        fence.raise();
        let (stop, stopped) = watch::channel(false);
        let acting = tokio::spawn(act(stopped));
        let why = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => "the operator is stopping",
            why = keep(&manager, &witness, timing) => why,
        };
        fence.drop_now();
        warn!(lease = %election.lease_name, identity = %election.identity, reason = why,
              "no longer leading: writes are fenced, stopping the controller and the drivers");
        let _ = stop.send(true);
        let _ = acting.await;
        release(&manager).await;
        if *shutdown.borrow() {
            return;
        }
    }
}

async fn build_manager(client: &kube::Client, election: &LeaderElection) -> LeaseManager {
    let timing = election.timing;
    let lease = timing.lease.as_secs().max(2);
    // The crate renews when `grace` seconds of the lease are left: renewing every `retry`.
    let grace = lease.saturating_sub(timing.retry.as_secs().max(1)).max(1);
    loop {
        let built = LeaseManagerBuilder::new(client.clone(), election.lease_name.clone())
            .with_namespace(election.namespace.clone())
            .with_identity(election.identity.clone())
            .with_duration(lease)
            .with_grace(grace)
            // One field manager per replica: the API server's apply conflicts on
            // `holderIdentity` are what decide a race for a free lease (a shared manager would
            // let both replicas take it).
            .with_field_manager(format!("{}-{}", super::FIELD_MANAGER, election.identity))
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .build()
            .await;
        match built {
            Ok(manager) => return manager,
            Err(e) => {
                warn!(lease = %election.lease_name, error = %e, "reading the lease failed; retrying");
                tokio::time::sleep(timing.retry).await;
            }
        }
    }
}

/// Returns once this operator holds the lease.
async fn acquire(manager: &LeaseManager, retry: Duration) {
    loop {
        match manager.changed().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "leader election failed; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Keeps the lease while it can; returns why leading ended.
async fn keep(manager: &LeaseManager, witness: &Witness, timing: LeaseTiming) -> &'static str {
    let renewals = async {
        loop {
            match manager.changed().await {
                Ok(false) => return "another operator holds the lease",
                Ok(true) => {}
                // The watchdog decides when failures have lasted too long.
                Err(e) => {
                    warn!(error = %e, "renewing the lease failed; retrying");
                    tokio::time::sleep(timing.retry).await;
                }
            }
        }
    };
    let watchdog = async {
        loop {
            let Some(last) = witness.last() else {
                return "the lease was never renewed";
            };
            let deadline = last + timing.renew_deadline;
            if Instant::now() >= deadline {
                return "the lease could not be renewed within the renew deadline";
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        why = renewals => why,
        why = watchdog => why,
    }
}

/// Gives the lease up so a follower need not wait for it to expire (best effort).
async fn release(manager: &LeaseManager) {
    if let Err(e) = manager.release().await {
        warn!(error = %e, "releasing the lease failed; it expires on its own");
    }
}
