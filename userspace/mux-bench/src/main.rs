//! `tpbpf-tunnel-bench`: compares stream multiplexers on loopback, all in
//! one process (tokio multi-thread runtime, 2 worker threads): plain TCP
//! (a connection per stream), yamux and h2 over one TCP connection, and
//! tpbpf's own mux once `tpbpf.rs` is filled in.
//!
//! Every system serves its streams with the same
//! [`system::serve_stream`]; the workloads ([`workloads`]) only see an
//! [`system::Opener`]. To add a system, write a module with
//! `pub async fn start() -> anyhow::Result<Option<System>>` and list it in
//! [`starters`].

mod h2_sys;
mod mem;
mod plain;
mod report;
mod system;
mod tpbpf;
mod workloads;
mod yamux_sys;

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;

use crate::mem::FdLimit;
use crate::report::{Outcome, Report, Status, SystemReport};
use crate::system::{server_stream_errors, Starter, System};
use crate::workloads::Sizes;

/// Compare stream multiplexers (plain TCP, yamux, h2, tpbpf) on loopback.
#[derive(Parser, Debug)]
#[command(name = "tpbpf-tunnel-bench", version)]
struct Args {
    /// CI-sized smoke run (well under 20 s): smaller transfers, fewer
    /// iterations, 2,000 idle streams.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout instead of tables (progress
    /// stays on stderr).
    #[arg(long)]
    json: bool,
    /// Run only these systems (comma separated: plain-tcp,yamux,h2,tpbpf).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// a: MiB sent on the single stream [full: 512, quick: 64].
    #[arg(long)]
    single_mib: Option<u64>,
    /// a, b: runs, best reported [full: 3, quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// b: concurrent streams [100].
    #[arg(long)]
    agg_streams: Option<usize>,
    /// b: KiB sent per stream [full: 8192, quick: 1024].
    #[arg(long)]
    agg_kib: Option<u64>,
    /// c: timed iterations [full: 2000, quick: 500].
    #[arg(long)]
    latency_iters: Option<usize>,
    /// c: warm-up iterations [full: 100, quick: 50].
    #[arg(long)]
    latency_warmup: Option<usize>,
    /// d: idle streams [full: 10000, quick: 2000].
    #[arg(long)]
    idle_streams: Option<usize>,
}

impl Args {
    /// The sizes: the preset, with any explicit flag on top.
    fn sizes(&self) -> anyhow::Result<Sizes> {
        let mut s = if self.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        };
        if let Some(v) = self.single_mib {
            s.single_bytes = v << 20;
        }
        if let Some(v) = self.repeats {
            s.repeats = v;
        }
        if let Some(v) = self.agg_streams {
            s.agg_streams = v;
        }
        if let Some(v) = self.agg_kib {
            s.agg_bytes = v << 10;
        }
        if let Some(v) = self.latency_iters {
            s.latency_iters = v;
        }
        if let Some(v) = self.latency_warmup {
            s.latency_warmup = v;
        }
        if let Some(v) = self.idle_streams {
            s.idle_streams = v;
        }
        ensure!(s.repeats >= 1, "--repeats must be at least 1");
        ensure!(s.agg_streams >= 1, "--agg-streams must be at least 1");
        ensure!(s.latency_iters >= 1, "--latency-iters must be at least 1");
        ensure!(s.idle_streams >= 1, "--idle-streams must be at least 1");
        Ok(s)
    }
}

/// The systems, in run order. A new system is one more entry here.
fn starters() -> Vec<Starter> {
    vec![
        Starter {
            name: plain::NAME,
            start: || Box::pin(plain::start()),
            settings: plain::settings,
        },
        Starter {
            name: yamux_sys::NAME,
            start: || Box::pin(yamux_sys::start()),
            settings: yamux_sys::settings,
        },
        Starter {
            name: h2_sys::NAME,
            start: || Box::pin(h2_sys::start()),
            settings: h2_sys::settings,
        },
        Starter {
            name: tpbpf::NAME,
            start: || Box::pin(tpbpf::start()),
            settings: tpbpf::settings,
        },
        Starter {
            name: tpbpf::NAME_TLS,
            start: || Box::pin(tpbpf::start_tls()),
            settings: tpbpf::settings_tls,
        },
    ]
}

/// Time limits, so that a hung system fails its workload instead of the run.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(180);

/// File descriptors kept free for everything but plain-tcp's idle streams.
const FD_MARGIN: u64 = 128;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: building the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some workloads failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every selected system; returns whether all went well.
async fn run(args: Args) -> anyhow::Result<bool> {
    let sizes = args.sizes()?;
    let all = starters();
    for name in &args.systems {
        if !all.iter().any(|s| s.name == name) {
            let known: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("unknown system {name:?} (known: {})", known.join(", "));
        }
    }
    let fd_limit = mem::raise_nofile().context("raising the open-file limit")?;
    let started = Instant::now();
    let mut systems = Vec::new();
    for starter in &all {
        if !args.systems.is_empty() && !args.systems.iter().any(|s| s == starter.name) {
            continue;
        }
        systems.push(run_system(starter, &sizes, &fd_limit).await);
    }
    let mut notes = vec![
        "both ends of every stream run in this process, on the same 2 worker threads: throughput and latency include the server's work".to_string(),
        "d: KiB/stream = (RSS with the streams open - RSS before) / streams, after glibc malloc_trim(0) each time; it covers client + server ends, and for plain-tcp excludes kernel socket memory (not in RSS)".to_string(),
        "c: the close after each iteration (shutdown, wait for EOF) is not timed".to_string(),
    ];
    if let Some(e) = &fd_limit.raise_error {
        notes.push(format!("could not raise RLIMIT_NOFILE soft to hard: {e}"));
    }
    let mut report = Report {
        environment: format!(
            "loopback 127.0.0.1, one process, tokio multi-thread runtime with 2 worker threads, {} CPUs, RLIMIT_NOFILE {} (hard {})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            fd_limit.soft,
            fd_limit.hard
        ),
        sizes,
        fd_limit,
        systems,
        notes,
        total_secs: started.elapsed().as_secs_f64(),
    };
    report.compute_ratios();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising the report")?
        );
    } else {
        print!("{}", report::render(&report));
    }
    Ok(!report.systems.iter().any(SystemReport::failed))
}

/// Runs `fut` with a time limit, printing progress on stderr.
async fn step<T, F>(system: &str, what: &str, fut: F, show: fn(&T) -> String) -> Outcome<T>
where
    F: Future<Output = anyhow::Result<T>>,
{
    eprintln!("[{system}] {what} ...");
    let started = Instant::now();
    let result = match tokio::time::timeout(WORKLOAD_TIMEOUT, fut).await {
        Ok(r) => r.with_context(|| format!("{system}: {what}")),
        Err(_) => Err(anyhow::anyhow!(
            "{system}: {what}: timed out after {WORKLOAD_TIMEOUT:?}"
        )),
    };
    match result {
        Ok(v) => {
            eprintln!(
                "[{system}] {what}: {} ({:.1} s)",
                show(&v),
                started.elapsed().as_secs_f64()
            );
            Outcome::Ok(v)
        }
        Err(e) => {
            let e = format!("{e:#}");
            eprintln!("[{system}] {what}: FAILED: {e}");
            Outcome::Error(e)
        }
    }
}

/// How many idle streams the system can hold: plain-tcp needs 2 fds per
/// stream (both ends in this process), the muxes none.
fn idle_count(
    system: &str,
    sizes: &Sizes,
    fd_limit: &FdLimit,
) -> anyhow::Result<(usize, Option<String>)> {
    let wanted = sizes.idle_streams;
    if system != plain::NAME {
        return Ok((wanted, None));
    }
    let open = mem::open_fds()? as u64;
    let fit = fd_limit.soft.saturating_sub(open + FD_MARGIN) / 2;
    if fit >= wanted as u64 {
        return Ok((wanted, None));
    }
    Ok((
        fit as usize,
        Some(format!(
            "RLIMIT_NOFILE is {} (hard {}, soft raised to it), {open} fds already open, {FD_MARGIN} kept free, 2 fds per stream (both ends in this process)",
            fd_limit.soft, fd_limit.hard
        )),
    ))
}

/// Starts one system and runs the four workloads on it.
async fn run_system(starter: &Starter, sizes: &Sizes, fd_limit: &FdLimit) -> SystemReport {
    let name = starter.name;
    let mut rep = SystemReport::new(name, (starter.settings)());
    let started = match tokio::time::timeout(START_TIMEOUT, (starter.start)()).await {
        Ok(r) => r.with_context(|| format!("starting {name}")),
        Err(_) => Err(anyhow::anyhow!(
            "starting {name}: timed out after {START_TIMEOUT:?}"
        )),
    };
    let system = match started {
        Ok(Some(system)) => system,
        Ok(None) => {
            eprintln!("{name}: skipped (not built in)");
            rep.status = Status::Skipped;
            return rep;
        }
        Err(e) => {
            eprintln!("[{name}] FAILED to start: {e:#}");
            rep.status = Status::StartFailed;
            rep.start_error = Some(format!("{e:#}"));
            return rep;
        }
    };
    let System {
        name,
        opener,
        guard,
    } = system;
    rep.name = name.to_string();
    let errors_before = server_stream_errors();

    rep.single_stream = step(
        name,
        "a. single-stream throughput",
        workloads::single_stream(opener.clone(), sizes),
        |t| format!("{:.1} MB/s", t.mb_per_s),
    )
    .await;
    rep.aggregate = step(
        name,
        "b. aggregate throughput",
        workloads::aggregate(opener.clone(), sizes),
        |t| format!("{:.1} MB/s", t.mb_per_s),
    )
    .await;
    rep.open_first_byte = step(
        name,
        "c. open + first byte",
        workloads::latency(opener.clone(), sizes),
        |l| format!("median {:.1} µs, p99 {:.1} µs", l.median_us, l.p99_us),
    )
    .await;
    rep.idle_memory = step(
        name,
        "d. memory per idle stream",
        async {
            let (count, limited_by) = idle_count(name, sizes, fd_limit)?;
            if let Some(why) = &limited_by {
                eprintln!(
                    "[{name}] d: only {count} of {} streams: {why}",
                    sizes.idle_streams
                );
            }
            workloads::idle_memory(opener.clone(), sizes, count, limited_by).await
        },
        |m| {
            format!(
                "{:.2} KiB/stream over {} streams",
                m.kib_per_stream, m.streams
            )
        },
    )
    .await;

    rep.server_stream_errors = server_stream_errors() - errors_before;
    drop(opener);
    // Stops the system's server and connection tasks.
    drop(guard);
    // Let the aborted tasks and their sockets go before the next system.
    tokio::time::sleep(Duration::from_millis(100)).await;
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny sizes: every code path, in well under a second per system.
    fn tiny() -> Sizes {
        Sizes {
            single_bytes: 1 << 20,
            write_size: 64 << 10,
            repeats: 1,
            agg_streams: 8,
            agg_bytes: 100_000,
            latency_warmup: 2,
            latency_iters: 10,
            idle_streams: 50,
            idle_parallel: 8,
        }
    }

    /// One test on purpose: the server-stream counter is process-wide.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_system_passes_every_workload() {
        let sizes = tiny();
        let fd_limit = mem::raise_nofile().expect("RLIMIT_NOFILE");
        for starter in &starters() {
            let rep = run_system(starter, &sizes, &fd_limit).await;
            assert!(!rep.failed(), "{}: {rep:#?}", starter.name);
            assert_eq!(rep.server_stream_errors, 0, "{}", starter.name);
            if rep.status == Status::Ran {
                let t = rep.single_stream.ok().expect("single-stream result");
                assert!(t.mb_per_s > 0.0);
                let m = rep.idle_memory.ok().expect("idle result");
                assert_eq!(m.streams, 50);
            }
        }
    }
}
