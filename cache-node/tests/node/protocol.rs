//! The text protocol beyond what memccapable checks: touch and gat, expiry, delayed flush,
//! stats, noreply, counters, binary-safe values and pipelining. Expected answers are
//! memcached 1.6's.

use std::time::Duration;

use crate::support::{Client, show, start_node, stat, unix_now};

/// How long an item with a 1-second TTL may take to disappear: the store's clock has
/// one-second resolution, so up to 2 s, plus slack for a loaded machine.
const EXPIRY_WAIT: Duration = Duration::from_secs(5);

/// Polls with `get` until `key` misses.
async fn wait_until_gone(client: &mut Client, key: &str) {
    let deadline = tokio::time::Instant::now() + EXPIRY_WAIT;
    while client.get(key).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} still present after {EXPIRY_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_answers_touched_for_a_live_key_and_not_found_otherwise() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask("touch nokey 10\r\n", "NOT_FOUND\r\n").await;
    c.set("k", b"v").await;
    c.ask("touch k 10\r\n", "TOUCHED\r\n").await;
    c.ask("delete k\r\n", "DELETED\r\n").await;
    c.ask("touch k 10\r\n", "NOT_FOUND\r\n").await;
    c.ask(
        "touch k abc\r\n",
        "CLIENT_ERROR invalid exptime argument\r\n",
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_extends_expiry_past_the_original_ttl() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    // Both keys get the same 1 s TTL; only `kept` is touched, so once `control` expired the
    // original TTL has certainly passed.
    c.ask(
        "set kept 0 1 1\r\na\r\nset control 0 1 1\r\nb\r\n",
        "STORED\r\nSTORED\r\n",
    )
    .await;
    c.ask("touch kept 100\r\n", "TOUCHED\r\n").await;
    wait_until_gone(&mut c, "control").await;
    assert_eq!(
        c.get("kept").await.as_deref(),
        Some(&b"a"[..]),
        "touched item expired with its old TTL"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gat_returns_the_value_and_extends_expiry() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask(
        "set kept 5 1 5\r\nhello\r\nset control 0 1 1\r\nb\r\n",
        "STORED\r\nSTORED\r\n",
    )
    .await;
    c.ask(
        "gat 100 kept nokey\r\n",
        "VALUE kept 5 5\r\nhello\r\nEND\r\n",
    )
    .await;
    wait_until_gone(&mut c, "control").await;
    c.ask("get kept\r\n", "VALUE kept 5 5\r\nhello\r\nEND\r\n")
        .await;
    c.ask("gat 100 nokey\r\n", "END\r\n").await;
    c.ask(
        "gat abc kept\r\n",
        "CLIENT_ERROR invalid exptime argument\r\n",
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gats_returns_the_cas_unique_that_cas_accepts() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("k", b"v1").await;
    c.send("gats 100 k\r\n").await;
    let header = c.line().await;
    let cas: u64 = match header
        .trim_end()
        .strip_prefix("VALUE k 0 2 ")
        .map(str::parse)
    {
        Some(Ok(cas)) => cas,
        _ => panic!("gats answered {header:?}"),
    };
    c.expect("v1\r\nEND\r\n").await;
    // Touching does not change the item, so its CAS unique stays what `gets` says.
    c.ask("gets k\r\n", format!("VALUE k 0 2 {cas}\r\nv1\r\nEND\r\n"))
        .await;
    c.ask(format!("cas k 0 0 2 {cas}\r\nv2\r\n"), "STORED\r\n")
        .await;
    c.ask(format!("cas k 0 0 2 {cas}\r\nv3\r\n"), "EXISTS\r\n")
        .await;
    assert_eq!(c.get("k").await.as_deref(), Some(&b"v2"[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_with_a_relative_ttl_disappears_after_it() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask("set k 0 1 1\r\na\r\n", "STORED\r\n").await;
    assert_eq!(
        c.get("k").await.as_deref(),
        Some(&b"a"[..]),
        "item gone before its TTL"
    );
    wait_until_gone(&mut c, "k").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_exptime_stores_an_already_expired_item() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("k", b"old").await;
    c.ask("set k 0 -1 3\r\nnew\r\n", "STORED\r\n").await;
    c.ask("get k\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_exptime_in_the_past_expires_immediately() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    // Beyond 30 days an exptime is a Unix time: 2001-09-09 and ten seconds ago.
    c.ask("set old 0 1000000000 1\r\na\r\n", "STORED\r\n").await;
    c.ask(
        format!("set recent 0 {} 1\r\na\r\n", unix_now() - 10),
        "STORED\r\n",
    )
    .await;
    c.ask("get old recent\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_exptime_in_the_future_keeps_the_item_until_then() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.ask(
        format!("set hour 0 {} 1\r\nh\r\n", unix_now() + 3600),
        "STORED\r\n",
    )
    .await;
    // Read as a relative TTL this would be decades; as a Unix time it is two seconds away.
    c.ask(
        format!("set soon 0 {} 1\r\ns\r\n", unix_now() + 2),
        "STORED\r\n",
    )
    .await;
    c.ask(
        "get hour soon\r\n",
        "VALUE hour 0 1\r\nh\r\nVALUE soon 0 1\r\ns\r\nEND\r\n",
    )
    .await;
    wait_until_gone(&mut c, "soon").await;
    assert_eq!(c.get("hour").await.as_deref(), Some(&b"h"[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_with_a_delay_keeps_items_until_the_delay_passes() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("a", b"1").await;
    c.set("b", b"2").await;
    c.ask("flush_all 2\r\n", "OK\r\n").await;
    c.ask(
        "get a b\r\n",
        "VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\n",
    )
    .await;
    wait_until_gone(&mut c, "a").await;
    c.ask("get b\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_noreply_answers_nothing_and_empties_the_node() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("a", b"1").await;
    c.ask("flush_all noreply\r\nget a\r\n", "END\r\n").await;
    c.set("a", b"1").await;
    c.ask("flush_all 0 noreply\r\nget a\r\n", "END\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_with_a_non_numeric_delay_is_an_invalid_exptime() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("a", b"1").await;
    // memcached 1.6: "CLIENT_ERROR invalid exptime argument", and nothing is flushed.
    c.ask(
        "flush_all abc\r\n",
        "CLIENT_ERROR invalid exptime argument\r\n",
    )
    .await;
    assert_eq!(c.get("a").await.as_deref(), Some(&b"1"[..]));
    node.shutdown().await;
}

const STATS_FIELDS: [&str; 30] = [
    "pid",
    "uptime",
    "time",
    "version",
    "curr_connections",
    "total_connections",
    "cmd_get",
    "cmd_set",
    "cmd_flush",
    "cmd_touch",
    "get_hits",
    "get_misses",
    "get_expired",
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "cas_hits",
    "cas_misses",
    "cas_badval",
    "touch_hits",
    "touch_misses",
    "evictions",
    "curr_items",
    "total_items",
    "bytes",
    "limit_maxbytes",
    "threads",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reports_every_memcached_field() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.send("stats\r\n").await;
    let text = show(&c.read_until(b"END\r\n").await);
    for line in text
        .strip_suffix("END\r\n")
        .unwrap_or_default()
        .split_terminator("\r\n")
    {
        assert_eq!(
            line.split(' ').count(),
            3,
            "stats line not `STAT name value`: {line:?}"
        );
        assert!(
            line.starts_with("STAT "),
            "stats line not `STAT name value`: {line:?}"
        );
    }
    let stats = c.stats().await;
    let missing: Vec<_> = STATS_FIELDS
        .iter()
        .filter(|f| !stats.contains_key(**f))
        .collect();
    assert!(missing.is_empty(), "stats lacks {missing:?}:\n{text}");
    for field in STATS_FIELDS.iter().filter(|f| **f != "version") {
        stat(&stats, field);
    }
    assert_eq!(stat(&stats, "pid"), u64::from(std::process::id()));
    assert!(
        stat(&stats, "time").abs_diff(unix_now()) <= 5,
        "time is not the Unix time"
    );
    assert!(
        stats["version"].starts_with("1.6."),
        "version {:?} is not a 1.6 version",
        stats["version"]
    );
    assert_eq!(stat(&stats, "limit_maxbytes"), 16 << 20);
    assert!(stat(&stats, "curr_connections") >= 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_counters_follow_the_commands_issued() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    let before = c.stats().await;
    for field in STATS_FIELDS
        .iter()
        .filter(|f| f.contains('_') && !f.contains("conn") && **f != "limit_maxbytes")
    {
        assert_eq!(stat(&before, field), 0, "{field} is not 0 on a fresh node");
    }
    c.ask(
        "set a 0 0 1\r\na\r\nget a\r\nget b\r\ndelete a\r\ndelete a\r\nset n 0 0 1\r\n5\r\n\
         incr n 1\r\nincr x 1\r\ndecr n 1\r\ndecr x 1\r\n",
        "STORED\r\nVALUE a 0 1\r\na\r\nEND\r\nEND\r\nDELETED\r\nNOT_FOUND\r\nSTORED\r\n6\r\nNOT_FOUND\r\n5\r\nNOT_FOUND\r\n",
    )
    .await;
    c.send("gets n\r\n").await;
    let header = c.line().await;
    let cas = header
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    c.expect("5\r\nEND\r\n").await;
    c.ask(
        format!(
            "cas n 0 0 1 {cas}\r\n7\r\ncas n 0 0 1 {cas}\r\n8\r\ncas zz 0 0 1 1\r\n9\r\n\
             touch n 0\r\ntouch zz 0\r\n"
        ),
        "STORED\r\nEXISTS\r\nNOT_FOUND\r\nTOUCHED\r\nNOT_FOUND\r\n",
    )
    .await;
    let mid = c.stats().await;
    // The numbers memcached 1.6.18 reports for the same commands.
    for (field, want) in [
        ("cmd_get", 3),
        ("cmd_set", 5),
        ("cmd_touch", 2),
        ("get_hits", 2),
        ("get_misses", 1),
        ("delete_hits", 1),
        ("delete_misses", 1),
        ("incr_hits", 1),
        ("incr_misses", 1),
        ("decr_hits", 1),
        ("decr_misses", 1),
        ("cas_hits", 1),
        ("cas_misses", 1),
        ("cas_badval", 1),
        ("touch_hits", 1),
        ("touch_misses", 1),
        ("curr_items", 1),
        ("cmd_flush", 0),
    ] {
        assert_eq!(stat(&mid, field), want, "{field}");
    }
    assert!(
        stat(&mid, "total_items") >= 3,
        "total_items counts the stores"
    );
    assert!(stat(&mid, "bytes") > 0);
    assert!(stat(&mid, "total_connections") >= 1);
    c.ask("flush_all\r\n", "OK\r\n").await;
    let after = c.stats().await;
    assert_eq!(stat(&after, "cmd_flush"), 1);
    assert_eq!(stat(&after, "curr_items"), 0);
    assert_eq!(stat(&after, "bytes"), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gat_counts_as_a_touch_not_as_a_get_in_stats() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("k", b"v").await;
    c.ask(
        "gat 0 k\r\ngat 0 nokey\r\n",
        "VALUE k 0 1\r\nv\r\nEND\r\nEND\r\n",
    )
    .await;
    let stats = c.stats().await;
    // memcached 1.6.18 counts gat under cmd_touch/touch_hits/touch_misses only.
    let got: Vec<(&str, u64)> = [
        "cmd_get",
        "get_hits",
        "get_misses",
        "cmd_touch",
        "touch_hits",
        "touch_misses",
    ]
    .into_iter()
    .map(|f| (f, stat(&stats, f)))
    .collect();
    assert_eq!(
        got,
        [
            ("cmd_get", 0),
            ("get_hits", 0),
            ("get_misses", 0),
            ("cmd_touch", 2),
            ("touch_hits", 1),
            ("touch_misses", 1)
        ]
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_settings_reports_the_node_limits() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    let settings = c.stats_of("stats settings").await;
    assert_eq!(stat(&settings, "maxbytes"), 16 << 20);
    assert_eq!(stat(&settings, "maxconns"), 4096);
    assert_eq!(stat(&settings, "tcpport"), u64::from(node.addr.port()));
    assert_eq!(stat(&settings, "item_size_max"), 16 << 20);
    assert_eq!(settings.get("evictions").map(String::as_str), Some("on"));
    assert_eq!(settings.get("cas_enabled").map(String::as_str), Some("yes"));
    assert!(stat(&settings, "num_threads") >= 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reset_answers_reset_and_zeroes_the_counters() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("a", b"1").await;
    c.ask(
        "get a\r\nget b\r\ndelete b\r\nincr b 1\r\ntouch a 0\r\n",
        "VALUE a 0 1\r\n1\r\nEND\r\nEND\r\nNOT_FOUND\r\nNOT_FOUND\r\nTOUCHED\r\n",
    )
    .await;
    c.ask("flush_all 1000\r\n", "OK\r\n").await;
    let before = c.stats().await;
    assert_eq!(stat(&before, "get_hits"), 1);
    c.ask("stats reset\r\n", "RESET\r\n").await;
    let after = c.stats().await;
    for field in [
        "cmd_get",
        "cmd_set",
        "cmd_flush",
        "cmd_touch",
        "get_hits",
        "get_misses",
        "delete_misses",
        "incr_misses",
        "touch_hits",
        "total_items",
        "evictions",
    ] {
        assert_eq!(stat(&after, field), 0, "{field} not reset");
    }
    // The data is untouched: items and their bytes stay.
    assert_eq!(stat(&after, "curr_items"), 1);
    assert_eq!(stat(&after, "bytes"), stat(&before, "bytes"));
    assert_eq!(c.get("a").await.as_deref(), Some(&b"1"[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noreply_commands_answer_nothing_but_take_effect() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("marker", b"m").await;
    c.send("gets marker\r\n").await;
    let header = c.line().await;
    let marker_cas = header
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    c.expect("m\r\nEND\r\n").await;
    const MARKER: &str = "VALUE marker 0 1\r\nm\r\nEND\r\n";
    // Each command, including refused ones, then a marker whose answer must come first.
    let commands = [
        ("set s 0 0 1 noreply\r\n1\r\n", "s", Some("1")),
        ("add s 0 0 1 noreply\r\n2\r\n", "s", Some("1")),
        ("add a 0 0 1 noreply\r\n2\r\n", "a", Some("2")),
        ("replace a 0 0 1 noreply\r\n3\r\n", "a", Some("3")),
        ("replace nokey 0 0 1 noreply\r\n3\r\n", "nokey", None),
        ("append a 0 0 1 noreply\r\n4\r\n", "a", Some("34")),
        ("prepend a 0 0 1 noreply\r\n2\r\n", "a", Some("234")),
        ("append nokey 0 0 1 noreply\r\n4\r\n", "nokey", None),
        ("incr s 41 noreply\r\n", "s", Some("42")),
        ("decr s 2 noreply\r\n", "s", Some("40")),
        ("incr nokey 1 noreply\r\n", "nokey", None),
        ("decr nokey 1 noreply\r\n", "nokey", None),
        ("touch s 100 noreply\r\n", "s", Some("40")),
        ("touch nokey 100 noreply\r\n", "nokey", None),
        ("cas s 0 0 1 1 noreply\r\n9\r\n", "s", Some("40")),
        ("cas nokey 0 0 1 1 noreply\r\n9\r\n", "nokey", None),
        ("delete a noreply\r\n", "a", None),
        ("delete a noreply\r\n", "a", None),
        ("delete a 0 noreply\r\n", "a", None),
    ];
    for (command, key, value) in commands {
        c.ask(format!("{command}get marker\r\n"), MARKER).await;
        assert_eq!(
            c.get(key).await.map(|v| show(&v)).as_deref(),
            value,
            "after {command:?}"
        );
    }
    c.ask(
        format!("cas marker 7 0 1 {marker_cas} noreply\r\nM\r\nget marker\r\n"),
        "VALUE marker 7 1\r\nM\r\nEND\r\n",
    )
    .await;
    c.ask("flush_all noreply\r\nget marker\r\n", "END\r\n")
        .await;
    c.ask(
        "flush_all 0 noreply\r\nversion\r\n",
        format!("VERSION {}\r\n", cache_node::server::VERSION),
    )
    .await;
    c.ask(
        "verbosity 1 noreply\r\nversion\r\n",
        format!("VERSION {}\r\n", cache_node::server::VERSION),
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_noreply_on_a_non_numeric_value_answers_nothing() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("text", b"abc").await;
    // memcached 1.6.18 answers nothing here: a noreply client never reads an answer, so any
    // line would be taken as the answer to its next command.
    c.ask(
        "incr text 1 noreply\r\ndecr text 1 noreply\r\nversion\r\n",
        format!("VERSION {}\r\n", cache_node::server::VERSION),
    )
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_wraps_at_64_bits_and_decr_stops_at_zero() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("n", b"18446744073709551614").await;
    c.ask("incr n 1\r\n", "18446744073709551615\r\n").await;
    c.ask("incr n 1\r\n", "0\r\n").await;
    c.ask(
        "incr n 18446744073709551615\r\n",
        "18446744073709551615\r\n",
    )
    .await;
    c.ask("incr n 2\r\n", "1\r\n").await;
    c.ask("decr n 5\r\n", "0\r\n").await;
    c.set("n", b"100").await;
    c.ask("decr n 1\r\n", "99\r\n").await;
    // The stored value shrank by a digit; memcached pads it with a space, we store it exactly.
    let v = c.get("n").await.unwrap_or_default();
    assert_eq!(show(&v).trim_end(), "99");
    c.ask("incr n 1\r\n", "100\r\n").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_and_decr_reject_non_numeric_values_and_deltas() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    c.set("text", b"abc").await;
    c.set("n", b"1").await;
    let non_numeric = "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n";
    let bad_delta = "CLIENT_ERROR invalid numeric delta argument\r\n";
    c.ask("incr text 1\r\n", non_numeric).await;
    c.ask("decr text 1\r\n", non_numeric).await;
    c.ask("incr n abc\r\n", bad_delta).await;
    c.ask("incr n -1\r\n", bad_delta).await;
    c.ask("decr n 18446744073709551616\r\n", bad_delta).await;
    c.ask("incr n 99999999999999999999999\r\n", bad_delta).await;
    c.set("big", b"18446744073709551616").await;
    c.ask("incr big 1\r\n", non_numeric).await;
    assert_eq!(c.get("text").await.as_deref(), Some(&b"abc"[..]));
    assert_eq!(c.get("n").await.as_deref(), Some(&b"1"[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_with_crlf_nul_and_high_bytes_round_trip_unchanged() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    let values: [&[u8]; 5] = [
        b"\r\n",
        b"line1\r\nEND\r\nline3",
        b"\0\0\0",
        b"a\0b\r\nVALUE x 0 1\r\n",
        &[0xff, 0xfe, 0x00, 0x0d, 0x0a, 0x80],
    ];
    for (i, value) in values.iter().enumerate() {
        let key = format!("bin{i}");
        c.set(&key, value).await;
        assert_eq!(c.get(&key).await.as_deref(), Some(*value), "value {i}");
    }
    c.ask(
        "set empty 0 0 0\r\n\r\nget empty\r\n",
        "STORED\r\nVALUE empty 0 0\r\n\r\nEND\r\n",
    )
    .await;
    c.ask("append bin2 0 0 2\r\n\r\n\r\n", "STORED\r\n").await;
    assert_eq!(c.get("bin2").await.as_deref(), Some(&b"\0\0\0\r\n"[..]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_pipelined_commands_in_one_write_are_answered_in_order() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    let mut request = Vec::new();
    let mut expected = Vec::new();
    for i in 0..500u32 {
        let value = format!("value-{i}");
        request.extend_from_slice(
            format!("set key{i} {i} 0 {}\r\n{value}\r\n", value.len()).as_bytes(),
        );
        expected.extend_from_slice(b"STORED\r\n");
        // Read back the previous key, so answers depend on the order commands ran in.
        let j = i.saturating_sub(1);
        request.extend_from_slice(format!("get key{j}\r\nincr key{i} 1\r\n").as_bytes());
        let prev = format!("value-{j}");
        expected.extend_from_slice(
            format!("VALUE key{j} {j} {}\r\n{prev}\r\nEND\r\n", prev.len()).as_bytes(),
        );
        expected
            .extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n");
    }
    request.extend_from_slice(b"version\r\n");
    expected.extend_from_slice(format!("VERSION {}\r\n", cache_node::server::VERSION).as_bytes());
    c.ask(&request, &expected).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_many_keys_longer_than_a_command_line_answers_every_hit() {
    let node = start_node(16).await;
    let mut c = Client::connect(node.addr).await;
    // 100 keys of 250 bytes: a 25 KB line, over the 2048-byte limit of other commands.
    let keys: Vec<String> = (0..100).map(|i| format!("{i:0>250}")).collect();
    for key in keys.iter().step_by(2) {
        c.set(key, b"v").await;
    }
    let expected: String = keys
        .iter()
        .step_by(2)
        .map(|k| format!("VALUE {k} 0 1\r\nv\r\n"))
        .collect();
    c.ask(
        format!("get {}\r\n", keys.join(" ")),
        format!("{expected}END\r\n"),
    )
    .await;
    node.shutdown().await;
}
