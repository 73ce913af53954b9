//! Every error the HTTP API returns, as RFC 9457 `application/problem+json`, from one table
//! that maps each error to a status code and a stable problem `type`. Client errors are logged
//! at debug level; internal ones are logged as errors and hidden from the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use sourced_core::{DomainError, LimitKind, Violation};
use sourced_engine::EngineError;
use sourced_store::StoreError;

/// Prefix of every problem `type`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:sourced:problem:";

/// An error on its way to becoming a problem response.
#[derive(Debug)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable slug, the last part of `type`.
    pub slug: &'static str,
    /// Short summary, the same for every occurrence of the type.
    pub title: &'static str,
    /// This occurrence.
    pub detail: String,
    /// Extension members (`violations`, `currentVersion`, …), in order.
    pub extra: Vec<(&'static str, Value)>,
}

impl Problem {
    /// A problem with no extension members.
    pub fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, slug, title, detail: detail.into(), extra: Vec::new() }
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.extra.push((key, value.into()));
        self
    }

    /// 400 for a malformed request, with the violations found.
    pub fn bad_request(detail: impl Into<String>, violations: Vec<Violation>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, "invalid-request", "The request is malformed", detail)
            .with("violations", violations_json(&violations))
    }

    /// 404 for a path with no route or no aggregate.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 401 (with `WWW-Authenticate: Bearer`) for a missing or invalid credential, 403 for a
    /// valid one that does not allow the tenant asked for (SPEC §8.1). The problem type is the
    /// refusal's slug (docs/security.md lists them).
    pub fn auth(e: &sourced_auth::AuthError) -> Self {
        match e.refusal() {
            sourced_auth::Refusal::Unauthenticated => {
                Problem::new(StatusCode::UNAUTHORIZED, e.slug(), "Not authenticated", e.to_string())
            }
            sourced_auth::Refusal::Forbidden => {
                Problem::new(StatusCode::FORBIDDEN, e.slug(), "Not allowed", e.to_string())
            }
        }
    }

    /// 429: the caller's rate limit is spent; `retry_after` seconds until it may send again
    /// (also the `Retry-After` header).
    pub fn rate_limited(retry_after: std::time::Duration) -> Self {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("this caller's rate limit is spent: retry in {secs} s (RATE_LIMIT_PER_SEC)"),
        )
        .with("retryAfter", secs)
    }

    /// 403: the principal's roles grant no `action` on `type_name` (`permissions.yaml`).
    pub fn forbidden(action: &str, type_name: Option<&str>) -> Self {
        let detail = match type_name {
            Some(t) => format!("the caller's roles do not grant '{action}' on type '{t}'"),
            None => format!("the caller's roles do not grant '{action}'"),
        };
        let p = Problem::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail).with("action", action);
        match type_name {
            Some(t) => p.with("targetName", t),
            None => p,
        }
    }

    /// 409: a reload was asked for, but no artifact source is configured.
    pub fn no_artifacts_source(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::CONFLICT, "no-artifacts-source", "Nothing to reload", detail)
    }

    /// 422: an artifact set with problems, each listed; the previous set stays.
    pub fn invalid_artifacts(source_name: &str, problems: Vec<Value>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-artifacts",
            "The artifact set has problems",
            format!(
                "the artifact set in {source_name} has {} problem(s); the previous set stays loaded",
                problems.len()
            ),
        )
        .with("problems", problems)
    }

    /// 502: the artifact set could not be fetched.
    pub fn artifacts_unavailable(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_GATEWAY, "artifacts-unavailable", "The artifact set could not be fetched", detail)
    }

    /// 503: the store does not answer (readiness).
    pub fn not_ready(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready", detail)
    }

    /// 503: `/metrics` when a program embedding Sourced installed its own metrics recorder.
    pub fn metrics_unavailable() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics-unavailable",
            "No metrics",
            "another metrics recorder was installed in this process before Sourced's",
        )
    }

    /// 412: the precondition of `header` does not hold; `current` is the document's version.
    pub fn precondition_failed(header: &str, detail: impl Into<String>, current: Option<u64>) -> Self {
        let p = Problem::new(StatusCode::PRECONDITION_FAILED, "precondition-failed", "The precondition failed", detail)
            .with("header", header);
        match current {
            Some(v) => p.with("currentVersion", v),
            None => p,
        }
    }

    /// 422: an `Idempotency-Key` reused for another command, named as the client sent it.
    pub fn idempotency_key_reused(key: &str) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "The command id was used for another command",
            format!(
                "Idempotency-Key {key:?} was already used for a different command (other content); a retry must \
                 send the same request, a new command needs a new key"
            ),
        )
        .with("idempotencyKey", key)
    }

    /// 408: the body did not arrive within `BODY_READ_TIMEOUT_MS`.
    pub fn body_timeout(timeout_ms: u64) -> Self {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "The request body was not sent in time",
            format!("the request body did not arrive within {timeout_ms} ms (BODY_READ_TIMEOUT_MS)"),
        )
        .with("timeoutMs", timeout_ms)
    }

    /// 413: the body is over `MAX_BODY_BYTES`.
    pub fn body_too_large(limit: usize) -> Self {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "The request body is too large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
        .with("limit", limit)
    }

    /// 415: the body's media type is not one of `allowed`.
    pub fn unsupported_media_type(got: Option<&str>, allowed: &[&str]) -> Self {
        Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("Content-Type {} is not accepted here; use {}", got.unwrap_or("(none)"), allowed.join(" or ")),
        )
        .with("accepted", allowed.to_vec())
    }

    /// 405 for a method the path does not serve.
    pub fn method_not_allowed(method: &str) -> Self {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("{method} is not allowed on this path"),
        )
    }

    /// Engine.IO's own refusal of a Socket.IO request, with its status and message.
    pub fn socketio_refused(status: StatusCode, message: impl Into<String>) -> Self {
        Problem::new(status, "socketio-refused", "Socket.IO request refused", message)
    }

    /// 429: a live connection has `limit` commands in flight already.
    pub fn too_many_commands(transport: &str, limit: usize) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-commands",
            "Too many commands in flight",
            format!("a {transport} connection may have {limit} commands in flight; wait for replies"),
        )
        .with("limit", limit)
    }

    /// 429: a WebSocket connection holds `limit` subscriptions already.
    pub fn too_many_subscriptions(limit: usize) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-subscriptions",
            "Too many subscriptions",
            format!("a connection may hold {limit} subscriptions"),
        )
        .with("limit", limit)
    }

    /// 503: `SSE_STREAMS_MAX` streams are open.
    pub fn too_many_streams(limit: usize) -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-streams",
            "Too many live streams",
            format!("the server serves at most {limit} SSE streams at once (SSE_STREAMS_MAX); retry later"),
        )
        .with("limit", limit)
    }

    /// `/ws` asked for without a WebSocket upgrade.
    pub fn websocket_required(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem::new(status, "websocket-required", "A WebSocket upgrade is required", detail)
    }

    /// What replaces hyper's bare answer of `status` to a request it could not parse.
    pub fn unparsable_request(status: StatusCode) -> Self {
        let (slug, title, detail) = match status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
                "headers-too-large",
                "The request head is too large",
                "the request line and headers exceed what the server reads",
            ),
            StatusCode::URI_TOO_LONG => {
                ("uri-too-long", "The URI is too long", "the request target exceeds what the server reads")
            }
            _ => (
                "invalid-request",
                "The request is malformed",
                "the request line or a header could not be parsed; a URL must percent-encode characters such as \
                 '\"', space, '<', '>', '{', '}' and '|' (a quote is %22)",
            ),
        };
        Problem::new(status, slug, title, detail)
    }

    /// 500, with nothing internal shown.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", "the server failed; see its log")
    }

    /// The problem's body.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("type".into(), Value::from(format!("{PROBLEM_TYPE_PREFIX}{}", self.slug)));
        body.insert("title".into(), Value::from(self.title));
        body.insert("status".into(), Value::from(self.status.as_u16()));
        body.insert("detail".into(), Value::from(self.detail.as_str()));
        for (k, v) in &self.extra {
            body.insert((*k).to_owned(), v.clone());
        }
        Value::Object(body)
    }
}

/// Violations on the wire.
pub fn violations_json(v: &[Violation]) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Array(Vec::new()))
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        if self.status.is_client_error() {
            tracing::debug!(status = self.status.as_u16(), problem = self.slug, detail = %self.detail, "request refused");
        }
        let mut r = (self.status, axum::Json(self.body())).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if self.status == StatusCode::TOO_MANY_REQUESTS
            && let Some((_, secs)) = self.extra.iter().find(|(k, _)| *k == "retryAfter")
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // What is left of the body is not worth waiting for: the connection ends here.
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

impl From<DomainError> for Problem {
    fn from(e: DomainError) -> Self {
        let detail = e.to_string();
        match e {
            DomainError::InvalidCommand(v) => {
                Problem::bad_request(detail, v).with_slug("invalid-command", "The command is malformed")
            }
            DomainError::NotFound => Problem::not_found(detail),
            DomainError::Deleted { version } => {
                Problem::new(StatusCode::GONE, "deleted", "The aggregate was deleted", detail)
                    .with("currentVersion", version.0)
            }
            DomainError::AlreadyExists { version } => {
                Problem::new(StatusCode::CONFLICT, "already-exists", "The aggregate already exists", detail)
                    .with("currentVersion", version.0)
            }
            DomainError::LimitExceeded { kind, limit, actual, .. } => limit_exceeded(kind, limit, actual, detail),
            other => refused(other, detail),
        }
    }
}

/// The 422 family: the command is well formed but the domain refuses it (a patch that does not
/// apply, a rule, a lifecycle, a schema, an expression).
fn refused(e: DomainError, detail: String) -> Problem {
    match e {
        DomainError::PatchFailed { index, pointer, message, .. } => {
            let v = Violation::new(pointer, message);
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "patch-failed", "The patch cannot be applied", detail)
                .with("violations", violations_json(&[v]))
                .with("operation", index)
        }
        DomainError::ProtectedField(v) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "protected-field",
            "Server-owned fields cannot be written",
            detail,
        )
        .with("violations", violations_json(&v)),
        DomainError::NoOp => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "no-op", "The command changes nothing", detail)
        }
        DomainError::UnknownCommand { .. } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown-command", "No such command", detail)
        }
        DomainError::IllegalTransition { field, from, to, allowed, .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "illegal-transition",
            "The lifecycle does not allow this transition",
            detail,
        )
        .with("violations", violations_json(&[Violation::new(field.clone(), format!("cannot move to '{to}'"))]))
        .with("field", field)
        .with("from", from)
        .with("to", to)
        .with("allowed", allowed),
        DomainError::RuleViolations(v) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rule-violation",
            "Business rules refused the command",
            detail,
        )
        .with("violations", violations_json(&v)),
        DomainError::PreconditionFailed(v) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "command-precondition-failed",
            "The command's preconditions are not met",
            detail,
        )
        .with("violations", violations_json(&v)),
        DomainError::InvalidPayload(v) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-payload", "The command payload is invalid", detail)
                .with("violations", violations_json(&v))
        }
        DomainError::ExpressionFailed { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "expression-failed",
            "An artifact expression failed for this command",
            detail,
        ),
        DomainError::InvalidDocument(v) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-document", "The document is invalid", detail)
                .with("violations", violations_json(&v))
        }
        DomainError::UnstorableValue(v) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unstorable-value",
            "A value cannot be stored exactly as sent",
            detail,
        )
        .with("violations", violations_json(&v)),
        _ => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", "The command was refused", detail),
    }
}

/// A limit of `kind` exceeded: 413 for the document's size, 422 for the others.
fn limit_exceeded(kind: LimitKind, limit: u64, actual: u64, detail: String) -> Problem {
    let (status, slug, title) = match kind {
        LimitKind::DocumentSize => (StatusCode::PAYLOAD_TOO_LARGE, "document-too-large", "The document is too large"),
        LimitKind::JsonDepth => (StatusCode::UNPROCESSABLE_ENTITY, "too-deep", "The JSON is nested too deeply"),
        LimitKind::PatchOps => {
            (StatusCode::UNPROCESSABLE_ENTITY, "too-many-operations", "The patch has too many operations")
        }
        LimitKind::ArrayAppends => {
            (StatusCode::UNPROCESSABLE_ENTITY, "too-many-appends", "The patch appends too many elements")
        }
        LimitKind::ExpressionCost => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "expression-too-costly",
            "An artifact expression would cost too much on this input",
        ),
        LimitKind::ExpressionValue => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "expression-value-too-large",
            "An artifact expression would build too large a value",
        ),
    };
    Problem::new(status, slug, title, detail).with("limit", limit).with("actual", actual)
}

impl Problem {
    fn with_slug(mut self, slug: &'static str, title: &'static str) -> Self {
        self.slug = slug;
        self.title = title;
        self
    }
}

impl From<sourced_core::json::JsonError> for Problem {
    fn from(e: sourced_core::json::JsonError) -> Self {
        use sourced_core::json::JsonError;
        match e {
            JsonError::Syntax(e) => Problem::bad_request(
                format!("the body is not valid JSON: {e}"),
                vec![Violation::new("", format!("line {}, column {}: {e}", e.line(), e.column()))],
            )
            .with_slug("invalid-json", "The body is not valid JSON"),
            JsonError::DuplicateKeys(v) => Problem::bad_request(
                format!(
                    "a member name appears twice in one object (I-JSON, RFC 7493 §2.3: which one would count \
                     is ambiguous): {}",
                    v.iter().map(|v| v.pointer.as_str()).collect::<Vec<_>>().join(", ")
                ),
                v,
            )
            .with_slug("invalid-json", "The body is not valid JSON"),
            JsonError::Refused(d) => d.into(),
            other => Problem::bad_request(other.to_string(), vec![]),
        }
    }
}

impl Problem {
    /// An operator's step on a process instance that was not recorded: 404 (no process or
    /// instance), 409 `process-not-parked` (retry or skip of an instance that is not parked) or
    /// `process-ended` (cancel of a completed or cancelled one), with `instanceStatus`; 409
    /// `version-conflict` when the instance moved meanwhile.
    pub fn from_intervention(e: sourced_engine::process::InterventionError) -> Self {
        use sourced_core::artifacts::instance::Intervention;
        use sourced_engine::process::InterventionError;
        match e {
            InterventionError::NotFound(m) => Problem::not_found(m),
            InterventionError::WrongStatus(w) => {
                let (slug, title) = match w.action {
                    Intervention::Cancel => ("process-ended", "The instance has ended"),
                    _ => ("process-not-parked", "The instance is not parked"),
                };
                Problem::new(StatusCode::CONFLICT, slug, title, w.to_string()).with("instanceStatus", w.status.as_str())
            }
            InterventionError::Conflict { expected, actual } => Problem::new(
                StatusCode::CONFLICT,
                "version-conflict",
                "Version conflict",
                format!("the instance moved on while this was decided (version {expected}, now {actual}); try again"),
            )
            .with("expectedVersion", expected.0)
            .with("currentVersion", actual.0),
            InterventionError::Store(e) => e.into(),
            other => Problem::internal(&other),
        }
    }
}

/// Maps an engine error; `from_if_match` says whether the client's expected version came from
/// an HTTP precondition header (then a mismatch is 412, else 409).
pub fn from_engine(e: EngineError, from_precondition: bool) -> Problem {
    match e {
        EngineError::Domain(d) => d.into(),
        EngineError::Conflict { expected, actual, client_version } => {
            let status = if client_version && from_precondition {
                StatusCode::PRECONDITION_FAILED
            } else {
                StatusCode::CONFLICT
            };
            let (slug, title) = if status == StatusCode::PRECONDITION_FAILED {
                ("precondition-failed", "The precondition failed")
            } else {
                ("version-conflict", "Version conflict")
            };
            let detail = if client_version {
                format!("expected version {expected}, but the aggregate is at version {}", actual.version)
            } else {
                format!("the aggregate kept changing; gave up at version {}", actual.version)
            };
            Problem::new(status, slug, title, detail)
                .with("expectedVersion", json!(expected))
                .with("currentVersion", actual.version.0)
        }
        EngineError::IdempotencyMismatch { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "The command id was used for another command",
            e.to_string(),
        ),
        EngineError::VersionRequired => Problem::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition-required",
            "An expected version is required",
            "this deployment requires If-Match (or a command version) on writes to existing aggregates",
        ),
        EngineError::Store(s) => s.into(),
        other => Problem::internal(&other),
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Closed => {
                tracing::warn!(error = %e, "store unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "The event store is unavailable",
                    e.to_string(),
                )
            }
            other => Problem::internal(&other),
        }
    }
}
