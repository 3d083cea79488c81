//! The EC2 provider end to end against moto: the real operator (in-process) drives a
//! `provider: {ec2: …}` pool through moto's EC2 and SSM, and a harness plays the instances'
//! boot.
//!
//! moto's instances run nothing, so the harness watches moto for new instances and starts, for
//! each, an embedded `cache_node::Node` with the capacity, policy and item size read from the
//! user data the provider really sent, and the admin token read from the SSM parameter that user
//! data names (the token itself is never in user data). The provider under test resolves an
//! instance id to that node's loopback addresses through the resolver the harness supplies;
//! production resolves to the instance's IP.
//!
//! The resize test runs grow 1→3 and shrink 3→1 under load through a pool client that follows
//! the operator's ring (the resize suite's load generator and stale-read checker, from
//! `cachepool-test-support`), and checks afterwards that every key the nodes hold is on its
//! ring owner and only there.
//!
//! A crash between `RunInstances` and recording the instance is played with an SDK
//! interceptor that, once moto has answered, drops the runtime of the operator that made the
//! call before the answer reaches it; the next operator, with its own periodic garbage
//! collection, adopts the instance, or collects it after the grace period when the pool was
//! deleted meanwhile.
//!
//! The resize test also measures, for grow 1→3 and shrink 3→1, the time from the decision (the
//! driver holding the new spec) to the new ring epoch, and how much of it was spent inside the
//! provider's AWS calls (timed by an SDK interceptor) and waiting for the harness to boot
//! instances, so that what is left is the operator's own; it prints these and the EC2/SSM
//! calls per resize by operation (`cargo test … --test ec2 -- --nocapture`).
//!
//! Each test starts its own moto (the `cachepool-test-support` fixture) on a free loopback
//! port and stops it when it ends.

use std::collections::{BTreeMap, HashMap};

use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::future::ProvideCredentials as CredentialsFuture;
use aws_sdk_ec2::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextRef,
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_ec2::config::{
    ConfigBag, Credentials, Intercept, ProvideCredentials, RuntimeComponents,
    SharedCredentialsProvider, SharedInterceptor,
};
use aws_sdk_ec2::error::{BoxError, ProvideErrorMetadata};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, Instance, InstanceStateName, InstanceType, RequestLaunchTemplateData,
};
use base64::Engine as _;
use cache_node::client::{ClientOptions, PoolClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use cachepool_crds::pool::{CachePool, Ec2LaunchTemplate, PoolPhase, ProviderSpec};
use cachepool_crds::ring::{Ring, RingState};
use cachepool_operator::driver::DriverOptions;
use cachepool_operator::events::{EventType, RecordedEvents, reason};
use cachepool_operator::provider::ec2::{
    ATTEMPT_TAG, Ec2Options, Ec2Pool, Ec2Provider, InstanceAddresses, client_token,
};
use cachepool_operator::provider::embedded::EmbeddedProvider;
use cachepool_operator::provider::{AdminToken, LaunchSpec, PoolRef, Provider as _, tags};
use cachepool_operator::run::{Config, NodeBackend, Operator};
use cachepool_operator::standalone::StandaloneOptions;
use cachepool_test_support::load::{self, Checker, Keys, Load, LoadConfig};
use cachepool_test_support::placement::{Items, items, misplaced};
use cachepool_test_support::servers::{Moto, TempDir};

const REGION: &str = "us-east-1";
const OPERATOR_ID: &str = "ec2-test";
const TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);

fn static_credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new("testing", "testing", None, None, "test"))
}

/// The test's own view of moto (not the provider's clients).
struct Cloud {
    moto: Moto,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
}

impl Cloud {
    async fn start() -> Cloud {
        let moto = Moto::start();
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(REGION))
            .credentials_provider(static_credentials())
            .endpoint_url(moto.endpoint())
            .load()
            .await;
        Cloud {
            ec2: aws_sdk_ec2::Client::new(&shared),
            ssm: aws_sdk_ssm::Client::new(&shared),
            moto,
        }
    }

    /// Every instance moto knows of, with `filters`.
    async fn instances(&self, filters: Vec<Filter>) -> Vec<Instance> {
        let out = self
            .ec2
            .describe_instances()
            .set_filters(Some(filters))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeInstances: {e:?}"));
        out.reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect()
    }

    /// The live (pending or running) instances of a pool.
    async fn live(&self, pool: &PoolRef) -> Vec<Instance> {
        self.instances(vec![
            Filter::builder()
                .name(format!("tag:{}", tags::POOL))
                .values(pool.to_string())
                .build(),
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        ])
        .await
    }

    /// Settings moto accepts: one of its AMIs, a default subnet and the default group.
    async fn ec2_settings(&self) -> (String, String, String) {
        let image = self
            .ec2
            .describe_images()
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeImages: {e:?}"))
            .images()
            .first()
            .and_then(|i| i.image_id())
            .unwrap_or_else(|| panic!("moto has no image"))
            .to_owned();
        let subnet = self
            .ec2
            .describe_subnets()
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeSubnets: {e:?}"))
            .subnets()
            .first()
            .and_then(|s| s.subnet_id())
            .unwrap_or_else(|| panic!("moto has no subnet"))
            .to_owned();
        let group = self
            .ec2
            .describe_security_groups()
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeSecurityGroups: {e:?}"))
            .security_groups()
            .iter()
            .find(|g| g.group_name() == Some("default"))
            .and_then(|g| g.group_id())
            .unwrap_or_else(|| panic!("moto has no default group"))
            .to_owned();
        (image, subnet, group)
    }
}

fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// What the harness read from an instance's user data, and the node it started.
struct Booted {
    /// When the harness had the instance's node up.
    at: Instant,
    node: Option<Node>,
    data: String,
    admin: String,
    user_data: String,
    token: String,
}

/// Plays the boot of moto's instances (see the module documentation).
#[derive(Clone)]
struct Instances {
    booted: Arc<Mutex<HashMap<String, Booted>>>,
    stop: Arc<AtomicBool>,
    /// How many of the next new instances never boot: they get addresses where nothing
    /// listens (an AMI that does not start the node).
    duds: Arc<AtomicUsize>,
}

impl Instances {
    fn new() -> Instances {
        Instances {
            booted: Arc::new(Mutex::new(HashMap::new())),
            stop: Arc::new(AtomicBool::new(false)),
            duds: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The resolver the provider under test gets: instance id → its node's loopback ports.
    fn resolver(&self) -> cachepool_operator::provider::ec2::AddressResolver {
        let booted = self.booted.clone();
        Arc::new(move |instance: &InstanceAddresses| {
            let booted = booted.lock().unwrap_or_else(PoisonError::into_inner);
            booted
                .get(&instance.id)
                .map(|b| (b.data.clone(), b.admin.clone()))
        })
    }

    /// Watches moto until stopped: boots new instances, stops the nodes of gone ones.
    fn watch(&self, cloud: Arc<Cloud>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            while !this.stop.load(Ordering::Relaxed) {
                for instance in cloud.instances(Vec::new()).await {
                    let Some(id) = instance.instance_id().map(str::to_owned) else {
                        continue;
                    };
                    let state = instance.state().and_then(|s| s.name()).cloned();
                    let alive = matches!(
                        state,
                        Some(InstanceStateName::Pending | InstanceStateName::Running)
                    );
                    let known = this
                        .booted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains_key(&id);
                    if alive && !known {
                        let dud = this
                            .duds
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let booted = if dud {
                            never_boot()
                        } else {
                            boot(&cloud, &id).await
                        };
                        this.booted
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(id, booted);
                    } else if !alive && known {
                        let node = this
                            .booted
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_mut(&id)
                            .and_then(|b| b.node.take());
                        if let Some(node) = node {
                            node.shutdown().await;
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }

    /// When each instance's node came up, by instance id.
    fn booted_at(&self) -> HashMap<String, Instant> {
        self.booted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, b)| (id.clone(), b.at))
            .collect()
    }

    fn user_data(&self, id: &str) -> Option<(String, String)> {
        self.booted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|b| (b.user_data.clone(), b.token.clone()))
    }

    /// What the node of each member of `ring` holds, by slot.
    fn holdings(&self, ring: &Ring) -> Vec<(u32, Items)> {
        let booted = self.booted.lock().unwrap_or_else(PoisonError::into_inner);
        ring.members()
            .iter()
            .map(|member| {
                let node = booted
                    .values()
                    .find(|b| b.data == member.address)
                    .and_then(|b| b.node.as_ref())
                    .unwrap_or_else(|| panic!("no running node at {}", member.address));
                (member.slot, items(&node.shared))
            })
            .collect()
    }

    async fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let nodes: Vec<Node> = self
            .booted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
            .filter_map(|b| b.node.take())
            .collect();
        for node in nodes {
            node.shutdown().await;
        }
    }
}

/// The value following `flag` in the user data.
fn flag<'a>(user_data: &'a str, flag: &str) -> &'a str {
    user_data
        .split_whitespace()
        .skip_while(|w| *w != flag)
        .nth(1)
        .unwrap_or_else(|| panic!("{flag} missing from the user data:\n{user_data}"))
}

/// Boots instance `id` as cloud-init would: reads its user data and its token parameter from
/// moto, and starts the node they describe.
async fn boot(cloud: &Cloud, id: &str) -> Booted {
    let attribute = cloud
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DescribeInstanceAttribute: {e:?}"));
    let encoded = attribute
        .user_data()
        .and_then(|v| v.value())
        .unwrap_or_else(|| panic!("instance {id} has no user data"));
    let user_data = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_else(|e| panic!("user data is not base64: {e}")),
    )
    .unwrap_or_else(|e| panic!("user data is not UTF-8: {e}"));
    let parameter = flag(&user_data, "--name");
    let token = cloud
        .ssm
        .get_parameter()
        .name(parameter)
        .with_decryption(true)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetParameter {parameter}: {e:?}"))
        .parameter()
        .and_then(|p| p.value())
        .unwrap_or_else(|| panic!("parameter {parameter} has no value"))
        .to_owned();
    let capacity: u64 = flag(&user_data, "--capacity-mib")
        .parse()
        .unwrap_or_else(|e| panic!("--capacity-mib in the user data: {e}"));
    let policy = Policy::from_str(flag(&user_data, "--policy"))
        .unwrap_or_else(|e| panic!("--policy in the user data: {e}"));
    let mut config = NodeConfig::ephemeral(capacity, policy, Some(&token));
    config.max_item_size_kib = flag(&user_data, "--max-item-size-kib")
        .parse()
        .unwrap_or_else(|e| panic!("--max-item-size-kib in the user data: {e}"));
    config.threads = 1;
    let node = Node::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the node of {id}: {e}"));
    Booted {
        at: Instant::now(),
        data: node.addr.to_string(),
        admin: node.admin_addr.to_string(),
        node: Some(node),
        user_data,
        token,
    }
}

/// An instance whose node never starts: loopback addresses where nothing listens.
fn never_boot() -> Booted {
    let closed = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("a free port: {e}"));
        listener
            .local_addr()
            .unwrap_or_else(|e| panic!("its address: {e}"))
            .to_string()
    };
    Booted {
        at: Instant::now(),
        node: None,
        data: closed(),
        admin: closed(),
        user_data: String::new(),
        token: String::new(),
    }
}

fn manifest(replicas: u32, (image, subnet, group): &(String, String, String)) -> String {
    format!(
        "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata: {{name: cloud}}
spec:
  cache: {{capacityMiB: 8, policy: sieve, maxItemSizeKiB: 512}}
  scaling: {{mode: manual, replicas: {replicas}}}
  provider:
    ec2:
      region: {REGION}
      imageId: {image}
      instanceType: t3.micro
      subnetId: {subnet}
      securityGroupIds: [{group}]
"
    )
}

fn driver_options() -> DriverOptions {
    DriverOptions {
        probe_interval: Duration::from_millis(50),
        sample_interval: Duration::from_millis(100),
        ..DriverOptions::default()
    }
}

async fn start_operator(dir: &TempDir, ec2: Arc<Ec2Provider>) -> Operator {
    start_operator_with(dir, ec2, driver_options()).await
}

async fn start_operator_with(
    dir: &TempDir,
    ec2: Arc<Ec2Provider>,
    driver: DriverOptions,
) -> Operator {
    Operator::start(operator_config(dir, ec2, driver))
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"))
}

/// A standalone operator over `dir` serving EC2 pools through `ec2`.
fn operator_config(dir: &TempDir, ec2: Arc<Ec2Provider>, driver: DriverOptions) -> Config {
    let mut config = Config::standalone(
        dir.path(),
        NodeBackend::Embedded(Arc::new(EmbeddedProvider::new())),
        "127.0.0.1:0",
        "ec2-test-token",
    );
    config.driver = driver;
    config.standalone = StandaloneOptions {
        scan_interval: Duration::from_millis(50),
    };
    config.operator_id = OPERATOR_ID.to_owned();
    config.ec2 = Some(ec2);
    config
}

/// Polls `check` (async) until it yields `Some`.
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

fn resource(operator: &Operator, pool: &PoolRef) -> Option<CachePool> {
    operator.registry().get(pool).map(|h| h.resource())
}

fn ready_with(resource: &CachePool, n: u32) -> bool {
    resource.status.as_ref().is_some_and(|s| {
        s.phase == Some(PoolPhase::Ready)
            && s.ready_replicas == n
            && s.replicas == n
            && s.migration.is_none()
    })
}

/// Waits until the pool is Ready with `n` nodes and moto holds exactly `n` live instances for
/// it; returns them by slot.
async fn settled(
    operator: &Operator,
    cloud: &Cloud,
    pool: &PoolRef,
    n: u32,
) -> BTreeMap<u32, Instance> {
    until(&format!("{pool} Ready with {n} instances"), || async {
        let resource = resource(operator, pool)?;
        if !ready_with(&resource, n) {
            return None;
        }
        let live = cloud.live(pool).await;
        (live.len() == n as usize).then(|| {
            live.into_iter()
                .map(|i| {
                    let slot = tag(&i, tags::SLOT)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("{:?} has no slot tag", i.instance_id()));
                    (slot, i)
                })
                .collect()
        })
    })
    .await
}

/// Every tag the design asks for, IMDSv2 and the `ClientToken`.
fn check_instance(instance: &Instance, pool: &PoolRef, uid: &str, slot: u32) {
    let id = instance.instance_id().unwrap_or_default();
    assert_eq!(
        tag(instance, tags::POOL),
        Some(pool.to_string().as_str()),
        "{id}"
    );
    assert_eq!(
        tag(instance, tags::SLOT),
        Some(slot.to_string().as_str()),
        "{id}"
    );
    assert_eq!(tag(instance, tags::OPERATOR), Some(OPERATOR_ID), "{id}");
    assert_eq!(
        tag(instance, "Name"),
        Some(format!("cachepool-{}-{}-{slot}", pool.namespace, pool.name).as_str()),
        "{id}"
    );
    let attempt: u32 = tag(instance, ATTEMPT_TAG)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{id} has no attempt tag"));
    assert_eq!(
        instance.client_token(),
        Some(client_token(uid, slot, attempt).as_str()),
        "{id}: ClientToken"
    );
    assert_eq!(
        instance.metadata_options().and_then(|m| m.http_tokens()),
        Some(&HttpTokensState::Required),
        "{id}: IMDSv2 required"
    );
}

/// The calls made between two readings of `api_calls()`, by operation.
fn calls_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Times the provider's AWS calls (an SDK interceptor on its EC2 and SSM clients): the
/// intervals during which at least one call was in flight (SDK retries included, as a call is
/// what the provider asked for), and when each `RunInstances` answer named its instance.
#[derive(Debug, Default)]
struct CallClock {
    state: Mutex<ClockState>,
}

#[derive(Debug, Default)]
struct ClockState {
    in_flight: usize,
    busy_since: Option<Instant>,
    busy: Vec<(Instant, Instant)>,
    launched: HashMap<String, Instant>,
}

impl CallClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Intercept for CallClock {
    fn name(&self) -> &'static str {
        "CallClock"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let mut state = self.lock();
        if state.in_flight == 0 {
            state.busy_since = Some(Instant::now());
        }
        state.in_flight += 1;
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(Ok(output)) = context.output_or_error()
            && let Some(run) =
                output.downcast_ref::<aws_sdk_ec2::operation::run_instances::RunInstancesOutput>()
        {
            for instance in run.instances() {
                if let Some(id) = instance.instance_id() {
                    state.launched.insert(id.to_owned(), now);
                }
            }
        }
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0
            && let Some(since) = state.busy_since.take()
        {
            state.busy.push((since, now));
        }
        Ok(())
    }
}

/// The interceptor the provider gets; the test keeps the clock.
#[derive(Debug)]
struct ClockRef(Arc<CallClock>);

impl Intercept for ClockRef {
    fn name(&self) -> &'static str {
        "CallClock"
    }

    fn read_before_execution(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.read_before_execution(context, cfg)
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0
            .read_after_execution(context, runtime_components, cfg)
    }
}

/// How much of `[from, to)` the union of `intervals` covers.
fn covered(intervals: &[(Instant, Instant)], from: Instant, to: Instant) -> Duration {
    let mut clipped: Vec<(Instant, Instant)> = intervals
        .iter()
        .map(|&(a, b)| (a.max(from), b.min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    clipped.sort();
    let mut total = Duration::ZERO;
    let mut current: Option<(Instant, Instant)> = None;
    for (a, b) in clipped {
        current = match current {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((ca, cb)) = current {
        total += cb - ca;
    }
    total
}

/// Every ring the pool published, and every spec size the driver held, with when.
#[derive(Debug, Default)]
struct Timeline {
    rings: Vec<(Instant, u64, u32, bool)>,
    specs: Vec<(Instant, u32)>,
}

/// Hands every ring the driver publishes to `client` (as an application following the API's
/// ring does) and records the rings and spec sizes with when, until `stop`.
fn follow(
    operator: &Operator,
    pool: &PoolRef,
    client: Arc<PoolClient>,
    timeline: Arc<Mutex<Timeline>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let handle = operator
        .registry()
        .get(pool)
        .unwrap_or_else(|| panic!("no pool {pool}"));
    let mut rings = handle.ring();
    let mut resources = handle.watch_resource();
    tokio::spawn(async move {
        let record_ring = |ring: &Option<RingState>, timeline: &Mutex<Timeline>| {
            if let Some(ring) = ring {
                client.set_ring(ring.clone());
                timeline
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .rings
                    .push((
                        Instant::now(),
                        ring.current().epoch(),
                        ring.current().len(),
                        ring.is_migrating(),
                    ));
            }
        };
        let record_spec = |pool: &CachePool, timeline: &Mutex<Timeline>| {
            let replicas = pool.spec.scaling.replicas;
            let mut timeline = timeline.lock().unwrap_or_else(PoisonError::into_inner);
            if timeline.specs.last().map(|s| s.1) != Some(replicas) {
                timeline.specs.push((Instant::now(), replicas));
            }
        };
        record_ring(&rings.borrow_and_update(), &timeline);
        record_spec(&resources.borrow_and_update(), &timeline);
        loop {
            tokio::select! {
                changed = rings.changed() => {
                    if changed.is_err() { return; }
                    record_ring(&rings.borrow_and_update(), &timeline);
                }
                changed = resources.changed() => {
                    if changed.is_err() { return; }
                    record_spec(&resources.borrow_and_update(), &timeline);
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// One resize as measured: see [`measure_resize`].
#[derive(Debug)]
struct Resize {
    /// Manifest written → the driver holds the new spec (the front end's scan).
    scan: Duration,
    /// The driver holds the new spec → the first ring of the new size.
    decision_to_ring: Duration,
    /// Of that, time with at least one of the provider's AWS calls in flight.
    aws: Duration,
    /// Of that, time with an instance launched but its node not yet up (the harness's boot),
    /// or an AWS call in flight.
    aws_or_boot: Duration,
    /// The epoch of that ring, and the one before.
    epochs: (u64, u64),
    calls: BTreeMap<String, u64>,
}

impl Resize {
    fn print(&self, step: &str) {
        let own = self.decision_to_ring.saturating_sub(self.aws_or_boot);
        eprintln!(
            "EC2 {step}: decision→ring {:?} (epoch {}→{}); in AWS calls {:?}; decision→ring \
             minus AWS {:?}; minus AWS and the harness's instance boot (the operator's own) \
             {own:?}; front end saw the manifest after {:?}; calls {:?} (total {})",
            self.decision_to_ring,
            self.epochs.1,
            self.epochs.0,
            self.aws,
            self.decision_to_ring.saturating_sub(self.aws),
            self.scan,
            self.calls,
            self.calls.values().sum::<u64>()
        );
    }
}

/// Writes the manifest for `n` replicas, waits until the pool has settled at `n`, and measures
/// the resize from `timeline` and `clock`.
#[expect(
    clippy::too_many_arguments,
    reason = "the test's fixtures, passed as they are"
)]
async fn measure_resize(
    operator: &Operator,
    cloud: &Cloud,
    provider: &Ec2Provider,
    instances: &Instances,
    clock: &CallClock,
    timeline: &Mutex<Timeline>,
    dir: &TempDir,
    settings: &(String, String, String),
    pool: &PoolRef,
    n: u32,
) -> (Resize, BTreeMap<u32, Instance>) {
    let before = provider.api_calls();
    let written = Instant::now();
    dir.write("pool.yaml", &manifest(n, settings));
    let settled = settled(operator, cloud, pool, n).await;
    let calls = calls_between(&before, &provider.api_calls());
    let timeline = timeline.lock().unwrap_or_else(PoisonError::into_inner);
    let decided = timeline
        .specs
        .iter()
        .find(|(at, replicas)| *at >= written && *replicas == n)
        .map(|(at, _)| *at)
        .unwrap_or_else(|| panic!("the driver never held the spec for {n}: {timeline:?}"));
    let previous_epoch = timeline
        .rings
        .iter()
        .rfind(|(at, ..)| *at < decided)
        .map_or(0, |r| r.1);
    let (ring_at, epoch, ..) = *timeline
        .rings
        .iter()
        .find(|(at, _, len, _)| *at >= decided && *len == n)
        .unwrap_or_else(|| panic!("no ring of {n} after the decision: {timeline:?}"));
    let clock = clock.lock();
    let booted = instances.booted_at();
    let boots: Vec<(Instant, Instant)> = clock
        .launched
        .iter()
        .filter_map(|(id, launched)| Some((*launched, *booted.get(id)?)))
        .collect();
    let both: Vec<(Instant, Instant)> = clock.busy.iter().copied().chain(boots).collect();
    let resize = Resize {
        scan: decided - written,
        decision_to_ring: ring_at - decided,
        aws: covered(&clock.busy, decided, ring_at),
        aws_or_boot: covered(&both, decided, ring_at),
        epochs: (epoch, previous_epoch),
        calls,
    };
    (resize, settled)
}

/// Keys of the traffic a resize runs under: room for all of them on one node's 8 MiB, so
/// every miss is the resize's doing.
const LOAD_KEYS: usize = 4_000;

/// Readers and writers through the pool client while a resize runs; fewer readers than the
/// resize suite's, as moto and the harness share the machine's cores with them.
fn load_config() -> LoadConfig {
    LoadConfig {
        readers: 4,
        writers: 2,
        ..LoadConfig::default()
    }
}

/// Prefills every key of a fresh checker through `client` and starts the load.
async fn start_load(client: &Arc<PoolClient>) -> (Arc<Checker>, Load) {
    let checker = Arc::new(Checker::new(Keys::new(LOAD_KEYS, 64, 384)));
    assert_eq!(
        load::prefill(client.clone(), checker.clone(), 8).await,
        0,
        "prefill writes failed"
    );
    let load = Load::start(client.clone(), checker.clone(), load_config());
    (checker, load)
}

/// Stops the load at the next window boundary and asserts what the resize suite asserts of
/// a resize under load: no stale or corrupt read, no read error, and no acknowledged write
/// lost (no unexplained miss: a key written, acknowledged and untouched that a read missed).
async fn stop_load(step: &str, checker: &Checker, load: Load) {
    let end = load.window_now() + 1;
    let windows = load.stop_at(end).await;
    let v = checker.verdict();
    eprintln!(
        "EC2 {step} under load: {} windows, reads {} (hit ratio {:.2} %), writes acked {}, \
         deletes acked {}, stale {}, corrupt {}, in doubt {}, unexplained misses {}, write \
         errors {}, read errors {}",
        windows.len(),
        v.reads,
        load::hit_pct(&windows),
        v.writes_acked,
        v.deletes_acked,
        v.stale,
        v.corrupt,
        v.in_doubt,
        v.unexplained_misses,
        v.write_errors,
        v.read_errors
    );
    assert!(v.reads > 0, "{step}: the load read nothing");
    assert_eq!(v.stale, 0, "{step}: stale reads: {:?}", v.samples);
    assert_eq!(v.corrupt, 0, "{step}: corrupt reads: {:?}", v.samples);
    assert_eq!(v.read_errors, 0, "{step}: read errors");
    assert_eq!(
        v.unexplained_misses, 0,
        "{step}: acknowledged writes lost: {:?}",
        v.samples
    );
}

/// Every key the pool's nodes hold is on its owner in the pool's (settled) ring, and only
/// there; returns how many keys the nodes hold.
fn assert_every_key_on_its_owner(
    operator: &Operator,
    pool: &PoolRef,
    instances: &Instances,
) -> usize {
    let state = operator
        .registry()
        .get(pool)
        .and_then(|h| h.ring().borrow().clone())
        .unwrap_or_else(|| panic!("{pool} has no ring"));
    assert!(!state.is_migrating(), "a migration is still pending");
    let ring = state.current();
    let held = instances.holdings(ring);
    let wrong = misplaced(held.iter().map(|(slot, items)| (*slot, items)), |key| {
        ring.owner_slot(key)
    });
    assert!(
        wrong.is_empty(),
        "{} keys are held by nodes that do not own them, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    held.iter().map(|(_, items)| items.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ec2_pool_grows_shrinks_replaces_lost_instances_and_leaves_none_when_deleted() {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let clock = Arc::new(CallClock::default());
    let provider = Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            resolver: instances.resolver(),
            interceptors: vec![SharedInterceptor::new(ClockRef(clock.clone()))],
            ..Ec2Options::default()
        })
        .await,
    );
    assert_eq!(provider.unavailable(), None);
    let settings = cloud.ec2_settings().await;
    let dir = TempDir::new("ec2-resize");
    dir.write("pool.yaml", &manifest(1, &settings));
    let operator = start_operator(&dir, provider.clone()).await;
    let pool = PoolRef::new("default", "cloud");

    let one = settled(&operator, &cloud, &pool, 1).await;
    let uid = resource(&operator, &pool)
        .and_then(|r| r.metadata.uid)
        .unwrap_or_else(|| panic!("the pool has no uid"));
    for (slot, instance) in &one {
        check_instance(instance, &pool, &uid, *slot);
        // The node got its settings from user data and its token from SSM, and user data does
        // not carry the token.
        let (user_data, token) = instances
            .user_data(instance.instance_id().unwrap())
            .unwrap();
        assert!(user_data.contains("--capacity-mib 8") && user_data.contains("--policy sieve"));
        assert!(
            !user_data.contains(&token),
            "the admin token is in the user data"
        );
    }
    // Volumes are tagged as the instance is.
    let volumes = cloud
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::POOL))
                .values(pool.to_string())
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        !volumes.volumes().is_empty(),
        "the instance's volumes carry the pool tag"
    );

    // Grow 1 → 3 under load, measured.
    let first_ring = operator
        .registry()
        .get(&pool)
        .and_then(|h| h.ring().borrow().clone())
        .unwrap_or_else(|| panic!("{pool} has no ring"));
    let client = Arc::new(
        PoolClient::new(first_ring, ClientOptions::default())
            .unwrap_or_else(|e| panic!("the pool client: {e}")),
    );
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let (stop_following, following) = tokio::sync::watch::channel(false);
    let follower = follow(
        &operator,
        &pool,
        client.clone(),
        timeline.clone(),
        following,
    );
    let (checker, load) = start_load(&client).await;
    let (grow, three) = measure_resize(
        &operator, &cloud, &provider, &instances, &clock, &timeline, &dir, &settings, &pool, 3,
    )
    .await;
    grow.print("grow 1→3");
    stop_load("grow 1→3", &checker, load).await;
    let held = assert_every_key_on_its_owner(&operator, &pool, &instances);
    assert!(held > 0, "the nodes hold none of the load's keys");
    assert_eq!(three.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    // One new ring for the grow (both new nodes at once), two launches, each with its token
    // parameter written first.
    assert_eq!(grow.epochs.0, grow.epochs.1 + 1, "{grow:?}");
    for (api, n) in [("RunInstances", 2), ("PutParameter", 2)] {
        assert_eq!(grow.calls.get(api), Some(&n), "{api}: {grow:?}");
    }
    for api in ["TerminateInstances", "DeleteParameter"] {
        assert_eq!(grow.calls.get(api), None, "{api}: {grow:?}");
    }
    assert!(grow.aws <= grow.decision_to_ring && grow.aws_or_boot >= grow.aws);
    for (slot, instance) in &three {
        check_instance(instance, &pool, &uid, *slot);
    }

    // An instance terminated behind the operator's back is replaced in its slot.
    let lost = three[&1].instance_id().unwrap().to_owned();
    cloud
        .ec2
        .terminate_instances()
        .instance_ids(&lost)
        .send()
        .await
        .unwrap();
    let replaced = until("slot 1 replaced", || async {
        let resource = resource(&operator, &pool)?;
        if !ready_with(&resource, 3) {
            return None;
        }
        let live = cloud.live(&pool).await;
        let slot1: Vec<Instance> = live
            .into_iter()
            .filter(|i| tag(i, tags::SLOT) == Some("1"))
            .collect();
        (slot1.len() == 1 && slot1[0].instance_id() != Some(lost.as_str()))
            .then(|| slot1[0].clone())
    })
    .await;
    check_instance(&replaced, &pool, &uid, 1);
    assert_eq!(
        tag(&replaced, ATTEMPT_TAG),
        Some("1"),
        "the replacement is attempt 1"
    );
    let three = settled(&operator, &cloud, &pool, 3).await;
    // The lost instance's clean-up (terminated again, idempotently, and its token parameter
    // deleted) belongs to the replacement, not to the shrink measured next.
    until("the lost instance cleaned up", || async {
        let calls = provider.api_calls();
        (calls.contains_key("TerminateInstances") && calls.contains_key("DeleteParameter"))
            .then_some(())
    })
    .await;

    // Shrink 3 → 1 under load (fresh traffic: the lost instance took its keys with it),
    // measured: the leaving instances are terminated after their hand-off, their token
    // parameters deleted.
    let (checker, load) = start_load(&client).await;
    let (shrink, one) = measure_resize(
        &operator, &cloud, &provider, &instances, &clock, &timeline, &dir, &settings, &pool, 1,
    )
    .await;
    shrink.print("shrink 3→1");
    stop_load("shrink 3→1", &checker, load).await;
    let held = assert_every_key_on_its_owner(&operator, &pool, &instances);
    assert!(held > 0, "the nodes hold none of the load's keys");
    assert!(shrink.epochs.0 > shrink.epochs.1, "{shrink:?}");
    for (api, n) in [("TerminateInstances", 2), ("DeleteParameter", 2)] {
        assert_eq!(shrink.calls.get(api), Some(&n), "{api}: {shrink:?}");
    }
    for api in ["RunInstances", "PutParameter"] {
        assert_eq!(shrink.calls.get(api), None, "{api}: {shrink:?}");
    }
    let _ = stop_following.send(true);
    follower.await.unwrap();
    for (slot, instance) in &three {
        if one.contains_key(slot) {
            continue;
        }
        let id = instance.instance_id().unwrap();
        let gone = cloud
            .instances(vec![
                Filter::builder().name("instance-id").values(id).build(),
            ])
            .await;
        let state = gone[0].state().and_then(|s| s.name()).cloned();
        assert!(
            matches!(
                state,
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            ),
            "{id} left the pool but is {state:?}"
        );
        let parameter = tag(
            instance,
            cachepool_operator::provider::ec2::TOKEN_PARAMETER_TAG,
        )
        .unwrap();
        let read = cloud.ssm.get_parameter().name(parameter).send().await;
        assert_eq!(
            read.err()
                .and_then(|e| e.code().map(str::to_owned))
                .as_deref(),
            Some("ParameterNotFound"),
            "the token parameter of {id} is deleted"
        );
    }

    // Deleting the pool leaves no live instance tagged for it.
    dir.remove("pool.yaml");
    until("every instance of the deleted pool terminated", || async {
        cloud.live(&pool).await.is_empty().then_some(())
    })
    .await;
    operator.stop().await.unwrap();
    instances.shutdown().await;
    watcher.await.unwrap();
}

/// Fails every `RunInstances` answer while `drop` is set, after moto has started the instance:
/// what a lost answer looks like to the caller.
#[derive(Debug)]
struct DropRunInstances {
    drop: Arc<AtomicBool>,
    running: AtomicBool,
}

impl Intercept for DropRunInstances {
    fn name(&self) -> &'static str {
        "DropRunInstances"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.request().body().bytes().unwrap_or_default();
        let run = String::from_utf8_lossy(body).contains("Action=RunInstances");
        self.running.store(run, Ordering::Relaxed);
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        _context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if self.running.load(Ordering::Relaxed) && self.drop.load(Ordering::Relaxed) {
            return Err("the RunInstances answer was lost".into());
        }
        Ok(())
    }
}

fn launch_spec(
    pool: &PoolRef,
    uid: &str,
    slot: u32,
    settings: &(String, String, String),
) -> LaunchSpec {
    let spec: CachePool = serde_norway::from_str(&manifest(1, settings))
        .unwrap_or_else(|e| panic!("the test manifest: {e}"));
    LaunchSpec {
        pool: pool.clone(),
        uid: uid.to_owned(),
        slot,
        tags: LaunchSpec::standard_tags(pool, slot, OPERATOR_ID),
        provider: spec.spec.provider.clone(),
        capacity_mib: 8,
        policy: "lru".to_owned(),
        max_item_size_kib: 512,
        admin_token: AdminToken::generate(),
    }
}

fn bind(provider: &Arc<Ec2Provider>, spec: &ProviderSpec) -> Ec2Pool {
    provider
        .for_spec(spec)
        .unwrap_or_else(|e| panic!("the provider refused the spec: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launch_repeated_after_a_lost_answer_creates_one_instance() {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let drop = Arc::new(AtomicBool::new(true));
    let provider = Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            resolver: instances.resolver(),
            interceptors: vec![SharedInterceptor::new(DropRunInstances {
                drop: drop.clone(),
                running: AtomicBool::new(false),
            })],
            ..Ec2Options::default()
        })
        .await,
    );
    let settings = cloud.ec2_settings().await;
    let pool = PoolRef::new("default", "retried");
    let uid = "7b1e6f0e-1111-4222-8333-444455556666";
    let first = launch_spec(&pool, uid, 0, &settings);
    let handle = bind(&provider, &first.provider);

    let lost = handle.launch(&first).await;
    assert!(lost.is_err(), "the first answer is lost: {lost:?}");
    assert_eq!(
        cloud.live(&pool).await.len(),
        1,
        "moto started the instance"
    );

    // The driver launches again for the same slot (a fresh token, as it mints one per launch).
    drop.store(false, Ordering::Relaxed);
    let again = launch_spec(&pool, uid, 0, &settings);
    let node = handle
        .launch(&again)
        .await
        .unwrap_or_else(|e| panic!("the repeated launch failed: {e}"));
    let live = cloud.live(&pool).await;
    assert_eq!(
        live.len(),
        1,
        "a repeated launch creates one instance, not two"
    );
    assert_eq!(live[0].instance_id(), Some(node.id.as_str()));
    assert_eq!(
        live[0].client_token(),
        Some(client_token(uid, 0, 0).as_str())
    );
    // The adopted node keeps the token it booted with (read back from SSM).
    assert_eq!(node.admin_token, first.admin_token.expose());
    assert_eq!(provider.api_calls().get("RunInstances"), Some(&1));

    // Listing finds it too, and terminating twice is fine.
    let listed = handle.list(&pool).await.unwrap();
    assert_eq!(
        listed.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
        vec![node.id.as_str()]
    );
    handle.terminate(&pool, &node.id).await.unwrap();
    handle.terminate(&pool, &node.id).await.unwrap();
    handle
        .terminate(&pool, "i-00000000000000000")
        .await
        .unwrap();
    assert!(cloud.live(&pool).await.is_empty());
    instances.shutdown().await;
    watcher.await.unwrap();
}

/// `spec` launching from `template` instead of its own image (and instance type, unless
/// `keep_type`).
fn from_template(mut spec: LaunchSpec, template: Ec2LaunchTemplate, keep_type: bool) -> LaunchSpec {
    let ec2 = spec
        .provider
        .ec2
        .as_mut()
        .unwrap_or_else(|| panic!("the test spec has no ec2 provider"));
    ec2.image_id.clear();
    if !keep_type {
        ec2.instance_type.clear();
    }
    ec2.launch_template = Some(template);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_launches_from_a_launch_template_its_own_fields_win_and_a_missing_one_is_refused() {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let provider = provider(&cloud, &instances).await;
    let settings = cloud.ec2_settings().await;
    let image = settings.0.clone();
    // The template names the AMI and a type other than the test manifest's t3.micro.
    let created = cloud
        .ec2
        .create_launch_template()
        .launch_template_name("cachepool-nodes")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(&image)
                .instance_type(InstanceType::T3Small)
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateLaunchTemplate: {e:?}"));
    let template_id = created
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap_or_else(|| panic!("moto named no template id"))
        .to_owned();
    let pool = PoolRef::new("default", "templated");
    let uid = "3c9d2a41-5555-4666-8777-888899990000";

    // By name at `$Latest`, with neither imageId nor instanceType in the spec: both come from
    // the template; tags, IMDSv2, the token and the user data are still the operator's.
    let by_name = from_template(
        launch_spec(&pool, uid, 0, &settings),
        Ec2LaunchTemplate {
            name: Some("cachepool-nodes".to_owned()),
            version: Some("$Latest".to_owned()),
            ..Ec2LaunchTemplate::default()
        },
        false,
    );
    let mut pool_spec: CachePool = serde_norway::from_str(&manifest(1, &settings))
        .unwrap_or_else(|e| panic!("the test manifest: {e}"));
    pool_spec.spec.provider = by_name.provider.clone();
    assert_eq!(
        cachepool_crds::pool::validate(&pool_spec.spec),
        Ok(()),
        "a spec with a launch template and no imageId or instanceType is valid"
    );
    let handle = bind(&provider, &by_name.provider);
    let first = handle
        .launch(&by_name)
        .await
        .unwrap_or_else(|e| panic!("launching from the template by name: {e}"));
    // By id at its default version, with the spec's own instanceType: the spec's wins.
    let by_id = from_template(
        launch_spec(&pool, uid, 1, &settings),
        Ec2LaunchTemplate {
            id: Some(template_id.clone()),
            ..Ec2LaunchTemplate::default()
        },
        true,
    );
    let second = handle
        .launch(&by_id)
        .await
        .unwrap_or_else(|e| panic!("launching from the template by id: {e}"));
    let live: BTreeMap<String, Instance> = cloud
        .live(&pool)
        .await
        .into_iter()
        .map(|i| (i.instance_id().unwrap_or_default().to_owned(), i))
        .collect();
    assert_eq!(live.len(), 2, "one instance per launch");
    for (node, slot, instance_type) in [
        (&first, 0, InstanceType::T3Small),
        (&second, 1, InstanceType::T3Micro),
    ] {
        let instance = live
            .get(&node.id)
            .unwrap_or_else(|| panic!("{} is not live", node.id));
        check_instance(instance, &pool, uid, slot);
        assert_eq!(instance.image_id(), Some(image.as_str()), "{}", node.id);
        assert_eq!(
            instance.instance_type(),
            Some(&instance_type),
            "{}: slot {slot}'s instance type",
            node.id
        );
    }
    until(
        "both template-launched nodes booted from the operator's user data",
        || async {
            (instances.user_data(&first.id).is_some() && instances.user_data(&second.id).is_some())
                .then_some(())
        },
    )
    .await;

    // A template that does not exist is a configuration error naming it, and starts nothing.
    let missing = from_template(
        launch_spec(&pool, uid, 2, &settings),
        Ec2LaunchTemplate {
            name: Some("no-such-template".to_owned()),
            ..Ec2LaunchTemplate::default()
        },
        false,
    );
    let refused = handle
        .launch(&missing)
        .await
        .map(|node| node.id)
        .expect_err("a launch from a template that does not exist");
    assert!(
        matches!(refused, cachepool_operator::provider::Error::Config { .. }),
        "a missing template needs a human, not a retry: {refused:?}"
    );
    assert!(
        refused.to_string().contains("LaunchTemplate"),
        "the error names the template: {refused}"
    );
    assert_eq!(
        cloud.live(&pool).await.len(),
        2,
        "the refused launch started nothing"
    );

    for node in [&first, &second] {
        handle.terminate(&pool, &node.id).await.unwrap();
    }
    assert!(cloud.live(&pool).await.is_empty());
    instances.shutdown().await;
    watcher.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_no_pool_knows_are_collected_after_the_grace_period() {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let provider = provider(&cloud, &instances).await;
    let settings = cloud.ec2_settings().await;
    let kept = PoolRef::new("default", "kept");
    let gone = PoolRef::new("default", "gone");
    for pool in [&kept, &gone] {
        let spec = launch_spec(pool, &format!("uid-{}", pool.name), 0, &settings);
        bind(&provider, &spec.provider).launch(&spec).await.unwrap();
    }
    let pools = [kept.clone()];
    let young = provider
        .collect_garbage(REGION, OPERATOR_ID, &pools, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(
        young.is_empty(),
        "nothing is collected within the grace period: {young:?}"
    );
    let other = provider
        .collect_garbage(REGION, "another-operator", &[], Duration::ZERO)
        .await
        .unwrap();
    assert!(
        other.is_empty(),
        "another operator's instances are not ours: {other:?}"
    );
    let collected = provider
        .collect_garbage(REGION, OPERATOR_ID, &pools, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(collected.len(), 1, "{collected:?}");
    assert!(
        cloud.live(&gone).await.is_empty(),
        "the unknown pool's instance is terminated"
    );
    assert_eq!(
        cloud.live(&kept).await.len(),
        1,
        "the known pool's instance stays"
    );
    instances.shutdown().await;
    watcher.await.unwrap();
}

/// A credential chain that yields nothing.
#[derive(Debug)]
struct NoCredentials;

impl ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(&'a self) -> CredentialsFuture<'a>
    where
        Self: 'a,
    {
        CredentialsFuture::ready(Err(CredentialsError::not_loaded(
            "no credentials in this test's chain",
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_an_ec2_pool_is_degraded_and_nothing_starts() {
    let cloud = Cloud::start().await;
    let provider = Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(SharedCredentialsProvider::new(NoCredentials)),
            ..Ec2Options::default()
        })
        .await,
    );
    assert!(provider.unavailable().is_some());
    let settings = cloud.ec2_settings().await;
    let dir = TempDir::new("ec2-nocreds");
    dir.write("pool.yaml", &manifest(2, &settings));
    let operator = start_operator(&dir, provider.clone()).await;
    let pool = PoolRef::new("default", "cloud");
    let degraded = until("Degraded", || async {
        let resource = resource(&operator, &pool)?;
        let status = resource.status?;
        (status.phase == Some(PoolPhase::Degraded)).then_some(status)
    })
    .await;
    let condition = degraded
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap_or_else(|| panic!("no Degraded condition"));
    assert!(
        condition.message.contains("no AWS credentials")
            && condition.message.contains("no node was started"),
        "{}",
        condition.message
    );
    // Several rounds later, still nothing in EC2.
    let label = pool.to_string();
    let rounds = operator.metrics().reconciles(&label);
    until("five more rounds", || async {
        (operator.metrics().reconciles(&label) >= rounds + 5).then_some(())
    })
    .await;
    assert!(
        cloud.instances(Vec::new()).await.is_empty(),
        "no instance may start"
    );
    assert_eq!(provider.api_calls(), BTreeMap::new(), "no EC2 call is made");
    operator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launch_that_never_becomes_ready_is_terminated_and_retried_with_back_off() {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    // The first two instances never start their node; the third does.
    instances.duds.store(2, Ordering::SeqCst);
    let watcher = instances.watch(cloud.clone());
    let provider = provider(&cloud, &instances).await;
    let settings = cloud.ec2_settings().await;
    let dir = TempDir::new("ec2-never-ready");
    dir.write("pool.yaml", &manifest(1, &settings));
    let backoff = Duration::from_secs(1);
    let events = Arc::new(RecordedEvents::new());
    let mut config = operator_config(
        &dir,
        provider.clone(),
        DriverOptions {
            start_timeout: Duration::from_secs(1),
            launch_backoff: backoff,
            ..driver_options()
        },
    );
    config.events.push(events.clone());
    let operator = Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"));
    let pool = PoolRef::new("default", "cloud");

    // Follows moto: when each instance was first seen alive and first seen gone, and whether
    // the status said why while the slot waited.
    let started = Instant::now();
    let mut launched: BTreeMap<String, Instant> = BTreeMap::new();
    let mut gone: BTreeMap<String, Instant> = BTreeMap::new();
    let mut told = None;
    loop {
        for instance in cloud
            .instances(vec![
                Filter::builder()
                    .name(format!("tag:{}", tags::POOL))
                    .values(pool.to_string())
                    .build(),
            ])
            .await
        {
            let id = instance.instance_id().unwrap_or_default().to_owned();
            launched.entry(id.clone()).or_insert_with(Instant::now);
            let alive = matches!(
                instance.state().and_then(|s| s.name()),
                Some(InstanceStateName::Pending | InstanceStateName::Running)
            );
            if !alive {
                gone.entry(id).or_insert_with(Instant::now);
            }
        }
        let resource = resource(&operator, &pool);
        if let Some(degraded) = resource
            .as_ref()
            .and_then(|r| r.status.as_ref())
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
            .filter(|c| c.status == "True" && c.reason == "NodeNotReady")
        {
            told.get_or_insert_with(|| degraded.message.clone());
        }
        if launched.len() == 3 && resource.as_ref().is_some_and(|r| ready_with(r, 1)) {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "timed out: launched {launched:?}, gone {gone:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let mut order: Vec<(&String, &Instant)> = launched.iter().collect();
    order.sort_by_key(|(_, at)| **at);
    let ids: Vec<&String> = order.iter().map(|(id, _)| *id).collect();
    // The two duds were terminated; the third serves, the only live instance of the pool.
    for dud in &ids[..2] {
        assert!(gone.contains_key(*dud), "{dud} was terminated");
    }
    let live = cloud.live(&pool).await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].instance_id(), Some(ids[2].as_str()));
    assert_eq!(
        tag(&live[0], ATTEMPT_TAG),
        Some("2"),
        "the third attempt of slot 0"
    );
    // Each relaunch waited the back-off after the termination, doubled the second time. The
    // observation lags the termination by at most a poll and a DescribeInstances.
    let slack = Duration::from_millis(300);
    let first = launched[ids[1]].duration_since(gone[ids[0]]);
    let second = launched[ids[2]].duration_since(gone[ids[1]]);
    println!("relaunched after {first:?}, then after {second:?} (back-off {backoff:?})");
    assert!(first + slack >= backoff, "first relaunch after {first:?}");
    assert!(
        second + slack >= backoff * 2,
        "second relaunch after {second:?}"
    );
    let told = told.unwrap_or_else(|| panic!("the status never said why the slot waited"));
    assert!(told.contains("not ready within"), "{told}");
    // Each dud was told as a Warning Event, naming the instance it terminated.
    let not_ready = warnings(&events, &pool, reason::NODE_NOT_READY);
    assert_eq!(not_ready.len(), 2, "NodeNotReady events: {not_ready:?}");
    for (dud, message) in ids[..2].iter().zip(&not_ready) {
        assert!(
            message.contains(dud.as_str()) && message.contains("not ready within"),
            "{message}"
        );
    }

    operator.stop().await.unwrap();
    instances.shutdown().await;
    watcher.await.unwrap();
}

/// The messages of the Warning Events with `reason` told about `pool`, oldest first.
fn warnings(events: &RecordedEvents, pool: &PoolRef, reason: &str) -> Vec<String> {
    events
        .all()
        .into_iter()
        .filter(|(p, e)| p == pool && e.kind == EventType::Warning && e.reason == reason)
        .map(|(_, e)| e.message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launch_ec2_refuses_leaves_the_pool_degraded_with_the_reason_and_is_retried_with_back_off()
 {
    let cloud = Cloud::start().await;
    let provider = Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            ..Ec2Options::default()
        })
        .await,
    );
    // moto 5.2 starts an instance from any image id, but refuses a subnet it does not have.
    let (image, _, group) = cloud.ec2_settings().await;
    let settings = (image, "subnet-0123456789abcdef0".to_owned(), group);
    let dir = TempDir::new("ec2-refused");
    dir.write("pool.yaml", &manifest(1, &settings));
    let backoff = Duration::from_secs(1);
    let events = Arc::new(RecordedEvents::new());
    let mut config = operator_config(
        &dir,
        provider.clone(),
        DriverOptions {
            launch_backoff: backoff,
            ..driver_options()
        },
    );
    config.events.push(events.clone());
    let started = Instant::now();
    let operator = Operator::start(config)
        .await
        .unwrap_or_else(|e| panic!("starting the operator: {e}"));
    let pool = PoolRef::new("default", "cloud");

    let degraded = until("Degraded with EC2's reason", || async {
        let status = resource(&operator, &pool)?.status?;
        (status.phase == Some(PoolPhase::Degraded)).then_some(())?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
    })
    .await;
    assert_eq!(degraded.reason, reason::PROVIDER_ERROR, "{degraded:?}");
    for part in [
        "InvalidSubnetID.NotFound",
        "subnet-0123456789abcdef0",
        "launched again in",
    ] {
        assert!(
            degraded.message.contains(part),
            "{part}: {}",
            degraded.message
        );
    }
    let told = warnings(&events, &pool, reason::PROVIDER_ERROR);
    assert!(
        told.iter().any(|m| m.contains("InvalidSubnetID.NotFound")),
        "no ProviderError Event names EC2's refusal: {told:?}"
    );

    // No hot loop: over the next seconds the slot is launched again once per back-off (1 s,
    // then 2 s, 4 s: at t = 0, 1, 3 and 7 s), where a round every 10 ms would call
    // RunInstances hundreds of times.
    let window = Duration::from_secs(6);
    tokio::time::sleep_until((started + window).into()).await;
    let runs = provider
        .api_calls()
        .get("RunInstances")
        .copied()
        .unwrap_or(0);
    let elapsed = started.elapsed();
    println!("RunInstances refused {runs} times in {elapsed:?} (back-off {backoff:?}, doubling)");
    assert!(
        (2..=4).contains(&runs),
        "RunInstances called {runs} times in {elapsed:?}: retried with back-off, not in a loop"
    );
    assert!(
        cloud.instances(Vec::new()).await.is_empty(),
        "no instance may start"
    );
    operator.stop().await.unwrap();
}

/// Kills the operator whose provider made the `RunInstances` call once moto has answered it
/// (the instance exists) and before the provider sees the answer: what a crash between
/// launching an instance and recording it leaves behind. The interceptor tells the thread
/// running that operator (see [`run_until_killed`]), waits until it has dropped the operator's
/// runtime, and only then lets the call fail, so no task of that operator learns of the
/// instance.
#[derive(Debug)]
struct KillAfterRunInstances {
    running: AtomicBool,
    armed: AtomicBool,
    answered: std::sync::mpsc::SyncSender<Instant>,
    killed: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Intercept for KillAfterRunInstances {
    fn name(&self) -> &'static str {
        "KillAfterRunInstances"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.request().body().bytes().unwrap_or_default();
        let run = String::from_utf8_lossy(body).contains("Action=RunInstances");
        self.running.store(run, Ordering::Relaxed);
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        _context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if self.running.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.answered.send(Instant::now());
            // Blocks this worker of the doomed runtime until the runtime is gone.
            let _ = self
                .killed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv_timeout(TIMEOUT);
            return Err("the operator was killed".into());
        }
        Ok(())
    }
}

/// Starts an operator with `config` on a runtime of its own and kills it when its first
/// `RunInstances` is answered (see [`KillAfterRunInstances`]): the runtime is shut down without
/// any of the operator's stop paths running, as a crash would end it. The handle yields when
/// the answer came, once the operator is dead.
fn run_until_killed(
    config: Config,
    answered: std::sync::mpsc::Receiver<Instant>,
    killed: std::sync::mpsc::SyncSender<()>,
) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("the doomed operator's runtime: {e}"));
        let operator = runtime
            .block_on(Operator::start(config))
            .unwrap_or_else(|e| panic!("starting the doomed operator: {e}"));
        let at = answered
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("the operator never launched: {e}"));
        runtime.shutdown_background();
        drop(operator);
        let _ = killed.send(());
        at
    })
}

/// Starts an operator over `dir` whose provider is killed right after its first
/// `RunInstances` (see [`run_until_killed`]); returns the instance that launch left in moto,
/// unrecorded, and when moto answered.
async fn launch_and_kill(
    cloud: &Cloud,
    instances: &Instances,
    dir: &TempDir,
    pool: &PoolRef,
) -> (String, Instant) {
    let (answered_tx, answered) = std::sync::mpsc::sync_channel(1);
    let (killed, killed_rx) = std::sync::mpsc::sync_channel(1);
    let doomed = Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            resolver: instances.resolver(),
            interceptors: vec![SharedInterceptor::new(KillAfterRunInstances {
                running: AtomicBool::new(false),
                armed: AtomicBool::new(true),
                answered: answered_tx,
                killed: Mutex::new(killed_rx),
            })],
            ..Ec2Options::default()
        })
        .await,
    );
    let thread = run_until_killed(
        operator_config(dir, doomed, driver_options()),
        answered,
        killed,
    );
    let launched = tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap_or_else(|e| panic!("joining the doomed operator: {e}"))
        .unwrap_or_else(|_| panic!("the doomed operator's thread panicked"));
    // (The doomed provider's own call count is not read: the call may still be unwinding on
    // the dead runtime's last worker.)
    let live = cloud.live(pool).await;
    assert_eq!(
        live.len(),
        1,
        "the killed operator's launch left one instance"
    );
    let id = live[0].instance_id().unwrap_or_default().to_owned();
    // The operator's record of the pool names no node: the launch was never recorded.
    let record = std::fs::read_to_string(
        dir.path()
            .join(".cachepool/pools")
            .join(&pool.namespace)
            .join(format!("{}.json", pool.name)),
    )
    .unwrap_or_default();
    assert!(!record.contains(&id), "the killed operator recorded {id}");
    (id, launched)
}

/// An EC2 provider on moto with the harness's resolver and every other option at its default.
async fn provider(cloud: &Cloud, instances: &Instances) -> Arc<Ec2Provider> {
    Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            resolver: instances.resolver(),
            ..Ec2Options::default()
        })
        .await,
    )
}

/// An EC2 provider for the operator started after a crash: a short garbage-collection grace
/// and interval, and the test's region swept whether or not a pool names it.
async fn provider_after_crash(
    cloud: &Cloud,
    instances: &Instances,
    grace: Duration,
) -> Arc<Ec2Provider> {
    Arc::new(
        Ec2Provider::new(Ec2Options {
            endpoint: Some(cloud.moto.endpoint().to_owned()),
            credentials: Some(static_credentials()),
            resolver: instances.resolver(),
            gc_interval: Duration::from_millis(100),
            gc_grace: grace,
            gc_regions: vec![REGION.to_owned()],
            ..Ec2Options::default()
        })
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_launched_by_an_operator_killed_before_recording_it_is_adopted_by_the_next() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let settings = cloud.ec2_settings().await;
    let dir = TempDir::new("ec2-killed");
    dir.write("pool.yaml", &manifest(1, &settings));
    let pool = PoolRef::new("default", "cloud");
    let (orphan, launched) = launch_and_kill(&cloud, &instances, &dir, &pool).await;
    // Its node is up before the next operator starts: that operator lists a live node that no
    // ring names, and must take it as slot 0's new node (it never stored an item) rather than
    // launch another and stop it. (A node still booting is adopted by the launch itself.)
    until("the orphan's node booted", || async {
        instances.booted_at().contains_key(&orphan).then_some(())
    })
    .await;

    // The next operator, with its own garbage collection running, adopts the instance.
    let grace = Duration::from_secs(2);
    let gc_interval = Duration::from_millis(100);
    let provider = provider_after_crash(&cloud, &instances, grace).await;
    let operator = start_operator(&dir, provider.clone()).await;
    let one = settled(&operator, &cloud, &pool, 1).await;
    assert_eq!(one[&0].instance_id(), Some(orphan.as_str()), "not adopted");
    assert_eq!(
        provider.api_calls().get("RunInstances"),
        None,
        "the next operator launched instead of adopting"
    );
    // Past the grace period, with the collector running every 100 ms: moto holds exactly the
    // pool's instance, adopted, neither duplicated nor collected.
    tokio::time::sleep_until((launched + grace + gc_interval * 10).into()).await;
    let all = cloud.instances(Vec::new()).await;
    assert_eq!(
        all.iter().map(|i| i.instance_id()).collect::<Vec<_>>(),
        vec![Some(orphan.as_str())],
        "moto holds exactly the pool's instance"
    );
    assert!(
        ready_with(
            &resource(&operator, &pool).unwrap_or_else(|| panic!("no pool")),
            1
        ),
        "the pool is still Ready on the adopted instance"
    );
    operator.stop().await.unwrap();
    instances.shutdown().await;
    watcher.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_of_a_pool_deleted_while_its_operator_was_down_is_collected_after_the_grace_period()
 {
    let cloud = Arc::new(Cloud::start().await);
    let instances = Instances::new();
    let watcher = instances.watch(cloud.clone());
    let settings = cloud.ec2_settings().await;
    let dir = TempDir::new("ec2-killed-deleted");
    dir.write("pool.yaml", &manifest(1, &settings));
    let pool = PoolRef::new("default", "cloud");
    let (orphan, launched) = launch_and_kill(&cloud, &instances, &dir, &pool).await;

    // The pool is deleted while no operator runs; the next one knows no pool at all, and its
    // own periodic collector terminates the instance once the grace period is over.
    dir.remove("pool.yaml");
    let grace = Duration::from_secs(3);
    let provider = provider_after_crash(&cloud, &instances, grace).await;
    let operator = start_operator(&dir, provider.clone()).await;
    until("the instance collected", || async {
        cloud.live(&pool).await.is_empty().then_some(())
    })
    .await;
    let after = launched.elapsed();
    println!("collected {after:?} after its launch (grace {grace:?})");
    // moto's launch times have whole seconds: the instance can look up to 1 s older.
    assert!(
        after + Duration::from_secs(1) >= grace,
        "collected {after:?} after its launch, within the grace period {grace:?}"
    );
    let gone = cloud
        .instances(vec![
            Filter::builder()
                .name("instance-id")
                .values(&orphan)
                .build(),
        ])
        .await;
    assert!(
        matches!(
            gone[0].state().and_then(|s| s.name()),
            Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
        ),
        "{orphan}: {:?}",
        gone[0].state()
    );
    assert!(operator.registry().list().is_empty(), "no pool is served");
    assert_eq!(provider.api_calls().get("RunInstances"), None);
    operator.stop().await.unwrap();
    instances.shutdown().await;
    watcher.await.unwrap();
}
