//! The Sourced service: configuration, the HTTP API, and start-up and shutdown of the whole.
//! The only crate that knows wire formats and HTTP status codes.

#![warn(missing_docs)]

pub mod config;
pub mod http;
pub mod problem;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use sourced_engine::{Engine, EngineConfig, SystemClock};
use sourced_store::sqlite::{SqliteOptions, SqliteStore};
use sourced_store::{EventStore, StoreStats};

pub use config::{Config, LogFormat, StoreUrl};
pub use http::{AppState, router};

/// Opens the configured event store.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    match &config.store {
        StoreUrl::Sqlite(path) => {
            let options = SqliteOptions { batch_appends_max: config.batch_appends_max, ..SqliteOptions::default() };
            let store = SqliteStore::open(path, options)
                .with_context(|| format!("cannot open the embedded store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
    }
}

/// The HTTP application over an opened store.
pub fn app(config: &Config, store: Arc<dyn EventStore>) -> axum::Router {
    let engine = Engine::new(
        store,
        EngineConfig {
            limits: config.limits.clone(),
            require_version: config.require_version,
            ..EngineConfig::default()
        },
        Arc::new(SystemClock),
    );
    router(AppState { engine, http: config.http.clone() }).layer(tower_http::trace::TraceLayer::new_for_http())
}

/// A server running in the background.
pub struct RunningServer {
    addr: SocketAddr,
    store: Arc<dyn EventStore>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    grace: Duration,
}

/// Opens the store, binds the listener and serves until [`RunningServer::shutdown`].
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let store = open_store(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (LISTEN)", config.listen))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = app(&config, store.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningServer { addr, store, stop: Some(stop), task, grace: Duration::from_secs(config.shutdown_timeout_secs) })
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store's counters.
    pub fn store_stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Stops accepting connections, lets in-flight requests finish (up to the grace period),
    /// then closes the store so every acknowledged command is on disk.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(self.grace, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server stopped with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!(grace_secs = self.grace.as_secs(), "in-flight requests outlived the grace period");
                self.task.abort();
            }
        }
        self.store.close().await;
    }
}
