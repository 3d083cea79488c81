//! The committed CRD and example manifests stay in step with the types: `crds/cachepool.yaml`
//! is exactly what `cachepool crd` prints (regenerate with
//! `cargo run -- crd > crds/cachepool.yaml`), and every manifest in `examples/` parses and
//! passes validation.

use std::path::Path;

use cachepool_crds::pool::{CachePool, crd_yaml, validate};

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    match std::fs::read_to_string(&full) {
        Ok(text) => text,
        Err(e) => panic!("cannot read {}: {e}", full.display()),
    }
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let committed = repo_file("crds/cachepool.yaml");
    assert!(
        committed == crd_yaml(),
        "crds/cachepool.yaml is stale: run `cargo run -- crd > crds/cachepool.yaml`"
    );
}

/// The Helm chart installs the same CRD (from its `crds/`, so Helm never templates it).
#[test]
fn the_charts_crd_is_the_committed_one() {
    assert!(
        repo_file("charts/cachepool/crds/cachepool.yaml") == crd_yaml(),
        "charts/cachepool/crds/cachepool.yaml is stale: run \
         `cargo run -- crd > charts/cachepool/crds/cachepool.yaml`"
    );
}

#[test]
fn example_manifests_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let pool: CachePool = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        if let Err(errors) = validate(&pool.spec) {
            panic!("{} is invalid: {errors:?}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 1, "no example manifests found in {}", dir.display());
}

/// The CRD's openAPIV3Schema as a JSON Schema a validator can apply strictly: OpenAPI's
/// `nullable` becomes a `null` type, and an object that lists its properties refuses others —
/// what `kubectl apply --validate=strict` reports and what the API server would otherwise prune
/// without a word. `metadata` is left open (the API server checks it itself).
fn strict_schema() -> serde_json::Value {
    fn tighten(schema: &mut serde_json::Value) {
        let Some(map) = schema.as_object_mut() else {
            return;
        };
        if map.remove("nullable") == Some(serde_json::Value::Bool(true))
            && let Some(serde_json::Value::String(kind)) = map.get("type").cloned()
        {
            map.insert("type".into(), serde_json::json!([kind, "null"]));
        }
        if map.contains_key("properties") && !map.contains_key("additionalProperties") {
            map.insert("additionalProperties".into(), false.into());
        }
        for (key, value) in map.iter_mut() {
            match key.as_str() {
                "properties" => {
                    if let Some(properties) = value.as_object_mut() {
                        properties.values_mut().for_each(tighten);
                    }
                }
                "items" | "additionalProperties" => tighten(value),
                "anyOf" | "oneOf" | "allOf" => {
                    if let Some(list) = value.as_array_mut() {
                        list.iter_mut().for_each(tighten);
                    }
                }
                _ => {}
            }
        }
    }
    let crd: serde_json::Value = serde_norway::from_str(&repo_file("crds/cachepool.yaml"))
        .unwrap_or_else(|e| panic!("crds/cachepool.yaml does not parse: {e}"));
    let mut schema = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema")
        .unwrap_or_else(|| panic!("the CRD has no openAPIV3Schema"))
        .clone();
    // The API server supplies these three itself; the schema of the CRD leaves them out.
    let properties = schema["properties"]
        .as_object_mut()
        .unwrap_or_else(|| panic!("the openAPIV3Schema has no properties"));
    properties.insert(
        "apiVersion".into(),
        serde_json::json!({"enum": ["cachepool.io/v1alpha1"]}),
    );
    properties.insert("kind".into(), serde_json::json!({"enum": ["CachePool"]}));
    properties.insert("metadata".into(), serde_json::json!({"type": "object"}));
    tighten(&mut schema);
    schema
}

/// What the schema finds wrong with a manifest, one line per error.
fn schema_errors(validator: &jsonschema::Validator, manifest: &serde_json::Value) -> Vec<String> {
    validator
        .iter_errors(manifest)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn example_manifests_conform_to_the_crd_schema() {
    let validator = jsonschema::validator_for(&strict_schema())
        .unwrap_or_else(|e| panic!("the CRD schema is not a valid JSON Schema: {e}"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let manifest: serde_json::Value = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        let errors = schema_errors(&validator, &manifest);
        assert!(
            errors.is_empty(),
            "{} breaks the CRD schema:\n{}",
            path.display(),
            errors.join("\n")
        );
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    // The three providers each have their example.
    for wanted in ["ec2.yaml", "kind.yaml", "local.yaml"] {
        assert!(
            seen.iter().any(|s| s == wanted),
            "no examples/{wanted} in {seen:?}"
        );
    }
}

/// The strict schema is not a rubber stamp: a misspelt field, a value out of range and a
/// policy that does not exist are each reported at their place.
#[test]
fn the_crd_schema_refuses_what_the_api_server_would() {
    let validator = jsonschema::validator_for(&strict_schema()).unwrap();
    let manifest: serde_json::Value =
        serde_norway::from_str(&repo_file("examples/kind.yaml")).unwrap();
    assert_eq!(schema_errors(&validator, &manifest), Vec::<String>::new());
    let broken = |pointer: &str, field: &str, value: serde_json::Value| {
        let mut m = manifest.clone();
        m.pointer_mut(pointer)
            .and_then(serde_json::Value::as_object_mut)
            .unwrap_or_else(|| panic!("{pointer} is not an object"))
            .insert(field.into(), value);
        schema_errors(&validator, &m)
    };
    let typo = broken("/spec/cache", "capacityMib", 64.into());
    assert!(
        typo.len() == 1 && typo[0].starts_with("/spec/cache:") && typo[0].contains("capacityMib"),
        "{typo:?}"
    );
    let range = broken("/spec/scaling", "maxReplicas", 0.into());
    assert!(
        range.len() == 1 && range[0].starts_with("/spec/scaling/maxReplicas:"),
        "{range:?}"
    );
    let policy = broken("/spec/cache", "policy", "fifo".into());
    assert!(
        policy.len() == 1 && policy[0].starts_with("/spec/cache/policy:"),
        "{policy:?}"
    );
}
