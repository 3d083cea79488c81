//! The site's API as a whole, on one backend (in-process cache nodes behind a pool client, a
//! SQLite file and a local image directory, served on a loopback port and called over HTTP):
//! the OpenAPI document against the routes the router serves, and `/metrics`. What each
//! endpoint does, on every backend, is tested in `tests/api/`.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

// The API tests' site fixture (crate cachepool-test-support). This file stays a target of its
// own (not a module of `tests/api`): its log test must not run beside tests it does not
// serialise.
use cachepool_test_support::site::{ADMIN, Site, gif};
use cachepool_test_support::store::{Db, Objects};

/// Serialises the tests of this file: `tracing` caches per call site whether anyone listens,
/// and a test running beside the log test could settle that for the log test's events.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The methods a path is served on, from the `Allow` header of a 405 to a method no route
/// of the site uses (HEAD left out: axum adds it to every GET).
async fn served_methods(site: &Site, path: &str) -> BTreeSet<String> {
    let r = site
        .http
        .request(reqwest::Method::TRACE, format!("{}{path}", site.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("TRACE {path}: {e}"));
    assert_eq!(
        r.status(),
        405,
        "{path} must be a route (a 404 means it is not)"
    );
    header(&r, "allow")
        .split(',')
        .map(|m| m.trim().to_ascii_uppercase())
        .filter(|m| !m.is_empty() && m != "HEAD")
        .collect()
}

/// Every `$ref` in a JSON document.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref"
                    && let Some(r) = v.as_str()
                {
                    out.push(r.to_owned());
                }
                refs(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_3_1_and_lists_exactly_the_served_api_routes() {
    let _serial = SERIAL.lock().await;
    let site = Site::start(Db::Sqlite, Objects::Local).await;
    let r = site
        .http
        .get(format!("{}/api/v1/openapi.json", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("application/json"));
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    // It reads back as an OpenAPI document, not just as JSON.
    let parsed: utoipa::openapi::OpenApi = serde_json::from_str(&text).unwrap();
    assert!(!parsed.info.title.is_empty());

    // The paths: exactly the /api/v1 routes, each on exactly the methods it is served on.
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    assert_eq!(
        documented,
        BTreeSet::from([
            "/api/v1/data",
            "/api/v1/images",
            "/api/v1/images/{key}",
            "/api/v1/images/{key}/thumbnail",
            "/api/v1/openapi.json",
        ])
    );
    for (path, item) in paths {
        let methods: BTreeSet<String> = item
            .as_object()
            .expect("path item")
            .keys()
            .filter(|k| ["get", "put", "post", "delete", "patch"].contains(&k.as_str()))
            .map(|k| k.to_ascii_uppercase())
            .collect();
        let concrete = path.replace("{key}", "probe.gif");
        assert_eq!(served_methods(&site, &concrete).await, methods, "{path}");
    }
    // A path nobody documented is not served under /api/v1.
    let r = site
        .http
        .get(format!("{}/api/v1/undocumented", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Every schema reference resolves; the error body and the bearer scheme are there.
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{r}");
    }
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error["required"],
        serde_json::json!(["error", "message"]),
        "{error}"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["adminToken"]["scheme"],
        "bearer"
    );
    assert_eq!(
        paths["/api/v1/data"]["delete"]["security"],
        serde_json::json!([{"adminToken": []}])
    );
    for (path, method, status) in [
        ("/api/v1/images/{key}", "put", "413"),
        ("/api/v1/images/{key}", "put", "415"),
        ("/api/v1/images/{key}", "get", "304"),
        ("/api/v1/images", "get", "400"),
        ("/api/v1/data", "delete", "401"),
    ] {
        assert!(
            paths[path][method]["responses"][status].is_object(),
            "{method} {path} documents {status}"
        );
    }
    site.stop().await;
}

/// One sample line of OpenMetrics text: the series (name and labels) and its value.
fn samples(text: &str) -> Vec<(String, f64)> {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample without value: {l}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("value of {l}: {e}"));
            (series.to_owned(), value)
        })
        .collect()
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map_or(0.0, |(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_template_never_by_key() {
    let _serial = SERIAL.lock().await;
    let site = Site::start(Db::Sqlite, Objects::Local).await;
    let scrape = || async {
        let r = site
            .http
            .get(format!("{}/metrics", site.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(header(&r, "content-type").starts_with("application/openmetrics-text"));
        r.text().await.unwrap()
    };
    let before = samples(&scrape().await);
    let route = r#"cachepool_web_http_requests_total{method="PUT",route="/api/v1/images/{key}",status="2xx"}"#;
    assert_eq!(sample(&before, route), 0.0);

    assert_eq!(site.put("secret-key-1.gif", gif(1)).await.0, 201);
    assert_eq!(site.put("secret-key-2.gif", gif(2)).await.0, 201);
    assert_eq!(site.put("bad key", gif(2)).await.0, 400);
    assert_eq!(site.get("nowhere/at/all").await.status(), 404);
    let text = scrape().await;
    let after = samples(&text);
    assert_eq!(sample(&after, route), 2.0, "{text}");
    assert_eq!(
        sample(
            &after,
            r#"cachepool_web_http_requests_total{method="PUT",route="/api/v1/images/{key}",status="4xx"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &after,
            r#"cachepool_web_http_request_duration_seconds_count{method="PUT",route="/api/v1/images/{key}",status="2xx"}"#
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &after,
            r#"cachepool_web_http_requests_total{method="GET",route="unmatched",status="4xx"}"#
        ),
        1.0,
        "{text}"
    );
    // Keys never become label values.
    assert!(!text.contains("secret-key"), "{text}");
    // Today's counters keep their names.
    assert_eq!(sample(&after, "cachepool_web_uploads_total"), 2.0, "{text}");
    assert_eq!(
        sample(&after, "cachepool_web_rejected_total"),
        1.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE cachepool_web_pool_hits counter"),
        "{text}"
    );
    site.stop().await;
}

/// A writer for the test's subscriber that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

// One thread, so the site's tasks run where the test's subscriber is installed.
#[tokio::test(flavor = "current_thread")]
async fn every_request_is_logged_once_with_route_status_and_reason_never_the_token() {
    let _serial = SERIAL.lock().await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let site = Site::start(Db::Sqlite, Objects::Local).await;
    assert_eq!(site.put("cat.gif", gif(1)).await.0, 201);
    assert_eq!(site.get("cat.gif").await.status(), 200);
    assert_eq!(site.put("x.gif", b"plain text".to_vec()).await.0, 415);
    let refused = site
        .http
        .delete(format!("{}/api/v1/data", site.url))
        .bearer_auth("a-guessed-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let deleted = site
        .http
        .delete(format!("{}/api/v1/data", site.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    site.stop().await;

    let log = captured.text();
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" request") && l.contains("route="))
        .collect();
    assert_eq!(requests.len(), 5, "{log}");
    assert!(
        requests[0].contains("INFO")
            && requests[0].contains("method=PUT")
            && requests[0].contains("route=\"/api/v1/images/{key}\"")
            && requests[0].contains("status=201")
            && requests[0].contains("latency_ms="),
        "{log}"
    );
    assert!(
        requests[1].contains("DEBUG") && requests[1].contains("status=200"),
        "{log}"
    );
    assert!(
        requests[2].contains("request refused")
            && requests[2].contains("status=415")
            && requests[2].contains("error=\"not_an_image\"")
            && requests[2].contains("upload a PNG, JPEG, GIF or WebP image"),
        "{log}"
    );
    assert!(
        requests[3].contains("status=401") && requests[3].contains("wrong bearer token"),
        "{log}"
    );
    assert!(
        requests[4].contains("method=DELETE") && requests[4].contains("status=200"),
        "{log}"
    );
    assert!(!log.contains(ADMIN), "{log}");
    assert!(!log.contains("a-guessed-token"), "{log}");
}
