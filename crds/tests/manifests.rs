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
