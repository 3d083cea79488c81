use serde_json::json;

use super::*;

/// The smallest spec that passes: every default, local processes.
fn valid() -> CachePoolSpec {
    CachePoolSpec {
        provider: ProviderSpec {
            process: Some(ProcessProvider {}),
            ..ProviderSpec::default()
        },
        ..CachePoolSpec::default()
    }
}

fn ec2() -> Ec2Provider {
    Ec2Provider {
        region: "eu-west-1".into(),
        image_id: "ami-0123456789abcdef0".into(),
        instance_type: "r7g.large".into(),
        subnet_id: "subnet-0abc".into(),
        security_group_ids: vec!["sg-0abc".into()],
        ..Ec2Provider::default()
    }
}

/// The fields `validate` reports for a spec (empty when it passes).
fn broken_fields(spec: &CachePoolSpec) -> Vec<String> {
    match validate(spec) {
        Ok(()) => Vec::new(),
        Err(errors) => {
            assert!(!errors.is_empty(), "Err must carry at least one error");
            for error in &errors {
                assert!(!error.message.is_empty(), "{error:?} has no message");
            }
            errors.into_iter().map(|e| e.field).collect()
        }
    }
}

fn assert_valid(spec: &CachePoolSpec) {
    assert_eq!(validate(spec), Ok(()), "{spec:#?}");
}

fn assert_rejects(spec: &CachePoolSpec, field: &str) {
    let fields = broken_fields(spec);
    assert_eq!(fields, vec![field.to_owned()], "{spec:#?}");
}

fn parse(value: serde_json::Value) -> CachePoolSpec {
    serde_json::from_value(value).expect("spec parses")
}

#[test]
fn an_almost_empty_spec_takes_every_default() {
    let spec = parse(json!({ "provider": { "process": {} } }));
    assert_eq!(spec.cache.capacity_mib, 64);
    assert_eq!(spec.cache.policy, CachePolicy::Lru);
    assert_eq!(spec.cache.max_item_size_kib, 16_384);
    assert_eq!(spec.scaling.mode, ScalingMode::Manual);
    assert_eq!(spec.scaling.replicas, 1);
    assert_eq!(spec.scaling.min_replicas, 1);
    assert_eq!(spec.scaling.max_replicas, 8);
    let auto = &spec.scaling.auto;
    assert_eq!(auto.max_miss_rate, 0.4);
    assert_eq!(auto.min_miss_rate, 0.1);
    assert_eq!(auto.expand_ratio, 2.0);
    assert_eq!(auto.shrink_ratio, 0.5);
    assert_eq!(auto.window_seconds, 60);
    assert_eq!(auto.cooldown_seconds, 120);
    assert_eq!(auto.min_requests_per_window, 100);
    assert_eq!(spec.metrics.source, MetricsSource::Direct);
    assert_eq!(spec.metrics.cloudwatch.namespace, "Cachepool");
    assert!(!spec.metrics.cloudwatch.publish);
    assert_eq!(spec, valid());
    assert_valid(&spec);
}

#[test]
fn partly_given_sections_keep_defaults_for_the_rest() {
    let spec = parse(json!({
        "cache": { "capacityMiB": 256 },
        "scaling": { "mode": "auto", "auto": { "windowSeconds": 5 } },
        "provider": { "process": {} },
    }));
    assert_eq!(spec.cache.capacity_mib, 256);
    assert_eq!(spec.cache.max_item_size_kib, 16_384);
    assert_eq!(spec.scaling.mode, ScalingMode::Auto);
    assert_eq!(spec.scaling.max_replicas, 8);
    assert_eq!(spec.scaling.auto.window_seconds, 5);
    assert_eq!(spec.scaling.auto.max_miss_rate, 0.4);
    assert_valid(&spec);
}

#[test]
fn field_names_are_the_design_contract() {
    let value = serde_json::to_value(valid()).expect("serialises");
    let cache = &value["cache"];
    assert!(cache.get("capacityMiB").is_some(), "{cache}");
    assert!(cache.get("maxItemSizeKiB").is_some(), "{cache}");
    for name in ["mode", "replicas", "minReplicas", "maxReplicas", "auto"] {
        assert!(value["scaling"].get(name).is_some(), "scaling.{name}");
    }
    for name in [
        "maxMissRate",
        "minMissRate",
        "expandRatio",
        "shrinkRatio",
        "windowSeconds",
        "cooldownSeconds",
        "minRequestsPerWindow",
    ] {
        assert!(value["scaling"]["auto"].get(name).is_some(), "auto.{name}");
    }
    assert_eq!(value["provider"], json!({ "process": {} }));
    assert_eq!(
        value["metrics"],
        json!({ "source": "direct", "cloudwatch": { "namespace": "Cachepool", "publish": false } })
    );
}

#[test]
fn the_default_spec_with_a_provider_is_valid() {
    assert_valid(&valid());
    let mut spec = valid();
    spec.provider = ProviderSpec {
        pod: None,
        process: None,
        ec2: Some(ec2()),
    };
    assert_valid(&spec);
}

#[test]
fn zero_capacity_is_rejected() {
    let mut spec = valid();
    spec.cache.capacity_mib = 1;
    spec.cache.max_item_size_kib = 1024;
    assert_valid(&spec);
    spec.cache.capacity_mib = 0;
    assert_rejects(&spec, "cache.capacityMiB");
}

#[test]
fn zero_max_item_size_is_rejected() {
    let mut spec = valid();
    spec.cache.max_item_size_kib = 0;
    assert_rejects(&spec, "cache.maxItemSizeKiB");
}

#[test]
fn an_item_larger_than_the_capacity_is_rejected() {
    let mut spec = valid();
    spec.cache.capacity_mib = 16;
    spec.cache.max_item_size_kib = 16 * 1024;
    assert_valid(&spec);
    spec.cache.max_item_size_kib = 16 * 1024 + 1;
    assert_rejects(&spec, "cache.maxItemSizeKiB");
}

#[test]
fn policies_parse_by_name_and_an_unknown_one_is_rejected_with_the_valid_names() {
    for name in CachePolicy::NAMES {
        let spec = parse(json!({ "cache": { "policy": name }, "provider": { "process": {} } }));
        assert_eq!(spec.cache.policy.as_str(), name);
        assert!(!matches!(spec.cache.policy, CachePolicy::Unknown(_)));
        assert_valid(&spec);
    }
    let spec = parse(json!({ "cache": { "policy": "fifo" }, "provider": { "process": {} } }));
    assert_eq!(spec.cache.policy, CachePolicy::Unknown("fifo".into()));
    let errors = validate(&spec).expect_err("unknown policy");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "cache.policy");
    assert!(errors[0].message.contains("\"fifo\""), "{}", errors[0]);
    assert!(
        errors[0].message.contains("lru, random, sieve"),
        "{}",
        errors[0]
    );
    // An unknown name survives a round trip, so a status or an API echo shows what was given.
    assert_eq!(
        serde_json::to_value(&spec.cache.policy).expect("serialises"),
        json!("fifo")
    );
}

#[test]
fn min_replicas_above_max_replicas_is_rejected() {
    let mut spec = valid();
    spec.scaling.mode = ScalingMode::Auto;
    spec.scaling.min_replicas = 4;
    spec.scaling.max_replicas = 4;
    assert_valid(&spec);
    spec.scaling.min_replicas = 5;
    let errors = validate(&spec).expect_err("min > max");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "scaling.minReplicas");
    assert!(
        errors[0].message.contains("scaling.maxReplicas (4)"),
        "{}",
        errors[0]
    );
}

#[test]
fn zero_min_replicas_is_rejected() {
    let mut spec = valid();
    spec.scaling.mode = ScalingMode::Auto;
    spec.scaling.min_replicas = 0;
    assert_rejects(&spec, "scaling.minReplicas");
}

#[test]
fn an_absurd_max_replicas_is_rejected() {
    let mut spec = valid();
    spec.scaling.max_replicas = MAX_REPLICAS;
    assert_valid(&spec);
    spec.scaling.max_replicas = MAX_REPLICAS + 1;
    assert_rejects(&spec, "scaling.maxReplicas");
}

#[test]
fn manual_replicas_outside_min_max_are_rejected() {
    let mut spec = valid();
    spec.scaling.min_replicas = 2;
    spec.scaling.max_replicas = 4;
    for replicas in [2, 3, 4] {
        spec.scaling.replicas = replicas;
        assert_valid(&spec);
    }
    for replicas in [0, 1, 5] {
        spec.scaling.replicas = replicas;
        assert_rejects(&spec, "scaling.replicas");
    }
    // In auto mode `replicas` is not used.
    spec.scaling.mode = ScalingMode::Auto;
    assert_valid(&spec);
}

#[test]
fn miss_rates_outside_zero_one_are_rejected() {
    let mut spec = valid();
    spec.scaling.auto.min_miss_rate = 0.0;
    spec.scaling.auto.max_miss_rate = 1.0;
    assert_valid(&spec);
    for bad in [-0.1, 1.1, f64::NAN] {
        let mut spec = valid();
        spec.scaling.auto.max_miss_rate = bad;
        assert_rejects(&spec, "scaling.auto.maxMissRate");
        let mut spec = valid();
        spec.scaling.auto.min_miss_rate = bad;
        assert_rejects(&spec, "scaling.auto.minMissRate");
    }
}

#[test]
fn min_miss_rate_not_below_max_miss_rate_is_rejected() {
    let mut spec = valid();
    spec.scaling.auto.min_miss_rate = 0.3;
    spec.scaling.auto.max_miss_rate = 0.31;
    assert_valid(&spec);
    spec.scaling.auto.min_miss_rate = 0.31;
    assert_rejects(&spec, "scaling.auto.minMissRate");
    spec.scaling.auto.min_miss_rate = 0.5;
    assert_rejects(&spec, "scaling.auto.minMissRate");
}

#[test]
fn expand_ratio_not_above_one_is_rejected() {
    let mut spec = valid();
    spec.scaling.auto.expand_ratio = 1.01;
    assert_valid(&spec);
    for bad in [1.0, 0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
        spec.scaling.auto.expand_ratio = bad;
        assert_rejects(&spec, "scaling.auto.expandRatio");
    }
}

#[test]
fn shrink_ratio_outside_zero_one_is_rejected() {
    let mut spec = valid();
    for ok in [0.01, 0.5, 0.99] {
        spec.scaling.auto.shrink_ratio = ok;
        assert_valid(&spec);
    }
    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
        spec.scaling.auto.shrink_ratio = bad;
        assert_rejects(&spec, "scaling.auto.shrinkRatio");
    }
}

#[test]
fn zero_or_absurd_window_seconds_are_rejected() {
    let mut spec = valid();
    for ok in [1, 60, MAX_WINDOW_SECONDS] {
        spec.scaling.auto.window_seconds = ok;
        assert_valid(&spec);
    }
    for bad in [0, MAX_WINDOW_SECONDS + 1, u32::MAX] {
        spec.scaling.auto.window_seconds = bad;
        assert_rejects(&spec, "scaling.auto.windowSeconds");
    }
}

#[test]
fn an_absurd_cooldown_is_rejected() {
    let mut spec = valid();
    spec.scaling.auto.cooldown_seconds = 0;
    assert_valid(&spec);
    spec.scaling.auto.cooldown_seconds = MAX_COOLDOWN_SECONDS + 1;
    assert_rejects(&spec, "scaling.auto.cooldownSeconds");
}

#[test]
fn no_provider_is_rejected() {
    let spec = parse(json!({}));
    let errors = validate(&spec).expect_err("no provider");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "provider");
    assert!(errors[0].message.contains("no provider"), "{}", errors[0]);
}

#[test]
fn two_providers_are_rejected() {
    let mut spec = valid();
    spec.provider.ec2 = Some(ec2());
    let errors = validate(&spec).expect_err("two providers");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "provider");
    assert!(errors[0].message.contains("two providers"), "{}", errors[0]);
}

#[test]
fn ec2_without_its_required_fields_names_each_one() {
    let spec = parse(json!({ "provider": { "ec2": { "region": "eu-west-1" } } }));
    assert_eq!(
        broken_fields(&spec),
        vec![
            "provider.ec2.imageId",
            "provider.ec2.instanceType",
            "provider.ec2.subnetId",
            "provider.ec2.securityGroupIds",
        ]
    );
    let mut spec = valid();
    spec.provider = ProviderSpec {
        pod: None,
        process: None,
        ec2: Some(Ec2Provider {
            security_group_ids: vec![" ".into()],
            ..ec2()
        }),
    };
    assert_rejects(&spec, "provider.ec2.securityGroupIds");
}

#[test]
fn ec2_launch_template_stands_in_for_image_and_instance_type() {
    let without = |template: serde_json::Value| {
        parse(json!({ "provider": { "ec2": {
            "region": "eu-west-1",
            "subnetId": "subnet-1",
            "securityGroupIds": ["sg-1"],
            "launchTemplate": template,
        } } }))
    };
    let neither = without(json!(null));
    assert_eq!(
        broken_fields(&neither),
        vec!["provider.ec2.imageId", "provider.ec2.instanceType"]
    );
    let by_name = without(json!({ "name": "cachepool-node", "version": "$Latest" }));
    assert!(broken_fields(&by_name).is_empty());
    let template = by_name
        .provider
        .ec2
        .as_ref()
        .and_then(|e| e.launch_template.as_ref());
    assert_eq!(template.and_then(|t| t.version.as_deref()), Some("$Latest"));
    assert!(broken_fields(&without(json!({ "id": "lt-0123456789abcdef0" }))).is_empty());
    assert_eq!(
        broken_fields(&without(json!({ "id": "lt-1", "name": "cachepool-node" }))),
        vec!["provider.ec2.launchTemplate"]
    );
    assert_eq!(
        broken_fields(&without(json!({ "version": "3" }))),
        vec!["provider.ec2.launchTemplate"]
    );
    assert_eq!(
        broken_fields(&without(json!({ "name": "", "version": "" }))),
        vec![
            "provider.ec2.launchTemplate.name",
            "provider.ec2.launchTemplate.version"
        ]
    );
}

#[test]
fn ec2_optional_fields_parse() {
    let spec = parse(json!({ "provider": { "ec2": {
        "region": "eu-west-1",
        "imageId": "ami-1",
        "instanceType": "t4g.small",
        "subnetId": "subnet-1",
        "securityGroupIds": ["sg-1", "sg-2"],
        "iamInstanceProfile": "cachepool-node",
        "keyName": "ops",
        "userData": "#!/bin/sh\ncachepool node --port {{port}}\n",
        "usePublicIp": true,
    } } }));
    let ec2 = spec.provider.ec2.as_ref().expect("ec2");
    assert_eq!(ec2.security_group_ids, ["sg-1", "sg-2"]);
    assert_eq!(ec2.iam_instance_profile.as_deref(), Some("cachepool-node"));
    assert_eq!(ec2.use_public_ip, Some(true));
    assert_valid(&spec);
}

#[test]
fn an_empty_cloudwatch_namespace_is_rejected() {
    let mut spec = valid();
    spec.metrics.source = MetricsSource::Cloudwatch;
    spec.metrics.cloudwatch.publish = true;
    assert_valid(&spec);
    spec.metrics.cloudwatch.namespace = String::new();
    assert_rejects(&spec, "metrics.cloudwatch.namespace");
}

#[test]
fn every_broken_rule_is_reported_at_once() {
    let mut spec = parse(json!({}));
    spec.cache.capacity_mib = 0;
    spec.scaling.auto.expand_ratio = 1.0;
    spec.scaling.auto.shrink_ratio = 1.0;
    assert_eq!(
        broken_fields(&spec),
        vec![
            "cache.capacityMiB",
            "scaling.auto.expandRatio",
            "scaling.auto.shrinkRatio",
            "provider",
        ]
    );
    let text = validate(&spec)
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert!(
        text[0].starts_with("cache.capacityMiB: must be at least 1"),
        "{text:?}"
    );
}

fn full_pool() -> CachePool {
    use k8s_openapi::jiff::Timestamp;

    let at = Time(Timestamp::from_second(1_700_000_000).expect("valid timestamp"));
    let mut spec = valid();
    spec.scaling.mode = ScalingMode::Auto;
    spec.cache.policy = CachePolicy::Sieve;
    let mut pool = CachePool::new("web-cache", spec);
    pool.metadata.namespace = Some("default".into());
    pool.status = Some(CachePoolStatus {
        observed_generation: Some(3),
        phase: Some(PoolPhase::Scaling),
        replicas: 2,
        ready_replicas: 2,
        desired_replicas: 3,
        nodes: vec![NodeStatus {
            slot: 0,
            id: "pid-4242".into(),
            address: "127.0.0.1:40001".into(),
            admin_address: "127.0.0.1:40002".into(),
            state: NodeState::Ready,
            since: Some(at.clone()),
        }],
        ring: Some(RingStatus {
            epoch: 7,
            members: vec![(&crate::ring::Member::new(0, "127.0.0.1:40001")).into()],
        }),
        migration: Some(MigrationStatus {
            from_epoch: 7,
            to_epoch: 8,
            started_at: Some(at.clone()),
            keys_moved: 1000,
            bytes_moved: 64_000,
            from_members: vec![(&crate::ring::Member::new(0, "127.0.0.1:40000")).into()],
        }),
        miss_rate: Some(0.45),
        hit_rate: Some(0.55),
        requests_per_minute: Some(12_000.0),
        last_scale_time: Some(at.clone()),
        last_scale_reason: Some("miss rate 0.45 > 0.40".into()),
        autoscaler: Some(AutoscalerStatus {
            too_small: vec![TooSmallSize {
                replicas: 2,
                miss_rate: 0.45,
                requests_per_second: 200.0,
                at: at.clone(),
            }],
            grow_backoff: Some(GrowBackoff {
                from: 1,
                to: 2,
                miss_rate_before: 0.9,
                miss_rate_after: 0.88,
                needed_gain: 0.1,
                streak: 1,
                until: at.clone(),
            }),
            unjudged_grow: Some(UnjudgedGrow {
                from: 2,
                to: 3,
                miss_rate: 0.45,
                requests_per_second: 200.0,
            }),
        }),
        selector: Some(selector_for("web-cache")),
        conditions: vec![Condition {
            type_: "Progressing".into(),
            status: "True".into(),
            reason: "Growing".into(),
            message: "2 -> 3 nodes".into(),
            last_transition_time: at,
            observed_generation: Some(3),
        }],
    });
    pool
}

#[test]
fn a_full_pool_round_trips_through_json() {
    let pool = full_pool();
    let value = serde_json::to_value(&pool).expect("serialises");
    assert_eq!(value["apiVersion"], "cachepool.io/v1alpha1");
    assert_eq!(value["kind"], "CachePool");
    assert_eq!(
        value["status"]["nodes"][0]["adminAddress"],
        "127.0.0.1:40002"
    );
    assert_eq!(value["status"]["migration"]["fromEpoch"], 7);
    assert_eq!(value["status"]["missRate"], 0.45);
    assert_eq!(value["status"]["phase"], "Scaling");
    let back: CachePool = serde_json::from_value(value).expect("parses");
    assert_eq!(back.spec, pool.spec);
    assert_eq!(back.status, pool.status);
    assert_eq!(back.metadata, pool.metadata);
}

#[test]
fn an_idle_status_has_no_migration_field() {
    let status = CachePoolStatus::default();
    let value = serde_json::to_value(&status).expect("serialises");
    assert!(value.get("migration").is_none(), "{value}");
    assert_eq!(
        serde_json::from_value::<CachePoolStatus>(json!({})).expect("parses"),
        status
    );
}

#[test]
fn a_kubectl_manifest_parses_from_yaml() {
    let manifest = "\
apiVersion: cachepool.io/v1alpha1
kind: CachePool
metadata:
  name: local
spec:
  cache:
    capacityMiB: 128
    policy: sieve
  scaling:
    mode: auto
    maxReplicas: 4
  provider:
    process: {}
";
    let pool: CachePool = serde_norway::from_str(manifest).expect("parses");
    assert_eq!(pool.metadata.name.as_deref(), Some("local"));
    assert_eq!(pool.spec.cache.capacity_mib, 128);
    assert_eq!(pool.spec.cache.policy, CachePolicy::Sieve);
    assert_eq!(pool.spec.scaling.max_replicas, 4);
    assert_eq!(pool.spec.provider.process, Some(ProcessProvider {}));
    assert_valid(&pool.spec);
}

/// The CRD as a JSON value, parsed back from `crd_yaml`.
fn crd_value() -> serde_json::Value {
    let yaml = crd_yaml();
    assert!(!yaml.is_empty());
    serde_norway::from_str(&yaml).expect("crd_yaml is YAML")
}

fn spec_schema(crd: &serde_json::Value) -> &serde_json::Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

#[test]
fn the_crd_names_group_version_scope_and_short_name() {
    let crd = crd_value();
    assert_eq!(crd["metadata"]["name"], "cachepools.cachepool.io");
    assert_eq!(crd["spec"]["group"], "cachepool.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "CachePool");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["cp"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
}

#[test]
fn the_crd_has_the_printer_columns() {
    let crd = crd_value();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["jsonPath"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect::<Vec<_>>();
    let expected = [
        ("Mode", ".spec.scaling.mode"),
        ("Desired", ".status.desiredReplicas"),
        ("Ready", ".status.readyReplicas"),
        ("Miss Rate", ".status.missRate"),
        ("Phase", ".status.phase"),
        ("Nodes", ".status.replicas"),
        ("Epoch", ".status.ring.epoch"),
        ("Age", ".metadata.creationTimestamp"),
    ]
    .map(|(n, p)| (n.to_owned(), p.to_owned()));
    assert_eq!(columns, expected);
}

#[test]
fn the_crd_serves_the_scale_subresource_on_the_manual_size() {
    let crd = crd_value();
    let scale = &crd["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.scaling.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert_eq!(selector_for("web"), "cachepool.io/pool=web");
}

/// Each CEL rule in the CRD, where it sits, and a spec that breaks it: the same spec must be
/// rejected by `validate`, so the two stay one set of rules.
#[test]
fn the_crd_carries_a_cel_rule_for_each_rule_kubernetes_can_check() {
    let crd = crd_value();
    let spec = spec_schema(&crd);
    type Break = fn(&mut CachePoolSpec);
    let cases: [(&str, &str, Break); 7] = [
        (
            "/properties/cache",
            "self.maxItemSizeKiB <= self.capacityMiB * 1024",
            |s| s.cache.max_item_size_kib = s.cache.capacity_mib * 1024 + 1,
        ),
        (
            "/properties/scaling",
            "self.minReplicas <= self.maxReplicas",
            |s| s.scaling.min_replicas = s.scaling.max_replicas + 1,
        ),
        (
            "/properties/scaling",
            "self.mode != 'manual' || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)",
            |s| s.scaling.replicas = s.scaling.max_replicas + 1,
        ),
        (
            "/properties/scaling/properties/auto",
            "self.minMissRate < self.maxMissRate",
            |s| s.scaling.auto.min_miss_rate = s.scaling.auto.max_miss_rate,
        ),
        (
            "/properties/scaling/properties/auto",
            "self.expandRatio > 1.0",
            |s| s.scaling.auto.expand_ratio = 1.0,
        ),
        (
            "/properties/scaling/properties/auto",
            "self.shrinkRatio > 0.0 && self.shrinkRatio < 1.0",
            |s| s.scaling.auto.shrink_ratio = 0.0,
        ),
        (
            "/properties/provider",
            "(has(self.process) ? 1 : 0) + (has(self.pod) ? 1 : 0) + (has(self.ec2) ? 1 : 0) == 1",
            |s| s.provider.process = None,
        ),
    ];
    for (path, rule, break_it) in cases {
        let rules = spec
            .pointer(&format!("{path}/x-kubernetes-validations"))
            .and_then(serde_json::Value::as_array)
            .unwrap_or_else(|| panic!("no CEL rules at {path}"));
        let found = rules
            .iter()
            .find(|r| r["rule"] == rule)
            .unwrap_or_else(|| panic!("rule {rule:?} missing at {path}: {rules:?}"));
        assert!(
            found["message"].as_str().is_some_and(|m| !m.is_empty()),
            "rule {rule:?} has no message"
        );
        let mut broken = valid();
        break_it(&mut broken);
        assert!(
            validate(&broken).is_err(),
            "validate accepts what {rule:?} rejects"
        );
    }
    assert!(crd_yaml().contains("x-kubernetes-validations"));
}

#[test]
fn the_crd_bounds_numbers_and_requires_ec2_fields() {
    let crd = crd_value();
    let spec = spec_schema(&crd);
    let bound = |path: &str, key: &str| {
        spec.pointer(&format!("{path}/{key}"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("no {key} at {path}"))
    };
    assert_eq!(
        bound("/properties/cache/properties/capacityMiB", "minimum"),
        1.0
    );
    assert_eq!(
        bound("/properties/cache/properties/maxItemSizeKiB", "minimum"),
        1.0
    );
    assert_eq!(
        bound("/properties/scaling/properties/minReplicas", "minimum"),
        1.0
    );
    assert_eq!(
        bound("/properties/scaling/properties/maxReplicas", "maximum"),
        f64::from(MAX_REPLICAS)
    );
    let auto = "/properties/scaling/properties/auto/properties";
    for rate in ["maxMissRate", "minMissRate"] {
        assert_eq!(bound(&format!("{auto}/{rate}"), "minimum"), 0.0);
        assert_eq!(bound(&format!("{auto}/{rate}"), "maximum"), 1.0);
    }
    assert_eq!(bound(&format!("{auto}/windowSeconds"), "minimum"), 1.0);
    assert_eq!(
        bound(&format!("{auto}/windowSeconds"), "maximum"),
        f64::from(MAX_WINDOW_SECONDS)
    );
    assert_eq!(
        bound(&format!("{auto}/cooldownSeconds"), "maximum"),
        f64::from(MAX_COOLDOWN_SECONDS)
    );
    let policy = spec.pointer("/properties/cache/properties/policy/enum");
    assert_eq!(policy, Some(&json!(CachePolicy::NAMES)));

    let ec2 = spec
        .pointer("/properties/provider/properties/ec2")
        .expect("ec2 schema");
    let mut required = ec2["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(|v| v.as_str())
        .collect::<Vec<_>>();
    required.sort_unstable();
    assert_eq!(required, ["region", "securityGroupIds", "subnetId"]);
    for name in ["imageId", "instanceType"].into_iter().chain(required) {
        assert!(
            ec2["properties"][name].get("default").is_none(),
            "ec2.{name} must have no schema default"
        );
    }
}

/// The defaults the API server fills in are the ones serde fills in.
#[test]
fn schema_defaults_match_serde_defaults() {
    let crd = crd_value();
    let spec = spec_schema(&crd);
    let defaults = CachePoolSpec::default();
    assert_eq!(
        spec["properties"]["cache"]["default"],
        serde_json::to_value(&defaults.cache).expect("serialises")
    );
    assert_eq!(
        spec["properties"]["scaling"]["default"],
        serde_json::to_value(&defaults.scaling).expect("serialises")
    );
    assert_eq!(
        spec["properties"]["metrics"]["default"],
        serde_json::to_value(&defaults.metrics).expect("serialises")
    );
    assert_eq!(
        spec.pointer("/properties/scaling/properties/auto/properties/windowSeconds/default"),
        Some(&json!(60))
    );
}
