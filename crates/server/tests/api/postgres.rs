//! The service on PostgreSQL when the database goes away and comes back: `/readyz` and
//! commands answer 503 meanwhile, and the same process recovers by itself. A TCP proxy in
//! front of the shared server plays the outage; the server itself is never touched.
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

use crate::common::{TestApp, config_in};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn server_config() -> tokio_postgres::Config {
    let url = std::env::var("SOURCED_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    url.parse().expect("SOURCED_TEST_POSTGRES_URL parses")
}

/// A scratch schema, dropped with everything in it when this is dropped.
struct Scratch(String);

impl Scratch {
    async fn new() -> Option<Scratch> {
        let client = match connect().await {
            Ok(client) => client,
            Err(e) if std::env::var("SOURCED_REQUIRE_POSTGRES").is_ok_and(|v| v.trim() == "1") => {
                panic!("PostgreSQL not reachable (SOURCED_REQUIRE_POSTGRES=1): {e}")
            }
            Err(e) => {
                eprintln!("SKIP: PostgreSQL not reachable at {:?}: {e}", server_config().get_hosts());
                return None;
            }
        };
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let schema = format!("sourced_test_{secs}_{}", uuid::Uuid::new_v4().simple());
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.expect("create a scratch schema");
        Some(Scratch(schema))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schema = self.0.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = connect().await.map_err(std::io::Error::other)?;
                client
                    .batch_execute(&format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .map_err(std::io::Error::other)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: the scratch schema {} was not dropped: {dropped:?}", self.0);
        }
    }
}

async fn connect() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = server_config();
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
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
    let app = TestApp { router: sourced_server::app(&config, store.clone()), store, dir };

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
