//! The WebSocket and Socket.IO authorization matrices (SPEC §8.1), generated from one table like
//! the HTTP one in auth.rs: every `/ws` operation (each command kind, a custom command, subscribe with and
//! without a type, unsubscribe, ping) × {no credential, a connection in another tenant, an
//! operation naming another tenant, a role without the action, a role with it} → the outcome
//! the rules below expect (the upgrade refused, close 1008 with the refusal's slug, an error
//! frame with the problem type, or the operation's success). Every cell with a credential runs
//! twice: the credential in the upgrade's headers, and in the first frame
//! (`{"op":"auth","token":…}`, what a browser sends). A refused cell writes nothing (the store's
//! appends do not move). Socket.IO carries the table's commands: each cell is a connection of
//! the real `socket.io-client` (tests/socketio/matrix.mjs), with the credential in the CONNECT
//! packet's `auth` or in the handshake's headers, and the first reply on `events` is its
//! outcome. Runs on both backends (`SOURCED_TEST_BACKEND=postgres`).

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use sourced_server::RunningServer;

use crate::auth::key_of;
use crate::common::TestBackend;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for any one message.
const STEP: std::time::Duration = std::time::Duration::from_secs(20);

/// How a connection presents its credential.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    /// `Authorization: Bearer` on the upgrade request.
    Header,
    /// The first frame, `{"op":"auth","token":…}`.
    Frame,
}

/// Who calls in a matrix column.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Nobody,
    /// The row's holder, with `X-Tenant: beta` on the upgrade (the credential allows acme only).
    ConnectionInBeta,
    /// The row's holder in acme, the operation naming tenant beta.
    OperationInBeta,
    /// A principal whose roles lack the row's action.
    Without,
    /// The row's holder, whose roles grant the action.
    With,
}

/// What a cell saw.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// The upgrade was answered with this status and problem slug.
    Refused(u16, String),
    /// The server closed with 1008 and a reason starting with this slug.
    Closed(String),
    /// An error frame with this problem slug.
    Error(String),
    /// A frame of this `op` (the operation's success).
    Done(String),
}

/// One operation: its frame for (cell number, tenant it names), the action it needs (`None`:
/// any authenticated caller may), who holds it, who does not, the frames that must succeed
/// first, and the `op` of its success.
struct Row {
    name: &'static str,
    frame: fn(u64, Option<&str>) -> Value,
    action: Option<&'static str>,
    holder: &'static str,
    without: &'static str,
    setup: fn() -> Vec<(Value, &'static str)>,
    success: &'static str,
    /// The problem slug when the operation names another tenant than its connection's
    /// (`None`: it names none, the column does not apply).
    other_tenant: Option<&'static str>,
    /// Whether its success appends one event.
    writes: bool,
}

fn command(n: u64, tenant: Option<&str>, fields: Value) -> Value {
    let mut c =
        json!({"id": format!("0190a0b0-0000-7000-8000-{n:012x}"), "targetName": "order", "targetId": format!("o{n}")});
    for (k, v) in fields.as_object().unwrap() {
        c[k] = v.clone();
    }
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    json!({"op": "command", "command": c})
}

fn subscribe(filter: Option<Value>, tenant: Option<&str>) -> Value {
    let mut f = json!({"op": "subscribe", "sub": "s", "after": 0});
    if let Some(filter) = filter {
        f["filter"] = filter;
    }
    if let Some(t) = tenant {
        f["tenant"] = json!(t);
    }
    f
}

fn nothing() -> Vec<(Value, &'static str)> {
    Vec::new()
}

const ROWS: &[Row] = &[
    Row {
        name: "create",
        frame: |n, t| {
            let mut f = command(n, t, json!({"type": "create", "body": {"n": 1}}));
            f["command"]["targetId"] = json!(format!("new{n}"));
            f
        },
        action: Some("create"),
        holder: "clerk",
        without: "intern",
        setup: nothing,
        success: "result",
        other_tenant: Some("tenant-not-allowed"),
        writes: true,
    },
    Row {
        name: "patch",
        frame: |n, t| command(n, t, json!({"type": "patch", "body": [{"op": "replace", "path": "/n", "value": 2}]})),
        action: Some("patch"),
        holder: "clerk",
        without: "intern",
        setup: nothing,
        success: "result",
        other_tenant: Some("tenant-not-allowed"),
        writes: true,
    },
    Row {
        name: "replace",
        frame: |n, t| command(n, t, json!({"type": "replace", "body": {"n": 3}})),
        action: Some("replace"),
        holder: "ops",
        without: "intern",
        setup: nothing,
        success: "result",
        other_tenant: Some("tenant-not-allowed"),
        writes: true,
    },
    Row {
        name: "delete",
        frame: |n, t| command(n, t, json!({"type": "delete"})),
        action: Some("delete"),
        holder: "ops",
        without: "intern",
        setup: nothing,
        success: "result",
        other_tenant: Some("tenant-not-allowed"),
        writes: true,
    },
    Row {
        name: "custom command",
        frame: |n, t| command(n, t, json!({"type": "logic", "name": "submit", "body": {}})),
        action: Some("submit"),
        holder: "clerk",
        without: "intern",
        setup: nothing,
        success: "result",
        other_tenant: Some("tenant-not-allowed"),
        writes: true,
    },
    Row {
        name: "subscribe to a type",
        frame: |_, t| subscribe(Some(json!({"targetName": "order"})), t),
        action: Some("subscribe"),
        holder: "auditor",
        // The intern subscribes to invoices only.
        without: "intern",
        setup: nothing,
        success: "caught-up",
        other_tenant: Some("tenant-not-allowed"),
        writes: false,
    },
    Row {
        name: "subscribe to every type",
        frame: |_, t| subscribe(None, t),
        action: Some("subscribe"),
        holder: "auditor",
        // The clerk may read orders, but not subscribe.
        without: "clerk",
        setup: nothing,
        success: "caught-up",
        other_tenant: Some("tenant-not-allowed"),
        writes: false,
    },
    Row {
        name: "unsubscribe",
        frame: |_, _| json!({"op": "unsubscribe", "sub": "s"}),
        action: None,
        holder: "auditor",
        // Needs no action: the intern ends its own subscription (to its invoices) too.
        without: "intern",
        setup: || vec![(subscribe(None, None), "caught-up")],
        success: "unsubscribed",
        other_tenant: None,
        writes: false,
    },
    Row {
        name: "ping",
        frame: |_, _| json!({"op": "ping"}),
        action: None,
        holder: "intern",
        without: "intern",
        setup: nothing,
        success: "pong",
        other_tenant: None,
        writes: false,
    },
];

/// The outcome the rules expect for `row` as `who` (via `via`).
fn expected(row: &Row, who: Who, via: Via) -> Outcome {
    match (who, via) {
        (Who::Nobody, _) => Outcome::Closed("credential-missing".into()),
        (Who::ConnectionInBeta, Via::Header) => Outcome::Refused(403, "tenant-not-allowed".into()),
        (Who::ConnectionInBeta, Via::Frame) => Outcome::Closed("tenant-not-allowed".into()),
        (Who::OperationInBeta, _) => Outcome::Error(row.other_tenant.expect("a row that names a tenant").into()),
        (Who::Without, _) if row.action.is_some() => Outcome::Error("forbidden".into()),
        (Who::Without | Who::With, _) => Outcome::Done(row.success.into()),
    }
}

/// Opens `/ws` with `headers`; the refusal's status and slug when the upgrade is refused.
async fn open(server: &RunningServer, headers: &[(&'static str, String)]) -> Result<Ws, Outcome> {
    let mut req = format!("ws://{}/ws", server.addr()).into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null);
            Err(Outcome::Refused(r.status().as_u16(), slug(&body)))
        }
        Err(e) => panic!("cannot connect: {e}"),
    }
}

fn slug(problem: &Value) -> String {
    problem["type"].as_str().unwrap_or("").trim_start_matches("urn:sourced:problem:").to_owned()
}

/// What the server answers next: a frame's outcome, or the close.
async fn next(ws: &mut Ws) -> (Outcome, Value) {
    loop {
        let m = tokio::time::timeout(STEP, ws.next()).await.expect("an answer within the step");
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                let op = v["op"].as_str().unwrap_or("").to_owned();
                if op == "event" {
                    continue; // a subscription's catch-up before its caught-up marker
                }
                let outcome = if op == "error" { Outcome::Error(slug(&v["error"])) } else { Outcome::Done(op) };
                return (outcome, v);
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008, "closed with {f:?}");
                let reason = f.reason.to_string();
                let slug = reason.split(':').next().unwrap_or("").to_owned();
                return (Outcome::Closed(slug), json!(reason));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a frame or a close, got {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// A connection for `who` in `row` (credential by `via`), authenticated and set up; or the
/// outcome that ended it first.
async fn connect(server: &RunningServer, row: &Row, who: Who, via: Via) -> Result<Ws, Outcome> {
    let principal = match who {
        Who::Nobody => None,
        Who::Without => Some(row.without),
        _ => Some(row.holder),
    };
    let mut headers = Vec::new();
    if who == Who::ConnectionInBeta {
        headers.push(("x-tenant", "beta".to_owned()));
    }
    if let (Some(p), Via::Header) = (principal, via) {
        headers.push(("authorization", format!("Bearer {}", key_of(p))));
    }
    let mut ws = open(server, &headers).await?;
    if let (Some(p), Via::Frame) = (principal, via) {
        send(&mut ws, &json!({"op": "auth", "token": key_of(p)})).await;
        match next(&mut ws).await {
            (Outcome::Done(op), _) if op == "authenticated" => {}
            (other, _) => return Err(other),
        }
    }
    if who != Who::Nobody {
        for (frame, success) in (row.setup)() {
            send(&mut ws, &frame).await;
            let (outcome, v) = next(&mut ws).await;
            assert_eq!(outcome, Outcome::Done(success.into()), "{}: setup {frame} as {who:?}: {v}", row.name);
        }
    }
    Ok(ws)
}

#[tokio::test]
async fn every_websocket_operation_is_authorized_as_the_table_says() {
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    config.gate = crate::auth::gate();
    config.artifact_set = std::sync::Arc::new(crate::auth::artifacts());
    let server = sourced_server::start(config).await.unwrap();
    let mut ops = open(&server, &[("authorization", format!("Bearer {}", key_of("ops")))]).await.unwrap();
    let mut n = 0u64;
    for row in ROWS {
        for who in [Who::Nobody, Who::ConnectionInBeta, Who::OperationInBeta, Who::Without, Who::With] {
            for via in [Via::Header, Via::Frame] {
                if (who == Who::Nobody && via == Via::Frame)
                    || (who == Who::OperationInBeta && row.other_tenant.is_none())
                {
                    continue;
                }
                n += 1;
                let cell = format!("{} as {who:?} via {via:?} (cell {n})", row.name);
                // The aggregate the cell's command targets: o{n} at version 1.
                send(
                    &mut ops,
                    &command(
                        1_000_000 + n,
                        None,
                        json!({"type": "create", "targetId": format!("o{n}"), "body": {"n": 1}}),
                    ),
                )
                .await;
                assert_eq!(next(&mut ops).await.0, Outcome::Done("result".into()), "{cell}: seeding");
                let appends = server.store_stats().appends;
                let tenant = (who == Who::OperationInBeta).then_some("beta");
                let (outcome, seen) = match connect(&server, row, who, via).await {
                    Err(outcome) => (outcome, Value::Null),
                    Ok(mut ws) => {
                        send(&mut ws, &(row.frame)(n, tenant)).await;
                        next(&mut ws).await
                    }
                };
                let want = expected(row, who, via);
                assert_eq!(outcome, want, "{cell}: {seen}");
                if let (Outcome::Error(slug), Some(action)) = (&outcome, row.action)
                    && slug == "forbidden"
                {
                    assert_eq!(seen["error"]["action"], action, "{cell}: {seen}");
                }
                let written = u64::from(row.writes && matches!(want, Outcome::Done(_)));
                assert_eq!(server.store_stats().appends, appends + written, "{cell}: appends");
            }
        }
    }
    assert!(n >= 70, "only {n} cells ran");
    server.shutdown().await;
}

/// The outcome the rules expect for a Socket.IO cell: a refused connection is told on `events`
/// (the problem) before the server disconnects, so every refusal is an error reply.
fn expected_socket_io(row: &Row, who: Who) -> Outcome {
    match who {
        Who::Nobody => Outcome::Error("credential-missing".into()),
        Who::ConnectionInBeta => Outcome::Error("tenant-not-allowed".into()),
        _ => expected(row, who, Via::Header),
    }
}

#[tokio::test]
async fn every_socket_io_command_is_authorized_as_the_table_says() {
    let Some(script_dir) = crate::socketio::node_client_dir().await else { return };
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    config.gate = crate::auth::gate();
    config.artifact_set = std::sync::Arc::new(crate::auth::artifacts());
    let server = sourced_server::start(config).await.unwrap();
    let mut ops = open(&server, &[("authorization", format!("Bearer {}", key_of("ops")))]).await.unwrap();
    // Every cell of the table's commands, each with its own aggregate o{n} at version 1.
    let (mut cells, mut expect) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    for row in ROWS.iter().filter(|r| (r.frame)(0, None)["op"] == "command") {
        for who in [Who::Nobody, Who::ConnectionInBeta, Who::OperationInBeta, Who::Without, Who::With] {
            for via in [Via::Header, Via::Frame] {
                if who == Who::Nobody && via == Via::Frame {
                    continue;
                }
                n += 1;
                send(
                    &mut ops,
                    &command(
                        1_000_000 + n,
                        None,
                        json!({"type": "create", "targetId": format!("o{n}"), "body": {"n": 1}}),
                    ),
                )
                .await;
                assert_eq!(next(&mut ops).await.0, Outcome::Done("result".into()), "seeding o{n}");
                let principal = match who {
                    Who::Nobody => None,
                    Who::Without => Some(row.without),
                    _ => Some(row.holder),
                };
                let mut headers = serde_json::Map::new();
                if who == Who::ConnectionInBeta {
                    headers.insert("x-tenant".into(), json!("beta"));
                }
                let mut auth = Value::Null;
                match (principal, via) {
                    (Some(p), Via::Header) => {
                        headers.insert("authorization".into(), json!(format!("Bearer {}", key_of(p))));
                    }
                    (Some(p), Via::Frame) => auth = json!({"token": key_of(p)}),
                    (None, _) => {}
                }
                let tenant = (who == Who::OperationInBeta).then_some("beta");
                let name =
                    format!("{} as {who:?} via {}", row.name, if via == Via::Header { "headers" } else { "auth" });
                let command = (row.frame)(n, tenant)["command"].clone();
                cells.push(json!({"name": name, "auth": auth, "headers": headers, "command": command}));
                expect.push((name, expected_socket_io(row, who), row));
            }
        }
    }
    let appends = server.store_stats().appends;
    let file = backend.dir.path().join("cells.json");
    std::fs::write(&file, serde_json::to_string(&cells).unwrap()).unwrap();
    let port = server.addr().port().to_string();
    let (stdout, steps) = crate::socketio::run_node(&script_dir, "matrix.mjs", &[&port, file.to_str().unwrap()]).await;
    let mut written = 0;
    for (name, want, row) in &expect {
        let reply = &steps.get(name).unwrap_or_else(|| panic!("{name}: no reply in\n{stdout}"))["reply"];
        let outcome = match reply.get("error") {
            Some(problem) => Outcome::Error(slug(problem)),
            None if reply["version"].is_u64() => Outcome::Done(row.success.into()),
            None => panic!("{name}: neither a result nor an error: {reply}"),
        };
        assert_eq!(&outcome, want, "{name}: {reply}");
        if let (Outcome::Error(slug), Some(action)) = (&outcome, row.action)
            && slug == "forbidden"
        {
            assert_eq!(reply["error"]["action"], action, "{name}: {reply}");
        }
        written += u64::from(matches!(want, Outcome::Done(_)));
    }
    assert_eq!(expect.len(), 45, "cells");
    assert_eq!(server.store_stats().appends, appends + written, "only the allowed commands wrote");
    server.shutdown().await;
}
