//! The live feed over server-sent events (`GET /events` with `Accept: text/event-stream`,
//! SPEC §3.1, §6): one subscription per request, `id:` = the event's position so that a
//! reconnecting client resumes with `Last-Event-ID`, `event: event` for events and
//! `event: caught-up` once the backlog is delivered.
//!
//! Memory stays bounded without a timeout: hyper pulls the stream only as fast as the client
//! reads, and a subscription that is not pulled falls behind the shared live buffer and reads
//! the store again when it is pulled.

use std::convert::Infallible;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;

use sourced_core::{AggregateId, Position, TypeName};
use sourced_engine::{Start, Subscription, SubscriptionFilter, SubscriptionItem};

use crate::http::{AppState, param, query_pairs, tenant};
use crate::problem::Problem;

/// The SSE response for `GET /events`.
pub(crate) fn live_feed(s: &AppState, q: &Option<String>, headers: &HeaderMap) -> Result<Response, Problem> {
    let pairs = query_pairs(q, &["after", "targetName", "targetId"])?;
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("").trim().to_owned());
    let start = match (last_event_id.as_deref(), param(&pairs, "after")) {
        // A reconnecting client's Last-Event-ID wins over the URL it reconnects to.
        (Some(id), _) => Start::After(position("Last-Event-ID", id)?),
        (None, None) => Start::Beginning,
        (None, Some("now")) => Start::Now,
        (None, Some(a)) => Start::After(position("after", a)?),
    };
    let filter = SubscriptionFilter {
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
    };
    let subscription = s.engine.subscribe(tenant(headers)?, filter, start);
    let stream = futures_util::stream::unfold(Some(subscription), next_event).take_until(s.live.closed());
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
            let data = serde_json::to_string(&*e).unwrap_or_default();
            Event::default().id(e.position.to_string()).event("event").data(data)
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
