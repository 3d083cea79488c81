//! `/metrics` on every backend: the database, object store and pool latencies of an upload,
//! a miss and a hit appear under their operations, and the pool's hits and misses are
//! counted.

use cachepool_test_support::matrix;
use cachepool_test_support::site::{Site, gif};
use cachepool_test_support::store::{Db, Objects};
use cachepool_web::cache::CacheConfig;

matrix!(metrics_show_store_latency_and_pool_hits:
    metrics_show_store_latency_and_pool_hits_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
    metrics_show_store_latency_and_pool_hits_on_postgres_and_s3 => (Db::Postgres, Objects::S3),
);

/// The value of one series in OpenMetrics text (0 when absent), checking every sample parses.
fn value(text: &str, series: &str) -> f64 {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let mut found = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, v) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line}"));
        let v: f64 = v.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        if name == series {
            found = v;
        }
    }
    found
}

async fn scrape(site: &Site) -> String {
    let r = site
        .http
        .get(format!("{}/metrics", site.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(r.status(), 200);
    r.text()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
}

async fn metrics_show_store_latency_and_pool_hits(db: Db, objects: Objects) {
    // The in-process cache off: every read asks the pool (web/tests/replicas.rs counts the
    // in-process cache's reads).
    let site = Site::start_with_cache(db, objects, CacheConfig::default()).await;
    let before = scrape(&site).await;
    let db_upsert = r#"cachepool_web_db_duration_seconds_count{operation="upsert"}"#;
    let db_get = r#"cachepool_web_db_duration_seconds_count{operation="get"}"#;
    let obj_put = r#"cachepool_web_object_store_duration_seconds_count{operation="put"}"#;
    let obj_get = r#"cachepool_web_object_store_duration_seconds_count{operation="get"}"#;
    for series in [db_upsert, db_get, obj_put, obj_get] {
        assert_eq!(value(&before, series), 0.0, "{series}");
    }

    assert_eq!(site.put("cat.gif", gif(1)).await.0, 201);
    assert_eq!(site.get("cat.gif").await.status(), 200); // miss: database and object store
    assert_eq!(site.get("cat.gif").await.status(), 200); // hit: neither
    let text = scrape(&site).await;
    assert_eq!(value(&text, db_upsert), 1.0, "{text}");
    // The image and its thumbnail.
    assert_eq!(value(&text, obj_put), 2.0, "{text}");
    assert_eq!(
        value(&text, "cachepool_web_thumbnails_made_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "cachepool_web_thumbnail_make_duration_seconds_count"),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, db_get), 1.0, "{text}");
    assert_eq!(value(&text, obj_get), 1.0, "{text}");
    assert!(
        value(
            &text,
            r#"cachepool_web_object_store_duration_seconds_sum{operation="put"}"#
        ) > 0.0,
        "{text}"
    );
    // The pool: a get per read, the fill's add.
    assert_eq!(
        value(
            &text,
            r#"cachepool_web_pool_request_duration_seconds_count{operation="get"}"#
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"cachepool_web_pool_request_duration_seconds_count{operation="add"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "cachepool_web_pool_hits_total"), 1.0, "{text}");
    assert_eq!(
        value(&text, "cachepool_web_pool_misses_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "cachepool_web_pool_fills_total"),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "cachepool_web_views_total"), 2.0, "{text}");
    assert_eq!(
        value(
            &text,
            r#"cachepool_web_http_requests_total{method="GET",route="/api/v1/images/{key}",status="2xx"}"#
        ),
        2.0,
        "{text}"
    );
    site.stop().await;
}
