//! Malformed, hostile and slow input: each is answered as memcached 1.6 answers it (or as
//! `cache_node::protocol` documents), and none harms the node or other clients.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::support::{Client, show, start_node};

const MARKER_SET: &str = "set marker 0 0 1\r\nm\r\n";
const MARKER_GET: &str = "get marker\r\n";
const MARKER: &str = "VALUE marker 0 1\r\nm\r\nEND\r\n";
const BAD_FORMAT: &str = "CLIENT_ERROR bad command line format\r\n";

async fn client_with_marker(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::connect(addr).await;
    c.ask(MARKER_SET, "STORED\r\n").await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_answers_error_and_the_connection_goes_on() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    c.ask(
        format!("bogus\r\nGET marker\r\n\r\nget\r\nstats bogus\r\n{MARKER_GET}"),
        format!("ERROR\r\nERROR\r\nERROR\r\nERROR\r\nERROR\r\n{MARKER}"),
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_line_without_newline_answers_line_too_long_and_closes() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.send("x".repeat(3000)).await;
    let (answer, closed) = c.read_to_close(Duration::from_secs(5)).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "CLIENT_ERROR line too long\r\n"
    );
    assert!(closed, "connection left open after an over-long line");
    // A storage command line is held to the same limit, whatever its data.
    let mut c = Client::connect(node.addr).await;
    c.send(format!("set {} 0 0 1\r\n", "k ".repeat(1100))).await;
    let (answer, closed) = c.read_to_close(Duration::from_secs(5)).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "CLIENT_ERROR line too long\r\n"
    );
    assert!(closed);
    let mut fresh = client_with_marker(node.addr).await;
    fresh.ask(MARKER_GET, MARKER).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_of_251_bytes_is_a_bad_command_line_and_250_bytes_is_fine() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    let long = "k".repeat(251);
    let max = "k".repeat(250);
    // The node swallows the refused set's data block (memcached would run it as a command).
    c.ask(
        format!("set {long} 0 0 5\r\nvalue\r\n{MARKER_GET}"),
        format!("{BAD_FORMAT}{MARKER}"),
    )
    .await;
    c.ask(format!("get {long}\r\n"), BAD_FORMAT).await;
    c.ask(format!("get marker {long}\r\n"), BAD_FORMAT).await;
    c.ask(format!("delete {long}\r\n"), BAD_FORMAT).await;
    c.ask(format!("incr {long} 1\r\n"), BAD_FORMAT).await;
    c.ask(format!("touch {long} 1\r\n"), BAD_FORMAT).await;
    c.ask(format!("set {max} 0 0 5\r\nvalue\r\n"), "STORED\r\n")
        .await;
    c.ask(
        format!("get {max}\r\n"),
        format!("VALUE {max} 0 5\r\nvalue\r\nEND\r\n"),
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_with_a_control_character_is_refused_and_its_data_swallowed() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    // The protocol forbids control characters in keys. memcached 1.6 splits on spaces only and
    // would store this; the node refuses it as a bad command line.
    for key in ["k\x01y", "k\x7fy", "k\ty", "\x00"] {
        c.ask(
            format!("set {key} 0 0 9\r\nflush_all\r\n{MARKER_GET}"),
            format!("{BAD_FORMAT}{MARKER}"),
        )
        .await;
        c.ask(format!("get {key}\r\n"), BAD_FORMAT).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_or_non_numeric_length_is_a_bad_command_line() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    // Without a length nothing can be skipped, so the following line is a command again, as in
    // memcached.
    for length in ["-1", "abc", "1x", "99999999999999999999999"] {
        c.ask(
            format!("set k 0 0 {length}\r\n{MARKER_GET}"),
            format!("{BAD_FORMAT}{MARKER}"),
        )
        .await;
    }
    c.ask("get k\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_or_exptime_are_refused_and_the_data_swallowed() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    for line in [
        "set k abc 0 9",
        "set k 0 abc 9",
        "set k 4294967296 0 9",
        "set k -1 0 9",
        "cas k 0 0 9 abc",
    ] {
        c.ask(
            format!("{line}\r\nflush_all\r\n{MARKER_GET}"),
            format!("{BAD_FORMAT}{MARKER}"),
        )
        .await;
    }
    c.ask("get k\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_command_with_an_extra_token_does_not_run_its_data_as_a_command() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    // memcached 1.6.18 ignores the extra token and answers STORED. Whatever the node answers to
    // the line, the data block must not run: here it would flush the node.
    c.send(format!("set k 0 0 9 extra\r\nflush_all\r\n{MARKER_GET}"))
        .await;
    let answer = show(&c.read_until(b"END\r\n").await);
    let (first, rest) = answer.split_once("\r\n").unwrap_or_default();
    assert!(
        (first == "STORED" || first.starts_with("CLIENT_ERROR")) && rest == MARKER,
        "answered {answer:?}: the data block ran as a command"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_block_longer_than_declared_is_a_bad_data_chunk() {
    let node = start_node(16).await;
    let mut c = client_with_marker(node.addr).await;
    // As memcached: the declared length plus two bytes are consumed, the rest ("\r\n") is an
    // empty command line.
    c.ask(
        format!("set k 0 0 2\r\nabcd\r\n{MARKER_GET}"),
        format!("CLIENT_ERROR bad data chunk\r\nERROR\r\n{MARKER}"),
    )
    .await;
    c.ask("get k\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_block_shorter_than_declared_waits_for_the_rest() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.send("set k 0 0 10\r\nabc").await;
    c.expect_silence(Duration::from_millis(200)).await;
    c.send("def").await;
    c.expect_silence(Duration::from_millis(100)).await;
    c.ask("ghij\r\n", "STORED\r\n").await;
    c.ask("get k\r\n", "VALUE k 0 10\r\nabcdefghij\r\nEND\r\n")
        .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_garbage_never_kills_the_server() {
    let node = start_node(16).await;
    let mut rng = SmallRng::seed_from_u64(0x6361_6368_6570_6f6f);
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\0\0\0\0\r\n".to_vec(),
        b"\r\n\n\n\r\r\r\n".to_vec(),
        b"get \0\r\nset \0 0 0 1\r\n\0\r\n".to_vec(),
        b"stats \xff\xfe\r\nversion \x00\r\n".to_vec(),
        b"set k 0 0 4294967295\r\n".to_vec(),
        b"set k 0 0 2147483645\r\nabc".to_vec(),
        b"gat 99999999999999999999 k\r\nflush_all -99999999999\r\n".to_vec(),
        b"cache_memlimit 0\r\ncache_memlimit 99999999999999999999\r\nverbosity\r\n".to_vec(),
        b"incr \r\ndecr k\r\ntouch k\r\ndelete\r\ncas k 0 0 1\r\n".to_vec(),
    ];
    for len in [1, 7, 100, 1000, 10_000, 100_000] {
        inputs.push((0..len).map(|_| rng.random()).collect());
    }
    // Random bytes without a newline, and ones with many.
    inputs.push((0..5000).map(|_| rng.random_range(0x20u8..0x7f)).collect());
    inputs.push(
        (0..5000)
            .map(|_| {
                if rng.random_bool(0.2) {
                    b'\n'
                } else {
                    rng.random()
                }
            })
            .collect(),
    );
    for input in &inputs {
        let mut c = Client::connect(node.addr).await;
        c.send(input).await;
        // Whatever it answers, it must answer or wait, not die; leave the connection open
        // briefly so the node processes the input before we hang up.
        let _ = c.read_to_close(Duration::from_millis(50)).await;
    }
    let mut c = client_with_marker(node.addr).await;
    c.ask(MARKER_GET, MARKER).await;
    assert!(!c.stats().await.is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_half_commands_do_not_block_other_clients() {
    let node = start_node(16).await;
    let mut stalled_set = Client::connect(node.addr).await;
    stalled_set.send("set slow 0 0 100\r\nabc").await;
    let mut stalled_line = Client::connect(node.addr).await;
    stalled_line.send("get no").await;
    let mut stalled_empty = Client::connect(node.addr).await;
    let mut other = client_with_marker(node.addr).await;
    tokio::time::timeout(Duration::from_secs(2), async {
        for i in 0..50 {
            other.set(&format!("k{i}"), b"v").await;
            other.ask(MARKER_GET, MARKER).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a stalled client blocked another"));
    stalled_set
        .ask(format!("{}\r\n", "d".repeat(97)), "STORED\r\n")
        .await;
    stalled_line.ask("key\r\n", "END\r\n").await;
    stalled_empty.ask(MARKER_GET, MARKER).await;
    node.shutdown().await;
}
