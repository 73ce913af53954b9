//! The protocol loop of one connection: the reader (frames in, commands and subscriptions
//! started, each as its own task), how it ends, and the tasks it starts.

use super::*;

/// Why the reader stopped.
pub(super) enum End {
    /// The client closed or went away.
    Gone,
    /// The server closes with this code and reason.
    Close(u16, String),
}

/// Runs one connection's protocol until the client leaves or is closed.
pub async fn serve<S, R>(sink: S, mut stream: R, mut conn: Connection)
where
    S: Sink<Message> + Unpin + Send + 'static,
    S::Error: std::fmt::Display + Send,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    conn.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (out, out_rx) = mpsc::channel::<Outbound>(conn.limits.outbound_max);
    let slow = Duration::from_millis(conn.limits.slow_client_timeout_ms);
    let mut writer = tokio::spawn(write_loop(sink, out_rx, slow, conn.stats.clone()));
    // Authentication first: nothing else is read until the caller is known.
    if let Some((headers, gate)) = conn.pending.take() {
        match first_frame_auth(&mut stream, &headers, &gate, &conn.engine, slow).await {
            Ok(caller) => {
                let principal = caller.principal().map(sourced_core::Principal::to_json);
                let _ = send(&out, json!({"op": "authenticated", "principal": principal})).await;
                conn.caller = caller;
            }
            Err(reason) => {
                let frame = Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }));
                let _ = tokio::time::timeout(slow, out.send(Outbound::reply(frame))).await;
                drop(out);
                let _ = writer.await;
                conn.stats.connections.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // A token's connection ends when the token does (1008).
    let expired = conn.caller.expired();
    tokio::pin!(expired);
    let inflight = Arc::new(Semaphore::new(conn.limits.inflight_max));
    let mut session = Session { conn: &conn, out: out.clone(), tasks: JoinSet::new(), subs: HashMap::new() };
    let mut writer_done = false;
    let closing = conn.stats.closed();
    tokio::pin!(closing);

    let end = loop {
        while session.tasks.try_join_next().is_some() {}
        // Beyond the in-flight limit, read nothing until a command finishes.
        let permit = tokio::select! {
            p = inflight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break End::Gone,
            },
            _ = &mut writer => { writer_done = true; break End::Gone }
        };
        let message = tokio::select! {
            m = stream.next() => m,
            _ = &mut writer => { writer_done = true; break End::Gone }
            _ = &mut closing => break End::Close(close_code::AWAY, "the server is shutting down".into()),
            _ = &mut expired => break End::Close(close_code::POLICY, "token-expired".into()),
        };
        let text = match text_of(message) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(end) => break end,
        };
        // A frame holds the envelope, which holds the body the depth limit is about: two levels more.
        let depth_max = conn.engine.config().limits.json_depth_max + 2;
        let handled = match Frame::parse(text.as_str(), depth_max) {
            Ok(frame) => session.frame(frame, permit).await,
            Err(e) => {
                let (id, problem) = *e;
                session.send(error_frame(id, None, &problem)).await
            }
        };
        if let Err(end) = handled {
            break end;
        }
    };

    // Nothing more is produced: stop the tasks, say why (if the server closes), and let the
    // writer finish what is queued; it ends once every sender is gone.
    session.tasks.shutdown().await;
    drop(session);
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

/// The caller named by the first frame, `{"op":"auth","token":…}`, read within `wait`; else
/// the reason to close with 1008 (the refusal's slug, or what was wrong with the frame).
async fn first_frame_auth<R>(
    stream: &mut R,
    headers: &axum::http::HeaderMap,
    gate: &crate::auth::Gate,
    engine: &Engine,
    wait: Duration,
) -> Result<Caller, String>
where
    R: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let first = loop {
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => return Err("credential-missing: no auth frame in time".into()),
            Ok(m) => match text_of(m) {
                Ok(Some(text)) => break text,
                Ok(None) => continue,
                Err(_) => return Err("credential-missing: the connection ended before its auth frame".into()),
            },
        }
    };
    let v: Value = serde_json::from_str(first.as_str()).unwrap_or(Value::Null);
    let token = match (v.get("op").and_then(Value::as_str), v.get("token").and_then(Value::as_str)) {
        (Some("auth"), Some(token)) => token,
        _ => return Err("credential-missing: the first frame must be {\"op\":\"auth\",\"token\":…}".into()),
    };
    Caller::resolve_token(headers, Some(token), gate, engine).map_err(|p| p.slug.to_owned())
}

/// What one read from the client means: a text frame to parse, nothing to do (pings and
/// pongs), or the end of the connection.
fn text_of(message: Option<Result<Message, axum::Error>>) -> Result<Option<axum::extract::ws::Utf8Bytes>, End> {
    match message {
        None | Some(Ok(Message::Close(_))) => Err(End::Gone),
        Some(Ok(Message::Text(t))) => Ok(Some(t)),
        Some(Ok(Message::Binary(_))) => {
            Err(End::Close(close_code::UNSUPPORTED, "binary frames are not supported; send JSON text".into()))
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
        Some(Err(e)) => match too_large(&e) {
            Some(reason) => Err(End::Close(close_code::SIZE, reason)),
            None => {
                tracing::debug!(error = %e, "WebSocket read failed");
                Err(End::Gone)
            }
        },
    }
}

/// The reader's side of one connection: the queue to the writer, the tasks it started, and
/// its subscriptions by name. Each method answers `Err(End::Gone)` once the writer is gone.
struct Session<'a> {
    conn: &'a Connection,
    out: mpsc::Sender<Outbound>,
    tasks: JoinSet<()>,
    subs: HashMap<String, AbortHandle>,
}

impl Session<'_> {
    async fn send(&self, v: Value) -> Result<(), End> {
        send(&self.out, v).await.map_err(|()| End::Gone)
    }

    /// Carries out one frame; a command keeps `permit` (its place in flight) until it is done.
    async fn frame(&mut self, frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) -> Result<(), End> {
        match frame {
            Frame::Ping => self.send(json!({"op": "pong"})).await,
            Frame::Command(envelope) => {
                if let Some((limiter, peer)) = &self.conn.rate_limit
                    && let Err(p) = self.conn.caller.take_token(limiter, *peer)
                {
                    let id = envelope.get("id").filter(|v| v.is_string()).cloned();
                    return self.send(error_frame(id, None, &p)).await;
                }
                let (engine, out, caller) = (self.conn.engine.clone(), self.out.clone(), self.conn.caller.clone());
                self.tasks.spawn(async move {
                    let reply = run_command(&engine, envelope, &caller).await;
                    let _ = out.send(Outbound::reply(Message::Text(reply.into()))).await;
                    drop(permit);
                });
                Ok(())
            }
            Frame::Subscribe { sub, tenant, filter, start, framing } => {
                self.subscribe(sub, tenant, filter, start, framing).await
            }
            Frame::Unsubscribe { sub } => {
                let reply = match self.subs.remove(&sub) {
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
                self.send(reply).await
            }
        }
    }

    /// Opens subscription `sub`, or answers why not (a name in use, the limit, another tenant).
    async fn subscribe(
        &mut self,
        sub: String,
        tenant: Option<TenantId>,
        mut filter: SubscriptionFilter,
        start: Start,
        framing: Framing,
    ) -> Result<(), End> {
        self.subs.retain(|_, h| !h.is_finished());
        let limit = self.conn.limits.subscriptions_max;
        let problem = if self.subs.contains_key(&sub) {
            Some(Problem::bad_request(format!("subscription '{sub}' is already open on this connection"), vec![]))
        } else if self.subs.len() >= limit {
            Some(Problem::too_many_subscriptions(limit))
        } else {
            None
        };
        let problem = problem.or_else(|| self.conn.caller.restrict(&mut filter).err());
        if let Some(p) = tenant.as_ref().and_then(|t| self.conn.caller.refuse_other_tenant(t.as_str())) {
            return self.send(error_frame(None, Some(&sub), &p)).await;
        }
        let tenant = match (tenant, self.conn.caller.named_tenant()) {
            (Some(t), Some(fixed)) if t != *fixed => {
                let p =
                    Problem::bad_request("the tenant is fixed by the connection (its credential, or X-Tenant)", vec![]);
                let _ = self.send(error_frame(None, Some(&sub), &p)).await;
                return Ok(());
            }
            (t, fixed) => t.or_else(|| fixed.cloned()).unwrap_or_else(TenantId::default_tenant),
        };
        if let Some(p) = problem {
            return self.send(error_frame(None, Some(&sub), &p)).await;
        }
        let subscription = self.conn.engine.subscribe(tenant, filter, start);
        let stats = self.conn.stats.clone();
        let handle = self.tasks.spawn(run_subscription(subscription, sub.clone(), framing, self.out.clone(), stats));
        self.subs.insert(sub, handle);
        Ok(())
    }
}

/// The reason for a 1009 close, when a read failed because a message or frame was too large.
pub(super) fn too_large(e: &axum::Error) -> Option<String> {
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

/// One command, as `POST /commands` runs it; the reply frame as text.
pub(super) async fn run_command(engine: &Engine, envelope: Value, caller: &Caller) -> String {
    let (id, problem) = match execute_envelope(engine, envelope, Sender { caller, idempotency_key: None }).await {
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

/// How a subscription's events are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
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
pub(super) async fn run_subscription(
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
pub(super) fn at_hand(
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
