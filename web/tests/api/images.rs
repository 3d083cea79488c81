//! What the API does with good requests, on every backend: upload, re-upload, view (miss,
//! hit, revalidation), list in pages, and delete all data.

use cachepool_test_support::matrix;
use cachepool_test_support::site::{ADMIN, Site, gif, header, keys_of};
use cachepool_test_support::store::{Db, Objects};

matrix!(upload_view_replace_list_and_delete_all:
    upload_view_replace_list_and_delete_all_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
    upload_view_replace_list_and_delete_all_on_postgres_and_s3 => (Db::Postgres, Objects::S3),
);

async fn upload_view_replace_list_and_delete_all(db: Db, objects: Objects) {
    let site = Site::start(db, objects).await;

    // Upload: 201 with the image's description.
    let (status, created) = site.put("cat.gif", gif(1)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["key"], "cat.gif");
    assert_eq!(created["contentType"], "image/gif");
    assert_eq!(created["size"], gif(1).len());
    let etag = created["etag"].as_str().unwrap_or_default().to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() == 66,
        "{etag}"
    );
    let uploaded_at = created["uploadedAt"].as_str().unwrap_or_default();
    assert!(uploaded_at.parse::<jiff::Timestamp>().is_ok(), "{created}");
    // The image and its thumbnail.
    assert_eq!(site.stored().await, (1, 2));

    // View: a miss fills the pool (and the in-process cache), the next read is served from
    // the site's memory; both serve the bytes.
    let first = site.get("cat.gif").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "miss");
    assert_eq!(header(&first, "content-type"), "image/gif");
    assert_eq!(header(&first, "etag"), etag);
    assert_eq!(header(&first, "x-content-type-options"), "nosniff");
    assert_eq!(first.bytes().await.unwrap().to_vec(), gif(1));
    let second = site.get("cat.gif").await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-cache"), "local");
    assert_eq!(header(&second, "etag"), etag);
    assert_eq!(second.bytes().await.unwrap().to_vec(), gif(1));

    // Revalidation: the current ETag answers 304 without the bytes.
    let revalidated = site
        .http
        .get(format!("{}/api/v1/images/cat.gif", site.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);
    assert_eq!(header(&revalidated, "etag"), etag);
    assert!(revalidated.bytes().await.unwrap().is_empty());

    // Re-upload: 200, and from the moment it returned every read serves the new bytes,
    // although the pool held the old ones.
    let (status, replaced) = site.put("cat.gif", gif(2)).await;
    assert_eq!(status, 200, "{replaced}");
    let new_etag = replaced["etag"].as_str().unwrap_or_default().to_owned();
    assert_ne!(new_etag, etag);
    for _ in 0..5 {
        let after = site.get("cat.gif").await;
        assert_eq!(after.status(), 200);
        assert_eq!(header(&after, "etag"), new_etag);
        assert_eq!(after.bytes().await.unwrap().to_vec(), gif(2));
    }
    // The old ETag no longer revalidates.
    let stale = site
        .http
        .get(format!("{}/api/v1/images/cat.gif", site.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.bytes().await.unwrap().to_vec(), gif(2));
    // The replaced object is gone from the object store, and its thumbnail with it.
    assert_eq!(site.stored().await, (1, 2));

    // List: newest first, in pages joined by the cursor.
    assert_eq!(site.put("dog.gif", gif(3)).await.0, 201);
    assert_eq!(site.put("bird.gif", gif(4)).await.0, 201);
    assert_eq!(site.listed_keys().await, ["bird.gif", "dog.gif", "cat.gif"]);
    let (status, page1) = site.get_json("/api/v1/images?limit=2").await;
    assert_eq!(status, 200, "{page1}");
    assert_eq!(keys_of(&page1), ["bird.gif", "dog.gif"]);
    assert_eq!(page1["items"][0]["contentType"], "image/gif");
    assert_eq!(page1["items"][0]["size"], gif(4).len());
    let next = page1["next"].as_str().expect("a second page").to_owned();
    let (status, page2) = site
        .get_json(&format!("/api/v1/images?limit=2&cursor={next}"))
        .await;
    assert_eq!(status, 200, "{page2}");
    assert_eq!(keys_of(&page2), ["cat.gif"]);
    assert_eq!(page2["items"][0]["etag"], new_etag);
    assert!(page2["next"].is_null(), "{page2}");

    // Delete all data with the admin token: rows, objects and the pool's copies go.
    let deleted = site.delete_data(Some(&format!("Bearer {ADMIN}"))).await;
    assert_eq!(deleted.status(), 200);
    let body: serde_json::Value = deleted.json().await.unwrap();
    assert_eq!(body["rows"], 3, "{body}");
    assert_eq!(body["objects"], 3, "{body}");
    assert_eq!(body["cacheFlushed"], true, "{body}");
    for key in ["cat.gif", "dog.gif", "bird.gif"] {
        assert_eq!(site.get(key).await.status(), 404, "{key}");
    }
    assert!(site.listed_keys().await.is_empty());
    assert_eq!(site.stored().await, (0, 0));
    // The site works on after it.
    assert_eq!(site.put("cat.gif", gif(5)).await.0, 201);
    assert_eq!(
        site.get("cat.gif").await.bytes().await.unwrap().to_vec(),
        gif(5)
    );
    site.stop().await;
}
