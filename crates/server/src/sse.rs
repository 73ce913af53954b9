//! The live feed over server-sent events (`GET /events` with `Accept: text/event-stream`,
//! SPEC §3.1, §6): one subscription per request, `id:` = the event's position so that a
//! reconnecting client resumes with `Last-Event-ID`, `event: event` for events and
//! `event: caught-up` once the backlog is delivered.
//!
//! Memory stays bounded: hyper pulls the stream only as fast as the client reads, and a
//! subscription that is not pulled falls behind the shared live buffer and reads the store
//! again when it is pulled. Resources are bounded too: at most `SSE_STREAMS_MAX` streams are
//! open at once (503 beyond), and a client that leaves a write blocked for
//! `SSE_SLOW_CLIENT_TIMEOUT_MS` loses its connection (`stall.rs`), which ends its stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;

use sourced_core::{AggregateId, Position, TypeName};
use sourced_engine::{Start, Subscription, SubscriptionFilter, SubscriptionItem};

use crate::problem::Problem;
use crate::request::{Caller, param, query_pairs};
use crate::stall::StallGuard;
use crate::state::AppState;
use crate::state::LiveState;

/// One open stream, counted in `LiveState::sse_streams` for as long as it lives.
struct StreamSlot(Arc<LiveState>);

impl StreamSlot {
    /// A slot, unless `max` streams are open already.
    fn take(live: &Arc<LiveState>, max: usize) -> Option<StreamSlot> {
        live.sse_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot(live.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.sse_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The SSE response for `GET /events`.
pub(crate) fn live_feed(
    s: &AppState,
    caller: &Caller,
    q: &Option<String>,
    headers: &HeaderMap,
    guard: Option<StallGuard>,
) -> Result<Response, Problem> {
    let pairs = query_pairs(q, &["after", "targetName", "targetId", "access_token"])?;
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("").trim().to_owned());
    let start = match (last_event_id.as_deref(), param(&pairs, "after")) {
        // A reconnecting client's Last-Event-ID wins over the URL it reconnects to.
        (Some(id), _) => Start::After(position("Last-Event-ID", id)?),
        (None, None) => Start::Beginning,
        (None, Some("now")) => Start::Now,
        (None, Some(a)) => Start::After(position("after", a)?),
    };
    let mut filter = SubscriptionFilter {
        target_name: param(&pairs, "targetName")
            .map(|t| {
                TypeName::parse(t)
                    .map_err(|e| Problem::bad_request(format!("invalid targetName: {}", e.message), vec![]))
            })
            .transpose()?,
        target_id: param(&pairs, "targetId")
            .map(|t| {
                AggregateId::parse(t)
                    .map_err(|e| Problem::bad_request(format!("invalid targetId: {}", e.message), vec![]))
            })
            .transpose()?,
        types: None,
    };
    caller.restrict(&mut filter)?;
    let tenant = caller.tenant();
    let Some(slot) = StreamSlot::take(&s.live, s.ws.sse_streams_max) else {
        let max = s.ws.sse_streams_max;
        let mut r = Problem::too_many_streams(max).into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(r);
    };
    // Without a guard (the router driven without `start`'s listener) there is no deadline.
    if let Some(guard) = guard {
        guard.arm(Duration::from_millis(s.ws.sse_slow_client_timeout_ms), s.live.clone());
    }
    let subscription = s.engine.subscribe(tenant, filter, start);
    // A token's stream ends when the token does.
    let expired = caller.expired();
    let stream = futures_util::stream::unfold(Some(subscription), next_event)
        .take_until(s.live.closed())
        .take_until(expired)
        // The slot goes with the stream: dropped when hyper drops the response body.
        .map(move |e| {
            let _slot = &slot;
            e
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

fn position(name: &str, raw: &str) -> Result<Position, Problem> {
    raw.parse::<u64>()
        .map(Position)
        .map_err(|_| Problem::bad_request(format!("{name} must be a position (a whole number), not {raw:?}"), vec![]))
}

/// The next SSE event; after a store error, one `event: error` with the problem, then the end.
async fn next_event(sub: Option<Subscription>) -> Option<(Result<Event, Infallible>, Option<Subscription>)> {
    let mut sub = sub?;
    let event = match sub.next().await {
        Ok(SubscriptionItem::Event(e)) => {
            let data = e.json().unwrap_or_default();
            Event::default().id(e.position.to_string()).event("event").data(&*data)
        }
        Ok(SubscriptionItem::CaughtUp(p)) => {
            Event::default().id(p.to_string()).event("caught-up").data(json!({"position": p}).to_string())
        }
        Err(e) => {
            let body = Problem::from(e).body();
            return Some((Ok(Event::default().event("error").data(body.to_string())), None));
        }
    };
    Some((Ok(event), Some(sub)))
}
