//! Slow and malformed clients over raw TCP (HEADER_READ_TIMEOUT_MS, BODY_READ_TIMEOUT_MS,
//! IDLE_TIMEOUT_MS set small): an idle socket, a partial head, a head sent a byte at a time,
//! an idle keep-alive and a slow body are each closed (the body with a 408 problem); a normal
//! request and a reused connection still work, and a WebSocket left silent past every timeout
//! stays open. Requests the HTTP parser refuses get a problem body.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use sourced_server::RunningServer;

use crate::common::config_in;

/// Each timeout, small so the test is quick.
const TIMEOUT_MS: u64 = 300;
/// Longest wait for the server to close a socket: far beyond every timeout.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

async fn server() -> (RunningServer, TempDir) {
    let dir = TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.http.header_read_timeout_ms = TIMEOUT_MS;
    config.http.body_read_timeout_ms = TIMEOUT_MS;
    config.http.idle_timeout_ms = TIMEOUT_MS;
    (sourced_server::start(config).await.unwrap(), dir)
}

/// What the client does on a fresh connection before it waits for the server to close it.
enum Client {
    /// Sends these bytes, then nothing.
    Send(&'static str),
    /// Sends these bytes one at a time, a pause between each (more bytes than the header
    /// timeout lets through).
    Drip(&'static str, Duration),
}

/// (case, what the client does, what everything the server sent before closing must start
/// with, and contain; "" for nothing at all).
const CASES: &[(&str, Client, &str, &str)] = &[
    ("idle socket", Client::Send(""), "", ""),
    ("partial head", Client::Send("GET /healthz HTTP/1.1\r\nHost: x\r\n"), "", ""),
    (
        "head a byte at a time",
        Client::Drip(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
            Duration::from_millis(50),
        ),
        "",
        "",
    ),
    ("idle keep-alive", Client::Send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), "HTTP/1.1 200", "\"ok\""),
    (
        "slow body (1 of 100 bytes)",
        Client::Send("POST /doc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"),
        "HTTP/1.1 408",
        "urn:sourced:problem:body-timeout",
    ),
];

/// Everything the server sends until it closes the connection (a reset counts as closed).
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSE_WITHIN, read).await.expect("the server closes the connection");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn slow_clients_are_closed() {
    let (server, _dir) = server().await;
    for (case, client, starts, contains) in CASES {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let got = match client {
            Client::Send(bytes) => {
                stream.write_all(bytes.as_bytes()).await.unwrap();
                until_closed(&mut stream).await
            }
            Client::Drip(bytes, pause) => {
                let (mut rd, mut wr) = stream.into_split();
                let writer = async move {
                    for b in bytes.as_bytes() {
                        if wr.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(*pause).await;
                    }
                    wr
                };
                let reader = async move {
                    let mut got = Vec::new();
                    let _ = tokio::time::timeout(CLOSE_WITHIN, rd.read_to_end(&mut got)).await.expect("closed");
                    got
                };
                // The server closes before the head is complete: the reader ends first.
                let got = tokio::select! {
                    got = reader => got,
                    _ = writer => panic!("{case}: the whole head was sent before the server closed"),
                };
                String::from_utf8_lossy(&got).into_owned()
            }
        };
        assert!(got.starts_with(starts), "{case}: {got:?}");
        assert!(got.contains(contains), "{case}: {got:?}");
        if starts.is_empty() {
            assert!(got.is_empty(), "{case}: {got:?}");
        }
    }
    server.shutdown().await;
}

/// Reads one response whose body has a Content-Length.
async fn response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(CLOSE_WITHIN, stream.read(&mut buf)).await.expect("a response").unwrap();
        assert!(n > 0, "closed before the response ended: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn prompt_clients_and_websockets_are_served() {
    let (server, _dir) = server().await;
    // Two requests on one connection, the second with a body.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(response(&mut stream).await.starts_with("HTTP/1.1 200"));
    let body = r#"{"id":"d1","a":1}"#;
    let post = format!(
        "POST /doc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(post.as_bytes()).await.unwrap();
    assert!(response(&mut stream).await.starts_with("HTTP/1.1 201"));

    // A WebSocket silent for several times every timeout is still open and answers.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS * 4)).await;
    let create = serde_json::json!({"op": "command", "command": {
        "id": "0190a0b0-0000-7000-8000-000000000001", "type": "create", "targetName": "doc", "targetId": "d2", "body": {}
    }});
    ws.send(Message::text(create.to_string())).await.unwrap();
    let reply = tokio::time::timeout(CLOSE_WITHIN, ws.next()).await.expect("a reply").unwrap().unwrap();
    let Message::Text(reply) = reply else { panic!("expected the command's result, got {reply:?}") };
    assert!(reply.as_str().contains("\"d2\""), "{reply}");
    server.shutdown().await;
}

/// Requests the HTTP parser refuses before the service sees them are answered with a problem
/// of hyper's status, not a bare one: (case, request, status line, problem type).
#[tokio::test]
async fn unparsable_requests_get_problems() {
    let big_header = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(600 * 1024));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "a literal quote in the URL",
            "GET /order?qty=\"5\" HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "HTTP/1.1 400",
            "invalid-request",
        ),
        ("a space in the URL", "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n".into(), "HTTP/1.1 400", "invalid-request"),
        (
            "a header without a colon",
            "GET /healthz HTTP/1.1\r\nHost x\r\n\r\n".into(),
            "HTTP/1.1 400",
            "invalid-request",
        ),
        ("a head too large", big_header, "HTTP/1.1 431", "headers-too-large"),
    ];
    let (server, _dir) = server().await;
    for (case, request, status, slug) in cases {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        // The server may answer and close before it has read everything.
        let _ = stream.write_all(request.as_bytes()).await;
        let got = until_closed(&mut stream).await;
        assert!(got.starts_with(status), "{case}: {got:?}");
        let (head, body) = got.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{case}: {got:?}"));
        assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{case}: {head}");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{case}: {e}: {body:?}"));
        assert_eq!(problem["type"], format!("urn:sourced:problem:{slug}"), "{case}: {problem}");
        assert_eq!(problem["status"].as_u64(), status[9..].parse::<u64>().ok(), "{case}: {problem}");
    }
    // A good request is not affected.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = response(&mut stream).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    // Its length is known, as without the request tracking.
    assert!(got.to_ascii_lowercase().contains("content-length: 15"), "{got:?}");
    server.shutdown().await;
}

/// The server's resident memory in KiB (Linux; `None` elsewhere).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// SPEC §8.3: 1 000 half-open sockets that send one byte a second (a slowloris) do not take
/// the server down. It keeps answering other clients meanwhile, closes every one of them once
/// the header-read timeout passes, and its memory stays bounded (RSS before and after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_sockets_are_closed_and_others_are_served() {
    const SOCKETS: usize = 1_000;
    let dir = TempDir::new().unwrap();
    let env = [
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", dir.path().join("s.db").display())),
        ("HEADER_READ_TIMEOUT_MS".to_owned(), "1000".to_owned()),
    ];
    let (mut child, addr) = crate::common::spawn_sourced_with(&env, None).await;
    let pid = child.id().unwrap();
    let mut c = sourced_client::Client::connect(addr).await.unwrap();
    assert_eq!(c.request("GET", "/healthz", &[], None).await.unwrap().status, 200);
    let before = rss_kib(pid);
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SOCKETS {
        slow.spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else { return false };
            // One byte a second of a request head that never ends; closed by the server means a
            // write fails or a read sees the end.
            let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut buf = [0u8; 256];
            for b in head {
                if s.write_all(&[*b]).await.is_err() {
                    return true;
                }
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
            false
        });
    }
    // Meanwhile a normal client is served.
    for i in 0..20 {
        let r = c.send_json("POST", "/t", &[], &serde_json::json!({"id": format!("n{i}")})).await.unwrap();
        assert_eq!(r.status, 201);
    }
    let mut closed = 0;
    while let Some(r) = tokio::time::timeout(CLOSE_WITHIN * 4, slow.join_next()).await.expect("the sockets finish") {
        closed += usize::from(r.unwrap());
    }
    assert_eq!(closed, SOCKETS, "every slow socket is closed by the server");
    assert_eq!(c.request("GET", "/t/n19", &[], None).await.unwrap().status, 200);
    let after = rss_kib(pid);
    if let (Some(b), Some(a)) = (before, after) {
        println!("RSS before {b} KiB, after {SOCKETS} slow sockets {a} KiB");
        assert!(a < b + 64 * 1024, "RSS grew from {b} KiB to {a} KiB");
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
