//! Upload rules against tiny images written byte by byte here, their truncations and
//! corruptions, look-alikes, and garbage.
//!
//! The PNG, GIF, JPEG and lossless WebP fixtures are complete, decodable images (real CRCs,
//! a stored zlib stream, a one-block JPEG scan, a one-pixel VP8L stream), so an accepted
//! fixture shows what a real file gets; the lossy VP8 fixture is a header only, enough for
//! what `detect` reads.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    b << 16 | a
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGBA PNG of `width`x`height` orange pixels.
fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    // Each row: filter type 0 (none), then the pixels.
    let mut row = vec![0];
    for _ in 0..width {
        row.extend_from_slice(&[0xFF, 0x80, 0x00, 0xFF]);
    }
    let raw = row.repeat(height as usize);
    // zlib header, one final stored deflate block, Adler-32.
    let len = u16::try_from(raw.len()).unwrap();
    let mut zlib = vec![0x78, 0x01, 0x01];
    zlib.extend_from_slice(&len.to_le_bytes());
    zlib.extend_from_slice(&(!len).to_le_bytes());
    zlib.extend_from_slice(&raw);
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
    png_chunk(&mut out, b"tEXt", b"Comment\0made by hand");
    png_chunk(&mut out, b"IDAT", &zlib);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A one-pixel GIF89a with a two-colour global table and a graphic control extension.
fn gif() -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // 1x1, global table of 2 colours
    out.extend_from_slice(&[0, 0, 0, 0xFF, 0xFF, 0xFF]);
    out.extend_from_slice(&[0x21, 0xF9, 4, 0, 0, 0, 0, 0]); // graphic control extension
    out.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // image descriptor
    // LZW code size 2; codes clear (4), 0, end (5) at 3 bits each, packed low bit first.
    out.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
    out.push(0x3B);
    out
}

/// A baseline greyscale JPEG of `width`x`height` (each at most 8: one block) mid-grey pixels.
fn jpeg(width: u16, height: u16) -> Vec<u8> {
    assert!(width <= 8 && height <= 8);
    let mut out = vec![0xFF, 0xD8];
    out.extend_from_slice(&[0xFF, 0xE0, 0, 16]);
    out.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    out.extend_from_slice(&[0xFF, 0xDB, 0, 67, 0]);
    out.extend_from_slice(&[1; 64]);
    out.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8]);
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&width.to_be_bytes());
    out.extend_from_slice(&[1, 1, 0x11, 0]);
    // DC and AC tables with one code each, "0": DC difference category 0, AC end of block.
    for class in [0x00, 0x10] {
        out.extend_from_slice(&[0xFF, 0xC4, 0, 20, class, 1]);
        out.extend_from_slice(&[0; 15]);
        out.push(0);
    }
    out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0]);
    out.push(0b0011_1111); // "0" (DC), "0" (EOB), padded with ones
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// A JPEG whose structure exercises the scan walker: two scans, stuffed `FF 00` bytes, a
/// restart marker, fill bytes before a marker, and a table between the scans. Not
/// decodable; `detect` reads structure only.
fn jpeg_two_scans() -> Vec<u8> {
    let mut out = jpeg(8, 8);
    out.truncate(out.len() - 3); // drop the scan data and EOI
    out.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56, 0xFF, 0xFF]);
    out.extend_from_slice(&[0xC4, 0, 20, 0x11, 1]);
    out.extend_from_slice(&[0; 15]);
    out.push(0);
    out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0x11, 0, 63, 0]);
    out.extend_from_slice(&[0xFF, 0x00, 0x77, 0xFF, 0xD9]);
    out
}

fn riff(chunks: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
    let mut body = b"WEBP".to_vec();
    for (code, data) in chunks {
        body.extend_from_slice(*code);
        body.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        body.extend_from_slice(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A VP8L header for `width`x`height` followed by the stream of one transparent pixel (no
/// transforms, no colour cache, five single-symbol prefix codes): decodable for 1x1.
fn vp8l(width: u32, height: u32) -> Vec<u8> {
    let bits = (width - 1) | (height - 1) << 14;
    let mut out = vec![0x2F];
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(&[0x88, 0x88, 0x08]);
    out
}

fn webp_lossless(width: u32, height: u32) -> Vec<u8> {
    riff(&[(b"VP8L", &vp8l(width, height))])
}

/// An extended WebP: a VP8X canvas header, then a VP8L image.
fn webp_extended(width: u32, height: u32) -> Vec<u8> {
    let mut vp8x = vec![0, 0, 0, 0];
    vp8x.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    riff(&[(b"VP8X", &vp8x), (b"VP8L", &vp8l(width, height))])
}

/// A lossy WebP: key frame tag, start code, size; no real frame data.
fn webp_lossy(width: u16, height: u16) -> Vec<u8> {
    let mut vp8 = vec![0x50, 0x01, 0x00, 0x9D, 0x01, 0x2A];
    vp8.extend_from_slice(&width.to_le_bytes());
    vp8.extend_from_slice(&height.to_le_bytes());
    vp8.extend_from_slice(&[0; 7]);
    riff(&[(b"VP8 ", &vp8)])
}

/// One valid fixture of each format, named.
fn fixtures() -> Vec<(&'static str, ImageFormat, Vec<u8>)> {
    vec![
        ("png", ImageFormat::Png, png(3, 2)),
        ("gif", ImageFormat::Gif, gif()),
        ("jpeg", ImageFormat::Jpeg, jpeg(1, 1)),
        ("jpeg with two scans", ImageFormat::Jpeg, jpeg_two_scans()),
        ("lossless webp", ImageFormat::Webp, webp_lossless(1, 1)),
        ("extended webp", ImageFormat::Webp, webp_extended(1, 1)),
        ("lossy webp", ImageFormat::Webp, webp_lossy(16, 9)),
    ]
}

fn info(format: ImageFormat, width: u32, height: u32) -> ImageInfo {
    ImageInfo {
        format,
        width,
        height,
    }
}

fn detail(err: ImageError) -> String {
    match err {
        ImageError::Truncated { detail, .. } | ImageError::Malformed { detail, .. } => detail,
        other => panic!("expected a truncated or malformed image, got {other:?}"),
    }
}

#[test]
fn recognises_each_accepted_format_and_reads_its_size() {
    assert_eq!(detect(&png(3, 2)), Ok(info(ImageFormat::Png, 3, 2)));
    assert_eq!(detect(&png(1, 40)), Ok(info(ImageFormat::Png, 1, 40)));
    assert_eq!(detect(&gif()), Ok(info(ImageFormat::Gif, 1, 1)));
    assert_eq!(detect(&jpeg(1, 1)), Ok(info(ImageFormat::Jpeg, 1, 1)));
    assert_eq!(detect(&jpeg(5, 3)), Ok(info(ImageFormat::Jpeg, 5, 3)));
    assert_eq!(detect(&jpeg_two_scans()), Ok(info(ImageFormat::Jpeg, 8, 8)));
    assert_eq!(
        detect(&webp_lossless(1, 1)),
        Ok(info(ImageFormat::Webp, 1, 1))
    );
    assert_eq!(
        detect(&webp_lossless(16384, 3)),
        Ok(info(ImageFormat::Webp, 16384, 3))
    );
    assert_eq!(
        detect(&webp_extended(300, 200)),
        Ok(info(ImageFormat::Webp, 300, 200))
    );
    assert_eq!(
        detect(&webp_lossy(640, 480)),
        Ok(info(ImageFormat::Webp, 640, 480))
    );
}

#[test]
fn reads_gif_size_from_the_screen_descriptor() {
    let mut wide = gif();
    wide[6..10].copy_from_slice(&[0x2C, 0x01, 0x02, 0x00]); // 300x2
    assert_eq!(detect(&wide), Ok(info(ImageFormat::Gif, 300, 2)));
}

#[test]
fn content_types_and_names_match_the_formats() {
    let types: Vec<_> = ImageFormat::ALL
        .iter()
        .map(|f| (f.content_type(), f.extension(), f.to_string()))
        .collect();
    assert_eq!(
        types,
        [
            ("image/png", "png", "PNG".to_string()),
            ("image/jpeg", "jpg", "JPEG".to_string()),
            ("image/gif", "gif", "GIF".to_string()),
            ("image/webp", "webp", "WebP".to_string()),
        ]
    );
    for format in ImageFormat::ALL {
        assert_eq!(
            ImageFormat::from_content_type(format.content_type()),
            Some(format)
        );
    }
    assert_eq!(ImageFormat::from_content_type("image/svg+xml"), None);
}

#[test]
fn every_truncation_of_every_fixture_is_refused_as_incomplete() {
    for (name, format, bytes) in fixtures() {
        for len in 12..bytes.len() {
            match detect(&bytes[..len]) {
                Err(ImageError::Truncated { format: f, .. }) => {
                    assert_eq!(f, format, "{name} cut to {len} bytes")
                }
                other => panic!("{name} cut to {len} of {} bytes: {other:?}", bytes.len()),
            }
        }
        // Shorter than every header: refused, whatever it is called.
        for len in 1..12 {
            assert!(detect(&bytes[..len]).is_err(), "{name} cut to {len} bytes");
        }
    }
}

#[test]
fn a_truncation_message_says_where_the_file_ends() {
    let png = png(3, 2);
    let err = detect(&png[..png.len() - 12]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the PNG image is incomplete: the file ends before the end chunk (IEND); upload the \
         whole file"
    );
    let jpeg = jpeg(1, 1);
    assert_eq!(
        detail(detect(&jpeg[..jpeg.len() - 2]).unwrap_err()),
        "the file ends inside the image data"
    );
    let webp = webp_lossless(1, 1);
    assert_eq!(
        detail(detect(&webp[..20]).unwrap_err()),
        "the container says 28 bytes but the file has 20"
    );
}

#[test]
fn empty_input_is_refused_with_its_own_message() {
    assert_eq!(detect(&[]), Err(ImageError::Empty));
    let err = check_upload(&[]).unwrap_err();
    assert_eq!(err, ImageError::Empty);
    assert_eq!((err.code(), err.http_status()), ("empty_upload", 400));
    assert_eq!(
        err.to_string(),
        "the upload is empty: send the image file's bytes as the request body"
    );
}

#[test]
fn html_is_refused_whatever_it_is_called() {
    // What a visitor might upload as `cat.png`: the name never reaches `detect`.
    for page in [
        &b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script>"[..],
        b"\xEF\xBB\xBF\n  <html><img src=x onerror=alert(1)>",
        b"<?xml version=\"1.0\"?><note/>",
    ] {
        let err = detect(page).unwrap_err();
        assert_eq!(
            err,
            ImageError::Unsupported {
                looks_like: "an HTML or XML document"
            }
        );
        assert_eq!((err.code(), err.http_status()), ("not_an_image", 415));
    }
}

#[test]
fn polyglots_that_start_like_an_image_are_refused() {
    // A GIF header used as the start of a script (the GIFAR/JS polyglot trick).
    let err = detect(b"GIF89a/*\x01\x00\x01\x00*/=1;alert(1)//").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Malformed {
                format: ImageFormat::Gif,
                ..
            }
        ),
        "{err:?}"
    );
    // A PNG signature followed by a page instead of chunks.
    let mut fake = b"\x89PNG\r\n\x1a\n".to_vec();
    fake.extend_from_slice(b"<html><script>alert(1)</script></html>");
    assert!(matches!(
        detect(&fake),
        Err(ImageError::Malformed {
            format: ImageFormat::Png,
            ..
        })
    ));
    // Valid images with a page appended after their end.
    let script = b"<script>alert(1)</script>";
    for (name, bytes) in [
        ("png", png(1, 1)),
        ("gif", gif()),
        ("webp", webp_lossless(1, 1)),
    ] {
        let mut poly = bytes.clone();
        poly.extend_from_slice(script);
        let message = detail(detect(&poly).unwrap_err());
        assert!(message.contains("25 bytes follow"), "{name}: {message}");
    }
}

#[test]
fn jpeg_trailers_are_tolerated() {
    // Phones append motion-photo video and vendor data after EOI; browsers ignore it.
    let mut photo = jpeg(2, 2);
    photo.extend_from_slice(b"\0\0\0\x18ftypmp42 trailer \xFF\xD9 more");
    assert_eq!(detect(&photo), Ok(info(ImageFormat::Jpeg, 2, 2)));
}

#[test]
fn svg_is_refused_because_it_can_carry_scripts() {
    for svg in [
        &b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>"[..],
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- drawn by hand -->\n<!DOCTYPE svg>\n<SVG/>",
        b"\xEF\xBB\xBF  \r\n<svg/>",
    ] {
        let err = detect(svg).unwrap_err();
        assert_eq!(err, ImageError::Svg);
        assert_eq!(err.http_status(), 415);
        assert!(err.to_string().contains("can carry scripts"), "{err}");
    }
}

#[test]
fn other_formats_are_named_in_the_refusal() {
    let cases: [(&[u8], &str); 6] = [
        (b"%PDF-1.7\n", "a PDF document"),
        (b"BM\x36\x00\x00\x00", "a BMP image"),
        (b"II*\0\x08\0\0\0", "a TIFF image"),
        (b"\0\0\0\x1cftypavif", "a HEIF or AVIF image, or a video"),
        (
            b"RIFF\x24\0\0\0WAVEfmt ",
            "a RIFF file that is not WebP (audio or video)",
        ),
        (b"hello, world", "no image signature that this site knows"),
    ];
    for (bytes, looks_like) in cases {
        assert_eq!(detect(bytes), Err(ImageError::Unsupported { looks_like }));
    }
    assert_eq!(
        detect(b"hello").unwrap_err().to_string(),
        "not an accepted image: the data looks like no image signature that this site knows; \
         upload a PNG, JPEG, GIF or WebP image (the file's name and declared type are not \
         considered, only its content)"
    );
}

#[test]
fn random_garbage_is_refused() {
    let mut rng = SmallRng::seed_from_u64(5);
    for _ in 0..2000 {
        let len = rng.random_range(1..300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        assert!(detect(&bytes).is_err(), "accepted {bytes:?}");
    }
}

#[test]
fn corrupted_fixtures_never_panic_and_keep_their_format_when_accepted() {
    // Flip random bytes: the parser must answer, never index out of bounds, and anything it
    // still accepts must be the fixture's format.
    let mut rng = SmallRng::seed_from_u64(7);
    for (name, format, bytes) in fixtures() {
        for _ in 0..3000 {
            let mut bad = bytes.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bad.len());
                bad[at] = rng.random();
            }
            if let Ok(found) = detect(&bad) {
                assert_eq!(found.format, format, "{name} corrupted to {bad:?}");
            }
        }
    }
}

#[test]
fn damaged_headers_are_refused_with_what_is_wrong() {
    let mut zero_width = png(1, 1);
    zero_width[16..20].copy_from_slice(&[0; 4]);
    assert_eq!(
        detail(detect(&zero_width).unwrap_err()),
        "its header says 0x1 pixels"
    );

    let mut bad_depth = png(1, 1);
    bad_depth[24] = 3; // 3-bit RGBA
    assert_eq!(
        detail(detect(&bad_depth).unwrap_err()),
        "colour type 6 with bit depth 3 does not exist"
    );

    let mut no_ihdr = png(1, 1);
    no_ihdr[12..16].copy_from_slice(b"tEXt");
    assert_eq!(
        detail(detect(&no_ihdr).unwrap_err()),
        "the first chunk is not a 13-byte image header (IHDR)"
    );

    let mut no_idat = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0]);
    png_chunk(&mut no_idat, b"IHDR", &ihdr);
    png_chunk(&mut no_idat, b"IEND", &[]);
    assert_eq!(
        detail(detect(&no_idat).unwrap_err()),
        "it has no image data (IDAT) chunk"
    );

    let mut scan_first = vec![0xFF, 0xD8];
    scan_first.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x3F, 0xFF, 0xD9]);
    assert_eq!(
        detail(detect(&scan_first).unwrap_err()),
        "a scan comes before the frame header (SOF)"
    );

    assert_eq!(
        detail(detect(&[0xFF, 0xD8, 0xFF, 0xD9]).unwrap_err()),
        "it ends before any image data"
    );

    let mut zero_gif = gif();
    zero_gif[6..8].copy_from_slice(&[0, 0]);
    assert_eq!(
        detail(detect(&zero_gif).unwrap_err()),
        "its screen descriptor says 0x1 pixels"
    );

    let mut inter_frame = webp_lossy(2, 2);
    inter_frame[20] |= 1;
    assert_eq!(
        detail(detect(&inter_frame).unwrap_err()),
        "its VP8 data does not start with a key frame"
    );

    let odd = riff(&[(b"ICCP", b"profile")]);
    assert_eq!(
        detail(detect(&odd).unwrap_err()),
        "it holds no image data (VP8, VP8L or ANMF chunk)"
    );
    let odd = riff(&[(b"ICCP", b"profile"), (b"VP8L", &vp8l(1, 1))]);
    assert_eq!(
        detail(detect(&odd).unwrap_err()),
        "its first chunk is \"ICCP\", not VP8, VP8L or VP8X"
    );
}

#[test]
fn size_is_checked_before_content() {
    let big = vec![0u8; MAX_IMAGE_BYTES + 1];
    let err = check_upload(&big).unwrap_err();
    assert_eq!(
        err,
        ImageError::TooLarge {
            size: MAX_IMAGE_BYTES + 1,
            limit: MAX_IMAGE_BYTES
        }
    );
    assert_eq!((err.code(), err.http_status()), ("too_large", 413));
    assert_eq!(
        err.to_string(),
        "the image is 10485761 bytes, larger than the limit of 10485760 bytes (10 MiB): upload \
         a smaller or more compressed image"
    );
    // At the limit, the content decides.
    let mut at_limit = png(1, 1);
    at_limit.resize(MAX_IMAGE_BYTES, 0);
    assert!(matches!(
        check_upload(&at_limit),
        Err(ImageError::Malformed {
            format: ImageFormat::Png,
            ..
        })
    ));
    assert_eq!(check_upload(&gif()), Ok(info(ImageFormat::Gif, 1, 1)));
}

#[test]
fn a_large_jpeg_is_walked_quickly() {
    // 9 MiB of scan data full of stuffed bytes: the walker stays linear.
    let mut big = jpeg(8, 8);
    big.truncate(big.len() - 3);
    let scan: Vec<u8> = (0..9 << 20)
        .map(|i| {
            if i % 3 == 0 {
                0xFF
            } else if i % 3 == 1 {
                0x00
            } else {
                0x5A
            }
        })
        .collect();
    big.extend_from_slice(&scan);
    big.extend_from_slice(&[0xFF, 0xD9]);
    let started = std::time::Instant::now();
    assert_eq!(check_upload(&big), Ok(info(ImageFormat::Jpeg, 8, 8)));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn key_errors_carry_their_status() {
    let err = ImageKey::parse("../x").unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("invalid_key", 400));
}
