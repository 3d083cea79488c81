//! Thumbnails: an accepted image's bytes in, a small still image's bytes and size out.
//!
//! Pure and synchronous (no I/O, no runtime): the caller runs [`make`] on a blocking thread
//! and stores the result. The rules:
//!
//! - **Bounded size.** The long side is at most [`MAX_SIDE`] (320) pixels, the aspect ratio
//!   kept (to the nearest pixel, at least 1); an image already within the bound keeps its
//!   size: never upscaled, only re-encoded.
//! - **JPEG at quality [`JPEG_QUALITY`] (80)**, the format of photographs and of most bytes
//!   saved. An image with transparency that shows (an alpha channel with a pixel below fully
//!   opaque, after scaling) is a PNG instead: JPEG has no alpha, and flattening onto a colour
//!   guessed for the page would draw a box around logos and icons. Such thumbnails are larger,
//!   but they are rare among photographs.
//! - **Still.** An animated GIF or WebP gives its first frame (what the decoders read).
//! - **Upright.** A JPEG's (or WebP's) Exif orientation is applied, as browsers apply it to
//!   the original.
//! - **Decoding cannot exhaust memory.** The dimensions are read from the header first
//!   ([`detect`], which also walks the structure to its end) and an image over
//!   [`MAX_DIMENSION`] on a side or over [`MAX_PIXELS`] in all is refused before a pixel is
//!   decoded; the decoder then runs under `image::Limits` (the same dimensions, and at most
//!   [`MAX_DECODE_BYTES`] allocated), so a header that lies is caught too. A refusal or a
//!   decoding failure is a typed [`ThumbError`] with a metric label ([`ThumbError::reason`]);
//!   the caller serves the original instead.
//!
//! Why 24 Mpx and 96 MiB rather than 64 MiB: a 24-megapixel phone photograph (6000×4000)
//! fits the 10 MiB upload limit as JPEG and decodes to 72 MB of RGB; a 64 MiB budget would
//! leave every such upload without a thumbnail. 24 Mi pixels of RGBA is exactly 96 MiB, so any
//! image that passes the header check can be decoded within the budget. The caller bounds how
//! many thumbnails are made at once, and so the memory they take together.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageEncoder, ImageReader, Limits};

use super::format::{ImageFormat, detect};

/// Longest side of a thumbnail, in pixels.
pub const MAX_SIDE: u32 = 320;

/// JPEG quality of thumbnails (1–100).
pub const JPEG_QUALITY: u8 = 80;

/// Widest or tallest image a thumbnail is made of, in pixels.
pub const MAX_DIMENSION: u32 = 8192;

/// Most pixels an image a thumbnail is made of may have: 24 Mi (a 24-megapixel photograph).
pub const MAX_PIXELS: u64 = 24 << 20;

/// Most bytes the decoder may allocate: [`MAX_PIXELS`] of 8-bit RGBA (96 MiB).
pub const MAX_DECODE_BYTES: u64 = MAX_PIXELS * 4;

/// The encoding of a thumbnail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThumbFormat {
    /// An opaque image.
    Jpeg,
    /// An image with transparency.
    Png,
}

impl ThumbFormat {
    /// The media type the thumbnail is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            ThumbFormat::Jpeg => "image/jpeg",
            ThumbFormat::Png => "image/png",
        }
    }
}

/// A thumbnail: its encoded bytes and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thumbnail {
    /// The encoded image.
    pub bytes: Vec<u8>,
    /// How it is encoded.
    pub format: ThumbFormat,
    /// Width in pixels, at most [`MAX_SIDE`].
    pub width: u32,
    /// Height in pixels, at most [`MAX_SIDE`].
    pub height: u32,
}

/// Why no thumbnail was made of an image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThumbError {
    /// The header names a size over the limits; nothing was decoded.
    #[error(
        "the image is {width}×{height} pixels; thumbnails are made of images up to \
         {MAX_DIMENSION} pixels a side and {MAX_PIXELS} pixels in all"
    )]
    TooLarge {
        /// Width the header names.
        width: u32,
        /// Height the header names.
        height: u32,
    },
    /// Decoding would allocate more than [`MAX_DECODE_BYTES`], or the decoder found a size
    /// over the limits that the header check did not.
    #[error("decoding the image would need more memory than the limit of {MAX_DECODE_BYTES} bytes")]
    Memory,
    /// The bytes are not an accepted image, or not a whole one.
    #[error("the image cannot be read: {0}")]
    Corrupt(String),
    /// The decoder does not handle this variant of the format.
    #[error("the image uses a feature the decoder does not support: {0}")]
    Unsupported(String),
    /// Encoding the thumbnail failed.
    #[error("encoding the thumbnail failed: {0}")]
    Encode(String),
}

impl ThumbError {
    /// The metric label of the refusal: `dimensions`, `memory`, `corrupt`, `unsupported` or
    /// `encode`.
    pub fn reason(&self) -> &'static str {
        match self {
            ThumbError::TooLarge { .. } => "dimensions",
            ThumbError::Memory => "memory",
            ThumbError::Corrupt(_) => "corrupt",
            ThumbError::Unsupported(_) => "unsupported",
            ThumbError::Encode(_) => "encode",
        }
    }
}

impl From<image::ImageError> for ThumbError {
    fn from(e: image::ImageError) -> Self {
        match e {
            image::ImageError::Limits(_) => ThumbError::Memory,
            image::ImageError::Unsupported(e) => ThumbError::Unsupported(e.to_string()),
            image::ImageError::Encoding(e) => ThumbError::Encode(e.to_string()),
            other => ThumbError::Corrupt(other.to_string()),
        }
    }
}

/// The size of a thumbnail of a `width`×`height` image: the long side brought down to
/// [`MAX_SIDE`], the other in proportion (rounded, at least 1); unchanged when it fits.
pub fn thumbnail_size(width: u32, height: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= MAX_SIDE {
        return (width, height);
    }
    let scale = |side: u32| -> u32 {
        let scaled =
            (u64::from(side) * u64::from(MAX_SIDE) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled).unwrap_or(MAX_SIDE).clamp(1, MAX_SIDE)
    };
    (scale(width), scale(height))
}

/// Makes the thumbnail of `bytes` (see the module documentation for the rules).
pub fn make(bytes: &[u8]) -> Result<Thumbnail, ThumbError> {
    let info = detect(bytes).map_err(|e| ThumbError::Corrupt(e.to_string()))?;
    let pixels = u64::from(info.width) * u64::from(info.height);
    if info.width > MAX_DIMENSION || info.height > MAX_DIMENSION || pixels > MAX_PIXELS {
        return Err(ThumbError::TooLarge {
            width: info.width,
            height: info.height,
        });
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DIMENSION);
    limits.max_image_height = Some(MAX_DIMENSION);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), decoder_format(info.format));
    reader.limits(limits);
    let mut decoder = reader.into_decoder()?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ThumbError::TooLarge { width, height });
    }
    // An unreadable orientation is no reason to go without a thumbnail.
    let orientation = decoder.orientation().ok();
    let image = DynamicImage::from_decoder(decoder)?;
    let (w, h) = thumbnail_size(image.width(), image.height());
    let mut small = if (w, h) == (image.width(), image.height()) {
        image
    } else {
        // Each source pixel counts once (an area average): sharp enough at these ratios, and
        // several times faster than a convolution filter on a large photograph.
        image.thumbnail_exact(w, h)
    };
    if let Some(orientation) = orientation {
        small.apply_orientation(orientation);
    }
    encode(&small)
}

fn decoder_format(format: ImageFormat) -> image::ImageFormat {
    match format {
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        ImageFormat::Gif => image::ImageFormat::Gif,
        ImageFormat::Webp => image::ImageFormat::WebP,
    }
}

/// JPEG unless some pixel is not fully opaque, then PNG.
fn encode(image: &DynamicImage) -> Result<Thumbnail, ThumbError> {
    let (width, height) = (image.width(), image.height());
    let mut bytes = Vec::new();
    let transparent = image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p.0[3] < 255);
    let format = if transparent {
        let rgba = image.to_rgba8();
        PngEncoder::new(&mut bytes).write_image(
            rgba.as_raw(),
            width,
            height,
            ExtendedColorType::Rgba8,
        )?;
        ThumbFormat::Png
    } else {
        let rgb = image.to_rgb8();
        JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY).write_image(
            rgb.as_raw(),
            width,
            height,
            ExtendedColorType::Rgb8,
        )?;
        ThumbFormat::Jpeg
    };
    Ok(Thumbnail {
        bytes,
        format,
        width,
        height,
    })
}

#[cfg(test)]
mod tests;
