//! The CRD's CEL rules (`x-kubernetes-validations`), evaluated by a CEL interpreter the way the
//! API server evaluates them, agree with [`validate`] on valid and invalid specs: a cluster
//! refuses at `kubectl apply` what the operator would refuse, and accepts what it accepts.
//!
//! Each rule is evaluated with `self` bound to the object at the rule's place in the spec (a
//! rule on an absent optional object does not run, as in Kubernetes). JSON integers are CEL
//! `int`s and decimals `double`s, as the API server types them from the schema.

use std::collections::HashMap;

use cachepool_crds::pool::{
    CachePool, CachePoolSpec, Ec2LaunchTemplate, Ec2Provider, PodProvider, ProviderSpec,
    ScalingMode, validate,
};
use cel::{Context, Program, Value};
use kube::CustomResourceExt;
use serde_json::Value as Json;

/// Every CEL rule of the spec's schema: (path of the object inside the spec, rule).
fn rules() -> Vec<(Vec<String>, String)> {
    let crd = serde_json::to_value(CachePool::crd()).unwrap_or_else(|e| panic!("the CRD: {e}"));
    let spec = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
        .unwrap_or_else(|| panic!("the CRD has no spec schema"))
        .clone();
    let mut out = Vec::new();
    collect(&spec, &mut Vec::new(), &mut out);
    out
}

fn collect(schema: &Json, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Json::as_array)
    {
        for rule in rules {
            let text = rule["rule"]
                .as_str()
                .unwrap_or_else(|| panic!("a rule without text: {rule}"));
            out.push((path.clone(), text.to_owned()));
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Json::as_object) {
        for (name, property) in properties {
            path.push(name.clone());
            collect(property, path, out);
            path.pop();
        }
    }
}

/// A JSON value as the API server hands it to CEL.
fn cel_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(s.clone().into()),
        Json::Array(items) => Value::List(items.iter().map(cel_value).collect::<Vec<_>>().into()),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), cel_value(v)))
                .collect::<HashMap<String, Value>>()
                .into(),
        ),
    }
}

/// The object at `path` inside `spec`, if every step of it is present.
fn at<'a>(spec: &'a Json, path: &[String]) -> Option<&'a Json> {
    path.iter().try_fold(spec, |object, part| object.get(part))
}

/// A transition rule compares the new object with the old one (`oldSelf`).
fn is_transition(rule: &str) -> bool {
    rule.contains("oldSelf")
}

/// The rules `spec` breaks, as the API server would find them on a create (`old` is `None`:
/// transition rules do not run) or on an update from `old`.
fn cel_rejects_change(old: Option<&Json>, spec: &Json) -> Vec<String> {
    let mut broken = Vec::new();
    for (path, rule) in rules() {
        let Some(object) = at(spec, &path) else {
            continue;
        };
        let mut context = Context::default();
        if is_transition(&rule) {
            // The API server runs a transition rule only where the old object has the field too.
            match old.and_then(|old| at(old, &path)) {
                Some(previous) => context.add_variable_from_value("oldSelf", cel_value(previous)),
                None => continue,
            }
        }
        let program = Program::compile(&rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        context.add_variable_from_value("self", cel_value(object));
        match program.execute(&context) {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => broken.push(rule),
            other => panic!("{rule} on {object}: {other:?}"),
        }
    }
    broken
}

/// The rules a newly created `spec` breaks.
fn cel_rejects(spec: &Json) -> Vec<String> {
    cel_rejects_change(None, spec)
}

fn valid() -> CachePoolSpec {
    CachePoolSpec {
        provider: ProviderSpec {
            process: Some(Default::default()),
            ..ProviderSpec::default()
        },
        ..CachePoolSpec::default()
    }
}

/// Specs and whether they are valid; each invalid one breaks a rule the CRD states in CEL.
fn cases() -> Vec<(&'static str, CachePoolSpec)> {
    let mut cases = vec![("the default spec", valid())];
    let mut add = |name, change: fn(&mut CachePoolSpec)| {
        let mut spec = valid();
        change(&mut spec);
        cases.push((name, spec));
    };
    add("auto mode", |s| {
        s.scaling.mode = cachepool_crds::pool::ScalingMode::Auto;
        s.scaling.replicas = 100;
    });
    add("a pod provider", |s| {
        s.provider = ProviderSpec {
            pod: Some(PodProvider::default()),
            ..ProviderSpec::default()
        }
    });
    add("min > max replicas", |s| {
        s.scaling.min_replicas = 5;
        s.scaling.max_replicas = 2;
    });
    add("replicas above max in manual mode", |s| {
        s.scaling.replicas = 9
    });
    add("replicas below min in manual mode", |s| {
        s.scaling.min_replicas = 2;
        s.scaling.replicas = 1;
    });
    add("minMissRate == maxMissRate", |s| {
        s.scaling.auto.min_miss_rate = 0.4;
    });
    add("expandRatio == 1", |s| s.scaling.auto.expand_ratio = 1.0);
    add("shrinkRatio == 0", |s| s.scaling.auto.shrink_ratio = 0.0);
    add("shrinkRatio == 1", |s| s.scaling.auto.shrink_ratio = 1.0);
    add("an item larger than a node", |s| {
        s.cache.capacity_mib = 8;
        s.cache.max_item_size_kib = 9 * 1024;
    });
    add("no provider", |s| s.provider = ProviderSpec::default());
    add("two providers", |s| {
        s.provider.pod = Some(PodProvider::default());
    });
    add("ec2 with image and type", |s| s.provider = ec2(None, true));
    add("ec2 without image or type or template", |s| {
        s.provider = ec2(None, false)
    });
    add("ec2 from a launch template by name", |s| {
        s.provider = ec2(
            Some(Ec2LaunchTemplate {
                name: Some("cachepool-node".into()),
                version: Some("$Latest".into()),
                ..Ec2LaunchTemplate::default()
            }),
            false,
        )
    });
    add("ec2 launch template with both id and name", |s| {
        s.provider = ec2(
            Some(Ec2LaunchTemplate {
                id: Some("lt-0123456789abcdef0".into()),
                name: Some("cachepool-node".into()),
                version: None,
            }),
            false,
        )
    });
    add("ec2 launch template with neither id nor name", |s| {
        s.provider = ec2(Some(Ec2LaunchTemplate::default()), true)
    });
    cases
}

/// An ec2 provider with its always-required fields, and an image and instance type if `typed`.
fn ec2(launch_template: Option<Ec2LaunchTemplate>, typed: bool) -> ProviderSpec {
    let text = |v: &str| if typed { v.to_owned() } else { String::new() };
    ProviderSpec {
        ec2: Some(Ec2Provider {
            region: "eu-west-1".into(),
            image_id: text("ami-0123456789abcdef0"),
            instance_type: text("t3.micro"),
            subnet_id: "subnet-1".into(),
            security_group_ids: vec!["sg-1".into()],
            launch_template,
            ..Ec2Provider::default()
        }),
        ..ProviderSpec::default()
    }
}

#[test]
fn cel_rules_agree_with_validate() {
    let mut exercised = std::collections::BTreeSet::new();
    for (name, spec) in cases() {
        let json = serde_json::to_value(&spec).unwrap();
        let broken = cel_rejects(&json);
        let verdict = validate(&spec);
        assert_eq!(
            broken.is_empty(),
            verdict.is_ok(),
            "{name}: CEL broke {broken:?}, validate said {verdict:?}"
        );
        exercised.extend(broken);
    }
    // Every rule is shown to refuse something: a new rule needs a case here.
    let all: std::collections::BTreeSet<String> = rules()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| !is_transition(r))
        .collect();
    let untested: Vec<_> = all.difference(&exercised).collect();
    assert!(
        untested.is_empty(),
        "CEL rules no case breaks: {untested:?}"
    );
}

/// `kubectl scale` (or an HPA, or a patch) in auto mode is refused by the API server with the
/// operator API's message; in manual mode, and when the same change switches modes, it passes.
#[test]
fn auto_mode_refuses_a_replicas_change() {
    let spec = |mode: ScalingMode, replicas: u32| {
        let mut s = valid();
        s.scaling.mode = mode;
        s.scaling.replicas = replicas;
        serde_json::to_value(&s).unwrap()
    };
    use ScalingMode::{Auto, Manual};
    let cases = [
        (
            "auto, kubectl scale 2 -> 3",
            spec(Auto, 2),
            spec(Auto, 3),
            false,
        ),
        (
            "auto, replicas unchanged",
            spec(Auto, 2),
            spec(Auto, 2),
            true,
        ),
        (
            "manual, kubectl scale 2 -> 3",
            spec(Manual, 2),
            spec(Manual, 3),
            true,
        ),
        (
            "manual -> auto with a new replicas",
            spec(Manual, 2),
            spec(Auto, 3),
            true,
        ),
        (
            "auto -> manual with a new replicas",
            spec(Auto, 2),
            spec(Manual, 3),
            true,
        ),
    ];
    let transition: Vec<String> = rules()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| is_transition(r))
        .collect();
    assert_eq!(transition.len(), 1, "transition rules: {transition:?}");
    for (name, old, new, allowed) in cases {
        let broken = cel_rejects_change(Some(&old), &new);
        assert_eq!(broken.is_empty(), allowed, "{name}: broke {broken:?}");
        if !allowed {
            assert_eq!(broken, transition, "{name}");
        }
        // On a create the transition rule does not run.
        assert!(
            cel_rejects(&new).is_empty(),
            "{name}: a create broke {broken:?}"
        );
    }
    let crd = serde_json::to_value(CachePool::crd()).unwrap();
    let messages = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/scaling/x-kubernetes-validations")
        .and_then(Json::as_array)
        .unwrap();
    assert!(
        messages.iter().any(|m| m["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the pool is in auto mode"))),
        "{messages:?}"
    );
}
