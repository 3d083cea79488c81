//! `cachepool bench web`: the site's cached image GET under wrk, side by side with nginx
//! serving the same files from disk, and the miss path broken down into its parts.
//!
//! The stack is the one `cachepool up` runs, built from the same parts: a standalone operator
//! (in this process, on the control runtime) whose pool's nodes are `cachepool node` children,
//! and the site (`cachepool_web::serve::Web`, on SQLite and a local image directory) on a runtime of its
//! own with `--threads` workers, so that it gets the same thread budget as nginx's
//! `worker_processes`. The site runs in-process rather than as a child so that the miss path
//! can be timed against the very same database file, image directory and pool.
//!
//! Hit path: N images are uploaded through the site's API and read twice (the second read must
//! say `X-Cache: local`, or `hit` with `--local-cache-mib 0`); the same bytes are written as
//! files for nginx. Then wrk runs against nginx and the site alternately, `--rounds` times
//! each, with one Lua script requesting the N paths round-robin. With `--compare-pool-only` a
//! second site (`site-pool`: another `Web` on the same pool, database and image directory, its
//! in-process cache off, on a runtime of its own that idles while the others run) takes its
//! turn after the site in every round, so the in-process cache's effect is measured in the
//! same run. The site's `/metrics` cache counters (in-process and pool) are read before and
//! after each of its runs, so the report says what share of the measured requests a cache
//! served and how many of them the in-process one did, and the CPU seconds of each side
//! (`procs`) are read around every run: on a shared machine the CPU per request is a steadier
//! comparison than requests per second.
//!
//! Miss path: 3 x M fresh images are uploaded and never read before; for set A the whole miss
//! is timed over HTTP (the answer must say `X-Cache: miss`), for set B the parts are timed by
//! calling what the site calls, in its order: the pool lookup that misses
//! (`PoolClient::get`), the database read (`Database::get`), the object-store read
//! (`ObjectStore::get`) and the pool fill (envelope encoding and `PoolClient::add`); for set C
//! the whole miss is timed in-process through `ImageCache::get_or_fill`, which shows what HTTP
//! adds. Disjoint sets so that no measurement warms another's key; the same image size for all.
//! An unloaded sequential GET of cached images gives the hit's floor for comparison.
//!
//! Everything started is stopped on the way out, on success, error or Ctrl-C: nginx and the
//! temporary directory by guards, the site's runtime by its thread's guard, the operator (and
//! with it the nodes) by an explicit stop after the measured part returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use axum::body::Bytes;
use cache_node::client::{ClientOptions, PoolClient};
use cachepool_web::cache::{CacheConfig, CachedImage, ImageCache, envelope};
use cachepool_web::image::ImageKey;
use cachepool_web::ring::RingSource;
use cachepool_web::store::{Database, ObjectStore, StoreError};

use super::nginx::{Nginx, NginxConfig, find_binary};
use super::procs;
use super::report::{Table, median, thousands};
use super::wrk::{self, WrkResult, WrkRun};
use cachepool_operator::Operator;

use cachepool_web::serve::{Web, WebArgs};

/// `cachepool bench web` flags.
#[derive(Debug, clap::Args)]
pub struct WebBenchArgs {
    /// Length of each wrk run (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Open connections of wrk.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Worker threads of the site's runtime, and nginx's worker processes.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Threads of wrk.
    #[arg(long, default_value_t = 2)]
    pub wrk_threads: usize,
    /// Size of each image (e.g. 64KiB, 1MiB, 4096).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub image_size: usize,
    /// Images read under wrk (the cached set).
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// wrk runs against each server; they alternate, nginx first.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Fresh images read once for the miss path (per measurement: three sets of this many).
    #[arg(long, default_value_t = 100)]
    pub misses: usize,
    /// Nodes in the pool.
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// The wrk binary (default: `wrk` on PATH).
    #[arg(long)]
    pub wrk: Option<PathBuf>,
    /// The nginx binary (default: `nginx` on PATH or in /usr/sbin).
    #[arg(long)]
    pub nginx: Option<PathBuf>,
    /// MiB of the site's in-process cache of hot images (`cachepool web --local-cache-mib`;
    /// 0: off, every hit a pool hit).
    #[arg(long, default_value_t = cachepool_web::cache::DEFAULT_LOCAL_BYTES >> 20)]
    pub local_cache_mib: usize,
    /// Also run a second site over the same pool, database and images with the in-process
    /// cache off (`site-pool`), after the site in every round: before and after side by side.
    #[arg(long)]
    pub compare_pool_only: bool,
}

const TOKEN: &str = "bench-web-token";
const POOL: &str = "bench";
const IMAGES_PATH: &str = "/api/v1/images/";
const CONTENT_TYPE: &str = "image/png";

/// Runs the benchmark: the site on its own runtime, everything else on `rt`.
pub fn run(rt: &tokio::runtime::Runtime, args: WebBenchArgs) -> anyhow::Result<()> {
    ensure!(args.images > 0, "--images must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.threads > 0, "--threads must be at least 1");
    ensure!(
        (1..=8).contains(&args.nodes),
        "--nodes must lie within [1, 8] (the pool's maxReplicas)"
    );
    ensure!(
        (100..=cachepool_web::image::MAX_IMAGE_BYTES).contains(&args.image_size),
        "--image-size must lie within [100 B, {} B] (the site's upload limit)",
        cachepool_web::image::MAX_IMAGE_BYTES
    );
    // Before anything starts: a missing tool is a clear error, not a half-run.
    let wrk = find_binary("wrk", args.wrk.as_deref(), "install Debian's wrk")?;
    let nginx = find_binary(
        "nginx",
        args.nginx.as_deref(),
        "install Debian's nginx-light",
    )?;
    let dir = TempDir::new()?;
    rt.block_on(measure(&args, &wrk, &nginx, &dir))
}

async fn measure(
    args: &WebBenchArgs,
    wrk: &Path,
    nginx: &Path,
    dir: &TempDir,
) -> anyhow::Result<()> {
    let pools = dir.path().join("pools");
    std::fs::create_dir_all(&pools)?;
    // Room for every image the run stores, twice over, spread over the nodes.
    let stored = (args.images + 3 * args.misses) * (args.image_size + 1024);
    let capacity_mib = (2 * stored / (1 << 20) / args.nodes as usize).max(64);
    std::fs::write(
        pools.join("bench.yaml"),
        format!(
            "apiVersion: cachepool.io/v1alpha1\nkind: CachePool\nmetadata:\n  name: {POOL}\n\
             spec:\n  cache: {{capacityMiB: {capacity_mib}}}\n  scaling: {{mode: manual, \
             replicas: {}, minReplicas: 1, maxReplicas: 8}}\n  provider: {{process: {{}}}}\n",
            args.nodes
        ),
    )?;
    let operator = Operator::start(super::operator_config(&pools, TOKEN)?)
        .await
        .context("starting the operator")?;
    let result = with_operator(args, wrk, nginx, dir, &operator.api_url()).await;
    let stopped = operator.stop().await.context("stopping the operator");
    let report = result?;
    stopped?;
    println!("{report}");
    Ok(())
}

async fn with_operator(
    args: &WebBenchArgs,
    wrk: &Path,
    nginx: &Path,
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
        // The manager is not benchmarked: nobody can log in.
        operator_admin_token: None,
        admin_password: None,
        admin_password_hash: None,
        session_secret: None,
        secure_cookies: false,
        trusted_proxies: Vec::new(),
        local_cache_mib: args.local_cache_mib,
        local_cache_lease_ms: cachepool_web::cache::DEFAULT_LEASE.as_millis() as u64,
    };
    let site = SiteThread::start(web_args.clone(), args.threads).await?;
    let pool_only = if args.compare_pool_only {
        let pool_args = WebArgs {
            local_cache_mib: 0,
            ..web_args.clone()
        };
        match SiteThread::start(pool_args, args.threads).await {
            Ok(thread) => Some(thread),
            Err(e) => {
                site.stop().await;
                return Err(e.context("starting the second site (in-process cache off)"));
            }
        }
    } else {
        None
    };
    let sites = Sites {
        site: &site.url,
        pool_only: pool_only.as_ref().map(|s| s.url.as_str()),
    };
    let result = with_site(args, wrk, nginx, dir, api, &web_args, &sites).await;
    if let Some(pool_only) = pool_only {
        pool_only.stop().await;
    }
    site.stop().await;
    result
}

/// The sites measured: the site as configured, and the one with its in-process cache off.
struct Sites<'a> {
    site: &'a str,
    pool_only: Option<&'a str>,
}

impl Sites<'_> {
    fn url(&self, target: Target) -> Option<&str> {
        match target {
            Target::Nginx => None,
            Target::Site => Some(self.site),
            Target::SitePoolOnly => self.pool_only,
        }
    }
}

async fn with_site(
    args: &WebBenchArgs,
    wrk: &Path,
    nginx_bin: &Path,
    dir: &TempDir,
    api: &str,
    web_args: &WebArgs,
    sites: &Sites<'_>,
) -> anyhow::Result<String> {
    let site = sites.site;
    let http = reqwest::Client::new();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;

    // The cached set: uploaded, written for nginx, and read until the pool serves it.
    let hot: Vec<String> = (0..args.images).map(|i| format!("hot-{i}")).collect();
    for (i, key) in hot.iter().enumerate() {
        super::check_interrupted()?;
        let image = png_of_size(args.image_size, i as u64);
        upload(&http, site, key, image.clone()).await?;
        std::fs::write(files.join(key), &image)?;
    }
    let mut hit_floor = Vec::with_capacity(hot.len());
    for key in &hot {
        get_image(&http, site, key).await?;
        let started = Instant::now();
        let x_cache = get_image(&http, site, key).await?;
        hit_floor.push(ms(started.elapsed()));
        let want = if args.local_cache_mib > 0 {
            "local"
        } else {
            "hit"
        };
        ensure!(
            x_cache == want,
            "the second read of {key} said X-Cache: {x_cache}, not {want}; the cache does not \
             keep the images (node capacity, item size or --local-cache-mib too small?)"
        );
        if let Some(pool_only) = sites.pool_only {
            let x_cache = get_image(&http, pool_only, key).await?;
            ensure!(
                x_cache == "hit",
                "the pool-only site's read of {key} said X-Cache: {x_cache}, not hit"
            );
        }
    }

    let nginx = Nginx::start(
        nginx_bin,
        NginxConfig {
            workers: args.threads,
            port: 0,
            prefix: dir.path().join("nginx"),
            root: files.clone(),
            location: IMAGES_PATH.into(),
            content_type: CONTENT_TYPE.into(),
        },
        &format!("{IMAGES_PATH}{}", hot[0]),
    )
    .await?;
    let paths: Vec<String> = hot.iter().map(|k| format!("{IMAGES_PATH}{k}")).collect();
    let script = dir.path().join("images.lua");
    std::fs::write(&script, wrk::render_script(&paths)?)?;

    let mut targets = vec![Target::Nginx, Target::Site];
    if sites.pool_only.is_some() {
        targets.push(Target::SitePoolOnly);
    }
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for &target in &targets {
            super::check_interrupted()?;
            let base = match sites.url(target) {
                Some(url) => url.to_owned(),
                None => nginx.url(),
            };
            let before = match sites.url(target) {
                Some(url) => Some(pool_counters(&http, url).await?),
                None => None,
            };
            let cpu_before = CpuSplit::now(nginx.pid());
            let result = wrk::run(&WrkRun {
                binary: wrk,
                script: &script,
                base_url: &base,
                threads: args.wrk_threads,
                connections: args.connections,
                duration: args.duration,
            })
            .await
            .with_context(|| format!("wrk against {}", target.name()))?;
            let cpu = CpuSplit::now(nginx.pid()).since(&cpu_before, target);
            let hits = match (before, sites.url(target)) {
                (Some(before), Some(url)) => {
                    let after = pool_counters(&http, url).await?;
                    Some(after.since(before))
                }
                _ => None,
            };
            runs.push(Run {
                round,
                target,
                result,
                hits,
                cpu,
            });
        }
    }
    drop(nginx);

    let misses = miss_path(args, &http, site, api, web_args).await?;
    Ok(render_report(args, &runs, &hit_floor, &misses))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Nginx,
    /// The site as configured (`--local-cache-mib`).
    Site,
    /// The second site, its in-process cache off (`--compare-pool-only`).
    SitePoolOnly,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Nginx => "nginx",
            Target::Site => "site",
            Target::SitePoolOnly => "site-pool",
        }
    }
}

struct Run {
    round: usize,
    target: Target,
    result: WrkResult,
    /// The site's pool counters over the run (None for nginx).
    hits: Option<PoolCounters>,
    cpu: CpuUse,
}

/// CPU seconds of each side, read before and after a run.
struct CpuSplit {
    /// This process: the site's runtime, and the control runtime (idle during wrk).
    site: f64,
    /// The pool's nodes (this process's `cachepool` children).
    nodes: f64,
    /// nginx's master and workers.
    nginx: f64,
    /// Children of this process already waited for: wrk, once a run has ended.
    reaped: f64,
}

/// CPU seconds a run cost: the server measured (site, or nginx), the nodes, and wrk.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    server: f64,
    nodes: f64,
    wrk: f64,
}

impl CpuSplit {
    fn now(nginx_pid: u32) -> CpuSplit {
        let me = std::process::id() as i32;
        let nginx = nginx_pid as i32;
        let stats = procs::all();
        let tick = procs::tick_secs();
        let own = stats.iter().find(|s| s.pid == me);
        CpuSplit {
            site: own.map_or(0.0, |s| s.ticks as f64 * tick),
            reaped: own.map_or(0.0, |s| s.child_ticks as f64 * tick),
            nodes: procs::cpu_secs(&stats, |s| s.ppid == me && s.comm == "cachepool"),
            nginx: procs::cpu_secs(&stats, |s| s.pgrp == nginx),
        }
    }

    fn since(&self, before: &CpuSplit, target: Target) -> CpuUse {
        CpuUse {
            server: match target {
                Target::Site | Target::SitePoolOnly => self.site - before.site,
                Target::Nginx => self.nginx - before.nginx,
            },
            nodes: self.nodes - before.nodes,
            wrk: self.reaped - before.reaped,
        }
    }
}

/// The site's cache counters (`/metrics`): pool hits and misses, and in-process hits (reads
/// that never reached the pool).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PoolCounters {
    hits: u64,
    misses: u64,
    local_hits: u64,
}

impl PoolCounters {
    fn since(self, earlier: PoolCounters) -> PoolCounters {
        PoolCounters {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            local_hits: self.local_hits.saturating_sub(earlier.local_hits),
        }
    }

    /// Image reads: the in-process cache's hits and everything that asked the pool.
    fn reads(self) -> u64 {
        self.hits + self.misses + self.local_hits
    }

    /// The share of the reads a cache served (in-process or pool).
    fn hit_share(self) -> f64 {
        (self.hits + self.local_hits) as f64 / self.reads().max(1) as f64
    }

    /// The share of the reads the in-process cache served.
    fn local_share(self) -> f64 {
        self.local_hits as f64 / self.reads().max(1) as f64
    }
}

async fn pool_counters(http: &reqwest::Client, site: &str) -> anyhow::Result<PoolCounters> {
    let text = http
        .get(format!("{site}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    parse_pool_counters(&text)
}

/// The cache counters in the site's metrics text. The in-process cache's are absent when it
/// is off (0 then).
fn parse_pool_counters(text: &str) -> anyhow::Result<PoolCounters> {
    let find = |name: &str| {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (metric, value) = l.rsplit_once(' ')?;
            // With or without labels.
            let bare = metric.split('{').next()?;
            (bare == name).then(|| value.trim().parse::<f64>().ok())?
        })
    };
    let value =
        |name: &str| find(name).with_context(|| format!("the site's /metrics has no {name}"));
    Ok(PoolCounters {
        hits: value("cachepool_web_pool_hits_total")? as u64,
        misses: value("cachepool_web_pool_misses_total")? as u64,
        local_hits: find("cachepool_web_local_hits_total").unwrap_or(0.0) as u64,
    })
}

async fn upload(http: &reqwest::Client, site: &str, key: &str, image: Bytes) -> anyhow::Result<()> {
    let answer = http
        .put(format!("{site}{IMAGES_PATH}{key}"))
        .body(image)
        .send()
        .await
        .with_context(|| format!("uploading {key}"))?;
    if !answer.status().is_success() {
        bail!(
            "uploading {key} answered {}: {}",
            answer.status(),
            answer.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Reads an image whole and returns its `X-Cache` header.
async fn get_image(http: &reqwest::Client, site: &str, key: &str) -> anyhow::Result<String> {
    let answer = http
        .get(format!("{site}{IMAGES_PATH}{key}"))
        .send()
        .await
        .with_context(|| format!("reading {key}"))?;
    ensure!(
        answer.status().is_success(),
        "reading {key} answered {}",
        answer.status()
    );
    let x_cache = answer
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_owned();
    answer.bytes().await?;
    Ok(x_cache)
}

/// Latencies of the miss path, in milliseconds, one entry per image.
#[derive(Debug, Default)]
struct Misses {
    http: Vec<f64>,
    in_process: Vec<f64>,
    lookup: Vec<f64>,
    database: Vec<f64>,
    object: Vec<f64>,
    fill: Vec<f64>,
    /// HTTP reads of set A that did not say `X-Cache: miss`.
    not_missed: usize,
}

async fn miss_path(
    args: &WebBenchArgs,
    http: &reqwest::Client,
    site: &str,
    api: &str,
    web_args: &WebArgs,
) -> anyhow::Result<Misses> {
    let mut out = Misses::default();
    if args.misses == 0 {
        return Ok(out);
    }
    let sets = ["miss-a", "miss-b", "miss-c"];
    for (s, set) in sets.iter().enumerate() {
        for i in 0..args.misses {
            super::check_interrupted()?;
            let seed = 1_000_000 * (s as u64 + 1) + i as u64;
            upload(
                http,
                site,
                &format!("{set}-{i}"),
                png_of_size(args.image_size, seed),
            )
            .await?;
        }
    }
    // What the site uses, opened a second time in this process over the same files and pool.
    let db = Database::connect(&format!(
        "sqlite://{}",
        web_args.data_dir.join("web.db").display()
    ))
    .await
    .context("opening the site's database")?;
    let objects = ObjectStore::local(web_args.data_dir.join("images"))
        .context("opening the site's image directory")?;
    let (namespace, name) = web_args
        .pool
        .split_once('/')
        .context("the pool is NAMESPACE/NAME")?;
    let pool = RingSource {
        api: api.to_owned(),
        token: TOKEN.into(),
        namespace: namespace.into(),
        pool: name.into(),
    }
    .connect(ClientOptions::default(), Duration::from_secs(30))
    .await
    .context("joining the pool")?;
    let pool = Arc::new(pool);
    let cache = ImageCache::new(pool.clone(), CacheConfig::default())?;

    let result = async {
        for i in 0..args.misses {
            super::check_interrupted()?;
            // A: the whole miss over HTTP.
            let started = Instant::now();
            let x_cache = get_image(http, site, &format!("miss-a-{i}")).await?;
            out.http.push(ms(started.elapsed()));
            if x_cache != "miss" {
                out.not_missed += 1;
            }
            // B: its parts, as the site makes them.
            parts(
                &cache,
                &pool,
                &db,
                &objects,
                &format!("miss-b-{i}"),
                &mut out,
            )
            .await?;
            // C: the whole miss in-process.
            let key = ImageKey::parse(&format!("miss-c-{i}"))?;
            let started = Instant::now();
            let fetched = cache
                .get_or_fill(&key, || async {
                    let Some(meta) = db.get(key.as_str()).await? else {
                        return Ok::<_, StoreError>(None);
                    };
                    Ok(objects.get(&meta.object).await?.map(|o| CachedImage {
                        content_type: meta.content_type,
                        etag: meta.etag,
                        body: o.bytes,
                    }))
                })
                .await?
                .with_context(|| format!("no image under {key}"))?;
            out.in_process.push(ms(started.elapsed()));
            ensure!(!fetched.hit, "{key} was in the pool before its first read");
        }
        anyhow::Ok(())
    }
    .await;
    db.close().await;
    result?;
    Ok(out)
}

/// The miss of `key` step by step: the same calls as the site's read, each timed.
async fn parts(
    cache: &ImageCache,
    pool: &PoolClient,
    db: &Database,
    objects: &ObjectStore,
    key: &str,
    out: &mut Misses,
) -> anyhow::Result<()> {
    let pool_key = cache.pool_key(&ImageKey::parse(key)?);
    let t0 = Instant::now();
    let found = pool.get(&pool_key).await?;
    let t1 = Instant::now();
    ensure!(
        found.is_none(),
        "{key} was in the pool before its first read"
    );
    let meta = db
        .get(key)
        .await?
        .with_context(|| format!("no row for {key}"))?;
    let t2 = Instant::now();
    let object = objects
        .get(&meta.object)
        .await?
        .with_context(|| format!("no object for {key}"))?;
    let t3 = Instant::now();
    let value = envelope::encode(&CachedImage {
        content_type: meta.content_type,
        etag: meta.etag,
        body: object.bytes,
    })?;
    let stored = pool
        .add(&pool_key, &value, 0, cache.config().ttl_secs)
        .await?;
    let t4 = Instant::now();
    ensure!(stored, "the pool refused the fill of {key}");
    out.lookup.push(ms(t1 - t0));
    out.database.push(ms(t2 - t1));
    out.object.push(ms(t3 - t2));
    out.fill.push(ms(t4 - t3));
    Ok(())
}

fn render_report(args: &WebBenchArgs, runs: &[Run], hit_floor: &[f64], misses: &Misses) -> String {
    let mut out = format!(
        "GET {IMAGES_PATH}{{key}} of {} cached images of {} B: wrk -t {} -c {} for {:?} per run; \
         site runtime threads = nginx workers = {}; pool of {} nodes\n\n",
        args.images,
        args.image_size,
        args.wrk_threads,
        args.connections,
        args.duration,
        args.threads,
        args.nodes
    );
    let mut table = Table::new([
        "run",
        "server",
        "requests/s",
        "p50 (ms)",
        "p99 (ms)",
        "errors",
        "cache hits (in-process)",
        "CPU s: server",
        "nodes",
        "wrk",
        "server+nodes CPU us/req",
    ]);
    for run in runs {
        let r = &run.result;
        table.row([
            run.round.to_string(),
            run.target.name().to_owned(),
            thousands(r.requests_per_sec()),
            format!("{:.2}", r.latency_us.p50 / 1e3),
            format!("{:.2}", r.latency_us.p99 / 1e3),
            r.errors.total().to_string(),
            run.hits.map_or_else(
                || "-".to_owned(),
                |h| {
                    format!(
                        "{:.2}% of {} ({:.2}%)",
                        100.0 * h.hit_share(),
                        h.reads(),
                        100.0 * h.local_share()
                    )
                },
            ),
            format!("{:.1}", run.cpu.server),
            format!("{:.1}", run.cpu.nodes),
            format!("{:.1}", run.cpu.wrk),
            format!(
                "{:.1}",
                1e6 * (run.cpu.server + run.cpu.nodes) / r.requests.max(1) as f64
            ),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(
        "(CPU seconds over the run, from /proc: the server measured (this process for the site, \
         nginx's master and workers), the pool's node processes, and wrk)\n",
    );
    let median_of = |t: Target, f: &dyn Fn(&Run) -> f64| -> f64 {
        let v: Vec<f64> = runs.iter().filter(|r| r.target == t).map(f).collect();
        median(&v)
    };
    let rps = |r: &Run| r.result.requests_per_sec();
    let p99 = |r: &Run| r.result.latency_us.p99 / 1e3;
    let cpu_us = |r: &Run| 1e6 * (r.cpu.server + r.cpu.nodes) / r.result.requests.max(1) as f64;
    let nginx_rps = median_of(Target::Nginx, &rps);
    let nginx_p99 = median_of(Target::Nginx, &p99);
    let nginx_cpu = median_of(Target::Nginx, &cpu_us);
    out.push_str(&format!(
        "\nnginx: {} req/s, p99 {nginx_p99:.2} ms, {nginx_cpu:.1} CPU us/req (medians)",
        thousands(nginx_rps)
    ));
    for target in [Target::Site, Target::SitePoolOnly] {
        if !runs.iter().any(|r| r.target == target) {
            continue;
        }
        // Per round: this target's run against the same round's nginx run.
        let ratios: Vec<String> = (1..=args.rounds)
            .filter_map(|round| {
                let of = |t: Target| runs.iter().find(|r| r.round == round && r.target == t);
                Some(format!(
                    "{:.2}x",
                    rps(of(target)?) / rps(of(Target::Nginx)?)
                ))
            })
            .collect();
        let ratio = median_of(target, &rps) / nginx_rps;
        let site_p99 = median_of(target, &p99);
        let site_cpu = median_of(target, &cpu_us);
        out.push_str(&format!(
            "\n{} / nginx: throughput {ratio:.2}x (medians; per round: {}); p99 {site_p99:.2} \
             ms against {nginx_p99:.2} ms; CPU per request (server and nodes) {site_cpu:.1} us, \
             {:.2}x nginx's; target throughput >= 1.00x and p99 <= nginx's: {}",
            target.name(),
            ratios.join(", "),
            site_cpu / nginx_cpu,
            if ratio >= 1.0 && site_p99 <= nginx_p99 {
                "met"
            } else {
                "MISSED"
            }
        ));
    }
    out.push('\n');

    if !misses.http.is_empty() {
        out.push_str(&format!(
            "\nMiss path: {} fresh images per row (disjoint sets), one at a time, unloaded\n\n",
            misses.http.len()
        ));
        let mut table = Table::new(["step", "p50 (ms)", "p99 (ms)", "mean (ms)", "share of p50"]);
        let whole = percentile(&misses.http, 50.0);
        let mut row = |name: &str, v: &[f64]| {
            table.row([
                name.to_owned(),
                format!("{:.3}", percentile(v, 50.0)),
                format!("{:.3}", percentile(v, 99.0)),
                format!("{:.3}", mean(v)),
                format!("{:.0}%", 100.0 * percentile(v, 50.0) / whole),
            ]);
        };
        row("whole miss, HTTP GET (X-Cache: miss)", &misses.http);
        row("whole miss, ImageCache::get_or_fill", &misses.in_process);
        row("  pool lookup (the miss)", &misses.lookup);
        row("  database read", &misses.database);
        row("  object-store read", &misses.object);
        row("  pool fill (encode + add)", &misses.fill);
        let sum: Vec<f64> = (0..misses.lookup.len())
            .map(|i| misses.lookup[i] + misses.database[i] + misses.object[i] + misses.fill[i])
            .collect();
        row("  sum of the parts", &sum);
        row("hit, HTTP GET, unloaded (for comparison)", hit_floor);
        out.push_str(&table.render());
        if misses.not_missed > 0 {
            out.push_str(&format!(
                "warning: {} of the HTTP reads did not say X-Cache: miss\n",
                misses.not_missed
            ));
        }
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The `p`th percentile (nearest rank) of `values`; NaN for none.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A valid PNG of exactly `size` bytes (at least 100) that the site accepts and makes a
/// thumbnail of: a 1x1 RGB image of the seed's colour, encoded by the `image` crate, and a
/// private ancillary chunk (`cpRd`, which decoders skip) of pseudo-random bytes
/// (incompressible, like real image data) that brings it to `size`. Every CRC is right, so the
/// upload's thumbnail is made as for a real image, not refused as corrupt.
fn png_of_size(size: usize, seed: u64) -> Bytes {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64: fast, and distinct per seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    };
    let pixel = image::RgbImage::from_pixel(1, 1, image::Rgb([next(), next(), next()]));
    let mut png = Vec::new();
    pixel
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("encoding a 1x1 PNG in memory: {e}"));
    // The padding chunk goes before IEND (the last 12 bytes).
    const CHUNK_OVERHEAD: usize = 12;
    let data_len = size.saturating_sub(png.len() + CHUNK_OVERHEAD);
    let iend = png.split_off(png.len() - 12);
    let data: Vec<u8> = (0..data_len).map(|_| next()).collect();
    let mut crc = crc32fast::Hasher::new();
    crc.update(b"cpRd");
    crc.update(&data);
    png.extend_from_slice(&(data_len as u32).to_be_bytes());
    png.extend_from_slice(b"cpRd");
    png.extend_from_slice(&data);
    png.extend_from_slice(&crc.finalize().to_be_bytes());
    png.extend_from_slice(&iend);
    png.into()
}

/// `10s`, `500ms`, `1m` or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?}: a duration is a whole number with s, ms or m (e.g. 10s)")
    })?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        other => return Err(format!("{text:?}: unknown unit {other:?}; use s, ms or m")),
    };
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?}: wrk runs last at least 1s"));
    }
    Ok(d)
}

/// `64KiB`, `1MiB`, `4096` or `4096B`.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: usize = number.parse().map_err(|_| {
        format!("{text:?}: a size is a whole number with B, KiB or MiB (e.g. 64KiB)")
    })?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use B, KiB or MiB"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The site's runtime on a thread of its own: `threads` workers serve the site and nothing
/// else. Dropping the guard (also on error or unwinding) stops the site and joins the thread.
pub(super) struct SiteThread {
    pub(super) url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SiteThread {
    pub(super) async fn start(args: WebArgs, threads: usize) -> anyhow::Result<SiteThread> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-site".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("site")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e).context("site runtime")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let web = match Web::start(&args).await {
                        Ok(web) => web,
                        Err(e) => {
                            let _ = ready_tx
                                .send(Err(anyhow::Error::new(e).context("starting the site")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(web.url()));
                    // A dropped sender (the guard dropped) stops the site too.
                    let _ = stop_rx.await;
                    web.stop().await;
                });
            })
            .context("starting the site's thread")?;
        let mut guard = SiteThread {
            url: String::new(),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        guard.url = ready_rx
            .await
            .context("the site's thread ended before the site started")??;
        Ok(guard)
    }

    /// Stops the site and waits for its thread (off the async workers).
    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for SiteThread {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A scratch directory for the run (pool manifests, node state, the site's data, nginx's
/// prefix, the wrk script), removed when dropped.
#[derive(Debug)]
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("cachepool-bench-web-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_images_have_the_asked_size_and_are_accepted_by_the_site() {
        for size in [100, 4096, 64 << 10] {
            let png = png_of_size(size, 7);
            assert_eq!(png.len(), size);
            let info = cachepool_web::image::check_upload(&png).unwrap();
            assert_eq!(info.format.content_type(), CONTENT_TYPE);
            // Decodable, CRCs and all: the upload's thumbnail is made, not refused.
            let thumb = cachepool_web::image::thumb::make(&png)
                .unwrap_or_else(|e| panic!("{size} B: no thumbnail: {e}"));
            assert!(!thumb.bytes.is_empty());
        }
        assert_ne!(png_of_size(4096, 1), png_of_size(4096, 2));
    }

    #[test]
    fn durations_and_sizes_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("500ms").unwrap_err().contains("at least 1s"));
        assert!(parse_duration("10h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("whole number"));
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("64KB").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn pool_counters_are_read_from_the_metrics_text() {
        let text = "# HELP cachepool_web_pool_hits Image reads the pool served.\n\
                    # TYPE cachepool_web_pool_hits counter\n\
                    cachepool_web_pool_hits_total 1200\n\
                    cachepool_web_pool_hits_totalx 9\n\
                    cachepool_web_pool_misses_total{route=\"x\"} 34\n# EOF\n";
        let c = parse_pool_counters(text).unwrap();
        assert_eq!(
            c,
            PoolCounters {
                hits: 1200,
                misses: 34,
                local_hits: 0,
            }
        );
        let d = c.since(PoolCounters {
            hits: 200,
            misses: 34,
            local_hits: 0,
        });
        assert_eq!(
            d,
            PoolCounters {
                hits: 1000,
                misses: 0,
                local_hits: 0,
            }
        );
        assert_eq!(d.hit_share(), 1.0);
        let with_local = format!("{text}cachepool_web_local_hits_total 3000\n");
        let l = parse_pool_counters(&with_local).unwrap();
        assert_eq!(l.local_hits, 3000);
        assert_eq!(l.reads(), 4234);
        assert!((l.local_share() - 3000.0 / 4234.0).abs() < 1e-12);
        let err = parse_pool_counters("# EOF\n").unwrap_err();
        assert!(
            err.to_string().contains("cachepool_web_pool_hits_total"),
            "{err}"
        );
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
