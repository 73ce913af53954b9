//! The Sourced service: configuration, the HTTP API, and start-up and shutdown of the whole.
//! The only crate that knows wire formats and HTTP status codes.

#![warn(missing_docs)]

pub mod artifacts;
pub mod auth;
pub mod commands;
pub mod config;
pub mod git;
pub mod http;
pub mod jwks_fetch;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod processes;
mod progress;
pub mod ratelimit;
pub mod reload;
pub mod request;
pub mod router;
pub mod settings;
pub mod socketio;
pub mod sse;
pub mod stall;
pub mod state;
pub mod tls;
pub mod trace;
pub mod transfer;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use sourced_engine::process::Runners;
use sourced_engine::{Engine, EngineConfig, SystemClock};
use sourced_store::postgres::{PostgresOptions, PostgresStore};
use sourced_store::sqlite::{SqliteOptions, SqliteStore};
use sourced_store::{EventStore, StoreStats};

use config::redact_url;
pub use config::{Config, LogFormat, StoreUrl};
pub use router::router;
pub use state::{AppState, LiveState};

/// Opens the configured event store (for PostgreSQL: connects and migrates the schema).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    match &config.store {
        StoreUrl::Sqlite(path) => open_sqlite_store(config, path),
        StoreUrl::Postgres(url) => {
            let options = PostgresOptions { batch_appends_max: config.batch_appends_max, ..PostgresOptions::default() };
            let store = PostgresStore::connect(url, options).await.with_context(|| {
                format!("cannot open the PostgreSQL store at {} (EVENT_STORE_URL)", redact_url(url))
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens the embedded store at `path` with `config`'s settings (synchronous).
pub fn open_sqlite_store(config: &Config, path: &std::path::Path) -> anyhow::Result<Arc<dyn EventStore>> {
    let options = SqliteOptions { batch_appends_max: config.batch_appends_max, ..SqliteOptions::default() };
    let store = SqliteStore::open(path, options)
        .with_context(|| format!("cannot open the embedded store at {}", path.display()))?;
    Ok(Arc::new(store))
}

/// The HTTP application over an opened store.
pub fn app(config: &Config, store: Arc<dyn EventStore>) -> axum::Router {
    app_with_stats(config, store, Arc::default())
}

/// [`app`], with the state of its live connections (WebSocket, SSE) in `live`.
pub fn app_with_stats(config: &Config, store: Arc<dyn EventStore>, live: Arc<state::LiveState>) -> axum::Router {
    build_app(config, store, live).0
}

/// The application and what runs beside it: the reloader of its artifact set and the process
/// runners (started by [`start`], not by [`app`]).
type Built = (axum::Router, Arc<reload::Reloader>, Arc<Runners>);

/// The application and the reloader of its artifact set.
fn build_app(config: &Config, store: Arc<dyn EventStore>, live: Arc<state::LiveState>) -> Built {
    let engine = Engine::new(
        store,
        EngineConfig {
            limits: config.limits.clone(),
            require_version: config.require_version,
            live_buffer_events: config.live_buffer_events,
            snapshot_every: config.snapshot_every,
            ..EngineConfig::default()
        },
        Arc::new(SystemClock),
    );
    engine.set_artifacts(config.artifact_set.clone());
    let runners = Arc::new(Runners::new(engine.clone(), config.processes.clone()));
    let socketio =
        socketio::layer(engine.clone(), &config.ws, live.clone(), config.gate.clone(), config.rate_limit.clone());
    let reloader =
        Arc::new(reload::Reloader::new(config.artifacts.clone(), config.expr_limits, engine.clone(), runners.clone()));
    let state = AppState {
        engine,
        http: config.http.clone(),
        ws: config.ws.clone(),
        live: live.clone(),
        reloader: config.admin_api.then(|| reloader.clone()),
        gate: config.gate.clone(),
        rate_limit: config.rate_limit.clone(),
        runners: runners.clone(),
    };
    // Socket.IO (`/socket.io/`) in front of the router: other paths pass through to it.
    let app = router(state)
        .layer(socketio)
        .layer(axum::middleware::map_response(socketio::errors_as_problems))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(trace::request_span))
        .layer(axum::middleware::from_fn(trace::request_id))
        // Outermost: a request is in flight from its head to the end of its response.
        .layer(axum::middleware::from_fn(stall::track_requests));
    (app, reloader, runners)
}

/// A server running in the background.
pub struct RunningServer {
    addr: SocketAddr,
    store: Arc<dyn EventStore>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    grace: Duration,
    live: Arc<state::LiveState>,
    reloader: Arc<reload::Reloader>,
    tls: Option<Arc<tls::Certificates>>,
    runners: Arc<Runners>,
}

/// Opens the store, binds the listener and serves until [`RunningServer::shutdown`].
pub async fn start(mut config: Config) -> anyhow::Result<RunningServer> {
    if let Some(source) = config.artifacts.clone() {
        let limits = config.expr_limits;
        let loaded = tokio::task::spawn_blocking(move || artifacts::load(&source, &limits)).await?;
        config.artifact_set = Arc::new(loaded_or_startup_error(&config, loaded)?);
    }
    metrics::install();
    config.gate.start().await?;
    let store = open_store(&config).await?;
    // The indexes of INDEXES and of the artifact set (`types/<type>/indexes.yaml`).
    let mut indexes = config.indexes.clone();
    indexes.extend(config.artifact_set.indexed_fields());
    indexes.sort();
    indexes.dedup();
    if !indexes.is_empty() {
        let names = store
            .ensure_indexes(&indexes)
            .await
            .context("cannot create the indexes of INDEXES and the artifact set")?;
        tracing::info!(indexes = ?names, "read-model indexes in place");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (LISTEN)", config.listen))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let live = Arc::<state::LiveState>::default();
    let (app, reloader, runners) = build_app(&config, store.clone(), live.clone());
    // One runner per process of the set (SPEC §4.5); a reload starts those it adds. Their
    // checkpoints are taken before the first request is served, so no event goes unheard.
    runners.anchor(&config.artifact_set).await.context("cannot set the process managers' first checkpoints")?;
    runners.sync();
    let timeouts = stall::ReadTimeouts {
        idle: Duration::from_millis(config.http.idle_timeout_ms),
        header: Duration::from_millis(config.http.header_read_timeout_ms),
    };
    let tls = config.tls.clone();
    let listener = match &tls {
        None => stall::GuardedListener::plain(listener, timeouts)?,
        Some(certs) => stall::GuardedListener::tls(listener, timeouts, certs.clone())?,
    };
    let task = tokio::spawn(async move {
        // Sockets with a write deadline that SSE streams arm (`stall.rs`).
        let app = app.into_make_service_with_connect_info::<stall::StallGuard>();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningServer {
        addr,
        store,
        stop: Some(stop),
        task,
        grace: Duration::from_secs(config.shutdown_timeout_secs),
        live,
        reloader,
        tls,
        runners,
    })
}

/// The loaded set, or the start-up error: one line naming ARTIFACTS for a git failure, the
/// list of every problem for a broken set.
fn loaded_or_startup_error(
    config: &Config,
    loaded: Result<artifacts::Loaded, artifacts::LoadError>,
) -> anyhow::Result<sourced_core::artifacts::ArtifactSet> {
    let source = config.artifacts.as_ref().map(ToString::to_string).unwrap_or_default();
    match loaded {
        Ok(l) => {
            if let Some(why) = &l.stale {
                tracing::warn!(
                    artifacts = %source,
                    error = %why,
                    "git fetch failed: starting from the cached checkout of the ref, which may be out of date"
                );
            }
            tracing::info!(artifacts = %l.origin, "artifact set loaded");
            Ok(l.set)
        }
        Err(artifacts::LoadError::Git(e)) => Err(anyhow::anyhow!("cannot load ARTIFACTS={source}: {e}")),
        Err(artifacts::LoadError::Problems(problems)) => {
            let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            Err(anyhow::anyhow!(
                "the artifact set in {source} (ARTIFACTS) has {} problem(s):\n{}",
                problems.len(),
                list.join("\n")
            ))
        }
    }
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads `TLS_CERT` and `TLS_KEY` again (SIGHUP): `None` without TLS; on failure the
    /// certificate being served stays.
    pub fn reload_tls(&self) -> Option<Result<(), tls::TlsError>> {
        self.tls.as_ref().map(|certs| certs.reload())
    }

    /// The store it serves.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The store's counters.
    pub fn store_stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// The live connections' counters.
    pub fn live(&self) -> &state::LiveState {
        &self.live
    }

    /// Reads the artifact set again and swaps it in, or keeps the running one (SIGHUP).
    pub async fn reload_artifacts(&self) -> Result<serde_json::Value, reload::ReloadError> {
        self.reloader.reload().await
    }

    /// Stops accepting connections, closes live connections (WebSocket 1001, SSE streams end),
    /// lets in-flight requests finish (up to the grace period), stops the process runners (a
    /// step in flight finishes), then closes the store so every acknowledged command is on
    /// disk.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.live.close();
        match tokio::time::timeout(self.grace, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server stopped with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!(grace_secs = self.grace.as_secs(), "in-flight requests outlived the grace period");
                self.task.abort();
            }
        }
        self.runners.stop().await;
        self.store.close().await;
    }
}
