//! Tests of the client against a tiny axum server, and a raw TCP server for connection closes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// Echoes what the server saw: method, host, content type, body, and the client's port.
async fn echo(
    method: axum::http::Method,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned);
    axum::Json(json!({
        "method": method.as_str(),
        "host": header("host"),
        "contentType": header("content-type"),
        "body": String::from_utf8_lossy(&body),
        "peerPort": peer.port(),
    }))
}

/// Starts the test server on 127.0.0.1:0 and returns its address.
async fn server() -> SocketAddr {
    let app = Router::new()
        .route("/echo", post(echo).patch(echo).get(echo))
        .route("/empty", get(|| async { axum::http::StatusCode::NO_CONTENT }))
        .route("/text", get(|| async { ([("X-Custom", "yes")], "plain words") }))
        .route("/missing", get(|| async { (axum::http::StatusCode::NOT_FOUND, "nothing here") }))
        .route("/close", get(|| async { ([("connection", "close")], "bye") }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

#[tokio::test]
async fn get_returns_status_headers_and_body() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();

    let response = client.get("/text").await.unwrap();
    assert_eq!(response.status, 200);
    assert!(response.is_success());
    assert_eq!(response.text(), "plain words");
    assert_eq!(response.header("x-custom"), Some("yes"));
    assert_eq!(response.header("X-Custom"), Some("yes"), "lookup ignores case");
    assert!(response.headers.iter().any(|(name, _)| name == "x-custom"), "names are lower case");

    let missing = client.get("/missing").await.unwrap();
    assert_eq!(missing.status, 404, "an error status is a response, not an error");
    assert!(!missing.is_success());
    assert_eq!(missing.text(), "nothing here");
}

#[tokio::test]
async fn sends_host_and_reuses_the_connection() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();

    let first = client.get("/echo").await.unwrap().json();
    let second = client.get("/echo").await.unwrap().json();
    assert_eq!(first["host"], json!(addr.to_string()));
    assert_eq!(first["method"], json!("GET"));
    assert_eq!(first["peerPort"], second["peerPort"], "one keep-alive connection");

    let own_host = client.request("GET", "/echo", &[("Host", "example.test")], None).await.unwrap().json();
    assert_eq!(own_host["host"], json!("example.test"), "a caller's host is sent instead");
}

#[tokio::test]
async fn send_json_sets_a_content_type_unless_given() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();

    let plain = client.send_json("POST", "/echo", &[], &json!({"a": 1})).await.unwrap().json();
    assert_eq!(plain["contentType"], json!("application/json"));
    assert_eq!(plain["body"], json!(r#"{"a":1}"#));

    let patch = json!([{"op": "add", "path": "/b", "value": 2}]);
    let headers = [("Content-Type", "application/json-patch+json"), ("if-match", "\"1\"")];
    let patched = client.send_json("PATCH", "/echo", &headers, &patch).await.unwrap().json();
    assert_eq!(patched["method"], json!("PATCH"));
    assert_eq!(patched["contentType"], json!("application/json-patch+json"));

    let raw = client.request("POST", "/echo", &[], Some(b"raw bytes")).await.unwrap().json();
    assert_eq!(raw["body"], json!("raw bytes"));
    assert_eq!(raw["contentType"], Value::Null);
}

#[tokio::test]
async fn json_is_null_for_empty_or_non_json_bodies() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();

    let empty = client.get("/empty").await.unwrap();
    assert_eq!(empty.status, 204);
    assert_eq!(empty.json(), Value::Null);
    assert_eq!(empty.try_json().unwrap(), Value::Null);

    let text = client.get("/text").await.unwrap();
    assert_eq!(text.json(), Value::Null);
    assert!(matches!(text.try_json(), Err(ClientError::Json(_))));
}

#[tokio::test]
async fn reconnects_after_the_server_closes_the_connection() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();

    let before = client.get("/echo").await.unwrap().json()["peerPort"].clone();
    let closing = client.get("/close").await.unwrap();
    assert_eq!(closing.text(), "bye");
    let after = client.send_json("POST", "/echo", &[], &json!({})).await.unwrap().json();
    assert_eq!(after["method"], json!("POST"));
    assert_ne!(after["peerPort"], before, "a new connection");
}

/// A server that answers one request per connection and then drops the socket without
/// saying so (as an idle timeout does), counting the connections it accepted.
async fn one_shot_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, count) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            accepted.send(()).unwrap();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let mut read = 0;
                while !buffer[..read].windows(4).any(|window| window == b"\r\n\r\n") {
                    match socket.read(&mut buffer[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn reconnects_once_after_a_silent_close() {
    let (addr, mut accepted) = one_shot_server().await;
    let mut client = Client::connect(addr).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().text(), "ok");
    // Let the close arrive, so that the client sees it before sending.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let response = client.request("POST", "/", &[], Some(b"{}")).await.unwrap();
    assert_eq!(response.text(), "ok");
    // An idempotent request is also retried when the close races with sending it.
    assert_eq!(client.get("/").await.unwrap().text(), "ok");
    let mut connections = 0;
    while accepted.try_recv().is_ok() {
        connections += 1;
    }
    assert_eq!(connections, 3);
}

#[tokio::test]
async fn a_slow_request_times_out_and_the_next_one_works() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap().with_timeout(Duration::from_millis(100));
    assert_eq!(client.timeout(), Duration::from_millis(100));

    let error = client.get("/slow").await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    assert_eq!(client.get("/text").await.unwrap().status, 200);
}

#[tokio::test]
async fn bad_requests_and_refused_connections_are_errors() {
    let addr = server().await;
    let mut client = Client::connect(addr).await.unwrap();
    assert!(matches!(client.get("no-slash").await, Err(ClientError::InvalidRequest(_))));
    assert!(matches!(client.request("BAD METHOD", "/", &[], None).await, Err(ClientError::InvalidRequest(_))));
    assert!(matches!(
        client.request("GET", "/", &[("bad\nname", "x")], None).await,
        Err(ClientError::InvalidRequest(_))
    ));
    assert_eq!(client.get("/text").await.unwrap().status, 200, "still usable");

    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = unused.local_addr().unwrap();
    drop(unused);
    assert!(matches!(Client::connect(closed).await, Err(ClientError::Connect { .. })));
}
