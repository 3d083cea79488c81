//! The slice of memcached's text protocol the benchmarks speak, without I/O: requests are
//! appended to a buffer, replies are parsed from the front of a buffer (`Ok(None)` while a
//! reply is incomplete, `Err` when the stream no longer makes sense).
//!
//! Hand-written because the client must be cheap (it shares two cores with the servers it
//! measures) and must pipeline exactly as told; memcached client crates hide both.

use std::io::Write as _;

/// Appends `get KEY`.
pub fn encode_get(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(b"get ");
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n");
}

/// Appends one `get` naming every key in `keys`.
pub fn encode_multi_get<'a>(out: &mut Vec<u8>, keys: impl IntoIterator<Item = &'a [u8]>) {
    out.extend_from_slice(b"get");
    for key in keys {
        out.push(b' ');
        out.extend_from_slice(key);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `set KEY 0 0 LEN` and its data block.
pub fn encode_set(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(b"set ");
    out.extend_from_slice(key);
    // Writing to a Vec cannot fail.
    let _ = write!(out, " 0 0 {}\r\n", value.len());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer to a `get`: how many keys were found, and their data bytes in total.
    Get {
        hits: u32,
        value_bytes: usize,
    },
    Stored,
    /// An error or refusal line (`SERVER_ERROR ...`, `NOT_STORED`, ...): counted, not fatal.
    Refused(String),
}

/// Splits the first line (without CRLF) off `buf`; None if no line is complete.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((&buf[..end], nl + 1))
}

/// Parses the reply at the front of `buf`, returning it and the bytes it used.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some((first, mut used)) = line(buf) else {
        return Ok(None);
    };
    match first {
        b"STORED" => return Ok(Some((Reply::Stored, used))),
        b"END" => {
            return Ok(Some((
                Reply::Get {
                    hits: 0,
                    value_bytes: 0,
                },
                used,
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
                Reply::Refused(String::from_utf8_lossy(first).into_owned()),
                used,
            )));
        }
        _ => {
            return Err(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(first)
            ));
        }
    }
    // VALUE blocks until END.
    let (mut hits, mut value_bytes) = (0u32, 0usize);
    let mut header = first;
    loop {
        let len = header
            .split(|&b| b == b' ')
            .nth(3)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<usize>().ok())
            .ok_or_else(|| format!("malformed VALUE line {:?}", String::from_utf8_lossy(header)))?;
        if buf.len() < used + len + 2 {
            return Ok(None);
        }
        if &buf[used + len..used + len + 2] != b"\r\n" {
            return Err("a data block does not end with CRLF".into());
        }
        used += len + 2;
        hits += 1;
        value_bytes += len;
        let Some((next, n)) = line(&buf[used..]) else {
            return Ok(None);
        };
        used += n;
        if next == b"END" {
            return Ok(Some((Reply::Get { hits, value_bytes }, used)));
        }
        if !next.starts_with(b"VALUE ") {
            return Err(format!(
                "unexpected line {:?} in a get reply",
                String::from_utf8_lossy(next)
            ));
        }
        header = next;
    }
}

/// `stats` lines as name/value pairs, in the server's order.
pub type StatLines = Vec<(String, String)>;

/// Parses a complete `stats` reply (`STAT name value` lines, then `END`).
pub fn parse_stats(buf: &[u8]) -> Result<Option<(StatLines, usize)>, String> {
    let mut used = 0;
    let mut out = Vec::new();
    loop {
        let Some((l, n)) = line(&buf[used..]) else {
            return Ok(None);
        };
        used += n;
        if l == b"END" {
            return Ok(Some((out, used)));
        }
        let text = String::from_utf8_lossy(l);
        let mut parts = text.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("STAT"), Some(name), value) => {
                out.push((name.to_string(), value.unwrap_or("").to_string()))
            }
            _ => return Err(format!("unexpected line {text:?} in a stats reply")),
        }
    }
}

#[cfg(test)]
mod tests {
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
        let (r, n) = parse_reply(buf).unwrap().unwrap();
        assert_eq!(
            r,
            Reply::Get {
                hits: 1,
                value_bytes: 3
            }
        );
        let (r, m) = parse_reply(&buf[n..]).unwrap().unwrap();
        assert_eq!(
            r,
            Reply::Get {
                hits: 0,
                value_bytes: 0
            }
        );
        let (r, k) = parse_reply(&buf[n + m..]).unwrap().unwrap();
        assert_eq!(r, Reply::Stored);
        assert_eq!(n + m + k, buf.len());
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete_not_an_error() {
        let buf = b"VALUE k1 0 3 77\r\nabc\r\nVALUE k2 5 2\r\nxy\r\nEND\r\n";
        for i in 0..buf.len() {
            assert_eq!(parse_reply(&buf[..i]), Ok(None), "prefix of {i} bytes");
        }
        assert_eq!(
            parse_reply(buf),
            Ok(Some((
                Reply::Get {
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
            parse_reply(buf),
            Ok(Some((
                Reply::Get {
                    hits: 1,
                    value_bytes: 4
                },
                buf.len()
            )))
        );
    }

    #[test]
    fn error_lines_are_refusals_and_garbage_is_an_error() {
        let (r, _) = parse_reply(b"SERVER_ERROR out of memory storing object\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(r, Reply::Refused(s) if s.starts_with("SERVER_ERROR")));
        assert!(parse_reply(b"HELLO\r\n").is_err());
        assert!(parse_reply(b"VALUE k 0 x\r\n").is_err());
        assert!(parse_reply(b"VALUE k 0 1\r\nab\r\n").is_err());
    }

    #[test]
    fn stats_parse_into_name_value_pairs() {
        let buf = b"STAT pid 12\r\nSTAT version 1.6.18\r\nEND\r\n";
        let (stats, n) = parse_stats(buf).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(
            stats,
            vec![
                ("pid".into(), "12".into()),
                ("version".into(), "1.6.18".into())
            ]
        );
        assert_eq!(parse_stats(&buf[..10]), Ok(None));
    }
}
