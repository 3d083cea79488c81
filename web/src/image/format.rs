//! Image formats, recognised by their bytes.
//!
//! An upload is judged by what it is, never by its name or the type the browser declared:
//! those are the visitor's word, and a file served back with the wrong type is how stored
//! cross-site scripting works (an HTML page named `cat.png`). Each accepted format is
//! recognised by its signature and then walked just far enough to know its structure is
//! whole: the container's chunks, segments or blocks are followed by their length fields to
//! the format's end marker, without decoding a pixel. That is linear in the file, allocates
//! nothing, and catches truncated uploads and most garbage; a file that passes has the
//! shape of an image, which is all the site needs (browsers decode it, not us).
//!
//! Accepted: PNG, JPEG, GIF, WebP — the formats every browser shows. Refused:
//! - **SVG**: it is XML that can carry `<script>` and event handlers, which run with this
//!   site's origin when the image is opened directly. Sanitising SVG is a project of its own.
//! - everything else, with a message that names what the data looks like when it is a
//!   well-known document or image type, so the visitor knows what to convert.
//!
//! Data after a format's end marker is refused for PNG, GIF and WebP (their specifications
//! put nothing there, and appended payloads are how image/script polyglots are built), but
//! tolerated after a JPEG's end marker: phone cameras append motion-photo video and vendor
//! trailers there, and refusing them would refuse ordinary photos. The site serves every
//! image with its detected type and `nosniff`, so a trailer is never interpreted.

use std::fmt;

use super::ImageError;

/// An accepted image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// Portable Network Graphics (also APNG, which is a PNG to everything but a browser).
    Png,
    /// JPEG (JFIF or Exif), baseline or progressive.
    Jpeg,
    /// GIF87a or GIF89a, still or animated.
    Gif,
    /// WebP: lossy (`VP8 `), lossless (`VP8L`) or extended (`VP8X`, animation and alpha).
    Webp,
}

impl ImageFormat {
    /// Every accepted format.
    pub const ALL: [ImageFormat; 4] = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Gif,
        ImageFormat::Webp,
    ];

    /// The media type the image is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The format whose [`content_type`](Self::content_type) is `content_type`.
    pub fn from_content_type(content_type: &str) -> Option<ImageFormat> {
        Self::ALL
            .into_iter()
            .find(|format| format.content_type() == content_type)
    }

    /// The usual file name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
        }
    }

    /// The format's name as people write it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Gif => "GIF",
            ImageFormat::Webp => "WebP",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the bytes of an accepted image say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format.
    pub format: ImageFormat,
    /// Width in pixels (the canvas, for animations).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Recognises `bytes` as one of the accepted formats and checks that its structure is whole
/// (see the module documentation). Size limits are [`super::check_upload`]'s business.
pub fn detect(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    let (format, (width, height)) = if bytes.starts_with(PNG_SIGNATURE) {
        (ImageFormat::Png, png(bytes)?)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        (ImageFormat::Jpeg, jpeg(bytes)?)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        (ImageFormat::Gif, gif(bytes)?)
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        (ImageFormat::Webp, webp(bytes)?)
    } else if bytes.is_empty() {
        return Err(ImageError::Empty);
    } else {
        return Err(not_an_image(bytes));
    };
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// The refusal for data that is none of the accepted formats, naming what it looks like.
fn not_an_image(bytes: &[u8]) -> ImageError {
    if let Some(markup) = markup_start(bytes) {
        // Look a little way in for the root element: an SVG often opens with an XML
        // declaration, comments or a doctype.
        let head = &markup[..markup.len().min(4096)];
        if contains_ignore_case(head, b"<svg") {
            return ImageError::Svg;
        }
        return ImageError::Unsupported {
            looks_like: "an HTML or XML document",
        };
    }
    let looks_like = if bytes.starts_with(b"%PDF-") {
        "a PDF document"
    } else if bytes.starts_with(b"BM") {
        "a BMP image"
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        "a TIFF image"
    } else if bytes.get(4..8) == Some(b"ftyp") {
        "a HEIF or AVIF image, or a video"
    } else if bytes.starts_with(b"PK\x03\x04") {
        "a ZIP archive"
    } else if bytes.starts_with(b"RIFF") {
        "a RIFF file that is not WebP (audio or video)"
    } else {
        "no image signature that this site knows"
    };
    ImageError::Unsupported { looks_like }
}

/// The data from its first `<`, if it starts (after a byte order mark and white space) with
/// markup.
fn markup_start(bytes: &[u8]) -> Option<&[u8]> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = bytes.get(start..)?;
    rest.starts_with(b"<").then_some(rest)
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

// Readers that answer `None` past the end instead of panicking.

fn u16_be(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u16_le(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u24_le(bytes: &[u8], at: usize) -> Option<u32> {
    let [low, mid, high]: [u8; 3] = bytes.get(at..at.checked_add(3)?)?.try_into().ok()?;
    Some(u32::from_le_bytes([low, mid, high, 0]))
}

fn u32_be(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u32_le(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn byte(bytes: &[u8], at: usize) -> Option<u8> {
    bytes.get(at).copied()
}

fn truncated(format: ImageFormat, detail: impl Into<String>) -> ImageError {
    ImageError::Truncated {
        format,
        detail: detail.into(),
    }
}

fn malformed(format: ImageFormat, detail: impl Into<String>) -> ImageError {
    ImageError::Malformed {
        format,
        detail: detail.into(),
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The largest width, height or chunk length PNG allows (2^31 - 1).
const PNG_MAX: u32 = i32::MAX as u32;

/// PNG: signature, then chunks (`length`, 4-letter type, data, CRC) from `IHDR` to `IEND`.
fn png(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    const F: ImageFormat = ImageFormat::Png;
    let header = PNG_SIGNATURE.len();
    match (u32_be(bytes, header), bytes.get(header + 4..header + 8)) {
        (Some(13), Some(b"IHDR")) => {}
        (Some(_), Some(_)) => {
            return Err(malformed(
                F,
                "the first chunk is not a 13-byte image header (IHDR)",
            ));
        }
        _ => return Err(truncated(F, "the file ends inside the image header")),
    }
    let ihdr = header + 8;
    let (Some(width), Some(height), Some(depth), Some(color)) = (
        u32_be(bytes, ihdr),
        u32_be(bytes, ihdr + 4),
        byte(bytes, ihdr + 8),
        byte(bytes, ihdr + 9),
    ) else {
        return Err(truncated(F, "the file ends inside the image header"));
    };
    if !(1..=PNG_MAX).contains(&width) || !(1..=PNG_MAX).contains(&height) {
        return Err(malformed(
            F,
            format!("its header says {width}x{height} pixels"),
        ));
    }
    let depth_ok = match color {
        0 => matches!(depth, 1 | 2 | 4 | 8 | 16),
        3 => matches!(depth, 1 | 2 | 4 | 8),
        2 | 4 | 6 => matches!(depth, 8 | 16),
        _ => false,
    };
    if !depth_ok {
        return Err(malformed(
            F,
            format!("colour type {color} with bit depth {depth} does not exist"),
        ));
    }
    let mut at = header;
    let mut image_data = false;
    loop {
        let (Some(len), Some(kind)) = (u32_be(bytes, at), bytes.get(at + 4..at + 8)) else {
            return Err(truncated(F, "the file ends before the end chunk (IEND)"));
        };
        if len > PNG_MAX {
            return Err(malformed(F, format!("a chunk claims {len} bytes")));
        }
        if !kind.iter().all(u8::is_ascii_alphabetic) {
            return Err(malformed(
                F,
                format!("a chunk at byte {at} has no type name"),
            ));
        }
        // Length, type, data, CRC. The CRC is not checked: a wrong one is corruption a
        // decoder reports, not a safety matter, and checking it costs a pass over the data.
        let end = at + 12 + len as usize;
        if end > bytes.len() {
            return Err(truncated(
                F,
                format!(
                    "the file ends inside a {} chunk",
                    String::from_utf8_lossy(kind)
                ),
            ));
        }
        match kind {
            b"IDAT" => image_data = true,
            b"IEND" => {
                if !image_data {
                    return Err(malformed(F, "it has no image data (IDAT) chunk"));
                }
                if end != bytes.len() {
                    return Err(malformed(
                        F,
                        format!("{} bytes follow its end chunk (IEND)", bytes.len() - end),
                    ));
                }
                return Ok((width, height));
            }
            _ => {}
        }
        at = end;
    }
}

/// JPEG: markers and length-prefixed segments up to each scan, the entropy-coded data of
/// each scan (where `FF` is followed by `00` or a restart marker), until the end marker.
fn jpeg(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    const F: ImageFormat = ImageFormat::Jpeg;
    let mut at = 2;
    let mut size = None;
    let mut scans = 0;
    loop {
        if byte(bytes, at) != Some(0xFF) {
            return Err(match byte(bytes, at) {
                None => truncated(F, "the file ends before the end marker (EOI)"),
                Some(_) => malformed(F, format!("no marker where one belongs, at byte {at}")),
            });
        }
        // Any number of FF fill bytes may precede a marker code.
        while byte(bytes, at + 1) == Some(0xFF) {
            at += 1;
        }
        let Some(marker) = byte(bytes, at + 1) else {
            return Err(truncated(F, "the file ends before the end marker (EOI)"));
        };
        match marker {
            0xD9 => {
                return match size {
                    Some(size) if scans > 0 => Ok(size),
                    _ => Err(malformed(F, "it ends before any image data")),
                };
            }
            0xD8 => return Err(malformed(F, "a second start marker (SOI) appears")),
            0x00 => return Err(malformed(F, format!("an empty marker at byte {at}"))),
            // Markers without a segment: TEM and the restart markers.
            0x01 | 0xD0..=0xD7 => {
                at += 2;
                continue;
            }
            _ => {}
        }
        let Some(len) = u16_be(bytes, at + 2) else {
            return Err(truncated(F, "the file ends inside a segment header"));
        };
        let len = usize::from(len);
        if len < 2 {
            return Err(malformed(
                F,
                format!("a segment at byte {at} is {len} bytes"),
            ));
        }
        let body = at + 4;
        let end = at + 2 + len;
        if end > bytes.len() {
            return Err(truncated(F, "the file ends inside a segment"));
        }
        match marker {
            // Frame headers (SOF0-SOF15); C4, C8 and CC in that range are other segments.
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                // Precision (1 byte), height, width (2 each), component count (1).
                let (true, Some(height), Some(width)) =
                    (len >= 8, u16_be(bytes, body + 1), u16_be(bytes, body + 3))
                else {
                    return Err(malformed(F, "its frame header (SOF) is too short"));
                };
                if width == 0 || height == 0 {
                    // Height 0 means "given later by a DNL marker": legal, but so rare that
                    // accepting it is not worth the extra parsing.
                    return Err(malformed(
                        F,
                        format!("its frame header says {width}x{height} pixels"),
                    ));
                }
                size.get_or_insert((u32::from(width), u32::from(height)));
                at = end;
            }
            // Start of scan: the segment, then entropy-coded data up to the next marker.
            0xDA => {
                if size.is_none() {
                    return Err(malformed(F, "a scan comes before the frame header (SOF)"));
                }
                scans += 1;
                at = scan_end(bytes, end)
                    .ok_or_else(|| truncated(F, "the file ends inside the image data"))?;
            }
            _ => at = end,
        }
    }
}

/// Where the entropy-coded data that starts at `from` ends: the offset of the first marker
/// that is neither a stuffed `FF 00` nor a restart marker. `None` if the data runs out first.
fn scan_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        at += bytes.get(at..)?.iter().position(|&b| b == 0xFF)?;
        match byte(bytes, at + 1)? {
            0x00 | 0xD0..=0xD7 => at += 2,
            // A fill byte: the marker code follows the last FF.
            0xFF => at += 1,
            _ => return Some(at),
        }
    }
}

/// GIF: header, logical screen descriptor, colour table, then image descriptors and
/// extensions (each followed by length-prefixed sub-blocks) until the trailer byte.
fn gif(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    const F: ImageFormat = ImageFormat::Gif;
    let (Some(width), Some(height), Some(flags)) =
        (u16_le(bytes, 6), u16_le(bytes, 8), byte(bytes, 10))
    else {
        return Err(truncated(F, "the file ends inside the screen descriptor"));
    };
    if width == 0 || height == 0 {
        return Err(malformed(
            F,
            format!("its screen descriptor says {width}x{height} pixels"),
        ));
    }
    let mut at = 13 + colour_table_len(flags);
    let mut images = 0;
    loop {
        let Some(block) = byte(bytes, at) else {
            return Err(truncated(F, "the file ends before the trailer"));
        };
        match block {
            // Image descriptor: 10 bytes, a local colour table, the LZW code size, data.
            0x2C => {
                let Some(flags) = byte(bytes, at + 9) else {
                    return Err(truncated(F, "the file ends inside an image descriptor"));
                };
                at += 10 + colour_table_len(flags);
                match byte(bytes, at) {
                    None => return Err(truncated(F, "the file ends inside an image")),
                    Some(2..=11) => {}
                    Some(size) => {
                        return Err(malformed(F, format!("an image has LZW code size {size}")));
                    }
                }
                at = sub_blocks_end(bytes, at + 1)
                    .ok_or_else(|| truncated(F, "the file ends inside an image"))?;
                images += 1;
            }
            // Extension: a label, then data sub-blocks.
            0x21 => {
                at = sub_blocks_end(bytes, at + 2)
                    .ok_or_else(|| truncated(F, "the file ends inside an extension block"))?;
            }
            0x3B => {
                if images == 0 {
                    return Err(malformed(F, "it holds no image"));
                }
                let after = bytes.len() - (at + 1);
                if after > 0 {
                    return Err(malformed(F, format!("{after} bytes follow its trailer")));
                }
                return Ok((u32::from(width), u32::from(height)));
            }
            other => {
                return Err(malformed(
                    F,
                    format!("unknown block type 0x{other:02X} at byte {at}"),
                ));
            }
        }
    }
}

/// Bytes of the colour table announced by a GIF descriptor's packed flags.
fn colour_table_len(flags: u8) -> usize {
    if flags & 0x80 == 0 {
        0
    } else {
        3 << ((flags & 0x07) + 1)
    }
}

/// The offset just past a chain of GIF sub-blocks (size byte, data; a 0 size ends it).
fn sub_blocks_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let size = usize::from(byte(bytes, at)?);
        at += 1;
        if size == 0 {
            return Some(at);
        }
        at += size;
        if at > bytes.len() {
            return None;
        }
    }
}

/// WebP: a RIFF container (`RIFF`, size, `WEBP`) whose first chunk is `VP8 `, `VP8L` or
/// `VP8X`; every chunk is walked to check that they fill the container exactly.
fn webp(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    const F: ImageFormat = ImageFormat::Webp;
    let Some(riff) = u32_le(bytes, 4) else {
        return Err(truncated(F, "the file ends inside the RIFF header"));
    };
    let total = riff as usize + 8;
    if total > bytes.len() {
        return Err(truncated(
            F,
            format!(
                "the container says {total} bytes but the file has {}",
                bytes.len()
            ),
        ));
    }
    if total < bytes.len() {
        return Err(malformed(
            F,
            format!("{} bytes follow its container", bytes.len() - total),
        ));
    }
    // Chunks: four-character code, little-endian size, data padded to an even length. The
    // first one holds the size; the rest are walked to check that they tile the container.
    let mut first = None;
    let mut image_data = false;
    let mut at = 12;
    while at < total {
        let (Some(code), Some(size)) = (bytes.get(at..at + 4), u32_le(bytes, at + 4)) else {
            return Err(truncated(F, "the file ends inside a chunk header"));
        };
        let data = at + 8;
        let end = data + size as usize + (size as usize & 1);
        if end > total {
            return Err(truncated(
                F,
                format!(
                    "the file ends inside a {} chunk",
                    String::from_utf8_lossy(code).trim_end()
                ),
            ));
        }
        first.get_or_insert((code, data));
        image_data |= matches!(code, b"VP8 " | b"VP8L" | b"ANMF");
        at = end;
    }
    let Some((code, data)) = first else {
        return Err(malformed(F, "the container holds no chunk"));
    };
    if !image_data {
        return Err(malformed(
            F,
            "it holds no image data (VP8, VP8L or ANMF chunk)",
        ));
    }
    match code {
        b"VP8 " => {
            // A key frame: the frame tag's low bit is 0, then the start code 9D 01 2A.
            let (Some(tag), Some(start)) = (byte(bytes, data), bytes.get(data + 3..data + 6))
            else {
                return Err(malformed(F, "its VP8 frame header is too short"));
            };
            if tag & 1 != 0 || start != [0x9D, 0x01, 0x2A] {
                return Err(malformed(F, "its VP8 data does not start with a key frame"));
            }
            let (Some(width), Some(height)) = (u16_le(bytes, data + 6), u16_le(bytes, data + 8))
            else {
                return Err(malformed(F, "its VP8 frame header is too short"));
            };
            // The top two bits are a scaling hint, not part of the size.
            nonzero(F, u32::from(width & 0x3FFF), u32::from(height & 0x3FFF))
        }
        b"VP8L" => {
            let (Some(0x2F), Some(bits)) = (byte(bytes, data), u32_le(bytes, data + 1)) else {
                return Err(malformed(F, "its lossless (VP8L) header is wrong"));
            };
            if bits >> 29 != 0 {
                return Err(malformed(F, "its lossless (VP8L) version is not 0"));
            }
            Ok(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        b"VP8X" => {
            let (Some(width), Some(height)) = (u24_le(bytes, data + 4), u24_le(bytes, data + 7))
            else {
                return Err(malformed(F, "its extended (VP8X) header is too short"));
            };
            Ok((width + 1, height + 1))
        }
        other => Err(malformed(
            F,
            format!(
                "its first chunk is {:?}, not VP8, VP8L or VP8X",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}

fn nonzero(format: ImageFormat, width: u32, height: u32) -> Result<(u32, u32), ImageError> {
    if width == 0 || height == 0 {
        return Err(malformed(
            format,
            format!("its header says {width}x{height} pixels"),
        ));
    }
    Ok((width, height))
}
