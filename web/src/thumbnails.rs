//! Thumbnails in the site: made off the async runtime, a few at a time, counted; and read
//! like images (the fill behind [`ImageCache::get_or_fill_thumbnail`]).
//!
//! Making one decodes a whole image (up to 24 megapixels, tens of milliseconds to a second of
//! CPU), so it runs on tokio's blocking threads (`spawn_blocking`), never on a runtime worker;
//! and at most [`Thumbnailer::concurrency`] at a time, which bounds the memory thumbnails take
//! together (each decode is capped at `image::thumb::MAX_DECODE_BYTES`). A permit is held by
//! the blocking task itself, so a request that goes away does not free it before the work
//! ends.
//!
//! An upload makes its thumbnail before the row is written ([`crate::store::Storage::put_image_with_thumbnail`]);
//! an image stored without one (uploaded before thumbnails existed, or whose thumbnail could
//! not be stored) gets it on its first thumbnail read, which stores it. An image no thumbnail
//! can be made of (`image::thumb::ThumbError`: too large, corrupt, …) is served as its own
//! thumbnail: the original bytes, with the image's ETag, which is what the listing showed
//! before thumbnails. The refusal is logged and counted by reason each time a thumbnail is
//! attempted: at the upload, then on a thumbnail read that the caches do not serve.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::cache::{CachedImage, ImageCache};
use crate::image::thumb::{self, Thumbnail};
use crate::metrics::WebMetrics;
use crate::store::{Storage, StoreError, ThumbnailLookup, etag_of};

/// Makes thumbnails on blocking threads, a bounded number at a time, and counts them.
#[derive(Debug, Clone)]
pub struct Thumbnailer {
    permits: Arc<Semaphore>,
    concurrency: usize,
    metrics: WebMetrics,
}

impl Thumbnailer {
    /// At most `concurrency` (at least 1) thumbnails at a time, counted in `metrics`.
    pub fn new(metrics: WebMetrics, concurrency: usize) -> Thumbnailer {
        let concurrency = concurrency.max(1);
        Thumbnailer {
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            metrics,
        }
    }

    /// As many at a time as the machine has cores, at most 4: a thumbnail is CPU work, and
    /// 4 × 96 MiB is the most decoding may then hold.
    pub fn default_concurrency() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
    }

    /// How many thumbnails may be made at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The thumbnail of the image `bytes` (under `key`, for the log), or `None` when none can
    /// be made (logged and counted by reason).
    pub async fn make(&self, key: &str, bytes: Bytes) -> Option<Thumbnail> {
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let made = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let started = Instant::now();
            (thumb::make(&bytes), started.elapsed())
        })
        .await;
        match made {
            Ok((Ok(thumbnail), elapsed)) => {
                self.metrics.thumbnail_made(elapsed);
                debug!(
                    key,
                    width = thumbnail.width,
                    height = thumbnail.height,
                    size = thumbnail.bytes.len(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "thumbnail made"
                );
                Some(thumbnail)
            }
            Ok((Err(refused), elapsed)) => {
                self.metrics.thumbnail_refused(refused.reason(), elapsed);
                warn!(key, reason = refused.reason(), error = %refused, "no thumbnail made; the original is served in its place");
                None
            }
            Err(panicked) => {
                self.metrics
                    .thumbnail_refused("panic", std::time::Duration::ZERO);
                warn!(key, error = %panicked, "making a thumbnail panicked; the original is served in its place");
                None
            }
        }
    }
}

/// The thumbnail of the image under `key` as the cache holds it: the stored one, or one made
/// now of the image (and stored), or the image itself when none can be made; `None` when
/// there is no image. The fill of [`ImageCache::get_or_fill_thumbnail`].
pub async fn load(
    storage: &Storage,
    thumbnailer: &Thumbnailer,
    key: &str,
) -> Result<Option<CachedImage>, StoreError> {
    let image = match storage.get_thumbnail(key).await? {
        None => return Ok(None),
        Some(ThumbnailLookup::Stored { thumbnail, .. }) => {
            return Ok(Some(CachedImage {
                etag: etag_of(&thumbnail.bytes),
                content_type: thumbnail.content_type,
                body: thumbnail.bytes,
            }));
        }
        Some(ThumbnailLookup::Missing(image)) => image,
    };
    let Some(made) = thumbnailer.make(key, image.bytes.clone()).await else {
        return Ok(Some(CachedImage {
            content_type: image.meta.content_type,
            etag: image.meta.etag,
            body: image.bytes,
        }));
    };
    let body = Bytes::from(made.bytes);
    let content_type = made.format.content_type();
    if let Err(err) = storage
        .put_thumbnail(&image.meta, body.clone(), content_type)
        .await
    {
        // Served all the same; the next fill makes it again.
        warn!(key, error = %err, "cannot store the thumbnail made on first request");
    }
    Ok(Some(CachedImage {
        etag: etag_of(&body),
        content_type: content_type.to_owned(),
        body,
    }))
}

/// The thumbnail under `key` through the cache (see [`load`]).
pub async fn fetch(
    cache: &ImageCache,
    storage: Arc<Storage>,
    thumbnailer: Thumbnailer,
    key: &crate::image::ImageKey,
) -> Result<Option<crate::cache::Fetched>, crate::cache::FillError> {
    let lookup = key.as_str().to_owned();
    cache
        .get_or_fill_thumbnail(key, move || async move {
            load(&storage, &thumbnailer, &lookup).await
        })
        .await
}
