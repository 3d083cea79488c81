//! Image bytes the site accepts, for the tests of every crate that upload one.

/// A one-pixel GIF whose palette's first colour is `shade`: distinct bytes per shade.
pub fn gif(shade: u8) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]);
    out.extend_from_slice(&[shade, shade, shade, 0, 0, 0]);
    out.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]);
    out.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
    out.push(0x3B);
    out
}
