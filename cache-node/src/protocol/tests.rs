use super::*;

fn p(input: &[u8]) -> Option<(Frame<'_>, usize)> {
    parse(input, &Limits::default())
}

fn cmd(input: &[u8]) -> Command<'_> {
    match p(input) {
        Some((Frame::Command(c), n)) => {
            assert_eq!(n, input.len(), "whole input consumed");
            c
        }
        other => panic!("{:?} parsed as {other:?}", String::from_utf8_lossy(input)),
    }
}

fn err(input: &[u8]) -> &'static str {
    match p(input) {
        Some((Frame::Error(e), _)) => e,
        other => panic!("{:?} parsed as {other:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn partial_input_needs_more_bytes() {
    for partial in [
        &b""[..],
        b"get",
        b"get foo\r",
        b"set k 0 0 5\r\n",
        b"set k 0 0 5\r\nabc",
        b"set k 0 0 5\r\nhello\r",
    ] {
        assert_eq!(p(partial), None, "{:?}", String::from_utf8_lossy(partial));
    }
}

#[test]
fn retrievals() {
    match cmd(b"get a bb  ccc\r\n") {
        Command::Get {
            keys,
            cas: false,
            touch: None,
        } => {
            assert_eq!(
                keys.iter().collect::<Vec<_>>(),
                vec![&b"a"[..], b"bb", b"ccc"]
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cmd(b"gets a\n"),
        Command::Get {
            cas: true,
            touch: None,
            ..
        }
    ));
    assert!(matches!(
        cmd(b"gat 10 a b\r\n"),
        Command::Get {
            cas: false,
            touch: Some(10),
            ..
        }
    ));
    assert!(matches!(
        cmd(b"gats -1 a\r\n"),
        Command::Get {
            cas: true,
            touch: Some(-1),
            ..
        }
    ));
    assert_eq!(err(b"get\r\n"), ERROR);
    // `gat <exptime>` alone retrieves nothing (memcached answers END); `gat` alone is ERROR.
    assert!(matches!(
        cmd(b"gat 10\r\n"),
        Command::Get { touch: Some(10), keys, .. } if keys.iter().count() == 0
    ));
    assert_eq!(err(b"gat\r\n"), ERROR);
    assert_eq!(err(b"gat x a\r\n"), BAD_EXPTIME);
    let long = format!("get {}\r\n", "k".repeat(251));
    assert_eq!(err(long.as_bytes()), BAD_FORMAT);
    assert_eq!(err(b"get a\x01b\r\n"), BAD_FORMAT);
    let many = format!(
        "get {}\r\n",
        (0..1000)
            .map(|i| format!("key{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    match cmd(many.as_bytes()) {
        Command::Get { keys, .. } => assert_eq!(keys.iter().count(), 1000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn storage_commands_carry_binary_data() {
    let input = b"set k 5 100 7 noreply\r\na\r\nb\0c\r\r\n";
    assert_eq!(
        cmd(input),
        Command::Store {
            cmd: StoreCmd::Set,
            key: b"k",
            flags: 5,
            exptime: 100,
            data: b"a\r\nb\0c\r",
            noreply: true
        }
    );
    assert!(matches!(
        cmd(b"cas k 0 0 1 99\r\nx\r\n"),
        Command::Store {
            cmd: StoreCmd::Cas(99),
            noreply: false,
            ..
        }
    ));
    assert!(matches!(
        cmd(b"prepend k 0 0 0\r\n\r\n"),
        Command::Store {
            cmd: StoreCmd::Prepend,
            data: b"",
            ..
        }
    ));
    assert!(matches!(
        cmd(b"set k 4294967295 -1 1\r\nx\r\n"),
        Command::Store {
            flags: u32::MAX,
            exptime: -1,
            ..
        }
    ));
}

#[test]
fn bad_storage_lines_are_rejected_and_data_swallowed() {
    let swallow = |input: &[u8]| match p(input) {
        Some((
            Frame::Swallow {
                reply: Some(reply),
                bytes,
                ..
            },
            n,
        )) => (reply, bytes, n),
        other => panic!("{:?} parsed as {other:?}", String::from_utf8_lossy(input)),
    };
    assert_eq!(
        swallow(b"set k 0 0 16777217\r\n"),
        (TOO_LARGE, 16_777_219, 20)
    );
    let long_key = format!("set {} 0 0 1\r\n", "k".repeat(251));
    assert_eq!(swallow(long_key.as_bytes()).0, BAD_FORMAT);
    assert_eq!(swallow(b"set k 4294967296 0 1\r\n").0, BAD_FORMAT);
    assert_eq!(swallow(b"set k x 0 1\r\n").0, BAD_FORMAT);
    assert_eq!(swallow(b"set k 0 99999999999 1\r\n").0, BAD_FORMAT);
    assert_eq!(swallow(b"cas k 0 0 1 x\r\n").0, BAD_FORMAT);
    // No usable length: nothing to swallow, as memcached.
    assert_eq!(err(b"set k 0 0 -1\r\n"), BAD_FORMAT);
    assert_eq!(err(b"set k 0 0 abc\r\n"), BAD_FORMAT);
    assert_eq!(err(b"set k 0 0\r\n"), ERROR);
    assert_eq!(err(b"set k 0 0 1 2 3\r\n"), ERROR);
    // One extra token is ignored, as memcached does.
    assert!(matches!(
        cmd(b"set k 0 0 1 extra\r\nx\r\n"),
        Command::Store { noreply: false, .. }
    ));
    // A refused set removes the old value; add does not.
    assert!(matches!(
        p(b"set k 0 0 16777217\r\n"),
        Some((
            Frame::Swallow {
                unlink: Some(b"k"),
                ..
            },
            _
        ))
    ));
    assert!(matches!(
        p(b"add k 0 0 16777217\r\n"),
        Some((Frame::Swallow { unlink: None, .. }, _))
    ));
    // noreply silences errors of a recognised command.
    assert!(matches!(
        p(b"set k 0 0 16777217 noreply\r\n"),
        Some((Frame::Swallow { reply: None, .. }, _))
    ));
    assert_eq!(p(b"incr k x noreply\r\n").map(|f| f.0), Some(Frame::Silent));
    assert_eq!(
        p(b"set k 0 0 1 noreply\r\nxy\r\n").map(|f| f.0),
        Some(Frame::Silent)
    );
    // Data block of the wrong length: the declared bytes and two more are consumed.
    match p(b"set k 0 0 3\r\nabcd\r\n") {
        Some((Frame::Error(BAD_CHUNK), n)) => assert_eq!(n, 13 + 5),
        other => panic!("{other:?}"),
    }
}

#[test]
fn other_commands() {
    assert_eq!(
        cmd(b"delete k\r\n"),
        Command::Delete {
            key: b"k",
            noreply: false
        }
    );
    assert_eq!(
        cmd(b"delete k 0 noreply\r\n"),
        Command::Delete {
            key: b"k",
            noreply: true
        }
    );
    assert_eq!(err(b"delete k 5\r\n"), DELETE_USAGE);
    assert_eq!(
        cmd(b"incr n 18446744073709551615\r\n"),
        Command::Arith {
            incr: true,
            key: b"n",
            delta: u64::MAX,
            noreply: false
        }
    );
    assert_eq!(err(b"decr n -1\r\n"), BAD_DELTA);
    assert_eq!(err(b"incr n 18446744073709551616\r\n"), BAD_DELTA);
    assert_eq!(
        cmd(b"touch k 10 noreply\r\n"),
        Command::Touch {
            key: b"k",
            exptime: 10,
            noreply: true
        }
    );
    assert_eq!(err(b"touch k soon\r\n"), BAD_EXPTIME);
    assert_eq!(
        cmd(b"flush_all\r\n"),
        Command::FlushAll {
            delay: 0,
            noreply: false
        }
    );
    assert_eq!(
        cmd(b"flush_all 5 noreply\r\n"),
        Command::FlushAll {
            delay: 5,
            noreply: true
        }
    );
    assert_eq!(
        cmd(b"flush_all noreply\r\n"),
        Command::FlushAll {
            delay: 0,
            noreply: true
        }
    );
    assert_eq!(err(b"flush_all soon\r\n"), BAD_EXPTIME);
    assert_eq!(cmd(b"stats\r\n"), Command::Stats(StatsCmd::General));
    assert_eq!(
        cmd(b"stats settings\r\n"),
        Command::Stats(StatsCmd::Settings)
    );
    assert_eq!(cmd(b"stats reset\r\n"), Command::Stats(StatsCmd::Reset));
    assert_eq!(err(b"stats nonsense\r\n"), ERROR);
    assert_eq!(cmd(b"version\r\n"), Command::Version);
    assert_eq!(
        cmd(b"verbosity 1\r\n"),
        Command::Verbosity { noreply: false }
    );
    assert_eq!(err(b"verbosity\r\n"), ERROR);
    assert_eq!(cmd(b"quit\r\n"), Command::Quit);
    assert_eq!(
        cmd(b"cache_memlimit 128\r\n"),
        Command::CacheMemlimit {
            mib: 128,
            noreply: false
        }
    );
    assert_eq!(err(b"GET k\r\n"), ERROR);
    assert_eq!(err(b"\r\n"), ERROR);
    assert_eq!(err(b"\xff\xfe\x00garbage\r\n"), ERROR);
}

#[test]
fn over_long_lines_close_the_connection() {
    let line = vec![b'x'; 2049];
    assert_eq!(p(&line), Some((Frame::Close(LINE_TOO_LONG), 2049)));
    assert_eq!(p(&line[..2048]), None);
    let mut get = b"get ".to_vec();
    get.extend(std::iter::repeat_n(b'k', 5000));
    assert_eq!(p(&get), None, "retrieval lines may be long");
}

#[test]
fn exptime_rules() {
    let now = 1_700_000_000;
    assert_eq!(absolute_expiry(0, now), 0);
    assert_eq!(absolute_expiry(10, now), now + 10);
    assert_eq!(absolute_expiry(-1, now), now);
    assert_eq!(absolute_expiry(60 * 60 * 24 * 30, now), now + 2_592_000);
    assert_eq!(absolute_expiry(1_800_000_000, now), 1_800_000_000);
    assert_eq!(
        absolute_expiry(2_600_000, now),
        2_600_000,
        "absolute time in the past"
    );
}

#[test]
fn meta_get_and_noop() {
    match cmd(b"mg key v f t c k s q Oab12 T30\r\n") {
        Command::MetaGet { key, flags } => {
            assert_eq!(key, b"key");
            assert!(
                flags.value
                    && flags.client_flags
                    && flags.ttl
                    && flags.cas
                    && flags.key
                    && flags.size
                    && flags.quiet
            );
            assert_eq!(flags.opaque, Some(&b"ab12"[..]));
            assert_eq!(flags.touch, Some(30));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cmd(b"mg key\r\n"),
        Command::MetaGet {
            key: b"key",
            flags: MetaGetFlags::default()
        }
    );
    assert_eq!(cmd(b"mn\r\n"), Command::MetaNoop);
    assert_eq!(err(b"mg\r\n"), BAD_FORMAT);
    assert_eq!(err(b"mg key z\r\n"), "CLIENT_ERROR invalid flag");
    assert_eq!(err(b"mg key Tsoon\r\n"), BAD_TOKEN);
}

#[test]
fn meta_set_and_delete() {
    match cmd(b"ms key 3 F5 T100 ME C7 c k q Oz\r\nabc\r\n") {
        Command::MetaSet { key, data, flags } => {
            assert_eq!((key, data), (&b"key"[..], &b"abc"[..]));
            assert_eq!(flags.mode, StoreCmd::Add);
            assert_eq!(
                (flags.client_flags, flags.ttl, flags.compare_cas),
                (5, 100, Some(7))
            );
            assert!(flags.return_cas && flags.return_key && flags.quiet);
            assert_eq!(flags.opaque, Some(&b"z"[..]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p(b"ms key 3\r\nab"), None, "waits for the data block");
    assert_eq!(err(b"ms key x\r\n"), BAD_FORMAT);
    assert!(matches!(
        p(b"ms key 1 Mx\r\n"),
        Some((Frame::Swallow { bytes: 3, .. }, _))
    ));
    assert!(matches!(
        p(b"ms key 16777217\r\n"),
        Some((
            Frame::Swallow {
                reply: Some(TOO_LARGE),
                ..
            },
            _
        ))
    ));
    assert_eq!(
        cmd(b"md key C9 q\r\n"),
        Command::MetaDelete {
            key: b"key",
            flags: MetaDeleteFlags {
                compare_cas: Some(9),
                quiet: true,
                ..Default::default()
            }
        }
    );
    assert_eq!(err(b"md key Cx\r\n"), BAD_META_FLAG);
}

#[test]
fn numbers_take_a_plus_and_nothing_after_the_digits() {
    assert_eq!(parse_u64(b"+7"), Some(7));
    assert_eq!(parse_u64(b"007"), Some(7));
    assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
    for bad in [
        &b""[..],
        b"+",
        b"-1",
        b"1x",
        b"0x1",
        b" 1",
        b"1.0",
        b"++1",
        b"18446744073709551616",
    ] {
        assert_eq!(parse_u64(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
    assert_eq!(
        parse_u32(b"4294967296"),
        None,
        "overflow is refused, not truncated"
    );
    assert_eq!(parse_i32(b"-2147483648"), Some(-2_147_483_648));
    assert_eq!(parse_i32(b"+5"), Some(5));
    for bad in [
        &b"2147483648"[..],
        b"-2147483649",
        b"--1",
        b"-+1",
        b"+-1",
        b"-",
        b"5s",
    ] {
        assert_eq!(parse_i32(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(err(b"verbosity 1x\r\n"), BAD_FORMAT);
    assert_eq!(err(b"verbosity -1\r\n"), BAD_FORMAT);
    assert_eq!(
        p(b"verbosity x noreply\r\n").map(|f| f.0),
        Some(Frame::Silent)
    );
    assert_eq!(err(b"flush_all 1x\r\n"), BAD_EXPTIME);
    assert_eq!(err(b"flush_all 1 2 3\r\n"), ERROR);
    assert_eq!(
        cmd(b"flush_all 3 9\r\n"),
        Command::FlushAll {
            delay: 3,
            noreply: false
        }
    );
    assert_eq!(err(b"cache_memlimit 64x\r\n"), ERROR);
    assert_eq!(
        p(b"cache_memlimit x noreply\r\n").map(|f| f.0),
        Some(Frame::Silent)
    );
    assert_eq!(err(b"cache_memlimit 7\r\n"), MEMLIMIT_TOO_SMALL);
    assert_eq!(err(b"cache_memlimit 99999999999\r\n"), MEMLIMIT_TOO_LARGE);
    assert!(matches!(
        cmd(b"set k +1 +2 +1\r\nx\r\n"),
        Command::Store {
            flags: 1,
            exptime: 2,
            ..
        }
    ));
}

#[test]
fn every_stats_form_of_memcached_parses() {
    let stats = |input: &[u8]| match cmd(input) {
        Command::Stats(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(stats(b"stats items\r\n"), StatsCmd::Items);
    assert_eq!(stats(b"stats slabs\r\n"), StatsCmd::Slabs);
    assert_eq!(stats(b"stats sizes\r\n"), StatsCmd::Sizes);
    assert_eq!(
        stats(b"stats sizes_enable\r\n"),
        StatsCmd::SizesEnable(true)
    );
    assert_eq!(
        stats(b"stats sizes_disable\r\n"),
        StatsCmd::SizesEnable(false)
    );
    assert_eq!(stats(b"stats conns\r\n"), StatsCmd::Conns);
    assert_eq!(stats(b"stats extstore\r\n"), StatsCmd::Extstore);
    assert_eq!(stats(b"stats reset now\r\n"), StatsCmd::Reset);
    assert_eq!(
        stats(b"stats cachedump 3 +10 x\r\n"),
        StatsCmd::CacheDump {
            class: 3,
            limit: 10
        }
    );
    assert_eq!(
        stats(b"stats detail on\r\n"),
        StatsCmd::Detail(DetailCmd::On)
    );
    assert_eq!(
        stats(b"stats detail off\r\n"),
        StatsCmd::Detail(DetailCmd::Off)
    );
    assert_eq!(
        stats(b"stats detail dump\r\n"),
        StatsCmd::Detail(DetailCmd::Dump)
    );
    assert_eq!(err(b"stats detail\r\n"), DETAIL_USAGE);
    assert_eq!(err(b"stats cachedump 3\r\n"), CACHEDUMP_USAGE);
    assert_eq!(err(b"stats cachedump 3 -1\r\n"), BAD_FORMAT);
    assert_eq!(err(b"stats HTTP/1.1\r\n"), ERROR);
}

#[test]
fn an_http_request_line_hangs_up() {
    for line in [
        &b"GET / HTTP/1.0\r\n"[..],
        b"POST /x HTTP/1.1\r\n",
        b"PUT /x HTTP/1.1\r\n",
        b"DELETE /x HTTP/1.1\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"BREW /pot HTTP/2\r\n",
        b"HTTP/1.1\r\n",
    ] {
        assert_eq!(
            p(line).map(|f| f.0),
            Some(Frame::Hangup),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Known commands stay themselves, and HTTP must be the last token, as in memcached.
    assert!(matches!(cmd(b"get / HTTP/1.0\r\n"), Command::Get { .. }));
    assert_eq!(err(b"GET /\r\n"), ERROR);
    assert_eq!(err(b"GET / HTTP/1.1 x\r\n"), ERROR);
    assert_eq!(err(b"GET / http/1.1\r\n"), ERROR);
}

#[test]
fn the_item_size_limit_counts_header_and_key() {
    let limits = Limits {
        max_item_size: 1024,
        ..Limits::default()
    };
    let fits = 1024 - item_size(1, 0);
    let set = |len: usize| {
        let mut req = format!("set k 0 0 {len}\r\n").into_bytes();
        req.extend(std::iter::repeat_n(b'v', len));
        req.extend_from_slice(b"\r\n");
        req
    };
    let ok = set(fits);
    assert!(matches!(
        parse(&ok, &limits),
        Some((Frame::Command(Command::Store { .. }), _))
    ));
    let big = set(fits + 1);
    assert!(matches!(
        parse(&big, &limits),
        Some((
            Frame::Swallow {
                reply: Some(TOO_LARGE),
                unlink: Some(b"k"),
                ..
            },
            _
        ))
    ));
    // A too-large ms drops the old value whatever its mode, as memcached does.
    assert!(matches!(
        parse(b"ms k 2000 MA\r\n", &limits),
        Some((
            Frame::Swallow {
                reply: Some(TOO_LARGE),
                unlink: Some(b"k"),
                ..
            },
            _
        ))
    ));
}

#[test]
fn meta_set_carries_a_copys_write_time_with_z_only() {
    match cmd(b"ms key 1 ME Z c W1700000000123\r\nv\r\n") {
        Command::MetaSet { flags, .. } => {
            assert!(flags.unless_deleted);
            assert_eq!(flags.written_ms, Some(1_700_000_000_123));
        }
        other => panic!("{other:?}"),
    }
    match cmd(b"ms key 1 ME Z\r\nv\r\n") {
        Command::MetaSet { flags, .. } => assert_eq!(flags.written_ms, None),
        other => panic!("{other:?}"),
    }
    for (line, reply) in [
        (&b"ms key 1 W5\r\nv\r\n"[..], "CLIENT_ERROR invalid flag"),
        (&b"ms key 1 ME Z Wx\r\nv\r\n"[..], BAD_TOKEN),
    ] {
        assert!(
            matches!(
                p(line),
                Some((Frame::Swallow { reply: Some(r), bytes: 3, .. }, _)) if r == reply
            ),
            "{:?}: {:?}",
            String::from_utf8_lossy(line),
            p(line)
        );
    }
}
