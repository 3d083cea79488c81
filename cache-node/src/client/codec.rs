//! Requests as bytes and replies from bytes, without I/O.
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
pub(crate) const MAX_LINE: usize = 4096;

/// Why a reply was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyError {
    /// Not an answer to the request that was sent.
    Protocol(String),
    /// The node's error line (`SERVER_ERROR ...`, `CLIENT_ERROR ...`, `ERROR`).
    Server(String),
}

/// A complete reply and the bytes it used, `None` while more bytes are needed.
pub(crate) type Parsed<T> = Result<Option<(T, usize)>, ReplyError>;

/// The head of a value reply; `data` locates the value's bytes in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValueHead {
    pub flags: u32,
    pub cas: u64,
    /// Remaining TTL in seconds, `None` when the item never expires (meta get only).
    pub ttl: Option<u32>,
    pub data: Range<usize>,
}

/// `gets <key>`.
pub(crate) fn encode_gets(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"gets", key]);
}

/// `mg <key> v f t c`: value, client flags, remaining TTL and CAS.
pub(crate) fn encode_meta_get(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"mg", key, b"v", b"f", b"t", b"c"]);
}

/// `mg <key> c`: the CAS value alone.
pub(crate) fn encode_meta_cas(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"mg", key, b"c"]);
}

/// The line of a storage command (`set`, `add`); the data block follows it.
pub(crate) fn encode_store(
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

/// `ms <key> <len> F<flags> T<exptime> ME Z c`: an add that the node also refuses if the key
/// was deleted there recently (Cachepool's `Z`), returning the stored copy's CAS value; the
/// data block follows.
pub(crate) fn encode_meta_add(out: &mut Vec<u8>, key: &[u8], flags: u32, exptime: u32, len: usize) {
    let (mut l, mut f, mut e) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    let flags = [b"F", f.format(flags).as_bytes()].concat();
    let exptime = [b"T", e.format(exptime).as_bytes()].concat();
    command(
        out,
        &[
            b"ms",
            key,
            l.format(len).as_bytes(),
            &flags,
            &exptime,
            b"ME",
            b"Z",
            b"c",
        ],
    );
}

/// `md <key> Y`: delete without leaving a tombstone (Cachepool's extension).
pub(crate) fn encode_meta_delete_untombstoned(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"md", key, b"Y"]);
}

/// `md <key> C<cas>`: delete only that version of the item.
pub(crate) fn encode_meta_delete_cas(out: &mut Vec<u8>, key: &[u8], cas: u64) {
    let mut c = itoa::Buffer::new();
    command(
        out,
        &[b"md", key, &[b"C", c.format(cas).as_bytes()].concat()],
    );
}

/// `delete <key>`.
pub(crate) fn encode_delete(out: &mut Vec<u8>, key: &[u8]) {
    command(out, &[b"delete", key]);
}

/// `touch <key> <exptime>`.
pub(crate) fn encode_touch(out: &mut Vec<u8>, key: &[u8], exptime: u32) {
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

/// The reply to `gets <key>`: `VALUE <key> <flags> <len> <cas>`, the data, `END`; or `END`.
pub(crate) fn parse_gets(buf: &[u8], key: &[u8], max_value: usize) -> Parsed<Option<ValueHead>> {
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
            data,
        }),
        used,
    )))
}

/// The reply to `mg <key> v f t c`: `VA <len> f<flags> t<ttl> c<cas>` and the data; or `EN`.
pub(crate) fn parse_meta_get(buf: &[u8], max_value: usize) -> Parsed<Option<ValueHead>> {
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
    let (mut flags, mut ttl, mut cas) = (None, None, None);
    for tok in toks {
        let ok = match tok.split_first() {
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
            return Err(unexpected("the flags f, t and c once each", line));
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
            data,
        }),
        used,
    )))
}

/// The reply to `mg <key> c`: `HD c<cas>`, or `EN`.
pub(crate) fn parse_meta_cas(buf: &[u8]) -> Parsed<Option<u64>> {
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
pub(crate) fn parse_meta_add(buf: &[u8]) -> Parsed<Option<u64>> {
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
pub(crate) fn parse_meta_delete(buf: &[u8]) -> Parsed<bool> {
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
pub(crate) fn parse_either(buf: &[u8], yes: &'static [u8], no: &'static [u8]) -> Parsed<bool> {
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
pub(crate) fn parse_word(buf: &[u8], word: &'static [u8]) -> Parsed<()> {
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
pub(crate) fn parse_stats(buf: &[u8]) -> Parsed<HashMap<String, String>> {
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
    let end = start + len;
    if buf.len() < end + 2 {
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
            b"gets k\r\nmg k v f t c\r\nmg k c\r\nadd k 7 60 3\r\ndelete k\r\ntouch k 0\r\n"
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
        assert_eq!(head.unwrap().ttl, Some(30));
        assert_eq!(parse_meta_get(b"EN\r\n", MAX), Ok(Some((None, 4))));
        for bad in [
            &b"VA 2 f1 t-1\r\nhi\r\n"[..],  // no CAS
            b"VA 2 f1 f1 t-1 c1\r\nhi\r\n", // flag twice
            b"VA 2 f1 t-2 c1\r\nhi\r\n",    // TTL below -1
            b"VA 2 f1 t-1 c1 k\r\nhi\r\n",  // a flag not asked for
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
        encode_meta_add(&mut out, b"k", 5, 60, 3);
        encode_meta_delete_cas(&mut out, b"k", 42);
        assert_eq!(out, b"ms k 3 F5 T60 ME Z c\r\nmd k C42\r\n");
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
