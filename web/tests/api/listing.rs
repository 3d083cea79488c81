//! The listing's first page as a visitor's browser loads it — the HTML, then every
//! `<img src>` in it — with the full images as thumbnails (the page before thumbnails: each
//! source cut back to the image) and as served (real thumbnails), in one run. Prints the
//! bytes and times (`--nocapture`; the fast check of docs/benchmarks.md §7 "Thumbnails", whose
//! figures come from `cachepool bench thumbnails`) and holds the thumbnails to a tenth of
//! the bytes.

use std::time::{Duration, Instant};

use cachepool_test_support::images::photo_jpeg;
use cachepool_test_support::matrix;
use cachepool_test_support::site::Site;
use cachepool_test_support::store::{Db, Objects};
use cachepool_web::ui::operator::OperatorClient;
use cachepool_web::ui::{Ui, UiConfig};

matrix!(the_listing_with_thumbnails_loads_a_tenth_of_the_bytes:
    the_listing_with_thumbnails_loads_a_tenth_of_the_bytes_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
);

/// The pages without a manager: nobody can log in, and nothing asks the operator.
fn pages() -> Ui {
    Ui::new(UiConfig {
        password_hash: None,
        session_secret: None,
        secure_cookies: false,
        operator: OperatorClient::new("http://127.0.0.1:9", "token", "default", "local")
            .unwrap_or_else(|e| panic!("{e}")),
        trusted_proxies: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The `src` of every `<img>` on the page, in order.
fn image_sources(html: &str) -> Vec<String> {
    html.split("<img")
        .skip(1)
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            let start = tag.find("src=\"")? + 5;
            let len = tag[start..].find('"')?;
            Some(tag[start..start + len].to_owned())
        })
        .collect()
}

/// One load of the first page: images, HTML bytes, image bytes, time.
async fn load(site: &Site, full_images: bool) -> (usize, usize, usize, Duration) {
    let started = Instant::now();
    let html = site
        .http
        .get(format!("{}/", site.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sources = image_sources(&html);
    let mut image_bytes = 0;
    let mut fetched = Vec::new();
    for src in &sources {
        let src = if full_images {
            src.strip_suffix("/thumbnail")
                .unwrap_or_else(|| panic!("{src} is not a thumbnail"))
        } else {
            src
        };
        let r = site
            .http
            .get(format!("{}{src}", site.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{src}");
        let bytes = r.bytes().await.unwrap();
        image_bytes += bytes.len();
        fetched.push(bytes);
    }
    let elapsed = started.elapsed();
    if !full_images {
        // Outside the timed part: a browser decodes while it fetches.
        for bytes in &fetched {
            let thumb = image::load_from_memory(bytes).unwrap();
            assert!(thumb.width().max(thumb.height()) <= 320);
        }
    }
    (sources.len(), html.len(), image_bytes, elapsed)
}

async fn the_listing_with_thumbnails_loads_a_tenth_of_the_bytes(db: Db, objects: Objects) {
    let site = Site::start_with_pages(db, objects, pages()).await;
    let mut uploaded = 0;
    for i in 0..30 {
        let jpeg = photo_jpeg(1600, 1200, i);
        uploaded += jpeg.len();
        assert_eq!(site.put(&format!("photo-{i:03}.jpg"), jpeg).await.0, 201);
    }
    println!(
        "30 photographs of 1600x1200 uploaded, {} KiB on average",
        uploaded / 30 / 1024
    );
    for round in 1..=3 {
        let before = load(&site, true).await;
        let after = load(&site, false).await;
        assert_eq!(before.0, 24, "the first page shows 24 images");
        assert_eq!(after.0, before.0);
        println!(
            "round {round}: full images {} images, {} KiB HTML + {} KiB images in {:?}; \
             thumbnails {} KiB HTML + {} KiB images in {:?}",
            before.0,
            before.1 / 1024,
            before.2 / 1024,
            before.3,
            after.1 / 1024,
            after.2 / 1024,
            after.3
        );
        let (full, thumbs) = (before.1 + before.2, after.1 + after.2);
        assert!(
            thumbs * 10 < full,
            "the page with thumbnails is {thumbs} bytes, with the full images {full}"
        );
    }
    site.stop().await;
}
