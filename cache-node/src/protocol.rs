//! The memcached text protocol, parsed without I/O: bytes in, a command and the number of
//! bytes it used out.
//!
//! Framing is two-step, as in mini-redis: `parse` first checks that a whole command line (and
//! for storage commands the whole data block) is buffered and returns `None` otherwise, so a
//! partial command is never an error. Limits are enforced here, before any allocation: the
//! line length, the key length and characters, and the data block length. A rejected storage
//! command whose length parses has its data block skipped (`Frame::Swallow`), so value bytes
//! are never run as commands; memcached only does that for oversized values.
//!
//! Numbers are read as memcached reads them (an optional `+`, decimal digits, nothing after
//! them; a `-` only where the field is signed), with one deliberate difference: a number that
//! does not fit its field is refused with the error memcached gives that field for garbage,
//! where memcached 1.6 silently truncates it to 32 bits (flags, exptimes, `verbosity`).
//!
//! An unknown command whose last token starts with `HTTP/` is a browser or proxy talking
//! HTTP to the data port (a cross-protocol attack from a web page): the connection is
//! closed without a word, as memcached does (`Frame::Hangup`).

/// Longest key memcached accepts.
pub const MAX_KEY_LEN: usize = 250;

/// Limits the parser enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest data block of a storage command.
    pub max_item_size: usize,
    /// Longest command line other than retrievals (memcached: 2048).
    pub max_line: usize,
    /// Longest retrieval line (`get` with many keys).
    pub max_get_line: usize,
}

/// memcached's default item size limit (`-I 1m`), which a bare `cachepool node` keeps.
pub const DEFAULT_MAX_ITEM_SIZE: usize = 1 << 20;

/// What an item of a `key_len`-byte key and a `value_len`-byte value weighs against the item
/// size limit: the node's whole item allocation (header, key, value), as memcached counts its
/// own item header and key against `-I`.
pub fn item_size(key_len: usize, value_len: usize) -> usize {
    crate::store::ITEM_HEADER_LEN + key_len + value_len
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_item_size: DEFAULT_MAX_ITEM_SIZE,
            max_line: 2048,
            max_get_line: 256 << 10,
        }
    }
}

/// The storage commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreCmd {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    Cas(u64),
}

/// `stats` and its arguments: every form memcached 1.6 accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsCmd {
    General,
    Settings,
    Reset,
    /// `stats items`: per size class item counts.
    Items,
    /// `stats slabs`: per size class memory.
    Slabs,
    /// `stats sizes`: item counts by size, in 32-byte buckets.
    Sizes,
    /// `stats sizes_enable` / `stats sizes_disable`.
    SizesEnable(bool),
    /// `stats conns`: one block per open connection.
    Conns,
    /// `stats cachedump <class> <limit>`: keys of one size class.
    CacheDump {
        class: u32,
        limit: u32,
    },
    /// `stats detail on|off|dump`: per key prefix counters.
    Detail(DetailCmd),
    /// `stats extstore`: external storage (the node has none).
    Extstore,
}

/// The argument of `stats detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetailCmd {
    On,
    Off,
    Dump,
}

/// A complete, valid command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `get`/`gets` (`touch` None) and `gat`/`gats` (`touch` the new exptime).
    Get {
        keys: Keys<'a>,
        cas: bool,
        touch: Option<i64>,
    },
    Store {
        cmd: StoreCmd,
        key: &'a [u8],
        flags: u32,
        exptime: i64,
        data: &'a [u8],
        noreply: bool,
    },
    Delete {
        key: &'a [u8],
        noreply: bool,
    },
    Arith {
        incr: bool,
        key: &'a [u8],
        delta: u64,
        noreply: bool,
    },
    Touch {
        key: &'a [u8],
        exptime: i64,
        noreply: bool,
    },
    FlushAll {
        delay: i64,
        noreply: bool,
    },
    Stats(StatsCmd),
    Version,
    Verbosity {
        noreply: bool,
    },
    /// `cache_memlimit <MiB>`: change the capacity live.
    CacheMemlimit {
        mib: u64,
        noreply: bool,
    },
    Quit,
    /// Meta get (`mg`): the subset of flags the pool client needs.
    MetaGet {
        key: &'a [u8],
        flags: MetaGetFlags<'a>,
    },
    /// Meta no-op (`mn`): answers `MN`, marking the end of a batch of quiet meta commands.
    MetaNoop,
    /// Meta set (`ms`): a storage command that can compare and return CAS values.
    MetaSet {
        key: &'a [u8],
        data: &'a [u8],
        flags: MetaSetFlags<'a>,
    },
    /// Meta delete (`md`): a delete that can be conditional on the CAS value.
    MetaDelete {
        key: &'a [u8],
        flags: MetaDeleteFlags<'a>,
    },
}

/// Flags of a meta set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaSetFlags<'a> {
    /// `M<mode>`: S set (default), E add, R replace, A append, P prepend.
    pub mode: StoreCmd,
    /// `F<flags>`: client flags.
    pub client_flags: u32,
    /// `T<ttl>`: exptime, memcached's rules (default 0).
    pub ttl: i64,
    /// `C<cas>`: store only if the item's CAS value is this.
    pub compare_cas: Option<u64>,
    /// `c`: return the stored item's CAS value.
    pub return_cas: bool,
    /// `k`: return the key.
    pub return_key: bool,
    /// `q`: say nothing on success.
    pub quiet: bool,
    /// `O<token>`: echo an opaque token.
    pub opaque: Option<&'a [u8]>,
    /// `Z` (Cachepool's extension, with mode E): refuse the add if the key was deleted in the
    /// last `store::TOMBSTONE_SECS` seconds. Used for copies carried forward in a migration.
    pub unless_deleted: bool,
    /// `W<ms>` (Cachepool's extension, only with `Z`): the copy's write time, Unix
    /// milliseconds on the clock of the node the write reached. A tombstone then refuses the
    /// copy only if the delete is not older than the write (`store::CLOCK_SKEW_MS` allowed).
    pub written_ms: Option<u64>,
}

/// Flags of a meta delete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaDeleteFlags<'a> {
    /// `C<cas>`: delete only if the item's CAS value is this.
    pub compare_cas: Option<u64>,
    /// `k`: return the key.
    pub return_key: bool,
    /// `q`: say nothing on success.
    pub quiet: bool,
    /// `O<token>`: echo an opaque token.
    pub opaque: Option<&'a [u8]>,
    /// `Y` (Cachepool's extension): leave no tombstone. For a key that moved to another node
    /// (a write during a migration deletes the previous owner's copy): that is not a delete of
    /// the key, and a tombstone would refuse the key's newer value if it later moved back.
    pub no_tombstone: bool,
}

/// Flags of a meta get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaGetFlags<'a> {
    /// `v`: return the value.
    pub value: bool,
    /// `f`: return the client flags.
    pub client_flags: bool,
    /// `t`: return the remaining TTL in seconds (-1: never expires).
    pub ttl: bool,
    /// `c`: return the CAS value.
    pub cas: bool,
    /// `k`: return the key.
    pub key: bool,
    /// `s`: return the value size.
    pub size: bool,
    /// `q`: say nothing on a miss.
    pub quiet: bool,
    /// `O<token>`: echo an opaque token.
    pub opaque: Option<&'a [u8]>,
    /// `T<exptime>`: update the TTL as `touch` does.
    pub touch: Option<i64>,
    /// `w` (Cachepool's extension): return `w<ms>`, when the value was written (Unix ms), if
    /// the node still knows; the pool client carries it with a copy forward (`ms … Z W<ms>`).
    pub written: bool,
}

/// Validated keys of a retrieval, kept as the raw line tail to avoid allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys<'a>(&'a [u8]);

impl<'a> Keys<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        tokens(self.0)
    }
}

/// What the connection should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Command(Command<'a>),
    /// Answer with this line and go on with the next command.
    Error(&'static str),
    /// Answer with this line (unless the command said `noreply`), then discard the next
    /// `bytes` bytes (a rejected data block). `unlink` names a key whose old value must go:
    /// a `set` refused for size removes the previous value, as memcached does, so that a
    /// reader never gets a value older than a write that was attempted.
    Swallow {
        reply: Option<&'static str>,
        bytes: u64,
        unlink: Option<&'a [u8]>,
    },
    /// A rejected command that said `noreply`: nothing to answer (memcached stays silent).
    Silent,
    /// Answer with this line and close the connection.
    Close(&'static str),
    /// Close the connection at once, dropping answers not yet written: the peer speaks HTTP.
    Hangup,
}

pub const ERROR: &str = "ERROR";
pub const BAD_FORMAT: &str = "CLIENT_ERROR bad command line format";
pub const BAD_CHUNK: &str = "CLIENT_ERROR bad data chunk";
pub const LINE_TOO_LONG: &str = "CLIENT_ERROR line too long";
pub const TOO_LARGE: &str = "SERVER_ERROR object too large for cache";
pub const BAD_DELTA: &str = "CLIENT_ERROR invalid numeric delta argument";
pub const BAD_EXPTIME: &str = "CLIENT_ERROR invalid exptime argument";
pub const BAD_TOKEN: &str = "CLIENT_ERROR bad token in command line format";
pub const BAD_META_FLAG: &str = "CLIENT_ERROR invalid or duplicate flag";
pub const CACHEDUMP_USAGE: &str = "CLIENT_ERROR bad command line";
pub const DETAIL_USAGE: &str = "CLIENT_ERROR usage: stats detail on|off|dump";
pub const MEMLIMIT_TOO_SMALL: &str = "MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m";
pub const MEMLIMIT_TOO_LARGE: &str = "MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes";
pub const DELETE_USAGE: &str =
    "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]";

/// Most arguments looked at for any command (extra ones make the count check fail).
const MAX_ARGS: usize = 8;

fn tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b' ').filter(|t| !t.is_empty())
}

fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.iter().all(|&b| b > 0x20 && b != 0x7f)
}

/// An unsigned decimal as memcached's `safe_strtoull` takes it: an optional `+`, digits and
/// nothing else; `None` on overflow. Hand-rolled rather than `str::parse` because it runs for
/// every storage command's length (no UTF-8 check, no second pass).
fn parse_u64(tok: &[u8]) -> Option<u64> {
    let digits = tok.strip_prefix(b"+").unwrap_or(tok);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn parse_u32(tok: &[u8]) -> Option<u32> {
    parse_u64(tok).and_then(|v| u32::try_from(v).ok())
}

/// A signed 32-bit number, as memcached's `safe_strtol` takes exptimes: an optional sign and
/// digits. Out of range is refused (memcached 1.6 truncates it to 32 bits).
fn parse_i32(tok: &[u8]) -> Option<i64> {
    let (neg, digits) = match tok.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, tok),
    };
    if digits.first() == Some(&b'-') || (neg && digits.first() == Some(&b'+')) {
        return None;
    }
    let v = i64::try_from(parse_u64(digits)?).ok()?;
    let v = if neg { -v } else { v };
    (i64::from(i32::MIN)..=i64::from(i32::MAX))
        .contains(&v)
        .then_some(v)
}

fn is_retrieval(line: &[u8]) -> bool {
    [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|p| line.starts_with(p))
}

/// Parses one command from the front of `buf`. `None` means more bytes are needed; otherwise
/// the frame and the number of bytes it consumed (never zero).
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Option<(Frame<'a>, usize)> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        let limit = if is_retrieval(buf) {
            limits.max_get_line
        } else {
            limits.max_line
        };
        return (buf.len() > limit).then_some((Frame::Close(LINE_TOO_LONG), buf.len()));
    };
    let line_end = nl + 1;
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let limit = if is_retrieval(line) {
        limits.max_get_line
    } else {
        limits.max_line
    };
    if line.len() > limit {
        return Some((Frame::Close(LINE_TOO_LONG), line_end));
    }
    let mut toks = tokens(line);
    let Some(name) = toks.next() else {
        return Some((Frame::Error(ERROR), line_end));
    };
    // No command but the retrievals (which re-read their line) takes more than 7 arguments;
    // a fixed array keeps parsing allocation-free.
    let mut buf_args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    let mut n = 0;
    for tok in toks.take(MAX_ARGS) {
        buf_args[n] = tok;
        n += 1;
    }
    let args = &buf_args[..n];
    let noreply = args.last() == Some(&&b"noreply"[..]);
    let frame = match name {
        b"get" | b"gets" | b"gat" | b"gats" => retrieval(name, line, args),
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => {
            return storage(name, args, noreply, &buf[line_end..], line_end, limits);
        }
        b"delete" => delete(args, noreply),
        b"incr" | b"decr" => arith(name == b"incr", args, noreply),
        b"touch" => touch(args, noreply),
        b"flush_all" => flush_all(args, noreply),
        b"stats" => stats(args),
        // memcached ignores arguments to `version`.
        b"version" => Frame::Command(Command::Version),
        // The level is checked as memcached checks it, and ignored: the node logs through
        // `tracing` (RUST_LOG).
        b"verbosity" if !args.is_empty() && args.len() <= 2 => match parse_u32(args[0]) {
            Some(_) => Frame::Command(Command::Verbosity { noreply }),
            None => Frame::Error(BAD_FORMAT),
        },
        b"cache_memlimit" if matches!(args.len(), 1 | 2) => cache_memlimit(args[0], noreply),
        b"quit" => Frame::Command(Command::Quit),
        b"mg" => meta_get(line),
        b"ms" => return meta_set(line, &buf[line_end..], line_end, limits),
        b"md" => meta_delete(line),
        b"mn" => Frame::Command(Command::MetaNoop),
        _ if tokens(line).last().is_some_and(|t| t.starts_with(b"HTTP/")) => Frame::Hangup,
        _ => Frame::Error(ERROR),
    };
    // A recognised command with `noreply` keeps quiet about its errors too, or the client
    // would read the error as the answer to its next command. `ERROR` (unknown command or
    // wrong argument count) is still sent, as memcached does.
    let frame = match frame {
        Frame::Error(e) if noreply && e != ERROR => Frame::Silent,
        other => other,
    };
    Some((frame, line_end))
}

fn retrieval<'a>(name: &[u8], line: &'a [u8], args: &[&'a [u8]]) -> Frame<'a> {
    let touch = name.starts_with(b"gat");
    let cas = name.ends_with(b"s");
    if args.is_empty() {
        return Frame::Error(ERROR);
    }
    // Keys are everything after the command (and the exptime for gat); `args` was capped, so
    // re-tokenise the line tail rather than trusting it.
    let mut rest = tokens(line).skip(1);
    let exptime = if touch {
        match rest.next().and_then(parse_i32) {
            Some(t) => Some(t),
            None => return Frame::Error(BAD_EXPTIME),
        }
    } else {
        None
    };
    let Some(first) = rest.next() else {
        // `gat <exptime>` with no key: memcached answers a retrieval of nothing.
        return Frame::Command(Command::Get {
            keys: Keys(&[]),
            cas,
            touch: exptime,
        });
    };
    let offset = first.as_ptr() as usize - line.as_ptr() as usize;
    let tail = &line[offset..];
    if !tokens(tail).all(valid_key) {
        return Frame::Error(BAD_FORMAT);
    }
    Frame::Command(Command::Get {
        keys: Keys(tail),
        cas,
        touch: exptime,
    })
}

fn storage<'a>(
    name: &[u8],
    args: &[&'a [u8]],
    noreply: bool,
    after: &'a [u8],
    line_end: usize,
    limits: &Limits,
) -> Option<(Frame<'a>, usize)> {
    let is_cas = name == b"cas";
    let required = if is_cas { 5 } else { 4 };
    // One extra token is allowed and ignored unless it is `noreply`, as memcached does.
    if args.len() != required && args.len() != required + 1 {
        return Some((Frame::Error(ERROR), line_end));
    }
    // The length decides how much follows; without a valid one nothing can be skipped.
    let Some(len) = parse_u64(args[3]).filter(|&n| n <= i32::MAX as u64 - 2) else {
        return Some((Frame::Error(BAD_FORMAT), line_end));
    };
    let quiet = |reply| (!noreply).then_some(reply);
    let swallow = |reply| {
        Some((
            Frame::Swallow {
                reply: quiet(reply),
                bytes: len + 2,
                unlink: None,
            },
            line_end,
        ))
    };
    let key = args[0];
    let (Some(flags), Some(exptime)) = (parse_u32(args[1]), parse_i32(args[2])) else {
        return swallow(BAD_FORMAT);
    };
    let cas_unique = if is_cas {
        match parse_u64(args[4]) {
            Some(v) => v,
            None => return swallow(BAD_FORMAT),
        }
    } else {
        0
    };
    if !valid_key(key) {
        return swallow(BAD_FORMAT);
    }
    if item_size(key.len(), len as usize) > limits.max_item_size {
        let unlink = (name == b"set").then_some(key);
        return Some((
            Frame::Swallow {
                reply: quiet(TOO_LARGE),
                bytes: len + 2,
                unlink,
            },
            line_end,
        ));
    }
    let len = len as usize;
    if after.len() < len + 2 {
        return None;
    }
    let consumed = line_end + len + 2;
    if &after[len..len + 2] != b"\r\n" {
        let frame = if noreply {
            Frame::Silent
        } else {
            Frame::Error(BAD_CHUNK)
        };
        return Some((frame, consumed));
    }
    let cmd = match name {
        b"set" => StoreCmd::Set,
        b"add" => StoreCmd::Add,
        b"replace" => StoreCmd::Replace,
        b"append" => StoreCmd::Append,
        b"prepend" => StoreCmd::Prepend,
        _ => StoreCmd::Cas(cas_unique),
    };
    let data = &after[..len];
    Some((
        Frame::Command(Command::Store {
            cmd,
            key,
            flags,
            exptime,
            data,
            noreply,
        }),
        consumed,
    ))
}

fn meta_get(line: &[u8]) -> Frame<'_> {
    let mut toks = tokens(line).skip(1);
    let Some(key) = toks.next() else {
        return Frame::Error(BAD_FORMAT);
    };
    if !valid_key(key) {
        return Frame::Error(BAD_FORMAT);
    }
    let mut flags = MetaGetFlags::default();
    for tok in toks {
        let (&flag, token) = match tok.split_first() {
            Some(split) => split,
            None => continue,
        };
        match flag {
            b'v' => flags.value = true,
            b'f' => flags.client_flags = true,
            b't' => flags.ttl = true,
            b'c' => flags.cas = true,
            b'k' => flags.key = true,
            b's' => flags.size = true,
            b'q' => flags.quiet = true,
            b'w' => flags.written = true,
            b'O' if token.len() <= 32 => flags.opaque = Some(token),
            b'T' => match parse_i32(token) {
                Some(t) => flags.touch = Some(t),
                None => return Frame::Error(BAD_TOKEN),
            },
            _ => return Frame::Error("CLIENT_ERROR invalid flag"),
        }
    }
    Frame::Command(Command::MetaGet { key, flags })
}

fn meta_set<'a>(
    line: &'a [u8],
    after: &'a [u8],
    line_end: usize,
    limits: &Limits,
) -> Option<(Frame<'a>, usize)> {
    let mut toks = tokens(line).skip(1);
    let (Some(key), Some(len)) = (toks.next(), toks.next()) else {
        return Some((Frame::Error(BAD_FORMAT), line_end));
    };
    let Some(len) = parse_u64(len).filter(|&n| n <= i32::MAX as u64 - 2) else {
        return Some((Frame::Error(BAD_FORMAT), line_end));
    };
    let mut flags = MetaSetFlags {
        mode: StoreCmd::Set,
        client_flags: 0,
        ttl: 0,
        compare_cas: None,
        return_cas: false,
        return_key: false,
        quiet: false,
        opaque: None,
        unless_deleted: false,
        written_ms: None,
    };
    let mut bad = None;
    for tok in toks {
        let Some((&flag, token)) = tok.split_first() else {
            continue;
        };
        match flag {
            b'F' => match parse_u32(token) {
                Some(f) => flags.client_flags = f,
                None => bad = Some(BAD_FORMAT),
            },
            b'T' => match parse_i32(token) {
                Some(t) => flags.ttl = t,
                None => bad = Some(BAD_TOKEN),
            },
            b'C' => match parse_u64(token) {
                Some(c) => flags.compare_cas = Some(c),
                None => bad = Some(BAD_TOKEN),
            },
            b'M' => match token {
                b"S" | b"s" => flags.mode = StoreCmd::Set,
                b"E" | b"e" => flags.mode = StoreCmd::Add,
                b"R" | b"r" => flags.mode = StoreCmd::Replace,
                b"A" | b"a" => flags.mode = StoreCmd::Append,
                b"P" | b"p" => flags.mode = StoreCmd::Prepend,
                _ => bad = Some("CLIENT_ERROR invalid mode for ms M token"),
            },
            b'c' => flags.return_cas = true,
            b'k' => flags.return_key = true,
            b'q' => flags.quiet = true,
            b'Z' => flags.unless_deleted = true,
            b'W' => match parse_u64(token) {
                Some(ms) => flags.written_ms = Some(ms),
                None => bad = Some(BAD_TOKEN),
            },
            b'O' if token.len() <= 32 => flags.opaque = Some(token),
            _ => bad = Some("CLIENT_ERROR invalid flag"),
        }
    }
    let swallow = |reply, unlink| {
        Some((
            Frame::Swallow {
                reply: Some(reply),
                bytes: len + 2,
                unlink,
            },
            line_end,
        ))
    };
    if flags.written_ms.is_some() && !flags.unless_deleted {
        // A write time says how old a copy is; on anything but a copy it would be a client's
        // claim the node has no use for.
        bad = bad.or(Some("CLIENT_ERROR invalid flag"));
    }
    if let Some(reply) = bad {
        return swallow(reply, None);
    }
    if !valid_key(key) {
        return swallow(BAD_FORMAT, None);
    }
    // memcached drops the old value on a too-large `ms` whatever its mode.
    if item_size(key.len(), len as usize) > limits.max_item_size {
        return swallow(TOO_LARGE, Some(key));
    }
    let len = len as usize;
    if after.len() < len + 2 {
        return None;
    }
    let consumed = line_end + len + 2;
    if &after[len..len + 2] != b"\r\n" {
        return Some((Frame::Error(BAD_CHUNK), consumed));
    }
    Some((
        Frame::Command(Command::MetaSet {
            key,
            data: &after[..len],
            flags,
        }),
        consumed,
    ))
}

fn meta_delete(line: &[u8]) -> Frame<'_> {
    let mut toks = tokens(line).skip(1);
    let Some(key) = toks.next() else {
        return Frame::Error(BAD_FORMAT);
    };
    if !valid_key(key) {
        return Frame::Error(BAD_FORMAT);
    }
    let mut flags = MetaDeleteFlags::default();
    for tok in toks {
        let Some((&flag, token)) = tok.split_first() else {
            continue;
        };
        match flag {
            b'C' => match parse_u64(token) {
                Some(c) => flags.compare_cas = Some(c),
                None => return Frame::Error(BAD_META_FLAG),
            },
            b'k' => flags.return_key = true,
            b'q' => flags.quiet = true,
            b'O' if token.len() <= 32 => flags.opaque = Some(token),
            b'Y' => flags.no_tombstone = true,
            _ => return Frame::Error("CLIENT_ERROR invalid flag"),
        }
    }
    Frame::Command(Command::MetaDelete { key, flags })
}

fn delete<'a>(args: &[&'a [u8]], noreply: bool) -> Frame<'a> {
    // memcached accepts a legacy hold time only if it is "0".
    let valid = match args {
        [_] => true,
        [_, b"0"] => true,
        [_, _] => noreply,
        [_, b"0", _] => noreply,
        _ => false,
    };
    if args.is_empty() {
        return Frame::Error(ERROR);
    }
    if !valid {
        return Frame::Error(DELETE_USAGE);
    }
    if !valid_key(args[0]) {
        return Frame::Error(BAD_FORMAT);
    }
    Frame::Command(Command::Delete {
        key: args[0],
        noreply,
    })
}

fn arith<'a>(incr: bool, args: &[&'a [u8]], noreply: bool) -> Frame<'a> {
    if args.len() != 2 && args.len() != 3 {
        return Frame::Error(ERROR);
    }
    if !valid_key(args[0]) {
        return Frame::Error(BAD_FORMAT);
    }
    match parse_u64(args[1]) {
        Some(delta) => Frame::Command(Command::Arith {
            incr,
            key: args[0],
            delta,
            noreply,
        }),
        None => Frame::Error(BAD_DELTA),
    }
}

fn touch<'a>(args: &[&'a [u8]], noreply: bool) -> Frame<'a> {
    if args.len() != 2 && args.len() != 3 {
        return Frame::Error(ERROR);
    }
    if !valid_key(args[0]) {
        return Frame::Error(BAD_FORMAT);
    }
    match parse_i32(args[1]) {
        Some(exptime) => Frame::Command(Command::Touch {
            key: args[0],
            exptime,
            noreply,
        }),
        None => Frame::Error(BAD_EXPTIME),
    }
}

fn flush_all<'a>(args: &[&'a [u8]], noreply: bool) -> Frame<'a> {
    // memcached reads the delay from the first argument unless that is `noreply`, and
    // ignores one more argument.
    match args {
        [] | [b"noreply"] => Frame::Command(Command::FlushAll { delay: 0, noreply }),
        [delay] | [delay, _] => match parse_i32(delay) {
            Some(delay) => Frame::Command(Command::FlushAll { delay, noreply }),
            None => Frame::Error(BAD_EXPTIME),
        },
        _ => Frame::Error(ERROR),
    }
}

fn cache_memlimit<'a>(arg: &[u8], noreply: bool) -> Frame<'a> {
    // memcached answers a non-number with `ERROR`, and keeps quiet about it under noreply.
    let Some(mib) = parse_u64(arg) else {
        return if noreply {
            Frame::Silent
        } else {
            Frame::Error(ERROR)
        };
    };
    if mib < 8 {
        Frame::Error(MEMLIMIT_TOO_SMALL)
    } else if mib > crate::admin::MAX_CAPACITY_MIB {
        Frame::Error(MEMLIMIT_TOO_LARGE)
    } else {
        Frame::Command(Command::CacheMemlimit { mib, noreply })
    }
}

/// `stats <what> ...`: memcached looks at the first argument only (`stats reset now` resets).
fn stats<'a>(args: &[&'a [u8]]) -> Frame<'a> {
    let which = match args {
        [] => StatsCmd::General,
        [b"settings", ..] => StatsCmd::Settings,
        [b"reset", ..] => StatsCmd::Reset,
        [b"items", ..] => StatsCmd::Items,
        [b"slabs", ..] => StatsCmd::Slabs,
        [b"sizes", ..] => StatsCmd::Sizes,
        [b"sizes_enable", ..] => StatsCmd::SizesEnable(true),
        [b"sizes_disable", ..] => StatsCmd::SizesEnable(false),
        [b"conns", ..] => StatsCmd::Conns,
        [b"extstore", ..] => StatsCmd::Extstore,
        [b"detail", b"on", ..] => StatsCmd::Detail(DetailCmd::On),
        [b"detail", b"off", ..] => StatsCmd::Detail(DetailCmd::Off),
        [b"detail", b"dump", ..] => StatsCmd::Detail(DetailCmd::Dump),
        [b"detail", ..] => return Frame::Error(DETAIL_USAGE),
        [b"cachedump", class, limit, ..] => match (parse_u32(class), parse_u32(limit)) {
            (Some(class), Some(limit)) => StatsCmd::CacheDump { class, limit },
            _ => return Frame::Error(BAD_FORMAT),
        },
        [b"cachedump", ..] => return Frame::Error(CACHEDUMP_USAGE),
        _ => return Frame::Error(ERROR),
    };
    Frame::Command(Command::Stats(which))
}

/// Converts a protocol exptime to an absolute Unix expiry (0 = never), memcached's rules:
/// 0 never expires, negative is already expired, up to 30 days is relative, beyond that an
/// absolute Unix time.
pub fn absolute_expiry(exptime: i64, now: u32) -> u32 {
    const MONTH: i64 = 60 * 60 * 24 * 30;
    match exptime {
        0 => 0,
        t if t < 0 => now.max(1),
        t if t > MONTH => {
            // An absolute time in the past is expired now.
            u32::try_from(t).unwrap_or(u32::MAX).max(1)
        }
        t => now.saturating_add(t as u32),
    }
}

#[cfg(test)]
mod tests;
