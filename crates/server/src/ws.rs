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

use sourced_core::{AggregateId, Command, Position, TenantId, TypeName};
use sourced_engine::{CommandOutcome, Engine, Start, SubscriptionFilter, SubscriptionItem};

use crate::config::WsLimits;
use crate::problem::{Problem, from_engine};
use crate::request::Caller;
use crate::state::{AppState, LiveState};

/// Longest subscription name.
const SUB_NAME_BYTES_MAX: usize = 128;
/// Once the writer has fed this many messages to the socket it takes no more queued items
/// before a flush (the last item may bring up to [`WAKE_EVENTS_MAX`] more).
const WRITE_BATCH_MAX: usize = 64;
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
/// Most events a subscription takes at one wake: one `{"op":"events"}` frame (subscriptions
/// opened with `"batch": true`), or one run of `{"op":"event"}` frames in one queue slot.
const WAKE_EVENTS_MAX: usize = 256;
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
    /// The tenant fixed by the upgrade request (`X-Tenant`), if any.
    pub tenant: Option<TenantId>,
}

/// `GET /ws`: upgrades, with the message and frame size limits set.
pub(crate) async fn upgrade(
    State(s): State<AppState>,
    caller: Result<Caller, Problem>,
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
    let tenant = match caller {
        Ok(caller) => caller.named_tenant().cloned(),
        Err(p) => return p.into_response(),
    };
    let conn = Connection { engine: s.engine.clone(), limits: s.ws.clone(), stats: s.live.clone(), tenant };
    let max = conn.limits.message_bytes_max;
    ws.max_message_size(max).max_frame_size(max).read_buffer_size(READ_BUFFER_BYTES).on_upgrade(move |socket| {
        let (sink, stream) = socket.split();
        serve(sink, stream, conn)
    })
}

/// Why the reader stopped.
enum End {
    /// The client closed or went away.
    Gone,
    /// The server closes with this code and reason.
    Close(u16, String),
}

/// Runs one connection's protocol until the client leaves or is closed.
pub async fn serve<S, R>(sink: S, mut stream: R, conn: Connection)
where
    S: Sink<Message> + Unpin + Send + 'static,
    S::Error: std::fmt::Display + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    conn.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (out, out_rx) = mpsc::channel::<Outbound>(conn.limits.outbound_max);
    let slow = Duration::from_millis(conn.limits.slow_client_timeout_ms);
    let mut writer = tokio::spawn(write_loop(sink, out_rx, slow, conn.stats.clone()));
    let inflight = Arc::new(Semaphore::new(conn.limits.inflight_max));
    let mut tasks = JoinSet::new();
    let mut subs: HashMap<String, AbortHandle> = HashMap::new();
    let mut writer_done = false;
    let closing = conn.stats.closed();
    tokio::pin!(closing);

    let end = loop {
        while tasks.try_join_next().is_some() {}
        // Beyond the in-flight limit, read nothing until a command finishes.
        let permit = tokio::select! {
            p = inflight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break End::Gone,
            },
            _ = &mut writer => { writer_done = true; break End::Gone }
        };
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = &mut writer => { writer_done = true; break End::Gone }
            _ = &mut closing => break End::Close(close_code::AWAY, "the server is shutting down".into()),
        };
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => break End::Gone,
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                break End::Close(close_code::UNSUPPORTED, "binary frames are not supported; send JSON text".into());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(e)) => match too_large(&e) {
                Some(reason) => break End::Close(close_code::SIZE, reason),
                None => {
                    tracing::debug!(error = %e, "WebSocket read failed");
                    break End::Gone;
                }
            },
        };
        // A frame holds the envelope, which holds the body the depth limit is about: two levels more.
        let depth_max = conn.engine.config().limits.json_depth_max + 2;
        let frame = match Frame::parse(text.as_str(), depth_max) {
            Ok(f) => f,
            Err(e) => {
                let (id, problem) = *e;
                if send(&out, error_frame(id, None, &problem)).await.is_err() {
                    break End::Gone;
                }
                continue;
            }
        };
        match frame {
            Frame::Ping => {
                if send(&out, json!({"op": "pong"})).await.is_err() {
                    break End::Gone;
                }
            }
            Frame::Command(envelope) => {
                let (engine, out, tenant) = (conn.engine.clone(), out.clone(), conn.tenant.clone());
                tasks.spawn(async move {
                    let reply = run_command(&engine, envelope, tenant).await;
                    let _ = out.send(Outbound::reply(Message::Text(reply.into()))).await;
                    drop(permit);
                });
            }
            Frame::Subscribe { sub, tenant, filter, start, framing } => {
                subs.retain(|_, h| !h.is_finished());
                let problem = if subs.contains_key(&sub) {
                    Some(Problem::bad_request(
                        format!("subscription '{sub}' is already open on this connection"),
                        vec![],
                    ))
                } else if subs.len() >= conn.limits.subscriptions_max {
                    Some(Problem::too_many_subscriptions(conn.limits.subscriptions_max))
                } else {
                    None
                };
                let tenant = match (tenant, &conn.tenant) {
                    (Some(t), Some(fixed)) if t != *fixed => {
                        let p = Problem::bad_request("the tenant is fixed by the connection's X-Tenant", vec![]);
                        let _ = send(&out, error_frame(None, Some(&sub), &p)).await;
                        continue;
                    }
                    (t, fixed) => t.or_else(|| fixed.clone()).unwrap_or_else(TenantId::default_tenant),
                };
                if let Some(p) = problem {
                    if send(&out, error_frame(None, Some(&sub), &p)).await.is_err() {
                        break End::Gone;
                    }
                    continue;
                }
                let subscription = conn.engine.subscribe(tenant, filter, start);
                let handle =
                    tasks.spawn(run_subscription(subscription, sub.clone(), framing, out.clone(), conn.stats.clone()));
                subs.insert(sub, handle);
            }
            Frame::Unsubscribe { sub } => {
                let reply = match subs.remove(&sub) {
                    Some(h) => {
                        h.abort();
                        json!({"op": "unsubscribed", "sub": sub})
                    }
                    None => error_frame(
                        None,
                        Some(&sub),
                        &Problem::not_found(format!("no subscription '{sub}' on this connection")),
                    ),
                };
                if send(&out, reply).await.is_err() {
                    break End::Gone;
                }
            }
        }
    };

    // Nothing more is produced: stop the tasks, say why (if the server closes), and let the
    // writer finish what is queued; it ends once every sender is gone.
    tasks.shutdown().await;
    if let End::Close(code, reason) = end {
        tracing::debug!(code, %reason, "closing a WebSocket connection");
        let frame = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
        let _ = tokio::time::timeout(slow, out.send(Outbound::reply(frame))).await;
    }
    drop(out);
    if !writer_done {
        let _ = writer.await;
    }
    conn.stats.connections.fetch_sub(1, Ordering::Relaxed);
}

/// A message for the writer, or a subscription's run of event frames taken at one wake.
#[derive(Debug)]
struct Outbound {
    message: Message,
    /// Further frames that go out right after `message` (per-event frames of one wake; empty
    /// otherwise, without allocating). One queue slot holds them all, so a subscription costs
    /// the queue and the writer one hand-over per wake, whatever its framing.
    more: Vec<Message>,
    /// A subscription's event (or caught-up marker): may wait [`EVENT_LINGER`] for company.
    event: bool,
}

impl Outbound {
    fn reply(message: Message) -> Outbound {
        Outbound { message, more: Vec::new(), event: false }
    }

    fn event(message: Message) -> Outbound {
        Outbound { message, more: Vec::new(), event: true }
    }

    /// Feeds every message to `sink`; returns how many.
    async fn feed<S>(self, sink: &mut S) -> Result<usize, S::Error>
    where
        S: Sink<Message> + Unpin,
    {
        let n = 1 + self.more.len();
        sink.feed(self.message).await?;
        for m in self.more {
            sink.feed(m).await?;
        }
        Ok(n)
    }
}

/// The writer: takes queued messages and writes them, flushing when the queue is empty or
/// after [`WRITE_BATCH_MAX`] (events may linger first, see [`EVENT_LINGER`]). A client that
/// takes nothing for `slow` is closed with 1008.
async fn write_loop<S>(mut sink: S, mut queue: mpsc::Receiver<Outbound>, slow: Duration, stats: Arc<LiveState>)
where
    S: Sink<Message> + Unpin + Send + 'static,
    S::Error: std::fmt::Display + Send,
{
    let mut last_flush: Option<tokio::time::Instant> = None;
    while let Some(first) = queue.recv().await {
        stats.outbound_high_water.fetch_max(queue.len() + 1, Ordering::Relaxed);
        let mut closing = matches!(first.message, Message::Close(_));
        let written = tokio::time::timeout(slow, async {
            let mut only_events = first.event;
            let mut n = first.feed(&mut sink).await?;
            let mut lingered = false;
            // A message that ended a linger early, taken first by the loop below.
            let mut woke: Option<Outbound> = None;
            loop {
                while !closing && n < WRITE_BATCH_MAX {
                    let Some(m) = woke.take().or_else(|| queue.try_recv().ok()) else { break };
                    closing = matches!(m.message, Message::Close(_));
                    only_events &= m.event;
                    n += m.feed(&mut sink).await?;
                }
                let linger_until = last_flush.map(|at| at + EVENT_LINGER);
                match linger_until {
                    Some(until) if only_events && !lingered && !closing && n < WRITE_BATCH_MAX => {
                        // Wait for company until `until`, but a reply that comes meanwhile
                        // ends the wait: replies never linger.
                        tokio::select! {
                            biased;
                            m = queue.recv() => match m {
                                Some(m) => woke = Some(m),
                                None => break,
                            },
                            () = tokio::time::sleep_until(until) => lingered = true,
                        }
                    }
                    _ => break,
                }
            }
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            stats.messages_written.fetch_add(n as u64, Ordering::Relaxed);
            sink.flush().await
        })
        .await;
        last_flush = Some(tokio::time::Instant::now());
        match written {
            Ok(Ok(())) if closing => return,
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket write failed");
                return;
            }
            Err(_) => {
                stats.slow_clients_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(timeout_ms = slow.as_millis() as u64, "closing a WebSocket client that stopped reading");
                let reason = format!("the client read nothing for {} ms", slow.as_millis());
                let frame = Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }));
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, sink.send(frame)).await;
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, sink.close()).await;
}

/// Queues one JSON message; fails only when the writer has gone.
async fn send(out: &mpsc::Sender<Outbound>, v: Value) -> Result<(), ()> {
    out.send(Outbound::reply(Message::Text(v.to_string().into()))).await.map_err(|_| ())
}

/// The reason for a 1009 close, when a read failed because a message or frame was too large.
fn too_large(e: &axum::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) = s.downcast_ref::<WsError>() {
            return Some(format!("message of {size} bytes exceeds the limit of {max_size} bytes"));
        }
        source = s.source();
    }
    None
}

/// `{"op":"error","id":…,"sub":…,"error":{problem}}`.
fn error_frame(id: Option<Value>, sub: Option<&str>, problem: &Problem) -> Value {
    let mut m = Map::new();
    m.insert("op".into(), Value::from("error"));
    if let Some(sub) = sub {
        m.insert("sub".into(), Value::from(sub));
    } else {
        m.insert("id".into(), id.unwrap_or(Value::Null));
    }
    m.insert("error".into(), problem.body());
    Value::Object(m)
}

/// The reply to one command that went through, as the WebSocket (`op: "result"`) and
/// Socket.IO (no `op`) send it: the command result's fields, and `"replayed": true` on a retry.
/// Serialised straight from the result, without an intermediate `Value`.
#[derive(serde::Serialize)]
pub(crate) struct ResultReply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'static str>,
    #[serde(flatten)]
    result: &'a sourced_engine::CommandResult,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

impl<'a> ResultReply<'a> {
    pub(crate) fn new(op: Option<&'static str>, outcome: &'a CommandOutcome) -> ResultReply<'a> {
        ResultReply { op, result: &outcome.result, replayed: outcome.replayed }
    }

    /// The command id and the problem, for a reply that could not be serialised.
    pub(crate) fn unserialisable(&self, e: &serde_json::Error) -> (Option<Value>, Problem) {
        (Some(Value::from(self.result.id.to_string())), Problem::internal(e))
    }
}

/// One command, as `POST /commands` runs it; the reply frame as text.
async fn run_command(engine: &Engine, envelope: Value, tenant: Option<TenantId>) -> String {
    let (id, problem) = match execute_envelope(engine, envelope, tenant).await {
        Ok(outcome) => {
            let reply = ResultReply::new(Some("result"), &outcome);
            match serde_json::to_string(&reply) {
                Ok(text) => return text,
                Err(e) => reply.unserialisable(&e),
            }
        }
        Err(e) => *e,
    };
    error_frame(id, None, &problem).to_string()
}

/// A command envelope that failed: the command id, if one was found, and the problem (boxed:
/// the error path is rare and the problem large).
pub(crate) type EnvelopeError = Box<(Option<Value>, Problem)>;

/// One command envelope through the pipeline of `POST /commands` (shared by the WebSocket and
/// Socket.IO APIs): its outcome, or the problem. `tenant` is the one the connection fixes, if
/// any.
pub(crate) async fn execute_envelope(
    engine: &Engine,
    envelope: Value,
    tenant: Option<TenantId>,
) -> Result<CommandOutcome, EnvelopeError> {
    let id = envelope.get("id").filter(|v| v.is_string()).cloned();
    let tenant_fixed = tenant.is_some();
    let defaults =
        sourced_engine::fresh::envelope_defaults(tenant.unwrap_or_else(TenantId::default_tenant), tenant_fixed);
    let cmd = match Command::from_envelope_value(envelope, defaults) {
        Ok(c) => c,
        Err(e) => return Err(Box::new((id, Problem::from(e)))),
    };
    let cmd_id = cmd.id;
    engine
        .execute(cmd, None)
        .await
        .map_err(|e| Box::new((Some(Value::from(cmd_id.to_string())), from_engine(e, false))))
}

/// How a subscription's events are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// One `{"op":"event","sub":…,"event":{…}}` frame per event (SPEC §3.2).
    PerEvent,
    /// `{"op":"events","sub":…,"events":[{…},…]}`: every event at hand when the subscription
    /// wakes, in position order, up to [`WAKE_EVENTS_MAX`] and about [`WAKE_EVENT_BYTES`].
    /// With many subscribers the cost per frame (queueing, WebSocket framing, the client's
    /// parse) dominates the cost per event; a client that can take arrays opts in.
    Batched,
}

/// Feeds one subscription to the outbound queue until it fails or the client goes. Each wake
/// takes every event at hand (within [`WAKE_EVENTS_MAX`] and [`WAKE_EVENT_BYTES`]) and queues
/// it as one item: one batched frame, or a run of per-event frames.
async fn run_subscription(
    mut subscription: sourced_engine::Subscription,
    sub: String,
    framing: Framing,
    out: mpsc::Sender<Outbound>,
    stats: Arc<LiveState>,
) {
    let sub_json = Value::from(sub.as_str()).to_string();
    let mut lagged = 0;
    let mut last_wait: Option<tokio::time::Instant> = None;
    // An item taken while filling a batched frame that does not belong in it (the caught-up
    // marker or an error): it goes next.
    let mut held = None;
    loop {
        // Under load, let events gather: a subscription that waited for its last item less
        // than EVENT_LINGER ago waits out the rest first, so it (and the writer) wake once
        // per batch of events rather than once per event (see `EVENT_LINGER`).
        let item = match held.take().or_else(|| subscription.try_next()) {
            Some(item) => item,
            None => {
                if let Some(at) = last_wait
                    && at.elapsed() < EVENT_LINGER
                {
                    tokio::time::sleep_until(at + EVENT_LINGER).await;
                }
                last_wait = Some(tokio::time::Instant::now());
                subscription.next().await
            }
        };
        let outbound = match item {
            // The event's JSON is made once for all subscribers (`SharedEvent`), then framed.
            Ok(SubscriptionItem::Event(e)) => match at_hand(&mut subscription, &e, &mut held) {
                Ok(events) => match framing {
                    Framing::PerEvent => {
                        let mut frames = events.iter().map(|e| Message::Text(event_frame(&sub_json, e).into()));
                        let first = frames.next().expect("a wake takes at least its first event");
                        Outbound { message: first, more: frames.collect(), event: true }
                    }
                    Framing::Batched => Outbound::event(Message::Text(batch_frame(&sub_json, &events).into())),
                },
                Err(err) => {
                    let _ = send(&out, error_frame(None, Some(&sub), &Problem::internal(&err))).await;
                    return;
                }
            },
            Ok(SubscriptionItem::CaughtUp(p)) => {
                Outbound::event(Message::Text(json!({"op": "caught-up", "sub": sub, "position": p}).to_string().into()))
            }
            Err(e) => {
                let _ = send(&out, error_frame(None, Some(&sub), &Problem::from(e))).await;
                return;
            }
        };
        if subscription.lag_recoveries() > lagged {
            stats.subscription_lag_recoveries.fetch_add(subscription.lag_recoveries() - lagged, Ordering::Relaxed);
            lagged = subscription.lag_recoveries();
        }
        if out.send(outbound).await.is_err() {
            return;
        }
    }
}

/// The JSON of `first` and of the events the subscription has at hand (without waiting or
/// reading the store), within [`WAKE_EVENTS_MAX`] and [`WAKE_EVENT_BYTES`]. An item that is not
/// an event is left in `held`, to go out next.
fn at_hand(
    subscription: &mut sourced_engine::Subscription,
    first: &sourced_engine::SharedEvent,
    held: &mut Option<Result<SubscriptionItem, sourced_store::StoreError>>,
) -> Result<Vec<Arc<str>>, String> {
    let mut events = vec![first.json()?];
    let mut len = events[0].len();
    while events.len() < WAKE_EVENTS_MAX && len < WAKE_EVENT_BYTES {
        match subscription.try_next() {
            Some(Ok(SubscriptionItem::Event(e))) => {
                let json = e.json()?;
                len += json.len() + 1;
                events.push(json);
            }
            Some(other) => {
                *held = Some(other);
                break;
            }
            None => break,
        }
    }
    Ok(events)
}

/// `{"op":"event","sub":…,"event":…}`, built with one allocation.
fn event_frame(sub_json: &str, event: &str) -> String {
    const HEAD: &str = r#"{"op":"event","sub":"#;
    const MIDDLE: &str = r#","event":"#;
    let mut frame = String::with_capacity(HEAD.len() + sub_json.len() + MIDDLE.len() + event.len() + 1);
    frame.push_str(HEAD);
    frame.push_str(sub_json);
    frame.push_str(MIDDLE);
    frame.push_str(event);
    frame.push('}');
    frame
}

/// `{"op":"events","sub":…,"events":[…]}`, built with one allocation.
fn batch_frame(sub_json: &str, events: &[Arc<str>]) -> String {
    const HEAD: &str = r#"{"op":"events","sub":"#;
    const MIDDLE: &str = r#","events":["#;
    let len: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut frame = String::with_capacity(HEAD.len() + sub_json.len() + MIDDLE.len() + len + 2);
    frame.push_str(HEAD);
    frame.push_str(sub_json);
    frame.push_str(MIDDLE);
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            frame.push(',');
        }
        frame.push_str(event);
    }
    frame.push_str("]}");
    frame
}

/// A parsed client frame.
#[derive(Debug)]
enum Frame {
    Command(Value),
    /// `framing` is `Batched` when the frame asked for `"batch": true`.
    Subscribe {
        sub: String,
        tenant: Option<TenantId>,
        filter: SubscriptionFilter,
        start: Start,
        framing: Framing,
    },
    Unsubscribe {
        sub: String,
    },
    Ping,
}

/// A frame that cannot be used: the command id, if one was found, and the problem (boxed:
/// the error path is rare and the problem large).
type FrameError = Box<(Option<Value>, Problem)>;

impl Frame {
    fn parse(text: &str, depth_max: usize) -> Result<Frame, FrameError> {
        let bad = |detail: String| Box::new((None, Problem::bad_request(detail, vec![])));
        let v: Value = sourced_core::json::parse(text.as_bytes(), depth_max).map_err(|e| {
            let p = match e {
                sourced_core::json::JsonError::Syntax(e) => {
                    Problem::bad_request(format!("the frame is not valid JSON: {e}"), vec![])
                }
                other => Problem::from(other),
            };
            Box::new((None, p))
        })?;
        let Value::Object(mut m) = v else { return Err(bad("a frame must be a JSON object".into())) };
        let op = match m.remove("op") {
            Some(Value::String(op)) => op,
            Some(_) => return Err(bad("'op' must be a string".into())),
            None => return Err(bad("the frame has no 'op'".into())),
        };
        let known: &[&str] = match op.as_str() {
            "command" => &["command"],
            "subscribe" => &["sub", "tenant", "filter", "after", "batch"],
            "unsubscribe" => &["sub"],
            "ping" => &[],
            other => {
                return Err(bad(format!("unknown op '{other}'; expected command, subscribe, unsubscribe or ping")));
            }
        };
        if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
            let id = m.get("command").and_then(|c| c.get("id")).filter(|v| v.is_string()).cloned();
            return Err(Box::new((id, Problem::bad_request(format!("unknown field '{k}' in a '{op}' frame"), vec![]))));
        }
        match op.as_str() {
            "command" => match m.remove("command") {
                Some(c @ Value::Object(_)) => Ok(Frame::Command(c)),
                Some(_) => Err(bad("'command' must be an object (the command envelope)".into())),
                None => Err(bad("a 'command' frame needs the field 'command' (the command envelope)".into())),
            },
            "subscribe" => {
                let sub = sub_name(m.remove("sub")).map_err(bad)?;
                let tenant = match m.remove("tenant") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(t)) => {
                        Some(TenantId::parse(&t).map_err(|e| bad(format!("invalid tenant: {}", e.message)))?)
                    }
                    Some(_) => return Err(bad("'tenant' must be a string".into())),
                };
                let filter = filter(m.remove("filter")).map_err(bad)?;
                let start = match m.remove("after") {
                    None | Some(Value::Null) => Start::Beginning,
                    Some(Value::String(s)) if s == "now" => Start::Now,
                    Some(Value::Number(n)) if n.as_u64().is_some() => Start::After(Position(n.as_u64().unwrap_or(0))),
                    Some(_) => return Err(bad("'after' must be a position (a whole number) or \"now\"".into())),
                };
                let framing = match m.remove("batch") {
                    None | Some(Value::Null | Value::Bool(false)) => Framing::PerEvent,
                    Some(Value::Bool(true)) => Framing::Batched,
                    Some(_) => return Err(bad("'batch' must be true or false".into())),
                };
                Ok(Frame::Subscribe { sub, tenant, filter, start, framing })
            }
            "unsubscribe" => Ok(Frame::Unsubscribe { sub: sub_name(m.remove("sub")).map_err(bad)? }),
            _ => Ok(Frame::Ping),
        }
    }
}

fn sub_name(v: Option<Value>) -> Result<String, String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= SUB_NAME_BYTES_MAX => Ok(s),
        Some(Value::String(_)) => Err(format!("'sub' must be 1 to {SUB_NAME_BYTES_MAX} bytes")),
        Some(_) => Err("'sub' must be a string".into()),
        None => Err("the frame needs 'sub', the subscription's name".into()),
    }
}

/// `{"targetName": …, "targetId": …}`, both optional.
fn filter(v: Option<Value>) -> Result<SubscriptionFilter, String> {
    let m = match v {
        None | Some(Value::Null) => return Ok(SubscriptionFilter::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("'filter' must be an object".into()),
    };
    let mut f = SubscriptionFilter::default();
    for (k, v) in m {
        let s = v.as_str().ok_or_else(|| format!("filter.{k} must be a string"))?;
        match k.as_str() {
            "targetName" => {
                f.target_name = Some(TypeName::parse(s).map_err(|e| format!("filter.targetName: {}", e.message))?)
            }
            "targetId" => {
                f.target_id = Some(AggregateId::parse(s).map_err(|e| format!("filter.targetId: {}", e.message))?)
            }
            other => return Err(format!("unknown filter field '{other}'; known: targetName, targetId")),
        }
    }
    Ok(f)
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
        let conn = Connection { engine, limits, stats: Arc::default(), tenant: None };
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
