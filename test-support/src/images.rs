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

/// A photograph-like PNG of `width`×`height` (gradients under per-pixel noise that `seed`
/// varies, so it compresses like a photograph, not like a flat colour).
#[cfg(feature = "web")]
pub fn photo_png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    use image::ImageEncoder as _;
    let pixels = photo(width, height, seed);
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            pixels.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap_or_else(|e| panic!("encoding a {width}x{height} PNG: {e}"));
    out
}

/// The pixels of [`photo_png`].
#[cfg(feature = "web")]
pub fn photo(width: u32, height: u32, seed: u32) -> image::RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    image::RgbImage::from_fn(width, height, |x, y| {
        // xorshift32: cheap noise, the same for the same seed.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 32) as u8;
        let r = (x * 200 / width.max(1)) as u8;
        let g = (y * 200 / height.max(1)) as u8;
        let b = ((x + y + seed * 37) % 200) as u8;
        image::Rgb([r + noise, g + noise, b + noise / 2])
    })
}

/// A photograph-like JPEG of `width`×`height` at quality 85: smooth gradients and waves under
/// mild noise, which compress about as a camera's pictures do (a few hundred KiB at
/// 1600×1200).
#[cfg(feature = "web")]
pub fn photo_jpeg(width: u32, height: u32, seed: u32) -> Vec<u8> {
    use image::ImageEncoder as _;
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 12) as i32;
        let fx = x as f32 / width as f32;
        let fy = y as f32 / height as f32;
        let wave = ((fx * 9.0 + seed as f32).sin() * (fy * 7.0).cos() * 60.0) as i32;
        let channel = |base: f32| (base * 180.0) as i32 + wave + noise;
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        image::Rgb([
            clamp(channel(fx) + 30),
            clamp(channel(fy)),
            clamp(channel(1.0 - fx * fy) - 20),
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .write_image(
            pixels.as_raw(),
            width,
            height,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap_or_else(|e| panic!("encoding a {width}x{height} JPEG: {e}"));
    out
}
