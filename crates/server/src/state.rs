//! What every handler and live connection shares: [`AppState`] (the engine, the limits, the
//! live connections, the reloader) and [`LiveState`] (counters and the shutdown signal of
//! WebSocket, Socket.IO and SSE connections). A leaf of the server: it imports no handler.

use std::sync::atomic::{AtomicU64, AtomicUsize};

use sourced_engine::Engine;

use crate::config::{HttpLimits, WsLimits};
use crate::problem::Problem;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The command pipeline and its store.
    pub engine: Engine,
    /// Limits of the HTTP layer.
    pub http: HttpLimits,
    /// Limits of WebSocket connections.
    pub ws: WsLimits,
    /// Live connections (WebSocket, SSE): counters and the shutdown signal.
    pub live: std::sync::Arc<LiveState>,
    /// Reloads the artifact set; `Some` only when `ADMIN_API=true` (the admin routes exist
    /// only then).
    pub reloader: Option<std::sync::Arc<crate::reload::Reloader>>,
    /// Authentication: off (`AUTH=none`) or the loaded keys and JWT verifier.
    pub gate: std::sync::Arc<crate::auth::Gate>,
    /// Rate limits per caller, when on.
    pub rate_limit: Option<std::sync::Arc<crate::ratelimit::RateLimiter>>,
    /// The process runners, nudged after an operator's step on an instance.
    pub runners: std::sync::Arc<sourced_engine::process::Runners>,
}

/// What handlers return: a response, or the problem that answers instead.
pub type Result<T, E = Problem> = std::result::Result<T, E>;

/// Live connections (WebSocket and SSE): counters for tests and metrics, and the signal that
/// ends them at shutdown (they would otherwise hold the graceful shutdown for its whole grace).
#[derive(Debug, Default)]
pub struct LiveState {
    /// Set to `true` once at shutdown.
    closing: tokio::sync::watch::Sender<bool>,
    /// Connections open now.
    pub connections: AtomicUsize,
    /// The most messages ever seen waiting in one connection's outbound queue.
    pub outbound_high_water: AtomicUsize,
    /// Connections closed because the client stopped reading (WebSocket 1008, SSE, Socket.IO).
    pub slow_clients_closed: AtomicU64,
    /// SSE streams open now.
    pub sse_streams: AtomicUsize,
    /// Writes (flushes) to WebSocket connections; each may carry several messages.
    pub flushes: AtomicU64,
    /// Messages written to WebSocket connections.
    pub messages_written: AtomicU64,
    /// Times a WebSocket subscription fell behind the live buffer and read the store again.
    pub subscription_lag_recoveries: AtomicU64,
}

impl LiveState {
    /// Ends every live connection: WebSockets close with 1001, SSE streams end.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`LiveState::close`] has been called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }
}
