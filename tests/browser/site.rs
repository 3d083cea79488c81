//! The public site: the harness against the JSON pages, an upload through the form, and a
//! refused upload.

use std::time::Duration;

use crate::harness::{Driver, Stack, make_png, png_size, run};

/// The harness itself: the stack starts, Chromium opens the site's JSON pages, and
/// screenshots are written.
#[test]
fn harness_opens_the_sites_json_pages() {
    run(async {
        let stack = Stack::start("harness", None).await;
        let driver = Driver::start().await;
        let browser = driver.browser("harness", &stack.site).await;

        browser.goto("/api/v1/images").await;
        let body = browser
            .text_of(&browser.css("body", "the page").await, "the page")
            .await;
        let listing: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("the JSON listing in the browser is not JSON ({e}): {body}")
        });
        assert_eq!(
            listing,
            stack.site_images().await,
            "the browser and reqwest see different listings"
        );
        let shot = browser.shot("json-listing").await;
        let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
        // The window is 1280 wide; its height includes the browser's own bars.
        let (width, height) =
            png_size(&png).unwrap_or_else(|| panic!("the screenshot is not a PNG"));
        assert!(
            width == 1280 && height > 0,
            "screenshot of a 1280-wide window is {width}x{height}"
        );

        browser.goto("/healthz").await;
        let body = browser
            .text_of(&browser.css("body", "the page").await, "the page")
            .await;
        assert_eq!(body, "ok");

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// Uploads through the form, lands on the view page with the image loaded, and finds it in
/// the listing with its thumbnail: 320 pixels wide, made of the 480-pixel image.
#[test]
fn upload_through_the_form_then_view_and_list() {
    run(async {
        let stack = Stack::start("upload", None).await;
        let driver = Driver::start().await;
        let browser = driver.browser("upload", &stack.site).await;
        let files = stack.files();
        let image = make_png(&browser, &files, "sunset.png", 480, 320).await;

        browser.goto("/").await;
        browser.id("empty", "the empty listing's message").await;
        let link = browser
            .id("upload-link", "the link to the upload form")
            .await;
        browser.submit(&link, "the upload link").await;
        let key_input = browser.id("key", "the key field").await;
        browser.shot("upload-form").await;
        browser.fill(&key_input, "sunset-1", "the key field").await;
        let file_input = browser.id("file", "the image field").await;
        let path = image.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"));
        if let Err(e) = file_input.send_keys(path).await {
            browser
                .fail(&format!("choosing the file {path}: {e}"))
                .await;
        }
        let submit = browser.id("upload-submit", "the upload button").await;
        browser.submit(&submit, "the upload button").await;

        // The view page.
        let view = browser.id("image", "the uploaded image on its page").await;
        assert_eq!(
            browser.path().await,
            "/images/sunset-1",
            "where the upload lands"
        );
        let (width, height) = browser
            .until("the image to load", Duration::from_secs(15), async || {
                let size = browser
                    .js(
                        "const i = arguments[0];
                         return i.complete ? [i.naturalWidth, i.naturalHeight] : null;",
                        vec![serde_json::to_value(&view).unwrap_or_default()],
                    )
                    .await;
                let width = size.get(0)?.as_u64()?;
                let height = size.get(1)?.as_u64()?;
                Some((width, height))
            })
            .await;
        assert_eq!(
            (width, height),
            (480, 320),
            "the image the view page shows is not the one uploaded"
        );
        assert_eq!(browser.text("image-key", "the key").await, "sunset-1");
        assert_eq!(
            browser.text("image-type", "the content type").await,
            "image/png"
        );
        let size = browser.text("image-size", "the size").await;
        assert!(
            size.ends_with('B'),
            "the size is shown in bytes, KiB or MiB: {size:?}"
        );
        browser.text("image-uploaded", "the upload time").await;
        browser.shot("view").await;

        // The listing.
        browser.goto("/").await;
        let item = browser
            .css(
                r#"#images li.image[data-key="sunset-1"]"#,
                "the image in the listing",
            )
            .await;
        let thumb = match item.find(fantoccini::Locator::Css("img.thumb")).await {
            Ok(thumb) => thumb,
            Err(e) => {
                browser
                    .fail(&format!("the listed image has no thumbnail: {e}"))
                    .await
            }
        };
        let src = browser.attr(&thumb, "src", "the thumbnail").await;
        assert_eq!(src.as_deref(), Some("/api/v1/images/sunset-1/thumbnail"));
        let thumb_value = serde_json::to_value(&thumb).unwrap_or_default();
        browser
            .until(
                "the thumbnail to load",
                Duration::from_secs(15),
                async || {
                    // Lazy images load once they scroll into view.
                    let width = browser
                        .js(
                            "const i = arguments[0];
                         i.scrollIntoView();
                         return i.complete ? i.naturalWidth : 0;",
                            vec![thumb_value.clone()],
                        )
                        .await;
                    // The thumbnail's long side is 320, the original's 480.
                    (width.as_u64() == Some(320)).then_some(())
                },
            )
            .await;
        let key = browser
            .text_of(
                &browser
                    .css(
                        r#"li.image[data-key="sunset-1"] .image-key"#,
                        "the listed key",
                    )
                    .await,
                "the listed key",
            )
            .await;
        assert_eq!(key, "sunset-1");
        assert!(
            !browser.exists("#empty").await,
            "#empty shown next to an image"
        );
        browser.shot("listing").await;

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// A text file is refused next to the image field, the typed key is kept, and nothing is
/// listed.
#[test]
fn a_text_file_is_refused_next_to_the_image_field() {
    run(async {
        let stack = Stack::start("bad-upload", None).await;
        let driver = Driver::start().await;
        let browser = driver.browser("bad-upload", &stack.site).await;
        let files = stack.files();
        // Named and typed like an image; its bytes are text.
        let text = files.join("notes.png");
        std::fs::write(&text, "shopping list: eggs, flour, milk\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", text.display()));

        browser.goto("/upload").await;
        let key_input = browser.id("key", "the key field").await;
        browser.fill(&key_input, "notes", "the key field").await;
        let file_input = browser.id("file", "the image field").await;
        let path = text.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"));
        if let Err(e) = file_input.send_keys(path).await {
            browser
                .fail(&format!("choosing the file {path}: {e}"))
                .await;
        }
        let submit = browser.id("upload-submit", "the upload button").await;
        browser.submit(&submit, "the upload button").await;

        let error = browser
            .css(
                r#".field-error[data-field="image"]"#,
                "the error next to the image field",
            )
            .await;
        let message = browser.text_of(&error, "the image field's error").await;
        assert!(
            message.contains("PNG") && message.contains("JPEG"),
            "the message should say which formats are allowed: {message:?}"
        );
        assert_eq!(browser.path().await, "/upload", "the form is shown again");
        let kept = browser.id("key", "the key field").await;
        assert_eq!(
            browser
                .prop(&kept, "value", "the key field")
                .await
                .as_deref(),
            Some("notes"),
            "the key the user typed is kept"
        );
        assert!(
            !browser.exists(r#".field-error[data-field="key"]"#).await,
            "the key was valid, yet it has an error"
        );
        browser.shot("upload-error").await;

        browser.goto("/").await;
        browser.id("empty", "the empty listing's message").await;
        assert!(
            !browser.exists("li.image").await,
            "a refused upload is listed"
        );
        let listing = stack.site_images().await;
        assert_eq!(
            listing["items"].as_array().map(Vec::len),
            Some(0),
            "the API lists a refused upload: {listing}"
        );

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// A key outside the allowed characters is refused next to the key field; a form whose CSRF
/// token was tampered with is refused as a whole; neither upload is listed.
#[test]
fn a_bad_key_or_a_forged_csrf_token_is_refused() {
    run(async {
        let stack = Stack::start("bad-key", None).await;
        let driver = Driver::start().await;
        let browser = driver.browser("bad-key", &stack.site).await;
        let files = stack.files();
        let image = make_png(&browser, &files, "fine.png", 32, 32).await;
        let path = image.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"));

        // A key with a space and a slash.
        browser.goto("/upload").await;
        let key_input = browser.id("key", "the key field").await;
        browser
            .fill(&key_input, "my photo/1", "the key field")
            .await;
        let file_input = browser.id("file", "the image field").await;
        if let Err(e) = file_input.send_keys(path).await {
            browser
                .fail(&format!("choosing the file {path}: {e}"))
                .await;
        }
        let submit = browser.id("upload-submit", "the upload button").await;
        browser.submit(&submit, "the upload button").await;
        let error = browser
            .css(
                r#".field-error[data-field="key"]"#,
                "the error next to the key field",
            )
            .await;
        let message = browser.text_of(&error, "the key's error").await;
        assert!(
            message.contains("letters") && message.contains("digits"),
            "the message should say which characters a key may hold: {message:?}"
        );
        let kept = browser.id("key", "the key field").await;
        assert_eq!(
            browser
                .prop(&kept, "value", "the key field")
                .await
                .as_deref(),
            Some("my photo/1"),
            "the key the user typed is kept"
        );
        browser.shot("upload-bad-key").await;

        // A valid upload whose CSRF token was replaced.
        browser.goto("/upload").await;
        let key_input = browser.id("key", "the key field").await;
        browser.fill(&key_input, "forged", "the key field").await;
        let file_input = browser.id("file", "the image field").await;
        if let Err(e) = file_input.send_keys(path).await {
            browser
                .fail(&format!("choosing the file {path}: {e}"))
                .await;
        }
        let replaced = browser
            .js(
                "const field = document.querySelector('#upload-form input[name=csrf]');
                 if (!field) return false;
                 field.value = 'forged-token';
                 return true;",
                vec![],
            )
            .await;
        assert_eq!(
            replaced,
            serde_json::Value::Bool(true),
            "the upload form has no csrf field"
        );
        let submit = browser.id("upload-submit", "the upload button").await;
        browser.submit(&submit, "the upload button").await;
        let error = browser.id("form-error", "the form-level error").await;
        assert!(
            !browser.text_of(&error, "the form error").await.is_empty(),
            "the CSRF error says nothing"
        );

        let listing = stack.site_images().await;
        assert_eq!(
            listing["items"].as_array().map(Vec::len),
            Some(0),
            "a refused upload is listed: {listing}"
        );
        browser.goto("/").await;
        browser.id("empty", "the empty listing's message").await;

        // An unknown key has no image page.
        browser.goto("/images/forged").await;
        browser.css("body", "the not-found page").await;
        assert!(
            !browser.exists("#image").await,
            "an image page for an unknown key"
        );
        let status = reqwest::get(format!("{}/images/forged", stack.site))
            .await
            .unwrap_or_else(|e| panic!("GET an unknown image page: {e}"))
            .status();
        assert_eq!(status, 404, "the page of an unknown key");

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// More images than a page holds: the listing shows the newest first and links to the next
/// page, which holds the rest and no further link.
#[test]
fn the_listing_pages_newest_first() {
    run(async {
        let stack = Stack::start("pages", None).await;
        let driver = Driver::start().await;
        let browser = driver.browser("pages", &stack.site).await;
        let files = stack.files();
        let image = make_png(&browser, &files, "tile.png", 24, 24).await;
        let png = std::fs::read(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));

        // One after the other, through the JSON API, so their upload times are ordered.
        let http = reqwest::Client::new();
        let total = 30;
        for i in 0..total {
            let url = format!("{}/api/v1/images/tile-{i:02}", stack.site);
            let response = http
                .put(&url)
                .header("content-type", "image/png")
                .body(png.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
            assert!(
                response.status().is_success(),
                "PUT {url}: {}",
                response.status()
            );
        }

        let mut seen = Vec::new();
        browser.goto("/").await;
        let mut pages = 0;
        loop {
            pages += 1;
            browser.css("li.image", "the listed images").await;
            for item in browser.all("li.image").await {
                let key = browser.attr(&item, "data-key", "a listed image").await;
                seen.push(key.unwrap_or_default());
            }
            let next = browser.all("#next-page").await;
            let Some(next) = next.first() else { break };
            if pages == 1 {
                browser.shot("listing-first-page").await;
            }
            assert!(pages < 10, "the listing does not end: {seen:?}");
            browser.submit(next, "the next-page link").await;
        }
        let expected: Vec<String> = (0..total).rev().map(|i| format!("tile-{i:02}")).collect();
        assert_eq!(seen, expected, "every image once, newest first");
        assert!(pages >= 2, "{total} images fit on one page");

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}
