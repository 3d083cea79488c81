//! Every request the API refuses, on every backend, with its status code, error code, field
//! and message; and that none of them stored or deleted anything.

use cachepool_test_support::matrix;
use cachepool_test_support::site::{ADMIN, Site, assert_error, gif, header};
use cachepool_test_support::store::{Db, Objects};

use cachepool_web::image::MAX_IMAGE_BYTES;

matrix!(every_rejection_has_its_status_and_message:
    every_rejection_has_its_status_and_message_on_sqlite_and_local_dir => (Db::Sqlite, Objects::Local),
    every_rejection_has_its_status_and_message_on_postgres_and_s3 => (Db::Postgres, Objects::S3),
);

/// What every key rejection says is allowed.
const KEY_RULE: &str = "keys are 1 to 200 characters: letters A-Z and a-z, digits 0-9";

async fn every_rejection_has_its_status_and_message(db: Db, objects: Objects) {
    let site = Site::start(db, objects).await;
    assert_eq!(site.put("kept.gif", gif(1)).await.0, 201);

    // Bad keys, on upload and on view: 400, naming the field and the rule.
    let long = "k".repeat(201);
    for key in [
        ".hidden",
        "-dash",
        "sp%20ace",
        "semi%3Bcolon",
        long.as_str(),
    ] {
        let refused = site.put(key, gif(2)).await;
        assert_error(&refused, 400, "invalid_key", Some("key"), KEY_RULE);
        let r = site.get(key).await;
        let viewed = (r.status().as_u16(), r.json().await.unwrap_or_default());
        assert_error(&viewed, 400, "invalid_key", Some("key"), KEY_RULE);
    }

    // Too large: 413 whether the body is one byte over the limit or far over it.
    for size in [MAX_IMAGE_BYTES + 1, MAX_IMAGE_BYTES + (1 << 20)] {
        let mut huge = gif(3);
        huge.resize(size, 0);
        let refused = site.put("huge.gif", huge).await;
        assert_error(&refused, 413, "too_large", Some("image"), "10 MiB");
    }

    // Not an image: 415 saying what is accepted, judged by content (the name says .png).
    let html = site
        .put(
            "page.png",
            b"<html><script>alert(1)</script></html>".to_vec(),
        )
        .await;
    assert_error(
        &html,
        415,
        "not_an_image",
        Some("image"),
        "PNG, JPEG, GIF or WebP",
    );
    assert!(
        html.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("HTML"),
        "{}",
        html.1
    );
    let svg = site
        .put(
            "drawing.png",
            br#"<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>"#.to_vec(),
        )
        .await;
    assert_error(
        &svg,
        415,
        "not_an_image",
        Some("image"),
        "SVG images are not accepted",
    );
    let empty = site.put("empty.gif", Vec::new()).await;
    assert_error(
        &empty,
        400,
        "empty_upload",
        Some("image"),
        "the upload is empty",
    );

    // Missing image: 404 naming the key.
    let r = site.get("missing.gif").await;
    let missing = (r.status().as_u16(), r.json().await.unwrap_or_default());
    assert_error(&missing, 404, "not_found", None, "missing.gif");

    // Bad limits and cursors: 400 saying what is allowed.
    for limit in ["0", "201"] {
        let refused = site
            .get_json(&format!("/api/v1/images?limit={limit}"))
            .await;
        assert_error(
            &refused,
            400,
            "bad_request",
            Some("limit"),
            "limit must lie within [1, 200]",
        );
    }
    for limit in ["abc", "-1", "1.5"] {
        let refused = site
            .get_json(&format!("/api/v1/images?limit={limit}"))
            .await;
        assert_error(
            &refused,
            400,
            "bad_request",
            None,
            "limit must be a whole number within [1, 200]",
        );
    }
    for cursor in ["garbage", "AAAA", "%00"] {
        let refused = site
            .get_json(&format!("/api/v1/images?cursor={cursor}"))
            .await;
        assert_error(
            &refused,
            400,
            "bad_request",
            Some("cursor"),
            "invalid list cursor",
        );
    }

    // Deleting all data unauthenticated: 401 with WWW-Authenticate, for a missing token, a
    // wrong one, and a scheme other than Bearer.
    for (authorization, says) in [
        (None, "missing Authorization: Bearer <admin token>"),
        (
            Some("Bearer not-the-token".to_owned()),
            "wrong bearer token",
        ),
        (Some(format!("Bearer {ADMIN}x")), "wrong bearer token"),
        (
            Some(format!("Basic {ADMIN}")),
            "missing Authorization: Bearer <admin token>",
        ),
    ] {
        let r = site.delete_data(authorization.as_deref()).await;
        assert_eq!(header(&r, "www-authenticate"), "Bearer");
        let refused = (r.status().as_u16(), r.json().await.unwrap_or_default());
        assert_error(&refused, 401, "unauthorized", None, says);
    }

    // None of it stored, replaced or deleted anything (one image and its thumbnail).
    assert_eq!(site.listed_keys().await, ["kept.gif"]);
    assert_eq!(site.stored().await, (1, 2));
    assert_eq!(
        site.get("kept.gif").await.bytes().await.unwrap().to_vec(),
        gif(1)
    );
    site.stop().await;
}
