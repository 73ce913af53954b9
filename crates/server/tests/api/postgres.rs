//! The service on PostgreSQL: when the database goes away and comes back, `/readyz` and
//! commands answer 503 meanwhile, and the same process recovers by itself (a TCP proxy in
//! front of the shared server plays the outage; the server itself is never touched); and live
//! subscriptions over one store hear the commands executed through another (two "processes").
//!
//! `SOURCED_TEST_POSTGRES_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/test`); unreachable, the test prints `SKIP: …` and
//! passes, unless `SOURCED_REQUIRE_POSTGRES=1`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::common::{Scratch, TestApp, config_in};

fn server_config() -> tokio_postgres::Config {
    crate::common::postgres_url().parse().expect("SOURCED_TEST_POSTGRES_URL parses")
}

/// Forwards 127.0.0.1:`port` to the server until stopped; stopping cuts every connection.
struct Proxy {
    port: u16,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind the proxy");
        let port = listener.local_addr().expect("addr").port();
        let (shutdown, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopping.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { break };
                        connections.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                        while connections.try_join_next().is_some() {}
                    }
                }
            }
            drop(listener);
            connections.shutdown().await;
        });
        Proxy { port, shutdown, task }
    }

    async fn stop(self) -> u16 {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        self.port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_answers_503_and_the_service_recovers() {
    let Some(scratch) = Scratch::new().await else { return };
    let server = server_config();
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let upstream: SocketAddr = ([127, 0, 0, 1], port).into();
    let proxy = Proxy::start(upstream, 0).await;
    let dir = TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.store = sourced_server::StoreUrl::Postgres(format!(
        "postgres://{}@127.0.0.1:{}/{}?options=-csearch_path%3D{}",
        server.get_user().unwrap_or("postgres"),
        proxy.port,
        server.get_dbname().unwrap_or("test"),
        scratch.0
    ));
    let store = sourced_server::open_store(&config).await.expect("open the PostgreSQL store");
    let app = TestApp { router: sourced_server::app(&config, store.clone()), store, dir, scratch: None };

    app.get("/readyz").await.ok(200);
    app.post("/order", &json!({"id": "o1", "total": 1})).await.ok(201);

    let port = proxy.stop().await;
    app.get("/readyz").await.problem(503, "not-ready");
    app.post("/order", &json!({"id": "o2"})).await.problem(503, "store-unavailable");
    app.get("/order/o1").await.problem(503, "store-unavailable");

    let proxy = Proxy::start(upstream, port).await;
    app.get("/readyz").await.ok(200);
    assert_eq!(app.get("/order/o1").await.ok(200)["total"], 1);
    app.post("/order", &json!({"id": "o2"})).await.ok(201);
    let feed = app.get("/events").await;
    let positions: Vec<u64> =
        feed.ok(200)["items"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert_eq!(positions, [1, 2], "the refused command left no trace");
    app.store.close().await;
    proxy.stop().await;
}

/// Two engines over two stores on one schema play two processes: a subscription through the
/// engine over store A receives every event executed through the engine over store B (and A),
/// exactly once, in position order, across its catch-up and live phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_hears_commands_of_another_process() {
    use sourced_engine::{Engine, EngineConfig, Start, SubscriptionFilter, SubscriptionItem, SystemClock};
    use std::sync::Arc;

    let Some(scratch) = Scratch::new().await else { return };
    let server = server_config();
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?options=-csearch_path%3D{}",
        server.get_user().unwrap_or("postgres"),
        server.get_ports().first().copied().unwrap_or(5432),
        server.get_dbname().unwrap_or("test"),
        scratch.0
    );
    let open = || async {
        let store = sourced_store::postgres::PostgresStore::connect(&url, Default::default()).await.expect("connect");
        let store: Arc<dyn sourced_store::EventStore> = Arc::new(store);
        Engine::new(store, EngineConfig { live_buffer_events: 64, ..EngineConfig::default() }, Arc::new(SystemClock))
    };
    let (a, b) = (open().await, open().await);
    assert!(a.hub().is_fed() && b.hub().is_fed(), "PostgreSQL feeds the hub");
    let tenant = sourced_core::TenantId::default_tenant();
    let create = |engine: Engine, id: String| async move {
        let env = json!({"type": "create", "targetName": "order", "targetId": id, "body": {"n": 1}});
        let defaults = sourced_engine::fresh::envelope_defaults(sourced_core::TenantId::default_tenant(), false);
        let command = sourced_core::Command::from_envelope_value(env, defaults).expect("a valid command");
        engine.execute(command, None).await.expect("executed");
    };
    // Some history before the subscription (caught up from the store), the rest live.
    for i in 0..10 {
        create(b.clone(), format!("early{i}")).await;
    }
    let mut sub = a.subscribe(tenant, SubscriptionFilter::default(), Start::Beginning);
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 50;
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let engine = if w == 0 { a.clone() } else { b.clone() };
        writers.spawn(async move {
            for i in 0..PER_WRITER {
                create(engine.clone(), format!("w{w}-{i}")).await;
            }
        });
    }
    let total = 10 + WRITERS * PER_WRITER;
    let mut positions = Vec::new();
    while positions.len() < total {
        let item = tokio::time::timeout(Duration::from_secs(30), sub.next()).await.expect("an event within 30 s");
        match item.expect("no store error") {
            SubscriptionItem::Event(e) => positions.push(e.position.0),
            SubscriptionItem::CaughtUp(_) => {}
        }
    }
    while let Some(r) = writers.join_next().await {
        r.expect("writer");
    }
    assert_eq!(positions, (1..=total as u64).collect::<Vec<_>>(), "every event once, in order");
    // Nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(300), sub.next()).await.is_err());
    a.store().close().await;
    b.store().close().await;
}

/// Issue 4's multi-process test: three `sourced serve` processes on one fresh schema; clients
/// spread over them race with `If-Match` on the same aggregates (exactly one winner per version,
/// versions contiguous); a WebSocket subscriber on the first process receives every event
/// written through all three, exactly once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_database() {
    use futures_util::{SinkExt, StreamExt};
    use std::collections::BTreeMap;
    use tokio_tungstenite::tungstenite::Message;

    const AGGREGATES: usize = 4;
    const CLIENTS_PER_PROCESS: usize = 4;
    const ATTEMPTS: usize = 10;

    let Some(scratch) = Scratch::new().await else { return };
    let server = server_config();
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?options=-csearch_path%3D{}",
        server.get_user().unwrap_or("postgres"),
        server.get_ports().first().copied().unwrap_or(5432),
        server.get_dbname().unwrap_or("test"),
        scratch.0
    );
    let env = [("EVENT_STORE_URL".to_owned(), url)];
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(crate::common::spawn_sourced_with(&env, None).await);
    }
    let addrs: Vec<SocketAddr> = processes.iter().map(|(_, addr)| *addr).collect();

    // The subscriber, on the first process, caught up before anything is written.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", addrs[0])).await.expect("ws");
    let subscribe = json!({"op": "subscribe", "sub": "s1", "filter": {"targetName": "race"}});
    ws.send(Message::text(subscribe.to_string())).await.expect("subscribe");
    async fn recv(
        ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    ) -> serde_json::Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("a frame within 30 s")
                .expect("the socket is open")
                .expect("a frame");
            if let Message::Text(t) = m {
                return serde_json::from_str(t.as_str()).expect("JSON");
            }
        }
    }
    assert_eq!(recv(&mut ws).await["op"], "caught-up");

    // The aggregates, created through the second process.
    let mut c = sourced_client::Client::connect(addrs[1]).await.expect("connect");
    for a in 0..AGGREGATES {
        let r = c.send_json("POST", "/race", &[], &json!({"id": format!("m{a}"), "hits": []})).await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    }

    // Racers on every process; each reads the version from its own process and patches with it.
    let mut racers = JoinSet::new();
    for (p, addr) in addrs.iter().copied().enumerate() {
        for k in 0..CLIENTS_PER_PROCESS {
            racers.spawn(async move {
                let mut c = sourced_client::Client::connect(addr).await.expect("connect");
                let mut wins = Vec::new();
                for i in 0..ATTEMPTS {
                    let agg = format!("m{}", (k + i) % AGGREGATES);
                    let path = format!("/race/{agg}");
                    let etag = c.get(&path).await.unwrap().header("etag").expect("etag").to_owned();
                    let body = json!([{"op": "add", "path": "/hits/-", "value": format!("p{p}c{k}i{i}")}]).to_string();
                    let headers = [("content-type", "application/json-patch+json"), ("if-match", etag.as_str())];
                    let r = c.request("PATCH", &path, &headers, Some(body.as_bytes())).await.unwrap();
                    match r.status {
                        200 => {
                            let won: u64 = r.header("etag").unwrap().trim_matches('"').parse().unwrap();
                            let seen: u64 = etag.trim_matches('"').parse().unwrap();
                            assert_eq!(won, seen + 1, "a win moves the version by one");
                            wins.push((agg, won, p));
                        }
                        409 | 412 => {}
                        other => panic!("unexpected status {other}: {}", r.text()),
                    }
                }
                wins
            });
        }
    }
    let mut winner_of: BTreeMap<(String, u64), usize> = BTreeMap::new();
    while let Some(wins) = racers.join_next().await {
        for (agg, version, p) in wins.expect("racer") {
            assert!(winner_of.insert((agg.clone(), version), p).is_none(), "{agg} version {version} won twice");
        }
    }
    let mut total = 0;
    for a in 0..AGGREGATES {
        let agg = format!("m{a}");
        let doc = c.get(&format!("/race/{agg}")).await.unwrap().json();
        let version = doc["_meta"]["version"].as_u64().unwrap();
        let won: Vec<u64> = winner_of.keys().filter(|(g, _)| *g == agg).map(|(_, v)| *v).collect();
        assert_eq!(won, (2..=version).collect::<Vec<_>>(), "{agg}: one winner per version, contiguous");
        assert_eq!(doc["hits"].as_array().unwrap().len() as u64, version - 1);
        total += version;
    }
    assert!(winner_of.values().any(|p| *p != 0), "some wins went through the other processes");

    // The subscriber saw every event, once, in order: the same as the store's feed.
    let feed = c.get("/events?limit=1000").await.unwrap().json();
    let expected: Vec<(u64, String, u64)> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["position"].as_u64().unwrap(),
                e["targetId"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(expected.len() as u64, total);
    let mut seen = Vec::new();
    while (seen.len() as u64) < total {
        let frame = recv(&mut ws).await;
        assert_eq!(frame["op"], "event", "{frame}");
        let e = &frame["event"];
        seen.push((
            e["position"].as_u64().unwrap(),
            e["targetId"].as_str().unwrap().to_owned(),
            e["version"].as_u64().unwrap(),
        ));
    }
    assert_eq!(seen, expected, "every event once, in position order");
    assert_eq!(seen.iter().map(|e| e.0).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    ws.send(Message::text(json!({"op": "ping"}).to_string())).await.expect("ping");
    assert_eq!(recv(&mut ws).await["op"], "pong", "no event after the last one");

    for (mut child, _) in processes {
        let _ = child.kill().await;
    }
}

/// Copies the directory `from` into `to`, recursively.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The `lease` field of the runner's log lines each process wrote so far ("held", "waiting"),
/// in order; `logs` keeps everything read.
fn lease_lines(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, logs: &mut Vec<String>) -> Vec<String> {
    while let Ok(line) = rx.try_recv() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(lease) = v["fields"]["lease"].as_str()
        {
            logs.push(lease.to_owned());
        }
    }
    logs.clone()
}

/// Issue 17's multi-process test: three `sourced serve` processes on one schema with the
/// example's `payment-deadline` process (its timer shortened to 5 s). Exactly one holds the
/// runner's lease, and only it acts; kill -9 of it hands the lease to one of the others within
/// seconds, which fires the timers of the instances the first one started and starts the
/// instances of the orders submitted meanwhile: every order is cancelled exactly once, and
/// every instance took each of its steps once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_runs_the_process_manager_and_another_takes_over_after_kill_9() {
    const ORDERS: usize = 6;
    let Some(scratch) = Scratch::new().await else { return };
    let artifacts = TempDir::new().expect("tempdir");
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    copy_tree(&example, artifacts.path());
    let process = artifacts.path().join("processes/payment-deadline.yaml");
    let text = std::fs::read_to_string(&process).expect("the example's process");
    assert!(text.contains("after: 30m"), "{text}");
    std::fs::write(&process, text.replace("after: 30m", "after: 5s")).expect("write");
    let env = [
        ("EVENT_STORE_URL".to_owned(), scratch.url()),
        ("ARTIFACTS".to_owned(), artifacts.path().display().to_string()),
    ];
    let mut processes = Vec::new();
    for _ in 0..3 {
        processes.push(crate::common::spawn_sourced_logged(&env).await);
    }
    let mut logs: Vec<Vec<String>> = vec![Vec::new(); 3];
    // Exactly one holds the lease; the two others say they wait.
    let mut holder = None;
    for _ in 0..300 {
        let seen: Vec<Vec<String>> =
            processes.iter_mut().zip(logs.iter_mut()).map(|((_, _, rx), l)| lease_lines(rx, l)).collect();
        let held: Vec<usize> = (0..3).filter(|i| seen[*i].iter().any(|l| l == "held")).collect();
        let waiting = (0..3).filter(|i| seen[*i] == ["waiting"]).count();
        assert!(held.len() <= 1, "one holder at most: {seen:?}");
        if held.len() == 1 && waiting == 2 {
            holder = Some(held[0]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = holder.unwrap_or_else(|| panic!("no single holder: {logs:?}"));
    let others: Vec<usize> = (0..3).filter(|i| *i != holder).collect();

    // Orders submitted through a process that does not run it; the holder starts their instances.
    let mut c = sourced_client::Client::connect(processes[others[0]].1).await.expect("connect");
    for i in 0..ORDERS / 2 {
        submit_order(&mut c, i).await;
    }
    for i in 0..ORDERS / 2 {
        eventually_state(&mut c, &format!("/process-payment-deadline/o{i}"), "awaiting-payment").await;
    }

    // kill -9 of the holder, with its instances' timers pending; more orders meanwhile.
    let (mut dead, _, _) = processes.remove(holder);
    logs.remove(holder);
    dead.kill().await.expect("kill -9");
    for i in ORDERS / 2..ORDERS {
        submit_order(&mut c, i).await;
    }
    let mut taken = false;
    for _ in 0..300 {
        let seen: Vec<Vec<String>> =
            processes.iter_mut().zip(logs.iter_mut()).map(|((_, _, rx), l)| lease_lines(rx, l)).collect();
        let held = seen.iter().filter(|l| l.iter().any(|x| x == "held")).count();
        assert!(held <= 1, "one holder at most: {seen:?}");
        if held == 1 {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "no process took the lease over: {logs:?}");
    // The metric says the same: 1 in the new holder, 0 in the other.
    let gauge = "sourced_process_lease_held{process=\"payment-deadline\"}";
    let mut shown = Vec::new();
    for (_, addr, _) in &processes {
        let mut m = sourced_client::Client::connect(*addr).await.expect("connect");
        let text = m.get("/metrics").await.unwrap().text();
        let line = text.lines().find(|l| l.starts_with(gauge)).map(str::to_owned);
        shown.push(line.unwrap_or_else(|| panic!("no {gauge} in {text}")));
    }
    shown.sort();
    assert_eq!(shown, [format!("{gauge} 0"), format!("{gauge} 1")], "one holder");

    // Every timer fires once, through the new holder.
    for i in 0..ORDERS {
        eventually_state(&mut c, &format!("/process-payment-deadline/o{i}"), "cancelled").await;
    }
    for i in 0..ORDERS {
        let h = c.get(&format!("/order/o{i}/events")).await.unwrap().json();
        let types: Vec<&str> = h["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types.iter().filter(|t| **t == "OrderCancelled").count(), 1, "o{i} cancelled once: {types:?}");
        let h = c.get(&format!("/process-payment-deadline/o{i}/events")).await.unwrap().json();
        let steps: Vec<&str> = h["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(steps, ["ProcessStarted", "ProcessMoved", "ProcessActed"], "o{i}: each step once");
    }
    for (mut child, _, _) in processes {
        let _ = child.kill().await;
    }
}

/// Creates the order `o<i>` and submits it.
async fn submit_order(c: &mut sourced_client::Client, i: usize) {
    let lines = json!([{"sku": "tea", "qty": 1, "price": 2.0}]);
    let order = json!({"id": format!("o{i}"), "customer": "ada", "lines": lines, "total": 2.0});
    assert_eq!(c.send_json("POST", "/order", &[], &order).await.unwrap().status, 201);
    let r = c.send_json("POST", &format!("/order/o{i}/submit"), &[], &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// GETs `path` until its `state` is `state`, at most 60 s (timers of 5 s, a takeover).
async fn eventually_state(c: &mut sourced_client::Client, path: &str, state: &str) {
    let mut last = String::new();
    for _ in 0..600 {
        let r = c.get(path).await.unwrap();
        if r.status == 200 && r.json()["state"] == state {
            return;
        }
        last = format!("{} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} never reached {state}; last: {last}");
}
