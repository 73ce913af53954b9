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
