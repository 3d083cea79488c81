//! Upload rules: which keys a visitor may use, which bytes count as an image, how large one
//! may be, and the ETag it is served with.
//!
//! Pure functions over strings and bytes, no I/O: the HTTP layer applies them before anything
//! is written anywhere, and the tests cover every rejection without a server. Each rejection
//! is an error whose message tells the visitor what to change, and which knows the HTTP
//! status it stands for ([`ImageError::http_status`]), so the site's answers and the API's
//! agree.
//!
//! - [`key`]: [`ImageKey`], the checked form of a key (rule and reasons there).
//! - [`format`](mod@format): [`detect`], which recognises PNG, JPEG, GIF and WebP by their bytes and
//!   refuses SVG (reasons there).
//! - [`check_upload`]: size limit, then [`detect`].
//!
//! ETags are the store's (`store::etag_of`, SHA-256 of the bytes): one per image, whoever reads it.

pub mod format;
pub mod key;
pub mod thumb;

pub use format::{ImageFormat, ImageInfo, detect};
pub use key::{ImageKey, KeyError, MAX_KEY_LEN};

/// Largest image accepted, in bytes: 10 MiB.
///
/// Cached images must fit a node's item size limit (`cache.maxItemSizeKiB`, 16 MiB by
/// default) together with the cache's envelope; `crate::cache` checks that at compile time.
/// 10 MiB holds a 24-megapixel phone photo as JPEG with room to spare, while a request body
/// that large is still read into memory without concern.
pub const MAX_IMAGE_BYTES: usize = 10 << 20;

/// Why an upload is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// No bytes at all.
    #[error("the upload is empty: send the image file's bytes as the request body")]
    Empty,
    /// Larger than [`MAX_IMAGE_BYTES`].
    #[error(
        "the image is {size} bytes, larger than the limit of {limit} bytes (10 MiB): \
         upload a smaller or more compressed image"
    )]
    TooLarge {
        /// The upload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An SVG document: refused because it can carry scripts.
    #[error(
        "SVG images are not accepted, because an SVG can carry scripts that would run on this \
         site: upload a PNG, JPEG, GIF or WebP image (export the SVG as PNG)"
    )]
    Svg,
    /// None of the accepted formats.
    #[error(
        "not an accepted image: the data looks like {looks_like}; upload a PNG, JPEG, GIF or \
         WebP image (the file's name and declared type are not considered, only its content)"
    )]
    Unsupported {
        /// What the data looks like instead.
        looks_like: &'static str,
    },
    /// Starts like an accepted format but ends too early.
    #[error("the {format} image is incomplete: {detail}; upload the whole file")]
    Truncated {
        /// The format it started as.
        format: ImageFormat,
        /// Where it ends.
        detail: String,
    },
    /// Starts like an accepted format but its structure is wrong.
    #[error("the {format} image is damaged: {detail}; re-export it and upload it again")]
    Malformed {
        /// The format it started as.
        format: ImageFormat,
        /// What is wrong.
        detail: String,
    },
}

impl ImageError {
    /// A short, stable code for the JSON error body (`{"error": CODE, ...}`).
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::Empty => "empty_upload",
            ImageError::TooLarge { .. } => "too_large",
            ImageError::Svg
            | ImageError::Unsupported { .. }
            | ImageError::Truncated { .. }
            | ImageError::Malformed { .. } => "not_an_image",
        }
    }

    /// The HTTP status this refusal stands for: 400 for an empty body, 413 for too large,
    /// 415 for anything that is not an accepted image (a damaged one included: what was
    /// sent is not an image the site can serve).
    pub fn http_status(&self) -> u16 {
        match self {
            ImageError::Empty => 400,
            ImageError::TooLarge { .. } => 413,
            _ => 415,
        }
    }
}

impl KeyError {
    /// A short, stable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        "invalid_key"
    }

    /// The HTTP status: 400.
    pub fn http_status(&self) -> u16 {
        400
    }
}

/// Checks an upload: not empty, at most [`MAX_IMAGE_BYTES`], and one of the accepted formats
/// by its content. The size is checked first so that nothing larger is ever parsed (the HTTP
/// layer should also cap the body it reads at the same limit, so it never holds more).
pub fn check_upload(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ImageError::TooLarge {
            size: bytes.len(),
            limit: MAX_IMAGE_BYTES,
        });
    }
    detect(bytes)
}

#[cfg(test)]
mod tests;
