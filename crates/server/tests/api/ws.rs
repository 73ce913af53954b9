//! The WebSocket API over loopback with a real client (tokio-tungstenite): pipelined commands,
//! errors as problems, idempotent retries, close codes, subscriptions with the catch-up to live
//! hand-over under concurrent writes, resume after a reconnect, and a client that stops reading.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use sourced_server::{Config, RunningServer};

use crate::common::config_in;

/// Longest wait for any one message.
const STEP: Duration = Duration::from_secs(20);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn server(f: impl FnOnce(&mut Config)) -> (RunningServer, TempDir) {
    let dir = TempDir::new().unwrap();
    let mut config = config_in(&dir);
    f(&mut config);
    (sourced_server::start(config).await.unwrap(), dir)
}

async fn connect(addr: SocketAddr, tenant: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(t) = tenant {
        req.headers_mut().insert("x-tenant", t.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next text frame as JSON (pings and pongs skipped); panics on close or after [`STEP`].
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(STEP, ws.next()).await.expect("a message within the step").unwrap().unwrap();
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
async fn closed(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(STEP, ws.next()).await.expect("the close within the step") {
            Some(Ok(Message::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(Message::Close(None))) => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("the connection failed before a close frame: {e}"),
            None => panic!("the connection ended without a close frame"),
        }
    }
}

fn create(id: &str, target: &str, body: Value) -> Value {
    json!({"op": "command", "command": {"id": id, "type": "create", "targetName": "order", "targetId": target, "body": body}})
}

fn uuid(n: u64) -> String {
    format!("0190a0b0-0000-7000-8000-{n:012x}")
}

#[tokio::test]
async fn pipelined_commands_are_answered_by_id() {
    let (server, _dir) = server(|_| {}).await;
    let mut ws = connect(server.addr(), None).await;
    const N: u64 = 200;
    // All in flight at once; every tenth fails (a patch of an aggregate that does not exist).
    for i in 0..N {
        let frame = if i % 10 == 9 {
            json!({"op": "command", "command": {"id": uuid(i), "type": "patch", "targetName": "order", "targetId": format!("missing-{i}"), "body": []}})
        } else {
            create(&uuid(i), &format!("o{i}"), json!({"n": i}))
        };
        send(&mut ws, frame).await;
    }
    let mut replies = HashMap::new();
    for _ in 0..N {
        let r = recv(&mut ws).await;
        let id = r["id"].as_str().expect("every reply names its command").to_owned();
        assert!(replies.insert(id, r).is_none(), "one reply per command");
    }
    for i in 0..N {
        let r = &replies[&uuid(i)];
        if i % 10 == 9 {
            assert_eq!(r["op"], "error", "{r}");
            assert_eq!(r["error"]["status"], 404, "{r}");
            assert_eq!(r["error"]["type"], "urn:sourced:problem:not-found");
        } else {
            assert_eq!(r["op"], "result", "{r}");
            assert_eq!(r["targetId"], format!("o{i}"));
            assert_eq!(r["version"], 1);
            assert_eq!(r["events"][0]["data"]["n"], i);
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn errors_are_problems_and_the_connection_stays_usable() {
    let (server, _dir) = server(|_| {}).await;
    let mut ws = connect(server.addr(), None).await;
    ws.send(Message::text("{not json")).await.unwrap();
    let e = recv(&mut ws).await;
    assert_eq!((e["op"].as_str(), e["error"]["status"].as_u64()), (Some("error"), Some(400)), "{e}");
    send(&mut ws, json!({"op": "teleport"})).await;
    assert!(recv(&mut ws).await["error"]["detail"].as_str().unwrap().contains("unknown op"));
    // An invalid envelope: the problem lists the violations, the reply names the command.
    send(&mut ws, json!({"op": "command", "command": {"id": uuid(1), "type": "create"}})).await;
    let e = recv(&mut ws).await;
    assert_eq!(e["id"], uuid(1));
    assert_eq!(e["error"]["type"], "urn:sourced:problem:invalid-command", "{e}");
    assert!(!e["error"]["violations"].as_array().unwrap().is_empty());
    // The same problems as over HTTP: a version conflict is 409 with the current version.
    send(&mut ws, create(&uuid(2), "c1", json!({}))).await;
    assert_eq!(recv(&mut ws).await["op"], "result");
    let patch = json!({"op": "command", "command": {"id": uuid(3), "type": "patch", "targetName": "order", "targetId": "c1", "version": 5, "body": [{"op": "add", "path": "/a", "value": 1}]}});
    send(&mut ws, patch).await;
    let e = recv(&mut ws).await;
    assert_eq!(e["error"]["type"], "urn:sourced:problem:version-conflict", "{e}");
    assert_eq!(e["error"]["currentVersion"], 1);
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut ws).await, json!({"op": "pong"}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_retried_command_returns_the_same_result() {
    let (server, _dir) = server(|_| {}).await;
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, create(&uuid(7), "r1", json!({"n": 1}))).await;
    let mut first = recv(&mut ws).await;
    // The result frame: `op`, then the command result's fields (SPEC §2.5, §3.2); no `replayed`.
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["op", "id", "targetName", "targetId", "version", "events", "warnings"], "{first}");
    assert_eq!(first["op"], "result");
    assert_eq!(first["events"][0]["data"], json!({"n": 1}), "{first}");
    // Again on another connection, as a client would after a reconnect.
    let mut ws2 = connect(server.addr(), None).await;
    send(&mut ws2, create(&uuid(7), "r1", json!({"n": 1}))).await;
    let mut again = recv(&mut ws2).await;
    assert_eq!(again["replayed"], true);
    again.as_object_mut().unwrap().remove("replayed");
    first.as_object_mut().unwrap().remove("replayed");
    assert_eq!(again, first);
    // Other content under the same id is refused.
    send(&mut ws2, create(&uuid(7), "r1", json!({"n": 2}))).await;
    assert_eq!(recv(&mut ws2).await["error"]["type"], "urn:sourced:problem:idempotency-key-reused");
    server.shutdown().await;
}

#[tokio::test]
async fn the_upgrade_requests_tenant_is_fixed() {
    let (server, _dir) = server(|_| {}).await;
    let mut ws = connect(server.addr(), Some("acme")).await;
    let mut cmd = create(&uuid(1), "t1", json!({}));
    cmd["command"]["tenant"] = json!("other");
    send(&mut ws, cmd).await;
    assert_eq!(recv(&mut ws).await["op"], "error");
    send(&mut ws, create(&uuid(2), "t1", json!({}))).await;
    assert_eq!(recv(&mut ws).await["events"][0]["tenant"], "acme");
    // A subscription sees its tenant only.
    let mut other = connect(server.addr(), None).await;
    send(&mut other, json!({"op": "subscribe", "sub": "s"})).await;
    assert_eq!(recv(&mut other).await, json!({"op": "caught-up", "sub": "s", "position": 0}));
    server.shutdown().await;
}

#[tokio::test]
async fn binary_frames_close_with_1003() {
    let (server, _dir) = server(|_| {}).await;
    let mut ws = connect(server.addr(), None).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Unsupported);
    assert!(reason.contains("binary"), "{reason}");
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let (server, _dir) = server(|c| c.ws.message_bytes_max = 1_024).await;
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, create(&uuid(1), "small", json!({"pad": "x".repeat(500)}))).await;
    assert_eq!(recv(&mut ws).await["op"], "result");
    send(&mut ws, create(&uuid(2), "big", json!({"pad": "x".repeat(2_000)}))).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("1024"), "{reason}");
    server.shutdown().await;
}

/// The tenant's whole feed from the store, over HTTP, in position order.
async fn store_feed(addr: SocketAddr) -> Vec<Value> {
    let mut c = sourced_client::Client::connect(addr).await.unwrap();
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let r = c.get(&format!("/events?after={after}&limit=1000")).await.unwrap();
        let items = r.json()["items"].as_array().unwrap().clone();
        if items.is_empty() {
            return all;
        }
        after = items.last().unwrap()["position"].as_u64().unwrap();
        all.extend(items);
    }
}

/// Collects a subscription's events until it has seen `until` (a position), checking the
/// caught-up marker on the way and that the events come in the frames asked for (one per
/// `event` frame, or arrays in `events` frames when `batch`); returns the events.
async fn collect(ws: &mut Ws, sub: &str, until: u64, batch: bool) -> Vec<Value> {
    let mut events = Vec::new();
    let mut caught_up = false;
    let mut last = 0;
    while last < until {
        let m = recv(ws).await;
        assert_eq!(m["sub"], sub, "{m}");
        match m["op"].as_str() {
            Some("event") if !batch => {
                last = m["event"]["position"].as_u64().unwrap();
                events.push(m["event"].clone());
            }
            Some("events") if batch => {
                let batch = m["events"].as_array().unwrap();
                assert!(!batch.is_empty(), "a batched frame carries at least one event: {m}");
                last = batch.last().unwrap()["position"].as_u64().unwrap();
                events.extend(batch.iter().cloned());
            }
            Some("caught-up") => {
                assert!(!caught_up, "one caught-up marker");
                caught_up = true;
                last = last.max(m["position"].as_u64().unwrap());
            }
            _ => panic!("unexpected {m}"),
        }
    }
    events
}

#[tokio::test]
async fn subscriptions_hand_over_to_live_under_concurrent_writes() {
    // A small live buffer, so subscribers also go back to the store after lagging.
    let (server, _dir) = server(|c| c.live_buffer_events = 16).await;
    let addr = server.addr();
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 150;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(async move {
                let mut ws = connect(addr, None).await;
                for i in 0..PER_WRITER {
                    let (ty, id) = if i % 3 == 0 { ("invoice", format!("w{w}-{i}")) } else { ("order", format!("w{w}-{i}")) };
                    let cmd = json!({"op": "command", "command": {"type": "create", "targetName": ty, "targetId": id, "body": {"i": i}}});
                    send(&mut ws, cmd).await;
                    // A few in flight per writer.
                    if i % 4 == 3 {
                        for _ in 0..4 {
                            assert_eq!(recv(&mut ws).await["op"], "result");
                        }
                    }
                }
                for _ in 0..(PER_WRITER % 4) {
                    assert_eq!(recv(&mut ws).await["op"], "result");
                }
            })
        })
        .collect();
    // Subscribers start while the writers run: from the beginning, from a position, filtered,
    // with one frame per event or with batched frames.
    let mut subscribers = Vec::new();
    for k in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        let mut ws = connect(addr, None).await;
        let filter = if k % 2 == 1 { json!({"targetName": "order"}) } else { json!({}) };
        let after = if k >= 3 { json!(k * 20) } else { Value::Null };
        let batch = k % 3 == 2;
        let frame =
            json!({"op": "subscribe", "sub": format!("s{k}"), "filter": filter, "after": after, "batch": batch});
        send(&mut ws, frame).await;
        subscribers.push((k, filter, after, batch, ws));
    }
    for w in writers {
        w.await.unwrap();
    }
    let feed = store_feed(addr).await;
    assert_eq!(feed.len() as u64, WRITERS * PER_WRITER);
    let head = feed.last().unwrap()["position"].as_u64().unwrap();
    for (k, filter, after, batch, mut ws) in subscribers {
        let after = after.as_u64().unwrap_or(0);
        let expected: Vec<&Value> = feed
            .iter()
            .filter(|e| e["position"].as_u64().unwrap() > after)
            .filter(|e| filter.get("targetName").is_none_or(|t| e["targetName"] == *t))
            .collect();
        let until = expected.last().map_or(head, |e| e["position"].as_u64().unwrap());
        let got = collect(&mut ws, &format!("s{k}"), until, batch).await;
        let got_positions: Vec<u64> = got.iter().map(|e| e["position"].as_u64().unwrap()).collect();
        let want_positions: Vec<u64> = expected.iter().map(|e| e["position"].as_u64().unwrap()).collect();
        assert_eq!(got_positions, want_positions, "subscriber {k}: exactly once, in position order");
        assert!(got.iter().zip(&expected).all(|(g, w)| g == *w), "subscriber {k}: the events as stored");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_resumes_after_a_reconnect() {
    let (server, _dir) = server(|_| {}).await;
    let addr = server.addr();
    let mut writer = connect(addr, None).await;
    for i in 0..10 {
        send(&mut writer, create(&uuid(i), &format!("a{i}"), json!({"i": i}))).await;
        recv(&mut writer).await;
    }
    let mut ws = connect(addr, None).await;
    send(&mut ws, json!({"op": "subscribe", "sub": "s", "filter": {"targetName": "order"}})).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = recv(&mut ws).await;
        seen.push(m["event"]["position"].as_u64().unwrap());
    }
    drop(ws);
    for i in 10..20 {
        send(&mut writer, create(&uuid(i), &format!("a{i}"), json!({"i": i}))).await;
        recv(&mut writer).await;
    }
    let mut ws = connect(addr, None).await;
    let last = *seen.last().unwrap();
    send(&mut ws, json!({"op": "subscribe", "sub": "s", "after": last})).await;
    loop {
        let m = recv(&mut ws).await;
        if m["op"] == "caught-up" {
            assert_eq!(m["position"], 20, "the caught-up marker names the head");
            break;
        }
        seen.push(m["event"]["position"].as_u64().unwrap());
    }
    // Live after the marker.
    send(&mut writer, create(&uuid(20), "a20", json!({}))).await;
    recv(&mut writer).await;
    assert_eq!(recv(&mut ws).await["event"]["position"], 21);
    assert_eq!(seen, (1..=20).collect::<Vec<u64>>());
    // "now" starts at the head; unsubscribe stops the feed.
    send(&mut ws, json!({"op": "subscribe", "sub": "n", "after": "now"})).await;
    assert_eq!(recv(&mut ws).await, json!({"op": "caught-up", "sub": "n", "position": 21}));
    send(&mut ws, json!({"op": "unsubscribe", "sub": "n"})).await;
    assert_eq!(recv(&mut ws).await, json!({"op": "unsubscribed", "sub": "n"}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_memory_stays_bounded() {
    const OUTBOUND: usize = 8;
    let (server, _dir) = server(|c| {
        c.ws.slow_client_timeout_ms = 300;
        c.ws.outbound_max = OUTBOUND;
        c.live_buffer_events = 64;
    })
    .await;
    let addr = server.addr();
    // A client with a tiny receive buffer that subscribes, then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), MaybeTlsStream::Plain(stream)).await.unwrap();
    send(&mut slow, json!({"op": "subscribe", "sub": "firehose"})).await;
    // Writers keep events flowing until the server gives up on the client (bounded).
    let mut writer = connect(addr, None).await;
    let pad = "x".repeat(8_000);
    let mut i = 0u64;
    while server.live().slow_clients_closed.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(i < 20_000, "the slow client was never closed");
        for _ in 0..16 {
            send(&mut writer, create(&uuid(i), &format!("f{i}"), json!({"pad": pad}))).await;
            i += 1;
        }
        for _ in 0..16 {
            assert_eq!(recv(&mut writer).await["op"], "result");
        }
    }
    // The client reads at last: what was sent before, then the close with its reason.
    let (code, reason) = closed(&mut slow).await;
    assert_eq!(code, CloseCode::Policy);
    assert!(reason.contains("read nothing"), "{reason}");
    let high = server.live().outbound_high_water.load(std::sync::atomic::Ordering::Relaxed);
    assert!(high <= OUTBOUND, "the outbound queue stayed within its bound: {high}");
    // The other connection is unaffected.
    send(&mut writer, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut writer).await, json!({"op": "pong"}));
    server.shutdown().await;
}

/// `"after": "now"` on a restarted server (history in the store, no commit since the start)
/// reads none of the history, and still gets the next live event (issue 14, item 2).
#[tokio::test]
async fn subscribing_from_now_after_a_restart_reads_no_history() {
    const HISTORY: u64 = 40;
    let backend = crate::common::TestBackend::new().await;
    let server = sourced_server::start(backend.config()).await.unwrap();
    let mut writer = connect(server.addr(), None).await;
    for i in 0..HISTORY {
        send(&mut writer, create(&uuid(i), &format!("h{i}"), json!({"pad": "x".repeat(1_000)}))).await;
        assert_eq!(recv(&mut writer).await["op"], "result");
    }
    drop(writer);
    server.shutdown().await;

    let server = sourced_server::start(backend.config()).await.unwrap();
    let mut subscribers = Vec::new();
    for s in 0..4 {
        let mut ws = connect(server.addr(), None).await;
        send(&mut ws, json!({"op": "subscribe", "sub": format!("n{s}"), "after": "now"})).await;
        assert_eq!(recv(&mut ws).await, json!({"op": "caught-up", "sub": format!("n{s}"), "position": HISTORY}));
        subscribers.push(ws);
    }
    assert_eq!(server.store_stats().events_read, 0, "no event of the history was read");
    let mut writer = connect(server.addr(), None).await;
    send(&mut writer, create(&uuid(HISTORY), "live", json!({}))).await;
    assert_eq!(recv(&mut writer).await["op"], "result");
    for ws in &mut subscribers {
        let m = recv(ws).await;
        assert_eq!((m["op"].as_str(), m["event"]["position"].as_u64()), (Some("event"), Some(HISTORY + 1)), "{m}");
    }
    assert_eq!(server.store_stats().events_read, 0, "the live event came through the hub");
    server.shutdown().await;
}

/// With authentication on, a browser (no headers) authenticates with its first frame; any other
/// first frame, or a bad token, closes with 1008; a token's connection closes at its `exp`.
#[tokio::test]
async fn the_first_frame_authenticates_and_a_token_ends_at_its_expiry() {
    let (server, _dir) = server(|c| {
        c.gate = crate::auth::gate();
        c.artifact_set = std::sync::Arc::new(crate::auth::artifacts());
    })
    .await;
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, json!({"op": "ping"})).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!((code, reason.starts_with("credential-missing")), (CloseCode::Policy, true), "{reason}");
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, json!({"op": "auth", "token": "sk_not_a_key"})).await;
    assert_eq!(closed(&mut ws).await, (CloseCode::Policy, "key-unknown".to_owned()));
    // The clerk: authenticated, may create an order, may not delete it.
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, json!({"op": "auth", "token": crate::auth::key_of("clerk")})).await;
    let hello = recv(&mut ws).await;
    assert_eq!((hello["op"].as_str(), hello["principal"]["id"].as_str()), (Some("authenticated"), Some("clerk")));
    send(&mut ws, json!({"op": "command", "command": {"id": uuid(1), "type": "create", "targetName": "order", "targetId": "w1", "body": {}}})).await;
    assert_eq!(recv(&mut ws).await["op"], "result");
    send(
        &mut ws,
        json!({"op": "command", "command": {"id": uuid(2), "type": "delete", "targetName": "order", "targetId": "w1"}}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(e["error"]["type"], "urn:sourced:problem:forbidden", "{e}");
    // A subscription the clerk may not make (no `subscribe`).
    send(&mut ws, json!({"op": "subscribe", "sub": "s"})).await;
    let e = recv(&mut ws).await;
    assert_eq!(e["error"]["type"], "urn:sourced:problem:forbidden", "{e}");
    // A token that expires in 2 s (no leeway past exp for closing): closed with 1008 then.
    let token = crate::auth::hs256(&json!({"iss": "https://issuer.test", "aud": "sourced", "sub": "brief",
        "exp": crate::auth::now() + 2, "tenant": "acme", "roles": ["ops"]}));
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, json!({"op": "auth", "token": token})).await;
    assert_eq!(recv(&mut ws).await["op"], "authenticated");
    assert_eq!(closed(&mut ws).await, (CloseCode::Policy, "token-expired".to_owned()));
    server.shutdown().await;
}

/// Every WebSocket command takes a token of its caller's rate limit (here by address, with
/// `AUTH=none`): past the burst, the command gets a 429 problem and the connection stays.
#[tokio::test]
async fn websocket_commands_count_against_the_rate_limit() {
    let (server, _dir) =
        server(|c| c.rate_limit = sourced_server::ratelimit::RateLimiter::new(1, 2).map(std::sync::Arc::new)).await;
    // The upgrade itself takes one token: one command is left of the burst of two.
    let mut ws = connect(server.addr(), None).await;
    send(&mut ws, json!({"op": "command", "command": {"id": uuid(1), "type": "create", "targetName": "order", "targetId": "rl1", "body": {}}})).await;
    assert_eq!(recv(&mut ws).await["op"], "result");
    send(&mut ws, json!({"op": "command", "command": {"id": uuid(2), "type": "create", "targetName": "order", "targetId": "rl2", "body": {}}})).await;
    let e = recv(&mut ws).await;
    assert_eq!(e["error"]["type"], "urn:sourced:problem:rate-limited", "{e}");
    assert_eq!(e["id"], uuid(2));
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut ws).await["op"], "pong");
    server.shutdown().await;
}
