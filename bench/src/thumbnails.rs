//! `cachepool bench thumbnails`: what the first listing page costs a visitor, with the full
//! images as its thumbnails (before issue 17) and with real thumbnails (after), in one run.
//!
//! The stack is `bench web`'s: a standalone operator with process nodes, and the site
//! (`cachepool_web::serve::Web`, SQLite and a local image directory) on a runtime of its own.
//! `--images` photograph-like JPEGs (gradients under noise, `--width`×`--height`, a few hundred
//! KiB each) are uploaded through the API, each upload making its thumbnail. Then one "page
//! load" is: `GET /` (the listing's first page), then every `<img src>` in it, `--connections`
//! at a time as a browser does over HTTP/1.1; its bytes (HTML + images) and wall time are
//! measured. The *before* load fetches the same page with every `…/thumbnail` source cut back
//! to the image itself, which is the page before this change; the *after* load fetches the
//! page as served. The two alternate, before first, for `--rounds` rounds: round 1 meets cold
//! caches (nothing was read since the uploads), the later rounds are served by the site's
//! in-process cache or the pool. The site's `/metrics` gives the time to make a thumbnail at
//! upload.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use image::ImageEncoder as _;

use super::report::{Table, median, thousands};
use super::web::{SiteThread, TempDir};
use cachepool_operator::Operator;
use cachepool_web::serve::WebArgs;

/// `cachepool bench thumbnails` flags.
#[derive(Debug, clap::Args)]
pub struct ThumbnailBenchArgs {
    /// Images uploaded (the listing's first page shows the newest 24).
    #[arg(long, default_value_t = 30)]
    pub images: usize,
    /// Width of each image, in pixels.
    #[arg(long, default_value_t = 1600)]
    pub width: u32,
    /// Height of each image, in pixels.
    #[arg(long, default_value_t = 1200)]
    pub height: u32,
    /// Page loads of each kind (before, after), alternating.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Requests in flight during a page load (browsers open 6 connections per host).
    #[arg(long, default_value_t = 6)]
    pub connections: usize,
    /// Worker threads of the site's runtime.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

const TOKEN: &str = "bench-thumbnails-token";
const POOL: &str = "bench";

/// Runs the benchmark: the site on its own runtime, everything else on `rt`.
pub fn run(rt: &tokio::runtime::Runtime, args: ThumbnailBenchArgs) -> anyhow::Result<()> {
    ensure!(args.images > 0, "--images must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.threads > 0, "--threads must be at least 1");
    ensure!(
        (1..=8192).contains(&args.width) && (1..=8192).contains(&args.height),
        "--width and --height must lie within [1, 8192] (larger images get no thumbnail)"
    );
    let dir = TempDir::new()?;
    rt.block_on(measure(&args, &dir))
}

async fn measure(args: &ThumbnailBenchArgs, dir: &TempDir) -> anyhow::Result<()> {
    let pools = dir.path().join("pools");
    std::fs::create_dir_all(&pools)?;
    std::fs::write(
        pools.join("bench.yaml"),
        format!(
            "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata:\n  name: {POOL}\n\
             spec:\n  cache: {{capacityMiB: 256}}\n  scaling: {{mode: manual, replicas: 2, \
             minReplicas: 1, maxReplicas: 8}}\n  provider: {{process: {{}}}}\n"
        ),
    )?;
    let operator = Operator::start(super::operator_config(&pools, TOKEN)?)
        .await
        .context("starting the operator")?;
    let result = with_operator(args, dir, &operator.api_url()).await;
    let stopped = operator.stop().await.context("stopping the operator");
    let report = result?;
    stopped?;
    println!("{report}");
    Ok(())
}

async fn with_operator(
    args: &ThumbnailBenchArgs,
    dir: &TempDir,
    api: &str,
) -> anyhow::Result<String> {
    let web_args = WebArgs {
        listen: "127.0.0.1:0".into(),
        database_url: None,
        data_dir: dir.path().join("web"),
        s3_bucket: None,
        s3_prefix: "images/".into(),
        s3_region: None,
        s3_endpoint: None,
        operator_api: api.to_owned(),
        operator_token: TOKEN.into(),
        pool: format!("default/{POOL}"),
        admin_token: TOKEN.into(),
        operator_admin_token: None,
        admin_password: None,
        admin_password_hash: None,
        session_secret: None,
        secure_cookies: false,
        trusted_proxies: Vec::new(),
        local_cache_mib: cachepool_web::cache::DEFAULT_LOCAL_BYTES >> 20,
        local_cache_lease_ms: cachepool_web::cache::DEFAULT_LEASE.as_millis() as u64,
    };
    let site = SiteThread::start(web_args, args.threads).await?;
    let result = with_site(args, &site.url).await;
    site.stop().await;
    result
}

/// One page load: what was fetched and how long it took.
#[derive(Clone, Copy, Debug)]
struct Load {
    images: usize,
    html_bytes: usize,
    image_bytes: usize,
    elapsed: Duration,
}

async fn with_site(args: &ThumbnailBenchArgs, site: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let mut uploaded = 0usize;
    let upload_started = Instant::now();
    for i in 0..args.images {
        super::check_interrupted()?;
        let jpeg = photo_jpeg(args.width, args.height, i as u32)?;
        uploaded += jpeg.len();
        let answer = http
            .put(format!("{site}/api/v1/images/photo-{i:03}.jpg"))
            .body(jpeg)
            .send()
            .await
            .with_context(|| format!("uploading image {i}"))?;
        if !answer.status().is_success() {
            bail!(
                "uploading image {i} answered {}: {}",
                answer.status(),
                answer.text().await.unwrap_or_default()
            );
        }
    }
    let upload_time = upload_started.elapsed();
    let metrics = http
        .get(format!("{site}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let made = sample(&metrics, "cachepool_web_thumbnails_made_total");
    let make_secs = sample(
        &metrics,
        "cachepool_web_thumbnail_make_duration_seconds_sum",
    );
    ensure!(
        made == args.images as f64,
        "{made} thumbnails made for {} uploads",
        args.images
    );

    let mut before = Vec::new();
    let mut after = Vec::new();
    for _ in 0..args.rounds {
        super::check_interrupted()?;
        before.push(page_load(&http, site, args.connections, Kind::Before).await?);
        after.push(page_load(&http, site, args.connections, Kind::After).await?);
    }
    Ok(render(
        args,
        uploaded,
        upload_time,
        made,
        make_secs,
        &before,
        &after,
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The full images as thumbnails (the page before issue 17).
    Before,
    /// The page as served: real thumbnails.
    After,
}

async fn page_load(
    http: &reqwest::Client,
    site: &str,
    connections: usize,
    kind: Kind,
) -> anyhow::Result<Load> {
    let started = Instant::now();
    let html = http
        .get(format!("{site}/"))
        .send()
        .await
        .context("GET /")?
        .text()
        .await
        .context("GET /")?;
    let mut sources = image_sources(&html);
    ensure!(!sources.is_empty(), "the listing shows no image");
    if kind == Kind::Before {
        for src in &mut sources {
            let full = src
                .strip_suffix("/thumbnail")
                .with_context(|| format!("a listing image that is no thumbnail: {src}"))?;
            *src = full.to_owned();
        }
    }
    // `connections` fetchers take the sources round-robin, as a browser's connections would.
    let mut fetchers = tokio::task::JoinSet::new();
    for first in 0..connections.min(sources.len()) {
        let mine: Vec<String> = sources
            .iter()
            .skip(first)
            .step_by(connections)
            .map(|src| format!("{site}{src}"))
            .collect();
        let http = http.clone();
        fetchers.spawn(async move {
            let mut bytes = 0usize;
            for url in mine {
                let answer = http
                    .get(&url)
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                ensure!(
                    answer.status().is_success(),
                    "GET {url} answered {}",
                    answer.status()
                );
                bytes += answer.bytes().await?.len();
            }
            anyhow::Ok(bytes)
        });
    }
    let mut image_bytes = 0;
    while let Some(fetched) = fetchers.join_next().await {
        image_bytes += fetched.context("a fetcher panicked")??;
    }
    Ok(Load {
        images: sources.len(),
        html_bytes: html.len(),
        image_bytes,
        elapsed: started.elapsed(),
    })
}

/// The `src` of every `<img>` in `html`, in order (the listing's markup is the site's own:
/// `src="…"` with double quotes, no entities in the paths).
fn image_sources(html: &str) -> Vec<String> {
    html.split("<img")
        .skip(1)
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            let start = tag.find("src=\"")? + 5;
            let len = tag[start..].find('"')?;
            Some(tag[start..start + len].to_owned())
        })
        .collect()
}

/// A photograph-like JPEG (quality 85): smooth gradients under mild noise, which compress
/// about as a camera's pictures do.
fn photo_jpeg(width: u32, height: u32, seed: u32) -> anyhow::Result<Vec<u8>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9) | 1;
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 12) as u8;
        let fx = x as f32 / width as f32;
        let fy = y as f32 / height as f32;
        let wave = ((fx * 9.0 + seed as f32).sin() * (fy * 7.0).cos() * 60.0) as i32;
        let channel = |base: f32| (base * 180.0) as i32 + wave + i32::from(noise);
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
        .context("encoding a test photograph")?;
    Ok(out)
}

/// The value of one unlabelled series in OpenMetrics text, or 0.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

fn kib(bytes: f64) -> String {
    format!("{:.1}", bytes / 1024.0)
}

fn render(
    args: &ThumbnailBenchArgs,
    uploaded: usize,
    upload_time: Duration,
    made: f64,
    make_secs: f64,
    before: &[Load],
    after: &[Load],
) -> String {
    let mut out = format!(
        "{} images of {}x{} uploaded ({} KiB in all, {} KiB each on average) in {:.2} s; \
         {made} thumbnails made at upload, {:.1} ms each on average\n\n",
        args.images,
        args.width,
        args.height,
        thousands((uploaded / 1024) as f64),
        kib(uploaded as f64 / args.images as f64),
        upload_time.as_secs_f64(),
        1000.0 * make_secs / made.max(1.0),
    );
    let mut table = Table::new([
        "page load",
        "images",
        "HTML KiB",
        "image KiB",
        "total KiB",
        "cold ms",
        "warm ms (median)",
    ]);
    for (name, loads) in [
        ("full images (before)", before),
        ("thumbnails (after)", after),
    ] {
        let first = loads[0];
        let warm: Vec<f64> = loads[1..]
            .iter()
            .map(|l| l.elapsed.as_secs_f64() * 1000.0)
            .collect();
        table.row([
            name.to_owned(),
            first.images.to_string(),
            kib(first.html_bytes as f64),
            kib(first.image_bytes as f64),
            kib((first.html_bytes + first.image_bytes) as f64),
            format!("{:.1}", first.elapsed.as_secs_f64() * 1000.0),
            if warm.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", median(&warm))
            },
        ]);
    }
    out.push_str(&table.render());
    let bytes = |l: &Load| (l.html_bytes + l.image_bytes) as f64;
    out.push_str(&format!(
        "\nbytes: {:.1}x fewer with thumbnails; {} connections; {} rounds (round 1 cold, the \
         rest from the site's in-process cache)\n",
        bytes(&before[0]) / bytes(&after[0]).max(1.0),
        args.connections,
        args.rounds,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sources_are_read_from_the_listing_markup() {
        let html = r#"<ul><li><img class="thumb" src="/api/v1/images/a.jpg/thumbnail" loading="lazy" alt="a.jpg"></li>
            <li><img class="thumb" src="/api/v1/images/b/thumbnail" alt="b"></li><img alt="no source"></ul>"#;
        assert_eq!(
            image_sources(html),
            [
                "/api/v1/images/a.jpg/thumbnail",
                "/api/v1/images/b/thumbnail"
            ]
        );
    }
}
