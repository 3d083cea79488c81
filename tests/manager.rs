//! The site's pages and the manager against the real local stack: `cachepool up` in a process
//! of its own (operator, node processes, site), driven over HTTP as a browser would, with the
//! cookies kept by hand.
//!
//! Each test starts its own stack on free ports in a throwaway data directory
//! (`cachepool_test_support::stack`, shared with `tests/browser`) and stops it at the end, asserting a
//! clean exit; if the test panics, the stack's drop stops what is left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use cachepool_test_support::images::gif;
use cachepool_test_support::stack::Stack;

/// `cachepool up` on a fresh data directory, which gets a newly generated admin password.
async fn start(test: &str) -> Stack {
    let stack = Stack::start(test, None).await;
    assert!(
        !stack.admin_password.starts_with('('),
        "a fresh data directory gets a new password, printed: {}",
        stack.admin_password
    );
    stack
}

/// A browser: one site, its cookies, no redirects followed.
struct Browser {
    http: reqwest::Client,
    site: String,
    cookies: BTreeMap<String, String>,
}

/// An answer: status, `Location`, headers and body.
struct Page {
    status: u16,
    location: String,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    fn expect(&self, status: u16, what: &str) -> &Page {
        assert_eq!(self.status, status, "{what}: {}", self.body);
        self
    }

    fn has(&self, needle: &str) -> bool {
        self.body.contains(needle)
    }

    /// The `value` of the hidden `csrf` input.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap_or(0)].to_owned()
    }
}

impl Browser {
    fn new(site: &str) -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_else(|e| panic!("client: {e}")),
            site: site.to_owned(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Page {
        let response = request
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request: {e}"));
        for set in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let set = set.to_str().unwrap_or_default();
            let pair = set.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                let removed = set.contains("Max-Age=0") || v.is_empty();
                if removed {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let location = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.text().await.unwrap_or_default();
        Page {
            status,
            location,
            headers,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let request = self.http.get(format!("{}{path}", self.site));
        self.send(request).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let request = self.http.post(format!("{}{path}", self.site)).form(form);
        self.send(request).await
    }

    async fn upload(&mut self, key: &str, image: &[u8], csrf: Option<&str>) -> Page {
        let boundary = "cachepool-test-boundary-7d1";
        let mut body = Vec::new();
        let mut text = |name: &str, value: &str| {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        };
        text("key", key);
        if let Some(csrf) = csrf {
            text("csrf", csrf);
        }
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(image);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let request = self
            .http
            .post(format!("{}/upload", self.site))
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        self.send(request).await
    }

    /// Logs in and returns the dashboard's CSRF token.
    async fn login(&mut self, password: &str) -> String {
        let form = self.get("/manager/login").await;
        form.expect(200, "login page");
        let csrf = form.csrf();
        let done = self
            .post(
                "/manager/login",
                &[("password", password), ("csrf", csrf.as_str())],
            )
            .await;
        done.expect(303, "login");
        assert_eq!(done.location, "/manager");
        let session = done
            .headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("cachepool_session="))
            .unwrap_or_else(|| panic!("no session cookie set"))
            .to_owned();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(session.contains(attribute), "{attribute} in {session}");
        }
        self.get("/manager").await.expect(200, "dashboard").csrf()
    }
}

async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_login_csrf_and_pool_controls() {
    let stack = start("controls").await;
    let mut browser = Browser::new(&stack.site);

    // No session: every manager page sends to the login page.
    for path in ["/manager", "/manager/delete"] {
        let page = browser.get(path).await;
        page.expect(303, path);
        assert_eq!(page.location, "/manager/login");
    }
    let page = browser.post("/manager/scale/grow", &[]).await;
    assert_eq!(
        (page.status, page.location.as_str()),
        (303, "/manager/login")
    );

    // The login page and its security headers.
    let login = browser.get("/manager/login").await;
    login.expect(200, "login page");
    let csp = login.headers["content-security-policy"]
        .to_str()
        .unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(login.headers["x-frame-options"], "DENY");
    assert_eq!(login.headers["x-content-type-options"], "nosniff");
    assert_eq!(login.headers["cache-control"], "no-store");
    let csrf = login.csrf();

    let page = browser
        .post("/manager/login", &[("password", "wrong"), ("csrf", &csrf)])
        .await;
    page.expect(401, "wrong password");
    assert!(page.has("id=\"login-error\""));
    let page = browser
        .post("/manager/login", &[("password", &stack.admin_password)])
        .await;
    page.expect(403, "login without its CSRF token");
    assert!(!browser.cookies.contains_key("cachepool_session"));
    // The wrong password slowed this address down: a login right away, even the right one,
    // waits for the back-off (429 with Retry-After, the password not even checked).
    let form = browser.get("/manager/login").await;
    let csrf = form.csrf();
    let page = browser
        .post(
            "/manager/login",
            &[("password", &stack.admin_password), ("csrf", &csrf)],
        )
        .await;
    page.expect(429, "a login within the back-off of a failed one");
    let wait: u64 = page.headers["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", page.headers));
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;

    let csrf = browser.login(&stack.admin_password).await;
    let set = browser
        .cookies
        .get("cachepool_session")
        .cloned()
        .unwrap_or_default();
    assert!(!set.is_empty(), "a session cookie");
    let dashboard = browser.get("/manager").await;
    for id in [
        "node-count",
        "mode-current",
        "policy-current",
        "capacity-current",
        "phase-current",
        "chart-nodes",
        "chart-miss-rate",
        "chart-hit-rate",
        "chart-items",
        "chart-bytes",
        "chart-requests",
        "capacity-form",
        "mode-form",
        "flush-form",
        "delete-all",
        "logout-form",
    ] {
        assert!(
            dashboard.has(&format!("id=\"{id}\"")),
            "#{id} on the dashboard"
        );
    }
    assert!(dashboard.has("<svg"), "charts are inline SVG");
    // The local pool starts in auto mode: the size buttons are off.
    assert!(
        dashboard.has("id=\"grow\" type=\"submit\" formaction=\"/manager/scale/grow\" disabled")
    );

    // Every manager POST without its token: 403, nothing changed.
    let before = stack.pool().await["spec"].clone();
    for (path, form) in [
        ("/manager/scale/grow", vec![]),
        ("/manager/scale/shrink", vec![]),
        ("/manager/flush", vec![]),
        ("/manager/delete", vec![]),
        ("/manager/logout", vec![]),
        (
            "/manager/cache",
            vec![("capacityMiB", "32"), ("policy", "lru")],
        ),
        (
            "/manager/scaling",
            vec![
                ("mode", "manual"),
                ("minReplicas", "1"),
                ("maxReplicas", "3"),
                ("maxMissRate", "0.5"),
                ("minMissRate", "0.1"),
                ("expandRatio", "2"),
                ("shrinkRatio", "0.5"),
            ],
        ),
    ] {
        let mut with_bad = form.clone();
        with_bad.push(("csrf", "0000"));
        for f in [form, with_bad] {
            let page = browser.post(path, &f).await;
            page.expect(403, path);
            assert!(page.has("nothing was changed"));
        }
    }
    assert_eq!(
        stack.pool().await["spec"],
        before,
        "a refused POST changes nothing"
    );
    browser
        .get("/manager")
        .await
        .expect(200, "still logged in after a refused logout");

    // An invalid threshold: 422, the message next to the field, the typed values kept.
    let scaling = |mode: &'static str, max_miss: &'static str| {
        vec![
            ("mode", mode),
            ("minReplicas", "1"),
            ("maxReplicas", "3"),
            ("maxMissRate", max_miss),
            ("minMissRate", "0.1"),
            ("expandRatio", "2"),
            ("shrinkRatio", "0.5"),
        ]
    };
    let mut form = scaling("auto", "lots");
    form.push(("csrf", &csrf));
    let page = browser.post("/manager/scaling", &form).await;
    page.expect(422, "maxMissRate not a number");
    assert!(
        page.has("<p class=\"field-error\" data-field=\"maxMissRate\">"),
        "{}",
        page.body
    );
    assert!(page.has("name=\"maxMissRate\" inputmode=\"decimal\" value=\"lots\""));
    let mut form = scaling("auto", "1.5");
    form.push(("csrf", &csrf));
    let page = browser.post("/manager/scaling", &form).await;
    page.expect(422, "maxMissRate out of range");
    assert!(page.has("data-field=\"maxMissRate\">must lie within [0, 1]"));
    assert_eq!(stack.pool().await["spec"], before);

    // Manual mode, then grow: the operator's replicas follow, and the page's node count.
    let mut form = scaling("manual", "0.5");
    form.push(("csrf", &csrf));
    let page = browser.post("/manager/scaling", &form).await;
    page.expect(303, "switch to manual");
    let flash = browser.get("/manager").await;
    assert!(flash.has("id=\"flash\""), "a flash after a POST");
    assert!(
        !browser.get("/manager").await.has("id=\"flash\""),
        "shown once"
    );
    let spec = stack.pool().await["spec"].clone();
    assert_eq!(spec["scaling"]["mode"], "manual");
    assert_eq!(spec["scaling"]["maxReplicas"], 3);
    assert_eq!(spec["scaling"]["auto"]["maxMissRate"], 0.5);
    let replicas = spec["scaling"]["replicas"].as_u64().unwrap_or(0);
    let page = browser
        .post("/manager/scale/grow", &[("csrf", &csrf)])
        .await;
    page.expect(303, "grow");
    assert_eq!(
        stack.pool().await["spec"]["scaling"]["replicas"].as_u64(),
        Some(replicas + 1)
    );
    let want = (replicas + 1).to_string();
    until("the page to show the new node count", async || {
        let page = browser.get("/manager").await;
        page.has(&format!("id=\"node-count\" class=\"value\">{want}<"))
            .then_some(())
    })
    .await;
    let status: Value = serde_json::from_str(&browser.get("/manager/status").await.body)
        .unwrap_or_else(|e| panic!("status JSON: {e}"));
    assert_eq!(status["nodeCount"], want.as_str());
    assert_eq!(status["charts"].as_array().map(Vec::len), Some(6));

    // Capacity and policy through the merge patch; flush.
    let page = browser
        .post(
            "/manager/cache",
            &[("capacityMiB", "32"), ("policy", "lru"), ("csrf", &csrf)],
        )
        .await;
    page.expect(303, "cache settings");
    let spec = stack.pool().await["spec"].clone();
    assert_eq!(spec["cache"]["capacityMiB"], 32);
    assert_eq!(spec["cache"]["policy"], "lru");
    let page = browser
        .post(
            "/manager/cache",
            &[("capacityMiB", "many"), ("policy", "lru"), ("csrf", &csrf)],
        )
        .await;
    page.expect(422, "capacity not a number");
    assert!(page.has("data-field=\"capacityMiB\""));
    // Refused by the operator (below the 16 MiB item limit): its 422 field is mapped onto
    // the form's capacity field, the typed value kept.
    let page = browser
        .post(
            "/manager/cache",
            &[("capacityMiB", "8"), ("policy", "lru"), ("csrf", &csrf)],
        )
        .await;
    page.expect(422, "capacity below the item size limit");
    assert!(
        page.has("<p class=\"field-error\" data-field=\"capacityMiB\">cache.maxItemSizeKiB: 16384 KiB exceeds"),
        "{}",
        page.body
    );
    assert!(page.has("name=\"capacityMiB\" type=\"number\" value=\"8\""));
    assert_eq!(stack.pool().await["spec"]["cache"]["capacityMiB"], 32);
    browser
        .post("/manager/flush", &[("csrf", &csrf)])
        .await
        .expect(303, "flush");

    // The JSON API's delete-all with the session: only with the page's token.
    let http = browser.http.clone();
    let delete = |token: Option<&str>| {
        let mut r = http.delete(format!("{}/api/v1/data", stack.site));
        if let Some(t) = token {
            r = r.header("x-csrf-token", t);
        }
        r
    };
    let r = delete(None);
    assert_eq!(browser.send(r).await.status, 403);
    let r = delete(Some(&csrf));
    browser
        .send(r)
        .await
        .expect(200, "delete with session and token");

    // Logout ends the session, also for a copy of the cookie.
    let page = browser.post("/manager/logout", &[("csrf", &csrf)]).await;
    page.expect(303, "logout");
    browser.cookies.insert("cachepool_session".into(), set);
    let page = browser.get("/manager").await;
    assert_eq!(
        (page.status, page.location.as_str()),
        (303, "/manager/login")
    );
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_form_listing_and_delete_all() {
    let stack = start("upload").await;
    let mut browser = Browser::new(&stack.site);

    let listing = browser.get("/").await;
    listing.expect(200, "listing");
    assert!(listing.has("id=\"empty\"") && listing.has("id=\"upload-link\""));

    let form = browser.get("/upload").await;
    form.expect(200, "upload form");
    assert!(form.has("id=\"upload-form\""));
    let csrf = form.csrf();

    let page = browser.upload("cat.gif", &gif(0), None).await;
    page.expect(403, "upload without CSRF");
    assert!(page.has("id=\"form-error\""));
    assert!(
        page.has("id=\"key\" name=\"key\" value=\"cat.gif\""),
        "the key is kept"
    );
    assert!(browser.get("/").await.has("id=\"empty\""), "nothing stored");

    let page = browser
        .upload("notes.gif", b"just some text", Some(&csrf))
        .await;
    page.expect(415, "not an image");
    assert!(
        page.has("<p class=\"field-error\" data-field=\"image\">"),
        "{}",
        page.body
    );

    // Over the limit: just over (read whole, refused by the upload rules) and far over
    // (refused while the form is read); both say the limit, neither stores anything.
    for (size, what) in [
        (10 * 1024 * 1024 + 1, "just over 10 MiB"),
        (24 << 20, "far over"),
    ] {
        let mut big = gif(0);
        big.resize(size, 0);
        let page = browser.upload("big.gif", &big, Some(&csrf)).await;
        page.expect(413, what);
        assert!(
            page.has("<p class=\"field-error\" data-field=\"image\">") && page.has("10 MiB"),
            "{what}: {}",
            page.body
        );
    }
    assert!(browser.get("/").await.has("id=\"empty\""), "nothing stored");

    let page = browser
        .upload("<script>alert(1)</script>", &gif(0), Some(&csrf))
        .await;
    page.expect(400, "bad key");
    assert!(page.has("data-field=\"key\""));
    assert!(
        page.has("value=\"&#60;script&#62;alert(1)&#60;/script&#62;\"")
            || page.has("&lt;script&gt;"),
        "{}",
        page.body
    );
    assert!(!page.has("<script>alert"), "the key is escaped");

    let page = browser.upload("cat.gif", &gif(0), Some(&csrf)).await;
    page.expect(303, "upload");
    assert_eq!(page.location, "/images/cat.gif");
    let listing = browser.get("/").await;
    assert!(
        listing.has("<li class=\"image\" data-key=\"cat.gif\">"),
        "{}",
        listing.body
    );
    // The listing shows the thumbnail; the image's own page shows the image.
    assert!(
        listing.has("src=\"/api/v1/images/cat.gif/thumbnail\""),
        "{}",
        listing.body
    );
    let view = browser.get("/images/cat.gif").await;
    view.expect(200, "image page");
    assert!(view.has("<span id=\"image-type\">image/gif</span>"));
    assert!(view.has("src=\"/api/v1/images/cat.gif\""), "{}", view.body);
    browser
        .get("/images/nothing-here")
        .await
        .expect(404, "unknown key");

    // Delete all through the confirmation page.
    browser.login(&stack.admin_password).await;
    let confirm = browser.get("/manager/delete").await;
    confirm.expect(200, "confirmation");
    assert!(confirm.has("id=\"confirm-delete-form\""));
    let page = browser
        .post("/manager/delete", &[("csrf", &confirm.csrf())])
        .await;
    page.expect(303, "delete all");
    let dashboard = browser.get("/manager").await;
    assert!(
        dashboard.has("id=\"flash\"") && dashboard.has("Deleted 1 images"),
        "{}",
        dashboard.body
    );
    assert!(browser.get("/").await.has("id=\"empty\""));
    assert_eq!(browser.get("/api/v1/images/cat.gif").await.status, 404);
    stack.stop();
}
