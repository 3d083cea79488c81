//! The envelope: how a cached image is laid out in one memcached value.
//!
//! A hit must be servable without asking the database, so the value carries what the
//! response needs besides the bytes: the content type and the ETag. Both end up in HTTP
//! headers, and the pool's data port is open to anything on its network, so the parser
//! trusts nothing: it checks the magic, the version, every length against the data, that the
//! header fields are printable ASCII (no CR/LF to split a header), and that nothing follows
//! the body. Anything else is garbage and a miss.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! magic "CPIM" | version u8 = 1 | kind u8
//! kind 1, image:     type_len u8 | content type | etag_len u8 | etag | body_len u32 | body
//! kind 2, tombstone: id u64
//! ```
//!
//! A tombstone is what `invalidate` leaves behind (see the cache module for why); its id,
//! unique per invalidation, lets readers tell one invalidation from the next. A new
//! layout takes a new version number; readers treat versions they do not know as misses, so
//! during a rolling upgrade old and new web servers each miss on the other's entries rather
//! than misread them.

use bytes::Bytes;

use super::CachedImage;

/// The first bytes of every envelope.
pub const MAGIC: &[u8; 4] = b"CPIM";

/// The layout this code writes and reads.
pub const VERSION: u8 = 1;

const KIND_IMAGE: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;

/// Longest content type or ETag an envelope carries (their lengths are one byte).
pub const MAX_FIELD_LEN: usize = u8::MAX as usize;

/// The most bytes an envelope adds to an image: magic, version, kind, two length-prefixed
/// fields at their longest, the body length.
pub const MAX_OVERHEAD: usize = MAGIC.len() + 2 + 2 * (1 + MAX_FIELD_LEN) + 4;

/// Length of a tombstone envelope.
pub const TOMBSTONE_LEN: usize = MAGIC.len() + 2 + 8;

/// What a pool value holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Envelope {
    /// A cached image.
    Image(CachedImage),
    /// The mark of a recent invalidation, with its id: a miss that fills must not overwrite.
    Tombstone(u64),
}

/// Why a value is not an envelope (or an image cannot be put in one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// It does not start with the magic: not written by this cache.
    #[error("not a cached image: the value does not start with {MAGIC:?}")]
    NotAnEnvelope,
    /// A layout version this code does not know (written by a newer or older release).
    #[error("cached image layout version {0} is not supported (this release reads {VERSION})")]
    UnsupportedVersion(u8),
    /// An unknown kind byte.
    #[error("unknown cached entry kind {0}")]
    UnknownKind(u8),
    /// The value ends before a field it announces.
    #[error("the cached value is cut short: {field} needs {needed} more bytes, {left} are left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes left.
        left: usize,
    },
    /// Bytes after the end of the entry.
    #[error("{0} bytes follow the end of the cached entry")]
    TrailingBytes(usize),
    /// A header field is empty, too long, or not printable ASCII.
    #[error(
        "the {field} must be 1 to {MAX_FIELD_LEN} printable ASCII characters (it goes into an \
         HTTP header)"
    )]
    BadField {
        /// `content type` or `etag`.
        field: &'static str,
    },
    /// The body does not fit the 32-bit length.
    #[error("an image of {0} bytes is too large for the cache envelope")]
    BodyTooLarge(usize),
}

/// Lays `image` out as an envelope. Refuses header fields that could not be served (empty,
/// over 255 bytes, or with bytes outside printable ASCII).
pub fn encode(image: &CachedImage) -> Result<Vec<u8>, EnvelopeError> {
    let content_type = field("content type", image.content_type.as_bytes())?;
    let etag = field("etag", image.etag.as_bytes())?;
    let body_len = u32::try_from(image.body.len())
        .map_err(|_| EnvelopeError::BodyTooLarge(image.body.len()))?;
    let mut out = Vec::with_capacity(
        MAGIC.len() + 4 + content_type.len() + etag.len() + 4 + image.body.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, KIND_IMAGE]);
    for text in [content_type, etag] {
        // `field` checked the length fits a byte.
        out.push(text.len() as u8);
        out.extend_from_slice(text);
    }
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&image.body);
    Ok(out)
}

/// Lays out the tombstone of invalidation `id`.
pub fn encode_tombstone(id: u64) -> [u8; TOMBSTONE_LEN] {
    let mut out = [0; TOMBSTONE_LEN];
    let (head, tail) = out.split_at_mut(MAGIC.len() + 2);
    head[..MAGIC.len()].copy_from_slice(MAGIC);
    head[MAGIC.len()..].copy_from_slice(&[VERSION, KIND_TOMBSTONE]);
    tail.copy_from_slice(&id.to_be_bytes());
    out
}

/// Reads an envelope. The image's body is a slice of `value` (no copy).
pub fn decode(value: &Bytes) -> Result<Envelope, EnvelopeError> {
    let mut reader = Reader { value, at: 0 };
    if reader.take("magic", MAGIC.len()).ok() != Some(&MAGIC[..]) {
        return Err(EnvelopeError::NotAnEnvelope);
    }
    let version = reader.byte("version")?;
    if version != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let entry = match reader.byte("kind")? {
        KIND_TOMBSTONE => {
            let id = reader.take("tombstone id", 8)?;
            Envelope::Tombstone(u64::from_be_bytes([
                id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7],
            ]))
        }
        KIND_IMAGE => {
            let content_type = reader.text("content type")?;
            let etag = reader.text("etag")?;
            let len = reader.take("body length", 4)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let start = reader.at;
            reader.take("body", len)?;
            Envelope::Image(CachedImage {
                content_type,
                etag,
                body: value.slice(start..start + len),
            })
        }
        other => return Err(EnvelopeError::UnknownKind(other)),
    };
    match value.len() - reader.at {
        0 => Ok(entry),
        extra => Err(EnvelopeError::TrailingBytes(extra)),
    }
}

/// Checks a header field: 1 to 255 bytes of printable ASCII (space to tilde).
fn field<'a>(name: &'static str, text: &'a [u8]) -> Result<&'a [u8], EnvelopeError> {
    let printable = text.iter().all(|b| (b' '..=b'~').contains(b));
    if text.is_empty() || text.len() > MAX_FIELD_LEN || !printable {
        return Err(EnvelopeError::BadField { field: name });
    }
    Ok(text)
}

struct Reader<'a> {
    value: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], EnvelopeError> {
        let value: &'a [u8] = self.value;
        let rest = value.get(self.at..).unwrap_or_default();
        if n > rest.len() {
            return Err(EnvelopeError::Truncated {
                field,
                needed: n,
                left: rest.len(),
            });
        }
        self.at += n;
        Ok(&rest[..n])
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, EnvelopeError> {
        Ok(self.take(field, 1)?[0])
    }

    fn text(&mut self, name: &'static str) -> Result<String, EnvelopeError> {
        let len = usize::from(self.byte(name)?);
        let text = field(name, self.take(name, len)?)?;
        // Printable ASCII is UTF-8.
        Ok(String::from_utf8_lossy(text).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> CachedImage {
        CachedImage {
            content_type: "image/png".into(),
            etag: "\"0123456789abcdef-2a\"".into(),
            body: Bytes::from_static(b"\x89PNG pretend pixels"),
        }
    }

    #[test]
    fn an_image_round_trips_and_its_body_is_not_copied() {
        let encoded = Bytes::from(encode(&image()).unwrap());
        let Envelope::Image(decoded) = decode(&encoded).unwrap() else {
            panic!("expected an image");
        };
        assert_eq!(decoded, image());
        // The body is a view into the value read from the pool.
        let range = encoded.as_ptr_range();
        assert!(range.contains(&decoded.body.as_ptr()));
    }

    #[test]
    fn the_layout_is_as_documented() {
        let encoded = encode(&CachedImage {
            content_type: "image/gif".into(),
            etag: "\"e\"".into(),
            body: Bytes::from_static(b"GIF"),
        })
        .unwrap();
        assert_eq!(
            encoded,
            b"CPIM\x01\x01\x09image/gif\x03\"e\"\x00\x00\x00\x03GIF".to_vec()
        );
        let tombstone = encode_tombstone(0x0102_0304_0506_0708);
        assert_eq!(&tombstone, b"CPIM\x01\x02\x01\x02\x03\x04\x05\x06\x07\x08");
        assert_eq!(
            decode(&Bytes::copy_from_slice(&tombstone)),
            Ok(Envelope::Tombstone(0x0102_0304_0506_0708))
        );
    }

    #[test]
    fn an_empty_body_round_trips() {
        let empty = CachedImage {
            body: Bytes::new(),
            ..image()
        };
        let encoded = Bytes::from(encode(&empty).unwrap());
        assert_eq!(decode(&encoded), Ok(Envelope::Image(empty)));
    }

    #[test]
    fn overhead_bound_holds_for_the_longest_fields() {
        let longest = CachedImage {
            content_type: "t".repeat(MAX_FIELD_LEN),
            etag: "e".repeat(MAX_FIELD_LEN),
            body: Bytes::from_static(b"xyz"),
        };
        let encoded = encode(&longest).unwrap();
        assert_eq!(encoded.len(), 3 + MAX_OVERHEAD);
    }

    #[test]
    fn garbage_is_rejected_with_the_reason() {
        let cases: [(&[u8], EnvelopeError); 7] = [
            (b"", EnvelopeError::NotAnEnvelope),
            (b"VALUE foo", EnvelopeError::NotAnEnvelope),
            (b"CPIM\x02\x01", EnvelopeError::UnsupportedVersion(2)),
            (b"CPIM\x01\x07", EnvelopeError::UnknownKind(7)),
            (
                b"CPIM\x01",
                EnvelopeError::Truncated {
                    field: "kind",
                    needed: 1,
                    left: 0,
                },
            ),
            (
                b"CPIM\x01\x02\0\0\0",
                EnvelopeError::Truncated {
                    field: "tombstone id",
                    needed: 8,
                    left: 3,
                },
            ),
            (
                b"CPIM\x01\x02\0\0\0\0\0\0\0\x01!",
                EnvelopeError::TrailingBytes(1),
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                decode(&Bytes::copy_from_slice(value)),
                Err(expected),
                "{value:?}"
            );
        }
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_rejected() {
        let encoded = encode(&image()).unwrap();
        for len in 0..encoded.len() {
            let cut = Bytes::copy_from_slice(&encoded[..len]);
            assert!(
                decode(&cut).is_err(),
                "accepted {len} of {} bytes",
                encoded.len()
            );
        }
        let mut longer = encoded.clone();
        longer.push(0);
        assert_eq!(
            decode(&Bytes::from(longer)),
            Err(EnvelopeError::TrailingBytes(1))
        );
        // A body length larger than what follows.
        let mut lying = encoded.clone();
        let at = lying.len() - image().body.len() - 4;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(lying)),
            Err(EnvelopeError::Truncated { field: "body", .. })
        ));
    }

    #[test]
    fn header_injection_is_refused_both_ways() {
        let injected = CachedImage {
            content_type: "image/png\r\nSet-Cookie: a=b".into(),
            ..image()
        };
        assert_eq!(
            encode(&injected),
            Err(EnvelopeError::BadField {
                field: "content type"
            })
        );
        // Written by someone else onto the open data port: refused when read.
        let mut forged = b"CPIM\x01\x01".to_vec();
        forged.push(11);
        forged.extend_from_slice(b"image/png\r\n");
        forged.extend_from_slice(b"\x01e\x00\x00\x00\x00");
        assert_eq!(
            decode(&Bytes::from(forged)),
            Err(EnvelopeError::BadField {
                field: "content type"
            })
        );
        for etag in [String::new(), "e".repeat(256), "caf\u{e9}".into()] {
            let bad = CachedImage { etag, ..image() };
            assert_eq!(encode(&bad), Err(EnvelopeError::BadField { field: "etag" }));
        }
    }
}
