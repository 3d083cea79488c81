//! The site's edge, as the clients people use meet it: an upload refused before its body was
//! read is answered so that curl, Python's `urllib` and `requests`, and reqwest read the 413
//! (not a reset connection), in the JSON API as in the HTML form; and failed manager logins
//! slow down the address they came from, not the administrator's.
//!
//! Every case runs the site as `Web::start` serves it (its listener, client addresses from the
//! connection) over SQLite and a local directory, on a loopback port. Clients at different
//! addresses are loopback addresses (127.0.0.2, 127.0.0.3): Linux routes all of 127.0.0.0/8
//! to the loopback interface.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cachepool_test_support::site::{Site, gif};
use cachepool_test_support::store::{Db, Objects};
use cachepool_web::image::MAX_IMAGE_BYTES;
use cachepool_web::ui::auth::hash_password;
use cachepool_web::ui::operator::OperatorClient;
use cachepool_web::ui::{Ui, UiConfig};
use tokio::process::Command;

/// The manager's password in these tests.
const PASSWORD: &str = "correct-horse-battery";

/// A value a helper cannot go on without: a test failure at the caller if it is missing.
/// (Clippy allows `unwrap` in test functions, not in the helpers they share.)
trait Must<T> {
    fn must(self) -> T;
}

impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    #[track_caller]
    fn must(self) -> T {
        self.unwrap_or_else(|err| panic!("{err:?}"))
    }
}

impl<T> Must<T> for Option<T> {
    #[track_caller]
    fn must(self) -> T {
        self.unwrap_or_else(|| panic!("missing value"))
    }
}

/// Longest any one client call may take (generous: two shared cores).
const CALL_LIMIT: Duration = Duration::from_secs(60);

fn ui() -> Ui {
    Ui::new(UiConfig {
        password_hash: Some(hash_password(PASSWORD).must()),
        session_secret: None,
        secure_cookies: false,
        // Nothing here asks the operator; a closed port answers anything that would.
        operator: OperatorClient::new("http://127.0.0.1:9", "token", "default", "local").must(),
        trusted_proxies: Vec::new(),
    })
    .must()
}

/// A file of `size` bytes that starts like a GIF, removed on drop.
struct BigFile(PathBuf);

impl BigFile {
    fn new(name: &str, size: usize) -> BigFile {
        let path = std::env::temp_dir().join(format!(
            "cachepool-shell-{}-{name}-{size}",
            std::process::id()
        ));
        let mut bytes = gif(9);
        bytes.resize(size, 0);
        std::fs::write(&path, bytes).must();
        BigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().must()
    }
}

impl Drop for BigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a client program; its standard output, trimmed. The program must exist and exit 0:
/// a client that could not read the answer (a reset) exits non-zero.
async fn client(program: &str, args: Vec<String>) -> String {
    let what = format!("{program} {}", args.join(" "));
    let run = Command::new(program)
        .args(&args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CALL_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in {CALL_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e}); install it to run this test"));
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// curl's status code for a request, `-sS` so a transport error fails the run.
async fn curl(args: &[&str]) -> String {
    let mut all = vec![
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "60",
    ];
    all.extend_from_slice(args);
    client("curl", all.into_iter().map(str::to_owned).collect()).await
}

/// Python's status code for a request (`script` prints it; `argv[1]` is the URL, `argv[2]`
/// the file).
async fn python(script: &str, url: &str, file: &BigFile) -> String {
    client(
        "python3",
        vec![
            "-c".into(),
            script.into(),
            url.into(),
            file.path().to_owned(),
        ],
    )
    .await
}

/// `urllib`: the whole body is sent before the answer is read, so it reads the 413 only if the
/// server reads on.
const URLLIB_PUT: &str = r#"
import sys, urllib.request, urllib.error
data = open(sys.argv[2], "rb").read()
request = urllib.request.Request(sys.argv[1], data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
try:
    print(urllib.request.urlopen(request, timeout=60).status)
except urllib.error.HTTPError as e:
    print(e.code)
"#;

const REQUESTS_PUT: &str = r#"
import sys, requests
print(requests.put(sys.argv[1], data=open(sys.argv[2], "rb").read(), timeout=60).status_code)
"#;

/// `requests` with a generator: sent chunked, no `Content-Length`, so the site reads up to
/// the limit before it refuses.
const REQUESTS_PUT_CHUNKED: &str = r#"
import sys, requests
def chunks():
    with open(sys.argv[2], "rb") as f:
        while block := f.read(1 << 20):
            yield block
print(requests.put(sys.argv[1], data=chunks(), timeout=60).status_code)
"#;

const REQUESTS_FORM: &str = r#"
import sys, requests
with open(sys.argv[2], "rb") as f:
    r = requests.post(sys.argv[1], data={"key": "big.gif", "csrf": "x"},
                      files={"image": ("big.gif", f, "image/gif")}, timeout=60)
assert "the form is larger than" in r.text, r.text[:2000]
print(r.status_code)
"#;

const URLLIB_FORM: &str = r#"
import sys, urllib.request, urllib.error
boundary = "cachepoolboundary"
head = ("--%s\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nbig.gif\r\n"
        "--%s\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.gif\"\r\n"
        "Content-Type: image/gif\r\n\r\n" % (boundary, boundary)).encode()
data = head + open(sys.argv[2], "rb").read() + ("\r\n--%s--\r\n" % boundary).encode()
request = urllib.request.Request(sys.argv[1], data=data, method="POST",
    headers={"Content-Type": "multipart/form-data; boundary=" + boundary})
try:
    print(urllib.request.urlopen(request, timeout=60).status)
except urllib.error.HTTPError as e:
    assert b"the form is larger than" in e.read()
    print(e.code)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_before_its_body_is_read_reaches_every_client() {
    let site = Site::start_with_pages(Db::Sqlite, Objects::Local, ui()).await;
    let url = format!("{}/api/v1/images/big.gif", site.url);
    let big = BigFile::new("api", MAX_IMAGE_BYTES + (2 << 20));

    // reqwest.
    let response = site
        .http
        .put(&url)
        .body(std::fs::read(big.path()).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "too_large", "{body}");

    let file = format!("@{}", big.path());
    // curl sends `Expect: 100-continue` for a body this size: the refusal comes instead of
    // the 100 and the body is never sent.
    assert_eq!(
        curl(&["-X", "PUT", "--data-binary", &file, &url]).await,
        "413"
    );
    // Without it, curl sends the body while the answer waits for it.
    assert_eq!(
        curl(&["-X", "PUT", "-H", "Expect:", "--data-binary", &file, &url]).await,
        "413"
    );
    // Chunked, no length: refused at the limit, with the rest still on its way.
    assert_eq!(
        curl(&[
            "-X",
            "PUT",
            "-H",
            "Expect:",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &file,
            &url
        ])
        .await,
        "413"
    );
    assert_eq!(python(URLLIB_PUT, &url, &big).await, "413");
    assert_eq!(python(REQUESTS_PUT, &url, &big).await, "413");
    assert_eq!(python(REQUESTS_PUT_CHUNKED, &url, &big).await, "413");

    // Nothing was stored, and the site still answers.
    assert_eq!(site.stored().await, (0, 0));
    assert_eq!(site.put("small.gif", gif(1)).await.0, 201);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_form_refused_before_it_is_read_reaches_every_client() {
    let site = Site::start_with_pages(Db::Sqlite, Objects::Local, ui()).await;
    let url = format!("{}/upload", site.url);
    // Over the form's limit (four images' worth), so it is refused by its length.
    let big = BigFile::new("form", 4 * MAX_IMAGE_BYTES + (2 << 20));

    let boundary = "cachepoolboundary";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nbig.gif\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.gif\"\r\n\
         Content-Type: image/gif\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(&std::fs::read(big.path()).unwrap());
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let response = site
        .http
        .post(&url)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let page = response.text().await.unwrap();
    assert!(page.contains("the form is larger than"), "{page}");

    let image = format!("image=@{}", big.path());
    assert_eq!(
        curl(&["-F", "key=big.gif", "-F", &image, &url]).await,
        "413"
    );
    assert_eq!(
        curl(&["-H", "Expect:", "-F", "key=big.gif", "-F", &image, &url]).await,
        "413"
    );
    assert_eq!(python(URLLIB_FORM, &url, &big).await, "413");
    assert_eq!(python(REQUESTS_FORM, &url, &big).await, "413");

    assert_eq!(site.stored().await, (0, 0));
    site.stop().await;
}

/// A browser at one loopback address: its own connections, its cookies kept by hand.
struct Visitor {
    http: reqwest::Client,
    site: String,
    cookies: Vec<String>,
}

/// An answer to a login.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    took: Duration,
}

impl Visitor {
    fn at(site: &Site, address: &str) -> Visitor {
        let http = reqwest::Client::builder()
            .local_address(address.parse::<IpAddr>().must())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .must();
        Visitor {
            http,
            site: site.url.clone(),
            cookies: Vec::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for set in response.headers().get_all("set-cookie") {
            let pair = set.to_str().must().split(';').next().must().to_owned();
            let name = pair.split('=').next().must().to_owned();
            self.cookies.retain(|c| !c.starts_with(&format!("{name}=")));
            self.cookies.push(pair);
        }
    }

    /// Opens the login page and sends the form with `password` (letters, digits and '-'
    /// only: sent as they are), and `extra` headers.
    async fn login(&mut self, password: &str, extra: &[(&str, &str)]) -> Answer {
        let page = self
            .http
            .get(format!("{}/manager/login", self.site))
            .header("cookie", self.cookies.join("; "))
            .send()
            .await
            .must();
        self.keep_cookies(&page);
        let body = page.text().await.must();
        let at = body.find("name=\"csrf\" value=\"").must() + "name=\"csrf\" value=\"".len();
        let csrf = &body[at..at + body[at..].find('"').must()];
        let mut request = self
            .http
            .post(format!("{}/manager/login", self.site))
            .header("cookie", self.cookies.join("; "))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("password={password}&csrf={csrf}"));
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let started = Instant::now();
        let response = request.send().await.must();
        let took = started.elapsed();
        self.keep_cookies(&response);
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().must().parse().must());
        Answer {
            status: response.status().as_u16(),
            retry_after,
            took,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_slow_down_their_address_and_not_the_administrators() {
    let ui = ui();
    let site = Site::start_with_pages(Db::Sqlite, Objects::Local, ui.clone()).await;
    let mut guesser = Visitor::at(&site, "127.0.0.2");
    let mut admin = Visitor::at(&site, "127.0.0.3");

    // The guesser fails five times, each time as soon as its address may try again (polled:
    // a refused attempt costs nothing and counts nothing). Its waits: 250 ms, 500 ms, 1 s, 2 s,
    // then 4 s.
    let deadline = Instant::now() + CALL_LIMIT;
    let (mut failures, mut refused) = (0, 0);
    while failures < 5 {
        assert!(
            Instant::now() < deadline,
            "the guesser was never let in again"
        );
        let answer = guesser.login("wrong-guess", &[]).await;
        match answer.status {
            401 => failures += 1,
            429 => {
                refused += 1;
                assert!(answer.retry_after.is_some(), "a 429 says how long to wait");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("a wrong password got {other}"),
        }
    }
    assert!(refused > 0, "the guesser was slowed down");
    // Straight after the fifth failure its address waits (4 s), told in whole seconds.
    let next = guesser.login("wrong-guess", &[]).await;
    assert_eq!(next.status, 429);
    let wait = next.retry_after.expect("Retry-After");
    assert!((1..=4).contains(&wait), "Retry-After: {wait}");

    // Even the right password is refused from the guesser's address while it waits, and
    // a forged X-Forwarded-For does not make it another client (no proxy is trusted).
    assert_eq!(guesser.login(PASSWORD, &[]).await.status, 429);
    assert_eq!(
        guesser
            .login(PASSWORD, &[("x-forwarded-for", "192.0.2.77")])
            .await
            .status,
        429
    );

    // The administrator, at another address, logs in at once.
    let answer = admin.login(PASSWORD, &[]).await;
    assert_eq!(answer.status, 303, "the administrator is not locked out");
    assert!(
        answer.took < Duration::from_secs(5),
        "the administrator waited {:?}",
        answer.took
    );
    assert!(
        admin
            .cookies
            .iter()
            .any(|c| c.starts_with("cachepool_session=")),
        "a session cookie: {:?}",
        admin.cookies
    );

    // Only the guesser's address is remembered (a success clears its address).
    assert_eq!(ui.throttled_clients(), 1);
    site.stop().await;
}
