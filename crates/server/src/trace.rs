//! Request ids and the log lines of a request (SPEC §9): `X-Request-Id` is taken when the
//! client sends a sensible one (at most [`REQUEST_ID_BYTES_MAX`] bytes of `A-Z a-z 0-9 . _ : -`),
//! made (a UUID) otherwise, and returned on the response. Every log line written while the
//! request is handled is inside its `request` span, which carries the id, the method, the path
//! and, once the command is parsed, its `command_id`: JSON lines have them under `span` and
//! `spans`, text lines in the `request{…}` prefix. Commands of a WebSocket or Socket.IO
//! connection get a `command` span with their id.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub use crate::limits::REQUEST_ID_BYTES_MAX;

/// The header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in its extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= REQUEST_ID_BYTES_MAX
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Middleware (outside the trace layer, so its span sees the id): the id in, the id out.
pub(crate) async fn request_id(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if acceptable(v) => v.clone(),
        _ => HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a header value"),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut res = next.run(req).await;
    res.headers_mut().insert(X_REQUEST_ID.clone(), id);
    res
}

/// The `request` span of the trace layer.
pub(crate) fn request_span(req: &Request) -> tracing::Span {
    let id = req.extensions().get::<RequestId>().and_then(|r| r.0.to_str().ok()).unwrap_or("");
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        command_id = tracing::field::Empty,
    )
}

/// Names the command in the current `request` span (no-op outside one).
pub(crate) fn record_command(id: &sourced_core::CommandId) {
    tracing::Span::current().record("command_id", tracing::field::display(id));
}
