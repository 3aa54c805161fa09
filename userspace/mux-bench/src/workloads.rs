//! The four workloads, each against one system's [`Opener`].
//!
//! All check what is cheap to check: the sink's byte count, the echoed
//! byte, the idle reply, and that every stream ends with a clean EOF.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::system::{
    active_server_streams, BoxedStream, Opener, CMD_ECHO, CMD_IDLE, CMD_SINK, IDLE_REPLY,
};

/// MB in the throughput numbers: 10^6 bytes.
const MB: f64 = 1e6;

/// Workload sizes.
#[derive(Clone, Debug, Serialize)]
pub struct Sizes {
    /// a: bytes sent on the single stream.
    pub single_bytes: u64,
    /// a, b: size of each write.
    pub write_size: usize,
    /// a, b: runs; the best one is reported.
    pub repeats: usize,
    /// b: concurrent streams.
    pub agg_streams: usize,
    /// b: bytes sent on each stream.
    pub agg_bytes: u64,
    /// c: untimed warm-up iterations.
    pub latency_warmup: usize,
    /// c: timed iterations.
    pub latency_iters: usize,
    /// d: idle streams to open (plain-tcp may get fewer, see the output).
    pub idle_streams: usize,
    /// d: streams being opened or closed at once.
    pub idle_parallel: usize,
}

impl Sizes {
    /// The full run.
    pub fn full() -> Self {
        Sizes {
            single_bytes: 512 << 20,
            write_size: 64 << 10,
            repeats: 3,
            agg_streams: 100,
            agg_bytes: 8 << 20,
            latency_warmup: 100,
            latency_iters: 2000,
            idle_streams: 10_000,
            idle_parallel: 64,
        }
    }

    /// A CI-sized smoke run.
    pub fn quick() -> Self {
        Sizes {
            single_bytes: 64 << 20,
            write_size: 64 << 10,
            repeats: 1,
            agg_streams: 100,
            agg_bytes: 1 << 20,
            latency_warmup: 50,
            latency_iters: 500,
            idle_streams: 2000,
            idle_parallel: 64,
        }
    }
}

/// A throughput result.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Best run, MB/s (10^6 bytes per second).
    pub mb_per_s: f64,
    /// Median run, MB/s (steadier than the best: in one process, where
    /// tokio places the two ends' tasks changes loopback TCP a lot).
    pub median_mb_per_s: f64,
    /// Every run, MB/s.
    pub runs_mb_per_s: Vec<f64>,
    /// Bytes per run, all streams together (the command byte excluded).
    pub bytes_per_run: u64,
    /// Streams per run.
    pub streams: usize,
}

impl Throughput {
    /// Best and median of `runs` (MB/s each; at least one).
    fn from_runs(runs: Vec<f64>, bytes_per_run: u64, streams: usize) -> Self {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        Throughput {
            mb_per_s: sorted.last().copied().unwrap_or(0.0),
            median_mb_per_s: median(&sorted),
            runs_mb_per_s: runs,
            bytes_per_run,
            streams,
        }
    }
}

/// The median of sorted values (0 for none).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// An open + first byte latency result.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Median, µs.
    pub median_us: f64,
    /// 99th percentile (nearest rank), µs.
    pub p99_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Fastest, µs.
    pub min_us: f64,
    /// Timed iterations.
    pub iterations: usize,
}

/// An idle-stream memory result.
#[derive(Clone, Debug, Serialize)]
pub struct IdleMemory {
    /// Streams held open at the measurement.
    pub streams: usize,
    /// Streams asked for.
    pub requested: usize,
    /// Why fewer were opened than asked, if so.
    pub limited_by: Option<String>,
    /// Process RSS before opening, KiB.
    pub rss_before_kib: u64,
    /// Process RSS with all streams open, KiB.
    pub rss_after_kib: u64,
    /// (after - before) / streams, KiB: client and server end together.
    pub kib_per_stream: f64,
    /// Time to open them all, s.
    pub open_secs: f64,
    /// Time to close them all (both ends), s.
    pub close_secs: f64,
}

/// The data every throughput write sends (a non-constant pattern).
fn payload(size: usize) -> Arc<[u8]> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// Reads until EOF; fails if any byte comes.
async fn expect_eof(stream: &mut BoxedStream, what: &str) -> anyhow::Result<()> {
    let mut rest = [0u8; 64];
    let n = stream
        .read(&mut rest)
        .await
        .with_context(|| format!("reading the end of the {what} stream"))?;
    ensure!(n == 0, "{n} unexpected bytes after the {what} reply");
    Ok(())
}

/// One sink transfer: opens a stream, sends `bytes` in writes of
/// `payload.len()`, shuts down, checks the server's count and the EOF.
async fn sink_once(opener: &dyn Opener, bytes: u64, payload: &[u8]) -> anyhow::Result<()> {
    let mut s = opener.open().await.context("opening the stream")?;
    s.write_all(&[CMD_SINK])
        .await
        .context("writing the sink command")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(payload.len() as u64) as usize;
        s.write_all(&payload[..n])
            .await
            .with_context(|| format!("writing data ({} of {bytes} bytes sent)", bytes - left))?;
        left -= n as u64;
    }
    s.flush().await.context("flushing")?;
    s.shutdown().await.context("shutting down the write side")?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .await
        .context("reading the server's byte count")?;
    let count = u64::from_be_bytes(count);
    ensure!(
        count == bytes,
        "server counted {count} bytes, {bytes} were sent"
    );
    expect_eof(&mut s, "sink").await
}

/// a. One stream sinking `single_bytes`; best of `repeats`.
pub async fn single_stream(opener: Arc<dyn Opener>, sizes: &Sizes) -> anyhow::Result<Throughput> {
    let data = payload(sizes.write_size);
    let mut runs = Vec::new();
    for run in 1..=sizes.repeats {
        let start = Instant::now();
        sink_once(&*opener, sizes.single_bytes, &data)
            .await
            .with_context(|| format!("single-stream run {run}"))?;
        runs.push(sizes.single_bytes as f64 / MB / start.elapsed().as_secs_f64());
    }
    Ok(Throughput::from_runs(runs, sizes.single_bytes, 1))
}

/// b. `agg_streams` concurrent streams each sinking `agg_bytes`, each on
/// its own task; wall time from the first open to the last count; best of
/// `repeats`.
pub async fn aggregate(opener: Arc<dyn Opener>, sizes: &Sizes) -> anyhow::Result<Throughput> {
    let data = payload(sizes.write_size);
    let total = sizes.agg_bytes * sizes.agg_streams as u64;
    let mut runs = Vec::new();
    for run in 1..=sizes.repeats {
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for i in 0..sizes.agg_streams {
            let opener = opener.clone();
            let data = data.clone();
            let bytes = sizes.agg_bytes;
            tasks.spawn(async move {
                sink_once(&*opener, bytes, &data)
                    .await
                    .with_context(|| format!("stream {i}"))
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined
                .context("a stream's task panicked")?
                .with_context(|| format!("aggregate run {run}"))?;
        }
        runs.push(total as f64 / MB / start.elapsed().as_secs_f64());
    }
    Ok(Throughput::from_runs(runs, total, sizes.agg_streams))
}

/// The byte echoed in the latency test.
const PROBE: u8 = 0x5a;

/// One open + first byte: returns the time from `open()` until the echoed
/// byte is read. Then closes gracefully (untimed): shutdown, read EOF.
async fn open_first_byte(opener: &dyn Opener) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = opener.open().await.context("opening the stream")?;
    s.write_all(&[CMD_ECHO, PROBE])
        .await
        .context("writing the echo command and byte")?;
    s.flush().await.context("flushing")?;
    let mut echoed = [0u8; 1];
    s.read_exact(&mut echoed)
        .await
        .context("reading the echoed byte")?;
    let took = start.elapsed();
    ensure!(
        echoed[0] == PROBE,
        "echo sent back {:#04x}, not {PROBE:#04x}",
        echoed[0]
    );
    s.shutdown().await.context("shutting down the write side")?;
    expect_eof(&mut s, "echo").await?;
    Ok(took)
}

/// c. Open + first byte, `latency_warmup` untimed then `latency_iters`
/// timed iterations, one after the other.
pub async fn latency(opener: Arc<dyn Opener>, sizes: &Sizes) -> anyhow::Result<Latency> {
    ensure!(sizes.latency_iters > 0, "no latency iterations asked for");
    for i in 0..sizes.latency_warmup {
        open_first_byte(&*opener)
            .await
            .with_context(|| format!("warm-up iteration {i}"))?;
    }
    let mut us = Vec::with_capacity(sizes.latency_iters);
    for i in 0..sizes.latency_iters {
        let took = open_first_byte(&*opener)
            .await
            .with_context(|| format!("iteration {i}"))?;
        us.push(took.as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let n = us.len();
    // Nearest rank: the smallest value with at least 99% at or below it.
    let p99 = us[(n * 99).div_ceil(100) - 1];
    Ok(Latency {
        median_us: median(&us),
        p99_us: p99,
        mean_us: us.iter().sum::<f64>() / n as f64,
        min_us: us[0],
        iterations: n,
    })
}

/// Opens one idle stream and waits for the server's reply, so both ends
/// have set it up.
async fn open_idle(opener: &dyn Opener) -> anyhow::Result<BoxedStream> {
    let mut s = opener.open().await.context("opening the stream")?;
    s.write_all(&[CMD_IDLE])
        .await
        .context("writing the idle command")?;
    s.flush().await.context("flushing")?;
    let mut reply = [0u8; 1];
    s.read_exact(&mut reply)
        .await
        .context("reading the idle reply")?;
    ensure!(
        reply[0] == IDLE_REPLY,
        "idle reply was {:#04x}, not {IDLE_REPLY:#04x}",
        reply[0]
    );
    Ok(s)
}

/// Closes one idle stream gracefully: shutdown, then the server's EOF.
async fn close_idle(mut s: BoxedStream) -> anyhow::Result<()> {
    s.shutdown().await.context("shutting down the write side")?;
    expect_eof(&mut s, "idle").await
}

/// Waits until the number of server streams being served is `target`.
async fn wait_server_streams(target: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let now = active_server_streams();
        if now == target {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{now} server streams still active after {within:?}, expected {target}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// d. Memory per idle stream: opens `count` idle streams
/// (`sizes.idle_parallel` at a time), measures the process RSS before and
/// after (both ends live in this process), then closes them all.
/// `limited_by` says why `count` is below `sizes.idle_streams`, if it is.
pub async fn idle_memory(
    opener: Arc<dyn Opener>,
    sizes: &Sizes,
    count: usize,
    limited_by: Option<String>,
) -> anyhow::Result<IdleMemory> {
    ensure!(count > 0, "no idle streams can be opened");
    // Streams of the earlier workloads are all closed by now.
    wait_server_streams(0, Duration::from_secs(10))
        .await
        .context("before opening the idle streams")?;
    let rss_before = crate::mem::rss_after_trim().context("reading the RSS before")?;

    let start = Instant::now();
    let streams: Vec<BoxedStream> = stream::iter(0..count)
        .map(|i| {
            let opener = opener.clone();
            async move {
                open_idle(&*opener)
                    .await
                    .with_context(|| format!("idle stream {i}"))
            }
        })
        .buffer_unordered(sizes.idle_parallel.max(1))
        .try_collect()
        .await?;
    let open_secs = start.elapsed().as_secs_f64();
    ensure!(
        active_server_streams() == count,
        "{} server streams are active with {count} idle streams open",
        active_server_streams()
    );
    let rss_after = crate::mem::rss_after_trim().context("reading the RSS after")?;

    let start = Instant::now();
    stream::iter(streams.into_iter().enumerate())
        .map(|(i, s)| async move {
            close_idle(s)
                .await
                .with_context(|| format!("closing idle stream {i}"))
        })
        .buffer_unordered(sizes.idle_parallel.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    wait_server_streams(0, Duration::from_secs(30))
        .await
        .context("after closing the idle streams")?;
    let close_secs = start.elapsed().as_secs_f64();

    Ok(IdleMemory {
        streams: count,
        requested: sizes.idle_streams,
        limited_by,
        rss_before_kib: rss_before >> 10,
        rss_after_kib: rss_after >> 10,
        kib_per_stream: (rss_after as f64 - rss_before as f64) / 1024.0 / count as f64,
        open_secs,
        close_secs,
    })
}
