//! The Socket.IO endpoint (`/socket.io/`) driven by the real `socket.io-client` from npm: a
//! Node script (`tests/socketio/client.mjs`) emits `commands` and prints what comes back on
//! `events`; this test starts the server on loopback, runs it, and checks the replies and the
//! store. Without Node.js or the npm package installed (`npm ci --prefix
//! crates/server/tests/socketio`) the test prints `SKIP:` and passes, unless
//! `SOURCED_REQUIRE_NODE=1` (set by .ci/run), which makes a missing Node.js a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::config_in;

/// Longest run of the Node script (its own deadline is 20 s).
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `script` with `args` in `dir` and returns its stdout and its `{"step", …}` lines by
/// step; fails unless it exits 0 with `done` as its last line.
pub(crate) async fn run_node(dir: &std::path::Path, script: &str, args: &[&str]) -> (String, HashMap<String, Value>) {
    let run = tokio::process::Command::new("node").arg(script).args(args).current_dir(dir).kill_on_drop(true).output();
    let out = tokio::time::timeout(NODE_TIMEOUT, run).await.expect("the Node client finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert_eq!(stdout.lines().last(), Some("done"), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let steps = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    (stdout, steps)
}

/// The script's directory, when Node.js and the npm package are there; `None` means skip.
pub(crate) async fn node_client_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
    let required = std::env::var("SOURCED_REQUIRE_NODE").is_ok_and(|v| v == "1");
    let node = tokio::process::Command::new("node").arg("--version").output().await;
    let missing = match node {
        Err(e) => Some(format!("node is not runnable ({e})")),
        Ok(o) if !o.status.success() => Some("`node --version` failed".to_owned()),
        Ok(_) if !dir.join("node_modules/socket.io-client/package.json").is_file() => Some(format!(
            "socket.io-client is not installed; run `npm ci --prefix {}`",
            dir.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .map_or(dir.clone(), |d| PathBuf::from("crates/server").join(d))
                .display()
        )),
        Ok(_) => None,
    };
    match missing {
        None => Some(dir),
        Some(why) if required => panic!("SOURCED_REQUIRE_NODE=1 but {why}"),
        Some(why) => {
            eprintln!("SKIP: the Socket.IO test needs Node.js and socket.io-client: {why}");
            None
        }
    }
}

fn uuid(n: u64) -> String {
    format!("0190a0b0-0000-7000-8000-{n:012x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_client_sends_commands_and_receives_outcomes() {
    let Some(script_dir) = node_client_dir().await else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let server = sourced_server::start(config_in(&dir)).await.unwrap();
    let port = server.addr().port().to_string();
    let (stdout, steps) = run_node(&script_dir, "client.mjs", &[&port]).await;
    let reply = |step: &str| steps.get(step).unwrap_or_else(|| panic!("no step {step}: {stdout}"))["reply"].clone();

    // The command result, as POST /commands answers it.
    let create = reply("create");
    assert_eq!(create["id"], uuid(1), "{create}");
    assert_eq!((create["targetName"].as_str(), create["targetId"].as_str()), (Some("order"), Some("sio1")));
    assert_eq!(create["version"], 1);
    assert_eq!(create["events"][0]["type"], "created");
    assert_eq!(create["events"][0]["data"], json!({"customer": "ada", "total": 0}));
    assert_eq!(create["warnings"], json!([]));
    assert!(create.get("replayed").is_none() && create.get("error").is_none(), "{create}");
    // The WebSocket's `op` belongs to its frames, not to this reply.
    assert!(create.get("op").is_none(), "{create}");
    assert_eq!(reply("patch")["version"], 2);

    // A conflicting patch: `{"id", "error": problem}`, the same problem as over HTTP.
    let conflict = reply("conflict");
    assert_eq!(conflict["id"], uuid(3), "{conflict}");
    assert_eq!(conflict["error"]["status"], 409, "{conflict}");
    assert_eq!(conflict["error"]["type"], "urn:sourced:problem:version-conflict", "{conflict}");
    assert_eq!(conflict["error"]["currentVersion"], 2, "{conflict}");

    // An invalid envelope names its violations; no command id was found.
    let invalid = reply("invalid");
    assert_eq!(invalid["id"], Value::Null, "{invalid}");
    assert_eq!(invalid["error"]["status"], 400, "{invalid}");
    assert!(invalid["error"]["violations"].as_array().is_some_and(|v| !v.is_empty()), "{invalid}");

    // An envelope sent as a JSON string is accepted too.
    assert_eq!(reply("string")["targetId"], "sio2");
    assert_eq!(reply("string")["version"], 1);

    // The retry of the create, on another connection (WebSocket only): the original result.
    let retry = reply("retry");
    assert_eq!(retry["replayed"], true, "{retry}");
    let mut original = retry.clone();
    original.as_object_mut().unwrap().remove("replayed");
    assert_eq!(original, create);
    assert_eq!(steps["retry"]["transport"], "websocket", "the first connection upgraded from polling");

    // The handshake's X-Tenant fixes the tenant, as on /ws.
    let tenant = reply("tenant");
    assert_eq!(tenant["error"]["status"], 400, "{tenant}");
    assert!(tenant["error"]["violations"].to_string().contains("/tenant"), "{tenant}");

    // The store holds exactly what the replies said.
    let mut http = sourced_client::Client::connect(server.addr()).await.unwrap();
    let doc = http.request("GET", "/order/sio1", &[], None).await.unwrap().json();
    assert_eq!((doc["total"].clone(), doc["_meta"]["version"].clone()), (json!(8), json!(2)), "{doc}");
    let feed = http.request("GET", "/events", &[], None).await.unwrap().json();
    assert_eq!(feed["items"].as_array().unwrap().len(), 3, "create, patch, the string's create: {feed}");
    server.shutdown().await;
}

/// With authentication on: a Socket.IO client without a credential gets a 401 problem and is
/// disconnected; one that sends its token in the CONNECT packet's `auth` may send commands.
#[tokio::test]
async fn socket_io_takes_the_token_of_the_connect_packet() {
    let Some(script_dir) = node_client_dir().await else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.gate = crate::auth::gate();
    config.artifact_set = std::sync::Arc::new(crate::auth::artifacts());
    let server = sourced_server::start(config).await.unwrap();
    let port = server.addr().port().to_string();
    let (stdout, steps) = run_node(&script_dir, "auth.mjs", &[&port, crate::auth::key_of("clerk")]).await;
    assert_eq!(steps["anonymous"]["reply"]["error"]["type"], "urn:sourced:problem:credential-missing", "{stdout}");
    assert_eq!(steps["create"]["reply"]["version"], 1, "{stdout}");
    server.shutdown().await;
}
