//! Image metadata in SQL: SQLite by default, PostgreSQL in production, chosen by the URL at
//! run time.
//!
//! Both go through sqlx's `Any` driver, so there is one copy of each query and one set of
//! migrations, and the SQL is the dialect both accept: `$N` placeholders (SQLite takes them
//! too), `INSERT .. ON CONFLICT .. DO UPDATE .. RETURNING`, row-value comparison for the
//! keyset cursor, integers for times. Every value is a bound parameter; query text is
//! `&'static str` only, which sqlx 0.9 enforces.
//!
//! The migrations in `web/migrations` are embedded with `include_str!` rather than sqlx's
//! `migrate!` macro, which needs sqlx's `macros` feature and with it a second build of both
//! database drivers for the proc macro. [`Migration::new`] computes the same checksum as the
//! macro, so a database migrated either way accepts the other; a unit test keeps the list
//! and the directory in step.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use sqlx::AnyPool;
use sqlx::SqlSafeStr;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::codec::{decode_cursor, encode_cursor, from_micros, to_micros};
use super::{ImageMeta, MAX_LIST_LIMIT, Page, Result, StoreError, check_key};

/// The migrations in `web/migrations`, in order: version, description, SQL.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "images",
    include_str!("../../migrations/0001_images.sql"),
)];

/// Which database a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend a URL names.
    pub fn of_url(url: &str) -> Result<Self> {
        let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(StoreError::UnsupportedDatabase {
                scheme: scheme.to_owned(),
            }),
        }
    }

    /// Connections per pool. SQLite serialises writers, so more connections only add lock
    /// waits; PostgreSQL's default of 100 connections is shared by every replica.
    fn max_connections(self) -> u32 {
        match self {
            Self::Sqlite => 4,
            Self::Postgres => 10,
        }
    }
}

/// A new version of an image, as [`Database::upsert`] writes it.
#[derive(Debug, Clone, Copy)]
pub struct NewImage<'a> {
    /// The image key.
    pub key: &'a str,
    /// Bytes in the object store.
    pub size: u64,
    /// Content type of the bytes.
    pub content_type: &'a str,
    /// Lowercase hex SHA-256 of the bytes.
    pub etag: &'a str,
    /// Upload time.
    pub uploaded_at: SystemTime,
    /// Object holding the bytes, already written.
    pub object: &'a str,
}

/// What [`Database::upsert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upserted {
    /// The row as written.
    pub meta: ImageMeta,
    /// True when the key had no row before.
    pub created: bool,
    /// The object the previous row named, which nothing references any more.
    pub replaced_object: Option<String>,
}

/// What [`Database::delete_all`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeletedRows {
    /// Rows deleted.
    pub rows: u64,
    /// The objects those rows named.
    pub objects: Vec<String>,
    /// Objects the rows' last re-uploads replaced: normally deleted already, named again in
    /// case that deletion failed.
    pub replaced: Vec<String>,
}

/// The image metadata database: a connection pool and the queries on it.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
}

/// Columns of [`ImageMeta`] in query order.
type MetaRow = (String, i64, String, String, i64, i64, String);

/// A query reading [`MetaRow`]s, `tail` appended; a macro so the result is still a literal
/// (sqlx 0.9 takes only `&'static str` query text).
macro_rules! select_meta {
    ($tail:literal) => {
        concat!(
            "SELECT key, size, content_type, etag, uploaded_at, generation, object FROM images",
            $tail
        )
    };
}

impl Database {
    /// Connects to `url`: `sqlite://PATH` (the file is created when missing; its directory
    /// must exist) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`. Does not migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = Backend::of_url(url)?;
        sqlx::any::install_default_drivers();
        let url = match backend {
            Backend::Sqlite => sqlite_url_creating(url),
            Backend::Postgres => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(backend.max_connections())
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .map_err(|source| StoreError::Connect {
                target: redact_url(&url),
                source,
            })?;
        if backend == Backend::Sqlite {
            // Readers no longer wait for the writer; persistent in the file, so the pool's
            // later connections open in WAL mode too. Set now, while the pool has one
            // connection, because switching needs the database to itself.
            sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_all(&pool)
                .await
                .map_err(|source| StoreError::Query {
                    op: "switch to WAL mode",
                    source,
                })?;
        }
        Ok(Self { pool, backend })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the embedded migrations that the database has not seen yet.
    pub async fn migrate(&self) -> Result<()> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Writes a new version of an image: inserts the row, or replaces the existing one and
    /// increments its generation. One statement, so two concurrent writers of one key are
    /// serialised by the database and each learns exactly which object it replaced.
    pub async fn upsert(&self, new: &NewImage<'_>) -> Result<Upserted> {
        check_key(new.key)?;
        let size = i64::try_from(new.size).map_err(|_| StoreError::BadRow {
            key: new.key.to_owned(),
            what: "size",
            value: i64::MAX,
        })?;
        let uploaded_at = to_micros(new.uploaded_at);
        // In both dialects the SET expressions read the row as it was before the update, so
        // `replaced_object` receives the previous `object`.
        let (generation, replaced_object): (i64, Option<String>) = sqlx::query_as(
            "INSERT INTO images \
                 (key, size, content_type, etag, uploaded_at, generation, object, replaced_object) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, NULL) \
             ON CONFLICT (key) DO UPDATE SET \
                 size = excluded.size, \
                 content_type = excluded.content_type, \
                 etag = excluded.etag, \
                 uploaded_at = excluded.uploaded_at, \
                 generation = images.generation + 1, \
                 replaced_object = images.object, \
                 object = excluded.object \
             RETURNING generation, replaced_object",
        )
        .bind(new.key)
        .bind(size)
        .bind(new.content_type)
        .bind(new.etag)
        .bind(uploaded_at)
        .bind(new.object)
        .fetch_one(&self.pool)
        .await
        .map_err(|source| StoreError::Query {
            op: "upsert of an image",
            source,
        })?;
        let meta = meta_from_row((
            new.key.to_owned(),
            size,
            new.content_type.to_owned(),
            new.etag.to_owned(),
            uploaded_at,
            generation,
            new.object.to_owned(),
        ))?;
        Ok(Upserted {
            created: meta.generation == 1,
            meta,
            replaced_object,
        })
    }

    /// The row of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<ImageMeta>> {
        let row: Option<MetaRow> = sqlx::query_as(select_meta!(" WHERE key = $1"))
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|source| StoreError::Query {
                op: "read of an image",
                source,
            })?;
        row.map(meta_from_row).transpose()
    }

    /// Up to `limit` rows, newest first (ties broken by key, descending), after `cursor`.
    ///
    /// The cursor names the last row of the previous page, so rows inserted meanwhile (which
    /// are newer, hence before it) do not shift the pages after it: paging sees every row
    /// that existed when it started exactly once, unless that row was re-uploaded meanwhile
    /// (it then moves to the front).
    pub async fn list(&self, limit: u32, cursor: Option<&str>) -> Result<Page> {
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(StoreError::BadLimit(limit));
        }
        // One more row than asked tells whether a next page exists.
        let fetch = i64::from(limit) + 1;
        let rows: Vec<MetaRow> = match cursor {
            None => {
                sqlx::query_as(select_meta!(
                    " ORDER BY uploaded_at DESC, key DESC LIMIT $1"
                ))
                .bind(fetch)
                .fetch_all(&self.pool)
                .await
            }
            Some(cursor) => {
                let (uploaded_at, key) = decode_cursor(cursor).ok_or(StoreError::BadCursor)?;
                sqlx::query_as(select_meta!(
                    " WHERE (uploaded_at, key) < ($1, $2) \
                      ORDER BY uploaded_at DESC, key DESC LIMIT $3"
                ))
                .bind(uploaded_at)
                .bind(key)
                .bind(fetch)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|source| StoreError::Query {
            op: "listing of images",
            source,
        })?;

        let more = rows.len() > limit as usize;
        let mut items = rows
            .into_iter()
            .map(meta_from_row)
            .collect::<Result<Vec<_>>>()?;
        items.truncate(limit as usize);
        let next = match items.last() {
            Some(last) if more => Some(encode_cursor(to_micros(last.uploaded_at), &last.key)),
            _ => None,
        };
        Ok(Page { items, next })
    }

    /// Number of images.
    pub async fn count(&self) -> Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM images")
            .fetch_one(&self.pool)
            .await
            .map_err(|source| StoreError::Query {
                op: "count of images",
                source,
            })?;
        Ok(count.unsigned_abs())
    }

    /// Deletes every row and returns the objects they named.
    pub async fn delete_all(&self) -> Result<DeletedRows> {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("DELETE FROM images RETURNING object, replaced_object")
                .fetch_all(&self.pool)
                .await
                .map_err(|source| StoreError::Query {
                    op: "deletion of all images",
                    source,
                })?;
        let mut deleted = DeletedRows {
            rows: rows.len() as u64,
            ..DeletedRows::default()
        };
        for (object, replaced) in rows {
            deleted.objects.push(object);
            deleted.replaced.extend(replaced);
        }
        Ok(deleted)
    }

    /// Every object a row currently names.
    pub async fn referenced_objects(&self) -> Result<HashSet<String>> {
        let objects: Vec<String> = sqlx::query_scalar("SELECT object FROM images")
            .fetch_all(&self.pool)
            .await
            .map_err(|source| StoreError::Query {
                op: "read of referenced objects",
                source,
            })?;
        Ok(objects.into_iter().collect())
    }
}

/// The embedded migrations as sqlx's migrator.
fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

fn meta_from_row(row: MetaRow) -> Result<ImageMeta> {
    let (key, size, content_type, etag, uploaded_at, generation, object) = row;
    let size = u64::try_from(size).map_err(|_| StoreError::BadRow {
        key: key.clone(),
        what: "size",
        value: size,
    })?;
    let generation = u64::try_from(generation)
        .ok()
        .filter(|&g| g >= 1)
        .ok_or_else(|| StoreError::BadRow {
            key: key.clone(),
            what: "generation",
            value: generation,
        })?;
    Ok(ImageMeta {
        key,
        size,
        content_type,
        etag,
        uploaded_at: from_micros(uploaded_at),
        generation,
        object,
    })
}

/// A SQLite URL that creates the file when missing, unless the URL sets a mode itself.
fn sqlite_url_creating(url: &str) -> String {
    match url.split_once('?') {
        Some((_, query)) if query.split('&').any(|pair| pair.starts_with("mode=")) => {
            url.to_owned()
        }
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    }
}

/// `url` fit for logs and error messages: without user, password or query (which may carry
/// a password too).
fn redact_url(url: &str) -> String {
    let without_query = url.split_once('?').map_or(url, |(base, _)| base);
    let Some((scheme, rest)) = without_query.split_once("://") else {
        return without_query.to_owned();
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://…@{host}{path}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_embedded_verbatim_and_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<(i64, String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                let stem = name.strip_suffix(".sql").unwrap_or_else(|| {
                    panic!("{name}: migrations are VERSION_DESCRIPTION.sql files")
                });
                let (version, description) = stem.split_once('_').unwrap();
                let sql = std::fs::read_to_string(&path).unwrap();
                (version.parse().unwrap(), description.to_owned(), sql)
            })
            .collect();
        files.sort();
        let embedded: Vec<(i64, String, String)> = MIGRATIONS
            .iter()
            .map(|&(v, d, s)| (v, d.to_owned(), s.to_owned()))
            .collect();
        assert_eq!(
            embedded, files,
            "web/migrations and MIGRATIONS in store/db.rs differ: embed each new file"
        );
    }

    #[test]
    fn backend_follows_the_url_scheme() {
        assert_eq!(Backend::of_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::of_url("sqlite:x.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::of_url("postgres://u@h/d").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::of_url("postgresql://u@h/d").unwrap(),
            Backend::Postgres
        );
        let err = Backend::of_url("mysql://u@h/d").unwrap_err().to_string();
        assert!(
            err.contains("\"mysql\"") && err.contains("sqlite://PATH"),
            "{err}"
        );
    }

    #[test]
    fn sqlite_urls_create_the_file_unless_a_mode_is_set() {
        assert_eq!(
            sqlite_url_creating("sqlite:///d/a.db"),
            "sqlite:///d/a.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url_creating("sqlite:///d/a.db?cache=shared"),
            "sqlite:///d/a.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            sqlite_url_creating("sqlite:///d/a.db?mode=ro"),
            "sqlite:///d/a.db?mode=ro"
        );
    }

    #[test]
    fn redacted_urls_keep_no_credentials() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.internal:5432/images?password=x"),
            "postgres://…@db.internal:5432/images"
        );
        assert_eq!(redact_url("postgres://db/images"), "postgres://db/images");
        assert_eq!(
            redact_url("sqlite:///var/lib/x.db?mode=rwc"),
            "sqlite:///var/lib/x.db"
        );
    }

    #[test]
    fn rows_with_impossible_values_are_reported() {
        let row = |size, generation| {
            (
                "k".to_owned(),
                size,
                "image/png".to_owned(),
                "e".to_owned(),
                0,
                generation,
                "o".to_owned(),
            )
        };
        assert!(meta_from_row(row(1, 1)).is_ok());
        assert!(matches!(
            meta_from_row(row(-1, 1)),
            Err(StoreError::BadRow { what: "size", .. })
        ));
        assert!(matches!(
            meta_from_row(row(1, 0)),
            Err(StoreError::BadRow {
                what: "generation",
                ..
            })
        ));
    }
}
