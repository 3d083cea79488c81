//! Meta commands over a socket: the subset the pool client and the hand-off use, answered as
//! memcached 1.6 answers them (checked against memcached 1.6.18 by hand; CAS values differ).

use crate::support::{Client, start_node};

#[tokio::test]
async fn meta_set_add_compare_and_delete_follow_memcached() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.send("ms k 3 F5 T100 c\r\nabc\r\n").await;
    let stored = c.line().await;
    let cas: u64 = stored
        .trim_end()
        .strip_prefix("HD c")
        .unwrap()
        .parse()
        .unwrap();
    c.ask(
        "mg k v f t c\r\n",
        format!("VA 3 f5 t100 c{cas}\r\nabc\r\n"),
    )
    .await;
    c.ask("ms k 3 ME c\r\nxyz\r\n", "NS c0\r\n").await;
    c.ask("ms n 2 ME k Oab\r\nhi\r\n", "HD kn Oab\r\n").await;
    c.ask(format!("ms k 1 C{}\r\nz\r\n", cas + 1), "EX\r\n")
        .await;
    c.ask(format!("md k C{}\r\n", cas + 1), "EX\r\n").await;
    c.ask(format!("md k C{cas} q\r\nmn\r\n"), "MN\r\n").await;
    c.ask("mg k v\r\n", "EN\r\n").await;
    c.ask("md k\r\n", "NF\r\n").await;
    c.ask("ms k 1 MR\r\nz\r\n", "NS\r\n").await;
    c.ask(
        "ms k 1 Mx\r\nz\r\nmn\r\n",
        "CLIENT_ERROR invalid mode for ms M token\r\nMN\r\n",
    )
    .await;
    c.ask("ms k 1 q\r\nz\r\nmg k v\r\n", "VA 1\r\nz\r\n").await;
    node.shutdown().await;
}

#[tokio::test]
async fn cachepool_extensions_tombstone_on_delete_but_not_on_a_moved_key() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask("ms gone 1\r\na\r\nmd gone\r\n", "HD\r\nHD\r\n").await;
    c.ask("ms moved 1\r\na\r\nmd moved Y\r\n", "HD\r\nHD\r\n")
        .await;
    // A copy carried forward (`ME Z`) is refused for the deleted key only.
    c.ask("ms gone 1 ME Z\r\nb\r\n", "NS\r\n").await;
    c.ask("ms moved 1 ME Z\r\nb\r\n", "HD\r\n").await;
    // A write after the delete lifts the tombstone.
    c.ask(
        "ms gone 1\r\nc\r\nmd gone Y\r\nms gone 1 ME Z\r\nd\r\n",
        "HD\r\nHD\r\nHD\r\n",
    )
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_copy_carrying_a_write_newer_than_the_delete_passes_the_tombstone() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask("ms k 1\r\na\r\nmd k\r\n", "HD\r\nHD\r\n").await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let skew = cache_node::store::CLOCK_SKEW_MS;
    // Written before the delete (a copy read before it and delivered after): refused.
    c.ask(
        format!("ms k 1 ME Z W{}\r\nb\r\n", now_ms - 1_000),
        "NS\r\n",
    )
    .await;
    // Written after the delete, beyond the clocks' allowance: taken, and kept as written —
    // what `mg … w` reports, so a copy of the copy carries the same time.
    let written = now_ms + skew + 1_000;
    c.ask(
        format!("ms k 1 ME Z W{written}\r\nc\r\nmg k v w\r\n"),
        format!("HD\r\nVA 1 w{written}\r\nc\r\n"),
    )
    .await;
    // A copy of unknown age reports none; `w` is only asked for by the pool's own parts.
    c.ask(
        "ms u 1 ME Z\r\nu\r\nmg u s w\r\nmg u s\r\n",
        "HD\r\nHD s1\r\nHD s1\r\n",
    )
    .await;
    // A write time only means something on a copy (`Z`).
    c.ask("ms j 1 W5\r\nd\r\n", "CLIENT_ERROR invalid flag\r\n")
        .await;
    node.shutdown().await;
}
