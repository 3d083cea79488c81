//! The closed-loop load generator: one task per connection, each sending a batch of
//! `depth` requests with one write, then reading all `depth` replies before the next batch.
//!
//! Latency is per request: from the write of its batch to the read that completed its reply.
//! With depth 1 that is the request's round trip; with depth 16 the 16 requests of a batch
//! share a start time and each ends when its own reply has arrived, so the last reply of a
//! batch carries the batch's round trip. A closed loop sends nothing while waiting, so these
//! are service times under the offered concurrency, not open-loop latencies (no correction
//! for coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::keys::{KeyDist, KeySampler, write_key};
use cache_node::client::codec::{self as wire, Pipelined as Reply};

/// One measured load.
#[derive(Clone, Debug)]
pub struct Load {
    pub addr: SocketAddr,
    pub connections: usize,
    /// Run before measuring, to let connections and caches settle; not counted.
    pub warmup: Duration,
    pub duration: Duration,
    pub depth: usize,
    /// Fraction of requests that are gets; the rest are sets.
    pub get_ratio: f64,
    pub dist: KeyDist,
    pub keys: u64,
    pub key_size: usize,
    pub value_size: usize,
    /// Seeds every connection's generator, so the same seed gives each server the same load.
    pub seed: u64,
}

/// What one load measured (the warm-up excluded).
#[derive(Clone, Debug)]
pub struct LoadResult {
    pub ops: u64,
    /// Requests answered during the warm-up (not in `ops`, nor in the latency).
    pub warmup_ops: u64,
    pub gets: u64,
    pub hits: u64,
    pub refused: u64,
    pub elapsed: Duration,
    /// Per-request latency in nanoseconds.
    pub latency: Histogram<u64>,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn hit_ratio(&self) -> f64 {
        if self.gets == 0 {
            0.0
        } else {
            self.hits as f64 / self.gets as f64
        }
    }
}

/// A latency histogram: 1 ns to 60 s at 3 significant digits.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("creating a latency histogram")
}

/// Runs `load` on the current runtime and returns the merged measurements.
pub async fn run(load: &Load) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(
        load.connections > 0 && load.depth > 0,
        "connections and depth must be at least 1"
    );
    let sampler = Arc::new(KeySampler::new(load.dist, load.keys, load.seed)?);
    // Connect every connection first, so the measured window does not include connecting
    // and no task waits on another that failed to connect.
    let mut streams = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        streams.push(connect(load.addr).await?);
    }
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let load = load.clone();
        let sampler = sampler.clone();
        // Distinct, reproducible streams per connection.
        let seed = load.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.spawn(async move { drive(stream, &load, &sampler, seed, measure_from, end).await });
    }
    let mut total = LoadResult {
        ops: 0,
        warmup_ops: 0,
        gets: 0,
        hits: 0,
        refused: 0,
        elapsed: load.duration,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let part = joined.context("a load task panicked")??;
        total.ops += part.ops;
        total.warmup_ops += part.warmup_ops;
        total.gets += part.gets;
        total.hits += part.hits;
        total.refused += part.refused;
        total
            .latency
            .add(&part.latency)
            .context("merging latency histograms")?;
    }
    super::check_interrupted()?;
    Ok(total)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // Batches are written whole; Nagle would only delay the next one.
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn drive(
    mut stream: TcpStream,
    load: &Load,
    sampler: &KeySampler,
    seed: u64,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<LoadResult> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let value = vec![b'v'; load.value_size];
    let mut out = Vec::with_capacity(load.depth * (load.value_size + load.key_size + 32));
    let mut key = Vec::with_capacity(load.key_size);
    let mut is_get = Vec::with_capacity(load.depth);
    let mut input = Vec::with_capacity(64 * 1024);
    let mut pos = 0;
    let mut r = LoadResult {
        ops: 0,
        warmup_ops: 0,
        gets: 0,
        hits: 0,
        refused: 0,
        elapsed: load.duration,
        latency: new_histogram()?,
    };
    loop {
        let sent = Instant::now();
        if sent >= end || super::interrupted() {
            return Ok(r);
        }
        let measured = sent >= measure_from;
        out.clear();
        is_get.clear();
        for _ in 0..load.depth {
            key.clear();
            write_key(&mut key, sampler.sample(&mut rng), load.key_size);
            let get = rng.random::<f64>() < load.get_ratio;
            if get {
                wire::encode_get(&mut out, &key);
            } else {
                wire::encode_set(&mut out, &key, &value);
            }
            is_get.push(get);
        }
        stream.write_all(&out).await?;
        let mut done = 0;
        let mut now = sent;
        while done < load.depth {
            match wire::parse_pipelined(&input[pos..])? {
                Some((reply, used)) => {
                    pos += used;
                    if !measured {
                        r.warmup_ops += 1;
                    } else {
                        r.ops += 1;
                        r.latency
                            .saturating_record(now.duration_since(sent).as_nanos() as u64);
                        match reply {
                            Reply::Get { hits, .. } => {
                                r.gets += 1;
                                r.hits += u64::from(hits > 0);
                            }
                            Reply::Stored => {}
                            Reply::Refused(_) => r.refused += 1,
                        }
                    }
                    if !matches!(reply, Reply::Refused(_))
                        && matches!(reply, Reply::Get { .. }) != is_get[done]
                    {
                        bail!(
                            "reply {done} of a batch does not match its request: the stream is out of step"
                        );
                    }
                    done += 1;
                }
                None => {
                    if pos == input.len() {
                        input.clear();
                        pos = 0;
                    } else if pos > input.capacity() / 2 {
                        input.drain(..pos);
                        pos = 0;
                    }
                    input.reserve(32 * 1024);
                    if stream.read_buf(&mut input).await? == 0 {
                        bail!("the server closed the connection");
                    }
                    now = Instant::now();
                }
            }
        }
    }
}

/// Stores every key in `0..keys` over `connections` connections, `batch` pipelined sets per
/// write. Returns how many were refused.
pub async fn fill(
    addr: SocketAddr,
    keys: u64,
    key_size: usize,
    value_size: usize,
    connections: usize,
    batch: usize,
) -> anyhow::Result<u64> {
    let connections = connections.max(1) as u64;
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        tasks.spawn(async move {
            let mut stream = connect(addr).await?;
            let value = vec![b'v'; value_size];
            let mut out = Vec::new();
            let mut key = Vec::with_capacity(key_size);
            let mut input = Vec::with_capacity(64 * 1024);
            let mut refused = 0u64;
            let mut next = c;
            while next < keys {
                super::check_interrupted()?;
                out.clear();
                let mut n = 0;
                while n < batch && next < keys {
                    key.clear();
                    write_key(&mut key, next, key_size);
                    wire::encode_set(&mut out, &key, &value);
                    next += connections;
                    n += 1;
                }
                stream.write_all(&out).await?;
                for reply in read_replies(&mut stream, &mut input, n).await? {
                    match reply {
                        Reply::Stored => {}
                        Reply::Refused(_) => refused += 1,
                        Reply::Get { .. } => bail!("a get reply to a set"),
                    }
                }
            }
            anyhow::Ok(refused)
        });
    }
    let mut refused = 0;
    while let Some(joined) = tasks.join_next().await {
        refused += joined.context("a fill task panicked")??;
    }
    Ok(refused)
}

/// Fetches `keys` with multi-key gets of `batch` keys; returns how many were found whole
/// (present with a value of `value_size` bytes).
pub async fn count_present(
    addr: SocketAddr,
    keys: &[u64],
    key_size: usize,
    value_size: usize,
    batch: usize,
) -> anyhow::Result<u64> {
    let mut stream = connect(addr).await?;
    let mut input = Vec::with_capacity(64 * 1024);
    let mut out = Vec::new();
    let mut found = 0;
    for chunk in keys.chunks(batch.max(1)) {
        super::check_interrupted()?;
        let names: Vec<Vec<u8>> = chunk
            .iter()
            .map(|&k| {
                let mut key = Vec::with_capacity(key_size);
                write_key(&mut key, k, key_size);
                key
            })
            .collect();
        out.clear();
        wire::encode_multi_get(&mut out, names.iter().map(Vec::as_slice));
        stream.write_all(&out).await?;
        for reply in read_replies(&mut stream, &mut input, 1).await? {
            if let Reply::Get { hits, value_bytes } = reply {
                if value_bytes == hits as usize * value_size {
                    found += u64::from(hits);
                }
            } else {
                bail!("unexpected reply to a get: {reply:?}");
            }
        }
    }
    Ok(found)
}

/// Reads exactly `n` replies.
async fn read_replies(
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
    n: usize,
) -> anyhow::Result<Vec<Reply>> {
    let mut replies = Vec::with_capacity(n);
    let mut pos = 0;
    while replies.len() < n {
        match wire::parse_pipelined(&input[pos..])? {
            Some((reply, used)) => {
                pos += used;
                replies.push(reply);
            }
            None => {
                input.reserve(32 * 1024);
                if stream.read_buf(input).await? == 0 {
                    bail!("the server closed the connection");
                }
            }
        }
    }
    input.drain(..pos);
    Ok(replies)
}
