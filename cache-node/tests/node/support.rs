//! Helpers shared by the tests: starting nodes, a raw memcached text-protocol client that
//! reads with deadlines (a hung server fails a test instead of hanging it), polling, and a
//! minimal admin HTTP client.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The admin token of nodes started by `start_node`.
pub const TOKEN: &str = "test-token";

/// How long any single read waits for the node before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A node with `capacity_mib` MiB, LRU, and the admin token `TOKEN`.
pub async fn start_node(capacity_mib: u64) -> Node {
    start_with(NodeConfig::ephemeral(
        capacity_mib,
        Policy::Lru,
        Some(TOKEN),
    ))
    .await
}

pub async fn start_with(config: NodeConfig) -> Node {
    match Node::start(config).await {
        Ok(node) => node,
        Err(err) => panic!("node failed to start: {err}"),
    }
}

/// A raw connection to the data port. Bytes read past the end of one reply stay buffered for
/// the next, so pipelined answers can be checked one at a time.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = match tokio::time::timeout(READ_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => panic!("cannot connect to {addr}: {err}"),
            Err(_) => panic!("connecting to {addr} timed out"),
        };
        let _ = stream.set_nodelay(true);
        Client {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        if let Err(err) = self.stream.write_all(bytes.as_ref()).await {
            panic!("write failed: {err}");
        }
    }

    /// Reads once more into the buffer; false at end of stream or deadline. A reset counts as
    /// end of stream: the node may close with our unread input still in its socket.
    async fn fill(&mut self, deadline: Instant) -> bool {
        if self.eof {
            return false;
        }
        // Vec's growth doubles, so reading a 16 MiB value takes few reads, while a thousand
        // idle clients hold small buffers.
        self.buf.reserve(16 * 1024);
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                false
            }
            Ok(Ok(_)) => true,
            Err(_) => false,
        }
    }

    /// Reads exactly `n` bytes, or fewer if the node closes or stalls (for the caller to
    /// compare and show).
    pub async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + READ_TIMEOUT;
        while self.buf.len() < n && self.fill(deadline).await {}
        let n = n.min(self.buf.len());
        self.buf.drain(..n).collect()
    }

    /// Reads up to and including the first occurrence of `terminator`; panics showing what
    /// arrived if it never does.
    pub async fn read_until(&mut self, terminator: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            if let Some(p) = find(&self.buf, terminator) {
                return self.buf.drain(..p + terminator.len()).collect();
            }
            if !self.fill(deadline).await {
                panic!(
                    "no {:?} within {READ_TIMEOUT:?}; got {:?}",
                    show(terminator),
                    show(&self.buf)
                );
            }
        }
    }

    /// Reads one line including its CRLF.
    pub async fn line(&mut self) -> String {
        show(&self.read_until(b"\r\n").await)
    }

    /// Asserts that the next bytes are exactly `expected`.
    pub async fn expect(&mut self, expected: impl AsRef<[u8]>) {
        let expected = expected.as_ref();
        let got = self.read_n(expected.len()).await;
        assert_eq!(show(&got), show(expected));
    }

    /// Sends `request` and asserts the answer is exactly `expected`.
    pub async fn ask(&mut self, request: impl AsRef<[u8]>, expected: impl AsRef<[u8]>) {
        self.send(request).await;
        self.expect(expected).await;
    }

    /// Reads until the node closes the connection; returns what arrived and whether it closed
    /// within the deadline.
    pub async fn read_to_close(&mut self, within: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + within;
        while self.fill(deadline).await {}
        (std::mem::take(&mut self.buf), self.eof)
    }

    /// Asserts that nothing arrives for `quiet` (used after commands that must not answer,
    /// where a marker command cannot follow).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while self.fill(deadline).await {}
        assert!(
            self.buf.is_empty(),
            "unexpected answer {:?}",
            show(&self.buf)
        );
    }

    /// `set key 0 0 len` with `value`, expecting STORED.
    pub async fn set(&mut self, key: &str, value: &[u8]) {
        let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        self.ask(req, "STORED\r\n").await;
    }

    /// The value of `key`, or None on a miss.
    pub async fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.send(format!("get {key}\r\n")).await;
        let header = self.line().await;
        if header == "END\r\n" {
            return None;
        }
        let len: usize = match header
            .trim_end()
            .rsplit(' ')
            .next()
            .and_then(|l| l.parse().ok())
        {
            Some(len) if header.starts_with(&format!("VALUE {key} ")) => len,
            _ => panic!("unexpected answer to get {key}: {header:?}"),
        };
        let mut value = self.read_n(len + 2).await;
        assert_eq!(
            value.split_off(len.min(value.len())),
            b"\r\n",
            "value of {key} not followed by CRLF"
        );
        self.expect("END\r\n").await;
        Some(value)
    }

    /// `stats` (or `stats <arg>`) as a map.
    pub async fn stats_of(&mut self, command: &str) -> HashMap<String, String> {
        self.send(format!("{command}\r\n")).await;
        let text = show(&self.read_until(b"END\r\n").await);
        text.lines()
            .filter_map(|l| l.strip_prefix("STAT "))
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub async fn stats(&mut self) -> HashMap<String, String> {
        self.stats_of("stats").await
    }
}

/// One numeric field of a `stats` map.
pub fn stat(stats: &HashMap<String, String>, name: &str) -> u64 {
    match stats.get(name).map(|v| v.parse::<u64>()) {
        Some(Ok(v)) => v,
        other => panic!("stat {name} missing or not a number: {other:?}"),
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Bytes as readable text for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `check` every 20 ms until it returns true; panics with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not true within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An admin API answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(err) => panic!("body is not JSON ({err}): {:?}", self.body),
        }
    }
}

/// One HTTP/1.1 request to the admin port, on its own connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpAnswer {
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(err) => panic!("cannot connect to admin port {addr}: {err}"),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(err) => panic!("HTTP handshake with {addr} failed: {err}"),
    };
    let driver = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = match req.body(Full::new(Bytes::from(body.unwrap_or_default().to_string()))) {
        Ok(r) => r,
        Err(err) => panic!("bad request {method} {path}: {err}"),
    };
    let answer = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(HttpAnswer {
            status,
            body: show(&body),
        })
    };
    let answer = match tokio::time::timeout(READ_TIMEOUT, answer).await {
        Ok(Ok(a)) => a,
        Ok(Err(err)) => panic!("{method} {path} failed: {err}"),
        Err(_) => panic!("{method} {path} timed out"),
    };
    drop(sender);
    let _ = driver.await;
    answer
}
