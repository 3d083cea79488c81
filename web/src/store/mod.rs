//! Where images live: metadata in a SQL database ([`Database`]: SQLite by default, PostgreSQL
//! in production) and bytes in an object store ([`ObjectStore`]: a local directory by default,
//! or S3), combined by [`Storage`] so that no failure leaves one without the other.
//!
//! The two stores share no transaction, so [`Storage`] orders its writes instead:
//!
//! 1. [`Storage::put_image`] writes the bytes under an object name unique to this upload (the
//!    key's hash plus a random token), so it never overwrites bytes a reader may be fetching;
//! 2. then upserts the row to point at that object, in one statement that also hands back the
//!    object the row pointed at before;
//! 3. then deletes that previous object.
//!
//! A failure at step 1 leaves no row (nothing was written to the database). A failure at step
//! 2 deletes the new object again, once the database confirms no row points at it. A crash
//! between steps leaves at worst an object no row points at: unreachable, since every read
//! starts from a row, and removed by [`Storage::sweep`] once it is older than a grace period
//! that covers uploads still in flight. A reader that fetched a row just before step 3 deleted
//! its object reads the row again and finds the newer object, so [`Storage::get_image`] never
//! returns a row whose object is missing.
//!
//! An image version may have a thumbnail, an object of its own named after the version's
//! object ([`Storage::put_image_with_thumbnail`], [`Storage::get_thumbnail`],
//! [`Storage::put_thumbnail`]): no row of its own, so no migration, and it follows its
//! version's object everywhere: written before the row, deleted with the replaced object
//! and by [`Storage::delete_all`], kept by [`Storage::sweep`] exactly while its version's
//! object is referenced.
//!
//! Nothing a caller passes reaches SQL text (every value is a bound parameter) or a file path
//! (object names are written as hex).

mod codec;
mod db;
mod objects;
#[cfg(feature = "s3")]
mod s3;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::latency::{Part, StoreMetrics};

pub use codec::etag_of;
pub use db::{Backend, Database, DeletedRows, NewImage, Upserted};
pub use objects::{LocalStore, Object, ObjectInfo, ObjectStore, S3Config};
#[cfg(feature = "s3")]
pub use s3::S3Store;

/// Longest image key the store accepts, in bytes: memcached's key limit, which the pool
/// imposes anyway.
pub const MAX_KEY_BYTES: usize = 250;

/// Largest page [`Database::list`] returns.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Longest object key an [`ObjectStore`] accepts, in bytes. Local file names are the key in
/// hex and most file systems cap a name at 255 bytes; S3 keys add the prefix.
pub const MAX_OBJECT_KEY_BYTES: usize = 120;

/// How many times [`Storage::get_image`] follows a row to a newer object when a concurrent
/// re-upload deleted the one it was fetching.
const READ_ATTEMPTS: usize = 5;

/// Default age below which [`Storage::sweep`] leaves an unreferenced object alone: an upload
/// between its object write and its row write looks exactly like a crashed one.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(15 * 60);

/// What went wrong in the store, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL names no supported database.
    #[error(
        "unsupported database URL scheme {scheme:?}: use sqlite://PATH (a file, created if \
         missing) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    UnsupportedDatabase {
        /// The scheme found, or the whole text when it had none.
        scheme: String,
    },
    /// The database could not be reached or opened.
    #[error("cannot open the database at {target}: {source}")]
    Connect {
        /// The URL without credentials or query.
        target: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// Applying the embedded migrations failed.
    #[error(
        "cannot bring the database schema up to date: {0} (a database written by a newer \
         version of Cachepool, or one whose migrations were edited, cannot be migrated)"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database {op} failed: {source}")]
    Query {
        /// What the store was doing.
        op: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A stored value does not fit the type it is read as.
    #[error("the database holds an impossible {what} ({value}) for image {key:?}")]
    BadRow {
        /// The image key of the row.
        key: String,
        /// Which column.
        what: &'static str,
        /// The value found.
        value: i64,
    },
    /// A list cursor that [`Database::list`] did not make.
    #[error("invalid list cursor: pass the `next` value of the previous page unchanged")]
    BadCursor,
    /// A page size outside 1..=[`MAX_LIST_LIMIT`].
    #[error("invalid list limit {0}: ask for 1 to {MAX_LIST_LIMIT} items")]
    BadLimit(u32),
    /// An image key the store cannot hold.
    #[error("invalid image key: {0}")]
    BadKey(&'static str),
    /// An object key an [`ObjectStore`] cannot hold.
    #[error(
        "invalid object key {key:?}: use 1 to {MAX_OBJECT_KEY_BYTES} bytes (it is stored as hex)"
    )]
    BadObjectKey {
        /// The key refused.
        key: String,
    },
    /// A content type that cannot be stored or sent as a header.
    #[error("invalid content type {0:?}: use 1 to 255 printable ASCII characters, e.g. image/png")]
    BadContentType(String),
    /// A local object store operation failed.
    #[error("object store {op} of {key:?} in {dir} failed: {source}")]
    Local {
        /// What the store was doing.
        op: &'static str,
        /// The object key (empty for whole-store operations).
        key: String,
        /// The store's directory.
        dir: String,
        /// The file system's error.
        source: std::io::Error,
    },
    /// A file in a local object store is not in the store's format.
    #[error("object {key:?} in {dir} is corrupt ({reason}); delete it or restore it from a backup")]
    CorruptObject {
        /// The object key.
        key: String,
        /// The store's directory.
        dir: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An S3 operation failed.
    #[error("S3 {op} of {key:?} in bucket {bucket:?} failed: {message}")]
    S3 {
        /// What the store was doing.
        op: &'static str,
        /// The full object key, prefix included (empty for whole-store operations).
        key: String,
        /// The bucket.
        bucket: String,
        /// The SDK's error with its causes.
        message: String,
    },
    /// S3 settings that cannot work.
    #[error("invalid S3 settings: {0}")]
    S3Config(String),
    /// S3 was asked for in a build without it.
    #[error(
        "this build of Cachepool has no S3 support: use a local image directory, or build with \
         `--features s3`"
    )]
    S3NotBuilt,
    /// A row points at an object that stays missing (not a concurrent re-upload): the object
    /// store lost it or was changed behind the store's back.
    #[error(
        "image {key:?} points at object {object:?}, which is missing from the object store; \
         upload the image again"
    )]
    MissingObject {
        /// The image key.
        key: String,
        /// The object its row names.
        object: String,
    },
}

/// The store's result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One image's metadata: one row of the `images` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    /// The image key.
    pub key: String,
    /// Bytes in the object store.
    pub size: u64,
    /// Content type recorded at upload, e.g. `image/png`.
    pub content_type: String,
    /// Lowercase hex SHA-256 of the bytes (see [`etag_of`]); HTTP quotes it.
    pub etag: String,
    /// When the current version was uploaded (microsecond precision).
    pub uploaded_at: SystemTime,
    /// 1 for the first upload of the key, one more at each re-upload.
    pub generation: u64,
    /// Object holding this version's bytes.
    pub object: String,
}

/// One page of a newest-first listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Up to the requested number of images, newest first.
    pub items: Vec<ImageMeta>,
    /// Cursor for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// An image's metadata and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The row.
    pub meta: ImageMeta,
    /// The object's bytes.
    pub bytes: Bytes,
}

/// What [`Storage::get_thumbnail`] found for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThumbnailLookup {
    /// The current version's thumbnail, stored.
    Stored {
        /// The image's row.
        meta: ImageMeta,
        /// The thumbnail's bytes and content type.
        thumbnail: Object,
    },
    /// The current version has no stored thumbnail (uploaded before thumbnails, or one could
    /// not be made): here is the image, to make one of.
    Missing(Image),
}

/// What [`Storage::put_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// The row as written.
    pub meta: ImageMeta,
    /// True when the key was new, false when an existing image was replaced.
    pub created: bool,
}

/// What [`Storage::delete_all`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Deleted {
    /// Rows deleted.
    pub rows: u64,
    /// Objects deleted: those the rows named, and unreferenced ones past the grace period
    /// (replaced versions, normally deleted at their re-upload, are deleted again uncounted).
    pub objects: u64,
}

/// Checks what the store itself needs of an image key; the web layer's rules (which
/// characters a visitor may use) are stricter.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::BadKey("it is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::BadKey("it is longer than 250 bytes"));
    }
    // PostgreSQL text cannot hold NUL; refuse it on SQLite too so both behave alike.
    if key.contains('\0') {
        return Err(StoreError::BadKey("it contains a NUL character"));
    }
    Ok(())
}

/// Checks that a content type can be stored in both object stores and sent as a header.
pub(crate) fn check_content_type(content_type: &str) -> Result<()> {
    let printable = content_type.bytes().all(|c| (0x20..0x7f).contains(&c));
    if content_type.is_empty() || content_type.len() > 255 || !printable {
        return Err(StoreError::BadContentType(content_type.to_owned()));
    }
    Ok(())
}

/// Image storage: the database and the object store, written in an order that never leaves
/// a row without its object (see the module documentation).
#[derive(Debug, Clone)]
pub struct Storage {
    db: Database,
    objects: ObjectStore,
    orphan_grace: Duration,
    /// Latency histograms of every database and object store call, when the site's
    /// metrics are attached.
    metrics: Option<StoreMetrics>,
}

impl Storage {
    /// Combines a migrated database and an object store, with the default orphan grace
    /// period ([`DEFAULT_ORPHAN_GRACE`]).
    pub fn new(db: Database, objects: ObjectStore) -> Self {
        Self {
            db,
            objects,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            metrics: None,
        }
    }

    /// Records the latency of every database and object store call in `metrics` (by part
    /// and operation): the split of the miss path's time that `/metrics` shows.
    pub fn with_metrics(mut self, metrics: StoreMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs one store call, timing it when metrics are attached. Failed calls are timed
    /// too: a timeout is latency the visitor waited through.
    async fn timed<T>(
        &self,
        part: Part,
        operation: &'static str,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        let Some(metrics) = &self.metrics else {
            return call.await;
        };
        let started = std::time::Instant::now();
        let out = call.await;
        metrics.observe(part, operation, started.elapsed());
        out
    }

    /// Sets how old an unreferenced object must be before [`Storage::sweep`] and
    /// [`Storage::delete_all`] remove it. It must exceed the longest upload (object write to
    /// row write); zero is for tests and for stores nobody is writing to.
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// The metadata database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The object store.
    pub fn objects(&self) -> &ObjectStore {
        &self.objects
    }

    /// Stores `bytes` under `key`, replacing any previous image of that key. The caller has
    /// validated the key and established the content type from the bytes.
    pub async fn put_image(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<PutOutcome> {
        self.put_image_with_thumbnail(key, bytes, content_type, None)
            .await
    }

    /// Stores `bytes` under `key` like [`Storage::put_image`], with the version's thumbnail
    /// (its bytes and content type) when there is one. The thumbnail's object is written
    /// before the row, so a reader of the new row finds it; a failure to write it is logged
    /// and leaves the version without one (it is made again on first request).
    pub async fn put_image_with_thumbnail(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
        thumbnail: Option<Object>,
    ) -> Result<PutOutcome> {
        check_key(key)?;
        check_content_type(content_type)?;
        let etag = etag_of(&bytes);
        let object = codec::object_name(key, rand::random());
        let size = bytes.len() as u64;

        self.timed(
            Part::Objects,
            "put",
            self.objects.put(&object, bytes, content_type),
        )
        .await?;
        if let Some(thumbnail) = thumbnail
            && let Err(err) = self
                .put_thumbnail_object(&object, thumbnail.bytes, &thumbnail.content_type)
                .await
        {
            tracing::warn!(key, object, error = %err, "cannot store the thumbnail; it is made again when first asked for");
        }

        let new = NewImage {
            key,
            size,
            content_type,
            etag: &etag,
            uploaded_at: SystemTime::now(),
            object: &object,
        };
        let upserted = match self
            .timed(Part::Database, "upsert", self.db.upsert(&new))
            .await
        {
            Ok(upserted) => upserted,
            Err(err) => {
                self.discard_new_object(key, &object).await;
                return Err(err);
            }
        };

        if let Some(replaced) = upserted.replaced_object.as_deref()
            && replaced != object
            && let Err(err) = self
                .timed(
                    Part::Objects,
                    "delete_many",
                    self.objects
                        .delete_many(&[replaced.to_owned(), codec::thumbnail_name(replaced)]),
                )
                .await
        {
            // Unreferenced already: the next sweep removes it.
            tracing::warn!(key, object = replaced, error = %err, "cannot delete the replaced image's object");
        }
        Ok(PutOutcome {
            meta: upserted.meta,
            created: upserted.created,
        })
    }

    /// Deletes the object of an upload whose row write failed, unless the database says the
    /// row does point at it (a failure reported after the commit, such as a connection lost
    /// before the reply) or cannot say (then the sweep decides later).
    async fn discard_new_object(&self, key: &str, object: &str) {
        match self.timed(Part::Database, "get", self.db.get(key)).await {
            Ok(Some(row)) if row.object == object => {
                tracing::warn!(
                    key,
                    object,
                    "row write reported failure but committed; keeping its object"
                );
            }
            Ok(_) => {
                let both = [object.to_owned(), codec::thumbnail_name(object)];
                if let Err(err) = self
                    .timed(
                        Part::Objects,
                        "delete_many",
                        self.objects.delete_many(&both),
                    )
                    .await
                {
                    tracing::warn!(key, object, error = %err, "cannot delete the object of a failed upload; the sweep will");
                }
            }
            Err(err) => {
                tracing::warn!(key, object, error = %err, "cannot check the object of a failed upload; the sweep will");
            }
        }
    }

    /// The image under `key` with its bytes, or `None` when there is none.
    pub async fn get_image(&self, key: &str) -> Result<Option<Image>> {
        let mut last_missing = None;
        for _ in 0..READ_ATTEMPTS {
            let Some(meta) = self.timed(Part::Database, "get", self.db.get(key)).await? else {
                return Ok(None);
            };
            if let Some(object) = self
                .timed(Part::Objects, "get", self.objects.get(&meta.object))
                .await?
            {
                return Ok(Some(Image {
                    meta,
                    bytes: object.bytes,
                }));
            }
            // A re-upload may have replaced the row and deleted this object since the row was
            // read; the row read again names the newer object. The same object missing twice
            // is not a race.
            if last_missing.as_deref() == Some(meta.object.as_str()) {
                break;
            }
            last_missing = Some(meta.object);
        }
        Err(StoreError::MissingObject {
            key: key.to_owned(),
            object: last_missing.unwrap_or_default(),
        })
    }

    /// The thumbnail of the current version of the image under `key` if it is stored, else
    /// the image to make one of; `None` when there is no image. Like [`Storage::get_image`],
    /// it reads the row again when a concurrent re-upload deleted the objects it was after.
    pub async fn get_thumbnail(&self, key: &str) -> Result<Option<ThumbnailLookup>> {
        let mut last_missing = None;
        for _ in 0..READ_ATTEMPTS {
            let Some(meta) = self.timed(Part::Database, "get", self.db.get(key)).await? else {
                return Ok(None);
            };
            let name = codec::thumbnail_name(&meta.object);
            if let Some(thumbnail) = self
                .timed(Part::Objects, "get", self.objects.get(&name))
                .await?
            {
                return Ok(Some(ThumbnailLookup::Stored { meta, thumbnail }));
            }
            if let Some(object) = self
                .timed(Part::Objects, "get", self.objects.get(&meta.object))
                .await?
            {
                return Ok(Some(ThumbnailLookup::Missing(Image {
                    meta,
                    bytes: object.bytes,
                })));
            }
            if last_missing.as_deref() == Some(meta.object.as_str()) {
                break;
            }
            last_missing = Some(meta.object);
        }
        Err(StoreError::MissingObject {
            key: key.to_owned(),
            object: last_missing.unwrap_or_default(),
        })
    }

    /// Stores the thumbnail of the image version `meta` names. If a re-upload replaced that
    /// version meanwhile, the thumbnail is an orphan (no row names its version) and
    /// [`Storage::sweep`] removes it after the grace period.
    pub async fn put_thumbnail(
        &self,
        meta: &ImageMeta,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<()> {
        self.put_thumbnail_object(&meta.object, bytes, content_type)
            .await
    }

    /// Deletes the stored thumbnail of the image version `meta` names, if any (the next
    /// request makes it again).
    pub async fn delete_thumbnail(&self, meta: &ImageMeta) -> Result<()> {
        let name = codec::thumbnail_name(&meta.object);
        self.timed(Part::Objects, "delete", self.objects.delete(&name))
            .await
    }

    async fn put_thumbnail_object(
        &self,
        object: &str,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<()> {
        let name = codec::thumbnail_name(object);
        self.timed(
            Part::Objects,
            "put",
            self.objects.put(&name, bytes, content_type),
        )
        .await
    }

    /// The metadata of the image under `key`, without its bytes.
    pub async fn get_meta(&self, key: &str) -> Result<Option<ImageMeta>> {
        self.timed(Part::Database, "get", self.db.get(key)).await
    }

    /// Up to `limit` images, newest first, after `cursor` (the `next` of the previous page).
    pub async fn list(&self, limit: u32, cursor: Option<&str>) -> Result<Page> {
        self.timed(Part::Database, "list", self.db.list(limit, cursor))
            .await
    }

    /// Number of images.
    pub async fn count(&self) -> Result<u64> {
        self.timed(Part::Database, "count", self.db.count()).await
    }

    /// Deletes every image: rows first (from then on no read finds them), then the objects
    /// they named, then unreferenced objects past the grace period. An upload racing with
    /// this either survives whole or is deleted whole.
    pub async fn delete_all(&self) -> Result<Deleted> {
        let named = self
            .timed(Part::Database, "delete_all", self.db.delete_all())
            .await?;
        self.timed(
            Part::Objects,
            "delete_many",
            self.objects.delete_many(&named.objects),
        )
        .await?;
        self.timed(
            Part::Objects,
            "delete_many",
            self.objects.delete_many(&named.replaced),
        )
        .await?;
        let thumbnails: Vec<String> = named
            .objects
            .iter()
            .chain(&named.replaced)
            .map(|object| codec::thumbnail_name(object))
            .collect();
        self.timed(
            Part::Objects,
            "delete_many",
            self.objects.delete_many(&thumbnails),
        )
        .await?;
        let swept = self.sweep().await?;
        Ok(Deleted {
            rows: named.rows,
            objects: named.objects.len() as u64 + swept,
        })
    }

    /// Removes objects that no row names and that are older than the grace period: those of
    /// uploads that crashed between their object write and their row write, those a
    /// re-upload replaced but could not delete, and thumbnails of such versions. Returns how
    /// many it removed.
    pub async fn sweep(&self) -> Result<u64> {
        // List before reading the references: an object written after the listing is not a
        // candidate, and a row written after the reference read names an object younger than
        // the listing's cut-off.
        let cutoff = SystemTime::now()
            .checked_sub(self.orphan_grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let candidates: Vec<ObjectInfo> = self
            .timed(Part::Objects, "list", self.objects.list())
            .await?
            .into_iter()
            .filter(|info| info.modified <= cutoff)
            .collect();
        if candidates.is_empty() {
            return Ok(0);
        }
        let referenced = self
            .timed(
                Part::Database,
                "referenced_objects",
                self.db.referenced_objects(),
            )
            .await?;
        // A thumbnail lives as long as its version's object is referenced.
        let orphans: Vec<String> = candidates
            .into_iter()
            .map(|info| info.key)
            .filter(|key| {
                let version = codec::thumbnail_of(key).unwrap_or(key);
                !referenced.contains(version)
            })
            .collect();
        self.timed(
            Part::Objects,
            "delete_many",
            self.objects.delete_many(&orphans),
        )
        .await?;
        if !orphans.is_empty() {
            tracing::info!(count = orphans.len(), "removed unreferenced objects");
        }
        Ok(orphans.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_the_store_cannot_hold_are_refused_with_the_reason() {
        assert!(check_key("a").is_ok());
        assert!(check_key(&"é".repeat(125)).is_ok());
        for (key, reason) in [
            (String::new(), "empty"),
            ("k".repeat(251), "longer than 250"),
            ("a\0b".to_owned(), "NUL"),
        ] {
            let err = check_key(&key).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        }
    }

    #[test]
    fn content_types_must_be_printable_ascii() {
        assert!(check_content_type("image/svg+xml; charset=utf-8").is_ok());
        for bad in ["", "image/png\r\nX-Evil: 1", "image/pngé", &"a".repeat(256)] {
            assert!(check_content_type(bad).is_err(), "{bad:?}");
        }
    }
}
