//! The `sourced` binary: reads the configuration, sets up logs, serves until SIGINT/SIGTERM.

use clap::Parser;

/// JSON-heavy request handling allocates a lot of small, short-lived values; mimalloc serves
/// them markedly cheaper than glibc's allocator (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sourced_server::config::{Cli, CliCommand, KeyCommand};
use sourced_server::{Config, LogFormat};

fn main() -> std::process::ExitCode {
    // `.env` first: variables already set win over it, and flags win over both.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let (raw, task) = match cli.command {
        Some(CliCommand::Serve(raw)) => (raw, Task::Serve),
        Some(CliCommand::Check { artifacts, artifacts_cache }) => {
            return check(&artifacts, artifacts_cache.as_deref());
        }
        Some(CliCommand::Export { output, settings }) => (settings, Task::Export(output)),
        Some(CliCommand::Import { input, settings }) => (settings, Task::Import(input)),
        Some(CliCommand::Rebuild { settings }) => (settings, Task::Rebuild),
        Some(CliCommand::Key(KeyCommand::New { principal, tenants, roles })) => {
            return new_key(&principal, &tenants, &roles);
        }
        None => (cli.serve, Task::Serve),
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
    let outcome = runtime.block_on(async {
        match task {
            Task::Serve => serve(config).await,
            Task::Export(output) => sourced_server::transfer::run_export(&config, output.as_deref()).await,
            Task::Import(input) => sourced_server::transfer::run_import(&config, input.as_deref()).await,
            Task::Rebuild => sourced_server::transfer::run_rebuild(&config).await,
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sourced: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What the binary was asked to do, once configured.
/// `sourced key new`: the key on stdout's first line, the keys-file entry on the second.
fn new_key(principal: &str, tenants: &[String], roles: &[String]) -> std::process::ExitCode {
    let made = sourced_core::Principal::new(principal, tenants, roles)
        .map_err(|e| e.to_string())
        .and_then(|p| sourced_auth::NewKey::generate(&p).map_err(|_| "no system randomness".to_owned()));
    match made {
        Ok(k) => {
            println!("{}", k.key);
            println!("{}", k.line);
            eprintln!("sourced: the key above is shown once; add the second line to AUTH_KEYS_FILE");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sourced: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

enum Task {
    Serve,
    Export(Option<std::path::PathBuf>),
    Import(Option<std::path::PathBuf>),
    Rebuild,
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = sourced_server::start(config.clone()).await?;
    tracing::info!(addr = %server.addr(), store = ?config.store, "sourced is listening");
    #[cfg(unix)]
    {
        // SIGHUP reloads the artifact set (the outcome is logged by the reloader) and the TLS
        // certificate.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the artifact set");
                    let _ = server.reload_artifacts().await;
                    match server.reload_tls() {
                        None => {}
                        Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Some(Err(e)) => tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; serving the previous one"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
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

/// `sourced check ARTIFACTS` (a directory or a git URL): every problem of the artifact set,
/// one per line; exit 1 if any, 2 if the set cannot be read at all.
fn check(artifacts: &str, cache: Option<&str>) -> std::process::ExitCode {
    use sourced_server::artifacts::{LoadError, load};
    // The expression limits are the server's (from the environment or .env), so that check
    // and serve agree on a set.
    let mut raw = sourced_server::config::RawArgs::default();
    raw.set("ARTIFACTS", artifacts);
    if let Some(cache) = cache {
        raw.set("ARTIFACTS_CACHE", cache);
    }
    for name in ["EXPR_BYTES_MAX", "EXPR_NODES_MAX", "EXPR_COST_MAX", "EXPR_VALUE_BYTES_MAX"] {
        if let Ok(value) = std::env::var(name) {
            raw.set(name, value);
        }
    }
    let (source, limits) = match Config::resolve(&raw).map(|c| (c.artifacts, c.expr_limits)) {
        Ok((Some(source), limits)) => (source, limits),
        Ok((None, _)) => {
            eprintln!("sourced check: give an artifact set (a directory or a git URL)");
            return std::process::ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("sourced check: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match load(&source, &limits) {
        Ok(loaded) => {
            let types = loaded.set.types().count();
            let commands: usize = loaded.set.types().map(|(_, a)| a.commands.len()).sum();
            if let Some(why) = &loaded.stale {
                eprintln!("sourced check: warning: {why}; checked the cached checkout");
            }
            println!("ok: {} is a valid artifact set ({types} types, {commands} custom commands)", loaded.origin);
            std::process::ExitCode::SUCCESS
        }
        Err(LoadError::Problems(problems)) => {
            let root = match &source {
                sourced_server::artifacts::ArtifactsSource::Dir(dir) => Some(dir.as_path()),
                sourced_server::artifacts::ArtifactsSource::Git(_) => None,
            };
            for p in &problems {
                println!("{}", sourced_server::artifacts::describe_problem(p, root));
            }
            eprintln!("sourced check: {} problem(s) in {source}", problems.len());
            std::process::ExitCode::FAILURE
        }
        Err(e @ LoadError::Git(_)) => {
            eprintln!("sourced check: cannot load {source}: {e}");
            std::process::ExitCode::from(2)
        }
    }
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
