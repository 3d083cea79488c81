//! Pure encodings the store relies on: ETags, object names, list cursors, file names and
//! timestamps.
//!
//! Kept apart from the I/O so each rule is tested on its own: a key never becomes a path
//! (object keys are written as lowercase hex, an alphabet with no `/` or `.`), a cursor that
//! does not decode is refused rather than guessed at, and a timestamp survives the round trip
//! through the database's integer column.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// The bytes of lowercase hex `text`, or `None` when it is not lowercase hex of whole bytes.
/// Uppercase is refused so that each byte string has exactly one encoding (one file name);
/// the `hex` crate would accept it, hence the check first.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    ::hex::decode(text).ok()
}

/// The ETag of an image: lowercase hex SHA-256 of its bytes (without the quotes HTTP adds).
///
/// SHA-256 rather than a faster non-cryptographic hash because an ETag lets a client skip a
/// download when it matches: with a weak hash, someone who can upload could craft a
/// different image with the ETag of one a visitor already holds. It is also what S3 and most
/// tooling can verify independently, and at upload sizes its cost is far below the network's.
pub fn etag_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Object name for one version of the image under `key`: the key's SHA-256 and a random
/// token, both hex. The hash keeps every key (any length, any characters) to a fixed-size name
/// and groups the versions of one key; the token makes each upload's object distinct, so a
/// re-upload never overwrites bytes that a reader of the previous version may be fetching.
pub(crate) fn object_name(key: &str, token: u128) -> String {
    format!("{}.{token:032x}", hex(&Sha256::digest(key.as_bytes())))
}

/// Appended to an image version's object name to name its thumbnail's object. Image object
/// names end in a hex token, so none ends with this.
const THUMBNAIL_SUFFIX: &str = ".thumb";

/// Object name of the thumbnail of the image version stored as `object`. Tied to the
/// version, not the key: a re-upload's thumbnail has a new name, so an old thumbnail can
/// never be read as the new image's, and it goes with its version's object.
pub(crate) fn thumbnail_name(object: &str) -> String {
    format!("{object}{THUMBNAIL_SUFFIX}")
}

/// The image object whose thumbnail `name` is, or `None` when `name` is not a thumbnail's.
pub(crate) fn thumbnail_of(name: &str) -> Option<&str> {
    name.strip_suffix(THUMBNAIL_SUFFIX)
}

/// Opaque list cursor naming the last item of a page: its upload time and key, hex-encoded
/// so it is URL-safe as it stands.
pub(crate) fn encode_cursor(uploaded_at_micros: i64, key: &str) -> String {
    format!(
        "{:016x}{}",
        uploaded_at_micros.cast_unsigned(),
        hex(key.as_bytes())
    )
}

/// The upload time and key inside a cursor made by [`encode_cursor`], or `None` when the text
/// was not made by it.
pub(crate) fn decode_cursor(cursor: &str) -> Option<(i64, String)> {
    let (time, key) = (cursor.get(..16)?, cursor.get(16..)?);
    let time: [u8; 8] = unhex(time)?.try_into().ok()?;
    let key = String::from_utf8(unhex(key)?).ok()?;
    Some((u64::from_be_bytes(time).cast_signed(), key))
}

/// Microseconds since the Unix epoch, the database's representation of a time; times before
/// the epoch are negative.
pub(crate) fn to_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

/// The time `micros` microseconds after the Unix epoch.
pub(crate) fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let text = hex(&all);
        assert_eq!(text.len(), 512);
        assert!(
            text.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(unhex(&text), Some(all));
    }

    #[test]
    fn unhex_refuses_anything_but_lowercase_pairs() {
        for bad in ["a", "zz", "AB", "0g", "../", "+1", "0 "] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
        assert_eq!(unhex(""), Some(Vec::new()));
    }

    #[test]
    fn etag_is_sha256_hex() {
        // The SHA-256 of the empty string and of "abc" (FIPS 180-2 test vectors).
        assert_eq!(
            etag_of(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            etag_of(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn thumbnail_names_are_tied_to_their_version_and_never_an_image_name() {
        let object = object_name(&"k".repeat(250), u128::MAX);
        let thumb = thumbnail_name(&object);
        assert!(thumb.len() <= super::super::MAX_OBJECT_KEY_BYTES, "{thumb}");
        assert_eq!(thumbnail_of(&thumb), Some(object.as_str()));
        assert_eq!(thumbnail_of(&object), None);
        assert_ne!(thumb, thumbnail_name(&object_name("k", 1)));
    }

    #[test]
    fn object_names_are_fixed_size_hex_and_differ_by_token_and_key() {
        let long_key = "k".repeat(250);
        let a = object_name("../a/./b", 1);
        let b = object_name("../a/./b", 2);
        let c = object_name(&long_key, 1);
        assert_ne!(a, b);
        assert_ne!(a, c);
        for name in [&a, &b, &c] {
            assert_eq!(name.len(), 64 + 1 + 32);
            assert!(
                name.bytes()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f' | b'.'))
            );
        }
        assert_eq!(a[..64], b[..64], "versions of one key share the key's hash");
    }

    #[test]
    fn cursor_round_trips_odd_keys_and_times() {
        for (time, key) in [
            (0, "a"),
            (1_700_000_000_123_456, "photos/2024/../été.png"),
            (-5, "x"),
            (i64::MAX, "k"),
        ] {
            let cursor = encode_cursor(time, key);
            assert!(
                cursor.bytes().all(|c| c.is_ascii_alphanumeric()),
                "{cursor}"
            );
            assert_eq!(decode_cursor(&cursor), Some((time, key.to_owned())));
        }
    }

    #[test]
    fn cursor_refuses_tampered_text() {
        let good = encode_cursor(42, "key");
        for bad in [
            "".to_owned(),
            "short".to_owned(),
            good.to_uppercase(),
            format!("{good}0"),
            format!("+{}", &good[1..]),
            format!("{}ff", &good[..16]), // a lone 0xff is not UTF-8
            good.replace('6', "g"),
        ] {
            assert_eq!(decode_cursor(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn micros_round_trip_and_order() {
        let now = SystemTime::now();
        let micros = to_micros(now);
        let back = from_micros(micros);
        let drift = now.duration_since(back).unwrap_or_default();
        assert!(drift < Duration::from_micros(1), "{drift:?}");
        assert_eq!(from_micros(-1_000_000), UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(to_micros(UNIX_EPOCH - Duration::from_secs(1)), -1_000_000);
        assert!(to_micros(now + Duration::from_millis(1)) > micros);
    }
}
