//! The HTTP floor: the same routes as Sourced (`POST /{type}`, `PATCH /{type}/{id}`) answered
//! by trivial axum handlers that parse the JSON and reply with a small JSON object and an
//! ETag, with no engine and no store. What the HTTP stack alone costs on this machine.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Json, Path};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{patch, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A floor server running in the background, served like Sourced's (`axum::serve`).
pub(crate) struct FloorServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl FloorServer {
    /// Binds 127.0.0.1:0 and serves.
    pub(crate) async fn start() -> anyhow::Result<FloorServer> {
        let app = Router::new().route("/{type}", post(create)).route("/{type}/{id}", patch(update).get(read));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // TCP_NODELAY, as Sourced's own listener sets it.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(FloorServer { addr, stop, task })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// Echoes the document with a `_meta`, as Sourced answers a create.
async fn create(Path(type_name): Path<String>, Json(mut document): Json<Value>) -> impl IntoResponse {
    let id = document.get("id").and_then(Value::as_str).unwrap_or("unknown").to_owned();
    if let Some(object) = document.as_object_mut() {
        object.insert("_meta".to_owned(), json!({"version": 1, "deleted": false}));
    }
    let location = format!("/{type_name}/{id}");
    (StatusCode::CREATED, [(header::ETAG, "\"1\"".to_owned()), (header::LOCATION, location)], Json(document))
}

/// Answers a patch with a small object; the ops are parsed, not applied.
async fn update(Path((_type_name, id)): Path<(String, String)>, Json(ops): Json<Value>) -> impl IntoResponse {
    let count = ops.as_array().map_or(0, Vec::len);
    (StatusCode::OK, [(header::ETAG, "\"2\"")], Json(json!({"id": id, "ops": count, "_meta": {"version": 2}})))
}

/// Answers a read with a fixed document the size of the benchmark's (no store behind it).
async fn read(Path((_type_name, id)): Path<(String, String)>) -> impl IntoResponse {
    let document = json!({
        "id": id,
        "customer": {"id": "c1", "name": "Ada"},
        "status": "paid",
        "total": 120,
        "lines": [{"sku": "a", "qty": 1}],
        "_meta": {"version": 1, "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z", "deleted": false}
    });
    (StatusCode::OK, [(header::ETAG, "\"1\"")], Json(document))
}
