//! The `sourced` binary: reads the configuration, sets up logs, serves until SIGINT/SIGTERM.

use clap::Parser;

/// JSON-heavy request handling allocates a lot of small, short-lived values; mimalloc serves
/// them markedly cheaper than glibc's allocator (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sourced_server::config::{Cli, CliCommand};
use sourced_server::{Config, LogFormat};

fn main() -> std::process::ExitCode {
    // `.env` first: variables already set win over it, and flags win over both.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let raw = match cli.command {
        Some(CliCommand::Serve(raw)) => raw,
        None => cli.serve,
    };
    let config = match Config::resolve(&raw) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sourced: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logs(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sourced: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sourced: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = sourced_server::start(config.clone()).await?;
    tracing::info!(addr = %server.addr(), store = ?config.store, "sourced is listening");
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight commands");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logs(config: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::new(format!("{level},tower_http={level},hyper=warn", level = config.log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
