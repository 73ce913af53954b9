//! `GET /openapi.json` (SPEC §3.1): an OpenAPI 3.1 document generated from the routes of
//! `http.rs` and the artifact set loaded at the time of the request, so it follows reloads.
//! Built with `serde_json` alone: the routes are few and fixed, and the artifact schemas are
//! spliced in as they are (JSON Schema 2020-12 is OpenAPI 3.1's dialect).
//!
//! Every route the router serves over plain HTTP is listed (`/ws` and `/socket.io/` are
//! protocol upgrades and are described, not listed), with every status code it can answer;
//! errors are `application/problem+json`.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use sourced_core::artifacts::{ArtifactSet, TypeArtifacts};
use sourced_core::ids::RESERVED_TYPE_NAMES;

use crate::state::AppState;

/// `GET /openapi.json`.
pub(crate) async fn serve(
    State(s): State<AppState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response, crate::problem::Problem> {
    crate::request::query_pairs(&q, &[])?;
    let modes = s.gate.modes();
    let protection =
        Protection { keys: modes.contains(&"keys"), jwt: modes.contains(&"jwt"), rate_limited: s.rate_limit.is_some() };
    let doc = document(&s.engine.artifacts(), s.http.page_limit_max, s.reloader.is_some(), protection);
    let mut r = axum::Json(doc).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// Status codes and what they mean, for the error responses of the operations.
const ERRORS: &[(u16, &str)] = &[
    (400, "malformed request (JSON, envelope, path, query or header)"),
    (404, "unknown aggregate, unknown type path, or reserved type name"),
    (
        405,
        "method not allowed: the path is a fixed route of the service (a reserved name in place of {type} or {command}) that does not serve this method",
    ),
    (409, "version conflict, or the aggregate already exists"),
    (410, "the aggregate was deleted"),
    (
        412,
        "a precondition does not hold: If-Match matches no current ETag (strong comparison), or If-None-Match matches one",
    ),
    (413, "body or resulting document too large"),
    (415, "unsupported Content-Type"),
    (422, "schema, payload, rule, lifecycle, patch or expression violation; every one listed"),
    (428, "this deployment requires If-Match on writes to existing aggregates"),
    (503, "the event store is unavailable"),
];

const READ_ERRORS: &[u16] = &[400, 404, 405, 410, 503];
const WRITE_ERRORS: &[u16] = &[400, 404, 405, 409, 410, 412, 413, 415, 422, 428, 503];
const LIST_ERRORS: &[u16] = &[400, 404, 405, 503];

/// What the document says about credentials and rate limits (docs/security.md): the `AUTH`
/// modes that are on (with neither, the document declares no security at all) and whether
/// `RATE_LIMIT_PER_SEC` can answer 429.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// `AUTH=keys`: API keys.
    pub keys: bool,
    /// `AUTH=jwt`: JWT bearer tokens.
    pub jwt: bool,
    /// Rate limits are on.
    pub rate_limited: bool,
}

impl Protection {
    fn auth(self) -> bool {
        self.keys || self.jwt
    }
}

/// The paths every caller may read, with or without a credential: they describe the service,
/// not a tenant's data (docs/security.md, "Where it is checked"). Every other operation checks
/// the caller.
pub const PUBLIC_PATHS: &[&str] = &["/healthz", "/readyz", "/openapi.json", "/schemas/{file}"];

/// The whole document for `set`.
pub fn document(set: &ArtifactSet, page_limit_max: usize, admin: bool, protection: Protection) -> Value {
    let mut paths = Map::new();
    let mut schemas = base_schemas();
    service_paths(&mut paths);
    command_and_feed_paths(&mut paths, page_limit_max);
    if admin {
        admin_paths(&mut paths);
    }
    process_paths(&mut paths, &mut schemas, page_limit_max);
    generic_type_paths(&mut paths, page_limit_max);
    // Per type with artifacts: its schema, and one path per custom command with its payload.
    for (name, a) in set.types() {
        type_paths(&mut paths, &mut schemas, name.as_str(), a, page_limit_max);
    }
    link_creates_to_their_aggregates(&mut paths);
    let mut components = json!({"schemas": schemas});
    let mut security = None;
    if protection.auth() {
        components["securitySchemes"] = security_schemes(protection);
        security = Some(json!([{"bearer": []}, {"apiKey": []}]));
        guard_operations(&mut paths, protection);
    } else if protection.rate_limited {
        guard_operations(&mut paths, protection);
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Sourced",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A generic CQRS / event-sourcing service. Every write is a command that becomes events. The WebSocket protocol (`GET /ws`) and Socket.IO (`/socket.io/`) carry the same commands and are not described here. Errors are RFC 9457 `application/problem+json`."
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": components
    });
    if let Some(security) = security {
        doc["security"] = security;
    }
    doc
}

/// The credentials a request may carry, as OpenAPI security schemes: `Authorization: Bearer`
/// and `X-Api-Key` (each takes an API key or a JWT, whichever modes are on), and for the feed
/// the `access_token` query parameter and the `sourced_token` cookie.
fn security_schemes(p: Protection) -> Value {
    let what = match (p.keys, p.jwt) {
        (true, true) => "an API key (`sk_…`) or a JWT",
        (true, false) => "an API key (`sk_…`)",
        _ => "a JWT (HS256, RS256 or ES256, with iss, aud, exp, sub and the tenant claim)",
    };
    let mut bearer = json!({"type": "http", "scheme": "bearer",
        "description": format!("`Authorization: Bearer <credential>`: {what}")});
    if !p.keys {
        bearer["bearerFormat"] = json!("JWT");
    }
    json!({
        "bearer": bearer,
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key",
            "description": format!("{what}, when the request has no Authorization header")},
        "accessToken": {"type": "apiKey", "in": "query", "name": "access_token",
            "description": format!("{what}; only on GET /events (for EventSource, which cannot set headers): URLs end up in logs, prefer the cookie")},
        "cookie": {"type": "apiKey", "in": "cookie", "name": "sourced_token",
            "description": format!("{what}; only on GET /events")}
    })
}

/// Every operation outside [`PUBLIC_PATHS`] checks the caller: it lists 401 and 403 when
/// authentication is on, and 429 when rate limits are. Public operations need no credential
/// (`security: []`); the feed also takes its credential in the query or a cookie.
fn guard_operations(paths: &mut Map<String, Value>, p: Protection) {
    for (path, item) in paths.iter_mut() {
        let public = PUBLIC_PATHS.contains(&path.as_str());
        for op in item.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
            if public {
                if p.auth() {
                    op["security"] = json!([]);
                }
                continue;
            }
            if p.auth() && path == "/events" {
                op["security"] = json!([{"bearer": []}, {"apiKey": []}, {"accessToken": []}, {"cookie": []}]);
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            if p.auth() {
                let mut unauthenticated = problem_response(
                    "no credential, or one that proves nothing (missing, unknown, malformed, expired, wrong issuer or audience); the problem's type names which",
                );
                unauthenticated["headers"] =
                    json!({"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}});
                responses.insert("401".into(), unauthenticated);
                responses.insert("403".into(), problem_response(
                    "the credential is valid but does not allow this: another tenant (`tenant-not-allowed`, `tenant-required`) or an action its roles lack (`forbidden`, with `action` and `targetName`)",
                ));
            }
            if p.rate_limited {
                let mut limited = problem_response(
                    "rate limited: the caller's token bucket is empty (`rate-limited`, with `retryAfter`)",
                );
                limited["headers"] =
                    json!({"Retry-After": {"description": "whole seconds to wait", "schema": {"type": "string"}}});
                responses.insert("429".into(), limited);
            }
            responses.sort_keys();
        }
    }
}

/// The service's own routes: health, readiness, this document and the schemas.
fn service_paths(paths: &mut Map<String, Value>) {
    paths.insert("/healthz".into(), json!({"get": {
        "operationId": "healthz", "summary": "Liveness", "tags": ["service"],
        "responses": {"200": json_response("alive", json!({"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]})), "400": problem_response("query parameters are refused")}
    }}));
    paths.insert("/readyz".into(), json!({"get": {
        "operationId": "readyz", "summary": "Readiness: the store answers and the artifact set is loaded", "tags": ["service"],
        "responses": {
            "200": json_response("ready", json!({"type": "object", "properties": {"status": {"const": "ready"}}, "required": ["status"]})),
            "400": problem_response("query parameters are refused"),
            "503": problem_response("not ready")
        }
    }}));
    paths.insert("/metrics".into(), json!({"get": {
        "operationId": "metrics", "summary": "Prometheus metrics (text format 0.0.4); with authentication on, the admin action", "tags": ["service"],
        "responses": {"200": {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    }}));
    paths.insert("/openapi.json".into(), json!({"get": {
        "operationId": "openapi", "summary": "This document, generated from the routes and the loaded artifact set", "tags": ["service"],
        "responses": {"200": json_response("the OpenAPI 3.1 document", json!({"type": "object"})), "400": problem_response("query parameters are refused")}
    }}));
    paths.insert("/schemas/{file}".into(), json!({"get": {
        "operationId": "getSchema", "summary": "The command envelope's schema (command.json) or a loaded type's schema ({type}.json)", "tags": ["service"],
        "parameters": [{"name": "file", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}],
        "responses": {
            "200": {"description": "a JSON Schema", "content": {"application/schema+json": {"schema": {"type": "object"}}}},
            "400": problem_response("query parameters are refused"),
            "404": problem_response("no such schema")
        }
    }}));
}

/// `POST /commands` and the global feed `GET /events`.
fn command_and_feed_paths(paths: &mut Map<String, Value>, page_limit_max: usize) {
    paths.insert("/commands".into(), json!({"post": {
        "operationId": "postCommand", "summary": "Run a raw command envelope (same semantics as the WebSocket)", "tags": ["commands"],
        "parameters": [idempotency_key(), tenant(), prefer()],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandEnvelope"}}}},
        "responses": with_errors(json!({
            "200": json_response_headers("the command result", json!({"$ref": "#/components/schemas/CommandResult"}), &["ETag", "Sourced-Warnings"]),
            "204": {"description": "with Prefer: return=minimal", "headers": response_headers(&["ETag", "Sourced-Warnings"])}
        }), WRITE_ERRORS)
    }}));
    paths.insert("/events".into(), json!({"get": {
        "operationId": "feed", "tags": ["events"],
        "summary": "The tenant's global event feed, in position order",
        "description": "With `Accept: text/event-stream` the feed is streamed live instead (SSE, resumable with `Last-Event-ID`, filtered by `targetName`/`targetId`).",
        "parameters": [
            {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}, "description": "a position"},
            cursor(), limit(page_limit_max), tenant()
        ],
        "responses": with_errors(json!({
            "200": {"description": "a page of events; `next` is where to continue", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FeedPage"}},
                "text/event-stream": {"schema": {"type": "string"}}
            }}
        }), &[400, 503])
    }}));
}

/// `GET /processes`, `GET /processes/{name}`, `GET /processes/{name}/{key}` and the operators'
/// steps (SPEC §4.5), with their schemas.
fn process_paths(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>, page_limit_max: usize) {
    let counts = |what: &str| json!({"type": "integer", "minimum": 0, "description": what});
    schemas.insert("ProcessSummary".into(), json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "instanceType": {"type": "string", "description": "the aggregate type of its instances, process-<name>"},
            "running": counts("instances running in the tenant"),
            "completed": counts("instances completed in the tenant"),
            "parked": counts("instances parked in the tenant"),
            "cancelled": counts("instances cancelled in the tenant"),
            "checkpoint": {"type": ["integer", "null"], "minimum": 0, "description": "the last global position the process handled"},
            "lag": counts("positions committed after the checkpoint")
        },
        "required": ["name", "instanceType", "running", "completed", "parked", "cancelled", "checkpoint", "lag"]
    }));
    schemas.insert("ProcessInstance".into(), json!({
        "type": "object",
        "properties": {
            "process": {"type": "string"}, "key": {"type": "string"}, "state": {"type": "string"},
            "status": {"enum": ["running", "completed", "parked", "cancelled"]},
            "startedAt": {"type": "string", "format": "date-time"},
            "data": {"type": "object"},
            "steps": {"type": "integer", "minimum": 1},
            "handled": {"type": "integer", "minimum": 0, "description": "the position of the last event it handled"},
            "timers": {"type": "array", "items": {"type": "object", "properties": {"transition": {"type": "integer"}, "due": {"type": "string", "format": "date-time"}}}},
            "pending": {"type": "array", "items": {"type": "object"}, "description": "the last step's commands not yet confirmed"},
            "problem": {"type": ["string", "null"], "description": "why it is parked"},
            "attempts": {"type": "integer", "minimum": 0},
            "retryAt": {"type": ["string", "null"], "format": "date-time"},
            "history": {"type": "array", "description": "its latest steps, oldest first", "items": {"type": "object", "properties": {
                "version": {"type": "integer"}, "position": {"type": "integer"}, "type": {"type": "string"}, "timestamp": {"type": "string", "format": "date-time"}
            }}},
            "_meta": {"type": "object"}
        },
        "required": ["process", "key", "state", "status", "startedAt", "data", "timers", "pending", "history", "_meta"]
    }));
    paths.insert("/processes".into(), json!({"get": {
        "operationId": "listProcesses", "tags": ["processes"],
        "summary": "The process managers of the artifact set, with their instances counted in the tenant",
        "parameters": [tenant()],
        "responses": with_errors(json!({
            "200": json_response("the processes", json!({"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/ProcessSummary"}}}, "required": ["items"]}))
        }), &[400, 503])
    }}));
    paths.insert("/processes/{name}/{key}".into(), json!({"get": {
        "operationId": "getProcessInstance", "tags": ["processes"],
        "summary": "One process instance: state, data, timers, pending commands, the problem that parked it, its latest steps",
        "parameters": [
            {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
            {"name": "key", "in": "path", "required": true, "schema": {"type": "string"}},
            tenant()
        ],
        "responses": with_errors(json!({
            "200": json_response("the instance", json!({"$ref": "#/components/schemas/ProcessInstance"}))
        }), &[400, 404, 503])
    }}));
    process_list_paths(paths, schemas, page_limit_max);
    process_step_paths(paths);
}

/// `GET /processes/{name}`: a process's instances, filtered and paged.
fn process_list_paths(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>, page_limit_max: usize) {
    let mut item = schemas["ProcessInstance"].clone();
    item["properties"].as_object_mut().expect("an object schema").remove("history");
    item["required"] = json!(["process", "key", "state", "status", "startedAt", "data", "timers", "pending", "_meta"]);
    schemas.insert("ProcessInstanceItem".into(), item);
    paths.insert("/processes/{name}".into(), json!({"get": {
        "operationId": "listProcessInstances", "tags": ["processes"],
        "summary": "A process's instances in the tenant, by key, filtered by state and status, paged",
        "parameters": [
            {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
            {"name": "state", "in": "query", "schema": {"type": "string"}, "description": "only instances in this state"},
            {"name": "status", "in": "query", "schema": {"enum": ["running", "parked", "completed", "cancelled"]}, "description": "only instances with this status"},
            cursor(), limit(page_limit_max), tenant()
        ],
        "responses": with_errors(json!({
            "200": json_response("a page of instances; `next` is where to continue", json!({"type": "object", "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/ProcessInstanceItem"}},
                "next": {"type": ["string", "null"]}
            }, "required": ["items", "next"]}))
        }), &[400, 404, 503])
    }}));
}

/// `POST /processes/{name}/{key}/retry`, `/skip` and `/cancel`.
fn process_step_paths(paths: &mut Map<String, Value>) {
    let steps = [
        (
            "retry",
            "retryProcessInstance",
            "A parked instance tries its failed step again now: its pending commands, or else its earliest timer once due",
            "process-not-parked: the instance is not parked",
        ),
        (
            "skip",
            "skipProcessInstance",
            "A parked instance drops its failed step (its pending commands, or else its earliest timer when due) and goes on in its state",
            "process-not-parked: the instance is not parked",
        ),
        (
            "cancel",
            "cancelProcessInstance",
            "A running or parked instance ends with the status cancelled: its timers and pending commands are dropped",
            "process-ended: the instance is completed or cancelled",
        ),
    ];
    for (action, id, summary, wrong) in steps {
        paths.insert(format!("/processes/{{name}}/{{key}}/{action}"), json!({"post": {
            "operationId": id, "tags": ["processes"],
            "summary": summary,
            "description": "An operator's step, recorded as an event of the instance's stream with the caller's principal in its metadata. With authentication on, the caller needs the `admin` action.",
            "parameters": [
                {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
                {"name": "key", "in": "path", "required": true, "schema": {"type": "string"}},
                tenant()
            ],
            "responses": with_errors(json!({
                "200": json_response("the instance after the step", json!({"$ref": "#/components/schemas/ProcessInstance"})),
                "409": problem_response(&format!("{wrong}; or version-conflict: the instance moved on meanwhile"))
            }), &[400, 404, 503])
        }}));
    }
}

/// `POST /admin/reload`, served only with `ADMIN_API=true`.
fn admin_paths(paths: &mut Map<String, Value>) {
    paths.insert("/admin/reload".into(), json!({"post": {
        "operationId": "adminReload", "tags": ["admin"],
        "summary": "Read the artifact set again and swap it in, or keep the running one",
        "description": "Served only with ADMIN_API=true. With authentication on, the caller needs the `admin` action (on any type); with AUTH=none anyone who reaches the port may reload.",
        "responses": {
            "200": json_response("the new set's types and commands", json!({"type": "object"})),
            "409": problem_response("ARTIFACTS is not set"),
            "422": problem_response("the new set has problems (listed in `problems`); the old set stays"),
            "502": problem_response("git could not fetch the set; the old set stays")
        }
    }}));
}

/// The generic routes, for every type (free JSON where no artifacts say otherwise).
fn generic_type_paths(paths: &mut Map<String, Value>, page_limit_max: usize) {
    // Reserved names are not excluded by the schema: a path that spells one of the service's own
    // routes is that route (OpenAPI matches concrete paths first), and the type refused
    // elsewhere (404) is said in the description.
    let type_param = json!({"name": "type", "in": "path", "required": true,
        "description": format!("aggregate type; these names are the service's own and refused: {}", RESERVED_TYPE_NAMES.join(", ")),
        "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"}});
    let any_object = json!({"type": "object"});
    paths.insert("/{type}".into(), collection_item(Some(&type_param), &any_object, page_limit_max, "{type}"));
    paths.insert("/{type}/{id}".into(), document_item(Some(&type_param), &any_object, "{type}"));
    paths.insert("/{type}/{id}/events".into(), history_item(Some(&type_param), page_limit_max, "{type}"));
    paths.insert("/{type}/{id}/diff".into(), diff_item(Some(&type_param), "{type}"));
    paths.insert(
        "/{type}/{id}/{command}".into(),
        json!({"post": command_op(
        Some(&type_param),
        &json!({"name": "command", "in": "path", "required": true, "description": "a custom command of the type (not `events` or `diff`, which are the history's and the diff's paths)",
            "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"}}),
        &any_object, "customCommand", "Run a custom command of the type (SPEC §4.2); the body is its payload")}),
    );
}

/// The routes of type `t` with artifacts `a`: its schema and its custom commands' payloads
/// become components.
fn type_paths(
    paths: &mut Map<String, Value>,
    schemas: &mut Map<String, Value>,
    t: &str,
    a: &TypeArtifacts,
    page_limit_max: usize,
) {
    let doc_schema = match &a.schema {
        Some(s) => {
            schemas.insert(t.to_owned(), component(s.source(), t));
            json!({"$ref": format!("#/components/schemas/{t}")})
        }
        None => json!({"type": "object"}),
    };
    paths.insert(format!("/{t}"), collection_item(None, &doc_schema, page_limit_max, t));
    paths.insert(format!("/{t}/{{id}}"), document_item(None, &doc_schema, t));
    paths.insert(format!("/{t}/{{id}}/events"), history_item(None, page_limit_max, t));
    paths.insert(format!("/{t}/{{id}}/diff"), diff_item(None, t));
    for (c, def) in &a.commands {
        let payload = match &def.payload {
            Some(p) => {
                let key = format!("{t}.{c}.payload");
                schemas.insert(key.clone(), component(p.source(), &key));
                json!({"$ref": format!("#/components/schemas/{key}")})
            }
            None => json!({"type": "object"}),
        };
        let mut summary = format!("Custom command `{c}` of `{t}`");
        let events: Vec<&str> = def.emit.iter().map(|e| e.event.as_str()).collect();
        summary.push_str(&format!(" (emits {})", events.join(", ")));
        if def.creates {
            summary.push_str("; may create the aggregate");
        }
        paths.insert(
            format!("/{t}/{{id}}/{c}"),
            json!({"post": command_op(None, &Value::Null, &payload, &format!("{}_{}", camel(t), camel(c)), &summary)}),
        );
    }
}

/// OpenAPI links from each create (`POST /{type}` → 201) to the operations on the aggregate it
/// made, with `id` from the reply's body (and `type` from the request, on the generic paths):
/// clients and stateful testers can follow them.
fn link_creates_to_their_aggregates(paths: &mut Map<String, Value>) {
    let collections: Vec<String> =
        paths.keys().filter(|p| p.matches('/').count() == 1 && !p.contains('.')).cloned().collect();
    for collection in collections {
        let prefix = format!("{collection}/{{id}}");
        let mut links = Map::new();
        for (path, item) in paths.iter() {
            if !(path == &prefix || path.starts_with(&format!("{prefix}/"))) {
                continue;
            }
            for op in item.as_object().into_iter().flat_map(|m| m.values()) {
                let Some(id) = op["operationId"].as_str() else { continue };
                let mut parameters = Map::new();
                parameters.insert("id".into(), json!("$response.body#/id"));
                if collection == "/{type}" {
                    parameters.insert("type".into(), json!("$request.path.type"));
                }
                if path.ends_with("/{command}") {
                    continue; // the command's name cannot come from the reply
                }
                links.insert(id.to_owned(), json!({"operationId": id, "parameters": parameters}));
            }
        }
        if let Some(created) = paths.get_mut(&collection).and_then(|i| i.pointer_mut("/post/responses/201")) {
            created["links"] = Value::Object(links);
        }
    }
}

fn camel(s: &str) -> String {
    s.split(['-', '_']).filter(|p| !p.is_empty()).map(|p| p[..1].to_uppercase() + &p[1..]).collect()
}

/// A loaded schema as a component: `$schema`/`$id` dropped (the document names the dialect)
/// and local references (`#/$defs/x`) rewritten to point inside the component.
fn component(source: &Value, key: &str) -> Value {
    fn rewrite(v: &mut Value, base: &str) {
        match v {
            Value::Object(m) => {
                for (k, child) in m.iter_mut() {
                    if k == "$ref"
                        && let Value::String(r) = child
                        && let Some(rest) = r.strip_prefix('#')
                    {
                        *r = format!("{base}{rest}");
                    } else {
                        rewrite(child, base);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|c| rewrite(c, base)),
            _ => {}
        }
    }
    let mut v = source.clone();
    if let Value::Object(m) = &mut v {
        m.remove("$schema");
        m.remove("$id");
    }
    rewrite(&mut v, &format!("#/components/schemas/{}", key.replace('~', "~0").replace('/', "~1")));
    v
}

/// The components every document has: problems, documents and events, pages, and the command
/// envelope.
fn base_schemas() -> Map<String, Value> {
    let mut schemas = problem_schemas();
    schemas.extend(document_schemas());
    schemas.extend(page_schemas());
    let mut envelope = command_schema();
    if let Value::Object(m) = &mut envelope {
        m.remove("$schema");
        m.remove("$id");
    }
    schemas.insert("CommandEnvelope".into(), envelope);
    schemas
}

/// `Problem` and its `Violation`s.
fn problem_schemas() -> Map<String, Value> {
    object(json!({
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details; `type` is `urn:sourced:problem:<slug>`",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 100, "maximum": 599},
                "detail": {"type": "string"},
                "violations": {"type": "array", "items": {"$ref": "#/components/schemas/Violation"}},
                "currentVersion": {"type": "integer", "minimum": 0},
                "allowed": {"type": "array", "items": {"type": "string"}}
            }
        },
        "Violation": {
            "type": "object",
            "required": ["pointer", "message"],
            "properties": {"pointer": {"type": "string"}, "message": {"type": "string"}, "rule": {"type": "string"}}
        }
    }))
}

/// A document, its `_meta`, an event, and the result of a command.
fn document_schemas() -> Map<String, Value> {
    object(json!({
        "Meta": {
            "type": "object",
            "required": ["version", "deleted"],
            "properties": {
                "version": {"type": "integer", "minimum": 1},
                "createdAt": {"type": ["string", "null"], "format": "date-time"},
                "updatedAt": {"type": ["string", "null"], "format": "date-time"},
                "deleted": {"type": "boolean"}
            }
        },
        "Document": {
            "type": "object",
            "description": "The aggregate's state (valid against its type's schema, if any) with the server-owned `id` and `_meta` added",
            "required": ["id", "_meta"],
            "properties": {"id": {"type": "string"}, "_meta": {"$ref": "#/components/schemas/Meta"}}
        },
        "Event": {
            "type": "object",
            "required": ["id", "position", "tenant", "targetName", "targetId", "version", "type", "data", "metadata", "timestamp"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "position": {"type": "integer", "minimum": 1},
                "tenant": {"type": "string"},
                "targetName": {"type": "string"},
                "targetId": {"type": "string"},
                "version": {"type": "integer", "minimum": 1},
                "type": {"type": "string", "description": "created, patched, deleted, or a custom domain event type"},
                "data": {"description": "the document (created), an RFC 6902 patch (patched and custom events), or null (deleted)"},
                "metadata": {"type": "object"},
                "timestamp": {"type": "string", "format": "date-time"}
            }
        },
        "CommandResult": {
            "type": "object",
            "required": ["id", "targetName", "targetId", "version", "events", "warnings"],
            "properties": {
                "id": {"type": "string"},
                "targetName": {"type": "string"},
                "targetId": {"type": "string"},
                "version": {"type": "integer", "minimum": 0},
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                "warnings": {"type": "array", "items": {"type": "object", "properties": {"rule": {"type": "string"}, "message": {"type": "string"}}}}
            }
        }
    }))
}

/// Pages of documents and events, a diff, and the JSON Patch it is made of.
fn page_schemas() -> Map<String, Value> {
    object(json!({
        "DocumentPage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}},
                "next": {"type": ["string", "null"]},
                "count": {"type": "integer", "minimum": 0, "description": "with count=true: the rows the filters match"}
            }
        },
        "Diff": {
            "type": "object",
            "required": ["from", "to", "deleted", "patch"],
            "properties": {
                "from": {"type": "integer", "minimum": 1},
                "to": {"type": "integer", "minimum": 1},
                "deleted": {"type": "object", "properties": {"from": {"type": "boolean"}, "to": {"type": "boolean"}}},
                "patch": {"$ref": "#/components/schemas/JsonPatch"}
            }
        },
        "EventPage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}, "next": {"type": ["string", "null"]}}
        },
        "FeedPage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}, "next": {"type": "string"}}
        },
        "JsonPatch": {
            "type": "array",
            "description": "RFC 6902 JSON Patch",
            "items": {
                "type": "object",
                "required": ["op", "path"],
                "properties": {
                    "op": {"enum": ["add", "remove", "replace", "move", "copy", "test"]},
                    "path": {"type": "string"},
                    "from": {"type": "string"},
                    "value": {}
                }
            }
        }
    }))
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn json_response_headers(description: &str, schema: Value, headers: &[&str]) -> Value {
    let mut r = json_response(description, schema);
    r["headers"] = response_headers(headers);
    r
}

fn response_headers(names: &[&str]) -> Value {
    let mut h = Map::new();
    for n in names {
        let d = match *n {
            "ETag" => "the aggregate's version, as an entity tag (\"N\")",
            "Location" => "the created aggregate's path",
            "Sourced-Warnings" => {
                "when rules of severity warn fired: their warnings as a JSON array of {rule, message} (non-ASCII escaped as \\uXXXX)"
            }
            _ => "",
        };
        h.insert((*n).to_owned(), json!({"description": d, "schema": {"type": "string"}}));
    }
    Value::Object(h)
}

fn problem_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

fn with_errors(mut responses: Value, codes: &[u16]) -> Value {
    for code in codes {
        let description = ERRORS.iter().find(|(c, _)| c == code).map_or("error", |(_, d)| *d);
        responses[code.to_string()] = problem_response(description);
    }
    responses
}

fn tenant() -> Value {
    json!({"name": "X-Tenant", "in": "header", "required": false, "description": "the tenant (default `default`)",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}})
}

fn idempotency_key() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false, "description": "names the command: a retry returns the first reply",
        "schema": {"type": "string", "pattern": "^[!-~]{1,256}$"}})
}

fn if_match() -> Value {
    json!({"name": "If-Match", "in": "header", "required": false, "description": "* (the document exists) or entity tags, one of which must be the current ETag \"N\" (strong comparison; a weak W/ tag never matches)",
        "schema": {"type": "string"}})
}

fn prefer() -> Value {
    json!({"name": "Prefer", "in": "header", "required": false, "description": "return=minimal: 204 with the headers only",
        "schema": {"enum": ["return=minimal", "return=representation"]}})
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "aggregate id",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,127}$"}})
}

fn cursor() -> Value {
    json!({"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "the `next` of the previous page"})
}

fn limit(max: usize) -> Value {
    json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": max}})
}

fn params(type_param: Option<&Value>, rest: Vec<Value>) -> Value {
    let mut p: Vec<Value> = type_param.into_iter().cloned().collect();
    p.extend(rest);
    Value::Array(p)
}

fn op_id(prefix: &str, t: &str) -> String {
    if t == "{type}" { prefix.to_owned() } else { format!("{prefix}_{}", camel(t)) }
}

fn written_document(status: &str) -> Value {
    json!({
        status: json_response_headers("the document after the command, as GET shows it", json!({"$ref": "#/components/schemas/Document"}), &["ETag", "Sourced-Warnings"]),
        "204": {"description": "with Prefer: return=minimal", "headers": response_headers(&["ETag", "Sourced-Warnings"])}
    })
}

fn collection_item(type_param: Option<&Value>, doc_schema: &Value, page_limit_max: usize, t: &str) -> Value {
    let mut created = written_document("201");
    created["201"]["headers"] = response_headers(&["ETag", "Location", "Sourced-Warnings"]);
    json!({
        "post": {
            "operationId": op_id("create", t), "tags": ["documents"],
            "summary": "Create; the id is `body.id` or a generated UUID v7",
            "parameters": params(type_param, vec![idempotency_key(), tenant(), prefer()]),
            "requestBody": {"required": true, "content": {"application/json": {"schema": doc_schema}}},
            "responses": with_errors(created, WRITE_ERRORS)
        },
        "get": {
            "operationId": op_id("list", t), "tags": ["documents"],
            "summary": "Documents of the type: filtered, sorted, paged (docs/queries.md)",
            "description": "Every query parameter not listed here is a filter on a document field: `field=value` (equality) or `field[op]=value` with op one of eq, gt, gte, lt, lte, in, exists, prefix; `field` is `id` or a dot-separated path such as `customer.id`. Values are JSON scalars when they parse as one, else text.",
            "parameters": params(type_param, vec![
                limit(page_limit_max), cursor(),
                json!({"name": "includeDeleted", "in": "query", "schema": {"type": "boolean"}}),
                json!({"name": "sort", "in": "query", "description": "fields, comma-separated, `-` for descending (at most 4); ties by id",
                    "schema": {"type": "string"}}),
                json!({"name": "fields", "in": "query", "description": "projection: document fields to return, comma-separated (besides id and _meta)",
                    "schema": {"type": "string"}}),
                json!({"name": "count", "in": "query", "description": "add `count`: rows matching the filters", "schema": {"type": "boolean"}}),
                tenant()
            ]),
            "responses": with_errors(json!({"200": json_response("a page of documents", json!({"$ref": "#/components/schemas/DocumentPage"}))}), LIST_ERRORS)
        }
    })
}

fn document_item(type_param: Option<&Value>, doc_schema: &Value, t: &str) -> Value {
    let mut replaced = written_document("200");
    replaced["201"] = json_response_headers(
        "created (the aggregate did not exist)",
        json!({"$ref": "#/components/schemas/Document"}),
        &["ETag", "Location", "Sourced-Warnings"],
    );
    let if_none_match_put = json!({"name": "If-None-Match", "in": "header", "required": false,
        "description": "* (create only: 412 when the document exists) or entity tags (412 when one is the current ETag, weak comparison)", "schema": {"type": "string"}});
    let if_none_match_get = json!({"name": "If-None-Match", "in": "header", "required": false,
        "description": "* or entity tags: 304 when one matches the current ETag (weak comparison)", "schema": {"type": "string"}});
    json!({
        "get": {
            "operationId": op_id("get", t), "tags": ["documents"],
            "summary": "The current state, or with `version` or `at` the state as it was (time travel)",
            "parameters": params(type_param, vec![
                id_param(),
                json!({"name": "version", "in": "query", "description": "the state at this version", "schema": {"type": "integer", "minimum": 1}}),
                json!({"name": "at", "in": "query", "description": "the state at this time (RFC 3339)", "schema": {"type": "string", "format": "date-time"}}),
                if_none_match_get, tenant()
            ]),
            "responses": with_errors(json!({
                "200": json_response_headers("the document", json!({"$ref": "#/components/schemas/Document"}), &["ETag"]),
                "304": {"description": "not modified", "headers": response_headers(&["ETag"])}
            }), READ_ERRORS)
        },
        "put": {
            "operationId": op_id("replace", t), "tags": ["documents"],
            "summary": "Replace (stored as the diff), or create when absent",
            "parameters": params(type_param, vec![id_param(), if_match(), if_none_match_put, idempotency_key(), tenant(), prefer()]),
            "requestBody": {"required": true, "content": {"application/json": {"schema": doc_schema}}},
            "responses": with_errors(replaced, WRITE_ERRORS)
        },
        "patch": {
            "operationId": op_id("patch", t), "tags": ["documents"],
            "summary": "RFC 6902 JSON Patch or RFC 7396 merge patch (with application/json: an array is RFC 6902, an object RFC 7396)",
            "parameters": params(type_param, vec![id_param(), if_match(), idempotency_key(), tenant(), prefer()]),
            "requestBody": {"required": true, "content": {
                "application/json-patch+json": {"schema": {"$ref": "#/components/schemas/JsonPatch"}},
                "application/merge-patch+json": {"schema": {"type": "object"}},
                "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/JsonPatch"}, {"type": "object"}]}}
            }},
            "responses": with_errors(written_document("200"), WRITE_ERRORS)
        },
        "delete": {
            "operationId": op_id("delete", t), "tags": ["documents"],
            "summary": "Delete; 200 with the final document (`_meta.deleted: true`)",
            "parameters": params(type_param, vec![id_param(), if_match(), idempotency_key(), tenant(), prefer()]),
            "responses": with_errors(written_document("200"), &[400, 404, 405, 409, 410, 412, 413, 422, 428, 503])
        }
    })
}

fn history_item(type_param: Option<&Value>, page_limit_max: usize, t: &str) -> Value {
    json!({"get": {
        "operationId": op_id("history", t), "tags": ["events"], "summary": "The aggregate's events, in version order",
        "parameters": params(type_param, vec![
            id_param(),
            json!({"name": "from", "in": "query", "description": "first version (inclusive)", "schema": {"type": "integer", "minimum": 1}}),
            json!({"name": "to", "in": "query", "description": "last version (inclusive)", "schema": {"type": "integer", "minimum": 1}}),
            limit(page_limit_max), cursor(), tenant()
        ]),
        "responses": with_errors(json!({"200": json_response("a page of events", json!({"$ref": "#/components/schemas/EventPage"}))}), &[400, 404, 405, 503])
    }})
}

fn diff_item(type_param: Option<&Value>, t: &str) -> Value {
    json!({"get": {
        "operationId": op_id("diff", t), "tags": ["events"],
        "summary": "What changed between two versions, as an RFC 6902 patch from the document at `from` to the one at `to`",
        "parameters": params(type_param, vec![
            id_param(),
            json!({"name": "from", "in": "query", "required": true, "schema": {"type": "integer", "minimum": 1}}),
            json!({"name": "to", "in": "query", "description": "default: the latest version", "schema": {"type": "integer", "minimum": 1}}),
            tenant()
        ]),
        "responses": with_errors(json!({"200": json_response("the diff", json!({"$ref": "#/components/schemas/Diff"}))}), &[400, 404, 405, 503])
    }})
}

fn command_op(type_param: Option<&Value>, command_param: &Value, payload: &Value, id: &str, summary: &str) -> Value {
    let mut rest = vec![id_param()];
    if !command_param.is_null() {
        rest.push(command_param.clone());
    }
    rest.extend([if_match(), idempotency_key(), tenant(), prefer()]);
    json!({
        "operationId": id, "tags": ["commands"], "summary": summary,
        "parameters": params(type_param, rest),
        "requestBody": {"required": true, "content": {"application/json": {"schema": payload}}},
        "responses": with_errors(written_document("200"), WRITE_ERRORS)
    })
}

/// The JSON Schema of the command envelope (SPEC §2.1).
pub fn command_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "/schemas/command.json",
        "title": "Sourced command envelope",
        "type": "object",
        "additionalProperties": false,
        "required": ["type", "targetName"],
        "properties": {
            "id": {"type": "string", "format": "uuid", "description": "command id, the idempotency key; generated when absent"},
            "type": {"enum": ["create", "patch", "replace", "delete", "logic", "orchestration"]},
            "name": {"type": "string", "minLength": 1, "maxLength": 128, "description": "aggregate-modification for generic commands; the custom command's name for logic"},
            "tenant": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            "targetName": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"},
            "targetId": {"type": "string", "pattern": "^[A-Za-z0-9._~-]{1,128}$"},
            "version": {"oneOf": [{"type": "integer", "minimum": 0}, {"enum": ["any", "no_stream", "exists"]}]},
            "body": {"type": ["object", "array"]},
            "context": {"type": "object"}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_references_point_inside_the_component() {
        let s = json!({"$schema": "x", "$id": "y", "$defs": {"line": {"type": "object"}}, "items": {"$ref": "#/$defs/line"}});
        let c = component(&s, "order");
        assert_eq!(c["items"]["$ref"], "#/components/schemas/order/$defs/line");
        assert!(c.get("$schema").is_none() && c.get("$id").is_none());
        assert_eq!(camel("order-line_x"), "OrderLineX");
    }
}
