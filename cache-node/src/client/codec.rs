//! Requests as bytes and replies from bytes, without I/O: the one memcached codec of the
//! project, used by the pool client (one request at a time, strict) and by the benchmarks'
//! load generator (pipelines of `get` and `set`, [`parse_pipelined`]).
//!
//! Replies are framed in two steps, as the node frames commands: each parser first checks that
//! a whole reply is buffered (`Ok(None)` otherwise, never an error) and then parses it,
//! returning the reply and how many bytes it used. Parsing is strict because the client sends
//! one request at a time and knows exactly which answers are possible: anything else means the
//! connection is out of step with the node (or the peer is not a memcached node), and the
//! connection must not be trusted with another request. Lengths are bounded before anything
//! is buffered for them: reply lines by [`MAX_LINE`], values by the caller's limit.

use std::collections::HashMap;
use std::ops::Range;

/// Longest reply line accepted (a `VALUE` line with a 250-byte key is about 300 bytes).
pub const MAX_LINE: usize = 4096;

/// Why a reply was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not an answer to the request that was sent.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The node's error line (`SERVER_ERROR ...`, `CLIENT_ERROR ...`, `ERROR`).
    #[error("the server answered: {0}")]
    Server(String),
}

/// A complete reply and the bytes it used, `None` while more bytes are needed.
pub type Parsed<T> = Result<Option<(T, usize)>, ReplyError>;

/// The head of a value reply; `data` locates the value's bytes in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueHead {
    pub flags: u32,
    pub cas: u64,
    /// Remaining TTL in seconds, `None` when the item never expires (meta get only).
    pub ttl: Option<u32>,
    /// When the value was written (Unix ms), if the node still knows (meta get only).
    pub written_ms: Option<u64>,
    pub data: Range<usize>,
}

/// `gets <key>`.
pub fn encode_gets(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"gets", key]);
}

/// `mg <key> v f t c w`: value, client flags, remaining TTL, CAS and (Cachepool's `w`) the
/// write time.
pub fn encode_meta_get(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"mg", key, b"v", b"f", b"t", b"c", b"w"]);
}

/// `mg <key> c`: the CAS value alone.
pub fn encode_meta_cas(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"mg", key, b"c"]);
}

/// The line of a storage command (`set`, `add`); the data block follows it.
pub fn encode_store(
    out: &mut Vec<u8>,
    cmd: &[u8],
    key: &[u8],
    flags: u32,
    exptime: u32,
    len: usize,
) {
    let mut f = itoa::Buffer::new();
    let mut e = itoa::Buffer::new();
    let mut l = itoa::Buffer::new();
    command(
        out,
        &[
            cmd,
            key,
            f.format(flags).as_bytes(),
            e.format(exptime).as_bytes(),
            l.format(len).as_bytes(),
        ],
    );
}

/// `ms <key> <len> F<flags> T<exptime> ME Z c [W<ms>]`: an add that the node also refuses if
/// the key was deleted there recently (Cachepool's `Z`) unless the copy's write (`W`, when
/// known) is newer than the delete, returning the stored copy's CAS value; the data block
/// follows.
pub fn encode_meta_add(
    out: &mut Vec<u8>,
    key: &[u8],
    flags: u32,
    exptime: u32,
    written_ms: Option<u64>,
    len: usize,
) {
    let (mut l, mut f, mut e, mut w) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    let flags = [b"F", f.format(flags).as_bytes()].concat();
    let exptime = [b"T", e.format(exptime).as_bytes()].concat();
    let written = written_ms.map(|ms| [b"W", w.format(ms).as_bytes()].concat());
    let mut parts: Vec<&[u8]> = vec![
        b"ms",
        key,
        l.format(len).as_bytes(),
        &flags,
        &exptime,
        b"ME",
        b"Z",
        b"c",
    ];
    parts.extend(written.as_deref());
    command(out, &parts);
}

/// `md <key> Y`: delete without leaving a tombstone (Cachepool's extension).
pub fn encode_meta_delete_untombstoned(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"md", key, b"Y"]);
}

/// `md <key> C<cas>`: delete only that version of the item.
pub fn encode_meta_delete_cas(out: &mut Vec<u8>, key: &[u8], cas: u64) {
    let mut c = itoa::Buffer::new();
    command(
        out,
        &[b"md", key, &[b"C", c.format(cas).as_bytes()].concat()],
    );
}

/// `delete <key>`.
pub fn encode_delete(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"delete", key]);
}

/// `touch <key> <exptime>`.
pub fn encode_touch(out: &mut Vec<u8>, key: &[u8], exptime: u32) {
    let mut e = itoa::Buffer::new();
    command(out, &[b"touch", key, e.format(exptime).as_bytes()]);
}

fn command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// `get <key>` (the load generator's read: no CAS, one key).
pub fn encode_get(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"get", key]);
}

/// One `get` naming every key of `keys`.
pub fn encode_multi_get<'a>(out: &mut Vec<u8>, keys: impl IntoIterator<Item = &'a [u8]>) {
    out.extend_from_slice(b"get");
    for key in keys {
        out.push(b' ');
        out.extend_from_slice(key);
    }
    out.extend_from_slice(b"\r\n");
}

/// `set <key> 0 0 <len>` and its data block.
pub fn encode_set(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    encode_store(out, b"set", key, 0, 0, value.len());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A reply read off a pipeline of `get`s and `set`s, by a client that counts rather than
/// keeps values (the benchmarks' load generator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pipelined {
    /// The answer to a `get`: how many keys were found, and their data bytes in total.
    Get { hits: u32, value_bytes: usize },
    /// `STORED`.
    Stored,
    /// A refusal or error line (`SERVER_ERROR ...`, `NOT_STORED`, ...): counted, not fatal.
    Refused(String),
}

/// The reply at the front of a pipeline of `get`s and `set`s: `STORED`, `END`, `VALUE` blocks
/// up to `END` (of any key, as many as a multi-get asks), or a refusal. Values are skipped
/// without a size limit of their own: the node's item limit bounds them.
pub fn parse_pipelined(buf: &[u8]) -> Parsed<Pipelined> {
    let Some((first, mut end)) = line_at(buf, 0)? else {
        return Ok(None);
    };
    match first {
        b"STORED" => return Ok(Some((Pipelined::Stored, end))),
        b"END" => {
            return Ok(Some((
                Pipelined::Get {
                    hits: 0,
                    value_bytes: 0,
                },
                end,
            )));
        }
        _ if first.starts_with(b"VALUE ") => {}
        _ if [
            &b"SERVER_ERROR"[..],
            b"CLIENT_ERROR",
            b"ERROR",
            b"NOT_STORED",
            b"EXISTS",
            b"NOT_FOUND",
        ]
        .iter()
        .any(|p| first.starts_with(p)) =>
        {
            return Ok(Some((
                Pipelined::Refused(String::from_utf8_lossy(first).into_owned()),
                end,
            )));
        }
        _ => return Err(unexpected("STORED, END, VALUE or a refusal", first)),
    }
    let (mut hits, mut value_bytes) = (0u32, 0usize);
    let mut header = first;
    loop {
        let len = header
            .split(|&b| b == b' ')
            .nth(3)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<usize>().ok())
            .ok_or_else(|| unexpected("VALUE <key> <flags> <bytes>", header))?;
        let Some(block) = data_block(buf, end, len, usize::MAX - 2)? else {
            return Ok(None);
        };
        end = block.end + 2;
        hits += 1;
        value_bytes += len;
        let Some((next, after)) = line_at(buf, end)? else {
            return Ok(None);
        };
        end = after;
        if next == b"END" {
            return Ok(Some((Pipelined::Get { hits, value_bytes }, end)));
        }
        if !next.starts_with(b"VALUE ") {
            return Err(unexpected("VALUE or END", next));
        }
        header = next;
    }
}

/// The reply to `gets <key>`: `VALUE <key> <flags> <len> <cas>`, the data, `END`; or `END`.
pub fn parse_gets(buf: &[u8], key: &[u8], max_value: usize) -> Parsed<Option<ValueHead>> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == b"END" {
        return Ok(Some((None, end)));
    }
    let mut toks = line.split(|&b| b == b' ');
    let (Some(b"VALUE"), Some(k), Some(flags), Some(len), Some(cas), None) = (
        toks.next(),
        toks.next(),
        toks.next(),
        toks.next(),
        toks.next(),
        toks.next(),
    ) else {
        return Err(unexpected("a VALUE line or END", line));
    };
    if k != key {
        return Err(unexpected("the requested key", line));
    }
    let (Some(flags), Some(len), Some(cas)) = (
        number::<u32>(flags),
        number::<usize>(len),
        number::<u64>(cas),
    ) else {
        return Err(unexpected("numbers in the VALUE line", line));
    };
    let Some(data) = data_block(buf, end, len, max_value)? else {
        return Ok(None);
    };
    let Some((last, used)) = line_at(buf, data.end + 2)? else {
        return Ok(None);
    };
    if last != b"END" {
        return Err(unexpected("END after the value", last));
    }
    Ok(Some((
        Some(ValueHead {
            flags,
            cas,
            ttl: None,
            written_ms: None,
            data,
        }),
        used,
    )))
}

/// The reply to `mg <key> v f t c w`: `VA <len> f<flags> t<ttl> c<cas> [w<ms>]` and the data;
/// or `EN`.
pub fn parse_meta_get(buf: &[u8], max_value: usize) -> Parsed<Option<ValueHead>> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == b"EN" {
        return Ok(Some((None, end)));
    }
    let mut toks = line.split(|&b| b == b' ');
    let (Some(b"VA"), Some(len)) = (toks.next(), toks.next()) else {
        return Err(unexpected("a VA line or EN", line));
    };
    let Some(len) = number::<usize>(len) else {
        return Err(unexpected("a value length", line));
    };
    let (mut flags, mut ttl, mut cas, mut written_ms) = (None, None, None, None);
    for tok in toks {
        let ok = match tok.split_first() {
            Some((&b'w', v)) if written_ms.is_none() => {
                written_ms = number::<u64>(v);
                written_ms.is_some()
            }
            Some((&b'f', v)) if flags.is_none() => {
                flags = number::<u32>(v);
                flags.is_some()
            }
            Some((&b't', v)) if ttl.is_none() => {
                // -1: never expires.
                ttl = if v == b"-1" {
                    Some(None)
                } else {
                    number::<u32>(v).map(Some)
                };
                ttl.is_some()
            }
            Some((&b'c', v)) if cas.is_none() => {
                cas = number::<u64>(v);
                cas.is_some()
            }
            _ => false,
        };
        if !ok {
            return Err(unexpected(
                "the flags f, t and c once each (and w at most once)",
                line,
            ));
        }
    }
    let (Some(flags), Some(ttl), Some(cas)) = (flags, ttl, cas) else {
        return Err(unexpected("the flags f, t and c once each", line));
    };
    let Some(data) = data_block(buf, end, len, max_value)? else {
        return Ok(None);
    };
    let used = data.end + 2;
    Ok(Some((
        Some(ValueHead {
            flags,
            cas,
            ttl,
            written_ms,
            data,
        }),
        used,
    )))
}

/// The reply to `mg <key> c`: `HD c<cas>`, or `EN`.
pub fn parse_meta_cas(buf: &[u8]) -> Parsed<Option<u64>> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == b"EN" {
        return Ok(Some((None, end)));
    }
    match line.strip_prefix(b"HD c").and_then(number::<u64>) {
        Some(cas) => Ok(Some((Some(cas), end))),
        None => Err(unexpected("HD c<cas> or EN", line)),
    }
}

/// The reply to a meta add: `HD c<cas>` (stored), or `NS` with any flags (not stored).
pub fn parse_meta_add(buf: &[u8]) -> Parsed<Option<u64>> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == b"NS" || line.starts_with(b"NS ") {
        return Ok(Some((None, end)));
    }
    match line.strip_prefix(b"HD c").and_then(number::<u64>) {
        Some(cas) => Ok(Some((Some(cas), end))),
        None => Err(unexpected("HD c<cas> or NS", line)),
    }
}

/// The reply to `md <key> C<cas>`: `HD` (deleted), `NF` or `EX` (not deleted).
pub fn parse_meta_delete(buf: &[u8]) -> Parsed<bool> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    match line {
        b"HD" => Ok(Some((true, end))),
        b"NF" | b"EX" => Ok(Some((false, end))),
        _ => Err(unexpected("HD, NF or EX", line)),
    }
}

/// A one-line reply that is either `yes` (true) or `no` (false).
pub fn parse_either(buf: &[u8], yes: &'static [u8], no: &'static [u8]) -> Parsed<bool> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == yes {
        Ok(Some((true, end)))
    } else if line == no {
        Ok(Some((false, end)))
    } else {
        Err(unexpected_either(yes, no, line))
    }
}

/// A one-line reply that must be exactly `word`.
pub fn parse_word(buf: &[u8], word: &'static [u8]) -> Parsed<()> {
    let Some((line, end)) = first_line(buf)? else {
        return Ok(None);
    };
    if line == word {
        Ok(Some(((), end)))
    } else {
        Err(unexpected(&String::from_utf8_lossy(word), line))
    }
}

/// The reply to `stats`: `STAT <name> <value>` lines, then `END`.
pub fn parse_stats(buf: &[u8]) -> Parsed<HashMap<String, String>> {
    let mut stats = HashMap::new();
    let Some((mut line, mut end)) = first_line(buf)? else {
        return Ok(None);
    };
    loop {
        if line == b"END" {
            return Ok(Some((stats, end)));
        }
        let Some(rest) = line.strip_prefix(b"STAT ") else {
            return Err(unexpected("a STAT line or END", line));
        };
        let Some(space) = rest.iter().position(|&b| b == b' ') else {
            return Err(unexpected("STAT <name> <value>", line));
        };
        let (Ok(name), Ok(value)) = (
            std::str::from_utf8(&rest[..space]),
            std::str::from_utf8(&rest[space + 1..]),
        ) else {
            return Err(unexpected("a UTF-8 STAT line", line));
        };
        if name.is_empty() {
            return Err(unexpected("STAT <name> <value>", line));
        }
        stats.insert(name.to_string(), value.to_string());
        let Some(next) = line_at(buf, end)? else {
            return Ok(None);
        };
        (line, end) = next;
    }
}

/// The first line of a reply, with the node's error lines turned into [`ReplyError::Server`].
fn first_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ReplyError> {
    let Some((line, end)) = line_at(buf, 0)? else {
        return Ok(None);
    };
    if line == b"ERROR" || line.starts_with(b"SERVER_ERROR") || line.starts_with(b"CLIENT_ERROR") {
        return Err(ReplyError::Server(
            String::from_utf8_lossy(line).into_owned(),
        ));
    }
    Ok(Some((line, end)))
}

/// The `\r\n`-terminated line starting at `from` (without its terminator) and the offset
/// after it; `None` if it is not all buffered yet.
fn line_at(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, ReplyError> {
    let rest = buf.get(from..).unwrap_or_default();
    let Some(nl) = rest.iter().take(MAX_LINE + 2).position(|&b| b == b'\n') else {
        if rest.len() > MAX_LINE + 1 {
            return Err(ReplyError::Protocol(format!(
                "reply line longer than {MAX_LINE} bytes"
            )));
        }
        return Ok(None);
    };
    match rest[..nl].strip_suffix(b"\r") {
        Some(line) => Ok(Some((line, from + nl + 1))),
        None => Err(unexpected("a line ending in \\r\\n", &rest[..nl])),
    }
}

/// The range of a `len`-byte data block starting at `start` and followed by `\r\n`; `None`
/// if it is not all buffered yet.
fn data_block(
    buf: &[u8],
    start: usize,
    len: usize,
    max_value: usize,
) -> Result<Option<Range<usize>>, ReplyError> {
    if len > max_value {
        return Err(ReplyError::Protocol(format!(
            "the node announced a {len}-byte value, more than the client's limit of {max_value} bytes"
        )));
    }
    let end = start.saturating_add(len);
    if buf.len() < end.saturating_add(2) {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ReplyError::Protocol("value not followed by \\r\\n".into()));
    }
    Ok(Some(start..end))
}

/// A decimal number with nothing else around it (no sign, no spaces).
fn number<T: std::str::FromStr>(tok: &[u8]) -> Option<T> {
    if tok.is_empty() || tok.len() > 20 || !tok.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(tok).ok()?.parse().ok()
}

fn unexpected(expected: &str, got: &[u8]) -> ReplyError {
    ReplyError::Protocol(format!("expected {expected}, got {:?}", shown(got)))
}

fn unexpected_either(yes: &[u8], no: &[u8], got: &[u8]) -> ReplyError {
    let expected = format!(
        "{} or {}",
        String::from_utf8_lossy(yes),
        String::from_utf8_lossy(no)
    );
    unexpected(&expected, got)
}

/// The start of a reply line for an error message, lossily decoded.
fn shown(line: &[u8]) -> String {
    const SHOWN: usize = 80;
    let mut s = String::from_utf8_lossy(&line[..line.len().min(SHOWN)]).into_owned();
    if line.len() > SHOWN {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn requests_are_space_separated_lines() {
        let mut out = Vec::new();
        encode_gets(&mut out, b"k");
        encode_meta_get(&mut out, b"k");
        encode_meta_cas(&mut out, b"k");
        encode_store(&mut out, b"add", b"k", 7, 60, 3);
        encode_delete(&mut out, b"k");
        encode_touch(&mut out, b"k", 0);
        assert_eq!(
            out,
            b"gets k\r\nmg k v f t c w\r\nmg k c\r\nadd k 7 60 3\r\ndelete k\r\ntouch k 0\r\n"
        );
    }

    #[test]
    fn gets_hit_miss_and_partial_input() {
        let reply = b"VALUE k 5 3 42\r\na\r\n\r\nEND\r\n";
        let (head, used) = parse_gets(reply, b"k", MAX).unwrap().unwrap();
        let head = head.unwrap();
        assert_eq!((head.flags, head.cas, used), (5, 42, reply.len()));
        assert_eq!(&reply[head.data], b"a\r\n");
        // Every strict prefix is incomplete, not an error.
        for n in 0..reply.len() {
            assert_eq!(parse_gets(&reply[..n], b"k", MAX), Ok(None), "prefix {n}");
        }
        assert_eq!(parse_gets(b"END\r\n", b"k", MAX), Ok(Some((None, 5))));
    }

    #[test]
    fn gets_rejects_what_was_not_asked_for() {
        let bad: &[&[u8]] = &[
            b"VALUE other 0 1 1\r\nx\r\nEND\r\n", // another key
            b"VALUE k 0 1\r\nx\r\nEND\r\n",       // no CAS: a `get` reply
            b"VALUE k 0 1 1 9\r\nx\r\nEND\r\n",   // extra token
            b"VALUE k -1 1 1\r\nx\r\nEND\r\n",    // negative flags
            b"VALUE k 0 1 1\r\nxy\r\nEND\r\n",    // data longer than announced
            b"VALUE k 0 1 1\r\nx\r\nVALUE k\r\n", // no END
            b"STORED\r\n",
            b"END\n",
        ];
        for reply in bad {
            assert!(
                matches!(parse_gets(reply, b"k", MAX), Err(ReplyError::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(reply)
            );
        }
        assert_eq!(
            parse_gets(b"SERVER_ERROR out of memory\r\n", b"k", MAX),
            Err(ReplyError::Server("SERVER_ERROR out of memory".into()))
        );
    }

    #[test]
    fn value_length_is_bounded_before_buffering() {
        assert!(matches!(
            parse_gets(b"VALUE k 0 99999999999 1\r\n", b"k", MAX),
            Err(ReplyError::Protocol(_))
        ));
        assert!(matches!(
            parse_meta_get(b"VA 2000000 f0 t-1 c1\r\n", MAX),
            Err(ReplyError::Protocol(_))
        ));
    }

    #[test]
    fn line_length_is_bounded() {
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(matches!(
            parse_word(&long, b"OK"),
            Err(ReplyError::Protocol(_))
        ));
        assert_eq!(parse_word(&long[..MAX_LINE], b"OK"), Ok(None));
    }

    #[test]
    fn meta_get_reads_flags_ttl_and_cas_in_any_order() {
        let reply = b"VA 2 t-1 c9 f3\r\nhi\r\n";
        let (head, used) = parse_meta_get(reply, MAX).unwrap().unwrap();
        let head = head.unwrap();
        assert_eq!(
            (head.flags, head.ttl, head.cas, used),
            (3, None, 9, reply.len())
        );
        let (head, _) = parse_meta_get(b"VA 0 f1 t30 c2\r\n\r\n", MAX)
            .unwrap()
            .unwrap();
        let head = head.unwrap();
        assert_eq!((head.ttl, head.written_ms), (Some(30), None));
        let (head, _) = parse_meta_get(b"VA 0 w1700000000123 f1 t30 c2\r\n\r\n", MAX)
            .unwrap()
            .unwrap();
        assert_eq!(head.unwrap().written_ms, Some(1_700_000_000_123));
        assert_eq!(parse_meta_get(b"EN\r\n", MAX), Ok(Some((None, 4))));
        for bad in [
            &b"VA 2 f1 t-1\r\nhi\r\n"[..],     // no CAS
            b"VA 2 f1 f1 t-1 c1\r\nhi\r\n",    // flag twice
            b"VA 2 f1 t-2 c1\r\nhi\r\n",       // TTL below -1
            b"VA 2 f1 t-1 c1 k\r\nhi\r\n",     // a flag not asked for
            b"VA 2 f1 t-1 c1 w1 w2\r\nhi\r\n", // write time twice
            b"VA 2 f1 t-1 c1 w\r\nhi\r\n",     // write time without a number
            b"HD f1 t-1 c1\r\n",
        ] {
            assert!(matches!(
                parse_meta_get(bad, MAX),
                Err(ReplyError::Protocol(_))
            ));
        }
    }

    #[test]
    fn meta_add_and_conditional_delete() {
        let mut out = Vec::new();
        encode_meta_add(&mut out, b"k", 5, 60, None, 3);
        encode_meta_add(&mut out, b"k", 5, 60, Some(1_700_000_000_123), 3);
        encode_meta_delete_cas(&mut out, b"k", 42);
        assert_eq!(
            out,
            b"ms k 3 F5 T60 ME Z c\r\nms k 3 F5 T60 ME Z c W1700000000123\r\nmd k C42\r\n"
        );
        assert_eq!(parse_meta_add(b"HD c42\r\n"), Ok(Some((Some(42), 8))));
        assert_eq!(parse_meta_add(b"NS c0\r\n"), Ok(Some((None, 7))));
        assert_eq!(parse_meta_add(b"HD"), Ok(None));
        assert!(parse_meta_add(b"STORED\r\n").is_err());
        assert_eq!(parse_meta_delete(b"HD\r\n"), Ok(Some((true, 4))));
        assert_eq!(parse_meta_delete(b"EX\r\n"), Ok(Some((false, 4))));
        assert!(parse_meta_delete(b"DELETED\r\n").is_err());
    }

    #[test]
    fn meta_cas_and_one_word_replies() {
        assert_eq!(parse_meta_cas(b"HD c77\r\n"), Ok(Some((Some(77), 8))));
        assert_eq!(parse_meta_cas(b"EN\r\n"), Ok(Some((None, 4))));
        assert!(parse_meta_cas(b"HD\r\n").is_err());
        assert_eq!(
            parse_either(b"NOT_STORED\r\n", b"STORED", b"NOT_STORED"),
            Ok(Some((false, 12)))
        );
        assert_eq!(
            parse_either(b"STORED\r\n", b"STORED", b"NOT_STORED"),
            Ok(Some((true, 8)))
        );
        assert!(matches!(
            parse_either(b"EXISTS\r\n", b"STORED", b"NOT_STORED"),
            Err(ReplyError::Protocol(_))
        ));
        assert!(matches!(
            parse_word(b"ERROR\r\n", b"OK"),
            Err(ReplyError::Server(_))
        ));
        assert_eq!(parse_word(b"OK\r", b"OK"), Ok(None));
    }

    #[test]
    fn stats_until_end() {
        let reply = b"STAT pid 12\r\nSTAT version 1.6.0 x\r\nEND\r\n";
        let (stats, used) = parse_stats(reply).unwrap().unwrap();
        assert_eq!(used, reply.len());
        assert_eq!(stats["pid"], "12");
        assert_eq!(stats["version"], "1.6.0 x");
        assert_eq!(parse_stats(&reply[..20]), Ok(None));
        assert!(parse_stats(b"STAT pid 12\r\nVALUE\r\n").is_err());
    }
}

#[cfg(test)]
mod pipelined_tests {
    use super::*;

    #[test]
    fn requests_are_encoded_as_memcached_expects() {
        let mut out = Vec::new();
        encode_get(&mut out, b"k1");
        encode_set(&mut out, b"k2", b"abc");
        encode_multi_get(&mut out, [&b"a"[..], b"b"]);
        assert_eq!(out, b"get k1\r\nset k2 0 0 3\r\nabc\r\nget a b\r\n");
    }

    #[test]
    fn a_hit_a_miss_and_a_store_parse_in_sequence() {
        let buf = b"VALUE k1 0 3\r\nabc\r\nEND\r\nEND\r\nSTORED\r\n";
        let (r, n) = parse_pipelined(buf).unwrap().unwrap();
        assert_eq!(
            r,
            Pipelined::Get {
                hits: 1,
                value_bytes: 3
            }
        );
        let (r, m) = parse_pipelined(&buf[n..]).unwrap().unwrap();
        assert_eq!(
            r,
            Pipelined::Get {
                hits: 0,
                value_bytes: 0
            }
        );
        let (r, k) = parse_pipelined(&buf[n + m..]).unwrap().unwrap();
        assert_eq!(r, Pipelined::Stored);
        assert_eq!(n + m + k, buf.len());
    }

    #[test]
    fn every_prefix_of_a_pipelined_reply_is_incomplete_not_an_error() {
        let buf = b"VALUE k1 0 3 77\r\nabc\r\nVALUE k2 5 2\r\nxy\r\nEND\r\n";
        for i in 0..buf.len() {
            assert_eq!(parse_pipelined(&buf[..i]), Ok(None), "prefix of {i} bytes");
        }
        assert_eq!(
            parse_pipelined(buf),
            Ok(Some((
                Pipelined::Get {
                    hits: 2,
                    value_bytes: 5
                },
                buf.len()
            )))
        );
    }

    #[test]
    fn data_containing_crlf_is_skipped_by_length() {
        let buf = b"VALUE k 0 4\r\n\r\nEN\r\nEND\r\n";
        assert_eq!(
            parse_pipelined(buf),
            Ok(Some((
                Pipelined::Get {
                    hits: 1,
                    value_bytes: 4
                },
                buf.len()
            )))
        );
    }

    #[test]
    fn error_lines_are_refusals_and_garbage_is_an_error() {
        let (r, _) = parse_pipelined(b"SERVER_ERROR out of memory storing object\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(r, Pipelined::Refused(s) if s.starts_with("SERVER_ERROR")));
        assert!(parse_pipelined(b"HELLO\r\n").is_err());
        assert!(parse_pipelined(b"VALUE k 0 x\r\n").is_err());
        assert!(parse_pipelined(b"VALUE k 0 1\r\nab\r\n").is_err());
    }
}
