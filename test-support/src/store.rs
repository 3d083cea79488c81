//! Test fixtures: a migrated database of either kind, an object store of either kind, and a
//! [`Storage`] over one of each, each holding the guards of the servers and directories it
//! needs so that dropping the fixture stops and removes them.

use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use cachepool_web::store::{Database, ObjectStore, S3Config, Storage};
use sqlx::AnyPool;

use crate::servers::{Moto, Postgres, TempDir};

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Which object store a fixture uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objects {
    Local,
    S3,
}

/// A migrated database and what keeps it alive.
#[derive(Debug)]
pub struct TestDb {
    pub db: Database,
    pub url: String,
    // Declared after `db` so the pool closes before the server stops.
    _postgres: Option<Postgres>,
    _dir: TempDir,
}

impl TestDb {
    pub async fn start(kind: Db) -> Self {
        let dir = TempDir::new("db");
        let (url, postgres) = match kind {
            Db::Sqlite => (
                format!("sqlite://{}", dir.path().join("images.db").display()),
                None,
            ),
            Db::Postgres => {
                let server = Postgres::start();
                (server.url().to_owned(), Some(server))
            }
        };
        let db = Database::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        db.migrate()
            .await
            .unwrap_or_else(|e| panic!("migrate: {e}"));
        Self {
            db,
            url,
            _postgres: postgres,
            _dir: dir,
        }
    }

    /// A second pool on the same database, for statements the store has no API for (breaking
    /// the schema on purpose, reading the migrations table).
    pub async fn raw(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPool::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("raw connection: {e}"))
    }
}

pub const BUCKET: &str = "images";
pub const PREFIX: &str = "img/";
pub const REGION: &str = "us-east-1";

/// An object store and what keeps it alive.
#[derive(Debug)]
pub struct TestObjects {
    pub store: ObjectStore,
    pub kind: Objects,
    /// The local store's directory (Local only).
    pub dir: TempDir,
    /// The moto server (S3 only).
    pub moto: Option<Moto>,
}

impl TestObjects {
    pub async fn start(kind: Objects) -> Self {
        let dir = TempDir::new("objects");
        match kind {
            Objects::Local => Self {
                store: ObjectStore::local(dir.path().join("store"))
                    .unwrap_or_else(|e| panic!("open local store: {e}")),
                kind,
                dir,
                moto: None,
            },
            Objects::S3 => {
                let moto = Moto::start();
                raw_s3(&moto)
                    .create_bucket()
                    .bucket(BUCKET)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("create bucket: {e:?}"));
                let store = ObjectStore::s3(s3_config(&moto, BUCKET))
                    .await
                    .unwrap_or_else(|e| panic!("S3 store: {e}"));
                Self {
                    store,
                    kind,
                    dir,
                    moto: Some(moto),
                }
            }
        }
    }

    /// The moto server (panics for a local store).
    pub fn moto(&self) -> &Moto {
        self.moto
            .as_ref()
            .unwrap_or_else(|| panic!("an S3 fixture"))
    }
}

/// Settings for the moto S3 server with dummy credentials (moto accepts any).
pub fn s3_config(moto: &Moto, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.to_owned(),
        prefix: PREFIX.to_owned(),
        region: Some(REGION.to_owned()),
        endpoint: Some(moto.endpoint().to_owned()),
        force_path_style: true,
        access_key_id: Some("testing".to_owned()),
        secret_access_key: Some("testing".to_owned()),
    }
}

/// An S3 client of moto that bypasses the store: to create buckets and to see every key.
pub fn raw_s3(moto: &Moto) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .endpoint_url(moto.endpoint())
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Every key in the bucket, prefix or not.
pub async fn all_bucket_keys(moto: &Moto) -> Vec<String> {
    let listed = raw_s3(moto)
        .list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap_or_else(|e| panic!("list bucket: {e:?}"));
    let mut keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

/// A [`Storage`] over a fresh database and object store.
#[derive(Debug)]
pub struct TestStorage {
    pub storage: Storage,
    pub db: TestDb,
    pub objects: TestObjects,
}

impl TestStorage {
    pub async fn start(db: Db, objects: Objects) -> Self {
        let db = TestDb::start(db).await;
        let objects = TestObjects::start(objects).await;
        let storage = Storage::new(db.db.clone(), objects.store.clone())
            .with_orphan_grace(Duration::from_secs(3600));
        Self {
            storage,
            db,
            objects,
        }
    }

    /// The object keys in the store, sorted.
    pub async fn object_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .storage
            .objects()
            .list()
            .await
            .unwrap_or_else(|e| panic!("list objects: {e}"))
            .into_iter()
            .map(|info| info.key)
            .collect();
        keys.sort();
        keys
    }
}

/// Distinct image-like bytes for version `n`.
pub fn image_bytes(n: usize) -> bytes::Bytes {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(format!("version {n}").as_bytes());
    bytes.extend(std::iter::repeat_n(
        u8::try_from(n % 251).unwrap_or(0),
        64 + n % 97,
    ));
    bytes.into()
}

/// Expands to one `#[tokio::test]` per listed fixture combination, each calling `$body`
/// with the combination's arguments. The calling crate needs `tokio` with its `macros` and
/// multi-threaded runtime.
#[macro_export]
macro_rules! matrix {
    ($body:ident: $($name:ident => ($($arg:expr),*)),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $body($($arg),*).await;
            }
        )+
    };
}
