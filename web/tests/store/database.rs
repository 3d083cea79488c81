//! The metadata database on real SQLite and real PostgreSQL: migrations, upserts, the
//! newest-first listing and its cursor, deletion, counting, keys no query text may see.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachepool_web::store::{Database, MAX_LIST_LIMIT, NewImage, StoreError};

use cachepool_test_support::matrix;
use cachepool_test_support::store::{Db, TestDb};

/// A row for `key` uploaded `secs` seconds after the epoch, naming object `object`.
fn row<'a>(key: &'a str, secs: u64, object: &'a str) -> NewImage<'a> {
    NewImage {
        key,
        size: 3 + secs,
        content_type: "image/png",
        etag: "etag",
        uploaded_at: UNIX_EPOCH + Duration::from_secs(secs),
        object,
    }
}

/// Every key of a full listing, page by page with `limit`.
async fn all_pages(db: &Database, limit: u32) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = db.list(limit, cursor.as_deref()).await.expect("list");
        assert!(page.items.len() <= limit as usize);
        keys.extend(page.items.into_iter().map(|m| m.key));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return keys,
        }
    }
}

async fn migrations_apply_once_and_again_without_change(kind: Db) {
    let test = TestDb::start(kind).await;
    // `start` migrated once; a second run finds nothing to do and breaks nothing.
    test.db.migrate().await.expect("second migration run");
    assert_eq!(test.db.count().await.unwrap(), 0);
    let raw = test.raw().await;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&raw)
            .await
            .unwrap();
    assert_eq!(applied, [1]);
    raw.close().await;
}

async fn upsert_reports_new_then_replaced_with_the_previous_object(kind: Db) {
    let test = TestDb::start(kind).await;
    let db = &test.db;
    let first = db.upsert(&row("cat", 10, "obj-1")).await.unwrap();
    assert!(first.created);
    assert_eq!(first.meta.generation, 1);
    assert_eq!(first.replaced_object, None);

    let mut second = row("cat", 20, "obj-2");
    second.content_type = "image/webp";
    second.etag = "etag-2";
    let second = db.upsert(&second).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.meta.generation, 2);
    assert_eq!(second.replaced_object.as_deref(), Some("obj-1"));

    let stored = db.get("cat").await.unwrap().expect("row");
    assert_eq!(stored, second.meta);
    assert_eq!(stored.object, "obj-2");
    assert_eq!(stored.content_type, "image/webp");
    assert_eq!(stored.etag, "etag-2");
    assert_eq!(stored.size, 23);
    assert_eq!(stored.uploaded_at, UNIX_EPOCH + Duration::from_secs(20));
    assert_eq!(db.count().await.unwrap(), 1);
    assert_eq!(db.get("dog").await.unwrap(), None);
}

async fn listing_is_newest_first_and_pages_have_no_gaps_or_duplicates(kind: Db) {
    let test = TestDb::start(kind).await;
    let keys: Vec<String> = (0..25).map(|i| format!("img-{i:02}")).collect();
    // Insert in a shuffled order so the listing's order cannot come from insertion order.
    for i in [
        7, 3, 24, 0, 11, 19, 5, 13, 1, 22, 9, 16, 2, 20, 14, 6, 23, 10, 4, 18, 8, 21, 12, 15, 17,
    ] {
        test.db
            .upsert(&row(&keys[i], 1000 + i as u64, "o"))
            .await
            .unwrap();
    }
    let newest_first: Vec<String> = keys.iter().rev().cloned().collect();
    for limit in [1, 7, 25, 26, MAX_LIST_LIMIT] {
        assert_eq!(
            all_pages(&test.db, limit).await,
            newest_first,
            "limit {limit}"
        );
    }
    let first = test.db.list(10, None).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert!(first.next.is_some());
    let exact = test.db.list(25, None).await.unwrap();
    assert_eq!(
        exact.next, None,
        "no next page when the page ends the listing"
    );
}

async fn equal_upload_times_are_ordered_by_key_across_pages(kind: Db) {
    let test = TestDb::start(kind).await;
    let keys = ["b", "a/b", "é", "a", "Z", "a/../a", "b.png"];
    for key in keys {
        test.db.upsert(&row(key, 5, "o")).await.unwrap();
    }
    test.db.upsert(&row("newest", 6, "o")).await.unwrap();
    test.db.upsert(&row("oldest", 4, "o")).await.unwrap();
    let listed = all_pages(&test.db, 2).await;
    assert_eq!(listed.len(), keys.len() + 2);
    assert_eq!(listed.first().map(String::as_str), Some("newest"));
    assert_eq!(listed.last().map(String::as_str), Some("oldest"));
    // The test clusters use bytewise text order (SQLite's BINARY, PostgreSQL's C locale), so
    // the tie-break is exact; a page boundary inside the tie must neither skip nor repeat.
    let mut expected: Vec<&str> = keys.to_vec();
    expected.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    assert_eq!(&listed[1..listed.len() - 1], expected.as_slice());
}

async fn paging_is_stable_while_other_uploads_arrive(kind: Db) {
    let test = TestDb::start(kind).await;
    let before: Vec<String> = (0..40).map(|i| format!("before-{i:02}")).collect();
    let now = SystemTime::now();
    for (i, key) in before.iter().enumerate() {
        let mut new = row(key, 0, "o");
        new.uploaded_at = now - Duration::from_secs(1000 - i as u64);
        test.db.upsert(&new).await.unwrap();
    }

    // Uploads keep arriving on other connections while the listing is paged through.
    let writer_db = test.db.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut written = 0usize;
        while stop_rx.try_recv().is_err() {
            let key = format!("during-{written:04}");
            let new = NewImage {
                uploaded_at: SystemTime::now(),
                ..row(&key, 0, "o")
            };
            writer_db.upsert(&new).await.unwrap();
            written += 1;
            tokio::task::yield_now().await;
        }
        written
    });

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = test.db.list(3, cursor.as_deref()).await.unwrap();
        seen.extend(page.items.into_iter().map(|m| m.key));
        // Let the writer get some uploads in between pages.
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    stop_tx.send(()).unwrap();
    let written = writer.await.unwrap();
    assert!(written > 0, "the writer never ran; the test proves nothing");

    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "a key was listed twice: {seen:?}"
    );
    let from_before: Vec<&String> = seen.iter().filter(|k| k.starts_with("before-")).collect();
    let expected: Vec<&String> = before.iter().rev().collect();
    assert_eq!(
        from_before, expected,
        "every earlier upload exactly once, in order"
    );
}

async fn bad_limits_and_cursors_are_refused_with_what_to_do(kind: Db) {
    let test = TestDb::start(kind).await;
    test.db.upsert(&row("a", 1, "o")).await.unwrap();
    for limit in [0, MAX_LIST_LIMIT + 1] {
        let err = test.db.list(limit, None).await.unwrap_err();
        assert!(
            matches!(err, StoreError::BadLimit(l) if l == limit),
            "{err}"
        );
        assert!(err.to_string().contains("1 to 1000"), "{err}");
    }
    for cursor in [
        "",
        "nothex",
        "0000000000000001zz",
        "'; DROP TABLE images; --",
    ] {
        let err = test.db.list(5, Some(cursor)).await.unwrap_err();
        assert!(matches!(err, StoreError::BadCursor), "{cursor:?}: {err}");
        assert!(err.to_string().contains("`next`"), "{err}");
    }
    assert_eq!(test.db.count().await.unwrap(), 1, "nothing reached the SQL");
}

async fn delete_all_empties_the_table_and_names_every_object(kind: Db) {
    let test = TestDb::start(kind).await;
    test.db.upsert(&row("a", 1, "a-1")).await.unwrap();
    test.db.upsert(&row("a", 2, "a-2")).await.unwrap();
    test.db.upsert(&row("b", 3, "b-1")).await.unwrap();
    assert_eq!(test.db.count().await.unwrap(), 2);
    let referenced = test.db.referenced_objects().await.unwrap();
    assert_eq!(
        referenced,
        HashSet::from(["a-2".to_owned(), "b-1".to_owned()])
    );

    let deleted = test.db.delete_all().await.unwrap();
    assert_eq!(deleted.rows, 2);
    let mut objects = deleted.objects;
    objects.sort();
    assert_eq!(objects, ["a-2", "b-1"]);
    // The replaced "a-1" is named too: if its deletion after the re-upload failed, this is
    // the last chance to find it.
    assert_eq!(deleted.replaced, ["a-1"]);
    assert_eq!(test.db.count().await.unwrap(), 0);
    assert!(test.db.list(10, None).await.unwrap().items.is_empty());
    assert!(test.db.referenced_objects().await.unwrap().is_empty());

    let again = test.db.upsert(&row("a", 4, "a-3")).await.unwrap();
    assert!(
        again.created,
        "a key is new again after everything was deleted"
    );
}

async fn odd_keys_are_data_never_sql(kind: Db) {
    let test = TestDb::start(kind).await;
    let long = "ключ".repeat(31); // 248 bytes
    let keys = [
        "'; DROP TABLE images; --",
        "a\"b\\c",
        "../../etc/passwd",
        "dir/sub/file.png",
        "..",
        "日本語の画像 🖼",
        "$1",
        "%_*?",
        long.as_str(),
    ];
    for (i, key) in keys.iter().enumerate() {
        let created = test.db.upsert(&row(key, i as u64, "o")).await.unwrap();
        assert!(created.created, "{key:?}");
    }
    for key in keys {
        let got = test
            .db
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key:?} lost"));
        assert_eq!(got.key, key);
    }
    assert_eq!(test.db.count().await.unwrap(), keys.len() as u64);
    // LIKE-style patterns match nothing when bound as values.
    assert_eq!(test.db.get("%").await.unwrap(), None);
    let err = test.db.upsert(&row("a\0b", 1, "o")).await.unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}

async fn connection_errors_say_where_without_the_password(kind: Db) {
    let test = TestDb::start(kind).await;
    let url = match kind {
        // A directory where the file should be cannot be opened as a database.
        Db::Sqlite => format!("sqlite://{}", std::env::temp_dir().display()),
        Db::Postgres => test
            .url
            .replace("postgres@", "postgres:hunter2@")
            .replace("/postgres?", "/no_such_database?"),
    };
    let err = Database::connect(&url).await.unwrap_err().to_string();
    assert!(err.starts_with("cannot open the database at"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

matrix!(migrations_apply_once_and_again_without_change:
    migrations_sqlite => (Db::Sqlite), migrations_postgres => (Db::Postgres));
matrix!(upsert_reports_new_then_replaced_with_the_previous_object:
    upsert_sqlite => (Db::Sqlite), upsert_postgres => (Db::Postgres));
matrix!(listing_is_newest_first_and_pages_have_no_gaps_or_duplicates:
    listing_sqlite => (Db::Sqlite), listing_postgres => (Db::Postgres));
matrix!(equal_upload_times_are_ordered_by_key_across_pages:
    ties_sqlite => (Db::Sqlite), ties_postgres => (Db::Postgres));
matrix!(paging_is_stable_while_other_uploads_arrive:
    concurrent_paging_sqlite => (Db::Sqlite), concurrent_paging_postgres => (Db::Postgres));
matrix!(bad_limits_and_cursors_are_refused_with_what_to_do:
    bad_input_sqlite => (Db::Sqlite), bad_input_postgres => (Db::Postgres));
matrix!(delete_all_empties_the_table_and_names_every_object:
    delete_all_sqlite => (Db::Sqlite), delete_all_postgres => (Db::Postgres));
matrix!(odd_keys_are_data_never_sql:
    odd_keys_sqlite => (Db::Sqlite), odd_keys_postgres => (Db::Postgres));
matrix!(connection_errors_say_where_without_the_password:
    connect_error_sqlite => (Db::Sqlite), connect_error_postgres => (Db::Postgres));

/// With the `postgres-tls` feature, connections verify the server's certificate: the URL
/// naming the right CA works over TLS, the same server without that CA is refused.
#[cfg(feature = "postgres-tls")]
#[tokio::test]
async fn postgres_tls_connections_verify_the_server_certificate() {
    let server = cachepool_test_support::servers::Postgres::start_tls();
    let db = Database::connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("TLS connection: {e}"));
    db.migrate().await.unwrap();
    db.upsert(&row("over-tls", 1, "o")).await.unwrap();
    assert_eq!(db.count().await.unwrap(), 1);
    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(server.url()).await.unwrap();
    let encrypted: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl")
            .fetch_one(&raw)
            .await
            .unwrap();
    assert_eq!(encrypted, 1, "the session is encrypted");
    raw.close().await;
    db.close().await;

    // Without the CA, the certificate is checked against the public roots and refused.
    let ca = format!("&sslrootcert={}", server.ca_file().display());
    let unverifiable = server.url().replace(&ca, "");
    assert_ne!(unverifiable, server.url());
    let err = Database::connect(&unverifiable)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
