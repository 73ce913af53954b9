//! Sourced's benchmark: durable commands over HTTP against an in-process server, next to an
//! HTTP floor (the same load against trivial axum handlers) and a raw SQLite ceiling (the same
//! rows written with rusqlite in batches of the size Sourced reached), printed as Markdown.
//!
//! Everything runs in one process on one tokio multi-thread runtime (built as the `sourced`
//! binary builds it), so the load generator and the server share the machine's cores, for
//! Sourced and for the floor alike. Each concurrency level gets a fresh database.

#![warn(missing_docs)]

mod auth;
mod ceiling;
mod cpu;
mod domain;
mod floor;
mod load;
mod postgres;
mod read;
mod workload;
mod ws;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};

pub use auth::{AuthOptions, AuthReport, AuthRow, AuthScheme, VerifyCost, run_auth};
pub use ceiling::CeilingMeasure;
pub use domain::{DomainOptions, PathMeasure, run_domain};
pub use postgres::{PgOptions, PgReport, PgRow, PlainMeasure, run_postgres};
pub use read::{ReadOptions, run_read};
pub use ws::{LatencyRow, WsCase, WsRow, default_cases as default_ws_cases};

/// Most clients one level may run.
pub const CLIENTS_MAX: usize = 1_024;
/// Longest warm-up or measured window.
pub const DURATION_MAX: Duration = Duration::from_secs(3_600);

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// The concurrency levels: clients, each with its own connection and task.
    pub clients: Vec<usize>,
    /// The measured window of each run.
    pub duration: Duration,
    /// The warm-up before each measured window.
    pub warmup: Duration,
    /// The WebSocket command cases (connections × commands in flight).
    pub ws_cases: Vec<WsCase>,
    /// The subscription latency cases: subscribers.
    pub subscribers: Vec<usize>,
    /// The subscription latency cases' write rate, commands per second, instead of half of the
    /// highest WebSocket rate measured (the WebSocket command cases are then skipped).
    pub latency_rate: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clients: vec![1, 16, 64],
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            ws_cases: ws::default_cases(),
            subscribers: vec![1, 100],
            latency_rate: None,
        }
    }
}

impl Options {
    /// A tiny run that only shows the whole path works: 1 client, 0.3 s per measurement;
    /// WebSocket: 1 connection pipelining 1 and 16, 4 connections; 1 and 4 subscribers.
    pub fn smoke() -> Options {
        Options {
            clients: vec![1],
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            ws_cases: [(1, 1), (1, 16), (4, 1)]
                .map(|(connections, pipeline)| WsCase { connections, pipeline })
                .to_vec(),
            subscribers: vec![1, 4],
            latency_rate: None,
        }
    }

    /// Checks every setting, reporting all problems together.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.clients.is_empty() && self.ws_cases.is_empty() && self.subscribers.is_empty() {
            problems.push("nothing to run: no HTTP levels, no WebSocket cases, no subscribers".to_owned());
        }
        if let Some(rate) = self.latency_rate
            && !(rate.is_finite() && rate >= 1.0)
        {
            problems.push(format!("the latency rate must be at least 1 command per second, not {rate}"));
        }
        if let Some(bad) = self.clients.iter().find(|&&clients| !(1..=CLIENTS_MAX).contains(&clients)) {
            problems.push(format!("clients must be 1..={CLIENTS_MAX}, not {bad}"));
        }
        if self.duration.is_zero() || self.duration > DURATION_MAX {
            problems.push(format!("the duration must be above 0 and at most {} s", DURATION_MAX.as_secs()));
        }
        if let Some(bad) = self.ws_cases.iter().find(|c| {
            !(1..=ws::WS_CONNECTIONS_MAX).contains(&c.connections) || !(1..=ws::WS_PIPELINE_MAX).contains(&c.pipeline)
        }) {
            problems.push(format!(
                "WebSocket cases need 1..={} connections and 1..={} in flight, not {}×{}",
                ws::WS_CONNECTIONS_MAX,
                ws::WS_PIPELINE_MAX,
                bad.connections,
                bad.pipeline
            ));
        }
        if let Some(bad) = self.subscribers.iter().find(|&&n| !(1..=ws::SUBSCRIBERS_MAX).contains(&n)) {
            problems.push(format!("subscribers must be 1..={}, not {bad}", ws::SUBSCRIBERS_MAX));
        }
        if self.warmup > DURATION_MAX {
            problems.push(format!("the warm-up must be at most {} s", DURATION_MAX.as_secs()));
        }
        ensure!(problems.is_empty(), "invalid options: {}", problems.join("; "));
        Ok(())
    }
}

/// HTTP load measured over one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpMeasure {
    /// Successful requests that started and finished inside the window.
    pub requests: u64,
    /// The window, in seconds.
    pub seconds: f64,
    /// Successful requests over the whole run (warm-up and tail included).
    pub succeeded_total: u64,
    /// Failed requests (error status, missing ETag, transport error) over the whole run.
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Latency percentiles of the window's requests, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// CPU microseconds per request over the window (the whole process: server, store and load
    /// generator), when the platform tells.
    pub cpu_us: Option<f64>,
}

impl HttpMeasure {
    /// Requests per second.
    pub fn per_sec(&self) -> f64 {
        rate(self.requests, self.seconds)
    }

    fn from_load(result: load::LoadResult, seconds: f64) -> HttpMeasure {
        let ms = |q: f64| load::quantile(&result.latencies_ns, q) as f64 / 1e6;
        HttpMeasure {
            requests: result.measured,
            seconds,
            succeeded_total: result.succeeded,
            errors: result.errors,
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            cpu_us: cpu::micros_per(result.cpu_start, result.cpu_end, result.measured),
            error_samples: result.error_samples,
        }
    }
}

/// What the store counted during Sourced's measured window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreWindow {
    /// Transactions committed.
    pub commits: u64,
    /// Appends (commands) committed.
    pub appends: u64,
    /// Events committed.
    pub events: u64,
    /// The window, as read at its edges, in seconds.
    pub seconds: f64,
}

impl StoreWindow {
    /// Commits per second.
    pub fn commits_per_sec(&self) -> f64 {
        rate(self.commits, self.seconds)
    }

    /// Appends per commit, if anything was committed.
    pub fn mean_batch(&self) -> Option<f64> {
        (self.commits > 0).then(|| self.appends as f64 / self.commits as f64)
    }
}

/// One concurrency level's results.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Clients.
    pub clients: usize,
    /// Sourced over HTTP.
    pub sourced: HttpMeasure,
    /// The store's counters over Sourced's window.
    pub store: StoreWindow,
    /// Appends the store committed over Sourced's whole run: one per successful request.
    pub store_appends_total: u64,
    /// The HTTP floor.
    pub floor: HttpMeasure,
    /// The raw SQLite ceiling.
    pub ceiling: CeilingMeasure,
    /// The ceiling with every commit as large as the level allows (`clients` commands: each
    /// client has one in flight), when that is larger than Sourced's mean batch: the most any
    /// server could get from the store's durable writes at this level.
    pub ceiling_full: Option<CeilingMeasure>,
}

impl Row {
    /// Sourced's throughput as a fraction of the floor's.
    pub fn sourced_vs_floor(&self) -> f64 {
        ratio(self.sourced.per_sec(), self.floor.per_sec())
    }

    /// Sourced's throughput as a fraction of the ceiling's.
    pub fn sourced_vs_ceiling(&self) -> f64 {
        ratio(self.sourced.per_sec(), self.ceiling.per_sec())
    }

    /// The full-batch ceiling as a fraction of the floor: the highest Sourced/floor any server
    /// on this store could reach at this level.
    pub fn full_ceiling_vs_floor(&self) -> Option<f64> {
        self.ceiling_full.map(|c| ratio(c.per_sec(), self.floor.per_sec()))
    }
}

/// The machine the numbers come from.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// Cores available to this process.
    pub cores: usize,
    /// CPU model, from /proc/cpuinfo.
    pub cpu: String,
    /// Operating system and architecture.
    pub os: String,
    /// When the run started (UTC).
    pub date: String,
    /// `release` or `debug`.
    pub profile: &'static str,
    /// The 1-minute load average when the run started (other work on the machine skews
    /// the numbers), if known.
    pub load_average: Option<String>,
}

impl Machine {
    /// Reads the machine's description.
    pub fn detect() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" },
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|line| line.split_whitespace().next().map(str::to_owned)),
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// What was asked.
    pub options: Options,
    /// One row per concurrency level.
    pub rows: Vec<Row>,
    /// One row per WebSocket command case.
    pub ws: Vec<WsRow>,
    /// One row per subscription latency case.
    pub latency: Vec<LatencyRow>,
}

impl Report {
    /// Everything that makes the numbers untrustworthy: HTTP errors, and store counts that do
    /// not match the successful requests. Empty for a good run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for row in &self.rows {
            for (what, measure) in [("Sourced", &row.sourced), ("HTTP floor", &row.floor)] {
                if measure.errors > 0 {
                    problems.push(format!(
                        "{} clients, {what}: {} failed requests, e.g. {}",
                        row.clients,
                        measure.errors,
                        measure.error_samples.join(" | ")
                    ));
                }
            }
            if row.store_appends_total != row.sourced.succeeded_total {
                problems.push(format!(
                    "{} clients: the store committed {} appends but clients saw {} successful commands",
                    row.clients, row.store_appends_total, row.sourced.succeeded_total
                ));
            }
        }
        problems.extend(ws::problems(&self.ws, &self.latency));
        problems
    }

    /// The report as Markdown: the machine and the set-up, then the table.
    pub fn to_markdown(&self) -> String {
        let m = &self.machine;
        let o = &self.options;
        let levels: Vec<String> = o.clients.iter().map(usize::to_string).collect();
        let mut out = String::new();
        let _ = writeln!(out, "## Sourced benchmark\n");
        let _ = writeln!(out, "- machine: {} cores (nproc), {}, {}", m.cores, m.cpu, m.os);
        let load = m.load_average.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "- date: {}; build: {}; load average at start: {load}", m.date, m.profile);
        let _ = writeln!(
            out,
            "- per measurement: {:.1} s warm-up, then {:.1} s measured; clients: {}",
            o.warmup.as_secs_f64(),
            o.duration.as_secs_f64(),
            levels.join(", ")
        );
        let _ = writeln!(
            out,
            "- workload, per client (one keep-alive connection, one task): loop {{ POST /{ty} with a {bytes}-byte \
             JSON document; PATCH /{ty}/{{id}} with a 1–2 op JSON Patch and If-Match }}; each request is one \
             durable command",
            ty = workload::TYPE_NAME,
            bytes = workload::DOCUMENT_BYTES,
        );
        let _ = writeln!(
            out,
            "- Sourced: in-process server, embedded SQLite (WAL, synchronous=FULL), fresh database per level; \
             commits/s and mean batch (appends per commit) from the store's counters over the window"
        );
        let _ = writeln!(
            out,
            "- HTTP floor: axum with trivial JSON handlers on the same routes, same runtime, same load generator"
        );
        let _ = writeln!(
            out,
            "- SQLite ceiling: the same rows (event, read-model row, command record; the same clients' aggregate ids) \
             with rusqlite in the store's schema, transactions of Sourced's mean batch at that level, no HTTP and no \
             per-command reads; \"full batch\": the same with every commit holding one command per client, the \
             largest batch the level allows, so the most any server could get from these durable writes"
        );
        let _ = writeln!(
            out,
            "- load generator and server share the cores, for Sourced and the floor alike; CPU µs per command or \
             request is the whole process's user + system time over the window (server, store threads and load \
             generator) divided by the requests measured\n"
        );
        if !self.rows.is_empty() {
            self.write_http_table(&mut out);
        }
        let http_64 = self.rows.iter().find(|r| r.clients == 64).map(|r| r.sourced.per_sec());
        ws::write_markdown(&mut out, &self.ws, &self.latency, http_64);
        write_problems(&mut out, &self.problems());
        out
    }

    fn write_http_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "| clients | Sourced cmd/s | p50 ms | p99 ms | p999 ms | CPU µs/cmd | commits/s | mean batch | \
             HTTP floor req/s | floor p99 ms | floor CPU µs/req | SQLite ceiling cmd/s | Sourced/floor | \
             Sourced/ceiling | full-batch ceiling cmd/s | full-batch ceiling/floor |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let mean_batch = optional_cell(row.store.mean_batch(), 2);
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {} | {:.0} | {:.2} | {} | {:.0} | {:.0}% | {:.0}% | {} | {} |",
                row.clients,
                row.sourced.per_sec(),
                row.sourced.p50_ms,
                row.sourced.p99_ms,
                row.sourced.p999_ms,
                optional_cell(row.sourced.cpu_us, 0),
                row.store.commits_per_sec(),
                mean_batch,
                row.floor.per_sec(),
                row.floor.p99_ms,
                optional_cell(row.floor.cpu_us, 0),
                row.ceiling.per_sec(),
                row.sourced_vs_floor() * 100.0,
                row.sourced_vs_ceiling() * 100.0,
                optional_cell(row.ceiling_full.map(|c| c.per_sec()), 0),
                optional_percent(row.full_ceiling_vs_floor()),
            );
        }
    }
}

/// Runs every level (Sourced, then the floor, then the ceiling at Sourced's batch size) on a
/// fresh multi-thread runtime, with progress on stderr.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    options.validate()?;
    let machine = Machine::detect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let timing = load::Timing { warmup: options.warmup, duration: options.duration };
    let mut rows = Vec::with_capacity(options.clients.len());
    for &clients in &options.clients {
        eprintln!("[{clients} clients] Sourced…");
        let (sourced, store, store_appends_total) = runtime.block_on(measure_sourced(clients, timing))?;
        eprintln!("[{clients} clients] HTTP floor…");
        let floor = runtime.block_on(measure_floor(clients, timing))?;
        let batch_mean = store.mean_batch().unwrap_or(1.0).max(1.0);
        // Each ceiling on a fresh database holding the store's schema.
        let measure_ceiling = |batch: f64| -> anyhow::Result<CeilingMeasure> {
            eprintln!("[{clients} clients] SQLite ceiling at {batch:.2} commands per commit…");
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("ceiling.db");
            runtime.block_on(ceiling::create_schema(&path))?;
            ceiling::run(&path, clients, batch, timing)
        };
        let ceiling = measure_ceiling(batch_mean)?;
        let full = clients as f64;
        let ceiling_full = if full > batch_mean { Some(measure_ceiling(full)?) } else { None };
        rows.push(Row { clients, sourced, store, store_appends_total, floor, ceiling, ceiling_full });
    }
    // Without WebSocket command cases, the latency runs at half of the best HTTP rate.
    let http_max = rows.iter().map(|r| r.sourced.per_sec()).fold(0.0, f64::max);
    let (ws_cases, fallback) = match options.latency_rate {
        // The rate is given as the maximum whose half the latency cases run at.
        Some(rate) => (&[][..], rate * 2.0),
        None => (&options.ws_cases[..], http_max),
    };
    let (ws, latency) = ws::run(&runtime, ws_cases, &options.subscribers, timing, fallback)?;
    Ok(Report { machine, options: options.clone(), rows, ws, latency })
}

/// Sourced at one level: a fresh database and server, the load, the store's counters.
async fn measure_sourced(clients: usize, timing: load::Timing) -> anyhow::Result<(HttpMeasure, StoreWindow, u64)> {
    let dir = tempfile::tempdir()?;
    let config = sourced_server::Config::embedded(loopback(), dir.path().join("sourced.db"));
    let server = sourced_server::start(config).await?;
    let (result, start, end) = load::run(server.addr(), clients, timing, &[], || server.store_stats()).await?;
    let appends_total = server.store_stats().appends;
    server.shutdown().await;
    let store = StoreWindow {
        commits: end.value.commits - start.value.commits,
        appends: end.value.appends - start.value.appends,
        events: end.value.events - start.value.events,
        seconds: end.at.duration_since(start.at).as_secs_f64(),
    };
    Ok((HttpMeasure::from_load(result, timing.duration.as_secs_f64()), store, appends_total))
}

/// The HTTP floor at one level.
async fn measure_floor(clients: usize, timing: load::Timing) -> anyhow::Result<HttpMeasure> {
    let server = floor::FloorServer::start().await?;
    let (result, _, _) = load::run(server.addr(), clients, timing, &[], || ()).await?;
    server.shutdown().await?;
    Ok(HttpMeasure::from_load(result, timing.duration.as_secs_f64()))
}

/// A table cell for a figure that may be missing: the value with `decimals` decimals, or a
/// dash.
pub(crate) fn optional_cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

/// A fraction as a whole percentage, or "–" when it is missing.
pub(crate) fn optional_percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "–".to_owned(), |f| format!("{:.0}%", f * 100.0))
}

/// The run's problems under its tables, when there are any.
fn write_problems(out: &mut String, problems: &[String]) {
    if !problems.is_empty() {
        let _ = writeln!(out, "\n**The run had problems; the numbers above are not valid:**\n");
        for problem in problems {
            let _ = writeln!(out, "- {problem}");
        }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 { numerator / denominator } else { 0.0 }
}
