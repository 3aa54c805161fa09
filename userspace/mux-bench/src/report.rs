//! Results: what is collected per system, and its rendering as tables or
//! JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::mem::FdLimit;
use crate::workloads::{IdleMemory, Latency, Sizes, Throughput};

/// One workload's outcome on one system.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome<T> {
    /// Not run (the system was skipped or failed to start).
    NotRun,
    /// The result.
    Ok(T),
    /// What failed, with its context chain.
    Error(String),
}

impl<T> Outcome<T> {
    /// The result, if there is one.
    pub fn ok(&self) -> Option<&T> {
        match self {
            Outcome::Ok(v) => Some(v),
            _ => None,
        }
    }
}

/// Whether a system ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Started; see the workloads.
    Ran,
    /// `start()` returned `None`: not built in.
    Skipped,
    /// `start()` failed.
    StartFailed,
}

/// Everything measured on one system.
#[derive(Clone, Debug, Serialize)]
pub struct SystemReport {
    /// The system's name.
    pub name: String,
    /// Whether it ran.
    pub status: Status,
    /// Why it did not start, if so.
    pub start_error: Option<String>,
    /// Its settings, as reported by the system's module (a JSON object).
    #[serde(serialize_with = "as_map")]
    pub settings: Vec<(String, String)>,
    /// a. single-stream throughput.
    pub single_stream: Outcome<Throughput>,
    /// b. aggregate throughput of concurrent streams.
    pub aggregate: Outcome<Throughput>,
    /// c. open + first byte latency.
    pub open_first_byte: Outcome<Latency>,
    /// d. memory per idle stream.
    pub idle_memory: Outcome<IdleMemory>,
    /// Server-side streams that ended with an error during this system's
    /// workloads (expected: 0).
    pub server_stream_errors: u64,
    /// Ratios to plain-tcp (filled by [`Report::compute_ratios`]).
    pub vs_plain_tcp: Ratios,
}

/// A system's numbers divided by plain-tcp's (`None`: either is missing).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratios {
    /// a. best MB/s ÷ plain-tcp's.
    pub single_stream: Option<f64>,
    /// a. median MB/s ÷ plain-tcp's.
    pub single_stream_median: Option<f64>,
    /// b. best MB/s ÷ plain-tcp's.
    pub aggregate: Option<f64>,
    /// b. median MB/s ÷ plain-tcp's.
    pub aggregate_median: Option<f64>,
    /// c. median ÷ plain-tcp's.
    pub open_first_byte_median: Option<f64>,
    /// c. p99 ÷ plain-tcp's.
    pub open_first_byte_p99: Option<f64>,
}

/// Serialises `(key, value)` pairs as a map, keeping their order.
fn as_map<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

impl SystemReport {
    /// A report with nothing run yet.
    pub fn new(name: &str, settings: Vec<(&'static str, String)>) -> Self {
        SystemReport {
            name: name.to_string(),
            status: Status::Ran,
            start_error: None,
            settings: settings
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            single_stream: Outcome::NotRun,
            aggregate: Outcome::NotRun,
            open_first_byte: Outcome::NotRun,
            idle_memory: Outcome::NotRun,
            server_stream_errors: 0,
            vs_plain_tcp: Ratios::default(),
        }
    }

    /// Whether something failed (a skipped system is no failure).
    pub fn failed(&self) -> bool {
        self.status == Status::StartFailed
            || matches!(self.single_stream, Outcome::Error(_))
            || matches!(self.aggregate, Outcome::Error(_))
            || matches!(self.open_first_byte, Outcome::Error(_))
            || matches!(self.idle_memory, Outcome::Error(_))
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where and how it ran.
    pub environment: String,
    /// The sizes used.
    pub sizes: Sizes,
    /// The open-file limit.
    pub fd_limit: FdLimit,
    /// Per system, in run order.
    pub systems: Vec<SystemReport>,
    /// Caveats that apply to the numbers.
    pub notes: Vec<String>,
    /// Wall time of the whole run, s.
    pub total_secs: f64,
}

/// Name of the baseline system for ratios.
const BASELINE: &str = crate::plain::NAME;

/// `value / base` when both exist.
fn div(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

impl Report {
    /// Fills every system's [`SystemReport::vs_plain_tcp`].
    pub fn compute_ratios(&mut self) {
        let base = self.systems.iter().find(|s| s.name == BASELINE);
        let single = base.and_then(|b| b.single_stream.ok()).cloned();
        let aggregate = base.and_then(|b| b.aggregate.ok()).cloned();
        let latency = base.and_then(|b| b.open_first_byte.ok());
        let median = latency.map(|l| l.median_us);
        let p99 = latency.map(|l| l.p99_us);
        for sys in &mut self.systems {
            let lat = sys.open_first_byte.ok();
            let (s, a) = (sys.single_stream.ok(), sys.aggregate.ok());
            sys.vs_plain_tcp = Ratios {
                single_stream: div(s.map(|t| t.mb_per_s), single.as_ref().map(|t| t.mb_per_s)),
                single_stream_median: div(
                    s.map(|t| t.median_mb_per_s),
                    single.as_ref().map(|t| t.median_mb_per_s),
                ),
                aggregate: div(
                    a.map(|t| t.mb_per_s),
                    aggregate.as_ref().map(|t| t.mb_per_s),
                ),
                aggregate_median: div(
                    a.map(|t| t.median_mb_per_s),
                    aggregate.as_ref().map(|t| t.median_mb_per_s),
                ),
                open_first_byte_median: div(lat.map(|l| l.median_us), median),
                open_first_byte_p99: div(lat.map(|l| l.p99_us), p99),
            };
        }
    }
}

/// "2.50x", or "-" without a baseline.
fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}x", value / b),
        _ => "-".to_string(),
    }
}

/// How a row without a value reads.
fn missing<T>(sys: &SystemReport, outcome: &Outcome<T>) -> String {
    match (sys.status, outcome) {
        (Status::Skipped, _) => "skipped (not built in)".to_string(),
        (Status::StartFailed, _) => format!(
            "FAILED to start: {}",
            sys.start_error.as_deref().unwrap_or("?")
        ),
        (_, Outcome::Error(e)) => format!("FAILED: {e}"),
        _ => "not run".to_string(),
    }
}

/// Byte count as MiB or KiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// One throughput table.
fn throughput_table(
    out: &mut String,
    report: &Report,
    title: &str,
    get: fn(&SystemReport) -> &Outcome<Throughput>,
) {
    let base = report
        .systems
        .iter()
        .find(|s| s.name == BASELINE)
        .and_then(|s| get(s).ok())
        .map(|t| (t.mb_per_s, t.median_mb_per_s));
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "  {:<10} {:>10} {:>10}  {:>10} {:>12}  runs (MB/s)",
        "system", "best MB/s", "median", "best/plain", "median/plain"
    );
    for sys in &report.systems {
        match get(sys).ok() {
            Some(t) => {
                let runs: Vec<String> = t.runs_mb_per_s.iter().map(|r| format!("{r:.0}")).collect();
                let _ = writeln!(
                    out,
                    "  {:<10} {:>10.1} {:>10.1}  {:>10} {:>12}  {}",
                    sys.name,
                    t.mb_per_s,
                    t.median_mb_per_s,
                    ratio(t.mb_per_s, base.map(|b| b.0)),
                    ratio(t.median_mb_per_s, base.map(|b| b.1)),
                    runs.join(" ")
                );
            }
            None => {
                let _ = writeln!(out, "  {:<10} {}", sys.name, missing(sys, get(sys)));
            }
        }
    }
    let _ = writeln!(out);
}

/// The report as readable tables.
pub fn render(report: &Report) -> String {
    let s = &report.sizes;
    let mut out = String::new();
    let _ = writeln!(out, "tpbpf-tunnel-bench: {}", report.environment);
    let _ = writeln!(out);
    throughput_table(
        &mut out,
        report,
        &format!(
            "a. single-stream throughput: 1 stream, {} in {} writes, best of {} (MB = 10^6 bytes)",
            size(s.single_bytes),
            size(s.write_size as u64),
            s.repeats
        ),
        |r| &r.single_stream,
    );
    throughput_table(
        &mut out,
        report,
        &format!(
            "b. aggregate throughput: {} concurrent streams × {}, total, best of {}",
            s.agg_streams,
            size(s.agg_bytes),
            s.repeats
        ),
        |r| &r.aggregate,
    );

    let base = report
        .systems
        .iter()
        .find(|r| r.name == BASELINE)
        .and_then(|r| r.open_first_byte.ok())
        .map(|l| (l.median_us, l.p99_us));
    let _ = writeln!(
        out,
        "c. open + first byte (open, write 'E'+1 byte, read it back): {} iterations after {} warm-up, µs (plain-tcp: connect + echo)",
        s.latency_iters, s.latency_warmup
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9}  {:>12} {:>12}",
        "system", "median", "p99", "min", "median/plain", "p99/plain"
    );
    for sys in &report.systems {
        match sys.open_first_byte.ok() {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "  {:<10} {:>9.1} {:>9.1} {:>9.1}  {:>12} {:>12}",
                    sys.name,
                    l.median_us,
                    l.p99_us,
                    l.min_us,
                    ratio(l.median_us, base.map(|b| b.0)),
                    ratio(l.p99_us, base.map(|b| b.1)),
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {:<10} {}",
                    sys.name,
                    missing(sys, &sys.open_first_byte)
                );
            }
        }
    }
    let _ = writeln!(out);

    let _ = writeln!(
        out,
        "d. memory per idle stream: {} streams asked for, RSS of the whole process (BOTH ends of every stream are in this process)",
        s.idle_streams
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>8} {:>11} {:>11} {:>11}  {:>7} {:>7}",
        "system", "streams", "KiB/stream", "RSS before", "RSS after", "open s", "close s"
    );
    for sys in &report.systems {
        match sys.idle_memory.ok() {
            Some(m) => {
                let _ = writeln!(
                    out,
                    "  {:<10} {:>8} {:>11.2} {:>7} MiB {:>7} MiB  {:>7.2} {:>7.2}",
                    sys.name,
                    m.streams,
                    m.kib_per_stream,
                    m.rss_before_kib >> 10,
                    m.rss_after_kib >> 10,
                    m.open_secs,
                    m.close_secs,
                );
                if let Some(why) = &m.limited_by {
                    let _ = writeln!(
                        out,
                        "  {:<10} only {} of {} streams: {why}",
                        "", m.streams, m.requested
                    );
                }
            }
            None => {
                let _ = writeln!(out, "  {:<10} {}", sys.name, missing(sys, &sys.idle_memory));
            }
        }
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "settings:");
    for sys in &report.systems {
        if sys.status != Status::Ran {
            continue;
        }
        let settings: Vec<String> = sys
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "  {:<10} {}; server-side stream errors: {}",
            sys.name,
            settings.join(", "),
            sys.server_stream_errors
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "notes:");
    for note in &report.notes {
        let _ = writeln!(out, "  - {note}");
    }
    let _ = writeln!(out, "total time: {:.1} s", report.total_secs);
    out
}
