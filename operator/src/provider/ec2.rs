//! The EC2 provider: each node of a `provider: {ec2: …}` pool is an EC2 instance of its own.
//!
//! The system this product grew from launched instances with user data and then slept a minute
//! hoping the node was up, and lost track of instances whenever it crashed between launching one
//! and writing it down. Here EC2 itself is the record: every instance carries tags
//! (`cachepool.io/pool`, `/slot`, `/operator`, `/attempt`, `Name`, on the instance and its
//! volumes), [`Provider::list`] finds a pool's instances by tag (so a restarted operator adopts
//! them), and readiness is the driver's `/readyz` poll, never a sleep.
//!
//! - **Idempotent launch.** `RunInstances` carries a `ClientToken` made of the pool's uid, the
//!   slot and an attempt number, so EC2 answers a retried request with the instance it already
//!   started. Because not every EC2 implementation honours the token (moto does not), a launch
//!   first looks for a live instance tagged for the slot that the driver was never told of (a
//!   launch whose answer was lost) and adopts it instead of starting another.
//! - **No secret in user data.** User data is readable by anyone allowed
//!   `DescribeInstanceAttribute`. The node's admin token is written as an SSM `SecureString`
//!   parameter named after the launch (`<prefix>/<pool uid>/<slot>-<attempt>`); user data only
//!   names the parameter, and the node reads it at boot with its instance role. The parameter is
//!   deleted with the instance. See `docs/aws.md` for the IAM policies.
//! - **Addresses** come from an [`AddressResolver`]: in production the instance's private IP
//!   (public with `usePublicIp`) and the design's ports 11211/11212; tests map instance ids to
//!   loopback nodes that play the instances' boot.
//! - **Errors** keep the AWS error code in the message. Settings that cannot work until someone
//!   changes them (an unknown AMI, a missing permission, a quota) are [`Error::Config`]; the rest
//!   are [`Error::Api`]. Throttling and 5xx answers are retried by the SDK's standard retry
//!   (exponential back-off with jitter) before they get here.
//! - **Never a silent substitute.** An operator whose credential chain yields nothing still
//!   serves `ec2`, but every EC2 pool resolves to [`Unserved`] naming what is missing, so the
//!   pool is `Degraded` and nothing starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_ec2::config::{Region, SharedCredentialsProvider, SharedInterceptor};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, Instance,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, InstanceType,
    LaunchTemplateSpecification, ResourceType, Tag, TagSpecification,
};
use aws_sdk_ssm::types::ParameterType;
use base64::Engine as _;
use cachepool_crds::pool::ProviderSpec;
use tracing::{info, warn};

use crate::metrics::AwsCalls;

use super::{
    Error, LaunchSpec, PoolRef, Provider, ProviderKind, ProviderNode, Result, ShutdownPolicy,
    Unserved, tags,
};

/// The node's memcached port on an instance.
pub const DATA_PORT: u16 = 11211;
/// The node's admin HTTP port on an instance.
pub const ADMIN_PORT: u16 = 11212;

/// Tag: the launch attempt of the slot (part of the `ClientToken`).
pub const ATTEMPT_TAG: &str = "cachepool.io/attempt";
/// Tag: the SSM parameter holding the node's admin token (its name, not the token).
pub const TOKEN_PARAMETER_TAG: &str = "cachepool.io/token-parameter";
/// Tag: `public` when the node is addressed by its public IP (`usePublicIp`).
pub const ADDRESS_TAG: &str = "cachepool.io/address";

/// How many fresh attempts a launch makes when EC2 answers a `ClientToken` with an instance
/// that is already gone (a token reused after the old instance left `DescribeInstances`).
const FRESH_ATTEMPTS: u32 = 3;

/// What an [`AddressResolver`] sees of an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceAddresses {
    pub id: String,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    /// The pool asked for public addresses (`usePublicIp`).
    pub use_public_ip: bool,
}

/// Maps an instance to its node's `(data, admin)` addresses; `None` while it has none yet.
pub type AddressResolver =
    Arc<dyn Fn(&InstanceAddresses) -> Option<(String, String)> + Send + Sync>;

/// Production's resolver: the private IP (the public one with `usePublicIp`) and the design's
/// ports.
pub fn ip_resolver() -> AddressResolver {
    Arc::new(|instance: &InstanceAddresses| {
        let ip = if instance.use_public_ip {
            instance.public_ip.as_deref()
        } else {
            instance.private_ip.as_deref()
        }?;
        Some((format!("{ip}:{DATA_PORT}"), format!("{ip}:{ADMIN_PORT}")))
    })
}

/// How the EC2 provider reaches AWS.
#[derive(Clone)]
pub struct Ec2Options {
    /// Endpoint of EC2 and SSM (moto in tests, a VPC endpoint); `None`: AWS's own.
    pub endpoint: Option<String>,
    /// Credentials; `None`: the default chain (environment, profile, web identity, IMDS).
    pub credentials: Option<SharedCredentialsProvider>,
    /// Where an instance's node answers.
    pub resolver: AddressResolver,
    /// Extra SDK interceptors on both clients (tests count or disturb calls).
    pub interceptors: Vec<SharedInterceptor>,
    /// Prefix of the SSM parameters holding admin tokens.
    pub parameter_prefix: String,
    /// Path of the `cachepool` binary on the AMI, for the default user data.
    pub node_binary: String,
    /// How long a launch waits for a new instance to have an address (not to be ready).
    pub address_timeout: Duration,
    /// A pool's instances are described at most this often: the driver lists every round (every
    /// 10 ms while a node starts), EC2's API is rate-limited per account. A launch or terminate
    /// through this provider refreshes the pool's list at once.
    pub list_interval: Duration,
    /// Counts and times every EC2 and SSM call; give the operator the same handle
    /// (`Config::aws_calls`) so `/metrics` shows them.
    pub calls: AwsCalls,
    /// How often the operator looks for instances no pool knows ([`GC_INTERVAL`]).
    pub gc_interval: Duration,
    /// How old such an instance must be before it is terminated ([`GC_GRACE`]).
    pub gc_grace: Duration,
    /// Regions swept for such instances even when no pool names them and no call went there
    /// yet: a restarted operator whose last EC2 pool was deleted while it was down still
    /// collects that pool's instances. The credential chain's region (`AWS_REGION`, profile)
    /// is swept as well.
    pub gc_regions: Vec<String>,
}

impl Default for Ec2Options {
    fn default() -> Ec2Options {
        Ec2Options {
            endpoint: None,
            credentials: None,
            resolver: ip_resolver(),
            interceptors: Vec::new(),
            parameter_prefix: "/cachepool".to_owned(),
            node_binary: "/usr/local/bin/cachepool".to_owned(),
            address_timeout: Duration::from_secs(120),
            list_interval: Duration::from_secs(1),
            calls: AwsCalls::new(),
            gc_interval: GC_INTERVAL,
            gc_grace: GC_GRACE,
            gc_regions: Vec::new(),
        }
    }
}

impl fmt::Debug for Ec2Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Options")
            .field("endpoint", &self.endpoint)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<provider>"),
            )
            .field("interceptors", &self.interceptors.len())
            .field("parameter_prefix", &self.parameter_prefix)
            .field("node_binary", &self.node_binary)
            .field("address_timeout", &self.address_timeout)
            .field("list_interval", &self.list_interval)
            .field("gc_interval", &self.gc_interval)
            .field("gc_grace", &self.gc_grace)
            .field("gc_regions", &self.gc_regions)
            .finish_non_exhaustive()
    }
}

/// The clients of one region.
#[derive(Clone, Debug)]
struct Clients {
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
}

/// What the provider remembers of an instance it told the driver about.
#[derive(Clone, Debug)]
struct Known {
    region: String,
    token: String,
    parameter: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Instances handed to the driver (launched or listed): a launch never adopts these.
    known: HashMap<String, Known>,
    /// Instances terminated through this provider: no longer listed.
    forgotten: HashSet<String>,
    /// The last description of each pool's instances (`<region> <pool>`), and when.
    listed: HashMap<String, (tokio::time::Instant, Vec<Instance>)>,
}

/// Runs nodes as EC2 instances (see the module documentation). One per operator; each pool
/// gets an [`Ec2Pool`] handle bound to its region.
pub struct Ec2Provider {
    options: Ec2Options,
    base: SdkConfig,
    /// Why no pool can be served (no credentials), if so.
    unavailable: Option<String>,
    clients: Mutex<HashMap<String, Clients>>,
    state: Mutex<State>,
}

impl fmt::Debug for Ec2Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Provider")
            .field("options", &self.options)
            .field("unavailable", &self.unavailable)
            .finish_non_exhaustive()
    }
}

impl Ec2Provider {
    /// Loads the AWS configuration and checks that the credential chain yields credentials
    /// (no request to EC2 is made). Without credentials the provider still exists, but every
    /// pool resolves to [`Unserved`] saying so.
    pub async fn new(options: Ec2Options) -> Ec2Provider {
        let base = crate::aws::sdk_config(options.credentials.clone(), None).await;
        let unavailable = crate::aws::credentials_problem(&base).await;
        if let Some(why) = &unavailable {
            warn!(reason = %why, "the EC2 provider cannot serve pools");
        }
        Ec2Provider {
            options,
            base,
            unavailable,
            clients: Mutex::new(HashMap::new()),
            state: Mutex::new(State::default()),
        }
    }

    /// The options it was built with.
    pub fn options(&self) -> &Ec2Options {
        &self.options
    }

    /// Why this provider cannot serve any pool, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// EC2 and SSM calls made so far through this provider's [`AwsCalls`], by action
    /// (`RunInstances`, `DescribeInstances`, `PutParameter`, …), whatever their outcome.
    pub fn api_calls(&self) -> BTreeMap<String, u64> {
        let mut calls = self.options.calls.by_api("ec2");
        calls.extend(self.options.calls.by_api("ssm"));
        calls
    }

    /// Where this provider counts its calls (shared with the operator's metrics).
    pub fn calls(&self) -> &AwsCalls {
        &self.options.calls
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one call, counted in the options' [`AwsCalls`].
    async fn call<T, E, R>(
        &self,
        service: &'static str,
        api: &'static str,
        call: impl std::future::Future<Output = std::result::Result<T, SdkError<E, R>>>,
    ) -> std::result::Result<T, SdkError<E, R>>
    where
        E: ProvideErrorMetadata,
    {
        crate::aws::observe(&self.options.calls, service, api, call).await
    }

    fn clients(&self, region: &str) -> Result<Clients> {
        if region.is_empty() {
            return Err(Error::Config {
                provider: ProviderKind::Ec2,
                message: "no region: set spec.provider.ec2.region".to_owned(),
            });
        }
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(region) {
            return Ok(c.clone());
        }
        let mut ec2 =
            aws_sdk_ec2::config::Builder::from(&self.base).region(Region::new(region.to_owned()));
        let mut ssm =
            aws_sdk_ssm::config::Builder::from(&self.base).region(Region::new(region.to_owned()));
        if let Some(endpoint) = &self.options.endpoint {
            ec2 = ec2.endpoint_url(endpoint.clone());
            ssm = ssm.endpoint_url(endpoint.clone());
        }
        for interceptor in &self.options.interceptors {
            ec2.push_interceptor(interceptor.clone());
            ssm.push_interceptor(interceptor.clone());
        }
        let made = Clients {
            ec2: aws_sdk_ec2::Client::from_conf(ec2.build()),
            ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
        };
        clients.insert(region.to_owned(), made.clone());
        Ok(made)
    }

    /// The handle serving pools with this spec, or why it cannot.
    pub fn for_spec(self: &Arc<Self>, spec: &ProviderSpec) -> Result<Ec2Pool, Unserved> {
        if let Some(why) = &self.unavailable {
            return Err(Unserved {
                kind: Some(ProviderKind::Ec2),
                message: format!("the `ec2` provider cannot run nodes: {why}; no node was started"),
            });
        }
        Ok(Ec2Pool {
            provider: self.clone(),
            region: spec.ec2.as_ref().map(|e| e.region.clone()),
        })
    }

    /// Every instance matching `filters`, over all pages.
    async fn describe(&self, clients: &Clients, filters: Vec<Filter>) -> Result<Vec<Instance>> {
        let mut instances = Vec::new();
        let mut next = None;
        loop {
            let page = self
                .call(
                    "ec2",
                    "DescribeInstances",
                    clients
                        .ec2
                        .describe_instances()
                        .set_filters(Some(filters.clone()))
                        .set_next_token(next)
                        .send(),
                )
                .await
                .map_err(|e| api_error("DescribeInstances", &e))?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().cloned());
            }
            next = page.next_token().map(str::to_owned);
            if next.as_deref().is_none_or(str::is_empty) {
                return Ok(instances);
            }
        }
    }

    /// The node of a listed or launched instance, `None` while it has no address.
    fn node_of(&self, instance: &Instance, token: &str) -> Option<ProviderNode> {
        let id = instance.instance_id()?.to_owned();
        let slot = tag(instance, tags::SLOT)?.parse().ok()?;
        let view = InstanceAddresses {
            id: id.clone(),
            private_ip: instance.private_ip_address().map(str::to_owned),
            public_ip: instance.public_ip_address().map(str::to_owned),
            use_public_ip: tag(instance, ADDRESS_TAG) == Some("public"),
        };
        let alive = is_alive(instance);
        let (address, admin_address) = match (self.options.resolver)(&view) {
            Some(addresses) => addresses,
            // A dead instance without an address is still reported (as dead), under a name
            // no client can reach.
            None if !alive => (
                format!("{id}.invalid:{DATA_PORT}"),
                format!("{id}.invalid:{ADMIN_PORT}"),
            ),
            None => return None,
        };
        Some(ProviderNode {
            slot,
            id,
            address,
            admin_address,
            admin_token: token.to_owned(),
            launched_at: instance
                .launch_time()
                .and_then(|t| SystemTime::try_from(*t).ok())
                .unwrap_or_else(SystemTime::now),
            alive,
        })
    }

    /// The admin token of an instance launched by an earlier operator, from its parameter.
    async fn read_token(&self, clients: &Clients, parameter: &str) -> Result<String> {
        let answer = self
            .call(
                "ssm",
                "GetParameter",
                clients
                    .ssm
                    .get_parameter()
                    .name(parameter)
                    .with_decryption(true)
                    .send(),
            )
            .await
            .map_err(|e| api_error("GetParameter", &e))?;
        Ok(answer
            .parameter()
            .and_then(|p| p.value())
            .unwrap_or_default()
            .to_owned())
    }

    /// Remembers an instance as told to the driver, with its token.
    async fn know(&self, clients: &Clients, region: &str, instance: &Instance) -> Result<String> {
        let id = instance.instance_id().unwrap_or_default().to_owned();
        if let Some(known) = self.lock().known.get(&id) {
            return Ok(known.token.clone());
        }
        let parameter = tag(instance, TOKEN_PARAMETER_TAG).map(str::to_owned);
        let token = match &parameter {
            Some(name) if is_alive(instance) => self.read_token(clients, name).await?,
            _ => String::new(),
        };
        self.lock().known.insert(
            id,
            Known {
                region: region.to_owned(),
                token: token.clone(),
                parameter,
            },
        );
        Ok(token)
    }

    async fn list_in(&self, region: &str, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        let clients = self.clients(region)?;
        let key = format!("{region} {pool}");
        let cached = self
            .lock()
            .listed
            .get(&key)
            .filter(|(at, _)| at.elapsed() < self.options.list_interval)
            .map(|(_, instances)| instances.clone());
        let instances = match cached {
            Some(instances) => instances,
            None => {
                let instances = self
                    .describe(&clients, vec![tag_filter(tags::POOL, &pool.to_string())])
                    .await?;
                self.lock()
                    .listed
                    .insert(key, (tokio::time::Instant::now(), instances.clone()));
                instances
            }
        };
        let mut nodes = Vec::new();
        for instance in &instances {
            let Some(id) = instance.instance_id() else {
                continue;
            };
            if self.lock().forgotten.contains(id) {
                continue;
            }
            let newly = !self.lock().known.contains_key(id);
            let token = self.know(&clients, region, instance).await?;
            match self.node_of(instance, &token) {
                Some(node) => nodes.push(node),
                // Not handed to the driver (no address yet): forgotten again, so that a launch
                // for its slot adopts it instead of starting a second instance.
                None if newly => {
                    self.lock().known.remove(id);
                }
                None => {}
            }
        }
        nodes.sort_by(|a, b| (a.slot, a.launched_at, &a.id).cmp(&(b.slot, b.launched_at, &b.id)));
        Ok(nodes)
    }

    async fn launch_in(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        let Some(settings) = spec.provider.ec2.as_ref() else {
            return Err(Error::Config {
                provider: ProviderKind::Ec2,
                message: "the pool's spec.provider has no ec2 settings".to_owned(),
            });
        };
        let region = settings.region.as_str();
        let clients = self.clients(region)?;
        // Whatever happens here, the pool's next list describes afresh.
        self.lock()
            .listed
            .remove(&format!("{region} {}", spec.pool));
        let slot_filters = vec![
            tag_filter(tags::POOL, &spec.pool.to_string()),
            tag_filter(tags::SLOT, &spec.slot.to_string()),
        ];
        let existing = self.describe(&clients, slot_filters).await?;
        // A live instance of this slot the driver was never told of: an earlier launch whose
        // answer was lost, or one started just before a crash. Adopt it.
        let orphan = {
            let state = self.lock();
            existing
                .iter()
                .filter(|i| is_alive(i))
                .filter(|i| {
                    i.instance_id()
                        .is_some_and(|id| !state.known.contains_key(id))
                })
                .max_by_key(|i| i.launch_time().map(|t| (t.secs(), t.subsec_nanos())))
                .cloned()
        };
        if let Some(instance) = orphan {
            info!(pool = %spec.pool, slot = spec.slot, instance = ?instance.instance_id(),
                  "adopting an instance launched for this slot before");
            let token = self.know(&clients, region, &instance).await?;
            return self.await_address(&clients, instance, &token).await;
        }
        let first = existing
            .iter()
            .filter_map(|i| tag(i, ATTEMPT_TAG)?.parse::<u32>().ok())
            .max()
            .map_or(0, |a| a + 1);
        for attempt in first..first + FRESH_ATTEMPTS {
            let instance = self.run_instance(&clients, spec, attempt).await?;
            if is_alive(&instance) {
                let parameter = tag(&instance, TOKEN_PARAMETER_TAG).map(str::to_owned);
                let id = instance.instance_id().unwrap_or_default().to_owned();
                info!(pool = %spec.pool, slot = spec.slot, instance = %id, attempt, "instance launched");
                self.lock().known.insert(
                    id,
                    Known {
                        region: region.to_owned(),
                        token: spec.admin_token.expose().to_owned(),
                        parameter,
                    },
                );
                return self
                    .await_address(&clients, instance, spec.admin_token.expose())
                    .await;
            }
            // EC2 answered the token with an instance that is gone: the token was used long
            // ago. Take the next attempt.
            warn!(pool = %spec.pool, slot = spec.slot, attempt,
                  "EC2 answered the launch with a terminated instance; launching a new attempt");
        }
        Err(Error::Api {
            provider: ProviderKind::Ec2,
            action: "RunInstances",
            message: format!(
                "every ClientToken tried for slot {} answered with a terminated instance",
                spec.slot
            ),
        })
    }

    /// Stores the token, then starts one instance for `spec` at `attempt`.
    async fn run_instance(
        &self,
        clients: &Clients,
        spec: &LaunchSpec,
        attempt: u32,
    ) -> Result<Instance> {
        let Some(settings) = spec.provider.ec2.as_ref() else {
            return Err(Error::Config {
                provider: ProviderKind::Ec2,
                message: "the pool's spec.provider has no ec2 settings".to_owned(),
            });
        };
        let parameter = token_parameter(
            &self.options.parameter_prefix,
            &spec.uid,
            spec.slot,
            attempt,
        );
        self.call(
            "ssm",
            "PutParameter",
            clients
                .ssm
                .put_parameter()
                .name(&parameter)
                .value(spec.admin_token.expose())
                .r#type(ParameterType::SecureString)
                .overwrite(true)
                .send(),
        )
        .await
        .map_err(|e| api_error("PutParameter", &e))?;
        let vars = TemplateVars {
            pool: spec.pool.to_string(),
            slot: spec.slot,
            region: settings.region.clone(),
            token_parameter: parameter.clone(),
            capacity_mib: spec.capacity_mib,
            policy: spec.policy.clone(),
            max_item_size_kib: spec.max_item_size_kib,
            node_binary: self.options.node_binary.clone(),
        };
        let user_data = match &settings.user_data {
            Some(template) => vars.render(template),
            None => vars.render(DEFAULT_USER_DATA),
        };
        let use_public_ip = settings.use_public_ip == Some(true);
        let mut instance_tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        instance_tags.push(
            Tag::builder()
                .key(ATTEMPT_TAG)
                .value(attempt.to_string())
                .build(),
        );
        instance_tags.push(
            Tag::builder()
                .key(TOKEN_PARAMETER_TAG)
                .value(&parameter)
                .build(),
        );
        instance_tags.push(
            Tag::builder()
                .key(ADDRESS_TAG)
                .value(if use_public_ip { "public" } else { "private" })
                .build(),
        );
        instance_tags.push(
            Tag::builder()
                .key("Name")
                .value(format!(
                    "cachepool-{}-{}-{}",
                    spec.pool.namespace, spec.pool.name, spec.slot
                ))
                .build(),
        );
        let tag_spec = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(instance_tags.clone()))
                .build()
        };
        let mut request = clients
            .ec2
            .run_instances()
            .min_count(1)
            .max_count(1)
            .client_token(client_token(&spec.uid, spec.slot, attempt))
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume));
        // Explicit fields override the launch template's, as RunInstances itself does; an
        // empty one (allowed only with a template) leaves the template's value.
        if !settings.image_id.trim().is_empty() {
            request = request.image_id(&settings.image_id);
        }
        if !settings.instance_type.trim().is_empty() {
            request = request.instance_type(InstanceType::from(settings.instance_type.as_str()));
        }
        if let Some(template) = &settings.launch_template {
            request = request.launch_template(
                LaunchTemplateSpecification::builder()
                    .set_launch_template_id(template.id.clone())
                    .set_launch_template_name(template.name.clone())
                    .set_version(template.version.clone())
                    .build(),
            );
        }
        if use_public_ip {
            request = request.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(true)
                    .subnet_id(&settings.subnet_id)
                    .set_groups(Some(settings.security_group_ids.clone()))
                    .build(),
            );
        } else {
            request = request
                .subnet_id(&settings.subnet_id)
                .set_security_group_ids(Some(settings.security_group_ids.clone()));
        }
        if let Some(profile) = &settings.iam_instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        if let Some(key) = &settings.key_name {
            request = request.key_name(key);
        }
        let answer = match self.call("ec2", "RunInstances", request.send()).await {
            Ok(answer) => answer,
            Err(e) => {
                // A refusal started nothing: its parameter goes. Any other failure may have
                // started the instance, which then needs its token; it is adopted or collected.
                if matches!(e, SdkError::ServiceError(_)) {
                    self.delete_parameter(clients, &parameter).await;
                }
                return Err(api_error("RunInstances", &e));
            }
        };
        answer
            .instances()
            .first()
            .cloned()
            .ok_or_else(|| Error::Api {
                provider: ProviderKind::Ec2,
                action: "RunInstances",
                message: "the answer holds no instance".to_owned(),
            })
    }

    /// Returns the node once the instance has an address, describing it again (with back-off)
    /// while it has none. This waits for an address, not for readiness.
    async fn await_address(
        &self,
        clients: &Clients,
        mut instance: Instance,
        token: &str,
    ) -> Result<ProviderNode> {
        let id = instance.instance_id().unwrap_or_default().to_owned();
        let deadline = tokio::time::Instant::now() + self.options.address_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            if let Some(node) = self.node_of(&instance, token) {
                return Ok(node);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Api {
                    provider: ProviderKind::Ec2,
                    action: "DescribeInstances",
                    message: format!(
                        "instance {id} has no address after {:?}; it is listed and will be \
                         used once it has one",
                        self.options.address_timeout
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            let described = self
                .describe(
                    clients,
                    vec![Filter::builder().name("instance-id").values(&id).build()],
                )
                .await?;
            if let Some(fresh) = described.into_iter().next() {
                instance = fresh;
            }
        }
    }

    async fn delete_parameter(&self, clients: &Clients, parameter: &str) {
        if let Err(e) = self
            .call(
                "ssm",
                "DeleteParameter",
                clients.ssm.delete_parameter().name(parameter).send(),
            )
            .await
            && e.code() != Some("ParameterNotFound")
        {
            warn!(parameter, error = %DisplayErrorContext(&e), "deleting a node's token parameter");
        }
    }

    async fn terminate_in(&self, region: &str, id: &str) -> Result<()> {
        let known = self.lock().known.get(id).cloned();
        let region = known
            .as_ref()
            .map_or_else(|| region.to_owned(), |k| k.region.clone());
        let clients = self.clients(&region)?;
        match self
            .call(
                "ec2",
                "TerminateInstances",
                clients.ec2.terminate_instances().instance_ids(id).send(),
            )
            .await
        {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Some("InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed")
                ) => {}
            Err(e) => return Err(api_error("TerminateInstances", &e)),
        }
        if let Some(parameter) = known.and_then(|k| k.parameter) {
            self.delete_parameter(&clients, &parameter).await;
        }
        let mut state = self.lock();
        state.known.remove(id);
        state.forgotten.insert(id.to_owned());
        state
            .listed
            .retain(|key, _| !key.starts_with(&format!("{region} ")));
        info!(instance = %id, "instance terminated");
        Ok(())
    }

    /// Terminates the live instances this operator (`operator_id`) started in `region` whose
    /// pool is not in `pools` and that were launched more than `grace` ago: instances of a pool
    /// deleted while no operator ran, or started just before a crash and never recorded. The
    /// grace period keeps a launch in flight (not yet listed by its pool) safe. Returns the
    /// terminated ids.
    pub async fn collect_garbage(
        &self,
        region: &str,
        operator_id: &str,
        pools: &[PoolRef],
        grace: Duration,
    ) -> Result<Vec<String>> {
        let clients = self.clients(region)?;
        let instances = self
            .describe(
                &clients,
                vec![
                    tag_filter(tags::OPERATOR, operator_id),
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("stopping")
                        .values("stopped")
                        .build(),
                ],
            )
            .await?;
        let known: HashSet<String> = pools.iter().map(ToString::to_string).collect();
        let now = SystemTime::now();
        let mut collected = Vec::new();
        for instance in instances {
            let (Some(id), Some(pool)) = (instance.instance_id(), tag(&instance, tags::POOL))
            else {
                continue;
            };
            if known.contains(pool) {
                continue;
            }
            let launched = instance
                .launch_time()
                .and_then(|t| SystemTime::try_from(*t).ok())
                .unwrap_or(now);
            if now.duration_since(launched).unwrap_or_default() < grace {
                continue;
            }
            warn!(instance = %id, pool, "terminating an instance no pool knows");
            match self
                .call(
                    "ec2",
                    "TerminateInstances",
                    clients.ec2.terminate_instances().instance_ids(id).send(),
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => continue,
                Err(e) => return Err(api_error("TerminateInstances", &e)),
            }
            if let Some(parameter) = tag(&instance, TOKEN_PARAMETER_TAG) {
                self.delete_parameter(&clients, parameter).await;
            }
            collected.push(id.to_owned());
        }
        Ok(collected)
    }
}

/// How often [`collect_periodically`] looks for instances no pool knows.
pub const GC_INTERVAL: Duration = Duration::from_secs(300);
/// How old an instance no pool knows must be before it is collected: longer than any launch
/// takes to be recorded.
pub const GC_GRACE: Duration = Duration::from_secs(600);

/// Runs [`Ec2Provider::collect_garbage`] every `interval` until `stopped` turns true, over every
/// region the provider has talked to, a pool names, [`Ec2Options::gc_regions`] lists or the
/// credential chain gives, with the registry's pools as the known ones. It waits until the front end has read every pool once, so a pool not loaded yet is
/// never taken for a deleted one.
pub async fn collect_periodically(
    provider: Arc<Ec2Provider>,
    registry: Arc<crate::registry::Registry>,
    operator_id: String,
    interval: Duration,
    grace: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if !registry.is_ready() || provider.unavailable().is_some() {
            continue;
        }
        let handles = registry.list();
        let pools: Vec<PoolRef> = handles.iter().map(|h| h.pool.clone()).collect();
        let mut regions: std::collections::BTreeSet<String> = provider
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        regions.extend(
            handles
                .iter()
                .filter_map(|h| h.resource().spec.provider.ec2.map(|e| e.region))
                .filter(|r| !r.is_empty()),
        );
        regions.extend(provider.options.gc_regions.iter().cloned());
        regions.extend(provider.base.region().map(ToString::to_string));
        for region in regions {
            match provider
                .collect_garbage(&region, &operator_id, &pools, grace)
                .await
            {
                Ok(ids) if !ids.is_empty() => {
                    info!(region, instances = ?ids, "collected instances no pool knows");
                }
                Ok(_) => {}
                Err(e) => warn!(region, error = %e, "collecting instances no pool knows"),
            }
        }
    }
}

/// The EC2 provider bound to one pool spec's region: what a pool's driver talks to.
#[derive(Clone, Debug)]
pub struct Ec2Pool {
    provider: Arc<Ec2Provider>,
    /// `None` for the operator-wide handle, which serves no pool.
    region: Option<String>,
}

impl Ec2Pool {
    /// The operator-wide handle (what [`super::Providers::ec2`] holds before a spec binds it).
    pub fn new(provider: Arc<Ec2Provider>) -> Ec2Pool {
        Ec2Pool {
            provider,
            region: None,
        }
    }

    /// The provider behind the handle.
    pub fn provider(&self) -> &Arc<Ec2Provider> {
        &self.provider
    }

    fn region(&self) -> Result<&str> {
        self.region.as_deref().ok_or_else(|| Error::Config {
            provider: ProviderKind::Ec2,
            message: "no region: set spec.provider.ec2.region".to_owned(),
        })
    }
}

impl Provider for Ec2Pool {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Ec2
    }

    fn shutdown_policy(&self) -> ShutdownPolicy {
        ShutdownPolicy::KeepNodes
    }

    async fn list(&self, pool: &PoolRef) -> Result<Vec<ProviderNode>> {
        self.provider.list_in(self.region()?, pool).await
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<ProviderNode> {
        self.provider.launch_in(spec).await
    }

    async fn terminate(&self, _pool: &PoolRef, id: &str) -> Result<()> {
        let region = self.region.clone().unwrap_or_default();
        self.provider.terminate_in(&region, id).await
    }

    /// Terminates every instance this provider knows of. The operator never calls it on
    /// shutdown (instances stay for the next leader); it is for explicit teardown.
    async fn stop_all(&self) -> Result<()> {
        let known: Vec<(String, String)> = self
            .provider
            .lock()
            .known
            .iter()
            .map(|(id, k)| (id.clone(), k.region.clone()))
            .collect();
        for (id, region) in known {
            self.provider.terminate_in(&region, &id).await?;
        }
        Ok(())
    }
}

/// The `ClientToken` of a launch: at most 64 ASCII characters, the same for every retry of
/// one attempt of one slot of one pool.
pub fn client_token(uid: &str, slot: u32, attempt: u32) -> String {
    let suffix = format!("-{slot}-{attempt}");
    let keep = 64usize.saturating_sub(suffix.len());
    let uid: String = uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(keep)
        .collect();
    format!("{uid}{suffix}")
}

/// The SSM parameter holding the admin token of one launch.
pub fn token_parameter(prefix: &str, uid: &str, slot: u32, attempt: u32) -> String {
    format!("{}/{uid}/{slot}-{attempt}", prefix.trim_end_matches('/'))
}

/// What a user-data template may use, as `{{name}}`: `pool`, `slot`, `region`,
/// `token_parameter` (the SSM parameter's name, never the token), `capacity_mib`, `policy`,
/// `max_item_size_kib`, `data_port`, `admin_port`, `node_binary`.
#[derive(Clone, Debug)]
pub struct TemplateVars {
    pub pool: String,
    pub slot: u32,
    pub region: String,
    pub token_parameter: String,
    pub capacity_mib: u32,
    pub policy: String,
    pub max_item_size_kib: u32,
    pub node_binary: String,
}

impl TemplateVars {
    /// `template` with every `{{name}}` replaced.
    pub fn render(&self, template: &str) -> String {
        [
            ("pool", self.pool.clone()),
            ("slot", self.slot.to_string()),
            ("region", self.region.clone()),
            ("token_parameter", self.token_parameter.clone()),
            ("capacity_mib", self.capacity_mib.to_string()),
            ("policy", self.policy.clone()),
            ("max_item_size_kib", self.max_item_size_kib.to_string()),
            ("data_port", DATA_PORT.to_string()),
            ("admin_port", ADMIN_PORT.to_string()),
            ("node_binary", self.node_binary.clone()),
        ]
        .iter()
        .fold(template.to_owned(), |text, (name, value)| {
            text.replace(&format!("{{{{{name}}}}}"), value)
        })
    }
}

/// The default user data: a systemd unit that fetches the admin token from SSM with the
/// instance role (the AWS CLI must be on the AMI) into a root-only file under `/run`, then runs
/// the node on the data and admin ports.
pub const DEFAULT_USER_DATA: &str = r#"#cloud-config
# cachepool node for {{pool}} slot {{slot}}
write_files:
  - path: /etc/systemd/system/cachepool-node.service
    permissions: "0644"
    content: |
      [Unit]
      Description=cachepool node ({{pool}} slot {{slot}})
      Wants=network-online.target
      After=network-online.target
      [Service]
      RuntimeDirectory=cachepool
      RuntimeDirectoryMode=0700
      ExecStartPre=+/bin/sh -c 'umask 077; printf "CACHEPOOL_ADMIN_TOKEN=%%s\n" "$$(aws ssm get-parameter --region {{region}} --name {{token_parameter}} --with-decryption --query Parameter.Value --output text)" > /run/cachepool/node.env'
      EnvironmentFile=/run/cachepool/node.env
      ExecStart={{node_binary}} node --listen 0.0.0.0:{{data_port}} --admin-listen 0.0.0.0:{{admin_port}} --capacity-mib {{capacity_mib}} --policy {{policy}} --max-item-size-kib {{max_item_size_kib}}
      DynamicUser=yes
      Restart=always
      RestartSec=2
      [Install]
      WantedBy=multi-user.target
runcmd:
  - [systemctl, daemon-reload]
  - [systemctl, enable, --now, cachepool-node.service]
"#;

fn tag<'a>(instance: &'a Instance, key: &str) -> Option<&'a str> {
    instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// Pending or running; `stopping|stopped|shutting-down|terminated` count as dead.
fn is_alive(instance: &Instance) -> bool {
    matches!(
        instance.state().and_then(|s| s.name()),
        Some(InstanceStateName::Pending | InstanceStateName::Running)
    )
}

/// AWS error codes that no retry fixes until someone changes the settings or the account.
fn is_config_code(code: &str) -> bool {
    const PREFIXES: [&str; 14] = [
        "InvalidAMIID",
        // `InvalidLaunchTemplateId.NotFound`, `.VersionNotFound`, `.Malformed`, and
        // `InvalidLaunchTemplateName.NotFoundException`.
        "InvalidLaunchTemplateId",
        "InvalidLaunchTemplateName",
        "InvalidSubnetID",
        "InvalidSubnet",
        "InvalidGroup",
        "InvalidKeyPair",
        "InvalidParameter",
        "InvalidInstanceType",
        "UnauthorizedOperation",
        "AccessDenied",
        "AuthFailure",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    ];
    PREFIXES.iter().any(|p| code.starts_with(p))
        || code == "Unsupported"
        || code == "InvalidIamInstanceProfile.NotFound"
}

/// A failed call as a provider error, with the AWS code in the message.
fn api_error<E, R>(action: &'static str, err: &SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match (err.code(), err) {
        (Some(code), _) => {
            let message = format!("{code}: {}", err.message().unwrap_or("(no message)"));
            if is_config_code(code) {
                Error::Config {
                    provider: ProviderKind::Ec2,
                    message: format!("{action} refused: {message}"),
                }
            } else {
                Error::Api {
                    provider: ProviderKind::Ec2,
                    action,
                    message,
                }
            }
        }
        (None, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => Error::Api {
            provider: ProviderKind::Ec2,
            action,
            message: format!(
                "cannot reach the AWS endpoint (check the network, the region and any endpoint \
                 override): {}",
                DisplayErrorContext(err)
            ),
        },
        (None, _) => Error::Api {
            provider: ProviderKind::Ec2,
            action,
            message: DisplayErrorContext(err).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_stable_per_attempt_and_fit_ec2s_limit() {
        let uid = "3f2a5c1e-0000-4000-8000-00000000abcd";
        assert_eq!(client_token(uid, 2, 0), client_token(uid, 2, 0));
        assert_ne!(client_token(uid, 2, 0), client_token(uid, 2, 1));
        assert_ne!(client_token(uid, 2, 0), client_token(uid, 3, 0));
        let long = "x".repeat(200);
        assert_eq!(client_token(&long, 4_000_000, 9_000_000).len(), 64);
    }

    #[test]
    fn the_default_user_data_names_the_parameter_and_the_settings_but_no_secret() {
        let vars = TemplateVars {
            pool: "default/images".to_owned(),
            slot: 3,
            region: "eu-west-1".to_owned(),
            token_parameter: "/cachepool/uid/3-0".to_owned(),
            capacity_mib: 6144,
            policy: "sieve".to_owned(),
            max_item_size_kib: 1024,
            node_binary: "/usr/local/bin/cachepool".to_owned(),
        };
        let text = vars.render(DEFAULT_USER_DATA);
        assert!(!text.contains("{{"), "every variable is replaced:\n{text}");
        for expected in [
            "--capacity-mib 6144",
            "--policy sieve",
            "--max-item-size-kib 1024",
            "--listen 0.0.0.0:11211",
            "--admin-listen 0.0.0.0:11212",
            "--name /cachepool/uid/3-0",
            "--region eu-west-1",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
    }

    #[test]
    fn refusals_that_need_a_human_are_config_errors() {
        for code in [
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "UnauthorizedOperation",
            "VcpuLimitExceeded",
            "InvalidSubnetID.NotFound",
            "InvalidLaunchTemplateId.VersionNotFound",
            "InvalidLaunchTemplateName.NotFoundException",
        ] {
            assert!(is_config_code(code), "{code}");
        }
        for code in [
            "InsufficientInstanceCapacity",
            "RequestLimitExceeded",
            "InternalError",
        ] {
            assert!(!is_config_code(code), "{code}");
        }
    }
}
