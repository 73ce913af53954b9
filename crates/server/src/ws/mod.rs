//! The WebSocket API (`GET /ws`, SPEC §3.2): JSON text frames carrying commands (the same
//! pipeline and problem objects as `POST /commands`), subscriptions (SPEC §6) and pings.
//!
//! The protocol is written against a generic `Sink`/`Stream` of [`Message`]s ([`serve`]), so
//! unit tests drive it with channels. One connection is three kinds of task: the reader (this
//! function's loop: parses frames, starts commands and subscriptions), one task per command in
//! flight and per subscription (each puts its replies on the outbound queue), and the writer
//! (takes from the outbound queue and writes to the socket). Every queue is bounded:
//! - commands in flight: a semaphore of `WS_INFLIGHT_MAX` permits; the reader takes a permit
//!   before it reads a frame, so beyond the limit it stops reading (TCP pushes back);
//! - the outbound queue: `WS_OUTBOUND_MAX` messages; producers wait when it is full, so a slow
//!   client slows its own commands, and its subscriptions fall behind the live buffer and go
//!   back to reading the store (no per-subscriber buffer grows);
//! - a client that takes nothing for `WS_SLOW_CLIENT_TIMEOUT_MS` is closed with 1008.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade, close_code};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use sourced_core::{AggregateId, Position, TenantId, TypeName};
use sourced_engine::{CommandOutcome, Engine, Start, SubscriptionFilter, SubscriptionItem};

use crate::config::WsLimits;
use crate::problem::Problem;
use crate::request::Caller;
use crate::state::{AppState, LiveState};

mod frames;
mod outbound;
mod protocol;

use crate::commands::{Sender, execute_envelope};
pub(crate) use frames::ResultReply;
use frames::*;
use outbound::*;
pub use protocol::serve;
use protocol::*;

use crate::limits::SUB_NAME_BYTES_MAX;

use crate::limits::WRITE_BATCH_MAX;

/// When only subscription events are queued and the writer flushed less than this long ago,
/// it waits out the rest before flushing, so that under load one write carries several
/// events: each write is a system call and a TCP segment on both ends. A subscription that
/// woke less than this long ago waits likewise before taking more events. Replies to commands
/// never wait. The timer's resolution is 1 ms, so an event may wait up to about 1.5 ms.
/// Measured with 100 subscribers on 2 cores (docs/benchmarks.md, "Event linger"): 0.5 ms gave
/// the same CPU per delivery as 2 ms and a lower p99, because under load events gather while
/// the CPU is busy anyway.
const EVENT_LINGER: Duration = Duration::from_micros(500);

/// The connection's read buffer. tungstenite's default (128 KiB) is zero-filled on every read,
/// which cost more CPU than anything else once a server fed 100 subscribers; larger messages
/// still arrive whole (the buffer grows as a frame needs).
const READ_BUFFER_BYTES: usize = 8 * 1024;

use crate::limits::WAKE_EVENTS_MAX;

/// A wake takes no further event once its events are this long; a single event longer than
/// this still goes, alone.
const WAKE_EVENT_BYTES: usize = 64 * 1024;

/// How long the writer tries to deliver its close frame to a client that has stopped reading.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What one connection needs.
#[derive(Clone)]
pub struct Connection {
    /// The command pipeline and subscriptions.
    pub engine: Engine,
    /// The limits.
    pub limits: WsLimits,
    /// Counters.
    pub stats: Arc<LiveState>,
    /// Who opened it (the upgrade request's credential and `X-Tenant`): its tenant, if fixed,
    /// and what it may do. Not yet known while `pending` is set.
    pub caller: Caller,
    /// With authentication on and no credential in the upgrade's headers (a browser cannot
    /// send one): the first frame must be `{"op":"auth","token":…}`, resolved with these
    /// headers (`X-Tenant`) by this gate before any other frame is read.
    pub pending: Option<(axum::http::HeaderMap, Arc<crate::auth::Gate>)>,
    /// Rate limits: every command on the connection takes a token of its caller's bucket.
    pub rate_limit: Option<(Arc<crate::ratelimit::RateLimiter>, Option<std::net::SocketAddr>)>,
}

/// `GET /ws`: upgrades, with the message and frame size limits set.
pub(crate) async fn upgrade(
    State(s): State<AppState>,
    caller: Result<Caller, Problem>,
    headers: axum::http::HeaderMap,
    guard: Option<axum::Extension<axum::extract::ConnectInfo<crate::stall::StallGuard>>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // A plain GET (no upgrade headers) is a client error like any other: a problem, not
    // axum's text/plain rejection.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status();
            let detail = format!("{}: /ws is a WebSocket endpoint", rejection.body_text());
            return Problem::websocket_required(status, detail).into_response();
        }
    };
    let (caller, pending) = match caller {
        Ok(caller) => (caller, None),
        // No credential: the first frame may bring it (`serve` resolves it before anything else).
        Err(p) if p.slug == "credential-missing" => match Caller::from_headers(&headers) {
            Ok(placeholder) => (placeholder, Some((headers, s.gate.clone()))),
            Err(p) => return p.into_response(),
        },
        Err(p) => return p.into_response(),
    };
    let rate_limit = s.rate_limit.clone().map(|l| (l, guard.and_then(|g| g.0.0.peer())));
    let conn = Connection {
        engine: s.engine.clone(),
        limits: s.ws.clone(),
        stats: s.live.clone(),
        caller,
        pending,
        rate_limit,
    };
    let max = conn.limits.message_bytes_max;
    ws.max_message_size(max).max_frame_size(max).read_buffer_size(READ_BUFFER_BYTES).on_upgrade(move |socket| {
        let (sink, stream) = socket.split();
        serve(sink, stream, conn)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;

    use sourced_engine::{EngineConfig, SystemClock};
    use sourced_store::sqlite::{SqliteOptions, SqliteStore};

    /// A connection driven through channels: what the client sends, what it receives.
    struct Harness {
        to_server: mpsc::Sender<Result<Message, axum::Error>>,
        from_server: mpsc::Receiver<Message>,
        _dir: tempfile::TempDir,
    }

    type TestSink = Pin<Box<dyn Sink<Message, Error = axum::Error> + Send>>;

    /// A sink that hands every message written to it to the returned receiver.
    fn recording_sink() -> (TestSink, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel::<Message>(1024);
        let sink = futures_util::sink::unfold(tx, |tx, m: Message| async move {
            tx.send(m).await.map_err(|_| axum::Error::new("closed"))?;
            Ok::<_, axum::Error>(tx)
        });
        (Box::pin(sink), rx)
    }

    fn harness(limits: WsLimits) -> Harness {
        let dir = tempfile::TempDir::new().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), SqliteOptions::default()).unwrap();
        let engine = Engine::new(Arc::new(store), EngineConfig::default(), Arc::new(SystemClock));
        let (to_server, rx) = mpsc::channel(16);
        let (sink, from_server) = recording_sink();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let caller = Caller::from_headers(&axum::http::HeaderMap::new()).unwrap();
        let conn = Connection { engine, limits, stats: Arc::default(), caller, pending: None, rate_limit: None };
        tokio::spawn(serve(sink, Box::pin(stream), conn));
        Harness { to_server, from_server, _dir: dir }
    }

    fn limits() -> WsLimits {
        WsLimits {
            inflight_max: 4,
            message_bytes_max: 1 << 20,
            subscriptions_max: 2,
            outbound_max: 16,
            slow_client_timeout_ms: 10_000,
            sse_streams_max: 4,
            sse_slow_client_timeout_ms: 10_000,
        }
    }

    impl Harness {
        async fn send(&self, v: Value) {
            self.to_server.send(Ok(Message::Text(v.to_string().into()))).await.unwrap();
        }
        async fn recv(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(10), self.from_server.recv()).await.unwrap().unwrap()
        }
        async fn recv_json(&mut self) -> Value {
            match self.recv().await {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn malformed_frames_get_errors_and_the_connection_stays() {
        let mut h = harness(limits());
        h.to_server.send(Ok(Message::Text("{nope".into()))).await.unwrap();
        let e = h.recv_json().await;
        assert_eq!(e["op"], "error");
        assert_eq!(e["id"], Value::Null);
        assert!(e["error"]["detail"].as_str().unwrap().contains("not valid JSON"), "{e}");
        for (frame, needle) in [
            (json!({"op": "fly"}), "unknown op 'fly'"),
            (json!({"x": 1}), "no 'op'"),
            (json!({"op": "command"}), "needs the field 'command'"),
            (json!({"op": "subscribe"}), "needs 'sub'"),
            (json!({"op": "subscribe", "sub": "s", "after": "later"}), "'after'"),
            (json!({"op": "subscribe", "sub": "s", "batch": "yes"}), "'batch' must be true or false"),
            (json!({"op": "ping", "extra": true}), "unknown field 'extra'"),
        ] {
            h.send(frame).await;
            let e = h.recv_json().await;
            assert_eq!(e["op"], "error", "{e}");
            assert_eq!(e["error"]["status"], 400, "{e}");
            assert!(e["error"]["detail"].as_str().unwrap().contains(needle), "{needle}: {e}");
        }
        // Frames are read by the faithful reader: what could not be stored as sent is refused.
        let command = |body: &str| {
            format!(r#"{{"op":"command","command":{{"type":"create","targetName":"order","body":{body}}}}}"#)
        };
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        for (text, status, slug) in [
            (command(r#"{"a":1,"a":2}"#), 400, "invalid-json"),
            (command(r#"{"a":123456789012345678901234567890}"#), 422, "unstorable-value"),
            (command(r#"{"a":"\u0000"}"#), 422, "unstorable-value"),
            (command(&deep), 422, "too-deep"),
        ] {
            h.to_server.send(Ok(Message::Text(text.into()))).await.unwrap();
            let e = h.recv_json().await;
            assert_eq!(e["error"]["status"], status, "{e}");
            assert_eq!(e["error"]["type"], format!("urn:sourced:problem:{slug}"), "{e}");
        }
        h.send(json!({"op": "ping"})).await;
        assert_eq!(h.recv_json().await, json!({"op": "pong"}));
    }

    #[tokio::test]
    async fn a_batched_subscription_gets_arrays_of_events_then_the_marker() {
        let mut h = harness(limits());
        for i in 0..5 {
            let id = format!("0190a0b0-0000-7000-8000-0000000001{i:02}");
            h.send(json!({"op": "command", "command": {"id": id, "type": "create", "targetName": "order", "targetId": format!("o{i}"), "body": {"n": i}}})).await;
            assert_eq!(h.recv_json().await["op"], "result");
        }
        // Catching up reads one page: its five events go in one frame, then the marker.
        h.send(json!({"op": "subscribe", "sub": "b", "batch": true})).await;
        let frame = h.recv_json().await;
        assert_eq!(frame["op"], "events", "{frame}");
        assert_eq!(frame["sub"], "b");
        let positions: Vec<u64> =
            frame["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
        assert_eq!(positions, [1, 2, 3, 4, 5]);
        assert_eq!(frame["events"][4]["targetId"], "o4");
        assert_eq!(h.recv_json().await, json!({"op": "caught-up", "sub": "b", "position": 5}));
        // Live events too come in `events` frames, in order, each once.
        for i in 5..8 {
            let id = format!("0190a0b0-0000-7000-8000-0000000001{i:02}");
            h.send(json!({"op": "command", "command": {"id": id, "type": "create", "targetName": "order", "targetId": format!("o{i}"), "body": {"n": i}}})).await;
        }
        let (mut live, mut results) = (Vec::new(), 0);
        while live.len() < 3 || results < 3 {
            let m = h.recv_json().await;
            match m["op"].as_str() {
                Some("result") => results += 1,
                Some("events") => live.extend(m["events"].as_array().unwrap().iter().map(|e| e["position"].clone())),
                _ => panic!("unexpected {m}"),
            }
        }
        assert_eq!(live, [json!(6), json!(7), json!(8)]);
    }

    #[tokio::test]
    async fn commands_and_a_subscription_over_channels() {
        let mut h = harness(limits());
        h.send(json!({"op": "subscribe", "sub": "s1", "filter": {"targetName": "order"}})).await;
        assert_eq!(h.recv_json().await, json!({"op": "caught-up", "sub": "s1", "position": 0}));
        let id = "0190a0b0-0000-7000-8000-0000000000aa";
        h.send(json!({"op": "command", "command": {"id": id, "type": "create", "targetName": "order", "targetId": "o1", "body": {"n": 1}}})).await;
        // The event and the result, in either order.
        let (a, b) = (h.recv_json().await, h.recv_json().await);
        let (result, event) = if a["op"] == "result" { (a, b) } else { (b, a) };
        assert_eq!(result["id"], id);
        assert_eq!(result["version"], 1);
        assert_eq!(event["op"], "event");
        assert_eq!(event["event"]["targetId"], "o1");
        assert_eq!(event["event"]["position"], 1);
        // Too many subscriptions, a duplicate name, unsubscribe.
        h.send(json!({"op": "subscribe", "sub": "s1"})).await;
        assert!(h.recv_json().await["error"]["detail"].as_str().unwrap().contains("already open"));
        h.send(json!({"op": "subscribe", "sub": "s2", "after": "now"})).await;
        assert_eq!(h.recv_json().await, json!({"op": "caught-up", "sub": "s2", "position": 1}));
        h.send(json!({"op": "subscribe", "sub": "s3"})).await;
        assert_eq!(h.recv_json().await["error"]["status"], 429);
        h.send(json!({"op": "unsubscribe", "sub": "s2"})).await;
        assert_eq!(h.recv_json().await, json!({"op": "unsubscribed", "sub": "s2"}));
    }

    #[tokio::test]
    async fn binary_frames_close_the_connection() {
        let mut h = harness(limits());
        h.to_server.send(Ok(Message::Binary(vec![1, 2].into()))).await.unwrap();
        match h.recv().await {
            Message::Close(Some(f)) => assert_eq!(f.code, close_code::UNSUPPORTED),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    /// Messages queued together go out in one write; a reply among events does not wait.
    #[tokio::test]
    async fn queued_messages_share_one_write() {
        let (sink, mut written) = recording_sink();
        let (out, queue) = mpsc::channel::<Outbound>(64);
        for i in 0..10 {
            let message = Message::Text(format!("e{i}").into());
            out.send(Outbound::event(message)).await.unwrap();
        }
        out.send(Outbound::reply(Message::Text("r".into()))).await.unwrap();
        let stats = Arc::new(LiveState::default());
        let writer = tokio::spawn(write_loop(sink, queue, Duration::from_secs(5), stats.clone()));
        for i in 0..10 {
            assert_eq!(written.recv().await.unwrap(), Message::Text(format!("e{i}").into()));
        }
        assert_eq!(written.recv().await.unwrap(), Message::Text("r".into()));
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(stats.messages_written.load(Ordering::Relaxed), 11);
        // Events right after a write wait for company, then go out together.
        for i in 0..3 {
            out.send(Outbound::event(Message::Text(format!("late{i}").into()))).await.unwrap();
        }
        for i in 0..3 {
            assert_eq!(written.recv().await.unwrap(), Message::Text(format!("late{i}").into()));
        }
        drop(out);
        writer.await.unwrap();
        assert_eq!(stats.messages_written.load(Ordering::Relaxed), 14);
        assert!(stats.flushes.load(Ordering::Relaxed) <= 4);
    }

    /// A subscription's run of per-event frames fills one queue slot and goes out in order,
    /// before what was queued after it.
    #[tokio::test]
    async fn a_run_of_event_frames_takes_one_slot() {
        let (sink, mut written) = recording_sink();
        // Room for one item: the run must fit in it for the reply to be queued at all.
        let (out, queue) = mpsc::channel::<Outbound>(1);
        let more = (1..10).map(|i| Message::Text(format!("e{i}").into())).collect();
        out.send(Outbound { message: Message::Text("e0".into()), more, event: true }).await.unwrap();
        assert!(out.try_send(Outbound::reply(Message::Text("r".into()))).is_err(), "one slot, taken by the run");
        let stats = Arc::new(LiveState::default());
        let writer = tokio::spawn(write_loop(sink, queue, Duration::from_secs(5), stats.clone()));
        out.send(Outbound::reply(Message::Text("r".into()))).await.unwrap();
        for i in 0..10 {
            assert_eq!(written.recv().await.unwrap(), Message::Text(format!("e{i}").into()));
        }
        assert_eq!(written.recv().await.unwrap(), Message::Text("r".into()));
        drop(out);
        writer.await.unwrap();
        assert_eq!(stats.messages_written.load(Ordering::Relaxed), 11);
    }

    /// A reply that arrives while events linger goes out at once, with them. The clock is
    /// tokio's paused one: it moves only when every task waits, so "at once" is exact.
    #[tokio::test(start_paused = true)]
    async fn a_reply_ends_the_linger() {
        // The test's sink sends what it is given when the writer flushes (a `sink::unfold`
        // runs its step on the next readiness or flush call), so arrival here means written.
        let (tx, mut written) = mpsc::channel::<(Message, tokio::time::Instant)>(64);
        let sink = futures_util::sink::unfold(tx, |tx, m: Message| async move {
            tx.send((m, tokio::time::Instant::now())).await.map_err(|_| axum::Error::new("closed"))?;
            Ok::<_, axum::Error>(tx)
        });
        let (out, queue) = mpsc::channel::<Outbound>(64);
        let stats = Arc::new(LiveState::default());
        let writer = tokio::spawn(write_loop(Box::pin(sink), queue, Duration::from_secs(5), stats.clone()));
        out.send(Outbound::event(Message::Text("e0".into()))).await.unwrap();
        let (_, first_at) = written.recv().await.unwrap();
        // Right after that write, the next event lingers for company.
        out.send(Outbound::event(Message::Text("e1".into()))).await.unwrap();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(written.try_recv().is_err(), "e1 is lingering");
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 1);
        out.send(Outbound::reply(Message::Text("r".into()))).await.unwrap();
        for expected in ["e1", "r"] {
            let (m, at) = written.recv().await.unwrap();
            assert_eq!(m, Message::Text(expected.into()));
            assert_eq!(at, first_at, "{expected} went out with the reply, without waiting out the linger");
        }
        drop(out);
        writer.await.unwrap();
        assert_eq!(stats.flushes.load(Ordering::Relaxed), 2);
        assert_eq!(stats.messages_written.load(Ordering::Relaxed), 3);
    }
}
