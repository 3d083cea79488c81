//! Helpers: real nodes, fake peers (a listener that never answers, a scripted one), and a
//! deadline around every awaited step so a hung client fails its test instead of hanging it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cache_node::client::{ClientOptions, NodeClient};
use cache_node::store::Policy;
use cache_node::{Node, NodeConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Request timeout of the clients under test: short, so failure paths are quick.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

/// Slack allowed on top of a timeout before a test calls it hung.
pub const SLACK: Duration = Duration::from_millis(700);

/// Client options for tests: short timeouts, few connections.
pub fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(250),
        request_timeout: REQUEST_TIMEOUT,
        max_connections_per_node: 4,
        ..ClientOptions::default()
    }
}

pub async fn start_node() -> Node {
    start_with(NodeConfig::ephemeral(16, Policy::Lru, Some("t"))).await
}

pub async fn start_with(config: NodeConfig) -> Node {
    match Node::start(config).await {
        Ok(node) => node,
        Err(err) => panic!("node failed to start: {err}"),
    }
}

pub async fn stop(nodes: impl IntoIterator<Item = Node>) {
    for node in nodes {
        within(Duration::from_secs(10), node.shutdown()).await;
    }
}

/// A client of `node` with the test options.
pub fn client(node: &Node) -> NodeClient {
    ok(
        NodeClient::new(node.addr.to_string(), options()),
        "client options",
    )
}

/// The value of `result`, or a test failure naming `what` failed.
pub fn ok<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{what}: {err}"),
    }
}

/// A listener on an ephemeral loopback port, and its address.
async fn listen() -> (TcpListener, SocketAddr) {
    let listener = ok(TcpListener::bind("127.0.0.1:0").await, "bind");
    let addr = ok(listener.local_addr(), "local_addr");
    (listener, addr)
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("not done within {limit:?}"),
    }
}

/// A loopback address nothing listens on (bound, then released).
pub async fn dead_addr() -> String {
    let (listener, addr) = listen().await;
    drop(listener);
    addr.to_string()
}

/// A background task ended when the guard is dropped.
#[derive(Debug)]
pub struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A listener that accepts connections and holds them open without ever answering.
pub async fn silent_listener() -> (SocketAddr, Task) {
    let (listener, addr) = listen().await;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, Task(task))
}

/// What a scripted peer does with one request line.
#[derive(Debug, Clone)]
pub enum Action {
    Reply(Vec<u8>),
    /// Answer after a pause (longer than the client's timeout, to test late replies).
    ReplyAfter(Duration, Vec<u8>),
    /// Answer, then close the connection.
    ReplyThenClose(Vec<u8>),
}

type Script = dyn Fn(usize, &str) -> Action + Send + Sync;

/// A peer that answers each request line with `script(connection number, line)`;
/// connections are numbered from 0 in the order accepted. Counts the connections it accepted.
pub async fn scripted(
    script: impl Fn(usize, &str) -> Action + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>, Task) {
    let (listener, addr) = listen().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let script: Arc<Script> = Arc::new(script);
    let task = tokio::spawn(async move {
        // Connection tasks live in the set, so ending this task (dropping the set) ends them.
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            conns.spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let action = script(n, line.trim_end());
                    let (reply, close) = match action {
                        Action::Reply(reply) => (reply, false),
                        Action::ReplyAfter(pause, reply) => {
                            tokio::time::sleep(pause).await;
                            (reply, false)
                        }
                        Action::ReplyThenClose(reply) => (reply, true),
                    };
                    if write.write_all(&reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, Task(task))
}

/// Connections a node has accepted since it started.
pub fn accepted_by(node: &Node) -> u64 {
    node.shared.stats.total_connections.load(Ordering::SeqCst)
}
