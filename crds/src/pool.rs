//! The CachePool custom resource (`cachepool.io/v1alpha1`, kind `CachePool`, short name `cp`):
//! its spec, its status, its defaults and its validation.
//!
//! The field names and defaults are the contract of the design brief. Every rule is written
//! twice on purpose: once as a plain function ([`validate`]) that the operator runs on every
//! spec it reads (from a file, the API or the cluster) and reports in a condition, and once in
//! the CRD schema (bounds and CEL `x-kubernetes-validations`) so that a cluster rejects a bad
//! spec at `kubectl apply` time. The tests check that both name the same rules.
//!
//! Defaults live in one place, the `Default` impls: serde fills missing fields from them and
//! schemars copies them into the schema's `default`s, so an applied manifest and a parsed file
//! end up with the same values.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Largest pool a spec may ask for; more is a typo, not a plan.
pub const MAX_REPLICAS: u32 = 1000;
/// Longest autoscaling window, in seconds: past an hour a window no longer follows the load.
pub const MAX_WINDOW_SECONDS: u32 = 3600;
/// Longest cooldown after a scale, in seconds (one day).
pub const MAX_COOLDOWN_SECONDS: u32 = 86_400;

/// Desired state of a pool of cache nodes.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "cachepool.io",
    version = "v1alpha1",
    kind = "CachePool",
    namespaced,
    shortname = "cp",
    status = "CachePoolStatus",
    // Raw JSON columns: the `printcolumn(name = ..)` form trips clippy's duplicated_attributes
    // on the repeated `type_`.
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.scaling.mode"}"#,
    printcolumn = r#"{"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Miss Rate", "type": "number", "jsonPath": ".status.missRate"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "integer", "jsonPath": ".status.replicas"}"#,
    printcolumn = r#"{"name": "Epoch", "type": "integer", "jsonPath": ".status.ring.epoch", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    // `kubectl scale cp/NAME --replicas=N`, and an HPA or KEDA, size a manual pool through it.
    scale(
        spec_replicas_path = ".spec.scaling.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase", default)]
pub struct CachePoolSpec {
    /// What each node stores and how it evicts.
    pub cache: CacheSpec,
    /// How many nodes the pool runs, fixed or driven by the miss rate.
    pub scaling: ScalingSpec,
    /// Where nodes run: exactly one of `process`, `pod` or `ec2`.
    pub provider: ProviderSpec,
    /// Where the operator reads the pool's hit and miss counts.
    pub metrics: MetricsSpec,
}

/// Per-node cache settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.maxItemSizeKiB <= self.capacityMiB * 1024", "message": "cache.maxItemSizeKiB must not exceed cache.capacityMiB: an item larger than a node's memory can never be stored"}
]))]
pub struct CacheSpec {
    /// Memory for items on each node, in MiB.
    #[serde(rename = "capacityMiB")]
    #[schemars(range(min = 1))]
    pub capacity_mib: u32,
    /// Replacement policy: `lru`, `random` or `sieve`.
    pub policy: CachePolicy,
    /// Largest value a node accepts, in KiB.
    #[serde(rename = "maxItemSizeKiB")]
    #[schemars(range(min = 1))]
    pub max_item_size_kib: u32,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            capacity_mib: 64,
            policy: CachePolicy::Lru,
            max_item_size_kib: 16_384,
        }
    }
}

/// A node's replacement policy.
///
/// Kept open (`Unknown`) rather than failing to parse, so that a bad name in a manifest is
/// reported by [`validate`] beside every other mistake, with the list of valid names. The
/// names match the cache node's `store::Policy`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum CachePolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// A uniformly random item.
    Random,
    /// SIEVE: a FIFO whose eviction hand spares items read since it last passed.
    Sieve,
    /// A name no node knows; rejected by [`validate`].
    Unknown(String),
}

impl CachePolicy {
    /// The names a spec may use.
    pub const NAMES: [&'static str; 3] = ["lru", "random", "sieve"];

    /// The policy's name as written in a spec.
    pub fn as_str(&self) -> &str {
        match self {
            CachePolicy::Lru => "lru",
            CachePolicy::Random => "random",
            CachePolicy::Sieve => "sieve",
            CachePolicy::Unknown(name) => name,
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for CachePolicy {
    fn from(name: String) -> Self {
        match name.as_str() {
            "lru" => CachePolicy::Lru,
            "random" => CachePolicy::Random,
            "sieve" => CachePolicy::Sieve,
            _ => CachePolicy::Unknown(name),
        }
    }
}

impl From<CachePolicy> for String {
    fn from(policy: CachePolicy) -> Self {
        match policy {
            CachePolicy::Unknown(name) => name,
            known => known.as_str().to_owned(),
        }
    }
}

impl JsonSchema for CachePolicy {
    fn schema_name() -> Cow<'static, str> {
        "CachePolicy".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "enum": CachePolicy::NAMES,
        })
    }
}

/// Manual or automatic sizing of the pool.
// The third rule is a transition rule (`oldSelf`): in auto mode the API server refuses a change
// of `replicas` — `kubectl scale`, an HPA, a patch — with the message the operator's own scale
// endpoint gives. `validate` sees one spec, not a change, so it cannot check it; the operator
// ignores `replicas` in auto mode in any case.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "scaling.minReplicas must not exceed scaling.maxReplicas"},
    {"rule": "self.mode != 'manual' || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)", "message": "scaling.replicas must lie within [scaling.minReplicas, scaling.maxReplicas] in manual mode"},
    {"rule": "self.mode != 'auto' || oldSelf.mode != 'auto' || self.replicas == oldSelf.replicas", "message": "the pool is in auto mode: the autoscaler sets its size; switch scaling.mode to manual to scale by hand"}
]))]
pub struct ScalingSpec {
    /// `manual` keeps `replicas` nodes; `auto` follows the miss rate.
    pub mode: ScalingMode,
    /// Pool size in manual mode.
    #[schemars(range(max = 1000))]
    pub replicas: u32,
    /// Fewest nodes, in either mode.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: u32,
    /// Most nodes, in either mode.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: u32,
    /// The miss-rate autoscaler's settings, used in `auto` mode.
    pub auto: AutoScalingSpec,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            mode: ScalingMode::Manual,
            replicas: 1,
            min_replicas: 1,
            max_replicas: 8,
            auto: AutoScalingSpec::default(),
        }
    }
}

/// How the pool's size is chosen.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMode {
    /// `scaling.replicas` nodes.
    #[default]
    Manual,
    /// Grow and shrink with the miss rate.
    Auto,
}

/// The miss-rate autoscaler: grow when misses exceed `maxMissRate`, shrink below
/// `minMissRate`, once per window, with a cooldown after each scale.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minMissRate < self.maxMissRate", "message": "scaling.auto.minMissRate must be below scaling.auto.maxMissRate"},
    {"rule": "self.expandRatio > 1.0", "message": "scaling.auto.expandRatio must be greater than 1"},
    {"rule": "self.shrinkRatio > 0.0 && self.shrinkRatio < 1.0", "message": "scaling.auto.shrinkRatio must lie strictly between 0 and 1"}
]))]
pub struct AutoScalingSpec {
    /// Grow when the window's miss rate is above this.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_miss_rate: f64,
    /// Shrink when the window's miss rate is below this.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_miss_rate: f64,
    /// A grow multiplies the size by this (at least +1 node).
    pub expand_ratio: f64,
    /// A shrink multiplies the size by this (at least -1 node).
    pub shrink_ratio: f64,
    /// Length of one decision window, in seconds.
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: u32,
    /// No decision for this long after a scale, in seconds.
    #[schemars(range(max = 86400))]
    pub cooldown_seconds: u32,
    /// A window with fewer requests than this decides nothing.
    pub min_requests_per_window: u64,
}

impl Default for AutoScalingSpec {
    fn default() -> Self {
        Self {
            max_miss_rate: 0.4,
            min_miss_rate: 0.1,
            expand_ratio: 2.0,
            shrink_ratio: 0.5,
            window_seconds: 60,
            cooldown_seconds: 120,
            min_requests_per_window: 100,
        }
    }
}

/// Where the pool's nodes run. Exactly one field is set; a struct of options rather than a
/// Rust enum so that "none" and "both" reach [`validate`] and get a message, instead of a
/// parse error.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.process) ? 1 : 0) + (has(self.pod) ? 1 : 0) + (has(self.ec2) ? 1 : 0) == 1", "message": "provider must set exactly one of process, pod or ec2"}
]))]
pub struct ProviderSpec {
    /// Nodes as local child processes of the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessProvider>,
    /// Nodes as Pods in the pool's namespace (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodProvider>,
    /// Nodes as EC2 instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2: Option<Ec2Provider>,
}

/// Nodes as `cachepool node` child processes on loopback ports; nothing to configure.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ProcessProvider {}

/// Nodes as Pods, one per slot, owned by the pool, running `cachepool node` from the
/// operator's image unless `image` says otherwise.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodProvider {
    /// Image of the node pods (default: the operator's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the node container (default: a memory request and limit of the
    /// capacity plus the node's overhead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Node selector of the node pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<std::collections::BTreeMap<String, String>>,
    /// Tolerations of the node pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
}

/// Nodes as EC2 instances, one per slot.
///
/// The required fields default to empty so that a missing one is reported by [`validate`]
/// by name; the schema still marks them required.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = ec2_required)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.launchTemplate) || (has(self.imageId) && size(self.imageId) > 0 && has(self.instanceType) && size(self.instanceType) > 0)", "message": "ec2 needs imageId and instanceType, or a launchTemplate that supplies them"}
]))]
pub struct Ec2Provider {
    /// AWS region, e.g. `eu-west-1`.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub region: String,
    /// AMI the nodes boot; may be left out when `launchTemplate` supplies it (when both are
    /// given, this one wins, as in `RunInstances`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub image_id: String,
    /// Instance type, e.g. `r7g.large`; may be left out when `launchTemplate` supplies it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub instance_type: String,
    /// Launch template the instances start from; the fields above override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<Ec2LaunchTemplate>,
    /// Subnet the nodes are launched in.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub subnet_id: String,
    /// Security groups of the nodes (at least one).
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub security_group_ids: Vec<String>,
    /// Instance profile giving the nodes their AWS rights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// SSH key pair name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// User-data template run at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Give the nodes a public IP (and use it as their address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_public_ip: Option<bool>,
}

/// An EC2 launch template, by id or by name (exactly one), at a version.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.id) ? 1 : 0) + (has(self.name) ? 1 : 0) == 1", "message": "launchTemplate must set exactly one of id or name"}
]))]
pub struct Ec2LaunchTemplate {
    /// Launch template id, e.g. `lt-0123456789abcdef0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub id: Option<String>,
    /// Launch template name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub name: Option<String>,
    /// Version: a number, `$Latest` or `$Default` (default: the template's default version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub version: Option<String>,
}

/// The EC2 fields that serde defaults to empty (so that [`validate`] can name a missing one) are
/// required in the schema, and carry no schema default: an empty default would break the
/// schema's own `minLength`.
fn ec2_required(schema: &mut Schema) {
    // imageId and instanceType may come from a launch template: a CEL rule requires them
    // otherwise.
    const REQUIRED: [&str; 3] = ["region", "subnetId", "securityGroupIds"];
    const NO_DEFAULT: [&str; 5] = [
        "region",
        "imageId",
        "instanceType",
        "subnetId",
        "securityGroupIds",
    ];
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for name in NO_DEFAULT {
            if let Some(property) = properties
                .get_mut(name)
                .and_then(serde_json::Value::as_object_mut)
            {
                property.remove("default");
            }
        }
    }
    schema.insert("required".to_owned(), REQUIRED.into());
}

/// Where the operator reads hit and miss counts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct MetricsSpec {
    /// `direct` scrapes the nodes; `cloudwatch` reads CloudWatch.
    pub source: MetricsSource,
    /// CloudWatch settings.
    pub cloudwatch: CloudWatchSpec,
}

/// Source of the pool's metrics.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum MetricsSource {
    /// Scrape every node's stats.
    #[default]
    Direct,
    /// Read (and optionally publish) CloudWatch metrics.
    Cloudwatch,
}

/// CloudWatch settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct CloudWatchSpec {
    /// Metric namespace.
    #[schemars(length(min = 1))]
    pub namespace: String,
    /// Publish the pool's metrics there.
    pub publish: bool,
}

impl Default for CloudWatchSpec {
    fn default() -> Self {
        Self {
            namespace: "Cachepool".to_owned(),
            publish: false,
        }
    }
}

/// Observed state of a pool, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct CachePoolStatus {
    /// The spec generation this status reflects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary of the pool's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<PoolPhase>,
    /// Nodes that exist.
    pub replicas: u32,
    /// Nodes that serve.
    pub ready_replicas: u32,
    /// Nodes the operator is driving towards.
    pub desired_replicas: u32,
    /// One entry per node, by slot: ring members, nodes starting to join or replace one, and
    /// nodes draining out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    /// The published ring.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring: Option<RingStatus>,
    /// The key hand-off in progress; absent when idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// Misses / gets over the last window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miss_rate: Option<f64>,
    /// Hits / gets over the last window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hit_rate: Option<f64>,
    /// Requests per minute over the last window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<f64>,
    /// When the pool last changed size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Why the pool last changed size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// What the autoscaler has learned about this pool (sizes that proved too small, a
    /// back-off on grows that did not help, a grow not judged yet), so that a restarted
    /// operator decides as the running one would have; absent when there is nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerStatus>,
    /// Label selector of the pool's nodes (`cachepool.io/pool=<name>`), for the scale
    /// subresource (an HPA reads it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The autoscaler's memory of a pool, kept in its status across operator restarts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct AutoscalerStatus {
    /// Sizes at which a counted window's miss rate was above `maxMissRate`: a shrink does not
    /// go back to them while the load is comparable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub too_small: Vec<TooSmallSize>,
    /// Grows are held until `until`, after grows that did not lower the miss rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grow_backoff: Option<GrowBackoff>,
    /// The last grow, until the first window after it judges whether it helped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unjudged_grow: Option<UnjudgedGrow>,
}

/// A pool size that proved too small.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TooSmallSize {
    /// The size.
    pub replicas: u32,
    /// The window's miss rate at that size.
    pub miss_rate: f64,
    /// The window's gets per second.
    pub requests_per_second: f64,
    /// When the window closed; the mark is forgotten a day later.
    pub at: Time,
}

/// A back-off on grows after grows that did not help.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrowBackoff {
    /// The last grow that did not help: from this size…
    pub from: u32,
    /// …to this one.
    pub to: u32,
    /// Miss rate before that grow.
    pub miss_rate_before: f64,
    /// Miss rate after it.
    pub miss_rate_after: f64,
    /// The fraction by which the grow had to lower the miss rate.
    pub needed_gain: f64,
    /// Grows in a row that did not help; each doubles the back-off.
    pub streak: u32,
    /// When grows are allowed again.
    pub until: Time,
}

/// A grow whose effect is not judged yet.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UnjudgedGrow {
    /// Size before the grow.
    pub from: u32,
    /// Size asked for.
    pub to: u32,
    /// Miss rate of the window that decided it.
    pub miss_rate: f64,
    /// Gets per second of that window.
    pub requests_per_second: f64,
}

/// Summary of a pool's state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolPhase {
    /// Nodes are being created for the first time.
    Pending,
    /// Every node serves and the size matches the spec.
    Ready,
    /// Growing, shrinking or handing off keys.
    Scaling,
    /// Some node is failed or being replaced.
    Degraded,
    /// The spec breaks a rule; nothing is changed until it is fixed.
    Invalid,
}

/// One node of the pool, by slot.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Stable ring position.
    pub slot: u32,
    /// Provider's id (process id, instance id).
    pub id: String,
    /// memcached data address, `host:port`.
    pub address: String,
    /// Admin HTTP address, `host:port`.
    pub admin_address: String,
    /// Lifecycle state.
    pub state: NodeState,
    /// When the node entered `state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// Lifecycle of a node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Launched, not yet answering.
    Starting,
    /// Serving.
    Ready,
    /// Leaving the ring; its keys are being handed off.
    Draining,
    /// Stopped answering; to be replaced in its slot.
    Failed,
    /// Being stopped.
    Terminating,
}

/// The published ring.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RingStatus {
    /// Grows by one with every published ring.
    pub epoch: u64,
    /// Members by slot.
    pub members: Vec<RingMemberStatus>,
}

/// One ring member, as [`crate::ring::Member`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RingMemberStatus {
    /// Ring position.
    pub slot: u32,
    /// memcached data address, `host:port`.
    pub address: String,
}

impl From<&crate::ring::Member> for RingMemberStatus {
    fn from(member: &crate::ring::Member) -> Self {
        Self {
            slot: member.slot,
            address: member.address.clone(),
        }
    }
}

/// A key hand-off between two rings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Epoch keys move from.
    pub from_epoch: u64,
    /// Epoch keys move to.
    pub to_epoch: u64,
    /// Members of the ring keys move from (the ring clients fall back to), so that a restarted
    /// operator, or any reader of the status, can rebuild the two-ring state.
    #[serde(default)]
    pub from_members: Vec<RingMemberStatus>,
    /// When the hand-off began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Keys moved so far.
    #[serde(default)]
    pub keys_moved: u64,
    /// Bytes moved so far.
    #[serde(default)]
    pub bytes_moved: u64,
}

/// One broken rule of a spec: the field to fix and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Path of the field in the spec, e.g. `scaling.minReplicas`.
    pub field: String,
    /// What to change.
    pub message: String,
}

impl SpecError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Check every rule of a spec; all broken rules are returned, not just the first.
///
/// The same rules that Kubernetes can check are in the CRD schema; this function is the one the
/// operator always runs, whatever the spec's source.
pub fn validate(spec: &CachePoolSpec) -> Result<(), Vec<SpecError>> {
    let mut errors = Vec::new();
    validate_cache(&spec.cache, &mut errors);
    validate_scaling(&spec.scaling, &mut errors);
    validate_provider(&spec.provider, &mut errors);
    if spec.metrics.cloudwatch.namespace.trim().is_empty() {
        errors.push(SpecError::new(
            "metrics.cloudwatch.namespace",
            "must not be empty",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn validate_cache(cache: &CacheSpec, errors: &mut Vec<SpecError>) {
    if cache.capacity_mib == 0 {
        errors.push(SpecError::new(
            "cache.capacityMiB",
            "must be at least 1 (MiB of memory per node)",
        ));
    }
    if cache.max_item_size_kib == 0 {
        errors.push(SpecError::new(
            "cache.maxItemSizeKiB",
            "must be at least 1 (KiB)",
        ));
    } else if cache.capacity_mib > 0
        && u64::from(cache.max_item_size_kib) > u64::from(cache.capacity_mib) * 1024
    {
        errors.push(SpecError::new(
            "cache.maxItemSizeKiB",
            format!(
                "{} KiB exceeds cache.capacityMiB ({} MiB): an item larger than a node's memory can never be stored",
                cache.max_item_size_kib, cache.capacity_mib
            ),
        ));
    }
    if let CachePolicy::Unknown(name) = &cache.policy {
        errors.push(SpecError::new(
            "cache.policy",
            format!(
                "unknown policy {name:?}: expected one of {}",
                CachePolicy::NAMES.join(", ")
            ),
        ));
    }
}

fn validate_scaling(scaling: &ScalingSpec, errors: &mut Vec<SpecError>) {
    if scaling.min_replicas == 0 {
        errors.push(SpecError::new(
            "scaling.minReplicas",
            "must be at least 1: a pool without nodes has no ring",
        ));
    }
    if scaling.max_replicas > MAX_REPLICAS {
        errors.push(SpecError::new(
            "scaling.maxReplicas",
            format!(
                "{} is more than the {MAX_REPLICAS} nodes a pool may have",
                scaling.max_replicas
            ),
        ));
    }
    if scaling.min_replicas > scaling.max_replicas {
        errors.push(SpecError::new(
            "scaling.minReplicas",
            format!(
                "{} exceeds scaling.maxReplicas ({})",
                scaling.min_replicas, scaling.max_replicas
            ),
        ));
    } else if scaling.mode == ScalingMode::Manual
        && !(scaling.min_replicas..=scaling.max_replicas).contains(&scaling.replicas)
    {
        errors.push(SpecError::new(
            "scaling.replicas",
            format!(
                "{} is outside [scaling.minReplicas, scaling.maxReplicas] = [{}, {}] in manual mode",
                scaling.replicas, scaling.min_replicas, scaling.max_replicas
            ),
        ));
    }

    let auto = &scaling.auto;
    let mut rates_in_range = true;
    for (field, rate) in [
        ("scaling.auto.maxMissRate", auto.max_miss_rate),
        ("scaling.auto.minMissRate", auto.min_miss_rate),
    ] {
        // `contains` is false for NaN too.
        if !(0.0..=1.0).contains(&rate) {
            rates_in_range = false;
            errors.push(SpecError::new(
                field,
                format!("{rate} is not a rate: must lie within [0, 1]"),
            ));
        }
    }
    if rates_in_range && auto.min_miss_rate >= auto.max_miss_rate {
        errors.push(SpecError::new(
            "scaling.auto.minMissRate",
            format!(
                "{} must be below scaling.auto.maxMissRate ({}), or the pool would grow and shrink at the same miss rate",
                auto.min_miss_rate, auto.max_miss_rate
            ),
        ));
    }
    // Written so that NaN fails too.
    if !(auto.expand_ratio > 1.0 && auto.expand_ratio.is_finite()) {
        errors.push(SpecError::new(
            "scaling.auto.expandRatio",
            format!(
                "{} must be greater than 1 (a grow multiplies the size by it)",
                auto.expand_ratio
            ),
        ));
    }
    if !(auto.shrink_ratio > 0.0 && auto.shrink_ratio < 1.0) {
        errors.push(SpecError::new(
            "scaling.auto.shrinkRatio",
            format!(
                "{} must lie strictly between 0 and 1 (a shrink multiplies the size by it)",
                auto.shrink_ratio
            ),
        ));
    }
    if auto.window_seconds == 0 || auto.window_seconds > MAX_WINDOW_SECONDS {
        errors.push(SpecError::new(
            "scaling.auto.windowSeconds",
            format!(
                "{} must lie within [1, {MAX_WINDOW_SECONDS}] seconds",
                auto.window_seconds
            ),
        ));
    }
    if auto.cooldown_seconds > MAX_COOLDOWN_SECONDS {
        errors.push(SpecError::new(
            "scaling.auto.cooldownSeconds",
            format!(
                "{} must be at most {MAX_COOLDOWN_SECONDS} seconds (one day)",
                auto.cooldown_seconds
            ),
        ));
    }
}

fn validate_provider(provider: &ProviderSpec, errors: &mut Vec<SpecError>) {
    let named = [
        provider.process.is_some(),
        provider.pod.is_some(),
        provider.ec2.is_some(),
    ]
    .into_iter()
    .filter(|set| *set)
    .count();
    match named {
        0 => errors.push(SpecError::new(
            "provider",
            "no provider: set exactly one of `process: {}`, `pod: {...}` or `ec2: {...}`",
        )),
        1 => {}
        _ => errors.push(SpecError::new(
            "provider",
            "two providers or more: set exactly one of `process`, `pod` or `ec2`",
        )),
    }
    if let Some(ec2) = &provider.ec2 {
        // The template, when given, supplies the image and the instance type.
        let templated = ec2.launch_template.is_some();
        for (field, value, from_template) in [
            ("provider.ec2.region", &ec2.region, false),
            ("provider.ec2.imageId", &ec2.image_id, templated),
            ("provider.ec2.instanceType", &ec2.instance_type, templated),
            ("provider.ec2.subnetId", &ec2.subnet_id, false),
        ] {
            if value.trim().is_empty() && !from_template {
                errors.push(SpecError::new(
                    field,
                    "is required by the ec2 provider (imageId and instanceType may come from \
                     a launchTemplate instead)",
                ));
            }
        }
        if let Some(template) = &ec2.launch_template {
            let named = [&template.id, &template.name]
                .into_iter()
                .filter(|v| v.is_some())
                .count();
            if named != 1 {
                errors.push(SpecError::new(
                    "provider.ec2.launchTemplate",
                    "set exactly one of `id` or `name`",
                ));
            }
            for (field, value) in [
                ("provider.ec2.launchTemplate.id", &template.id),
                ("provider.ec2.launchTemplate.name", &template.name),
                ("provider.ec2.launchTemplate.version", &template.version),
            ] {
                if value.as_deref().is_some_and(str::is_empty) {
                    errors.push(SpecError::new(
                        field,
                        "must not be empty; leave it out instead",
                    ));
                }
            }
        }
        if ec2.security_group_ids.iter().all(|id| id.trim().is_empty()) {
            errors.push(SpecError::new(
                "provider.ec2.securityGroupIds",
                "is required by the ec2 provider: list at least one security group",
            ));
        }
    }
    if let Some(image) = provider.pod.as_ref().and_then(|p| p.image.as_deref())
        && image.trim().is_empty()
    {
        errors.push(SpecError::new(
            "provider.pod.image",
            "must name an image, or be left out to use the operator's own",
        ));
    }
}

/// The label selector of a pool's nodes, as `status.selector` shows it.
pub fn selector_for(pool: &str) -> String {
    format!("cachepool.io/pool={pool}")
}

/// The CachePool CustomResourceDefinition as YAML, ready for `kubectl apply -f -`.
pub fn crd_yaml() -> String {
    // Serialising a CRD built from our own types only fails on a bug in the derive, which
    // every test run would show; an empty string is never a valid manifest to apply.
    serde_norway::to_string(&CachePool::crd()).unwrap_or_default()
}

#[cfg(test)]
mod tests;
