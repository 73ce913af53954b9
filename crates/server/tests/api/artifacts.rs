//! The example order domain (examples/order) through the HTTP API: schema, custom commands,
//! rules and the lifecycle (SPEC §4), `sourced check`, and start-up refusing a broken set.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use crate::common::TestApp;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order")
}

fn order_app() -> TestApp {
    let set = sourced_server::artifacts::load_dir(&example()).expect("the example set is valid");
    TestApp::with(|c| c.artifact_set = Arc::new(set))
}

#[tokio::test]
async fn the_order_domain_end_to_end() {
    let app = order_app();
    // The schema holds on create; a new order starts as a draft.
    app.post("/order", &json!({"id": "o1", "customer": ""})).await.problem(422, "invalid-document");
    let r = app.post("/order", &json!({"id": "o1", "customer": "ada", "lines": [], "total": 0})).await;
    assert_eq!(r.ok(201)["status"], "draft");
    // Submitting an empty order fails its precondition.
    let r = app.call("POST", "/order/o1/submit", &[], Some("{}")).await;
    assert_eq!(
        r.problem(422, "command-precondition-failed")["violations"][0]["message"],
        "an order needs at least one line to be submitted"
    );
    // Rules see the next state: a total without lines is refused, naming the rule.
    let r = app.patch("/order/o1", None, &json!([{"op": "replace", "path": "/total", "value": 5}])).await;
    assert_eq!(r.problem(422, "rule-violation")["violations"][0]["rule"], "total-needs-lines");
    app.patch(
        "/order/o1",
        None,
        &json!([{"op": "add", "path": "/lines/-", "value": {"sku": "tea", "qty": 2, "price": 4.25}}, {"op": "replace", "path": "/total", "value": 8.5}]),
    )
    .await
    .ok(200);
    // A patch may not move the status: the lifecycle lists what submit would allow.
    let r = app.patch("/order/o1", None, &json!([{"op": "replace", "path": "/status", "value": "paid"}])).await;
    assert_eq!(r.problem(422, "illegal-transition")["allowed"], json!([]));
    let r = app.call("POST", "/order/o1/submit", &[("if-match", "\"2\"")], Some("{}")).await;
    let doc = r.ok(200);
    assert_eq!(doc["status"], "submitted");
    assert!(doc["submittedAt"].as_str().unwrap().ends_with('Z'));
    // Paying: payload schema, then the amount rule, then success.
    app.call("POST", "/order/o1/pay", &[], Some(r#"{"amount": "lots"}"#)).await.problem(422, "invalid-payload");
    let r = app.call("POST", "/order/o1/pay", &[], Some(r#"{"amount": 3}"#)).await;
    assert_eq!(r.problem(422, "rule-violation")["violations"][0]["rule"], "pay-the-full-total");
    app.call("POST", "/order/o1/pay", &[], Some(r#"{"amount": 8.5}"#)).await.ok(200);
    // Cancel is not a transition from paid; ship is.
    let r = app.call("POST", "/order/o1/cancel", &[], Some("{}")).await;
    assert_eq!(r.problem(422, "illegal-transition")["from"], "paid");
    let r = app.call("POST", "/order/o1/ship", &[], Some(r#"{"trackingNumber": "Z1"}"#)).await;
    assert_eq!(r.ok(200)["status"], "shipped");
    // The history holds the domain events with their patches.
    let h = app.get("/order/o1/events").await;
    let types: Vec<_> =
        h.body["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(types, ["created", "patched", "OrderSubmitted", "OrderPaid", "OrderShipped"]);
    assert!(h.body["items"][2]["data"].is_array());
    // Unknown commands are refused.
    app.call("POST", "/order/o1/teleport", &[], Some("{}")).await.problem(422, "unknown-command");
}

#[tokio::test]
async fn warnings_are_replied_and_replayed() {
    let app = order_app();
    let env = json!({
        "id": "0190a0b0-0000-7000-8000-00000000000a",
        "type": "create", "targetName": "order", "targetId": "big",
        "body": {"customer": "bo", "lines": [{"sku": "gold", "qty": 1, "price": 20000}], "total": 20000}
    });
    let first = app.post("/commands", &env).await;
    assert_eq!(
        first.ok(200)["warnings"],
        json!([{"rule": "large-orders-are-reviewed", "message": "orders above 10000 are reviewed by hand"}])
    );
    let again = app.post("/commands", &env).await;
    assert_eq!(again.ok(200), &first.body);
}

#[tokio::test]
async fn schemas_are_served() {
    let app = order_app();
    let r = app.get("/schemas/order.json").await;
    assert_eq!(r.ok(200)["title"], "order");
    assert_eq!(r.header("content-type"), Some("application/schema+json"));
    assert_eq!(app.get("/schemas/command.json").await.ok(200)["required"], json!(["type", "targetName"]));
    app.get("/schemas/nothing.json").await.problem(404, "not-found");
}

#[test]
fn check_prints_every_problem() {
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_sourced")).arg("check").arg(example()).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let dir = tempfile::TempDir::new().unwrap();
    let t = dir.path().join("types/order");
    std::fs::create_dir_all(t.join("commands")).unwrap();
    std::fs::write(t.join("schema.json"), r#"{"type": "nonsense"}"#).unwrap();
    std::fs::write(
        t.join("lifecycle.yaml"),
        "field: /s\ninitial: a\nstates: [a]\ntransitions:\n  - {from: a, to: b}\n",
    )
    .unwrap();
    std::fs::write(
        t.join("commands/go.yaml"),
        "emit:\n  - event: Went\n    patch: [{op: add, path: /x, expr: 'state.'}]\n",
    )
    .unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sourced")).arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8(bad.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    // `file:line:column: message` where the line is known (the YAML files: the deepest node a
    // pointer reaches written as a block; here the flow items holding the problem).
    let root = dir.path().display();
    assert!(lines[0].starts_with(&format!("{root}/types/order/commands/go.yaml:3:5: CEL syntax error")), "{out}");
    assert!(lines[0].ends_with("(at /emit/0/patch/0/expr)"), "{out}");
    assert!(lines[1].starts_with(&format!("{root}/types/order/lifecycle.yaml:5:3: state 'b' is not defined")), "{out}");
    assert!(lines[2].starts_with(&format!("{root}/types/order/schema.json at /type: invalid JSON Schema")), "{out}");
    // A syntax error has its line and column from the parser.
    std::fs::write(t.join("lifecycle.yaml"), "field: /s\ninitial: [a\n").unwrap();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sourced")).arg("check").arg(dir.path()).output().unwrap();
    let out = String::from_utf8(bad.stdout).unwrap();
    let syntax = out.lines().find(|l| l.contains("lifecycle.yaml")).unwrap_or_default();
    let prefix = format!("{root}/types/order/lifecycle.yaml:");
    let position: Vec<&str> = syntax.strip_prefix(&prefix).unwrap_or_default().splitn(3, ':').collect();
    assert!(position.len() == 3 && position[0].parse::<u32>().is_ok() && position[1].parse::<u32>().is_ok(), "{out}");
    // The server refuses to start on the same set, listing the problems.
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .env_clear()
        .env("ARTIFACTS", dir.path())
        .env("LISTEN", "127.0.0.1:0")
        .env("EVENT_STORE_URL", format!("sqlite://{}", dir.path().join("x.db").display()))
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let err = String::from_utf8(serve.stderr).unwrap();
    assert!(err.contains("3 problem(s)") && err.contains("ARTIFACTS"), "{err}");
}

/// SPEC §8.3: an expression whose estimated cost on the actual input is over `EXPR_COST_MAX`
/// is refused with a 422 problem before it runs; on a small input it runs.
#[tokio::test]
async fn costly_expressions_are_refused_with_a_clear_422() {
    let dir = tempfile::TempDir::new().unwrap();
    let t = dir.path().join("types/grid/commands");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("pair.yaml"),
        "creates: true\nemit:\n  - event: Paired\n    patch:\n      - {op: add, path: /pairs, expr: 'command.body.xs.map(a, command.body.xs.filter(b, b > a).size())'}\n",
    )
    .unwrap();
    let set = sourced_server::artifacts::load_dir(dir.path()).expect("the set is valid");
    let app = TestApp::with(|c| c.artifact_set = Arc::new(set));
    let small: Vec<u64> = (0..10).collect();
    let r = app.post("/grid/g1/pair", &json!({"xs": small})).await;
    assert_eq!(r.ok(200)["pairs"][0], 9);
    let big: Vec<u64> = (0..3000).collect();
    let r = app.post("/grid/g2/pair", &json!({"xs": big})).await;
    let p = r.problem(422, "expression-too-costly");
    assert_eq!(p["limit"], 1_000_000);
    assert!(p["actual"].as_u64().unwrap() > 9_000_000, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("EXPR_COST_MAX"), "{p}");
    app.get("/grid/g2").await.problem(404, "not-found");

    // EXPR_NODES_MAX applies at load: start-up fails naming it.
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .env_clear()
        .env("ARTIFACTS", dir.path())
        .env("EXPR_NODES_MAX", "5")
        .env("LISTEN", "127.0.0.1:0")
        .env("EVENT_STORE_URL", format!("sqlite://{}", dir.path().join("x.db").display()))
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let err = String::from_utf8(serve.stderr).unwrap();
    assert!(
        err.contains("types/grid/commands/pair.yaml at /emit/0/patch/0/expr") && err.contains("EXPR_NODES_MAX"),
        "{err}"
    );
}

/// The indexes an artifact set declares (`types/<type>/indexes.yaml`) are created at start,
/// beside those of `INDEXES`.
#[tokio::test]
async fn declared_indexes_are_created_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sourced.db");
    let mut config = sourced_server::Config::embedded("127.0.0.1:0".parse().unwrap(), db.clone());
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(example()));
    config.indexes = vec![sourced_core::query::FieldPath::parse("total").unwrap()];
    let server = sourced_server::start(config).await.unwrap();
    server.shutdown().await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt =
        conn.prepare("SELECT sql FROM sqlite_master WHERE type = 'index' AND name LIKE 'documents_f%'").unwrap();
    let mut ddl: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    ddl.sort();
    assert_eq!(ddl.len(), 3, "status and customer (examples/order/types/order/indexes.yaml), total (INDEXES): {ddl:?}");
    for field in ["customer", "status", "total"] {
        assert!(ddl.iter().any(|d| d.contains(&format!("'$.\"{field}\"'"))), "{field}: {ddl:?}");
    }
}

/// A write that passes with a `warn` rule's warning shows it on every write path: the
/// `Sourced-Warnings` header (a JSON array, as `POST /commands` shows `warnings` in its body).
#[tokio::test]
async fn warnings_show_on_every_write_path() {
    let app = order_app();
    let big = r#"{"customer":"ada","lines":[{"sku":"gold","qty":1,"price":20000}],"total":20000}"#;
    let small = r#"{"customer":"ada","lines":[{"sku":"tea","qty":1,"price":5}],"total":5}"#;
    let raise =
        r#"[{"op":"replace","path":"/lines/0/price","value":30000},{"op":"replace","path":"/total","value":30000}]"#;
    let lower = r#"[{"op":"replace","path":"/lines/0/price","value":1},{"op":"replace","path":"/total","value":1}]"#;
    let json_patch = ("content-type", "application/json-patch+json");
    let minimal = ("prefer", "return=minimal");
    let command = format!(r#"{{"type":"create","targetName":"order","targetId":"c1","body":{big}}}"#);
    // (case, a document put first, method, path, headers, body, status, whether it warns)
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str, &'a str, Vec<(&'a str, &'a str)>, String, u16, bool);
    let cases: Vec<Case> = vec![
        ("create", None, "POST", "/order", vec![], format!(r#"{{"id":"w1",{}"#, &big[1..]), 201, true),
        ("create, minimal", None, "POST", "/order", vec![minimal], format!(r#"{{"id":"w2",{}"#, &big[1..]), 204, true),
        ("create, no warning", None, "POST", "/order", vec![], format!(r#"{{"id":"w3",{}"#, &small[1..]), 201, false),
        ("put creates", None, "PUT", "/order/w4", vec![], big.to_owned(), 201, true),
        (
            "put replaces",
            Some(("/order/w5", small)),
            "PUT",
            "/order/w5",
            vec![],
            big.replacen('{', r#"{"status":"draft","#, 1),
            200,
            true,
        ),
        ("patch", Some(("/order/w6", small)), "PATCH", "/order/w6", vec![json_patch], raise.to_owned(), 200, true),
        (
            "patch, no warning",
            Some(("/order/w7", big)),
            "PATCH",
            "/order/w7",
            vec![json_patch],
            lower.to_owned(),
            200,
            false,
        ),
        ("custom command", Some(("/order/w8", big)), "POST", "/order/w8/submit", vec![], "{}".to_owned(), 200, true),
        ("POST /commands", None, "POST", "/commands", vec![], command, 200, true),
    ];
    for (case, setup, method, path, headers, body, status, warns) in cases {
        if let Some((at, doc)) = setup {
            app.call("PUT", at, &[], Some(doc)).await;
        }
        let r = app.call(method, path, &headers, Some(&body)).await;
        assert_eq!(r.status, status, "{case}: {}", r.body);
        let header = r.header("sourced-warnings");
        if !warns {
            assert_eq!(header, None, "{case}");
            continue;
        }
        let warnings: serde_json::Value = serde_json::from_str(header.expect(case)).expect(case);
        assert_eq!(warnings[0]["rule"], "large-orders-are-reviewed", "{case}: {warnings}");
        assert_eq!(warnings[0]["message"], "orders above 10000 are reviewed by hand", "{case}");
        if path == "/commands" {
            assert_eq!(r.body["warnings"], warnings, "{case}: the header says what the body says");
        }
    }
}

/// Custom commands take the preconditions of every other write (RFC 9110 §13.1): (headers,
/// status); each failure leaves the order at version 1.
#[tokio::test]
async fn custom_commands_honour_preconditions() {
    let app = order_app();
    let order = r#"{"id":"o1","customer":"ada","lines":[{"sku":"tea","qty":1,"price":5}],"total":5}"#;
    app.call("POST", "/order", &[], Some(order)).await.ok(201);
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("if-match", "W/\"1\"")], 412),
        (&[("if-match", "\"2\"")], 412),
        (&[("if-none-match", "*")], 412),
        (&[("if-none-match", "W/\"1\"")], 412),
        (&[("if-match", "1")], 400),
        (&[("if-match", "\"x\", \"1\"")], 200),
    ];
    for (headers, status) in cases {
        let r = app.call("POST", "/order/o1/submit", headers, Some("{}")).await;
        assert_eq!(r.status, *status, "{headers:?}: {}", r.body);
        if *status != 200 {
            assert_eq!(app.get("/order/o1").await.header("etag"), Some("\"1\""), "{headers:?}");
        }
    }
}
