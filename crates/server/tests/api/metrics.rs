//! `GET /metrics` (SPEC §9, issue 18) against the binary: parsed with a real parser (Python's
//! `prometheus_client`, installed by .ci/run), and the counters move with the commands sent.
//! With authentication on it needs the `admin` action.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;
use sourced_client::Client;

use crate::common::spawn_sourced_with;

/// `name{labels}` → value, from the text format (the checks of the format itself are the
/// Python parser's).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(s: &BTreeMap<String, f64>, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

async fn scrape(c: &mut Client) -> String {
    let r = c.get("/metrics").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    r.text()
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = {f.name: f.type for f in text_string_to_metric_families(sys.stdin.read())}
print(json.dumps(families))
"#;

/// Parses `text` with prometheus_client; `None` (skip) when that Python lacks it, unless
/// `SOURCED_REQUIRE_PYTHON=1`.
fn parsed_by_prometheus_client(text: &str) -> Option<serde_json::Value> {
    use std::io::Write;
    let python = std::env::var("SOURCED_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let has = std::process::Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        assert!(
            std::env::var("SOURCED_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "{python} cannot import prometheus_client (SOURCED_REQUIRE_PYTHON=1; .ci/run installs it)"
        );
        eprintln!("skipped the parser check: {python} has no prometheus_client");
        return None;
    }
    let mut child = std::process::Command::new(&python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test]
async fn metrics_parse_and_move_with_the_commands_sent() {
    let dir = tempfile::tempdir().unwrap();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    let env = [
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", dir.path().join("m.db").display())),
        ("ARTIFACTS".to_owned(), example.display().to_string()),
    ];
    let (_child, addr) = spawn_sourced_with(&env, None).await;
    let mut c = Client::connect(addr).await.unwrap();
    let before = samples(&scrape(&mut c).await);

    for i in 0..3 {
        let body = json!({"id": format!("o{i}"), "customer": "ada", "lines": [], "total": 0});
        assert_eq!(c.send_json("POST", "/order", &[], &body).await.unwrap().status, 201);
    }
    // A stale If-Match (a conflict), a command the set does not define, a malformed body.
    let stale = c.send_json("PATCH", "/order/o0", &[("if-match", "\"7\"")], &json!([])).await.unwrap();
    assert_eq!(stale.status, 412);
    let unknown = c.send_json("POST", "/order/o0/teleport", &[], &json!({})).await.unwrap();
    assert!(unknown.status >= 400);
    let _ = c.get("/order/o1").await.unwrap();
    let _ = c.get("/no/such/route/at/all").await.unwrap();

    let text = scrape(&mut c).await;
    let after = samples(&text);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(r#"sourced_commands_total{type="order",name="create",outcome="ok"}"#), 3.0, "{text}");
    assert_eq!(delta(r#"sourced_commands_total{type="order",name="patch",outcome="conflict"}"#), 1.0, "{text}");
    assert_eq!(delta(r#"sourced_command_seconds_count{type="order",outcome="ok"}"#), 3.0, "{text}");
    assert_eq!(delta(r#"sourced_http_requests_total{route="/{type}",method="POST",status="201"}"#), 3.0, "{text}");
    assert_eq!(delta(r#"sourced_http_requests_total{route="/{type}/{id}",method="GET",status="200"}"#), 1.0, "{text}");
    assert!(delta(r#"sourced_http_requests_total{route="unmatched",method="GET",status="404"}"#) >= 1.0, "{text}");
    assert!(delta(r#"sourced_store_batch_appends_sum{backend="sqlite"}"#) >= 3.0, "{text}");
    assert!(delta(r#"sourced_store_commit_seconds_count{backend="sqlite"}"#) >= 1.0, "{text}");
    assert!(value(&after, "sourced_store_head_position") >= 3.0, "{text}");
    // Labels are bounded: no document id, no unknown command name, no raw path.
    for series in after.keys() {
        assert!(!series.contains("\"o1\"") && !series.contains("teleport") && !series.contains("/no/such"), "{series}");
    }
    if let Some(families) = parsed_by_prometheus_client(&text) {
        assert_eq!(families["sourced_commands"], "counter", "{families}");
        assert_eq!(families["sourced_command_seconds"], "histogram", "{families}");
        assert_eq!(families["sourced_live_connections"], "gauge", "{families}");
    }
}

#[tokio::test]
async fn metrics_need_the_admin_action_with_authentication_on() {
    let gate = crate::auth::gate();
    let t = crate::common::TestApp::fresh_with(move |c| {
        c.gate = gate;
        c.artifact_set = std::sync::Arc::new(crate::auth::artifacts());
    })
    .await;
    t.call("GET", "/metrics", &[], None).await.problem(401, "credential-missing");
    let clerk = format!("Bearer {}", crate::auth::key_of("clerk"));
    t.call("GET", "/metrics", &[("authorization", clerk.as_str())], None).await.problem(403, "forbidden");
    let ops = format!("Bearer {}", crate::auth::key_of("ops"));
    let r = t.call("GET", "/metrics", &[("authorization", ops.as_str())], None).await;
    assert_eq!(r.status, 200);
}

/// `X-Request-Id` (SPEC §9): taken or made, returned, and in every log line of the request
/// with the command id (JSON lines: the `request` span).
#[tokio::test]
async fn request_ids_are_returned_and_in_the_log_lines_of_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", dir.path().join("r.db").display())),
        ("LOG_LEVEL".to_owned(), "debug".to_owned()),
    ];
    let (_child, addr, mut log) = crate::common::spawn_sourced_logged(&env).await;
    let mut c = Client::connect(addr).await.unwrap();
    let sent =
        c.send_json("POST", "/order", &[("x-request-id", "trace-42.a:b_c")], &json!({"id": "r1"})).await.unwrap();
    assert_eq!(sent.status, 201);
    assert_eq!(sent.header("x-request-id"), Some("trace-42.a:b_c"));
    // Without one, or with one that is too long or odd, the server makes one.
    let made = c.get("/order/r1").await.unwrap();
    let made_id = made.header("x-request-id").unwrap().to_owned();
    assert_eq!(made_id.len(), 36, "a UUID: {made_id}");
    let odd = c.send_json("GET", "/order/r1", &[("x-request-id", "a b\tc")], &json!(null)).await;
    let odd_id = odd.map(|r| r.header("x-request-id").map(str::to_owned)).ok().flatten();
    assert!(odd_id.is_some_and(|id| id.len() == 36), "an odd id is replaced");
    let long = "x".repeat(200);
    let r = c.get("/healthz").await.unwrap();
    assert!(r.header("x-request-id").is_some());
    let r = c.send_json("GET", "/order/r1", &[("x-request-id", long.as_str())], &json!(null)).await.unwrap();
    assert_ne!(r.header("x-request-id"), Some(long.as_str()));

    // Every line logged inside the first request carries its id and its command's id.
    let mut lines_of_request = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while lines_of_request.is_empty() || tokio::time::Instant::now() < deadline {
        let Ok(Some(line)) = tokio::time::timeout_at(deadline, log.recv()).await else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if v["span"]["request_id"] == "trace-42.a:b_c" {
            lines_of_request.push(v);
        }
        if lines_of_request.len() >= 2 {
            break;
        }
    }
    assert!(!lines_of_request.is_empty(), "no log line of the request with its id");
    let finished = lines_of_request
        .iter()
        .find(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains("finished")))
        .unwrap_or(&lines_of_request[0]);
    assert!(finished["span"]["command_id"].as_str().is_some_and(|id| id.len() == 36), "{finished}");
    assert_eq!(finished["span"]["path"], "/order", "{finished}");
}
