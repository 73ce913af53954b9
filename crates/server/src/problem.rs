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
            DomainError::InvalidPayload(v) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-payload",
                "The command payload is invalid",
                detail,
            )
            .with("violations", violations_json(&v)),
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
            DomainError::LimitExceeded { kind, limit, actual, .. } => {
                let (status, slug, title) = match kind {
                    LimitKind::DocumentSize => {
                        (StatusCode::PAYLOAD_TOO_LARGE, "document-too-large", "The document is too large")
                    }
                    LimitKind::JsonDepth => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "too-deep", "The JSON is nested too deeply")
                    }
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
            _ => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", "The command was refused", detail),
        }
    }
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
