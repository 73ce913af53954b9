//! Socket.IO compatibility (SPEC §3.2: the original service used Socket.IO): at `/socket.io/`,
//! a client emits `commands` with a command envelope (SPEC §2.1) and receives the outcome on
//! `events`: the command result as `POST /commands` answers it (plus `"replayed": true` on a
//! retry), or `{"id": commandId-or-null, "error": problem}`. Commands go through the same
//! pipeline as the WebSocket API (`commands::execute_envelope`), so validation, errors and
//! idempotency are the same as over HTTP and WebSocket. Subscriptions are not offered here
//! (use `/ws` or SSE).
//!
//! The protocol (Engine.IO v4 / Socket.IO v5, long-polling and WebSocket transports) is the
//! `socketioxide` crate's, mounted as a tower layer in front of the router (`lib.rs`). Its
//! handlers run as spawned tasks, one per received event, so the limits are ours:
//! - commands in flight per connection: `WS_INFLIGHT_MAX`; beyond it a command is answered at
//!   once with a 429 problem (the crate reads on regardless, so refusing is the only bound);
//! - packets queued for the client: `WS_OUTBOUND_MAX` (the crate's buffer); a client whose
//!   buffer is full has stopped reading, and is disconnected (counted as a slow client);
//! - message size: `WS_MESSAGE_BYTES_MAX` for polling payloads and WebSocket messages;
//! - dead clients: Engine.IO's own ping/pong (25 s interval, 20 s timeout).
//!
//! The tenant is the handshake's `X-Tenant` header (which then fixes it), else the envelope's,
//! else `default`, as on `/ws`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Map, Value};
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::Semaphore;

use sourced_engine::Engine;

use crate::auth::Gate;
use crate::commands::{Sender, execute_envelope};
use crate::config::WsLimits;
use crate::problem::Problem;
use crate::ratelimit::RateLimiter;
use crate::request::Caller;
use crate::state::LiveState;
use crate::ws::ResultReply;

/// The event a client emits a command envelope on.
pub const COMMANDS_EVENT: &str = "commands";
/// The event outcomes are emitted on.
pub const EVENTS_EVENT: &str = "events";

/// Turns the Engine.IO errors the Socket.IO layer answers by itself (`400 {"code": 0, "message":
/// "Transport unknown"}` and the like, `application/json`) into `application/problem+json`, so
/// every HTTP error of the service is a problem. The Engine.IO members stay (`code`, `message`):
/// a client that reads them still finds them. Router errors are problems already and pass as
/// they are, as do successes.
pub(crate) async fn errors_as_problems(res: axum::response::Response) -> axum::response::Response {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    let plain_json = res.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) == Some("application/json");
    if !(res.status().is_client_error() || res.status().is_server_error()) || !plain_json {
        return res;
    }
    let status = res.status();
    // Engine.IO's error bodies are a few dozen bytes; anything bigger is not one of them.
    let bytes = match axum::body::to_bytes(res.into_body(), 16 * 1024).await {
        Ok(b) => b,
        Err(_) => return Problem::socketio_refused(status, "").into_response(),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let message = body.get("message").and_then(Value::as_str).unwrap_or("the request was refused").to_owned();
    let mut p = Problem::socketio_refused(status, message.clone());
    if let Some(code) = body.get("code") {
        p = p.with("code", code.clone());
    }
    p.with("message", message).into_response()
}

/// The Socket.IO layer (path `/socket.io/`, namespace `/`); every other request passes through
/// to the inner service. Its connections are disconnected when `live` closes (shutdown).
pub(crate) fn layer(
    engine: Engine,
    limits: &WsLimits,
    live: Arc<LiveState>,
    gate: Arc<Gate>,
    rate_limit: Option<Arc<RateLimiter>>,
) -> SocketIoLayer {
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(limits.outbound_max)
        .max_payload(limits.message_bytes_max as u64)
        .ws_max_message_size(limits.message_bytes_max)
        .ws_max_frame_size(limits.message_bytes_max)
        .build_layer();
    let inflight_max = limits.inflight_max;
    let stats = live.clone();
    io.ns("/", move |s: SocketRef, TryData::<Value>(auth)| {
        // The CONNECT packet's auth payload, `{"token": …}`: what a browser can send.
        let token = auth.ok().and_then(|a| a.get("token").and_then(Value::as_str).map(str::to_owned));
        on_connect(s, engine, inflight_max, stats, (gate, rate_limit), token)
    });
    // Long-polling requests and upgraded sockets would otherwise hold the graceful shutdown.
    // Without a runtime (an app built outside one) there is nothing to close yet.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let closed = live.closed();
        runtime.spawn(async move {
            closed.await;
            io.close().await;
        });
    }
    layer
}

/// A client joined the namespace: registers its `commands` handler with its own in-flight
/// limit and fixed tenant.
async fn on_connect(
    s: SocketRef,
    engine: Engine,
    inflight_max: usize,
    stats: Arc<LiveState>,
    (gate, rate_limit): (Arc<Gate>, Option<Arc<RateLimiter>>),
    token: Option<String>,
) {
    // The handshake's headers (or the CONNECT payload's token) and X-Tenant fix who and where.
    let caller = match Caller::resolve_token(&s.req_parts().headers, token.as_deref(), &gate, &engine) {
        Ok(caller) => caller,
        Err(p) => {
            let _ = s.emit(EVENTS_EVENT, &error_reply(None, &p));
            let _ = s.disconnect();
            return;
        }
    };
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let on_gone = stats.clone();
    s.on_disconnect(move || async move {
        on_gone.connections.fetch_sub(1, Ordering::Relaxed);
    });
    let peer =
        s.req_parts().extensions.get::<axum::extract::ConnectInfo<crate::stall::StallGuard>>().and_then(|c| c.0.peer());
    let client = Client { caller, rate_limit: rate_limit.map(|l| (l, peer)) };
    let inflight = Arc::new(Semaphore::new(inflight_max));
    s.on(COMMANDS_EVENT, move |s: SocketRef, TryData::<Value>(data)| {
        run_command(s, data, engine, client.clone(), inflight, inflight_max, stats)
    });
}

/// Who a connection's commands are from, and the rate limit they count against.
#[derive(Clone)]
struct Client {
    caller: Caller,
    rate_limit: Option<(Arc<RateLimiter>, Option<std::net::SocketAddr>)>,
}

/// One received `commands` event: runs it and emits the outcome on `events`.
async fn run_command(
    s: SocketRef,
    data: Result<Value, socketioxide::ParserError>,
    engine: Engine,
    client: Client,
    inflight: Arc<Semaphore>,
    inflight_max: usize,
    stats: Arc<LiveState>,
) {
    let limited = client.rate_limit.as_ref().and_then(|(l, peer)| client.caller.take_token(l, *peer).err());
    let reply = match (limited, inflight.try_acquire_owned()) {
        (Some(p), _) => error_reply(envelope_id(data.as_ref().ok()), &p),
        (None, Err(_)) => {
            let p = Problem::too_many_commands("Socket.IO", inflight_max);
            error_reply(envelope_id(data.as_ref().ok()), &p)
        }
        (None, Ok(_permit)) => match envelope(data, engine.config().limits.json_depth_max + 1) {
            Err(p) => error_reply(None, &p),
            Ok(envelope) => {
                match execute_envelope(&engine, envelope, Sender { caller: &client.caller, idempotency_key: None })
                    .await
                {
                    Ok(outcome) => {
                        let reply = ResultReply::new(None, &outcome);
                        serde_json::to_value(&reply).unwrap_or_else(|e| {
                            let (id, problem) = reply.unserialisable(&e);
                            error_reply(id, &problem)
                        })
                    }
                    Err(e) => {
                        let (id, problem) = *e;
                        error_reply(id, &problem)
                    }
                }
            }
        },
    };
    match s.emit(EVENTS_EVENT, &reply) {
        Ok(()) => {}
        Err(SendError::Socket(SocketError::InternalChannelFull)) => {
            stats.slow_clients_closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(sid = %s.id, "disconnecting a Socket.IO client that stopped reading");
            let _ = s.disconnect();
        }
        Err(e) => tracing::debug!(error = %e, sid = %s.id, "a Socket.IO reply could not be sent"),
    }
}

/// The envelope from the event's data: an object, or a string holding one (as some clients
/// of the original service sent it). Only the string form is read by our own JSON reader
/// (`sourced_core::json`: duplicate names and inexact numbers refused); an object was parsed by
/// socketioxide, which keeps the last of duplicate names and rounds numbers as `serde_json` does.
/// U+0000 and the depth limit are checked on both forms (by the envelope parser and the core).
fn envelope(data: Result<Value, socketioxide::ParserError>, depth_max: usize) -> Result<Value, Problem> {
    let bad = |detail: String| Problem::bad_request(detail, vec![]);
    match data {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(Value::String(s)) => match sourced_core::json::parse(s.as_bytes(), depth_max) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(bad("the 'commands' string must hold a JSON object (the command envelope)".into())),
            Err(sourced_core::json::JsonError::Syntax(e)) => {
                Err(bad(format!("the 'commands' string is not valid JSON: {e}")))
            }
            Err(e) => Err(Problem::from(e)),
        },
        Ok(_) => Err(bad("'commands' takes one argument, the command envelope (a JSON object)".into())),
        Err(e) => Err(bad(format!("'commands' takes one argument, the command envelope: {e}"))),
    }
}

fn envelope_id(data: Option<&Value>) -> Option<Value> {
    data?.get("id").filter(|v| v.is_string()).cloned()
}

/// `{"id": …, "error": {problem}}`.
fn error_reply(id: Option<Value>, problem: &Problem) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), id.unwrap_or(Value::Null));
    m.insert("error".into(), problem.body());
    Value::Object(m)
}
