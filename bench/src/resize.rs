//! `cachepool bench resize`: what a user's latency, throughput and hit rate do while the pool
//! resizes, and whether the autoscaler settles — the five experiments of the system this
//! product grew from, each run under three designs with the same traffic and the same nodes.
//!
//! 1. a constant pool of 2 nodes; 2. a shrink from 3 to 2; 3. a grow from 1 to 3;
//! 4. the autoscaler growing the pool while the miss rate stays above 0.4 (nodes that hold a
//!    fifth of the data each); 5. the autoscaler shrinking the pool while the miss rate stays
//!    below 0.1 (nodes that hold 55 % of the data each, where the naive rule flips between 1
//!    and 2 nodes forever).
//!
//! Designs ([`pool::Design`]): this product, "new node starts empty" and the original design;
//! traffic ([`load`]): open-loop cache-aside reads and writes at a fixed rate through the
//! pool client; autoscaler ([`scaler`]): the operator's own, live, plus a replay against the
//! naive rule. Each experiment writes a CSV of its per-second rows, a CSV of its resizes (and
//! of its autoscaler windows), and SVG figures (PNG too, rendered by headless Chromium);
//! `summary.md` has the tables of docs/results.md.
//!
//! The designs run one after another, never at once, so that on a two-core machine none of
//! them takes CPU from another; each gets fresh nodes of the same size and the same seed.

pub mod load;
mod plot;
pub mod pool;
pub mod scaler;
pub mod summary;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cachepool_operator::autoscaler::Autoscaler;

use crate::keys::KeyDist;
use load::{KeySpace, Second, Shared, Traffic};
use pool::{Design, NodeKind, Pool, Resize};
use scaler::{Replay, WindowRow};

/// `cachepool bench resize` flags.
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Directory for the CSV files, the SVG figures and summary.md.
    #[arg(long, default_value = "docs/results")]
    out_dir: PathBuf,
    /// Experiments to run, comma-separated (1 constant, 2 shrink, 3 grow, 4 auto grow, 5 auto shrink).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    experiments: Vec<u8>,
    /// Designs to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "product,empty,original")]
    designs: Vec<Design>,
    /// Requests per second, sent on schedule (open loop).
    #[arg(long, default_value_t = 1500.0)]
    rate: f64,
    /// Distinct keys.
    #[arg(long, default_value_t = 8000)]
    keys: usize,
    /// Smallest value in bytes.
    #[arg(long, default_value_t = 300)]
    min_value: usize,
    /// Largest value in bytes.
    #[arg(long, default_value_t = 100 << 10)]
    max_value: usize,
    /// Fraction of requests that are reads (the rest are writes).
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    /// Key popularity of experiments 1-3 (4 and 5 use uniform keys, so that the miss rate
    /// follows the pool's memory).
    #[arg(long, default_value = "zipf0.99")]
    dist: KeyDist,
    /// Seconds of traffic in experiments 1-3 (a resize at a third of it).
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Seconds of traffic in experiments 4 and 5.
    #[arg(long, default_value_t = 45)]
    auto_secs: u64,
    /// The autoscaler's windowSeconds (the operator's default is 60; shortened to fit a run).
    #[arg(long, default_value_t = 3)]
    window_secs: u32,
    /// The autoscaler's cooldownSeconds (the operator's default is 120).
    #[arg(long, default_value_t = 3)]
    cooldown_secs: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The browser that renders each SVG figure to PNG (headless); `none` writes SVG only.
    #[arg(long, default_value = "chromium")]
    chromium: PathBuf,
    /// Worker threads of the bench's runtime (traffic, resizes).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
}

/// Everything an experiment needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    pub rate: f64,
    pub keys: usize,
    pub min_value: usize,
    pub max_value: usize,
    pub read_ratio: f64,
    pub dist: KeyDist,
    pub secs: u64,
    pub auto_secs: u64,
    pub window_secs: u32,
    pub cooldown_secs: u32,
    pub seed: u64,
    pub nodes: NodeKind,
}

/// The five experiments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experiment {
    Constant,
    Shrink,
    Grow,
    AutoGrow,
    AutoShrink,
}

impl Experiment {
    pub const ALL: [Experiment; 5] = [
        Experiment::Constant,
        Experiment::Shrink,
        Experiment::Grow,
        Experiment::AutoGrow,
        Experiment::AutoShrink,
    ];

    pub fn number(self) -> u8 {
        self as u8 + 1
    }

    pub fn from_number(n: u8) -> Option<Experiment> {
        Experiment::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }

    /// File stem and short name.
    pub fn slug(self) -> &'static str {
        match self {
            Experiment::Constant => "exp1-constant-2",
            Experiment::Shrink => "exp2-shrink-3-2",
            Experiment::Grow => "exp3-grow-1-3",
            Experiment::AutoGrow => "exp4-autoscaler-grow",
            Experiment::AutoShrink => "exp5-autoscaler-shrink",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Experiment::Constant => "1. constant pool of 2 nodes",
            Experiment::Shrink => "2. shrink 3 -> 2 nodes",
            Experiment::Grow => "3. grow 1 -> 3 nodes",
            Experiment::AutoGrow => "4. autoscaler, miss rate above 0.4",
            Experiment::AutoShrink => "5. autoscaler, miss rate below 0.1",
        }
    }

    pub fn is_auto(self) -> bool {
        matches!(self, Experiment::AutoGrow | Experiment::AutoShrink)
    }

    /// Starting size.
    fn start(self) -> u32 {
        match self {
            Experiment::Constant | Experiment::AutoShrink => 2,
            Experiment::Shrink => 3,
            Experiment::Grow | Experiment::AutoGrow => 1,
        }
    }

    /// Node memory as a fraction of the key space's bytes; None: room for every key.
    fn memory_fraction(self) -> Option<f64> {
        match self {
            Experiment::AutoGrow => Some(0.2),
            Experiment::AutoShrink => Some(0.55),
            _ => None,
        }
    }
}

/// One experiment under one design.
#[derive(Debug)]
pub struct Run {
    pub experiment: Experiment,
    pub design: Design,
    pub capacity_mib: u64,
    pub seconds: Vec<Second>,
    /// Pool size, layout number and keys moved so far, at the end of each second.
    pub state: Vec<(u32, u64, u64)>,
    pub resizes: Vec<Resize>,
    pub windows: Vec<WindowRow>,
    /// Per layout after the first: (layout, probes, probes that missed).
    pub probes: Vec<(u64, u64, u64)>,
    pub sent: u64,
    pub final_size: u32,
    /// Experiments 4-5: the naive rule and the autoscaler replayed on this run's series.
    pub replay: Option<(Replay, Replay)>,
}

/// Runs the selected experiments and writes their files.
pub fn run(rt: &tokio::runtime::Runtime, args: ResizeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.keys >= 100, "--keys must be at least 100");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.read_ratio),
        "--read-ratio must be between 0 and 1"
    );
    anyhow::ensure!(
        args.min_value >= 1 && args.max_value >= args.min_value && args.max_value <= 1 << 20,
        "--min-value and --max-value must satisfy 1 <= min <= max <= 1 MiB"
    );
    let settings = Settings {
        rate: args.rate,
        keys: args.keys,
        min_value: args.min_value,
        max_value: args.max_value,
        read_ratio: args.read_ratio,
        dist: args.dist,
        secs: args.secs.max(6),
        auto_secs: args.auto_secs.max(6),
        window_secs: args.window_secs.max(1),
        cooldown_secs: args.cooldown_secs,
        seed: args.seed,
        nodes: NodeKind::Process,
    };
    let experiments: Vec<Experiment> = args
        .experiments
        .iter()
        .map(|&n| Experiment::from_number(n).with_context(|| format!("no experiment {n} (1-5)")))
        .collect::<anyhow::Result<_>>()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut all = Vec::new();
    for exp in experiments {
        let mut runs = Vec::new();
        for &design in &args.designs {
            eprintln!("experiment {} under {}", exp.title(), design.name());
            // On this thread: the node children's death signal is tied to the thread that
            // spawned them, which must outlive them.
            let run = rt.block_on(run_experiment(&settings, exp, design))?;
            eprintln!("  {}", summary::one_line(&run));
            runs.push(run);
        }
        summary::write_files(&args.out_dir, exp, &runs)?;
        let chromium = (args.chromium.as_os_str() != "none").then_some(args.chromium.as_path());
        plot::write(&args.out_dir, exp, &runs, chromium)?;
        all.push((exp, runs));
    }
    let md = summary::markdown(&settings, &all);
    std::fs::write(args.out_dir.join("summary.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// Runs one experiment under one design, start to end; every node it started is stopped.
pub async fn run_experiment(
    settings: &Settings,
    exp: Experiment,
    design: Design,
) -> anyhow::Result<Run> {
    let keys = KeySpace::new(
        settings.keys,
        settings.min_value,
        settings.max_value,
        settings.seed,
    );
    let total = keys.total_bytes();
    let capacity_mib = match exp.memory_fraction() {
        Some(f) => ((total as f64 * f) / f64::from(1u32 << 20))
            .round()
            .max(1.0) as u64,
        // Room for every key on one node, twice over (versions rewritten, item overhead).
        None => (2 * total).div_ceil(1 << 20) + 8,
    };
    let secs = if exp.is_auto() {
        settings.auto_secs
    } else {
        settings.secs
    };
    let shared = Arc::new(Shared::new(
        keys,
        secs as usize + 60,
        exp.memory_fraction().is_some(),
    )?);
    let mut pool = Pool::start(design, settings.nodes.clone(), exp.start(), capacity_mib).await?;
    let outcome = drive_experiment(settings, exp, &shared, &mut pool, secs).await;
    pool.stop().await;
    let (sent, resizes, windows, timeline) = outcome?;
    let final_size = resizes.last().map_or(exp.start(), |r| r.to);
    let shared = Arc::try_unwrap(shared)
        .map_err(|_| anyhow::anyhow!("the traffic still holds the experiment's state"))?;
    let probes = resizes
        .iter()
        .map(|r| {
            let (p, l) = shared.probes(r.layout);
            (r.layout, p, l)
        })
        .collect();
    let seconds: Vec<Second> = shared
        .into_seconds()
        .into_iter()
        .take(secs as usize)
        .collect();
    let state = (0..seconds.len())
        .map(|s| {
            let end = (s + 1) as f64;
            timeline
                .iter()
                .rev()
                .find(|(t, ..)| *t <= end)
                .map_or((exp.start(), 0, 0), |&(_, n, l, m)| (n, l, m))
        })
        .collect();
    let replay = exp.is_auto().then(|| {
        let spec = scaler::spec(
            exp.start(),
            settings.window_secs,
            settings.cooldown_secs,
            min_requests(settings),
        );
        let series = scaler::series_by_size(&windows, min_requests(settings));
        let steps = 40;
        (
            scaler::replay_naive(&series, exp.start(), steps, &spec),
            scaler::replay_autoscaler(&series, exp.start(), steps, &spec),
        )
    });
    Ok(Run {
        experiment: exp,
        design,
        capacity_mib,
        seconds,
        state,
        resizes,
        windows,
        probes,
        sent,
        final_size,
        replay,
    })
}

/// A window decides only with a tenth of its expected reads or more.
fn min_requests(settings: &Settings) -> u64 {
    ((settings.rate * settings.read_ratio * f64::from(settings.window_secs)) / 10.0).max(10.0)
        as u64
}

type Timeline = Vec<(f64, u32, u64, u64)>;

async fn drive_experiment(
    settings: &Settings,
    exp: Experiment,
    shared: &Arc<Shared>,
    pool: &mut Pool,
    secs: u64,
) -> anyhow::Result<(u64, Vec<Resize>, Vec<WindowRow>, Timeline)> {
    load::prefill(shared, &pool.router, 16).await?;
    shared.start_clock();
    let until = Instant::now() + Duration::from_secs(secs);
    let traffic = Traffic {
        rate: settings.rate,
        read_ratio: settings.read_ratio,
        dist: if exp.is_auto() {
            KeyDist::Uniform
        } else {
            settings.dist
        },
        seed: settings.seed ^ u64::from(exp.number()),
    };
    let generator = tokio::spawn(load::drive(
        shared.clone(),
        pool.router.clone(),
        traffic,
        until,
    ));
    let mut resizes = Vec::new();
    let mut windows = Vec::new();
    let mut timeline = vec![(0.0, pool.size(), 0, 0)];
    let control = async {
        match exp {
            Experiment::Constant => {}
            Experiment::Shrink | Experiment::Grow => {
                let to = if exp == Experiment::Shrink { 2 } else { 3 };
                tokio::time::sleep_until((shared.start() + Duration::from_secs(secs / 3)).into())
                    .await;
                let r = pool.resize(to, shared).await?;
                timeline.push((r.done, r.to, r.layout, r.keys_moved));
                resizes.push(r);
            }
            Experiment::AutoGrow | Experiment::AutoShrink => {
                let spec = scaler::spec(
                    exp.start(),
                    settings.window_secs,
                    settings.cooldown_secs,
                    min_requests(settings),
                );
                let mut scaler = Autoscaler::new();
                scaler.settled(pool.size(), scaler::at(0.0));
                let window = f64::from(settings.window_secs);
                let mut settled_at = 0.0;
                let mut last_done = 0.0;
                let mut begin = 0.0;
                let (mut gets0, mut misses0) = (0, 0);
                let mut moved = 0;
                loop {
                    let end = begin + window;
                    if end > secs as f64 - 0.5 {
                        break;
                    }
                    tokio::time::sleep_until(
                        (shared.start() + Duration::from_secs_f64(end)).into(),
                    )
                    .await;
                    crate::check_interrupted()?;
                    let gets = shared.gets.load(std::sync::atomic::Ordering::Relaxed);
                    let misses = shared.misses.load(std::sync::atomic::Ordering::Relaxed);
                    let row = WindowRow {
                        end,
                        length: window,
                        gets: gets - gets0,
                        misses: misses - misses0,
                        replicas: pool.size(),
                        steady: last_done <= begin,
                        after_settle: settled_at <= begin,
                        decision: String::new(),
                        reason: String::new(),
                    };
                    (gets0, misses0) = (gets, misses);
                    let (row, scale) = scaler::decide(&mut scaler, &spec, row);
                    windows.push(row);
                    begin = end;
                    if let Some(to) = scale {
                        let r = pool.resize(to, shared).await?;
                        scaler.settled(r.to, scaler::at(r.done));
                        moved += r.keys_moved;
                        timeline.push((r.done, r.to, r.layout, moved));
                        (settled_at, last_done) = (r.done, r.done);
                        resizes.push(r);
                        // The next window begins now: the one the resize interrupted is void.
                        begin = shared.elapsed();
                        gets0 = shared.gets.load(std::sync::atomic::Ordering::Relaxed);
                        misses0 = shared.misses.load(std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        anyhow::Ok(())
    };
    let controlled = control.await;
    let sent = generator.await.context("the traffic task panicked")??;
    controlled?;
    Ok((sent, resizes, windows, timeline))
}
