//! Test helpers: an app over a fresh embedded store, driven in process through the router.

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

/// An app over a fresh store in a temporary directory.
pub(crate) struct TestApp {
    pub(crate) router: Router,
    #[allow(dead_code)]
    pub(crate) store: Arc<dyn EventStore>,
    #[allow(dead_code)]
    pub(crate) dir: TempDir,
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
    pub(crate) fn new() -> Self {
        Self::with(|_| {})
    }

    pub(crate) fn with(f: impl FnOnce(&mut Config)) -> Self {
        let dir = TempDir::new().unwrap();
        let mut config = config_in(&dir);
        f(&mut config);
        let sourced_server::StoreUrl::Sqlite(path) = &config.store else { panic!("TestApp opens the embedded store") };
        let store = sourced_server::open_sqlite_store(&config, path).unwrap();
        let router = sourced_server::app(&config, store.clone());
        TestApp { router, store, dir }
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
    let addr = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                return addr.parse::<std::net::SocketAddr>().unwrap();
            }
        }
        panic!("sourced exited before listening");
    })
    .await
    .expect("sourced starts listening within 30 s");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}
