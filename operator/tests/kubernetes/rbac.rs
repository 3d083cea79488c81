//! The chart's RBAC rules (`charts/cachepool/files/*-rules.yaml`, plain YAML the chart's Roles
//! include verbatim) against the calls the operator really makes to the API server.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::apiserver::Call;

/// One PolicyRule of the chart.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

/// Which of the chart's two roles a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `operator-rules.yaml`: pools and their nodes, wherever pools live.
    Pools,
    /// `leader-rules.yaml`: the operator's own namespace (Lease, its own pods' labels).
    Operator,
}

/// (scope, API group, resource or resource/subresource, verb).
pub type Permission = (Scope, String, String, String);

pub fn rules(scope: Scope) -> Vec<Rule> {
    let file = match scope {
        Scope::Pools => "operator-rules.yaml",
        Scope::Operator => "leader-rules.yaml",
    };
    let path = format!(
        "{}/../charts/cachepool/files/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

/// What `call` needs: the API server's view of its verb and resource. `operator_namespace`
/// holds the Lease and the replicas' pods; a call there on pods needs the leader role.
pub fn permission(call: &Call, operator_namespace: &str) -> Permission {
    let parts: Vec<&str> = call.path.trim_matches('/').split('/').collect();
    // /api/v1/... (core) or /apis/GROUP/VERSION/...
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => panic!("not an API path: {}", call.path),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected API path: {}", call.path),
    };
    let watch = call
        .query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (call.method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (method, _) => panic!("unexpected method {method}"),
    };
    let scope =
        if resource == "leases" || (resource == "pods" && namespace == Some(operator_namespace)) {
            Scope::Operator
        } else {
            Scope::Pools
        };
    (scope, group.to_owned(), resource, verb.to_owned())
}

/// Every permission the rules grant, wildcard-free (a `*` anywhere fails: least privilege).
pub fn granted() -> BTreeSet<Permission> {
    let mut all = BTreeSet::new();
    for scope in [Scope::Pools, Scope::Operator] {
        for rule in rules(scope) {
            for list in [&rule.api_groups, &rule.resources, &rule.verbs] {
                assert!(
                    !list.iter().any(|v| v.contains('*')),
                    "a wildcard in the chart's RBAC: {rule:?}"
                );
            }
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        all.insert((scope, group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    all
}

/// Each of `calls` is granted by the chart's rules.
pub fn assert_granted(calls: &[Call], operator_namespace: &str) {
    let granted = granted();
    let missing: BTreeSet<Permission> = calls
        .iter()
        .map(|c| permission(c, operator_namespace))
        .filter(|p| !granted.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "the operator made calls the chart's RBAC does not grant: {missing:#?}"
    );
}
