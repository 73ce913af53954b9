//! The WebSocket rows of the benchmark (issue 3): durable commands over `GET /ws`, pipelined on
//! one connection and spread over many, with the same workload as the HTTP rows (create, then
//! patch with the expected version from the create's result); and the end-to-end latency of
//! live subscriptions (append acknowledged → event received) at half of the highest write
//! rate measured, by 1 and by many subscribers.
//!
//! The client is tokio-tungstenite, one task per connection, in the same process and runtime
//! as the server (as the HTTP rows). Replies are scanned for the few fields needed rather than
//! parsed, so that the client costs little next to the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{FutureExt as _, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::load::{LoadResult, Timing, quantile};
use crate::{HttpMeasure, StoreWindow, workload};

/// Most connections one case may open.
pub(crate) const WS_CONNECTIONS_MAX: usize = 1_024;
/// Most commands one connection may keep in flight.
pub(crate) const WS_PIPELINE_MAX: usize = 4_096;
/// Most subscribers one latency case may open.
pub(crate) const SUBSCRIBERS_MAX: usize = 1_000;
/// Writer connections of a latency case; the rate is shared among them.
const LATENCY_WRITERS: usize = 4;
/// Longest wait for one reply or event; far above any healthy latency.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Error messages kept per case.
const ERROR_SAMPLES_MAX: usize = 3;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket command case: `connections` connections, each keeping `pipeline` commands
/// in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsCase {
    /// Connections, each with its own task.
    pub connections: usize,
    /// Commands in flight per connection.
    pub pipeline: usize,
}

/// The cases of a full run: one connection pipelined at 1, 16 and 256, and 64 connections.
pub fn default_cases() -> Vec<WsCase> {
    [(1, 1), (1, 16), (1, 256), (64, 1)].map(|(connections, pipeline)| WsCase { connections, pipeline }).to_vec()
}

/// One WebSocket command case's results.
#[derive(Clone, Debug, PartialEq)]
pub struct WsRow {
    /// The case.
    pub case: WsCase,
    /// Commands (results received) as the HTTP rows count requests.
    pub sourced: HttpMeasure,
    /// The store's counters over the window.
    pub store: StoreWindow,
    /// Appends the store committed over the whole run: one per result received.
    pub store_appends_total: u64,
}

/// One subscription latency case's results.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyRow {
    /// Subscribers, each on its own connection with one subscription to every event.
    pub subscribers: usize,
    /// Whether the subscriptions asked for batched frames (`"batch": true`: every event at
    /// hand in one `{"op":"events"}` frame) rather than one `{"op":"event"}` frame per event.
    pub batched: bool,
    /// The write rate aimed at (half of the highest measured), commands per second.
    pub target_per_sec: f64,
    /// The write rate reached in the window.
    pub achieved_per_sec: f64,
    /// Commands acknowledged inside the window (each one event).
    pub acknowledged: u64,
    /// Deliveries measured: acknowledged events × subscribers, when none is missing.
    pub deliveries: u64,
    /// Deliveries that arrived before the writer had the acknowledgement (counted as 0 ms).
    pub before_ack: u64,
    /// Acknowledged → received, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Command sent → event received, milliseconds (includes the commit).
    pub sent_p50_ms: f64,
    /// 99th percentile.
    pub sent_p99_ms: f64,
    /// Times a subscription fell behind the live buffer and read the store again.
    pub lag_recoveries: u64,
    /// Messages (events and replies) per write to a socket, over the whole run.
    pub messages_per_write: f64,
    /// Events per event frame the subscribers received (1 with a frame per event).
    pub events_per_frame: f64,
    /// The process's CPU microseconds over the window per delivery measured (commands,
    /// fan-out and the benchmark's own clients together), when the platform tells.
    pub cpu_us_per_delivery: Option<f64>,
    /// Failed commands, missing or out-of-order events, over the whole run.
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

/// Runs the command cases, then the latency cases at half of the highest rate measured over
/// WebSocket (or `fallback_max_per_sec` when there were no command cases).
pub(crate) fn run(
    runtime: &tokio::runtime::Runtime,
    cases: &[WsCase],
    subscribers: &[usize],
    timing: Timing,
    fallback_max_per_sec: f64,
) -> anyhow::Result<(Vec<WsRow>, Vec<LatencyRow>)> {
    let mut rows = Vec::with_capacity(cases.len());
    for &case in cases {
        eprintln!("[WebSocket, {} connections × {} in flight] Sourced…", case.connections, case.pipeline);
        rows.push(runtime.block_on(measure_commands(case, timing))?);
    }
    let max = rows.iter().map(|r| r.sourced.per_sec()).fold(0.0, f64::max);
    let max = if max > 0.0 { max } else { fallback_max_per_sec };
    let target = (max / 2.0).max(1.0);
    let mut latency = Vec::with_capacity(subscribers.len());
    for &n in subscribers {
        for batched in [false, true] {
            let frames = if batched { "batched frames" } else { "a frame per event" };
            eprintln!("[subscription latency, {n} subscribers, {frames}, {target:.0} commands/s] Sourced…");
            latency.push(runtime.block_on(measure_latency(n, batched, target, timing))?);
        }
    }
    Ok((rows, latency))
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Ws> {
    // Nagle off on the client too: pipelined command frames are small.
    // A small read buffer: tungstenite zero-fills its whole read buffer (128 KiB by default)
    // before every read, which would make the load generator the bottleneck.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), true)
        .await
        .context("WebSocket connect")?;
    Ok(ws)
}

async fn start_server() -> anyhow::Result<(sourced_server::RunningServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let config = sourced_server::Config::embedded(crate::loopback(), dir.path().join("sourced.db"));
    Ok((sourced_server::start(config).await?, dir))
}

/// One command case on a fresh server and database.
async fn measure_commands(case: WsCase, timing: Timing) -> anyhow::Result<WsRow> {
    let (server, _dir) = start_server().await?;
    let mut sockets = Vec::with_capacity(case.connections);
    for _ in 0..case.connections {
        sockets.push(connect(server.addr()).await?);
    }
    let window_start = Instant::now() + timing.warmup;
    let window_end = window_start + timing.duration;
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, ws)| tokio::spawn(connection_loop(ws, index, case.pipeline, window_start, window_end)))
        .collect();
    tokio::time::sleep_until(window_start.into()).await;
    let (start_at, start, cpu_start) = (Instant::now(), server.store_stats(), crate::cpu::process_seconds());
    tokio::time::sleep_until(window_end.into()).await;
    let (end_at, end, cpu_end) = (Instant::now(), server.store_stats(), crate::cpu::process_seconds());
    let mut total = LoadResult { cpu_start, cpu_end, ..LoadResult::default() };
    for task in tasks {
        let r = task.await.context("a WebSocket load client panicked")?;
        total.measured += r.measured;
        total.latencies_ns.extend_from_slice(&r.latencies_ns);
        total.succeeded += r.succeeded;
        total.errors += r.errors;
        total.error_samples.extend(r.error_samples);
    }
    total.latencies_ns.sort_unstable();
    total.error_samples.truncate(ERROR_SAMPLES_MAX);
    let store_appends_total = server.store_stats().appends;
    server.shutdown().await;
    let store = StoreWindow {
        commits: end.commits - start.commits,
        appends: end.appends - start.appends,
        events: end.events - start.events,
        seconds: end_at.duration_since(start_at).as_secs_f64(),
    };
    Ok(WsRow {
        case,
        sourced: HttpMeasure::from_load(total, timing.duration.as_secs_f64()),
        store,
        store_appends_total,
    })
}

/// A command in flight on one connection.
struct Pending {
    slot: usize,
    seq: u64,
    started: Instant,
    /// A create (a patch follows) or a patch (the slot's next create follows).
    create: bool,
}

/// A command id: unique per connection, slot, sequence number and kind within one case.
fn command_id(connection: usize, slot: usize, seq: u64, create: bool) -> String {
    format!("0190a0b0-{connection:04x}-7{slot:03x}-8000-{:012x}", seq * 2 + u64::from(!create))
}

fn create_frame(id: &str, target: &str, seq: u64) -> String {
    let doc = workload::document(target, seq);
    let doc = std::str::from_utf8(&doc).unwrap_or("{}");
    format!(
        r#"{{"op":"command","command":{{"id":"{id}","type":"create","targetName":"{ty}","targetId":"{target}","body":{doc}}}}}"#,
        ty = workload::TYPE_NAME
    )
}

fn patch_frame(id: &str, target: &str, seq: u64, version: u64) -> String {
    let patch = workload::patch(seq);
    let patch = std::str::from_utf8(&patch).unwrap_or("[]");
    format!(
        r#"{{"op":"command","command":{{"id":"{id}","type":"patch","targetName":"{ty}","targetId":"{target}","version":{version},"body":{patch}}}}}"#,
        ty = workload::TYPE_NAME
    )
}

/// The string value of the first `"key":"…"` in `text`.
fn str_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = text[at..].find('"')?;
    Some(&text[at..at + len])
}

/// The number value of the first `"key":N` in `text`.
fn u64_field(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    leading_u64(&text[at..])
}

/// The whole number `text` starts with.
fn leading_u64(text: &str) -> Option<u64> {
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    text[..digits].parse().ok()
}

/// The next text frame, or an error after [`REPLY_TIMEOUT`] or when the connection ends.
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match tokio::time::timeout(REPLY_TIMEOUT, ws.next()).await {
            Err(_) => return Err(format!("no reply within {} s", REPLY_TIMEOUT.as_secs())),
            Ok(None) => return Err("the connection ended".into()),
            Ok(Some(Err(e))) => return Err(format!("the connection failed: {e}")),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("the server closed: {f:?}")),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One connection's loop: `pipeline` slots, each looping { create; patch } until the window
/// ends, with every command's reply matched by id.
async fn connection_loop(
    mut ws: Ws,
    connection: usize,
    pipeline: usize,
    window_start: Instant,
    window_end: Instant,
) -> LoadResult {
    let mut result = LoadResult::default();
    let mut pending: HashMap<String, Pending> = HashMap::with_capacity(pipeline);
    let target = |slot: usize, seq: u64| workload::aggregate_id(connection * WS_PIPELINE_MAX + slot, seq);
    for slot in 0..pipeline {
        let id = command_id(connection, slot, 0, true);
        if let Err(e) = ws.send(Message::text(create_frame(&id, &target(slot, 0), 0))).await {
            record_error(&mut result, format!("send failed: {e}"));
            return result;
        }
        pending.insert(id, Pending { slot, seq: 0, started: Instant::now(), create: true });
    }
    while !pending.is_empty() {
        let text = match next_text(&mut ws).await {
            Ok(t) => t,
            Err(e) => {
                result.errors += pending.len() as u64;
                record_error(&mut result, e);
                break;
            }
        };
        let finished = Instant::now();
        let Some(p) = str_field(&text, "id").and_then(|id| pending.remove(id)) else {
            record_error(&mut result, format!("a reply to no command in flight: {text}"));
            continue;
        };
        let version = if text.starts_with(r#"{"op":"result""#) {
            result.succeeded += 1;
            if p.started >= window_start && finished <= window_end {
                result.measured += 1;
                result
                    .latencies_ns
                    .push(u64::try_from(finished.duration_since(p.started).as_nanos()).unwrap_or(u64::MAX));
            }
            u64_field(&text, "version")
        } else {
            record_error(&mut result, text);
            None
        };
        // The slot's next command: the patch after a good create, else a new create.
        let (seq, create) = match (p.create, version) {
            (true, Some(_)) => (p.seq, false),
            _ => (p.seq + 1, true),
        };
        if Instant::now() >= window_end || result.errors >= 100 {
            continue;
        }
        let id = command_id(connection, p.slot, seq, create);
        let frame = if create {
            create_frame(&id, &target(p.slot, seq), seq)
        } else {
            patch_frame(&id, &target(p.slot, seq), seq, version.unwrap_or(1))
        };
        if let Err(e) = ws.send(Message::text(frame)).await {
            record_error(&mut result, format!("send failed: {e}"));
            break;
        }
        pending.insert(id, Pending { slot: p.slot, seq, started: Instant::now(), create });
    }
    let _ = ws.close(None).await;
    result
}

fn record_error(result: &mut LoadResult, message: String) {
    result.errors += 1;
    if result.error_samples.len() < ERROR_SAMPLES_MAX {
        result.error_samples.push(message);
    }
}

/// What a writer saw of one command: sent, acknowledged, and its event's position.
struct Acked {
    position: u64,
    sent: Instant,
    acked: Instant,
}

/// One latency case: `subscribers` connections subscribed to everything from "now", then
/// writers creating aggregates at `per_sec` (open loop, paced) for warm-up + window.
async fn measure_latency(
    subscribers: usize,
    batched: bool,
    per_sec: f64,
    timing: Timing,
) -> anyhow::Result<LatencyRow> {
    let (server, _dir) = start_server().await?;
    let addr = server.addr();
    let mut subs = Vec::with_capacity(subscribers);
    let subscribe = format!(r#"{{"op":"subscribe","sub":"s","after":"now","batch":{batched}}}"#);
    for _ in 0..subscribers {
        let mut ws = connect(addr).await?;
        ws.send(Message::text(subscribe.as_str())).await?;
        let caught_up = next_text(&mut ws).await.map_err(anyhow::Error::msg)?;
        if !caught_up.starts_with(r#"{"op":"caught-up""#) {
            bail!("expected caught-up, got {caught_up}");
        }
        subs.push(ws);
    }
    // Subscribers read until they have seen the last position, which is known once the
    // writers are done.
    let (last_tx, last_rx) = tokio::sync::watch::channel(None::<u64>);
    // Room for every event each subscriber will get, with a margin, so that no buffer grows
    // (and takes fresh pages from the kernel) while latency is measured.
    let expected = (per_sec * (timing.warmup + timing.duration).as_secs_f64() * 1.25) as usize + 1024;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|ws| {
            let last = last_rx.clone();
            tokio::spawn(subscriber_loop(ws, last, expected))
        })
        .collect();
    let started = Instant::now();
    let window_start = started + timing.warmup;
    let window_end = window_start + timing.duration;
    let interval = Duration::from_secs_f64(LATENCY_WRITERS as f64 / per_sec);
    let mut writers = Vec::with_capacity(LATENCY_WRITERS);
    for w in 0..LATENCY_WRITERS {
        let ws = connect(addr).await?;
        let first = started + interval.mul_f64(w as f64 / LATENCY_WRITERS as f64);
        writers.push(tokio::spawn(paced_writer(ws, w, first, interval, window_end)));
    }
    // The process's CPU time at the window's edges (server, writers and subscribers together).
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let start = crate::cpu::process_seconds();
        tokio::time::sleep_until(window_end.into()).await;
        (start, crate::cpu::process_seconds())
    });
    let mut acked = Vec::new();
    let mut errors = 0u64;
    let mut samples = Vec::new();
    for w in writers {
        let (a, e, s) = w.await.context("a writer panicked")?;
        acked.extend(a);
        errors += e;
        samples.extend(s);
    }
    let (cpu_start, cpu_end) = cpu.await.context("the CPU probe panicked")?;
    let last = acked.iter().map(|a| a.position).max().unwrap_or(0);
    let _ = last_tx.send(Some(last));
    let mut received = Vec::with_capacity(readers.len());
    for r in readers {
        received.push(r.await.context("a subscriber panicked")?);
    }
    let lag_recoveries = server.live().subscription_lag_recoveries.load(std::sync::atomic::Ordering::Relaxed);
    let flushes = server.live().flushes.load(std::sync::atomic::Ordering::Relaxed);
    let messages = server.live().messages_written.load(std::sync::atomic::Ordering::Relaxed);
    server.shutdown().await;

    let in_window: HashMap<u64, &Acked> =
        acked.iter().filter(|a| a.acked >= window_start && a.acked <= window_end).map(|a| (a.position, a)).collect();
    let mut expected: Vec<u64> = acked.iter().map(|a| a.position).collect();
    expected.sort_unstable();
    let (mut from_ack, mut from_sent, mut before_ack) = (Vec::new(), Vec::new(), 0u64);
    let (mut all_events, mut all_frames) = (0u64, 0u64);
    for r in &received {
        match r {
            Err(e) => {
                errors += 1;
                if samples.len() < ERROR_SAMPLES_MAX {
                    samples.push(e.clone());
                }
            }
            Ok(Received { events, frames }) => {
                all_events += events.len() as u64;
                all_frames += frames;
                // Every acknowledged command arrives once, in position order.
                let positions: Vec<u64> = events.iter().map(|(p, _)| *p).collect();
                if positions != expected {
                    errors += 1;
                    if samples.len() < ERROR_SAMPLES_MAX {
                        samples.push(format!(
                            "a subscriber received {} events, not the {} acknowledged, in order",
                            positions.len(),
                            expected.len()
                        ));
                    }
                }
                for (position, at) in events {
                    if let Some(a) = in_window.get(position) {
                        if *at < a.acked {
                            before_ack += 1;
                        }
                        from_ack.push(nanos(at.saturating_duration_since(a.acked)));
                        from_sent.push(nanos(at.saturating_duration_since(a.sent)));
                    }
                }
            }
        }
    }
    from_ack.sort_unstable();
    from_sent.sort_unstable();
    let ms = |v: &[u64], q: f64| quantile(v, q) as f64 / 1e6;
    Ok(LatencyRow {
        subscribers,
        batched,
        target_per_sec: per_sec,
        achieved_per_sec: in_window.len() as f64 / timing.duration.as_secs_f64(),
        acknowledged: in_window.len() as u64,
        deliveries: from_ack.len() as u64,
        before_ack,
        p50_ms: ms(&from_ack, 0.50),
        p99_ms: ms(&from_ack, 0.99),
        sent_p50_ms: ms(&from_sent, 0.50),
        sent_p99_ms: ms(&from_sent, 0.99),
        lag_recoveries,
        messages_per_write: crate::ratio(messages as f64, flushes as f64),
        events_per_frame: crate::ratio(all_events as f64, all_frames as f64),
        cpu_us_per_delivery: crate::cpu::micros_per(cpu_start, cpu_end, from_ack.len() as u64),
        errors,
        error_samples: samples,
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A writer: one create every `interval` from `first` until `end`, without waiting for replies
/// (the server bounds what is in flight); then collects the outstanding replies.
async fn paced_writer(
    mut ws: Ws,
    writer: usize,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> (Vec<Acked>, u64, Vec<String>) {
    let mut acked = Vec::new();
    let mut errors = 0u64;
    let mut samples = Vec::new();
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut next = first;
    let mut seq = 0u64;
    loop {
        let sending = next < end;
        if !sending && sent.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()), if sending => {
                let id = command_id(WS_CONNECTIONS_MAX + writer, 0, seq, true);
                let target = workload::aggregate_id(WS_PIPELINE_MAX * (WS_CONNECTIONS_MAX + writer), seq);
                if let Err(e) = ws.send(Message::text(create_frame(&id, &target, seq))).await {
                    errors += 1;
                    samples.push(format!("send failed: {e}"));
                    break;
                }
                sent.insert(id, Instant::now());
                seq += 1;
                next += interval;
            }
            reply = tokio::time::timeout(REPLY_TIMEOUT, ws.next()) => {
                let at = Instant::now();
                let text = match reply {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    other => {
                        errors += sent.len() as u64;
                        samples.push(format!("a writer's connection failed: {other:?}"));
                        break;
                    }
                };
                let text = text.as_str();
                let Some(sent_at) = str_field(text, "id").and_then(|id| sent.remove(id)) else {
                    errors += 1;
                    samples.push(format!("a reply to no command in flight: {text}"));
                    continue;
                };
                match (text.starts_with(r#"{"op":"result""#), u64_field(text, "position")) {
                    (true, Some(position)) => acked.push(Acked { position, sent: sent_at, acked: at }),
                    _ => {
                        errors += 1;
                        if samples.len() < ERROR_SAMPLES_MAX {
                            samples.push(text.to_owned());
                        }
                    }
                }
            }
        }
    }
    let _ = ws.close(None).await;
    samples.truncate(ERROR_SAMPLES_MAX);
    (acked, errors, samples)
}

/// A subscriber: every event's position and when it arrived, until the last position is known
/// and seen. Frames already received are taken without waiting (no timer, no select), so the
/// load generator stays light beside the server it measures.
async fn subscriber_loop(
    mut ws: Ws,
    mut last: tokio::sync::watch::Receiver<Option<u64>>,
    expected: usize,
) -> Result<Received, String> {
    // Touched once here, before the writers start, so that the kernel's page zeroing is not
    // counted in the window.
    let mut events = vec![(0, Instant::now()); expected];
    events.clear();
    let position = memchr::memmem::Finder::new(POSITION_KEY);
    let mut seen = 0u64;
    let mut frames = 0u64;
    loop {
        while let Some(frame) = ws.next().now_or_never() {
            frames += take_event(frame, &position, &mut events, &mut seen)?;
        }
        if let Some(l) = *last.borrow()
            && seen >= l
        {
            break;
        }
        tokio::select! {
            biased;
            frame = ws.next() => frames += take_event(frame, &position, &mut events, &mut seen)?,
            changed = last.changed() => {
                if changed.is_err() {
                    return Err("the run ended early".into());
                }
            }
            _ = tokio::time::sleep(REPLY_TIMEOUT) => return Err(format!("a subscriber waited {} s for an event", REPLY_TIMEOUT.as_secs())),
        }
    }
    let _ = ws.close(None).await;
    Ok(Received { events, frames })
}

/// What one subscriber received: each event's position and arrival, and the frames they came in.
struct Received {
    events: Vec<(u64, Instant)>,
    frames: u64,
}

/// One frame a subscriber received: its events' positions and when they arrived. Returns the
/// number of event frames taken (0 or 1).
fn take_event(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    position: &memchr::memmem::Finder<'_>,
    events: &mut Vec<(u64, Instant)>,
    seen: &mut u64,
) -> Result<u64, String> {
    let at = Instant::now();
    match frame {
        Some(Ok(Message::Text(t))) => {
            let t = t.as_str();
            if !t.starts_with(r#"{"op":"event""#) && !t.starts_with(r#"{"op":"events""#) {
                return Err(format!("a subscriber got {t}"));
            }
            // One event or a batch: each `"position":` in turn. The workload's documents have
            // no such key, and a wrong scan would fail the order check.
            let before = events.len();
            let mut rest = t;
            while let Some(i) = position.find(rest.as_bytes()) {
                rest = &rest[i + POSITION_KEY.len()..];
                let p = leading_u64(rest).ok_or_else(|| format!("a bad position in {t}"))?;
                *seen = (*seen).max(p);
                events.push((p, at));
            }
            if events.len() == before {
                return Err(format!("an event frame without a position: {t}"));
            }
            Ok(1)
        }
        Some(Ok(_)) => Ok(0),
        other => Err(format!("a subscriber's connection failed: {other:?}")),
    }
}

/// What a subscriber looks for in an event frame.
const POSITION_KEY: &str = r#""position":"#;

/// Everything that makes the WebSocket numbers untrustworthy.
pub(crate) fn problems(rows: &[WsRow], latency: &[LatencyRow]) -> Vec<String> {
    let mut problems = Vec::new();
    for row in rows {
        let c = row.case;
        if row.sourced.errors > 0 {
            problems.push(format!(
                "WebSocket {}×{}: {} failed commands, e.g. {}",
                c.connections,
                c.pipeline,
                row.sourced.errors,
                row.sourced.error_samples.join(" | ")
            ));
        }
        if row.store_appends_total != row.sourced.succeeded_total {
            problems.push(format!(
                "WebSocket {}×{}: the store committed {} appends but clients saw {} results",
                c.connections, c.pipeline, row.store_appends_total, row.sourced.succeeded_total
            ));
        }
    }
    for row in latency {
        if row.errors > 0 {
            problems.push(format!(
                "subscription latency, {} subscribers{}: {} errors, e.g. {}",
                row.subscribers,
                if row.batched { " (batched)" } else { "" },
                row.errors,
                row.error_samples.join(" | ")
            ));
        }
    }
    problems
}

/// The two WebSocket tables, in Markdown.
pub(crate) fn write_markdown(out: &mut String, rows: &[WsRow], latency: &[LatencyRow], http_64: Option<f64>) {
    use std::fmt::Write as _;
    if !rows.is_empty() {
        let _ = writeln!(
            out,
            "\n### Commands over WebSocket\n\nSame workload as above (create, then patch with the version from the \
             create's result), as `{{\"op\":\"command\"}}` frames on `GET /ws`; each connection keeps N commands in \
             flight (N independent create→patch loops), replies matched by command id; fresh database per row.\n"
        );
        let _ = writeln!(
            out,
            "| connections × in flight | Sourced cmd/s | p50 ms | p99 ms | p999 ms | CPU µs/cmd | commits/s | mean batch | vs HTTP at 64 clients |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            let mean_batch = crate::optional_cell(row.store.mean_batch(), 2);
            let vs = crate::optional_percent(http_64.map(|h| crate::ratio(row.sourced.per_sec(), h)));
            let _ = writeln!(
                out,
                "| {} × {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {} | {} |",
                row.case.connections,
                row.case.pipeline,
                row.sourced.per_sec(),
                row.sourced.p50_ms,
                row.sourced.p99_ms,
                row.sourced.p999_ms,
                crate::optional_cell(row.sourced.cpu_us, 0),
                row.store.commits_per_sec(),
                mean_batch,
                vs,
            );
        }
    }
    if !latency.is_empty() {
        let _ = writeln!(
            out,
            "\n### Subscription latency over WebSocket\n\n{LATENCY_WRITERS} writer connections create aggregates at \
             half of the highest WebSocket rate above (paced, open loop); each subscriber is its own connection \
             subscribed to every event from \"now\". Latency: the writer receives the result (append \
             acknowledged) → the subscriber receives the event (an event that arrives first counts as 0 ms); \
             also command sent → event received. Every subscriber must receive every acknowledged event once, in \
             order. Each case runs twice: subscriptions with one `{{\"op\":\"event\"}}` frame per event (SPEC \
             §3.2), and with `\"batch\": true` (every event at hand in one `{{\"op\":\"events\"}}` frame).\n"
        );
        let _ = writeln!(
            out,
            "| subscribers | frames | target cmd/s | achieved cmd/s | deliveries | before ack | ack→event p50 ms | p99 ms | sent→event p50 ms | p99 ms | messages per write | events per frame | store re-reads | CPU µs per delivery |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in latency {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} |",
                row.subscribers,
                if row.batched { "batched" } else { "per event" },
                row.target_per_sec,
                row.achieved_per_sec,
                row.deliveries,
                crate::ratio(row.before_ack as f64, row.deliveries as f64) * 100.0,
                row.p50_ms,
                row.p99_ms,
                row.sent_p50_ms,
                row.sent_p99_ms,
                row.messages_per_write,
                row.events_per_frame,
                row.lag_recoveries,
                crate::optional_cell(row.cpu_us_per_delivery, 2),
            );
        }
        let _ = writeln!(
            out,
            "\n(messages per write: frames the server put on a socket per write, replies included; events per \
             frame: events a subscriber received per event frame; store re-reads: times a subscriber fell behind the live buffer and read the store to catch up)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_by_scanning() {
        let result =
            r#"{"op":"result","id":"abc","targetName":"bench","version":2,"events":[{"id":"e","position":17}]}"#;
        assert_eq!(str_field(result, "id"), Some("abc"));
        assert_eq!(u64_field(result, "version"), Some(2));
        assert_eq!(u64_field(result, "position"), Some(17));
        assert_eq!(u64_field(r#"{"position":5"#, "position"), Some(5));
        assert_eq!(str_field(result, "nope"), None);
    }

    #[test]
    fn frames_are_valid_envelopes_with_unique_ids() {
        let create: serde_json::Value =
            serde_json::from_str(&create_frame(&command_id(3, 255, 7, true), "t", 7)).unwrap();
        assert_eq!(create["command"]["type"], "create");
        assert_eq!(create["command"]["body"]["id"], "t");
        let patch: serde_json::Value =
            serde_json::from_str(&patch_frame(&command_id(3, 255, 7, false), "t", 7, 1)).unwrap();
        assert_eq!(patch["command"]["version"], 1);
        assert_ne!(create["command"]["id"], patch["command"]["id"]);
        assert_eq!(command_id(1_028, 4_095, 1, true).len(), 36);
    }
}
