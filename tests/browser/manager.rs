//! The manager UI: log in, change the policy, grow the pool and watch the page follow, a
//! refused auto-scaling threshold, and deleting all data.

use std::time::Duration;

use fantoccini::Locator;

use crate::harness::{Browser, Driver, Stack, make_png, manual_pool, run};

/// How long the dashboard may take to show a change on its own: a node's start-up, the
/// operator's sampling (every 2 s under `cachepool up`) and the page's polling.
const FOLLOW: Duration = Duration::from_secs(45);

/// Opens the manager, is sent to the login page, and logs in.
async fn log_in(browser: &Browser, password: &str) {
    browser.goto("/manager").await;
    let field = browser.id("password", "the password field").await;
    assert_eq!(
        browser.path().await,
        "/manager/login",
        "the manager sends a visitor without a session to its login page"
    );
    browser.fill(&field, password, "the password field").await;
    let submit = browser.id("login-submit", "the login button").await;
    browser.submit(&submit, "the login button").await;
    browser.id("node-count", "the dashboard's node count").await;
    assert_eq!(browser.path().await, "/manager", "where a login lands");
}

/// The text of `#id` now, re-found on every call (the page replaces fragments in place).
async fn text_now(browser: &Browser, id: &str) -> Option<String> {
    let found = browser.all(&format!("#{id}")).await;
    let element = found.first()?;
    element.text().await.ok().map(|t| t.trim().to_owned())
}

/// The `data-latest` of `#id` now.
async fn latest_now(browser: &Browser, id: &str) -> Option<String> {
    let found = browser.all(&format!("#{id}")).await;
    found.first()?.attr("data-latest").await.ok().flatten()
}

async fn is_disabled(browser: &Browser, id: &str) -> bool {
    let button = browser.id(id, id).await;
    browser.attr(&button, "disabled", id).await.is_some()
}

/// Waits for `#flash` after a POST; its text.
async fn flash(browser: &Browser, after: &str) -> String {
    let flash = browser
        .id("flash", &format!("the message after {after}"))
        .await;
    let text = browser.text_of(&flash, "the flash message").await;
    assert!(!text.is_empty(), "an empty flash message after {after}");
    text
}

/// Log in (a wrong password first), switch the policy, grow by one and watch the node count
/// and the node chart follow; the buttons are disabled at the bounds.
#[test]
fn log_in_switch_policy_and_grow() {
    run(async {
        let stack = Stack::start("grow", Some(&manual_pool(1, 2, "sieve"))).await;
        let driver = Driver::start().await;
        let browser = driver.browser("grow", &stack.site).await;

        // A wrong password first.
        browser.goto("/manager").await;
        let field = browser.id("password", "the password field").await;
        assert_eq!(browser.path().await, "/manager/login");
        browser.shot("login").await;
        browser
            .fill(&field, "not-the-password", "the password field")
            .await;
        let submit = browser.id("login-submit", "the login button").await;
        browser.submit(&submit, "the login button").await;
        let error = browser
            .id("login-error", "the wrong password's message")
            .await;
        assert!(
            !browser.text_of(&error, "the login error").await.is_empty(),
            "the login error says nothing"
        );
        assert!(
            !browser.exists("#node-count").await,
            "a wrong password showed the dashboard"
        );
        log_in(&browser, &stack.admin_password).await;

        browser
            .until("one node on the dashboard", FOLLOW, async || {
                (text_now(&browser, "node-count").await.as_deref() == Some("1")).then_some(())
            })
            .await;
        assert_eq!(browser.text("mode-current", "the mode").await, "manual");
        assert_eq!(browser.text("policy-current", "the policy").await, "sieve");
        assert!(
            is_disabled(&browser, "shrink").await,
            "#shrink enabled at minReplicas 1"
        );
        assert!(
            !is_disabled(&browser, "grow").await,
            "#grow disabled below maxReplicas 2"
        );

        // Switch the policy.
        let policy = browser.id("policy", "the policy select").await;
        browser.select(&policy, "lru", "the policy select").await;
        let save = browser
            .id("capacity-submit", "the cache form's button")
            .await;
        browser.submit(&save, "the cache form's button").await;
        flash(&browser, "changing the policy").await;
        assert_eq!(browser.path().await, "/manager");
        assert_eq!(browser.text("policy-current", "the policy").await, "lru");
        let pool = stack.pool().await;
        assert_eq!(
            pool["spec"]["cache"]["policy"], "lru",
            "the operator's API disagrees with the page: {pool}"
        );

        // Grow by one, then watch the page follow without reloading it.
        let grow = browser.id("grow", "the grow button").await;
        browser.submit(&grow, "the grow button").await;
        flash(&browser, "growing the pool").await;
        let before = (
            text_now(&browser, "node-count").await,
            latest_now(&browser, "chart-nodes").await,
        );
        browser
            .until(
                "#node-count 2 and #chart-nodes data-latest 2",
                FOLLOW,
                async || {
                    let count = text_now(&browser, "node-count").await?;
                    let latest = latest_now(&browser, "chart-nodes").await?;
                    (count == "2" && latest.parse::<f64>().ok() == Some(2.0)).then_some(())
                },
            )
            .await;
        eprintln!(
            "after pressing grow the page showed (node count, chart latest) {before:?}, \
             then reached 2 on its own"
        );
        let pool = stack.pool().await;
        assert_eq!(
            pool["status"]["replicas"], 2,
            "the operator's API disagrees with the page: {pool}"
        );

        // At maxReplicas: two nodes in the table, grow disabled, shrink enabled. The table is
        // drawn by the server, so reload until both nodes are Ready.
        browser
            .until("two Ready nodes in #nodes", FOLLOW, async || {
                browser.goto("/manager").await;
                browser.id("nodes", "the node table").await;
                let mut states = Vec::new();
                for state in browser.all("#nodes tr.node td.node-state").await {
                    states.push(state.text().await.ok()?.trim().to_owned());
                }
                let addresses = browser.all("#nodes tr.node td.node-address").await;
                (states.len() == 2
                    && addresses.len() == 2
                    && states.iter().all(|s| s.eq_ignore_ascii_case("ready")))
                .then_some(())
            })
            .await;
        assert!(
            is_disabled(&browser, "grow").await,
            "#grow enabled at maxReplicas 2"
        );
        assert!(
            !is_disabled(&browser, "shrink").await,
            "#shrink disabled above minReplicas"
        );
        for chart in [
            "chart-nodes",
            "chart-miss-rate",
            "chart-hit-rate",
            "chart-items",
            "chart-bytes",
            "chart-requests",
        ] {
            let element = browser.id(chart, chart).await;
            let latest = browser.attr(&element, "data-latest", chart).await;
            assert!(latest.is_some(), "#{chart} has no data-latest attribute");
        }
        browser.shot("dashboard").await;

        // A change the page did not make, shown without reloading it: shrink through the
        // operator's API and watch the open dashboard follow.
        let page = match browser.client.find(Locator::Css("html")).await {
            Ok(page) => page,
            Err(e) => {
                browser
                    .fail(&format!("finding the dashboard's root: {e}"))
                    .await
            }
        };
        stack
            .api_post(
                "/api/v1/pools/default/local/scale",
                serde_json::json!({"delta": -1}),
            )
            .await;
        browser
            .until(
                "#node-count 1 and #chart-nodes data-latest 1 after a shrink through the API",
                FOLLOW,
                async || {
                    let count = text_now(&browser, "node-count").await?;
                    let latest = latest_now(&browser, "chart-nodes").await?;
                    (count == "1" && latest.parse::<f64>().ok() == Some(1.0)).then_some(())
                },
            )
            .await;
        assert!(
            page.tag_name().await.is_ok(),
            "the dashboard was reloaded rather than updated in place"
        );
        browser.shot("dashboard-after-shrink").await;

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// Auto mode with a miss rate above 1, then with min ≥ max: each error is shown next to its
/// field, the typed values are kept, and the pool stays in manual mode.
#[test]
fn an_invalid_auto_threshold_is_shown_next_to_its_field() {
    run(async {
        let stack = Stack::start("auto-invalid", Some(&manual_pool(1, 2, "lru"))).await;
        let driver = Driver::start().await;
        let browser = driver.browser("auto-invalid", &stack.site).await;
        log_in(&browser, &stack.admin_password).await;

        let mode = browser.id("mode", "the mode select").await;
        browser.select(&mode, "auto", "the mode select").await;
        let max = browser.id("max-miss-rate", "the max miss rate field").await;
        browser.fill(&max, "1.5", "the max miss rate field").await;
        let submit = browser.id("mode-submit", "the scaling form's button").await;
        browser.submit(&submit, "the scaling form's button").await;

        let error = browser
            .css(
                r#".field-error[data-field="maxMissRate"]"#,
                "the error next to the max miss rate",
            )
            .await;
        let message = browser.text_of(&error, "the max miss rate's error").await;
        assert!(!message.is_empty(), "the maxMissRate error says nothing");
        let kept = browser.id("max-miss-rate", "the max miss rate field").await;
        assert_eq!(
            browser
                .prop(&kept, "value", "the max miss rate field")
                .await
                .as_deref(),
            Some("1.5"),
            "the typed value is kept"
        );
        assert_eq!(browser.text("mode-current", "the mode").await, "manual");
        browser.shot("dashboard-invalid-threshold").await;
        let pool = stack.pool().await;
        assert_eq!(
            pool["spec"]["scaling"]["mode"], "manual",
            "a refused form changed the pool: {pool}"
        );

        // min ≥ max: the error is on one of the two fields.
        let mode = browser.id("mode", "the mode select").await;
        browser.select(&mode, "auto", "the mode select").await;
        let max = browser.id("max-miss-rate", "the max miss rate field").await;
        browser.fill(&max, "0.2", "the max miss rate field").await;
        let min = browser.id("min-miss-rate", "the min miss rate field").await;
        browser.fill(&min, "0.5", "the min miss rate field").await;
        let submit = browser.id("mode-submit", "the scaling form's button").await;
        browser.submit(&submit, "the scaling form's button").await;
        browser
            .css(
                r#".field-error[data-field="minMissRate"], .field-error[data-field="maxMissRate"]"#,
                "the error of a min miss rate above the max",
            )
            .await;
        assert_eq!(browser.text("mode-current", "the mode").await, "manual");
        let pool = stack.pool().await;
        assert_eq!(
            pool["spec"]["scaling"]["mode"], "manual",
            "a refused form changed the pool: {pool}"
        );

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// Delete all data behind its confirmation page, then the listing is empty.
#[test]
fn delete_all_data_empties_the_listing() {
    run(async {
        let stack = Stack::start("delete", Some(&manual_pool(1, 2, "lru"))).await;
        let driver = Driver::start().await;
        let browser = driver.browser("delete", &stack.site).await;
        let files = stack.files();
        let image = make_png(&browser, &files, "doomed.png", 40, 30).await;
        let path = image.to_str().unwrap_or_else(|| panic!("non-UTF-8 path"));

        for key in ["doomed-1", "doomed-2"] {
            browser.goto("/upload").await;
            let key_input = browser.id("key", "the key field").await;
            browser.fill(&key_input, key, "the key field").await;
            let file_input = browser.id("file", "the image field").await;
            if let Err(e) = file_input.send_keys(path).await {
                browser
                    .fail(&format!("choosing the file {path}: {e}"))
                    .await;
            }
            let submit = browser.id("upload-submit", "the upload button").await;
            browser.submit(&submit, "the upload button").await;
            browser.id("image", "the uploaded image").await;
        }
        browser.goto("/").await;
        browser.css("li.image", "the uploaded images").await;
        assert_eq!(browser.all("li.image").await.len(), 2, "two uploads listed");

        log_in(&browser, &stack.admin_password).await;
        let delete = browser.id("delete-all", "the delete-all link").await;
        browser.submit(&delete, "the delete-all link").await;
        let confirm = browser
            .id("confirm-delete", "the confirmation button")
            .await;
        assert_eq!(browser.path().await, "/manager/delete");
        browser.shot("delete-confirmation").await;
        // Nothing is deleted before the confirmation.
        let listing = stack.site_images().await;
        assert_eq!(
            listing["items"].as_array().map(Vec::len),
            Some(2),
            "{listing}"
        );
        browser.submit(&confirm, "the confirmation button").await;
        let said = flash(&browser, "deleting all data").await;
        assert_eq!(browser.path().await, "/manager");
        assert!(
            said.contains('2'),
            "the message should count the deleted images: {said:?}"
        );

        browser.goto("/").await;
        browser.id("empty", "the empty listing's message").await;
        assert!(
            !browser.exists("li.image").await,
            "images listed after deleting all"
        );
        browser.shot("listing-empty").await;
        let listing = stack.site_images().await;
        assert_eq!(
            listing["items"].as_array().map(Vec::len),
            Some(0),
            "{listing}"
        );
        let gone = reqwest::get(format!("{}/api/v1/images/doomed-1", stack.site))
            .await
            .unwrap_or_else(|e| panic!("GET a deleted image: {e}"));
        assert_eq!(gone.status(), 404, "a deleted image is still served");

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}

/// A manager form with a tampered CSRF token changes nothing, the same form with its own
/// token changes the capacity; clearing the cache says so; after logging out the manager
/// asks for the password again.
#[test]
fn forged_csrf_clear_cache_and_log_out() {
    run(async {
        let stack = Stack::start("logout", Some(&manual_pool(1, 2, "lru"))).await;
        let driver = Driver::start().await;
        let browser = driver.browser("logout", &stack.site).await;
        log_in(&browser, &stack.admin_password).await;

        // The cache form with its token replaced.
        let policy = browser.id("policy", "the policy select").await;
        browser.select(&policy, "random", "the policy select").await;
        let replaced = browser
            .js(
                "const field = document.querySelector('#capacity-form input[name=csrf]');
                 if (!field) return false;
                 field.value = 'forged-token';
                 return true;",
                vec![],
            )
            .await;
        assert_eq!(
            replaced,
            serde_json::Value::Bool(true),
            "the cache form has no csrf field"
        );
        let save = browser
            .id("capacity-submit", "the cache form's button")
            .await;
        browser.submit(&save, "the cache form's button").await;
        let status = browser
            .js(
                "const nav = performance.getEntriesByType('navigation')[0];
                 return nav ? nav.responseStatus : null;",
                vec![],
            )
            .await;
        assert_eq!(status, 403, "the answer to a forged token");
        let pool = stack.pool().await;
        assert_eq!(
            pool["spec"]["cache"]["policy"], "lru",
            "a forged form changed the pool: {pool}"
        );

        // The same form with its own token: the capacity changes.
        browser.goto("/manager").await;
        let capacity = browser.id("capacity", "the capacity field").await;
        browser.fill(&capacity, "48", "the capacity field").await;
        let save = browser
            .id("capacity-submit", "the cache form's button")
            .await;
        browser.submit(&save, "the cache form's button").await;
        flash(&browser, "changing the capacity").await;
        assert_eq!(browser.text("capacity-current", "the capacity").await, "48");
        let pool = stack.pool().await;
        assert_eq!(
            pool["spec"]["cache"]["capacityMiB"], 48,
            "the operator's API disagrees with the page: {pool}"
        );

        // Clear the cache.
        browser.goto("/manager").await;
        let clear = browser.id("clear-cache", "the clear-cache button").await;
        browser.submit(&clear, "the clear-cache button").await;
        flash(&browser, "clearing the cache").await;
        assert_eq!(browser.path().await, "/manager");

        // Log out.
        let logout = browser.id("logout", "the logout button").await;
        browser.submit(&logout, "the logout button").await;
        browser.goto("/manager").await;
        browser.id("password", "the password field").await;
        assert_eq!(
            browser.path().await,
            "/manager/login",
            "the manager after logging out"
        );
        assert!(
            !browser.exists("#node-count").await,
            "the dashboard after logging out"
        );

        browser.close().await;
        drop(driver);
        stack.stop();
    });
}
