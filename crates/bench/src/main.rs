//! The `sourced-bench` binary: runs the benchmark and prints its Markdown table; fails when
//! any request failed, so that a broken run is never mistaken for a slow one.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

/// The same allocator as the `sourced` binary, so the in-process server runs as it would.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sourced_bench::Options;

/// Durable commands over HTTP against Sourced, an HTTP floor and a raw SQLite ceiling; then
/// commands over WebSocket and subscription latency. Or one of the other runs below.
#[derive(Debug, Parser)]
#[command(name = "sourced-bench", version)]
struct Args {
    /// Measured seconds per measurement (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Warm-up seconds before each measurement.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Concurrency levels (clients, each its own connection), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    clients: Vec<usize>,
    /// A tiny run that only checks the path works: 1 client, 0.3 s per measurement.
    #[arg(long, conflicts_with_all = ["duration_secs", "warmup_secs", "clients"])]
    smoke: bool,
    /// Instead: Sourced on the PostgreSQL server and database at this URL, beside a plain-client
    /// ceiling and Message DB on the same server (scratch schemas, dropped afterwards).
    #[arg(long, value_name = "URL", conflicts_with = "smoke")]
    postgres: Option<String>,
    /// Instead: the read-side benchmark (command cost by stream length with and without
    /// snapshots, rebuild rate, GET by id against the floor, a filtered list over 1 000 000
    /// aggregates; with --postgres the list on PostgreSQL too); --smoke makes it tiny.
    #[arg(long, conflicts_with_all = ["duration_secs", "warmup_secs", "clients", "message_db_url"])]
    read_side: bool,
    /// Instead: the example order domain's custom commands (`submit`, `pay`: schema, rules,
    /// lifecycle, CEL) against plain patches of the same size, at each --clients level.
    #[arg(long, conflicts_with_all = ["postgres", "read_side"])]
    artifacts: bool,
    /// Instead: the HTTP workload with JWT auth on (HS256 and ES256) beside auth off, at each
    /// --clients level, in rounds of (off, HS256, ES256) pooled per scheme; then one
    /// verification's cost outside HTTP.
    #[arg(long, conflicts_with_all = ["postgres", "read_side", "artifacts"])]
    auth: bool,
    /// Rounds of the --auth run (each measures every scheme once).
    #[arg(long, default_value_t = 3, requires = "auth")]
    rounds: usize,
    /// Only the WebSocket part: no HTTP levels.
    #[arg(long, conflicts_with_all = ["postgres", "read_side", "artifacts", "auth", "clients"])]
    websocket_only: bool,
    /// Only the HTTP levels: no WebSocket commands, no subscription latency.
    #[arg(long, conflicts_with_all = ["postgres", "read_side", "artifacts", "websocket_only", "subscribers", "latency_rate"])]
    http_only: bool,
    /// Subscribers of each subscription latency case, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100])]
    subscribers: Vec<usize>,
    /// Run the subscription latency cases at this many commands per second, skipping the
    /// WebSocket command cases (by default: half of the highest WebSocket rate measured).
    #[arg(long, value_name = "PER_SEC", conflicts_with_all = ["postgres", "read_side", "artifacts", "smoke"])]
    latency_rate: Option<f64>,
    /// Where Message DB is installed [default: database sourced_bench_messagedb of --postgres].
    #[arg(long, value_name = "URL", requires = "postgres")]
    message_db_url: Option<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sourced-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.auth {
        return run_auth(args);
    }
    if args.artifacts {
        let options = sourced_bench::DomainOptions {
            clients: if args.smoke { vec![1] } else { args.clients },
            duration: if args.smoke {
                Duration::from_millis(300)
            } else {
                Duration::try_from_secs_f64(args.duration_secs).context("--duration-secs")?
            },
            artifacts: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order"),
        };
        println!("{}", sourced_bench::run_domain(&options)?);
        return Ok(ExitCode::SUCCESS);
    }
    if args.read_side {
        let options = sourced_bench::ReadOptions {
            postgres: args.postgres,
            ..if args.smoke { sourced_bench::ReadOptions::smoke() } else { sourced_bench::ReadOptions::full() }
        };
        if cfg!(debug_assertions) && !args.smoke {
            eprintln!(
                "sourced-bench: warning: a debug build; use `cargo run --release -p sourced-bench` for real numbers"
            );
        }
        println!("{}", sourced_bench::run_read(&options)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(url) = args.postgres {
        let options = sourced_bench::PgOptions {
            url,
            message_db_url: args.message_db_url,
            clients: args.clients,
            duration: Duration::try_from_secs_f64(args.duration_secs).context("--duration-secs")?,
            warmup: Duration::try_from_secs_f64(args.warmup_secs).context("--warmup-secs")?,
        };
        let report = sourced_bench::run_postgres(&options)?;
        println!("{}", report.to_markdown());
        return Ok(verdict(&report.problems()));
    }
    if cfg!(debug_assertions) && !args.smoke {
        eprintln!("sourced-bench: warning: a debug build; use `cargo run --release -p sourced-bench` for real numbers");
    }
    let options = if args.smoke {
        Options::smoke()
    } else {
        Options {
            clients: if args.websocket_only { Vec::new() } else { args.clients },
            duration: Duration::try_from_secs_f64(args.duration_secs).context("--duration-secs")?,
            warmup: Duration::try_from_secs_f64(args.warmup_secs).context("--warmup-secs")?,
            subscribers: if args.http_only { Vec::new() } else { args.subscribers },
            latency_rate: args.latency_rate,
            ws_cases: if args.http_only { Vec::new() } else { sourced_bench::default_ws_cases() },
        }
    };
    let report = sourced_bench::run(&options)?;
    println!("{}", report.to_markdown());
    Ok(verdict(&report.problems()))
}

/// The --auth run.
fn run_auth(args: Args) -> anyhow::Result<ExitCode> {
    let options = if args.smoke {
        sourced_bench::AuthOptions::smoke()
    } else {
        if cfg!(debug_assertions) {
            eprintln!(
                "sourced-bench: warning: a debug build; use `cargo run --release -p sourced-bench` for real numbers"
            );
        }
        sourced_bench::AuthOptions {
            clients: args.clients,
            duration: Duration::try_from_secs_f64(args.duration_secs).context("--duration-secs")?,
            warmup: Duration::try_from_secs_f64(args.warmup_secs).context("--warmup-secs")?,
            rounds: args.rounds,
        }
    };
    let report = sourced_bench::run_auth(&options)?;
    println!("{}", report.to_markdown());
    Ok(verdict(&report.problems()))
}

/// Success for a run without problems; else the problems on stderr and failure.
fn verdict(problems: &[String]) -> ExitCode {
    if problems.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("sourced-bench: THE RUN FAILED ({} problems):", problems.len());
    for problem in problems {
        eprintln!("  - {problem}");
    }
    ExitCode::FAILURE
}
