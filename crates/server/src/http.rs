//! The resource-style HTTP API of SPEC §3.1: [`router`] builds it from an [`AppState`], so
//! tests drive it with `oneshot` and no socket. Every route turns its request into a command
//! envelope and goes through the same pipeline as `POST /commands`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use sourced_core::aggregate::document;
use sourced_core::query;
use sourced_core::{
    AggregateId, Command, CommandDraft, CommandKind, ExpectedVersion, Position, StreamKey, TypeName, Version, Violation,
};
use sourced_engine::CommandOutcome;
use sourced_store::{DocumentRow, DocumentText, ListCursor, ListQuery};

use crate::commands::{Sender, command_problem, execute_envelope};
use crate::problem::{Problem, from_engine};
use crate::request::{
    Caller, flag, idempotency_key, idempotency_key_text, is_json, media_type, page_limit, param, parse_json,
    prefers_minimal, query_pairs, read_body, type_name, unsupported_media,
};
use crate::state::{AppState, Result};
use sourced_core::artifacts::permissions::Action;

/// `GET /schemas/command.json` (the envelope of SPEC §2.1) and `GET /schemas/{type}.json` (a
/// loaded aggregate schema).
pub(crate) async fn schema_file(
    State(s): State<AppState>,
    Path(file): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    query_pairs(&q, &[])?;
    let schema = if file == "command.json" {
        crate::openapi::command_schema()
    } else {
        let set = s.engine.artifacts();
        let found = file
            .strip_suffix(".json")
            .and_then(|t| TypeName::parse(t).ok())
            .and_then(|t| set.for_type(&t).and_then(|a| a.schema.as_ref()).map(|sc| sc.source().clone()));
        found.ok_or_else(|| Problem::not_found(format!("no schema named '{file}' is loaded")))?
    };
    let mut r = axum::Json(schema).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/schema+json"));
    Ok(r)
}

/// `POST /admin/reload`: 200 with the new set's summary, or a problem listing why the old set
/// stays (422 with every problem of a broken set, 502 when git failed).
pub(crate) async fn admin_reload(State(s): State<AppState>, caller: Caller) -> Result<Response> {
    use crate::artifacts::LoadError;
    use crate::reload::ReloadError;
    let Some(reloader) = &s.reloader else { return Err(Problem::not_found("no route matches this path")) };
    caller.allow_admin()?;
    match reloader.reload().await {
        Ok(summary) => Ok(axum::Json(summary).into_response()),
        Err(e @ ReloadError::NoSource) => Err(Problem::no_artifacts_source(e.to_string())),
        Err(ReloadError::Load { source_name, error: LoadError::Problems(problems) }) => {
            let list: Vec<Value> = problems
                .iter()
                .map(|p| json!({"file": p.file, "location": p.location, "message": p.message}))
                .collect();
            Err(Problem::invalid_artifacts(&source_name, list))
        }
        Err(e @ ReloadError::Load { .. }) => Err(Problem::artifacts_unavailable(e.to_string())),
        Err(e @ ReloadError::Task(_)) => Err(Problem::internal(&e)),
    }
}

// The fixed routes refuse query parameters as every other route refuses unknown ones, so a
// typo is noticed (and `GET /healthz?limit=1`, which a client meant for `GET /{type}`, is 400).
pub(crate) async fn healthz(RawQuery(q): RawQuery) -> Result<Response> {
    query_pairs(&q, &[])?;
    Ok(axum::Json(json!({"status": "ok"})).into_response())
}

pub(crate) async fn readyz(State(s): State<AppState>, RawQuery(q): RawQuery) -> Result<Response> {
    query_pairs(&q, &[])?;
    Ok(match s.engine.ping().await {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(e) => Problem::not_ready(e.to_string()).into_response(),
    })
}

// ---------------------------------------------------------------------------------------------
// Request parts

/// A JSON body: `envelope` says whether it is a whole command envelope (one level above the
/// command body the depth limit is about) or the command body itself.
async fn json_body(body: Body, headers: &HeaderMap, s: &AppState, envelope: bool) -> Result<Value> {
    let media = media_type(headers);
    if !media.as_deref().is_some_and(is_json) {
        return Err(unsupported_media(media, &["application/json"]));
    }
    parse_json(&read_body(body, headers, &s.http).await?, body_depth(s) + usize::from(envelope))
}

/// How deep a command body may be nested.
fn body_depth(s: &AppState) -> usize {
    s.engine.config().limits.json_depth_max
}

fn etag(v: Version) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{v}\"")).expect("a number is a valid header value")
}

/// One entity tag of a precondition header (RFC 9110 §8.8.3): its opaque part without the
/// quotes, and whether it is weak (`W/"…"`).
#[derive(Debug, PartialEq, Eq)]
struct EntityTag {
    weak: bool,
    opaque: String,
}

/// The value of `If-Match` or `If-None-Match`: `*`, or a list of entity tags (every line of the
/// header, as one list).
#[derive(Debug, PartialEq, Eq)]
enum Tags {
    Any,
    List(Vec<EntityTag>),
}

/// What a precondition is evaluated against: whether the target has a current representation
/// and its entity tag (a document: its version; a collection: none).
#[derive(Clone, Copy)]
struct Current {
    exists: bool,
    version: Option<Version>,
}

impl Current {
    fn document(version: Option<Version>, deleted: bool) -> Current {
        Current { exists: version.is_some() && !deleted, version }
    }
}

impl Tags {
    /// Whether the target matches: `*` when it exists; a tag when its opaque part is the
    /// version's (`strong`: only a strong tag can match, as `If-Match` compares; else weak, as
    /// `If-None-Match` does).
    fn matches(&self, current: Current, strong: bool) -> bool {
        match self {
            Tags::Any => current.exists,
            Tags::List(tags) => {
                current.version.is_some_and(|v| tags.iter().any(|t| !(strong && t.weak) && t.opaque == v.0.to_string()))
            }
        }
    }
}

/// Parses one precondition header, all its lines as one list (RFC 9110 §5.3): `*` alone, or
/// comma-separated entity tags `"…"` / `W/"…"` (empty elements are allowed, as lists allow).
fn parse_tags(headers: &HeaderMap, name: header::HeaderName, shown: &str) -> Result<Option<Tags>> {
    let mut lines = headers.get_all(&name).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let malformed = |why: String| {
        Problem::bad_request(
            format!(
                "invalid {shown} header: {why}; it must be * or a list of entity tags like \"3\" or W/\"3\" (the \
                 ETag of a document is its version in double quotes)"
            ),
            vec![],
        )
        .with("header", shown)
    };
    let mut any = false;
    let mut tags = Vec::new();
    for line in lines {
        let mut rest = line.as_bytes();
        loop {
            rest = rest.trim_ascii_start();
            if let Some(r) = rest.strip_prefix(b",") {
                rest = r;
                continue;
            }
            if rest.is_empty() {
                break;
            }
            if let Some(r) = rest.strip_prefix(b"*") {
                any = true;
                rest = r;
            } else {
                let (weak, r) = match rest.strip_prefix(b"W/") {
                    Some(r) => (true, r),
                    None => (false, rest),
                };
                let Some(r) = r.strip_prefix(b"\"") else {
                    return Err(malformed(format!(
                        "{:?} is not a quoted entity tag",
                        String::from_utf8_lossy(line.as_bytes())
                    )));
                };
                // etagc: %x21 / %x23-7E / obs-text
                let end =
                    r.iter().position(|&b| b == b'"').ok_or_else(|| malformed("a tag has no closing quote".into()))?;
                let opaque = &r[..end];
                if opaque.iter().any(|&b| b < 0x21 || b == 0x7f) {
                    return Err(malformed("a tag holds a space or a control character".into()));
                }
                tags.push(EntityTag { weak, opaque: String::from_utf8_lossy(opaque).into_owned() });
                rest = &r[end + 1..];
            }
            rest = rest.trim_ascii_start();
            match rest.first() {
                None => break,
                Some(b',') => rest = &rest[1..],
                Some(_) => {
                    return Err(malformed(format!(
                        "{:?}: list elements are separated by commas",
                        String::from_utf8_lossy(line.as_bytes())
                    )));
                }
            }
        }
    }
    match (any, tags.is_empty()) {
        (true, true) => Ok(Some(Tags::Any)),
        (true, false) => Err(malformed("* cannot be combined with entity tags".into())),
        (false, false) => Ok(Some(Tags::List(tags))),
        (false, true) => Err(malformed("it is empty".into())),
    }
}

/// The preconditions of a request (RFC 9110 §13.1): `If-Match` and `If-None-Match`.
#[derive(Debug)]
struct Preconditions {
    if_match: Option<Tags>,
    if_none_match: Option<Tags>,
}

/// How a precondition evaluated on a read came out.
enum ReadCondition {
    /// Serve the representation.
    Proceed,
    /// `If-None-Match` matched on GET/HEAD: 304.
    NotModified,
}

impl Preconditions {
    fn read(headers: &HeaderMap) -> Result<Preconditions> {
        Ok(Preconditions {
            if_match: parse_tags(headers, header::IF_MATCH, "If-Match")?,
            if_none_match: parse_tags(headers, header::IF_NONE_MATCH, "If-None-Match")?,
        })
    }

    /// RFC 9110 §13.2.2 in order: If-Match false → 412; then If-None-Match true → 304 on a read
    /// (`safe`), 412 on anything else.
    fn evaluate(&self, current: Current, safe: bool) -> Result<ReadCondition> {
        if let Some(m) = &self.if_match
            && !m.matches(current, true)
        {
            return Err(precondition_failed("If-Match", current));
        }
        if let Some(n) = &self.if_none_match
            && n.matches(current, false)
        {
            if safe {
                return Ok(ReadCondition::NotModified);
            }
            return Err(precondition_failed("If-None-Match", current));
        }
        Ok(ReadCondition::Proceed)
    }

    /// The expected version a write carries. Conditions the engine checks atomically become its
    /// expected version directly (`*`, one version); others are evaluated against the current
    /// document, which is then pinned (`Exact` of what was seen), so a write in between is 412
    /// too. `None` without preconditions.
    async fn expected(&self, s: &AppState, key: &StreamKey) -> Result<Option<ExpectedVersion>> {
        match (&self.if_match, &self.if_none_match) {
            (None, None) => return Ok(None),
            (Some(Tags::Any), None) => return Ok(Some(ExpectedVersion::Exists)),
            (None, Some(Tags::Any)) => return Ok(Some(ExpectedVersion::NoStream)),
            (Some(Tags::List(tags)), None) => {
                let mut versions = tags
                    .iter()
                    .filter(|t| !t.weak)
                    .filter_map(|t| t.opaque.parse::<u64>().ok().filter(|v| *v >= 1 && v.to_string() == t.opaque));
                if let (Some(v), None) = (versions.next(), versions.next()) {
                    return Ok(Some(ExpectedVersion::Exact(Version(v))));
                }
            }
            _ => {}
        }
        let row = s.engine.document_text(key).await?;
        let current = Current::document(row.as_ref().map(|r| r.version), row.as_ref().is_some_and(|r| r.deleted));
        self.evaluate(current, false)?;
        Ok(Some(ExpectedVersion::Exact(current.version.unwrap_or(Version::ZERO))))
    }
}

fn precondition_failed(shown: &str, current: Current) -> Problem {
    let detail = match current.version {
        Some(v) => format!("{shown} does not hold: the current ETag is \"{v}\""),
        None => format!("{shown} does not hold: there is no current document"),
    };
    Problem::precondition_failed(shown, detail, current.version.map(|v| v.0))
}

/// The preconditions of a write to a document, as its expected version.
async fn write_preconditions(s: &AppState, headers: &HeaderMap, key: &StreamKey) -> Result<Option<ExpectedVersion>> {
    Preconditions::read(headers)?.expected(s, key).await
}

/// A 304 for a read whose `If-None-Match` matched, with the ETag.
fn not_modified(v: Version) -> Response {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    r.headers_mut().insert(header::ETAG, etag(v));
    r
}

/// Opaque page cursors: base64url of a small JSON object tagged with its page kind, so a
/// cursor from one listing is refused by another.
pub(crate) fn encode_cursor(kind: &str, value: Value) -> String {
    URL_SAFE_NO_PAD.encode(json!({"k": kind, "v": value}).to_string())
}

pub(crate) fn decode_cursor(kind: &str, raw: &str) -> Result<Value> {
    let invalid =
        || Problem::bad_request("invalid cursor: pass back the 'next' value of a page of this listing", vec![]);
    let bytes = URL_SAFE_NO_PAD.decode(raw.as_bytes()).map_err(|_| invalid())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    // A cursor is the client's text like any other: one with a NUL could not be bound.
    if v.get("k").and_then(Value::as_str) != Some(kind) || sourced_core::json::check_strings(&v, "").is_err() {
        return Err(invalid());
    }
    v.get("v").cloned().ok_or_else(invalid)
}

// ---------------------------------------------------------------------------------------------
// Writes

/// How a write answers: the document (as GET would) with its ETag, or the headers only.
pub(crate) struct WriteReply {
    outcome: CommandOutcome,
    status: StatusCode,
    location: Option<String>,
    minimal: bool,
}

impl IntoResponse for WriteReply {
    fn into_response(self) -> Response {
        let version = self.outcome.result.version;
        let mut r = if self.minimal {
            StatusCode::NO_CONTENT.into_response()
        } else {
            (self.status, axum::Json(self.outcome.document())).into_response()
        };
        let h = r.headers_mut();
        h.insert(header::ETAG, etag(version));
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, loc);
        }
        if self.outcome.replayed {
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        insert_warnings(h, &self.outcome.result.warnings);
        r
    }
}

/// The header that carries a write's warnings (rules of severity `warn`) on every write path:
/// the JSON array `POST /commands` shows as `warnings`, in compact JSON with every non-ASCII
/// character escaped (`\uXXXX`) so it is a valid header value. Absent when there are none.
pub const WARNINGS_HEADER: &str = "sourced-warnings";

fn insert_warnings(h: &mut HeaderMap, warnings: &[Value]) {
    if warnings.is_empty() {
        return;
    }
    let json = Value::Array(warnings.to_vec()).to_string();
    let mut ascii = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            ascii.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                ascii.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    // Control characters are escaped by the JSON writer, so the value is visible ASCII.
    if let Ok(v) = HeaderValue::from_str(&ascii) {
        h.insert(WARNINGS_HEADER, v);
    }
}

/// The command of a resource route: its draft, with the `Idempotency-Key` header as its id and
/// the caller's tenant.
fn build(caller: &Caller, headers: &HeaderMap, mut draft: CommandDraft) -> Result<Command> {
    draft.id = idempotency_key(headers)?;
    let defaults = sourced_engine::fresh::envelope_defaults(caller.tenant(), true);
    Ok(draft.resolve(&defaults)?)
}

/// Runs a command for `caller`. `precondition` says whether its expected version came from an
/// HTTP precondition header (a mismatch is then 412, else 409).
async fn exec(
    s: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    cmd: Command,
    precondition: bool,
) -> Result<CommandOutcome> {
    let sender = Sender { caller, idempotency_key: idempotency_key_text(headers) };
    crate::commands::run(&s.engine, cmd, caller).await?.map_err(|e| command_problem(e, sender, precondition))
}

/// The aggregate a write route names, once the caller may do `action` on its type, and the
/// expected version its preconditions give (checked after the permission, so a refusal says
/// nothing about the document).
async fn target(
    s: &AppState,
    caller: &Caller,
    (ty, id): (&str, &str),
    action: &Action,
    headers: &HeaderMap,
) -> Result<(StreamKey, Option<ExpectedVersion>)> {
    let key = caller.key(ty, id)?;
    caller.allow(action, &key.type_name)?;
    let expected = write_preconditions(s, headers, &key).await?;
    Ok((key, expected))
}

/// The draft of a command on one aggregate: `kind` on `key`, expecting `expected`.
fn draft(kind: CommandKind, key: &StreamKey, expected: Option<ExpectedVersion>, body: Value) -> CommandDraft {
    CommandDraft { target_id: Some(key.id.clone()), expected, body, ..CommandDraft::new(kind, key.type_name.clone()) }
}

pub(crate) async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Path(ty): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<WriteReply> {
    let ty = type_name(&ty)?;
    caller.allow(&Action::Create, &ty)?;
    // The target is the collection: it exists and has no entity tag.
    Preconditions::read(&headers)?.evaluate(Current { exists: true, version: None }, false)?;
    let doc = json_body(body, &headers, &s, false).await?;
    let create = CommandDraft { body: doc, ..CommandDraft::new(CommandKind::Create, ty.clone()) };
    let outcome = exec(&s, &caller, &headers, build(&caller, &headers, create)?, false).await?;
    let location = format!("/{}/{}", ty, outcome.result.target_id);
    Ok(WriteReply {
        outcome,
        status: StatusCode::CREATED,
        location: Some(location),
        minimal: prefers_minimal(&headers),
    })
}

pub(crate) async fn replace(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<WriteReply> {
    let (key, expected) = target(&s, &caller, (&ty, &id), &Action::Replace, &headers).await?;
    let precondition = expected.is_some();
    let doc = json_body(body, &headers, &s, false).await?;
    let replace = draft(CommandKind::Replace, &key, expected, doc);
    let outcome = exec(&s, &caller, &headers, build(&caller, &headers, replace)?, precondition).await?;
    let created = outcome.result.events.first().is_some_and(|e| e.event_type == sourced_core::event::CREATED);
    let (status, location) = if created {
        (StatusCode::CREATED, Some(format!("/{}/{}", key.type_name, key.id)))
    } else {
        (StatusCode::OK, None)
    };
    Ok(WriteReply { outcome, status, location, minimal: prefers_minimal(&headers) })
}

pub(crate) async fn patch(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<WriteReply> {
    let (key, expected) = target(&s, &caller, (&ty, &id), &Action::Patch, &headers).await?;
    const ACCEPTED: &[&str] = &["application/json-patch+json", "application/merge-patch+json", "application/json"];
    let media = media_type(&headers);
    let merge = match media.as_deref() {
        Some("application/json-patch+json") => Some(false),
        Some("application/merge-patch+json") => Some(true),
        // Plain JSON: an array is an RFC 6902 patch, an object an RFC 7396 merge patch.
        Some("application/json") => None,
        _ => return Err(unsupported_media(media, ACCEPTED)),
    };
    let value = parse_json(&read_body(body, &headers, &s.http).await?, body_depth(&s))?;
    // Merge patch is HTTP only, not an envelope type.
    let kind = if merge.unwrap_or(value.is_object()) { CommandKind::MergePatch } else { CommandKind::Patch };
    let cmd = build(&caller, &headers, draft(kind, &key, expected, value))?;
    let outcome = exec(&s, &caller, &headers, cmd, expected.is_some()).await?;
    Ok(WriteReply { outcome, status: StatusCode::OK, location: None, minimal: prefers_minimal(&headers) })
}

pub(crate) async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<WriteReply> {
    let (key, expected) = target(&s, &caller, (&ty, &id), &Action::Delete, &headers).await?;
    let delete = draft(CommandKind::Delete, &key, expected, Value::Null);
    let outcome = exec(&s, &caller, &headers, build(&caller, &headers, delete)?, expected.is_some()).await?;
    Ok(WriteReply { outcome, status: StatusCode::OK, location: None, minimal: prefers_minimal(&headers) })
}

pub(crate) async fn custom_command(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id, command)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (key, expected) = target(&s, &caller, (&ty, &id), &Action::Command(command.clone()), &headers).await?;
    let payload = json_body(body, &headers, &s, false).await?;
    let custom = CommandDraft { name: Some(command), ..draft(CommandKind::Logic, &key, expected, payload) };
    let outcome = exec(&s, &caller, &headers, build(&caller, &headers, custom)?, expected.is_some()).await?;
    Ok(WriteReply { outcome, status: StatusCode::OK, location: None, minimal: prefers_minimal(&headers) }
        .into_response())
}

pub(crate) async fn post_command(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let mut env = json_body(body, &headers, &s, true).await?;
    if let Some(key) = idempotency_key(&headers)?
        && let Value::Object(m) = &mut env
    {
        match m.get("id") {
            None | Some(Value::Null) => {
                m.insert("id".into(), Value::from(key.to_string()));
            }
            Some(Value::String(id)) if *id == key.to_string() => {}
            Some(_) => {
                return Err(Problem::bad_request("the envelope id and the Idempotency-Key header differ", vec![]));
            }
        }
    }
    let sender = Sender { caller: &caller, idempotency_key: idempotency_key_text(&headers) };
    let outcome = execute_envelope(&s.engine, env, sender).await.map_err(|e| e.1)?;
    let mut r = if prefers_minimal(&headers) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        axum::Json(&outcome.result).into_response()
    };
    r.headers_mut().insert(header::ETAG, etag(outcome.result.version));
    if outcome.replayed {
        r.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    insert_warnings(r.headers_mut(), &outcome.result.warnings);
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Reads

fn row_document(row: &DocumentRow) -> Value {
    let empty = serde_json::Map::new();
    let state = row.state.as_object().unwrap_or(&empty);
    document(&row.key.id, state, row.version, Some(row.created_at), Some(row.updated_at), row.deleted)
}

pub(crate) async fn get_document(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    let pairs = query_pairs(&q, &["version", "at"])?;
    let key = caller.key(&ty, &id)?;
    caller.allow(&Action::Read, &key.type_name)?;
    let conditions = Preconditions::read(&headers)?;
    if param(&pairs, "version").is_some() || param(&pairs, "at").is_some() {
        return time_travel(&s, &key, &pairs, &conditions).await;
    }
    let row = s.engine.document_text(&key).await?;
    let Some(row) = row else {
        return Err(Problem::not_found(format!("no {} with id '{}'", key.type_name, key.id)));
    };
    if row.deleted {
        return Err(sourced_core::DomainError::Deleted { version: row.version }.into());
    }
    if let ReadCondition::NotModified = conditions.evaluate(Current::document(Some(row.version), false), true)? {
        return Ok(not_modified(row.version));
    }
    let mut r =
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document_json(&row)).into_response();
    r.headers_mut().insert(header::ETAG, etag(row.version));
    Ok(r)
}

/// The document as GET shows it (`aggregate::document`: `id`, the state's fields, `_meta`),
/// written around the stored JSON text instead of parsing it: the store holds the state as
/// compact JSON of an object without `id` and `_meta`, so the bytes are the same.
fn document_json(row: &DocumentText) -> String {
    let text = row.state_json.trim();
    let fields = match text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        Some(inner) => inner.trim(),
        None => "", // not an object: shown as an empty one, as `row_document` does
    };
    let id = Value::from(row.key.id.as_str()).to_string();
    let meta = json!({
        "version": row.version.0,
        "createdAt": sourced_core::timestamp::format(&row.created_at),
        "updatedAt": sourced_core::timestamp::format(&row.updated_at),
        "deleted": row.deleted,
    })
    .to_string();
    let mut out = String::with_capacity(fields.len() + id.len() + meta.len() + 24);
    out.push_str("{\"id\":");
    out.push_str(&id);
    if !fields.is_empty() {
        out.push(',');
        out.push_str(fields);
    }
    out.push_str(",\"_meta\":");
    out.push_str(&meta);
    out.push('}');
    out
}

/// A version number from a query parameter (1 or more).
fn version_param(pairs: &[(String, String)], name: &str) -> Result<Option<Version>> {
    match param(pairs, name) {
        None => Ok(None),
        Some(raw) => match raw.parse::<u64>() {
            Ok(v) if v >= 1 => Ok(Some(Version(v))),
            _ => Err(Problem::bad_request(
                format!("{name} must be a version: a whole number from 1, not {raw:?}"),
                vec![],
            )),
        },
    }
}

/// The aggregate at a version (`version=N`) or a time (`at=RFC 3339`), folded from its events
/// (SPEC §3.1, time travel).
async fn time_travel(
    s: &AppState,
    key: &StreamKey,
    pairs: &[(String, String)],
    conditions: &Preconditions,
) -> Result<Response> {
    let agg = match (version_param(pairs, "version")?, param(pairs, "at")) {
        (Some(_), Some(_)) => return Err(Problem::bad_request("give version or at, not both", vec![])),
        (Some(v), None) => {
            let agg = s.engine.load(key, Some(v)).await.map_err(|e| from_engine(e, false))?;
            if agg.version > Version::ZERO && agg.version < v {
                return Err(Problem::not_found(format!(
                    "{} '{}' has no version {v}: it is at version {}",
                    key.type_name, key.id, agg.version
                )));
            }
            agg
        }
        (None, Some(raw)) => {
            let at = sourced_core::timestamp::parse(raw).ok_or_else(|| {
                Problem::bad_request(
                    format!("at must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z, not {raw:?}"),
                    vec![],
                )
            })?;
            let agg = s.engine.load_at(key, at).await.map_err(|e| from_engine(e, false))?;
            if agg.version == Version::ZERO && s.engine.stream_exists(key).await? {
                return Err(Problem::not_found(format!("{} '{}' did not exist yet at {raw}", key.type_name, key.id)));
            }
            agg
        }
        (None, None) => unreachable!("time travel needs version or at"),
    };
    if agg.version == Version::ZERO {
        return Err(Problem::not_found(format!("no {} with id '{}'", key.type_name, key.id)));
    }
    if agg.deleted {
        return Err(sourced_core::DomainError::Deleted { version: agg.version }.into());
    }
    if let ReadCondition::NotModified = conditions.evaluate(Current::document(Some(agg.version), false), true)? {
        return Ok(not_modified(agg.version));
    }
    let doc = agg.document(&key.id).unwrap_or(Value::Null);
    let mut r = axum::Json(doc).into_response();
    r.headers_mut().insert(header::ETAG, etag(agg.version));
    Ok(r)
}

/// `GET /{type}/{id}/diff?from=A&to=B`: what changed between two versions, as an RFC 6902
/// patch from the document at `from` to the document at `to` (default: the latest).
pub(crate) async fn diff(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let pairs = query_pairs(&q, &["from", "to"])?;
    let key = caller.key(&ty, &id)?;
    caller.allow(&Action::Read, &key.type_name)?;
    let from =
        version_param(&pairs, "from")?.ok_or_else(|| Problem::bad_request("from (a version) is required", vec![]))?;
    let to_asked = version_param(&pairs, "to")?;
    if let Some(to) = to_asked.filter(|to| from > *to) {
        return Err(Problem::bad_request(format!("from ({from}) must not be after to ({to})"), vec![]));
    }
    let latest = s.engine.load(&key, to_asked).await.map_err(|e| from_engine(e, false))?;
    if latest.version == Version::ZERO {
        return Err(Problem::not_found(format!("no {} with id '{}'", key.type_name, key.id)));
    }
    let to = to_asked.unwrap_or(latest.version);
    for v in [from, to] {
        if v > latest.version {
            return Err(Problem::not_found(format!(
                "{} '{}' has no version {v}: it is at version {}",
                key.type_name, key.id, latest.version
            )));
        }
    }
    let earlier = s.engine.load(&key, Some(from)).await.map_err(|e| from_engine(e, false))?;
    let empty = Value::Object(serde_json::Map::new());
    let patch =
        sourced_core::patch::diff(earlier.state.as_ref().unwrap_or(&empty), latest.state.as_ref().unwrap_or(&empty));
    Ok(axum::Json(json!({
        "from": from,
        "to": to,
        "deleted": {"from": earlier.deleted, "to": latest.deleted},
        "patch": sourced_core::patch::to_value(&patch),
    }))
    .into_response())
}

pub(crate) async fn history(
    State(s): State<AppState>,
    caller: Caller,
    Path((ty, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let pairs = query_pairs(&q, &["limit", "cursor", "from", "to"])?;
    let key = caller.key(&ty, &id)?;
    caller.allow(&Action::Read, &key.type_name)?;
    let limit = page_limit(&pairs, &s.http)?;
    let from = version_param(&pairs, "from")?;
    let to = version_param(&pairs, "to")?;
    let after = match param(&pairs, "cursor") {
        None => Version(from.map_or(0, |v| v.0 - 1)),
        Some(c) => Version(
            decode_cursor("history", c)?.as_u64().ok_or_else(|| Problem::bad_request("invalid cursor", vec![]))?,
        ),
    };
    let items = s.engine.stream_events(&key, after, to, limit).await?;
    if items.is_empty() && !s.engine.stream_exists(&key).await? {
        return Err(Problem::not_found(format!("no {} with id '{}'", key.type_name, key.id)));
    }
    let next = (items.len() == limit).then(|| encode_cursor("history", json!(items.last().map(|e| e.version.0))));
    Ok(axum::Json(json!({"items": items, "next": next})).into_response())
}

/// Query parameters of a list that are not filters.
const LIST_PARAMS: &[&str] = &["limit", "cursor", "includeDeleted", "sort", "count", "fields"];

/// `GET /{type}` (SPEC §5): every parameter that is not one of [`LIST_PARAMS`] is a filter
/// (`field=value`, `field[op]=value`); `sort`, `fields`, `count`, `includeDeleted`, `limit`
/// and `cursor` shape the page. Semantics: `sourced_core::query`.
pub(crate) async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Path(ty): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let list_type = type_name(&ty)?;
    caller.allow(&Action::List, &list_type)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| Problem::bad_request(format!("malformed query string: {e}"), vec![]))?;
    let mut violations = Vec::new();
    let mut filters = Vec::new();
    for (k, v) in pairs.iter().filter(|(k, _)| !LIST_PARAMS.contains(&k.as_str())) {
        match query::Filter::parse(k, v) {
            Ok(f) => filters.push(f),
            Err(e) => violations.push(Violation::new("", e.to_string())),
        }
    }
    if filters.len() > query::FILTERS_MAX {
        violations.push(Violation::new("", format!("at most {} filters", query::FILTERS_MAX)));
    }
    let sort = match param(&pairs, "sort").filter(|s| !s.is_empty()) {
        None => Vec::new(),
        Some(raw) => query::parse_sort(raw).unwrap_or_else(|e| {
            violations.push(Violation::new("", e.to_string()));
            Vec::new()
        }),
    };
    let fields = match param(&pairs, "fields") {
        None => None,
        Some(raw) => query::parse_fields(raw).map(Some).unwrap_or_else(|e| {
            violations.push(Violation::new("", e.to_string()));
            None
        }),
    };
    if !violations.is_empty() {
        return Err(Problem::bad_request(
            format!(
                "invalid list query; filters are field=value or field[op]=value with op one of {}; \
                 other parameters: {}",
                query::OPERATORS.join(", "),
                LIST_PARAMS.join(", ")
            ),
            violations,
        ));
    }
    let order = sort_text(&sort);
    let after = match param(&pairs, "cursor") {
        None => None,
        Some(c) => Some(list_cursor(&decode_cursor("list", c)?, &order)?),
    };
    let mut list = ListQuery {
        filters,
        sort,
        after,
        include_deleted: flag(&pairs, "includeDeleted")?,
        ..ListQuery::new(caller.tenant(), type_name(&ty)?, page_limit(&pairs, &s.http)?)
    };
    let count = if flag(&pairs, "count")? { Some(s.engine.count_documents(&list).await?) } else { None };
    let rows = s.engine.list_documents(&list).await?;
    let next = if rows.len() == list.limit {
        rows.last().map(|last| {
            list.after = Some(list.cursor_after(last));
            encode_cursor("list", cursor_json(list.after.as_ref().expect("just set"), &order))
        })
    } else {
        None
    };
    let items: Vec<Value> = rows
        .iter()
        .map(|row| match &fields {
            None => row_document(row),
            Some(fields) => row_document(&DocumentRow { state: query::project(&row.state, fields), ..row.clone() }),
        })
        .collect();
    let mut body = json!({"items": items, "next": next});
    if let Some(n) = count {
        body["count"] = json!(n);
    }
    Ok(axum::Json(body).into_response())
}

/// The sort as text (`-a,b`), which a cursor carries so it is only used with the same order.
fn sort_text(sort: &[query::SortKey]) -> String {
    sort.iter().map(|k| format!("{}{}", if k.descending { "-" } else { "" }, k.field)).collect::<Vec<_>>().join(",")
}

pub(crate) fn cursor_json(cursor: &ListCursor, order: &str) -> Value {
    let slots: Vec<Value> = cursor.slots.iter().map(|s| json!([s.rank, s.num, s.text])).collect();
    json!({"o": order, "s": slots, "id": cursor.id.as_str()})
}

pub(crate) fn list_cursor(v: &Value, order: &str) -> Result<ListCursor> {
    let invalid =
        || Problem::bad_request("invalid cursor: pass back the 'next' value of a page of this listing", vec![]);
    if v.get("o").and_then(Value::as_str) != Some(order) {
        return Err(Problem::bad_request("this cursor belongs to a listing in another order (sort)", vec![]));
    }
    let id = v.get("id").and_then(Value::as_str).and_then(|s| AggregateId::parse(s).ok()).ok_or_else(invalid)?;
    let slots = v
        .get("s")
        .and_then(Value::as_array)
        .ok_or_else(invalid)?
        .iter()
        .map(|slot| match slot.as_array().map(Vec::as_slice) {
            Some([Value::Number(r), Value::Number(n), Value::String(t)]) => {
                Ok(query::SortSlot { rank: r.as_i64().ok_or_else(invalid)?, num: n.clone(), text: t.clone() })
            }
            _ => Err(invalid()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ListCursor { slots, id })
}

/// The tenant's global feed. It never ends: `next` is always where to continue from. With
/// `Accept: text/event-stream` it streams live instead (SSE, see `sse.rs`).
pub(crate) async fn feed(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    guard: Option<axum::Extension<axum::extract::ConnectInfo<crate::stall::StallGuard>>>,
) -> Result<Response> {
    if headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream") && !a.contains("json"))
    {
        return crate::sse::live_feed(&s, &caller, &q, &headers, guard.map(|g| g.0.0));
    }
    let pairs = query_pairs(&q, &["limit", "cursor", "after", "access_token"])?;
    let limit = page_limit(&pairs, &s.http)?;
    let after = match (param(&pairs, "cursor"), param(&pairs, "after")) {
        (Some(_), Some(_)) => return Err(Problem::bad_request("give either cursor or after, not both", vec![])),
        (Some(c), None) => {
            decode_cursor("feed", c)?.as_u64().ok_or_else(|| Problem::bad_request("invalid cursor", vec![]))?
        }
        (None, Some(a)) => a.parse::<u64>().map_err(|_| {
            Problem::bad_request(format!("after must be a position (a whole number), not {a:?}"), vec![])
        })?,
        (None, None) => 0,
    };
    let mut filter = sourced_engine::SubscriptionFilter::default();
    caller.restrict(&mut filter)?;
    let mut items = s.engine.feed(&caller.tenant(), Position(after), limit).await?;
    // The cursor moves past what was read, shown or not.
    let last = items.last().map_or(after, |e| e.position.0);
    items.retain(|e| filter.matches(e));
    Ok(axum::Json(json!({"items": items, "next": encode_cursor("feed", json!(last))})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warnings header is visible ASCII that parses back to the warnings.
    #[test]
    fn warnings_header_is_ascii_json() {
        let cases = [
            (json!([]), None),
            (json!([{"rule": "r", "message": "m"}]), Some(r#"[{"rule":"r","message":"m"}]"#)),
            (
                json!([{"rule": "é", "message": "\u{1F600}\n\"q\""}]),
                Some(r#"[{"rule":"\u00e9","message":"\ud83d\ude00\n\"q\""}]"#),
            ),
        ];
        for (warnings, expected) in cases {
            let mut h = HeaderMap::new();
            insert_warnings(&mut h, warnings.as_array().unwrap());
            let got = h.get(WARNINGS_HEADER).map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(got.as_deref(), expected);
            if let Some(got) = got {
                assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), warnings);
            }
        }
    }

    /// GET's document written around the stored text is byte for byte the one built from the
    /// parsed state.
    #[test]
    fn spliced_documents_equal_built_ones() {
        let states = [
            json!({}),
            json!({"a": 1}),
            json!({"z": "x", "a": [1, {"b": null}], "é": "\u{1F600}\"q\"", "n": -1.5e-7, "t": true}),
        ];
        for (i, state) in states.iter().enumerate() {
            let row = DocumentRow {
                key: StreamKey {
                    tenant: sourced_core::TenantId::parse("t").unwrap(),
                    type_name: TypeName::parse("doc").unwrap(),
                    id: AggregateId::parse(&format!("d-{i}")).unwrap(),
                },
                version: Version(3),
                state: state.clone(),
                deleted: i == 1,
                created_at: sourced_core::timestamp::from_micros(1_700_000_000_000_001),
                updated_at: sourced_core::timestamp::from_micros(1_700_000_000_500_000),
            };
            let built = serde_json::to_string(&row_document(&row)).unwrap();
            assert_eq!(document_json(&DocumentText::from(row)), built);
        }
    }
}
