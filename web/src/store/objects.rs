//! Image bytes in an object store: a local directory by default, or S3.
//!
//! One enum rather than a trait object: there are exactly two stores, the choice is made
//! once from configuration, and async methods on an enum need no boxing.
//!
//! Object keys never become paths. The local store names each file by the key's bytes in
//! lowercase hex, an alphabet without `/` or `.`, so `../x` is the file `2e2e2f78` inside the
//! store's directory; S3 keys are the configured prefix followed by the same hex, so no key
//! escapes the prefix even through a server that normalises `..` in URLs. Listing decodes the
//! hex back and skips any name that is not the store's, so whole-store operations touch only
//! objects this store wrote.
//!
//! A local write is atomic: the bytes go to a staging file in the store's `tmp` directory, are
//! synced, and are renamed over the final name, so a reader sees the old object, the new one
//! or none, never a partial file. The content type travels inside the file, on a first line,
//! so the rename publishes bytes and type together.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::codec::{hex, unhex};
use super::{MAX_OBJECT_KEY_BYTES, Result, StoreError, check_content_type};

/// An object's bytes and the content type it was stored with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The bytes.
    pub bytes: Bytes,
    /// The content type given to [`ObjectStore::put`].
    pub content_type: String,
}

/// An object found by [`ObjectStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object key, as given to [`ObjectStore::put`].
    pub key: String,
    /// When it was last written.
    pub modified: SystemTime,
}

/// Settings of an S3 (or S3-compatible) object store.
#[derive(Clone, Default)]
pub struct S3Config {
    /// The bucket, which must exist.
    pub bucket: String,
    /// Prepended to every object key, e.g. `images/`; the store lists and deletes only
    /// under it.
    pub prefix: String,
    /// The bucket's region; when `None`, the AWS default chain's (`AWS_REGION`, the profile,
    /// instance metadata).
    pub region: Option<String>,
    /// Endpoint of an S3-compatible server (e.g. `http://127.0.0.1:9000`) instead of AWS's.
    pub endpoint: Option<String>,
    /// Address buckets as `ENDPOINT/BUCKET` rather than `BUCKET.ENDPOINT`, as most
    /// S3-compatible servers (and moto) need.
    pub force_path_style: bool,
    /// Access key id; with [`S3Config::secret_access_key`], used instead of the AWS default
    /// credential chain (environment, profile, web identity, instance metadata).
    pub access_key_id: Option<String>,
    /// Secret access key, used with [`S3Config::access_key_id`].
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where image bytes are kept.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    /// Files in a local directory.
    Local(LocalStore),
    /// Objects in an S3 bucket under a prefix.
    #[cfg(feature = "s3")]
    S3(super::S3Store),
}

impl ObjectStore {
    /// A store in the local directory `dir`, created if missing.
    pub fn local(dir: impl Into<PathBuf>) -> Result<Self> {
        LocalStore::open(dir).map(Self::Local)
    }

    /// A store in an S3 bucket. Checks the settings, not the bucket: the first operation
    /// reports a bucket that is missing or not accessible.
    pub async fn s3(config: S3Config) -> Result<Self> {
        #[cfg(feature = "s3")]
        {
            super::S3Store::connect(config).await.map(Self::S3)
        }
        #[cfg(not(feature = "s3"))]
        {
            let _ = config;
            Err(StoreError::S3NotBuilt)
        }
    }

    /// Where the objects are, for logs: a directory or `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        match self {
            Self::Local(local) => local.root.display().to_string(),
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.location(),
        }
    }

    /// Stores `bytes` under `key`, replacing any object there.
    pub async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<()> {
        check_object_key(key)?;
        check_content_type(content_type)?;
        match self {
            Self::Local(local) => local.put(key, bytes, content_type).await,
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.put(key, bytes, content_type).await,
        }
    }

    /// The object under `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Object>> {
        check_object_key(key)?;
        match self {
            Self::Local(local) => local.get(key).await,
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.get(key).await,
        }
    }

    /// Deletes the object under `key`; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        check_object_key(key)?;
        match self {
            Self::Local(local) => local.delete_many(vec![key.to_owned()]).await,
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.delete(key).await,
        }
    }

    /// Deletes the objects under `keys` (in batches where the store has them).
    pub async fn delete_many(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            check_object_key(key)?;
        }
        match self {
            Self::Local(local) => local.delete_many(keys.to_vec()).await,
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.delete_many(keys).await,
        }
    }

    /// Every object this store holds (names it did not write are skipped).
    pub async fn list(&self) -> Result<Vec<ObjectInfo>> {
        match self {
            Self::Local(local) => local.list().await,
            #[cfg(feature = "s3")]
            Self::S3(s3) => s3.list().await,
        }
    }

    /// Deletes every object this store holds; returns how many.
    pub async fn delete_all(&self) -> Result<u64> {
        let keys: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .map(|info| info.key)
            .collect();
        self.delete_many(&keys).await?;
        Ok(keys.len() as u64)
    }
}

/// Refuses object keys a store cannot name.
fn check_object_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_OBJECT_KEY_BYTES {
        return Err(StoreError::BadObjectKey {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// The name an object key is stored under: its bytes in lowercase hex.
pub(crate) fn encode_object_key(key: &str) -> String {
    hex(key.as_bytes())
}

/// The object key a stored name stands for, or `None` for a name this store did not write.
pub(crate) fn decode_object_key(name: &str) -> Option<String> {
    let key = String::from_utf8(unhex(name)?).ok()?;
    (!key.is_empty() && key.len() <= MAX_OBJECT_KEY_BYTES).then_some(key)
}

/// First bytes of every object file, before the content type.
const MAGIC: &[u8] = b"cachepool-object/1 ";

/// Objects as files in a local directory: `DIR/objects/HEX(KEY)`, staged in `DIR/tmp`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
}

impl LocalStore {
    /// Opens (creating if missing) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = dir.into();
        for sub in ["objects", "tmp"] {
            fs::create_dir_all(root.join(sub)).map_err(|source| StoreError::Local {
                op: "creation",
                key: String::new(),
                dir: root.display().to_string(),
                source,
            })?;
        }
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(encode_object_key(key))
    }

    fn error(&self, op: &'static str, key: &str, source: io::Error) -> StoreError {
        StoreError::Local {
            op,
            key: key.to_owned(),
            dir: self.root.display().to_string(),
            source,
        }
    }

    /// Runs blocking file-system work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        work: impl FnOnce(&Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || work(&root))
            .await
            .map_err(|join| self.error(op, key, io::Error::other(join.to_string())))?
    }

    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<()> {
        let store = self.clone();
        let (owned_key, content_type) = (key.to_owned(), content_type.to_owned());
        self.blocking("write", key, move |root| {
            let staged = root
                .join("tmp")
                .join(format!("{:032x}", rand::random::<u128>()));
            let final_path = store.object_path(&owned_key);
            let written = write_synced(&staged, &content_type, &bytes)
                .and_then(|()| fs::rename(&staged, &final_path))
                .and_then(|()| sync_dir(&root.join("objects")));
            if written.is_err() {
                // Best effort: a staging file left behind is only wasted space, removed by
                // `delete_all`.
                let _ = fs::remove_file(&staged);
            }
            written.map_err(|source| store.error("write", &owned_key, source))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Object>> {
        let store = self.clone();
        let owned_key = key.to_owned();
        self.blocking("read", key, move |_| {
            let raw = match fs::read(store.object_path(&owned_key)) {
                Ok(raw) => raw,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(store.error("read", &owned_key, source)),
            };
            let corrupt = |reason| StoreError::CorruptObject {
                key: owned_key.clone(),
                dir: store.root.display().to_string(),
                reason,
            };
            let rest = raw
                .strip_prefix(MAGIC)
                .ok_or_else(|| corrupt("no object header"))?;
            let end = rest
                .iter()
                .take(256)
                .position(|&b| b == b'\n')
                .ok_or_else(|| corrupt("no end to the content type line"))?;
            let content_type = std::str::from_utf8(&rest[..end])
                .map_err(|_| corrupt("content type is not text"))?
                .to_owned();
            let header = MAGIC.len() + end + 1;
            Ok(Some(Object {
                bytes: Bytes::from(raw).slice(header..),
                content_type,
            }))
        })
        .await
    }

    async fn delete_many(&self, keys: Vec<String>) -> Result<()> {
        let store = self.clone();
        let first = keys.first().cloned().unwrap_or_default();
        self.blocking("delete", &first, move |_| {
            for key in &keys {
                match fs::remove_file(store.object_path(key)) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(store.error("delete", key, source)),
                }
            }
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let store = self.clone();
        self.blocking("listing", "", move |root| {
            let listing_error = |source| store.error("listing", "", source);
            let mut found = Vec::new();
            // Staging files are not objects, but a crashed write leaves them behind; clear
            // those too old to belong to a write in progress.
            clear_stale_staging(&root.join("tmp"));
            for entry in fs::read_dir(root.join("objects")).map_err(listing_error)? {
                let entry = entry.map_err(listing_error)?;
                let Some(key) = entry.file_name().to_str().and_then(decode_object_key) else {
                    continue;
                };
                let modified = match entry.metadata().and_then(|m| m.modified()) {
                    Ok(modified) => modified,
                    // Deleted since the directory was read.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(store.error("listing", &key, source)),
                };
                found.push(ObjectInfo { key, modified });
            }
            Ok(found)
        })
        .await
    }
}

/// Writes the object file: header line, bytes, then fsync so the rename that follows
/// publishes durable content.
fn write_synced(path: &Path, content_type: &str, bytes: &[u8]) -> io::Result<()> {
    let mut file = fs::File::create_new(path)?;
    file.write_all(MAGIC)?;
    file.write_all(content_type.as_bytes())?;
    file.write_all(b"\n")?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a rename into `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes staging files older than an hour; errors are ignored (the next listing retries).
fn clear_stale_staging(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    let Some(cutoff) = SystemTime::now().checked_sub(std::time::Duration::from_secs(3600)) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified < cutoff);
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_hex_and_decode_back() {
        for key in [
            "a",
            "../../etc/passwd",
            "dir/sub/file.png",
            ".",
            "..",
            "ключ/🙂",
        ] {
            let name = encode_object_key(key);
            assert!(
                name.bytes().all(|c| c.is_ascii_hexdigit()),
                "{key:?} -> {name:?}"
            );
            assert_eq!(decode_object_key(&name).as_deref(), Some(key));
        }
    }

    #[test]
    fn foreign_names_are_not_taken_for_objects() {
        for name in ["", "README", "2e2", "2E2E", "ff", "tmp", ".hidden"] {
            assert_eq!(decode_object_key(name), None, "{name:?}");
        }
    }

    #[test]
    fn object_keys_are_bounded() {
        assert!(check_object_key(&"k".repeat(MAX_OBJECT_KEY_BYTES)).is_ok());
        assert!(check_object_key(&"k".repeat(MAX_OBJECT_KEY_BYTES + 1)).is_err());
        assert!(check_object_key("").is_err());
        // 2 * 120 hex digits fit a 255-byte file name.
        const { assert!(2 * MAX_OBJECT_KEY_BYTES <= 255) };
    }

    #[test]
    fn s3_config_debug_hides_the_secret() {
        let config = S3Config {
            bucket: "b".into(),
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI".into()),
            ..S3Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
    }
}
