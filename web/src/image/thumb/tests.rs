//! Thumbnails of every accepted format: size bounds, aspect, no upscaling, first frames,
//! transparency, and refusals (oversized headers, truncated and damaged bytes).

use std::time::{Duration, Instant};

use image::codecs::gif::GifEncoder;
use image::codecs::webp::WebPEncoder;
use image::{Delay, Frame, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

use super::*;

/// A photograph-like test card: gradients with a little per-pixel noise.
fn card(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let noise = (x.wrapping_mul(31) ^ y.wrapping_mul(17)) % 23;
        let r = (x * 255 / width.max(1)) as u8;
        let g = (y * 255 / height.max(1)) as u8;
        Rgb([r.saturating_add(noise as u8), g, 128])
    })
}

fn png_of(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

fn png_rgba(image: &RgbaImage) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgba8,
        )
        .unwrap();
    out
}

fn jpeg_of(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

fn webp_of(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    WebPEncoder::new_lossless(&mut out)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

/// An animated GIF whose frames are each one colour, in order.
fn animated_gif(width: u32, height: u32, colours: &[[u8; 4]]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        let frames = colours.iter().map(|&c| {
            Frame::from_parts(
                RgbaImage::from_pixel(width, height, Rgba(c)),
                0,
                0,
                Delay::from_numer_denom_ms(100, 1),
            )
        });
        encoder.encode_frames(frames).unwrap();
    }
    out
}

/// The decoded thumbnail, to look at its pixels.
fn decoded(thumb: &Thumbnail) -> DynamicImage {
    image::load_from_memory(&thumb.bytes).unwrap()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid small PNG whose header then claims `width`×`height` (CRC fixed up, so only the
/// size is wrong).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = png_of(&card(4, 4));
    // Signature (8), length (4), "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn sizes_bring_the_long_side_to_320_and_keep_the_aspect() {
    assert_eq!(thumbnail_size(1600, 1200), (320, 240));
    assert_eq!(thumbnail_size(1200, 1600), (240, 320));
    assert_eq!(thumbnail_size(321, 321), (320, 320));
    assert_eq!(thumbnail_size(8192, 1), (320, 1));
    assert_eq!(thumbnail_size(1000, 333), (320, 107));
    // Never upscaled.
    assert_eq!(thumbnail_size(320, 100), (320, 100));
    assert_eq!(thumbnail_size(1, 1), (1, 1));
}

#[test]
fn a_large_photograph_becomes_a_small_jpeg_of_the_same_aspect() {
    for (name, bytes) in [
        ("png", png_of(&card(1600, 1200))),
        ("jpeg", jpeg_of(&card(1600, 1200))),
        ("webp", webp_of(&card(1600, 1200))),
    ] {
        let thumb = make(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((thumb.width, thumb.height), (320, 240), "{name}");
        assert_eq!(thumb.format, ThumbFormat::Jpeg, "{name}");
        assert!(thumb.bytes.starts_with(&[0xFF, 0xD8]), "{name}: not a JPEG");
        let back = decoded(&thumb);
        assert_eq!((back.width(), back.height()), (320, 240), "{name}");
        assert!(
            thumb.bytes.len() * 10 < bytes.len(),
            "{name}: {} bytes from {}",
            thumb.bytes.len(),
            bytes.len()
        );
        assert!(
            thumb.bytes.len() < 64 << 10,
            "{name}: {}",
            thumb.bytes.len()
        );
    }
}

#[test]
fn the_thumbnail_shows_the_picture() {
    // Left half black, right half white: so must the thumbnail be.
    let image = RgbImage::from_fn(1000, 500, |x, _| {
        if x < 500 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let thumb = decoded(&make(&png_of(&image)).unwrap()).to_rgb8();
    assert_eq!(thumb.dimensions(), (320, 160));
    assert!(thumb.get_pixel(40, 80).0[0] < 30);
    assert!(thumb.get_pixel(280, 80).0[0] > 225);
}

#[test]
fn small_images_keep_their_size() {
    for (w, h) in [(320, 200), (100, 100), (1, 1), (7, 320)] {
        let thumb = make(&png_of(&card(w, h))).unwrap();
        assert_eq!((thumb.width, thumb.height), (w, h));
        let back = decoded(&thumb);
        assert_eq!((back.width(), back.height()), (w, h));
    }
}

#[test]
fn an_animated_gif_gives_its_first_frame_still() {
    let gif = animated_gif(400, 200, &[[255, 0, 0, 255], [0, 0, 255, 255]]);
    let thumb = make(&gif).unwrap();
    assert_eq!((thumb.width, thumb.height), (320, 160));
    assert_eq!(thumb.format, ThumbFormat::Jpeg);
    let pixel = decoded(&thumb).to_rgb8().get_pixel(160, 80).0;
    assert!(
        pixel[0] > 200 && pixel[2] < 60,
        "not the red first frame: {pixel:?}"
    );
}

#[test]
fn transparency_keeps_png_and_opaque_alpha_does_not() {
    let see_through = RgbaImage::from_fn(640, 480, |x, _| Rgba([200, 10, 10, (x % 256) as u8]));
    let thumb = make(&png_rgba(&see_through)).unwrap();
    assert_eq!(thumb.format, ThumbFormat::Png);
    assert_eq!(thumb.format.content_type(), "image/png");
    assert_eq!((thumb.width, thumb.height), (320, 240));
    assert!(decoded(&thumb).color().has_alpha());

    let opaque = RgbaImage::from_pixel(640, 480, Rgba([10, 200, 10, 255]));
    let thumb = make(&png_rgba(&opaque)).unwrap();
    assert_eq!(thumb.format, ThumbFormat::Jpeg);
    assert_eq!(thumb.format.content_type(), "image/jpeg");
}

#[test]
fn a_header_claiming_60000_by_60000_is_refused_before_decoding() {
    let bomb = png_claiming(60_000, 60_000);
    let started = Instant::now();
    let err = make(&bomb).unwrap_err();
    assert_eq!(
        err,
        ThumbError::TooLarge {
            width: 60_000,
            height: 60_000
        }
    );
    assert_eq!(err.reason(), "dimensions");
    // Decoding 3.6 Gpx would take seconds and 14 GB; the header check takes microseconds.
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(err.to_string().contains("60000×60000"), "{err}");
}

#[test]
fn too_many_pixels_within_the_side_limit_are_refused() {
    let err = make(&png_claiming(8192, 8192)).unwrap_err();
    assert_eq!(err.reason(), "dimensions");
    let err = make(&png_claiming(8193, 10)).unwrap_err();
    assert_eq!(err.reason(), "dimensions");
}

#[test]
fn truncated_and_damaged_images_are_refused_as_corrupt() {
    let jpeg = jpeg_of(&card(800, 600));
    let png = png_of(&card(800, 600));
    for (name, bytes) in [
        ("half a jpeg", jpeg[..jpeg.len() / 2].to_vec()),
        ("half a png", png[..png.len() / 2].to_vec()),
        ("garbage", b"definitely not an image".to_vec()),
        ("empty", Vec::new()),
    ] {
        let err = make(&bytes).unwrap_err();
        assert_eq!(err.reason(), "corrupt", "{name}: {err}");
    }
    // Whole structure, damaged pixel data: the header check passes, the decoder refuses.
    let mut damaged = png.clone();
    let middle = damaged.len() / 2;
    for byte in &mut damaged[middle..middle + 64] {
        *byte ^= 0x5A;
    }
    let err = make(&damaged).unwrap_err();
    assert_eq!(err.reason(), "corrupt", "{err}");
}

#[test]
fn reasons_cover_every_refusal() {
    assert_eq!(ThumbError::Memory.reason(), "memory");
    assert_eq!(
        ThumbError::Unsupported(String::new()).reason(),
        "unsupported"
    );
    assert_eq!(ThumbError::Encode(String::new()).reason(), "encode");
    let limits = image::ImageError::Limits(image::error::LimitError::from_kind(
        image::error::LimitErrorKind::InsufficientMemory,
    ));
    assert_eq!(ThumbError::from(limits), ThumbError::Memory);
}
