//! Test helpers: an app over a fresh store, driven in process through the router; the store is
//! the embedded one, or with `SOURCED_TEST_BACKEND=postgres` a fresh PostgreSQL schema (for the
//! modules that build their app with [`TestApp::fresh`] or their config with [`TestBackend`]),
//! dropped at the end. `SOURCED_TEST_POSTGRES_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/test`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;

use sourced_server::Config;
use sourced_store::EventStore;

/// An app over a fresh store in a temporary directory (or a scratch PostgreSQL schema).
pub(crate) struct TestApp {
    pub(crate) router: Router,
    #[allow(dead_code)]
    pub(crate) store: Arc<dyn EventStore>,
    #[allow(dead_code)]
    pub(crate) dir: TempDir,
    /// Dropped last: the schema goes once nothing uses it.
    #[allow(dead_code)]
    pub(crate) scratch: Option<Scratch>,
}

/// A response, read whole.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: Value,
    pub(crate) raw: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem response of this status and type slug, and returns its body.
    #[track_caller]
    pub(crate) fn problem(&self, status: u16, slug: &str) -> &Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "body: {}", self.body);
        assert_eq!(self.body["type"], format!("urn:sourced:problem:{slug}"), "body: {}", self.body);
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
        &self.body
    }

    #[track_caller]
    pub(crate) fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        &self.body
    }
}

pub(crate) fn config_in(dir: &TempDir) -> Config {
    Config::embedded("127.0.0.1:0".parse().unwrap(), dir.path().join("sourced.db"))
}

impl TestApp {
    /// An app over a fresh embedded store, built synchronously.
    #[allow(dead_code)]
    pub(crate) fn new() -> Self {
        Self::with(|_| {})
    }

    #[allow(dead_code)]
    pub(crate) fn with(f: impl FnOnce(&mut Config)) -> Self {
        let dir = TempDir::new().unwrap();
        let mut config = config_in(&dir);
        f(&mut config);
        let sourced_server::StoreUrl::Sqlite(path) = &config.store else { panic!("TestApp opens the embedded store") };
        let store = sourced_server::open_sqlite_store(&config, path).unwrap();
        let router = sourced_server::app(&config, store.clone());
        TestApp { router, store, dir, scratch: None }
    }

    /// An app over the backend `SOURCED_TEST_BACKEND` chooses (see [`TestBackend`]).
    pub(crate) async fn fresh() -> Self {
        Self::fresh_with(|_| {}).await
    }

    /// [`TestApp::fresh`] with settings changed by `f`.
    pub(crate) async fn fresh_with(f: impl FnOnce(&mut Config)) -> Self {
        let backend = TestBackend::new().await;
        let mut config = backend.config();
        f(&mut config);
        let store = sourced_server::open_store(&config).await.expect("open the test store");
        let router = sourced_server::app(&config, store.clone());
        TestApp { router, store, dir: backend.dir, scratch: backend.scratch }
    }

    pub(crate) async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        let mut has_type = false;
        for (k, v) in headers {
            has_type |= k.eq_ignore_ascii_case("content-type");
            req = req.header(*k, *v);
        }
        if body.is_some() && !has_type {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let raw = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        let body = if raw.is_empty() { Value::Null } else { serde_json::from_slice(&raw).unwrap_or(Value::Null) };
        Resp { status, headers, body, raw }
    }

    pub(crate) async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, &[], None).await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Resp {
        self.call("POST", path, &[], Some(&body.to_string())).await
    }

    pub(crate) async fn patch(&self, path: &str, if_match: Option<&str>, body: &Value) -> Resp {
        let mut h = vec![("content-type", "application/json-patch+json")];
        if let Some(m) = if_match {
            h.push(("if-match", m));
        }
        self.call("PATCH", path, &h, Some(&body.to_string())).await
    }
}

/// Starts the `sourced` binary with the store at `db` on a free port, in `cwd` when given, with
/// only the environment given here; returns it and the address it logged.
pub(crate) async fn spawn_sourced(db: &std::path::Path) -> (tokio::process::Child, std::net::SocketAddr) {
    let env = [("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", db.display()))];
    spawn_sourced_with(&env, None).await
}

/// As [`spawn_sourced`], with any environment and working directory.
pub(crate) async fn spawn_sourced_with(
    env: &[(String, String)],
    cwd: Option<&std::path::Path>,
) -> (tokio::process::Child, std::net::SocketAddr) {
    let (child, addr, _log) = spawn_sourced_in(env, cwd).await;
    (child, addr)
}

/// As [`spawn_sourced_with`], also handing over every log line it writes from then on.
pub(crate) async fn spawn_sourced_logged(
    env: &[(String, String)],
) -> (tokio::process::Child, std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    spawn_sourced_in(env, None).await
}

async fn spawn_sourced_in(
    env: &[(String, String)],
    cwd: Option<&std::path::Path>,
) -> (tokio::process::Child, std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sourced"));
    cmd.env_clear().env("LISTEN", "127.0.0.1:0").env("LOG_FORMAT", "json").env("LOG_LEVEL", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the sourced binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Every line, those before the address included (the process runners log as they start).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let addr = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v["fields"]["addr"].as_str().map(|a| a.parse::<std::net::SocketAddr>().unwrap()));
            let _ = tx.send(line);
            if let Some(addr) = addr {
                return addr;
            }
        }
        panic!("sourced exited before listening");
    })
    .await
    .expect("sourced starts listening within 30 s");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    (child, addr, rx)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The PostgreSQL server the tests use.
pub(crate) fn postgres_url() -> String {
    std::env::var("SOURCED_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// Whether `SOURCED_TEST_BACKEND=postgres` asks for the API tests to run on PostgreSQL.
pub(crate) fn postgres_backend() -> bool {
    std::env::var("SOURCED_TEST_BACKEND").is_ok_and(|v| v.trim() == "postgres")
}

/// A plain connection to `url`.
pub(crate) async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(std::time::Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A scratch schema, dropped with everything in it when this is dropped.
pub(crate) struct Scratch(pub(crate) String);

impl Scratch {
    /// A new schema; `None` (after printing `SKIP: …`) when the server is not reachable, unless
    /// `SOURCED_REQUIRE_POSTGRES=1` (then it panics).
    pub(crate) async fn new() -> Option<Scratch> {
        let url = postgres_url();
        let client = match pg_connect(&url).await {
            Ok(client) => client,
            Err(e) if std::env::var("SOURCED_REQUIRE_POSTGRES").is_ok_and(|v| v.trim() == "1") => {
                panic!("PostgreSQL not reachable at {url} (SOURCED_REQUIRE_POSTGRES=1): {e}")
            }
            Err(e) => {
                eprintln!("SKIP: PostgreSQL not reachable at {url}: {e}");
                return None;
            }
        };
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let schema = format!("sourced_test_{secs}_{}", uuid::Uuid::new_v4().simple());
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.expect("create a scratch schema");
        Some(Scratch(schema))
    }

    /// The URL of a store in this schema.
    pub(crate) fn url(&self) -> String {
        let url = postgres_url();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-csearch_path%3D{}", self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // Its own thread and runtime: Drop cannot await, and may run while a test unwinds.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = pg_connect(&postgres_url()).await.map_err(std::io::Error::other)?;
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

/// Where a test's store lives: the embedded store in a temporary directory, or with
/// `SOURCED_TEST_BACKEND=postgres` a fresh PostgreSQL schema (which must be reachable then).
pub(crate) struct TestBackend {
    pub(crate) dir: TempDir,
    pub(crate) scratch: Option<Scratch>,
}

impl TestBackend {
    pub(crate) async fn new() -> TestBackend {
        let dir = TempDir::new().unwrap();
        if !postgres_backend() {
            return TestBackend { dir, scratch: None };
        }
        match Scratch::new().await {
            Some(scratch) => TestBackend { dir, scratch: Some(scratch) },
            None => panic!("SOURCED_TEST_BACKEND=postgres, but PostgreSQL at {} is not reachable", postgres_url()),
        }
    }

    /// Default settings on this backend, listening on a free loopback port.
    pub(crate) fn config(&self) -> Config {
        let mut config = config_in(&self.dir);
        if let Some(scratch) = &self.scratch {
            config.store = sourced_server::StoreUrl::Postgres(scratch.url());
        }
        config
    }
}
