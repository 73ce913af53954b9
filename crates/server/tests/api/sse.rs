//! The live feed over SSE (`GET /events`, `Accept: text/event-stream`) read from a raw TCP
//! stream: backlog, caught-up marker, live events, filters, and resume with `Last-Event-ID`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::config_in;

/// Longest wait for any one SSE event.
const STEP: Duration = Duration::from_secs(20);

/// One SSE event as received.
#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: Value,
}

/// An open SSE response, read over HTTP/1.0 (no chunked framing: the body ends with the
/// connection).
struct SseStream {
    stream: TcpStream,
    buf: String,
    head_read: bool,
}

impl SseStream {
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        SseStream { stream, buf: String::new(), head_read: false }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk)).await.expect("data within the step").unwrap();
        assert!(n > 0, "the stream ended; so far: {}", self.buf);
        self.buf.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
    }

    /// The status line and headers.
    async fn head(&mut self) -> String {
        while !self.buf.contains("\r\n\r\n") {
            self.fill().await;
        }
        let end = self.buf.find("\r\n\r\n").unwrap();
        let head = self.buf[..end].to_owned();
        self.buf.drain(..end + 4);
        self.head_read = true;
        head
    }

    /// The next event (comments such as keep-alives skipped).
    async fn next(&mut self) -> SseEvent {
        if !self.head_read {
            let head = self.head().await;
            assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
        }
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return SseEvent { id, event, data: serde_json::from_str(&data).unwrap() };
            }
            self.fill().await;
        }
    }
}

async fn write(c: &mut sourced_client::Client, ty: &str, id: &str) {
    let r = c.send_json("POST", &format!("/{ty}"), &[], &json!({"id": id})).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
}

#[tokio::test]
async fn sse_streams_the_backlog_then_caught_up_then_live() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = sourced_server::start(config_in(&dir)).await.unwrap();
    let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
    for i in 0..5 {
        write(&mut c, if i % 2 == 0 { "order" } else { "invoice" }, &format!("x{i}")).await;
    }
    let mut sse = SseStream::open(server.addr(), "/events?targetName=order", &[]).await;
    let mut ids = Vec::new();
    loop {
        let e = sse.next().await;
        if e.event == "caught-up" {
            assert_eq!(e.data, json!({"position": 5}));
            assert_eq!(e.id.as_deref(), Some("5"), "the marker's id is where to resume");
            break;
        }
        assert_eq!(e.event, "event");
        assert_eq!(e.data["targetName"], "order");
        assert_eq!(e.id.as_deref(), Some(e.data["position"].to_string().as_str()));
        ids.push(e.data["position"].as_u64().unwrap());
    }
    assert_eq!(ids, [1, 3, 5]);
    write(&mut c, "invoice", "y1").await;
    write(&mut c, "order", "y2").await;
    let e = sse.next().await;
    assert_eq!((e.event.as_str(), e.data["position"].as_u64()), ("event", Some(7)));
    assert_eq!(e.data["targetId"], "y2");
    server.shutdown().await;
}

#[tokio::test]
async fn sse_resumes_after_last_event_id() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = sourced_server::start(config_in(&dir)).await.unwrap();
    let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
    for i in 0..6 {
        write(&mut c, "order", &format!("r{i}")).await;
    }
    // Last-Event-ID wins over `after` in the URL the client reconnects to.
    let mut sse = SseStream::open(server.addr(), "/events?after=1", &[("last-event-id", "4")]).await;
    assert_eq!(sse.next().await.data["position"], 5);
    assert_eq!(sse.next().await.data["position"], 6);
    let marker = sse.next().await;
    assert_eq!((marker.event.as_str(), marker.id.as_deref()), ("caught-up", Some("6")));
    // `after=now` starts at the head; a bad position is refused before streaming.
    let mut now = SseStream::open(server.addr(), "/events?after=now", &[]).await;
    assert_eq!(now.next().await.data, json!({"position": 6}));
    let mut bad = SseStream::open(server.addr(), "/events", &[("last-event-id", "x")]).await;
    assert!(bad.head().await.starts_with("HTTP/1.0 400"));
    // Another tenant sees nothing of this one.
    let mut other = SseStream::open(server.addr(), "/events", &[("x-tenant", "other")]).await;
    assert_eq!(other.next().await.event, "caught-up");
    server.shutdown().await;
}

/// Reads an HTTP/1.0 response whole (the body ends with the connection).
async fn whole_response(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut out)).await.expect("the response within the step").unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn sse_streams_beyond_the_cap_get_503_and_a_closed_stream_frees_its_slot() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.ws.sse_streams_max = 2;
    let server = sourced_server::start(config).await.unwrap();
    let addr = server.addr();
    let live = || server.live().sse_streams.load(std::sync::atomic::Ordering::Relaxed);
    let mut a = SseStream::open(addr, "/events", &[]).await;
    let mut b = SseStream::open(addr, "/events", &[]).await;
    assert_eq!(a.next().await.event, "caught-up");
    assert_eq!(b.next().await.event, "caught-up");
    assert_eq!(live(), 2);
    let refused = whole_response(addr, "/events").await;
    assert!(refused.starts_with("HTTP/1.0 503"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("urn:sourced:problem:too-many-streams"), "{refused}");
    // Plain feed reads are not streams and are not refused.
    let mut c = sourced_client::Client::connect(addr).await.unwrap();
    assert_eq!(c.request("GET", "/events", &[], None).await.unwrap().status, 200);
    // A client that goes away frees its slot once the server writes to it again.
    drop(a);
    let mut i = 0;
    while live() == 2 {
        assert!(i < 200, "the closed stream kept its slot");
        write(&mut c, "order", &format!("free{i}")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        i += 1;
    }
    let mut d = SseStream::open(addr, "/events?after=now", &[]).await;
    assert_eq!(d.next().await.event, "caught-up");
    assert_eq!(b.next().await.event, "event", "the other stream is unaffected");
    server.shutdown().await;
}

#[tokio::test]
async fn an_sse_client_that_stops_reading_is_disconnected() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.ws.sse_slow_client_timeout_ms = 300;
    config.live_buffer_events = 64;
    let server = sourced_server::start(config).await.unwrap();
    let addr = server.addr();
    let streams = || server.live().sse_streams.load(std::sync::atomic::Ordering::Relaxed);
    let slow_closed = || server.live().slow_clients_closed.load(std::sync::atomic::Ordering::Relaxed);
    // A client with a tiny receive buffer that opens the stream, then reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    slow.write_all(format!("GET /events HTTP/1.0\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = SseStream::open(addr, "/events?after=now", &[]).await;
    assert_eq!(reader.next().await.event, "caught-up");
    // Events flow until the server gives up on the slow client (bounded).
    let mut c = sourced_client::Client::connect(addr).await.unwrap();
    let pad = "x".repeat(8_000);
    let mut i = 0u64;
    while slow_closed() == 0 {
        assert!(i < 20_000, "the slow SSE client was never disconnected");
        let r = c.send_json("POST", "/order", &[], &json!({"id": format!("s{i}"), "pad": pad})).await.unwrap();
        assert_eq!(r.status, 201);
        i += 1;
    }
    // Its stream is gone (its slot freed); the reading client still gets every event.
    let mut waited = 0;
    while streams() > 1 {
        assert!(waited < 500, "the slow client's stream was not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    for p in 1..=i {
        assert_eq!(reader.next().await.data["position"], p);
    }
    // The slow client, reading at last, finds its connection ended.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, slow.read_to_end(&mut rest)).await.expect("the end within the step");
    assert!(ended.is_err() || !rest.is_empty(), "{ended:?}");
    server.shutdown().await;
}

/// `after=now` on a restarted server (history in the store, no commit since the start) reads
/// none of the history, and still gets the next live event (issue 14, item 2).
#[tokio::test]
async fn sse_from_now_after_a_restart_reads_no_history() {
    let backend = crate::common::TestBackend::new().await;
    let server = sourced_server::start(backend.config()).await.unwrap();
    let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
    for i in 0..30 {
        write(&mut c, "order", &format!("h{i}")).await;
    }
    drop(c);
    server.shutdown().await;

    let server = sourced_server::start(backend.config()).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut now = SseStream::open(server.addr(), "/events?after=now", &[]).await;
        let marker = now.next().await;
        assert_eq!((marker.event.as_str(), &marker.data), ("caught-up", &json!({"position": 30})));
        streams.push(now);
    }
    assert_eq!(server.store_stats().events_read, 0, "no event of the history was read");
    let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
    write(&mut c, "order", "live").await;
    for now in &mut streams {
        let e = now.next().await;
        assert_eq!((e.data["position"].as_u64(), e.data["targetId"].as_str()), (Some(31), Some("live")), "{e:?}");
    }
    assert_eq!(server.store_stats().events_read, 0, "the live event came through the hub");
    server.shutdown().await;
}
