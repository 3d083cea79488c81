//! Thumbnails on every backend: made at upload, small and of the image's aspect; replaced
//! with the image at once; gone with delete-all; made on first request for an image stored
//! without one; and the image itself for one no thumbnail can be made of.

use cachepool_test_support::images::photo_png;
use cachepool_test_support::matrix;
use cachepool_test_support::site::{ADMIN, Site, header};
use cachepool_test_support::store::{Db, Objects};

matrix!(thumbnails_follow_uploads_replacements_and_delete_all:
    thumbnails_follow_uploads_replacements_and_delete_all_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
    thumbnails_follow_uploads_replacements_and_delete_all_on_postgres_and_s3 => (Db::Postgres, Objects::S3),
);

matrix!(an_image_stored_without_a_thumbnail_gets_one_on_first_request:
    an_image_stored_without_a_thumbnail_gets_one_on_first_request_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
    an_image_stored_without_a_thumbnail_gets_one_on_first_request_on_postgres_and_s3 => (Db::Postgres, Objects::S3),
);

matrix!(an_image_too_large_to_decode_is_its_own_thumbnail:
    an_image_too_large_to_decode_is_its_own_thumbnail_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
);

/// The status, headers and decoded size of a thumbnail read, and its bytes.
struct Read {
    status: u16,
    content_type: String,
    etag: String,
    x_cache: String,
    cache_control: String,
    bytes: Vec<u8>,
}

impl Read {
    async fn of(site: &Site, key: &str) -> Read {
        let r = site.thumbnail(key).await;
        Read {
            status: r.status().as_u16(),
            content_type: header(&r, "content-type"),
            etag: header(&r, "etag"),
            x_cache: header(&r, "x-cache"),
            cache_control: header(&r, "cache-control"),
            bytes: r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
        }
    }

    /// Width and height of the decoded bytes.
    fn size(&self) -> (u32, u32) {
        let image = image::load_from_memory(&self.bytes)
            .unwrap_or_else(|e| panic!("the thumbnail does not decode: {e}"));
        (image.width(), image.height())
    }
}

async fn thumbnails_follow_uploads_replacements_and_delete_all(db: Db, objects: Objects) {
    let site = Site::start(db, objects).await;
    let landscape = photo_png(1600, 1200, 1);
    let (status, created) = site.put("photo.png", landscape.clone()).await;
    assert_eq!(status, 201, "{created}");
    // The image and its thumbnail, made at the upload.
    assert_eq!(site.stored().await, (1, 2));

    let first = Read::of(&site, "photo.png").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.content_type, "image/jpeg");
    assert_eq!(first.x_cache, "miss");
    assert_eq!(first.cache_control, "no-cache");
    assert_eq!(first.size(), (320, 240));
    assert!(
        first.etag.starts_with('"') && first.etag.len() == 66,
        "{}",
        first.etag
    );
    assert_ne!(first.etag, created["etag"].as_str().unwrap_or_default());
    assert!(
        first.bytes.len() * 20 < landscape.len(),
        "a {}-byte thumbnail of a {}-byte image",
        first.bytes.len(),
        landscape.len()
    );
    // The next read comes from the site's memory, the same bytes.
    let second = Read::of(&site, "photo.png").await;
    assert_eq!((second.status, second.x_cache.as_str()), (200, "local"));
    assert_eq!(
        (second.etag.as_str(), &second.bytes),
        (first.etag.as_str(), &first.bytes)
    );
    // Revalidation.
    let revalidated = site
        .http
        .get(format!("{}/api/v1/images/photo.png/thumbnail", site.url))
        .header("if-none-match", &first.etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 304);
    // The image itself is unchanged by all this.
    let original = site.get("photo.png").await;
    assert_eq!(original.bytes().await.unwrap().to_vec(), landscape);

    // A re-upload: from the moment it returned, the thumbnail is the new image's, although
    // the site's memory and the pool held the old one.
    let (status, _) = site.put("photo.png", photo_png(1200, 1600, 2)).await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        let after = Read::of(&site, "photo.png").await;
        assert_eq!(after.status, 200);
        assert_eq!(after.size(), (240, 320));
        assert_ne!(after.etag, first.etag);
    }
    // The replaced version's thumbnail went with its image.
    assert_eq!(site.stored().await, (1, 2));

    // No image, no thumbnail; a bad key is refused as for the image.
    assert_eq!(Read::of(&site, "nothing.png").await.status, 404);
    assert_eq!(Read::of(&site, ".hidden").await.status, 400);

    // Delete all data: the thumbnail goes with the image, from the caches too.
    let deleted = site.delete_data(Some(&format!("Bearer {ADMIN}"))).await;
    assert_eq!(deleted.status(), 200);
    let body: serde_json::Value = deleted.json().await.unwrap();
    assert_eq!(body["objects"], 1, "{body}");
    assert_eq!(Read::of(&site, "photo.png").await.status, 404);
    assert_eq!(site.stored().await, (0, 0));
    site.stop().await;
}

async fn an_image_stored_without_a_thumbnail_gets_one_on_first_request(db: Db, objects: Objects) {
    let site = Site::start(db, objects).await;
    // As an upload before thumbnails existed stored it: the image alone.
    let bytes = photo_png(1000, 500, 3);
    site.store
        .storage
        .put_image("old.png", bytes.clone().into(), "image/png")
        .await
        .unwrap_or_else(|e| panic!("storing the image: {e}"));
    assert_eq!(site.stored().await, (1, 1));

    let made = Read::of(&site, "old.png").await;
    assert_eq!(made.status, 200);
    assert_eq!(made.x_cache, "miss");
    assert_eq!(made.content_type, "image/jpeg");
    assert_eq!(made.size(), (320, 160));
    // Made once and stored: a site that has never seen it reads the same bytes from the
    // store, without making it again.
    assert_eq!(site.stored().await, (1, 2));
    site.cache
        .invalidate_all()
        .await
        .unwrap_or_else(|e| panic!("clearing the cache: {e}"));
    let again = Read::of(&site, "old.png").await;
    assert_eq!((again.status, again.x_cache.as_str()), (200, "miss"));
    assert_eq!(again.bytes, made.bytes);
    assert_eq!(again.etag, made.etag);
    let metrics = site
        .http
        .get(format!("{}/metrics", site.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\ncachepool_web_thumbnails_made_total 1\n"),
        "{metrics}"
    );
    site.stop().await;
}

/// A PNG whose header claims `width`×`height` over a few real pixels: accepted as an upload
/// (its structure is whole), refused for a thumbnail by its size before any decoding.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = photo_png(4, 4, 9);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    png
}

async fn an_image_too_large_to_decode_is_its_own_thumbnail(db: Db, objects: Objects) {
    let site = Site::start(db, objects).await;
    let bomb = png_claiming(60_000, 60_000);
    let (status, created) = site.put("bomb.png", bomb.clone()).await;
    assert_eq!(status, 201, "{created}");
    // No thumbnail stored.
    assert_eq!(site.stored().await, (1, 1));
    let read = Read::of(&site, "bomb.png").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.content_type, "image/png");
    assert_eq!(read.bytes, bomb);
    assert_eq!(read.etag, created["etag"].as_str().unwrap_or_default());
    let metrics = site
        .http
        .get(format!("{}/metrics", site.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Once at the upload, once at the first read.
    assert!(
        metrics.contains("\ncachepool_web_thumbnails_refused_total{reason=\"dimensions\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ncachepool_web_thumbnails_made_total 0\n"),
        "{metrics}"
    );
    site.stop().await;
}
