//! The state directory of standalone mode: CachePool manifests in, pool records out.
//!
//! The directory holds the same manifests `kubectl apply` takes, one CachePool per `*.yaml` (or
//! `*.yml`) file; people and scripts edit them, and spec changes made through the API are
//! written back to them, so the files stay the truth about what each pool should be. What
//! Kubernetes would keep on the object (generation, uid, creation time, status) lives beside
//! them in `.cachepool/pools/<namespace>/<name>.json`, written atomically, so that a restarted
//! operator knows each pool's ring, its running migration and the nodes it must adopt.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use cachepool_crds::pool::{CachePool, CachePoolSpec};
use cachepool_crds::strict;
use serde::Serialize;

use crate::provider::PoolRef;

/// Namespace of a manifest that names none (DESIGN.md: standalone mode uses `default`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// API group and version a manifest must name.
pub const API_VERSION: &str = "cachepool.io/v1alpha1";

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// One manifest file as last read.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: PathBuf,
    /// The file's bytes, to notice changes cheaply.
    pub content: Vec<u8>,
    /// The pool it declares, or why it cannot be read as one.
    pub parsed: Result<(PoolRef, CachePool), String>,
}

pub use crate::store::PoolRecord;

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (and creates) `dir` and its `.cachepool` subdirectory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<StateDir> {
        let dir = dir.into();
        fs::create_dir_all(dir.join(".cachepool").join("pools"))
            .map_err(io("creating the state directory", &dir))?;
        let dir = dir
            .canonicalize()
            .map_err(io("resolving the state directory", &dir))?;
        Ok(StateDir { dir })
    }

    /// The manifests directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The event file of standalone mode (`crate::events::FileEvents`).
    pub fn events_path(&self) -> PathBuf {
        self.dir.join(".cachepool").join("events.jsonl")
    }

    /// Where the process provider keeps node records and logs.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(".cachepool").join("run")
    }

    fn record_path(&self, pool: &PoolRef) -> PathBuf {
        self.dir
            .join(".cachepool")
            .join("pools")
            .join(&pool.namespace)
            .join(format!("{}.json", pool.name))
    }

    /// Every manifest file, by path.
    pub fn scan(&self) -> Result<BTreeMap<PathBuf, Manifest>> {
        let mut out = BTreeMap::new();
        let entries = fs::read_dir(&self.dir).map_err(io("listing", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let path = entry.path();
            let is_manifest = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml");
            if !is_manifest || !path.is_file() {
                continue;
            }
            let content = match fs::read(&path) {
                Ok(content) => content,
                // Deleted between listing and reading: it is simply gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            };
            let parsed = parse_manifest(&content);
            out.insert(
                path.clone(),
                Manifest {
                    path,
                    content,
                    parsed,
                },
            );
        }
        Ok(out)
    }

    /// Writes `pool` back to its manifest file (atomically: a reader never sees half a file).
    /// Comments in the file are not kept.
    pub fn write_manifest(&self, path: &Path, pool: &CachePool) -> Result<Vec<u8>> {
        let manifest = ManifestOut {
            api_version: API_VERSION,
            kind: "CachePool",
            metadata: MetadataOut {
                name: pool.metadata.name.clone().unwrap_or_default(),
                namespace: pool
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                labels: pool.metadata.labels.clone().unwrap_or_default(),
                annotations: pool.metadata.annotations.clone().unwrap_or_default(),
            },
            spec: &pool.spec,
        };
        let yaml = serde_norway::to_string(&manifest).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let content =
            format!("# Written by the cachepool operator after a change through its API.\n{yaml}")
                .into_bytes();
        write_atomically(path, &content)?;
        Ok(content)
    }

    /// The record of `pool`, if one was saved.
    pub fn load_record(&self, pool: &PoolRef) -> Option<PoolRecord> {
        let path = self.record_path(pool);
        let bytes = fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable pool record");
                None
            }
        }
    }

    /// Saves the record of `pool`.
    pub fn save_record(&self, pool: &PoolRef, record: &PoolRecord) -> Result<()> {
        let path = self.record_path(pool);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&path, &bytes)
    }

    /// Forgets `pool` (deleted).
    pub fn remove_record(&self, pool: &PoolRef) -> Result<()> {
        let path = self.record_path(pool);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: MetadataOut,
    spec: &'a CachePoolSpec,
}

#[derive(Serialize)]
struct MetadataOut {
    name: String,
    namespace: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// Reads one manifest: a CachePool of our API version with a name.
pub fn parse_manifest(content: &[u8]) -> Result<(PoolRef, CachePool), String> {
    let value: serde_json::Value =
        serde_norway::from_slice(content).map_err(|e| format!("not valid YAML: {e}"))?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    if api_version != Some(API_VERSION) || kind != Some("CachePool") {
        return Err(format!(
            "not a CachePool: expected apiVersion {API_VERSION} and kind CachePool, found {} and {}",
            api_version.unwrap_or("none"),
            kind.unwrap_or("none")
        ));
    }
    // Strictly, as `kubectl apply --validate=strict`: a misspelt or misplaced field is an error
    // naming its path, not a setting silently left at its default.
    let mut pool: CachePool =
        strict::read_pool(value).map_err(|e| format!("not a valid CachePool: {e}"))?;
    let name = pool
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name is required")?;
    check_name("metadata.name", &name)?;
    let namespace = pool
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    check_name("metadata.namespace", &namespace)?;
    pool.metadata.namespace = Some(namespace.clone());
    // Status is the operator's to write, never the manifest's.
    pool.status = None;
    Ok((PoolRef::new(namespace, name), pool))
}

/// Kubernetes names (RFC 1123 labels): they become directory names and URL segments.
fn check_name(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {name:?} must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    file.write_all(bytes).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("replacing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = include_str!("../../examples/local.yaml");

    #[test]
    fn example_manifest_parses_into_its_pool() {
        let (pool, resource) = parse_manifest(LOCAL.as_bytes()).unwrap();
        assert_eq!(pool, PoolRef::new("default", "local"));
        assert_eq!(resource.spec.cache.capacity_mib, 64);
    }

    #[test]
    fn manifests_that_are_not_cachepools_are_refused_with_a_reason() {
        let cases = [
            ("a: [", "not valid YAML"),
            ("apiVersion: v1\nkind: ConfigMap\n", "not a CachePool"),
            (
                "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata: {}\nspec: {}\n",
                "metadata.name is required",
            ),
            (
                "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata: {name: ../x}\nspec: {}\n",
                "must be 1-63 lowercase",
            ),
            (
                "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata: {name: a}\nspec: {scaling: {replicas: many}}\n",
                "not a valid CachePool",
            ),
            (
                "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata: {name: a}\nspec: {scaling: {minMissRate: 0.2}}\n",
                "unknown field \"spec.scaling.minMissRate\" (did you mean spec.scaling.auto.minMissRate?)",
            ),
            (
                "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata: {name: a, lables: {a: b}}\nspec: {}\n",
                "unknown field \"metadata.lables\"",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_manifest(text.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn written_manifest_reads_back_to_the_same_pool() {
        let dir = std::env::temp_dir().join(format!("cachepool-state-{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        let (_, mut resource) = parse_manifest(LOCAL.as_bytes()).unwrap();
        resource.spec.scaling.replicas = 3;
        let path = state.path().join("local.yaml");
        state.write_manifest(&path, &resource).unwrap();
        let scanned = state.scan().unwrap();
        let (pool, back) = scanned[&path].parsed.clone().unwrap();
        assert_eq!(pool.name, "local");
        assert_eq!(back.spec, resource.spec);

        let record = PoolRecord {
            generation: 4,
            spec: back.spec.clone(),
            ..PoolRecord::default()
        };
        state.save_record(&pool, &record).unwrap();
        assert_eq!(state.load_record(&pool), Some(record));
        state.remove_record(&pool).unwrap();
        assert_eq!(state.load_record(&pool), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
