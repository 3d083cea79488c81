//! The stack and the browser a browser test drives, each a process of its own behind a guard.
//!
//! - [`Stack`] is `cachepool up` (the real binary) on a fresh data directory
//!   (`cachepool_test_support::stack`, shared with `tests/manager.rs`).
//! - [`Driver`] is `chromedriver` on a free port, in a process group of its own so that
//!   dropping it also ends the Chromium it started, even when the WebDriver session was never
//!   closed because a test panicked.
//! - [`Browser`] is a fantoccini session in headless Chromium with the helpers the tests use:
//!   bounded waits for elements (no fixed sleeps), and failures that save a screenshot and
//!   print the page's URL and source, so a red test says what the browser showed.
//!
//! Screenshots go to `target/browser-artifacts/` (next to `CARGO_TARGET_TMPDIR`, so they follow
//! `CARGO_TARGET_DIR`), named by page, and are rewritten on every run.
//!
//! [`run`] runs one test at a time: a stack (operator, nodes, site) and a Chromium each want
//! more than one of the machine's cores, and the autoscaler's numbers mean nothing when two
//! tests share them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

use cachepool_test_support::stack::{START_LIMIT, signal, wait_bounded};
pub use cachepool_test_support::stack::{Stack, manual_pool};

/// A test that takes longer than this has hung.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// Default bound of a wait for an element or a page state.
pub const WAIT: Duration = Duration::from_secs(15);
/// Polling interval of waits on a page's state (the page itself refreshes every few seconds).
const POLL: Duration = Duration::from_millis(200);
/// Where Debian's `chromium` package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// What to do when the browser or its driver is missing.
const INSTALL_HINT: &str = "the browser tests need Chromium and chromedriver: `scripts/test` \
     installs them (Debian packages `chromium` and `chromium-driver`); set CHROMIUM to use \
     another browser binary";

/// Runs one test: alone, on its own runtime, within [`TEST_LIMIT`] (`cachepool_test_support::serial`).
pub fn run(test: impl Future<Output = ()>) {
    cachepool_test_support::serial::run(TEST_LIMIT, test);
}

/// `target/browser-artifacts/`, created on first use.
pub fn artifacts() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("browser-artifacts");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A free loopback port: bound, then released for the child to take.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// The chromium binary: `CHROMIUM` if set, else Debian's path; panics with how to install it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from(CHROMIUM), PathBuf::from);
    assert!(
        path.is_file(),
        "no browser at {}: {INSTALL_HINT}",
        path.display()
    );
    path
}

/// `chromedriver` on the `PATH`; panics with how to install it.
fn chromedriver() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromedriver"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no chromedriver on the PATH: {INSTALL_HINT}"))
}

/// A running `chromedriver`, in a process group of its own.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub async fn start() -> Driver {
        // Both programs are checked before anything starts, for a clear message.
        chromium();
        let port = free_port();
        let log = artifacts().join("chromedriver.log");
        let log = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new(chromedriver())
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().unwrap_or_else(|e| {
                    panic!("cannot share the driver's log: {e}")
                })))
                .stderr(Stdio::from(log))
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start chromedriver: {e}; {INSTALL_HINT}"))
        };
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // Ready when `/status` says so.
        let http = reqwest::Client::new();
        let status = format!("{}/status", driver.url);
        let start = Instant::now();
        loop {
            if let Ok(response) = http.get(&status).send().await
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == Value::Bool(true)
            {
                return driver;
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "chromedriver did not answer {status} within {START_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless Chromium session.
    pub async fn browser(&self, test: &'static str, site: &str) -> Browser {
        let options = serde_json::json!({
            "binary": chromium(),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
            ],
        });
        // A failure screenshot from an earlier run would describe a run that is gone.
        let _ = std::fs::remove_file(artifacts().join(format!("failure-{test}.png")));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), "chrome".into());
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open a Chromium session through {}: {e}; {INSTALL_HINT}",
                    self.url
                )
            });
        Browser {
            client,
            test,
            site: site.to_owned(),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        signal(group, libc::SIGTERM);
        if wait_bounded(&mut self.child, Duration::from_secs(5)).is_none() {
            signal(group, libc::SIGKILL);
            let _ = self.child.wait();
        }
        // Chromium's processes share the group and outlive the driver for a moment.
        signal(group, libc::SIGKILL);
    }
}

/// A WebDriver session on the site.
#[derive(Debug)]
pub struct Browser {
    pub client: Client,
    test: &'static str,
    site: String,
}

impl Browser {
    /// Opens `path` on the site.
    pub async fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.site);
        if let Err(e) = self.client.goto(&url).await {
            self.fail(&format!("cannot open {url}: {e}")).await;
        }
    }

    /// Opens an absolute URL.
    pub async fn goto_url(&self, url: &str) {
        if let Err(e) = self.client.goto(url).await {
            self.fail(&format!("cannot open {url}: {e}")).await;
        }
    }

    /// Waits (up to [`WAIT`]) for the element with this id; `what` names it in the failure.
    pub async fn id(&self, id: &str, what: &str) -> Element {
        self.css(&format!("#{id}"), what).await
    }

    /// Waits (up to [`WAIT`]) for the first element matching a CSS selector.
    pub async fn css(&self, selector: &str, what: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(WAIT)
            .every(POLL)
            .for_element(Locator::Css(selector))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                self.fail(&format!(
                    "{what} (`{selector}`) did not appear within {WAIT:?}: {e}"
                ))
                .await
            }
        }
    }

    /// Every element matching a CSS selector now (no wait).
    pub async fn all(&self, selector: &str) -> Vec<Element> {
        match self.client.find_all(Locator::Css(selector)).await {
            Ok(elements) => elements,
            Err(e) => self.fail(&format!("finding `{selector}`: {e}")).await,
        }
    }

    /// Whether an element matches a CSS selector now (no wait).
    pub async fn exists(&self, selector: &str) -> bool {
        !self.all(selector).await.is_empty()
    }

    /// The trimmed text of the element with this id (waiting for it).
    pub async fn text(&self, id: &str, what: &str) -> String {
        let element = self.id(id, what).await;
        self.text_of(&element, what).await
    }

    pub async fn text_of(&self, element: &Element, what: &str) -> String {
        match element.text().await {
            Ok(text) => text.trim().to_owned(),
            Err(e) => self.fail(&format!("reading the text of {what}: {e}")).await,
        }
    }

    /// An attribute of an element (`None` when absent).
    pub async fn attr(&self, element: &Element, name: &str, what: &str) -> Option<String> {
        match element.attr(name).await {
            Ok(value) => value,
            Err(e) => {
                self.fail(&format!("reading attribute {name} of {what}: {e}"))
                    .await
            }
        }
    }

    /// A DOM property of an element as a string (`value` of an input, for instance).
    pub async fn prop(&self, element: &Element, name: &str, what: &str) -> Option<String> {
        match element.prop(name).await {
            Ok(value) => value,
            Err(e) => {
                self.fail(&format!("reading property {name} of {what}: {e}"))
                    .await
            }
        }
    }

    pub async fn click(&self, element: &Element, what: &str) {
        if let Err(e) = element.click().await {
            self.fail(&format!("clicking {what}: {e}")).await;
        }
    }

    /// Clicks a button or link that leaves the page, and waits (up to [`WAIT`]) until the
    /// next page has loaded: until then the old page's elements would still match, and a
    /// check could pass or fail on the page the click left.
    pub async fn submit(&self, element: &Element, what: &str) {
        let old = match self.client.find(Locator::Css("html")).await {
            Ok(old) => old,
            Err(e) => {
                self.fail(&format!("finding the page before clicking {what}: {e}"))
                    .await
            }
        };
        self.click(element, what).await;
        self.until(
            &format!("the page after clicking {what}"),
            WAIT,
            async || {
                // The old document's root goes stale once the new page replaced it.
                if old.tag_name().await.is_ok() {
                    return None;
                }
                let state = self
                    .client
                    .execute("return document.readyState", vec![])
                    .await;
                (state.ok()?.as_str()? == "complete").then_some(())
            },
        )
        .await;
    }

    /// Clears an input and types `text` into it.
    pub async fn fill(&self, element: &Element, text: &str, what: &str) {
        if let Err(e) = element.clear().await {
            self.fail(&format!("clearing {what}: {e}")).await;
        }
        if let Err(e) = element.send_keys(text).await {
            self.fail(&format!("typing into {what}: {e}")).await;
        }
    }

    pub async fn select(&self, element: &Element, value: &str, what: &str) {
        if let Err(e) = element.select_by_value(value).await {
            self.fail(&format!("choosing {value:?} in {what}: {e}"))
                .await;
        }
    }

    /// Runs a script in the page; its return value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        match self.client.execute(script, args).await {
            Ok(value) => value,
            Err(e) => self.fail(&format!("running `{script}`: {e}")).await,
        }
    }

    /// The current URL's path.
    pub async fn path(&self) -> String {
        match self.client.current_url().await {
            Ok(url) => url.path().to_owned(),
            Err(e) => self.fail(&format!("reading the current URL: {e}")).await,
        }
    }

    /// Polls `check` every [`POLL`] until it yields a value; fails naming `what` after `limit`.
    pub async fn until<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if start.elapsed() >= limit {
                self.fail(&format!("timed out after {limit:?} waiting for {what}"))
                    .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Saves a screenshot of the whole page (not only what the window shows) as
    /// `target/browser-artifacts/NAME.png`.
    pub async fn shot(&self, name: &str) -> PathBuf {
        // WebDriver screenshots the viewport: grow the window to the page's height for the
        // shot (bounded, so an endless page cannot ask for a giant image), then restore it.
        let size = self
            .js(
                "return [document.documentElement.scrollHeight,
                         window.outerHeight - window.innerHeight];",
                vec![],
            )
            .await;
        let page = size.get(0).and_then(Value::as_u64).unwrap_or(0);
        let chrome = size.get(1).and_then(Value::as_u64).unwrap_or(0);
        let tall = u32::try_from((page + chrome).clamp(1000, 4000)).unwrap_or(1000);
        let resized = tall > 1000 && self.client.set_window_size(1280, tall).await.is_ok();
        let png = self.client.screenshot().await;
        if resized && let Err(e) = self.client.set_window_size(1280, 1000).await {
            panic!("restoring the window's size after screenshot {name}: {e}");
        }
        let png = png.unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = artifacts().join(format!("{name}.png"));
        std::fs::write(&path, png)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Fails the test: saves a screenshot, and panics with `message`, the URL and the source.
    pub async fn fail(&self, message: &str) -> ! {
        let url = self
            .client
            .current_url()
            .await
            .map_or_else(|e| format!("(unknown: {e})"), |u| u.to_string());
        let shot = match self.client.screenshot().await {
            Ok(png) => {
                let path = artifacts().join(format!("failure-{}.png", self.test));
                match std::fs::write(&path, png) {
                    Ok(()) => path.display().to_string(),
                    Err(e) => format!("(not saved: {e})"),
                }
            }
            Err(e) => format!("(none: {e})"),
        };
        let mut source = self
            .client
            .source()
            .await
            .unwrap_or_else(|e| format!("(unavailable: {e})"));
        if source.len() > 6000 {
            let mut end = 6000;
            while !source.is_char_boundary(end) {
                end -= 1;
            }
            source.truncate(end);
            source.push_str("\n…(truncated)");
        }
        panic!("{message}\npage: {url}\nscreenshot: {shot}\nsource:\n{source}");
    }

    /// Ends the WebDriver session (Chromium quits).
    pub async fn close(self) {
        if let Err(e) = self.client.close().await {
            panic!("closing the browser session: {e}");
        }
    }
}

/// A real PNG made by Chromium: a `width`×`height` gradient element, screenshotted. Written
/// to `dir/NAME`; returns the path.
pub async fn make_png(
    browser: &Browser,
    dir: &Path,
    name: &str,
    width: u32,
    height: u32,
) -> PathBuf {
    browser.goto_url("about:blank").await;
    browser
        .js(
            "document.body.style.margin = '0';
             const box = document.createElement('div');
             box.id = 'fixture';
             box.style.width = arguments[0] + 'px';
             box.style.height = arguments[1] + 'px';
             box.style.background = 'linear-gradient(135deg, #e66465, #9198e5)';
             document.body.appendChild(box);",
            vec![width.into(), height.into()],
        )
        .await;
    let element = browser.id("fixture", "the fixture element").await;
    let png = element
        .screenshot()
        .await
        .unwrap_or_else(|e| panic!("screenshot of the fixture: {e}"));
    assert_eq!(
        png_size(&png),
        Some((width, height)),
        "Chromium's screenshot of a {width}x{height} element has another size"
    );
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if !png.starts_with(b"\x89PNG\r\n\x1a\n") || png.get(12..16)? != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(png.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(png.get(20..24)?.try_into().ok()?);
    Some((width, height))
}
