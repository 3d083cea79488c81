//! [`Storage`], the database and the object store together: uploads, re-uploads, deletion,
//! and the failures that must leave nothing half-done, on the default pair (SQLite and a
//! local directory) and the production pair (PostgreSQL and S3), plus the crossed pairs
//! where a failure depends on the object store.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cachepool_web::store::{
    Database, Object, ObjectStore, Storage, StoreError, ThumbnailLookup, etag_of,
};

use cachepool_test_support::matrix;
use cachepool_test_support::store::{Db, Objects, TestStorage, image_bytes, s3_config};

async fn upload_then_reupload_replaces_row_and_object(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let storage = &test.storage;
    assert_eq!(storage.get_image("cat").await.unwrap(), None);

    let v1 = image_bytes(1);
    let first = storage
        .put_image("cat", v1.clone(), "image/png")
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.meta.generation, 1);
    assert_eq!(first.meta.size, v1.len() as u64);
    assert_eq!(first.meta.etag, etag_of(&v1));
    let got = storage.get_image("cat").await.unwrap().expect("stored");
    assert_eq!((got.bytes, got.meta), (v1, first.meta.clone()));

    let v2 = image_bytes(2);
    let second = storage
        .put_image("cat", v2.clone(), "image/webp")
        .await
        .unwrap();
    assert!(!second.created);
    assert_eq!(second.meta.generation, 2);
    assert_ne!(second.meta.object, first.meta.object);
    let got = storage.get_image("cat").await.unwrap().expect("replaced");
    assert_eq!(got.bytes, v2);
    assert_eq!(got.meta.content_type, "image/webp");
    assert_eq!(got.meta.etag, etag_of(&v2));
    // The first version's object went with it.
    assert_eq!(
        test.object_keys().await,
        std::slice::from_ref(&second.meta.object)
    );
    assert_eq!(storage.get_meta("cat").await.unwrap(), Some(second.meta));
    assert_eq!(storage.count().await.unwrap(), 1);

    let listed = storage.list(10, None).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].key, "cat");
}

async fn delete_all_removes_rows_and_objects(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let storage = &test.storage;
    for i in 0..5 {
        storage
            .put_image(&format!("img/{i}/../x"), image_bytes(i), "image/png")
            .await
            .unwrap();
    }
    storage
        .put_image("img/0/../x", image_bytes(9), "image/png")
        .await
        .unwrap();
    assert_eq!(test.object_keys().await.len(), 5);

    let deleted = storage.delete_all().await.unwrap();
    assert_eq!(deleted.rows, 5);
    assert_eq!(deleted.objects, 5);
    assert_eq!(storage.count().await.unwrap(), 0);
    assert!(test.object_keys().await.is_empty());
    assert_eq!(storage.get_image("img/1/../x").await.unwrap(), None);
    assert!(storage.list(10, None).await.unwrap().items.is_empty());
}

/// Makes the object store refuse writes: the local directory becomes a file; for S3 the
/// storage is rebuilt on a bucket that does not exist.
async fn break_object_writes(test: &TestStorage) -> Storage {
    match test.objects.kind {
        Objects::Local => {
            let objects = test.objects.dir.path().join("store/objects");
            fs::remove_dir_all(&objects).unwrap();
            fs::write(&objects, "in the way").unwrap();
            test.storage.clone()
        }
        Objects::S3 => {
            let missing = ObjectStore::s3(s3_config(test.objects.moto(), "no-such-bucket"))
                .await
                .unwrap();
            Storage::new(test.db.db.clone(), missing)
        }
    }
}

async fn a_failed_object_write_leaves_no_row(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let v1 = image_bytes(1);
    let first = test
        .storage
        .put_image("kept", v1, "image/png")
        .await
        .unwrap();
    let broken = break_object_writes(&test).await;

    let err = broken
        .put_image("new", image_bytes(2), "image/png")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Local { .. } | StoreError::S3 { .. }),
        "{err}"
    );
    let err = broken
        .put_image("kept", image_bytes(3), "image/png")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Local { .. } | StoreError::S3 { .. }),
        "{err}"
    );

    let db = &test.db.db;
    assert_eq!(
        db.get("new").await.unwrap(),
        None,
        "no row for a failed first upload"
    );
    assert_eq!(
        db.get("kept").await.unwrap(),
        Some(first.meta),
        "a failed re-upload leaves the previous row as it was"
    );
    assert_eq!(db.count().await.unwrap(), 1);
}

/// Makes the database refuse image writes while reads still work: a trigger that aborts
/// every insert and update of `images`.
async fn break_row_writes(test: &TestStorage, db: Db) {
    let raw = test.db.raw().await;
    let statements: &[&'static str] = match db {
        Db::Sqlite => &[
            "CREATE TRIGGER refuse_insert BEFORE INSERT ON images \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            "CREATE TRIGGER refuse_update BEFORE UPDATE ON images \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        ],
        Db::Postgres => &[
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON images \
             FOR EACH ROW EXECUTE FUNCTION refuse()",
        ],
    };
    for &statement in statements {
        sqlx::raw_sql(statement).execute(&raw).await.unwrap();
    }
    raw.close().await;
}

async fn a_failed_row_write_leaves_no_reachable_object(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let storage = &test.storage;
    let v1 = image_bytes(1);
    let first = storage
        .put_image("kept", v1.clone(), "image/png")
        .await
        .unwrap();
    break_row_writes(&test, db).await;

    let err = storage
        .put_image("new", image_bytes(2), "image/png")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    let err = storage
        .put_image("kept", image_bytes(3), "image/png")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");

    assert_eq!(storage.get_image("new").await.unwrap(), None);
    let kept = storage
        .get_image("kept")
        .await
        .unwrap()
        .expect("previous version");
    assert_eq!((kept.bytes, kept.meta), (v1, first.meta.clone()));
    // The failed uploads' objects were deleted again: only the kept version's remains.
    assert_eq!(test.object_keys().await, [first.meta.object]);
}

async fn an_unreachable_database_leaves_an_orphan_for_the_sweep(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let kept = test
        .storage
        .put_image("kept", image_bytes(1), "image/png")
        .await
        .unwrap();

    // A database that fails every call, even the check of whether the row was written: the
    // new object cannot be judged, so it stays, unreferenced.
    let closed = Database::connect(&test.db.url).await.unwrap();
    closed.close().await;
    let cut_off = Storage::new(closed, test.storage.objects().clone());
    let err = cut_off
        .put_image("lost", image_bytes(2), "image/png")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Query { .. }), "{err}");
    assert_eq!(test.object_keys().await.len(), 2);
    assert_eq!(
        test.storage.get_image("lost").await.unwrap(),
        None,
        "unreachable"
    );

    // Younger than the grace period: a sweep cannot tell it from an upload in flight.
    assert_eq!(test.storage.sweep().await.unwrap(), 0);
    let eager = test.storage.clone().with_orphan_grace(Duration::ZERO);
    assert_eq!(eager.sweep().await.unwrap(), 1);
    assert_eq!(test.object_keys().await, [kept.meta.object]);
    assert!(test.storage.get_image("kept").await.unwrap().is_some());
}

async fn a_sweep_cannot_read_references_so_deletes_nothing(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    test.storage
        .put_image("kept", image_bytes(1), "image/png")
        .await
        .unwrap();
    let raw = test.db.raw().await;
    sqlx::raw_sql("DROP TABLE images")
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let eager = test.storage.clone().with_orphan_grace(Duration::ZERO);
    let err = eager.sweep().await.unwrap_err();
    assert!(matches!(err, StoreError::Query { .. }), "{err}");
    assert_eq!(
        test.object_keys().await.len(),
        1,
        "no reference list, no deletion"
    );
}

async fn concurrent_reuploads_end_with_one_consistent_row_and_object(db: Db, objects: Objects) {
    const WRITERS: usize = 12;
    let test = TestStorage::start(db, objects).await;
    let storage = Arc::new(test.storage.clone());
    storage
        .put_image("hot", image_bytes(0), "image/png")
        .await
        .unwrap();

    // Readers run throughout: every read must find an object matching its row.
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (storage, done, reads) = (storage.clone(), done.clone(), reads.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    let image = storage
                        .get_image("hot")
                        .await
                        .unwrap()
                        .expect("never absent");
                    assert_eq!(
                        etag_of(&image.bytes),
                        image.meta.etag,
                        "bytes match the row"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let writers: Vec<_> = (1..=WRITERS)
        .map(|n| {
            let storage = storage.clone();
            tokio::spawn(async move {
                storage
                    .put_image("hot", image_bytes(n), "image/png")
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for writer in writers {
        outcomes.push(writer.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 0);

    // Each writer saw its own generation, all distinct: the database serialised them.
    let mut generations: Vec<u64> = outcomes.iter().map(|o| o.meta.generation).collect();
    generations.sort_unstable();
    assert_eq!(generations, (2..=WRITERS as u64 + 1).collect::<Vec<_>>());
    assert!(outcomes.iter().all(|o| !o.created));

    let row = storage.get_meta("hot").await.unwrap().expect("row");
    assert_eq!(row.generation, WRITERS as u64 + 1);
    let last = outcomes
        .iter()
        .find(|o| o.meta.generation == row.generation)
        .unwrap();
    assert_eq!(row, last.meta, "the row is the last writer's");
    let image = storage.get_image("hot").await.unwrap().unwrap();
    assert_eq!(etag_of(&image.bytes), row.etag);
    // Every replaced version's object was deleted by the upload that replaced it.
    assert_eq!(test.object_keys().await, [row.object]);
}

fn thumbnail(n: u8) -> Object {
    Object {
        bytes: vec![0xFF, 0xD8, n, 0xFF, 0xD9].into(),
        content_type: "image/jpeg".into(),
    }
}

async fn thumbnails_live_and_die_with_their_version(db: Db, objects: Objects) {
    let test = TestStorage::start(db, objects).await;
    let storage = test.storage.clone().with_orphan_grace(Duration::ZERO);
    assert_eq!(storage.get_thumbnail("cat").await.unwrap(), None);

    // Stored with the image: found as stored.
    let first = storage
        .put_image_with_thumbnail("cat", image_bytes(1), "image/png", Some(thumbnail(1)))
        .await
        .unwrap();
    assert_eq!(test.object_keys().await.len(), 2);
    let Some(ThumbnailLookup::Stored { meta, thumbnail: t }) =
        storage.get_thumbnail("cat").await.unwrap()
    else {
        panic!("the thumbnail stored with the image is not found");
    };
    assert_eq!((meta, t), (first.meta.clone(), thumbnail(1)));
    // A sweep keeps it: its version is referenced.
    assert_eq!(storage.sweep().await.unwrap(), 0);
    assert_eq!(test.object_keys().await.len(), 2);

    // A re-upload without one: the old thumbnail goes with the old object; the lookup
    // answers the new image to make one of.
    let second = storage
        .put_image("cat", image_bytes(2), "image/png")
        .await
        .unwrap();
    assert_eq!(
        test.object_keys().await,
        std::slice::from_ref(&second.meta.object)
    );
    let Some(ThumbnailLookup::Missing(image)) = storage.get_thumbnail("cat").await.unwrap() else {
        panic!("a version without a thumbnail is not reported as missing one");
    };
    assert_eq!(image.bytes, image_bytes(2));
    storage
        .put_thumbnail(&second.meta, thumbnail(2).bytes, "image/jpeg")
        .await
        .unwrap();
    assert!(matches!(
        storage.get_thumbnail("cat").await.unwrap(),
        Some(ThumbnailLookup::Stored { thumbnail: t, .. }) if t == thumbnail(2)
    ));

    // A thumbnail made for a version replaced meanwhile is an orphan: swept.
    storage
        .put_thumbnail(&first.meta, thumbnail(3).bytes, "image/jpeg")
        .await
        .unwrap();
    assert_eq!(test.object_keys().await.len(), 3);
    assert_eq!(storage.sweep().await.unwrap(), 1);
    assert_eq!(test.object_keys().await.len(), 2);

    // Deleting it makes the lookup report it missing again.
    storage.delete_thumbnail(&second.meta).await.unwrap();
    assert!(matches!(
        storage.get_thumbnail("cat").await.unwrap(),
        Some(ThumbnailLookup::Missing(_))
    ));

    // Delete all: images and thumbnails, counted as images.
    storage
        .put_thumbnail(&second.meta, thumbnail(4).bytes, "image/jpeg")
        .await
        .unwrap();
    storage
        .put_image_with_thumbnail("dog", image_bytes(5), "image/png", Some(thumbnail(5)))
        .await
        .unwrap();
    assert_eq!(test.object_keys().await.len(), 4);
    let deleted = storage.delete_all().await.unwrap();
    assert_eq!((deleted.rows, deleted.objects), (2, 2));
    assert!(test.object_keys().await.is_empty());
    assert_eq!(storage.get_thumbnail("dog").await.unwrap(), None);
}

matrix!(thumbnails_live_and_die_with_their_version:
    thumbnails_sqlite_local => (Db::Sqlite, Objects::Local),
    thumbnails_postgres_s3 => (Db::Postgres, Objects::S3));
matrix!(upload_then_reupload_replaces_row_and_object:
    reupload_sqlite_local => (Db::Sqlite, Objects::Local),
    reupload_postgres_s3 => (Db::Postgres, Objects::S3));
matrix!(delete_all_removes_rows_and_objects:
    delete_all_sqlite_local => (Db::Sqlite, Objects::Local),
    delete_all_postgres_s3 => (Db::Postgres, Objects::S3));
matrix!(a_failed_object_write_leaves_no_row:
    failed_object_write_sqlite_local => (Db::Sqlite, Objects::Local),
    failed_object_write_postgres_s3 => (Db::Postgres, Objects::S3),
    failed_object_write_sqlite_s3 => (Db::Sqlite, Objects::S3),
    failed_object_write_postgres_local => (Db::Postgres, Objects::Local));
matrix!(a_failed_row_write_leaves_no_reachable_object:
    failed_row_write_sqlite_local => (Db::Sqlite, Objects::Local),
    failed_row_write_postgres_s3 => (Db::Postgres, Objects::S3),
    failed_row_write_sqlite_s3 => (Db::Sqlite, Objects::S3),
    failed_row_write_postgres_local => (Db::Postgres, Objects::Local));
matrix!(an_unreachable_database_leaves_an_orphan_for_the_sweep:
    orphan_sweep_sqlite_local => (Db::Sqlite, Objects::Local),
    orphan_sweep_postgres_s3 => (Db::Postgres, Objects::S3));
matrix!(a_sweep_cannot_read_references_so_deletes_nothing:
    blind_sweep_sqlite_local => (Db::Sqlite, Objects::Local),
    blind_sweep_postgres_s3 => (Db::Postgres, Objects::S3));
matrix!(concurrent_reuploads_end_with_one_consistent_row_and_object:
    concurrent_reuploads_sqlite_local => (Db::Sqlite, Objects::Local),
    concurrent_reuploads_postgres_s3 => (Db::Postgres, Objects::S3),
    concurrent_reuploads_sqlite_s3 => (Db::Sqlite, Objects::S3),
    concurrent_reuploads_postgres_local => (Db::Postgres, Objects::Local));
