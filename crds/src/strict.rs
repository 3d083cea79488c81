//! Reading a CachePool that a person wrote — a manifest file, a resource after a merge patch —
//! strictly: a field the resource does not have is an error naming its path, as
//! `kubectl apply --validate=strict` names it, instead of being dropped in silence (a
//! `spec.scaling.minMissRate` meant as `spec.scaling.auto.minMissRate` would otherwise leave the
//! real threshold at its default and answer 200).
//!
//! Strictness belongs to this reader, not to the types in [`crate::pool`]: kube deserialises
//! the same types from the API server, where an object may carry fields this build does not
//! know (a newer CRD version, a newer `ObjectMeta`), and there skipping them is right —
//! `#[serde(deny_unknown_fields)]` would make one such object fail the operator's whole watch.
//! So the types keep serde's default, and this reader wraps the deserialiser twice:
//! `serde_ignored` reports every field the types skipped, with its path, and
//! `serde_path_to_error` names the path of a value of the wrong type.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::pool::{CachePool, CachePoolSpec, Ec2Provider, PodProvider, ProcessProvider};

/// A field the resource does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownField {
    /// Its path, e.g. `spec.scaling.minMissRate`.
    pub path: String,
    /// A field of the same name elsewhere in the spec, e.g. `spec.scaling.auto.minMissRate`.
    pub suggestion: Option<String>,
}

impl std::fmt::Display for UnknownField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown field \"{}\"", self.path)?;
        match &self.suggestion {
            Some(known) => write!(f, " (did you mean {known}?)"),
            None => Ok(()),
        }
    }
}

/// Why a written CachePool cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StrictError {
    /// Fields the resource does not have (at least one), in the order they were read.
    #[error("{}: a CachePool has no such field; remove it or fix its name", join(.0))]
    Unknown(Vec<UnknownField>),
    /// A value of the wrong type or shape, at `path`.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn join(fields: &[UnknownField]) -> String {
    fields
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl StrictError {
    /// The path of the (first) field at fault, for an error body's `field`.
    pub fn field(&self) -> &str {
        match self {
            StrictError::Unknown(fields) => fields.first().map_or("", |f| f.path.as_str()),
            StrictError::Invalid { path, .. } => path,
        }
    }
}

/// Reads a whole CachePool (`apiVersion`, `kind`, `metadata`, `spec`, `status`) as a person
/// wrote it, refusing any field it does not have. `apiVersion` and `kind` are the caller's to
/// check (the derived type has no fields for them).
pub fn read_pool(value: Value) -> Result<CachePool, StrictError> {
    read(value, |path| path != "apiVersion" && path != "kind")
}

/// Deserialises `value`, collecting the paths of the fields `T` skipped for which `report`
/// holds.
fn read<T: DeserializeOwned>(
    value: Value,
    report: impl Fn(&str) -> bool,
) -> Result<T, StrictError> {
    let mut unknown = Vec::new();
    let mut skipped = |path: serde_ignored::Path<'_>| {
        let path = path_text(&path);
        if report(&path) {
            unknown.push(path);
        }
    };
    let parsed: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut skipped));
    let parsed = parsed.map_err(|e| StrictError::Invalid {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    if unknown.is_empty() {
        return Ok(parsed);
    }
    let known = known_spec_paths();
    Err(StrictError::Unknown(
        unknown
            .into_iter()
            .map(|path| UnknownField {
                suggestion: suggest(&path, &known),
                path,
            })
            .collect(),
    ))
}

/// `spec.provider.pod.tolerations[0].effectx`: map keys joined by dots, sequence indexes in
/// brackets, `Option`s and newtypes transparent.
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => {
            let parent = path_text(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

/// Every path of the spec's own fields (`spec.scaling.auto.minMissRate`, ...), from a spec with
/// every optional part present.
fn known_spec_paths() -> Vec<String> {
    let mut spec = CachePoolSpec::default();
    spec.provider.process = Some(ProcessProvider {});
    spec.provider.pod = Some(PodProvider {
        image: Some(String::new()),
        ..PodProvider::default()
    });
    spec.provider.ec2 = Some(Ec2Provider {
        iam_instance_profile: Some(String::new()),
        key_name: Some(String::new()),
        user_data: Some(String::new()),
        use_public_ip: Some(false),
        ..Ec2Provider::default()
    });
    let mut out = Vec::new();
    if let Ok(value) = serde_json::to_value(&spec) {
        collect_paths("spec", &value, &mut out);
    }
    out
}

fn collect_paths(prefix: &str, value: &Value, out: &mut Vec<String>) {
    if let Value::Object(map) = value {
        for (key, inner) in map {
            let path = format!("{prefix}.{key}");
            collect_paths(&path, inner, out);
            out.push(path);
        }
    }
}

/// The known field an unknown path most likely meant: one whose last name matches (ignoring
/// case), e.g. `spec.scaling.minMissRate` → `spec.scaling.auto.minMissRate`.
fn suggest(unknown: &str, known: &[String]) -> Option<String> {
    let last = |path: &str| path.rsplit('.').next().unwrap_or(path).to_ascii_lowercase();
    let name = last(unknown);
    known.iter().find(|k| last(k) == name).cloned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool(spec: Value) -> Value {
        json!({
            "apiVersion": "cachepool.io/v1alpha1",
            "kind": "CachePool",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec,
        })
    }

    #[test]
    fn a_pool_with_only_known_fields_reads_as_serde_would() {
        let value = pool(json!({
            "cache": {"capacityMiB": 32, "policy": "sieve"},
            "scaling": {"mode": "auto", "auto": {"minMissRate": 0.05}},
            "provider": {"pod": {"image": "x", "tolerations": [{"key": "k", "effect": "NoSchedule"}]}},
        }));
        let strict = read_pool(value.clone()).unwrap();
        let lax: CachePool = serde_json::from_value(value).unwrap();
        assert_eq!(strict.spec, lax.spec);
        assert!((strict.spec.scaling.auto.min_miss_rate - 0.05).abs() < f64::EPSILON);
    }

    #[test]
    fn a_misplaced_field_is_refused_by_its_path_with_the_field_it_meant() {
        let error = read_pool(pool(
            json!({"scaling": {"minMissRate": 0.2}, "provider": {"process": {}}}),
        ))
        .unwrap_err();
        assert_eq!(error.field(), "spec.scaling.minMissRate");
        assert_eq!(
            error,
            StrictError::Unknown(vec![UnknownField {
                path: "spec.scaling.minMissRate".into(),
                suggestion: Some("spec.scaling.auto.minMissRate".into()),
            }])
        );
        assert!(
            error
                .to_string()
                .contains("did you mean spec.scaling.auto.minMissRate?"),
            "{error}"
        );
    }

    #[test]
    fn unknown_fields_are_found_at_every_depth_and_all_reported() {
        let mut value = pool(json!({
            "cache": {"capacity": 32},
            "provider": {
                "process": {"port": 1},
                "pod": {"tolerations": [{"key": "k"}, {"kee": "k"}]},
            },
            "replicas": 3,
        }));
        value["metadata"]["nmae"] = json!("typo");
        let StrictError::Unknown(fields) = read_pool(value).unwrap_err() else {
            panic!("expected unknown fields");
        };
        let mut paths: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "metadata.nmae",
                "spec.cache.capacity",
                "spec.provider.pod.tolerations[1].kee",
                "spec.provider.process.port",
                "spec.replicas",
            ]
        );
        let replicas = fields.iter().find(|f| f.path == "spec.replicas").unwrap();
        assert_eq!(
            replicas.suggestion.as_deref(),
            Some("spec.scaling.replicas")
        );
    }

    #[test]
    fn a_wrong_type_names_its_path() {
        let error = read_pool(pool(json!({"scaling": {"replicas": "three"}}))).unwrap_err();
        assert_eq!(error.field(), "spec.scaling.replicas");
        assert!(error.to_string().contains("invalid type"), "{error}");
    }
}
