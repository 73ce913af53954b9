//! `sourced export` / `sourced import` (SPEC §3.3) through the binary: a round trip SQLite →
//! NDJSON → PostgreSQL → NDJSON → SQLite gives byte-identical exports and identical read
//! models; an import refuses a non-empty store and input that does not continue the history.

use std::path::Path;
use std::process::Stdio;

use serde_json::{Value, json};
use tempfile::TempDir;

use sourced_core::{TenantId, TypeName};
use sourced_server::StoreUrl;
use sourced_store::{DocumentRow, EventStore, ListQuery};

use crate::common::{Scratch, TestApp, config_in};

/// Runs `sourced ARGS` on the store at `url` with `stdin`; returns (success, stdout, stderr).
async fn sourced(url: &str, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
    sourced_with(url, args, stdin, &[]).await
}

/// [`sourced`] with more environment variables.
async fn sourced_with(url: &str, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> (bool, Vec<u8>, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("EVENT_STORE_URL", url)
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the sourced binary starts");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sourced ends within 60 s")
        .unwrap();
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A history with every kind of event, two tenants, and a few commands of several events.
async fn write_history(app: &TestApp) {
    for i in 0..5 {
        app.post("/order", &json!({"id": format!("o{i}"), "total": i, "lines": []})).await.ok(201);
    }
    app.patch("/order/o1", Some("\"1\""), &json!([{"op": "add", "path": "/lines/-", "value": {"sku": "tea"}}]))
        .await
        .ok(200);
    let merge = [("content-type", "application/merge-patch+json")];
    app.call("PATCH", "/order/o2", &merge, Some(r#"{"total":9,"note":"x"}"#)).await.ok(200);
    app.call("PUT", "/order/o3", &[], Some(r#"{"z":1,"a":{"b":[1,2]}}"#)).await.ok(200);
    app.call("DELETE", "/order/o4", &[], None).await.ok(200);
    let other = [("x-tenant", "acme")];
    app.call("POST", "/invoice", &other, Some(r#"{"id":"i1","n":1.50}"#)).await.ok(201);
    app.call("POST", "/order", &[("idempotency-key", "0190a0b0-0000-7000-8000-00000000000a")], Some(r#"{"id":"k"}"#))
        .await
        .ok(201);
    app.call("PATCH", "/invoice/i1", &[("x-tenant", "acme"), ("content-type", "application/json")], Some(r#"{"n":2}"#))
        .await
        .ok(200);
    app.patch("/order/o1", None, &json!([{"op": "replace", "path": "/total", "value": 100}])).await.ok(200);
}

/// Every read-model row of the types in `export`, per tenant, deleted included.
async fn documents(store: &dyn EventStore, export: &[u8]) -> Vec<DocumentRow> {
    let mut kinds: Vec<(String, String)> = Vec::new();
    for line in export.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let e: Value = serde_json::from_slice(line).unwrap();
        let kind = (e["tenant"].as_str().unwrap().to_owned(), e["targetName"].as_str().unwrap().to_owned());
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let mut rows = Vec::new();
    for (tenant, type_name) in kinds {
        let query = ListQuery {
            include_deleted: true,
            ..ListQuery::new(TenantId::parse(&tenant).unwrap(), TypeName::parse(&type_name).unwrap(), 1_000)
        };
        rows.extend(store.list_documents(&query).await.unwrap());
    }
    rows
}

async fn open(url: &str, dir: &TempDir) -> std::sync::Arc<dyn EventStore> {
    let mut config = config_in(dir);
    config.store = sourced_server::config::parse_store_url(url).unwrap();
    sourced_server::open_store(&config).await.unwrap()
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_through_postgres_reproduces_the_store() {
    let Some(scratch) = Scratch::new().await else { return };
    let dir = TempDir::new().unwrap();
    let source = dir.path().join("source.db");
    {
        let mut config = config_in(&dir);
        config.store = StoreUrl::Sqlite(source.clone());
        let store = sourced_server::open_sqlite_store(&config, &source).unwrap();
        let app = TestApp {
            router: sourced_server::app(&config, store.clone()),
            store,
            dir: TempDir::new().unwrap(),
            scratch: None,
        };
        write_history(&app).await;
        app.store.close().await;
    }
    let file = dir.path().join("a.ndjson");
    let (ok, _, err) = sourced(&sqlite_url(&source), &["export", "--output", file.to_str().unwrap()], None).await;
    assert!(ok, "{err}");
    let a = std::fs::read(&file).unwrap();
    assert_eq!(a.iter().filter(|b| **b == b'\n').count(), 13, "one line per event");

    let pg = scratch.url();
    let (ok, _, err) = sourced(&pg, &["import", "--input", file.to_str().unwrap()], None).await;
    assert!(ok, "{err}");
    let (ok, b, err) = sourced(&pg, &["export"], None).await;
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(b.clone()).unwrap(), String::from_utf8(a.clone()).unwrap(), "SQLite → PostgreSQL");

    let target = dir.path().join("target.db");
    let (ok, _, err) = sourced_with(&sqlite_url(&target), &["import"], Some(&b), &[("SNAPSHOT_EVERY", "2")]).await;
    assert!(ok, "{err}");
    let (ok, c, err) = sourced(&sqlite_url(&target), &["export"], None).await;
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(c).unwrap(), String::from_utf8(a.clone()).unwrap(), "PostgreSQL → SQLite");

    // The read models agree, timestamps included.
    let stores =
        [open(&sqlite_url(&source), &dir).await, open(&pg, &dir).await, open(&sqlite_url(&target), &dir).await];
    let docs = documents(stores[0].as_ref(), &a).await;
    assert_eq!(docs.len(), 7);
    for store in &stores[1..] {
        assert_eq!(documents(store.as_ref(), &a).await, docs);
    }
    // The import wrote snapshots as live appends do (o1 has three events; every 2: version 2).
    let o1 = sourced_core::StreamKey {
        tenant: TenantId::default_tenant(),
        type_name: TypeName::parse("order").unwrap(),
        id: sourced_core::AggregateId::parse("o1").unwrap(),
    };
    let fold = sourced_core::aggregate::FOLD_VERSION;
    let snapshot = stores[2].load_snapshot(&o1, fold, None).await.unwrap().expect("a snapshot of o1");
    assert_eq!(snapshot.version, sourced_core::Version(2));
    assert_eq!(stores[1].load_snapshot(&o1, fold, None).await.unwrap(), None, "every 100 by default");
    for store in stores {
        store.close().await;
    }

    // A store that holds events is refused, and left as it was.
    let (ok, _, err) = sourced(&pg, &["import"], Some(&a)).await;
    assert!(!ok && err.contains("already holds events"), "{err}");
    let (_, again, _) = sourced(&pg, &["export"], None).await;
    assert_eq!(again, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_stops_at_input_that_does_not_continue_the_history() {
    let dir = TempDir::new().unwrap();
    let line = |position: u64, id: &str, version: u64, command: &str| {
        json!({"id": uuid::Uuid::new_v4(), "position": position, "tenant": "default", "targetName": "order",
               "targetId": id, "version": version, "type": "created", "data": {"n": 1},
               "metadata": {"commandId": command}, "timestamp": "2026-11-27T08:46:09.615008Z"})
        .to_string()
    };
    let c1 = "0190a0b0-0000-7000-8000-000000000001";
    let c2 = "0190a0b0-0000-7000-8000-000000000002";
    let cases = [
        (format!("{}\n{}\n", line(1, "a", 1, c1), line(3, "b", 1, c2)), "line 2: position 3 where 2 was due"),
        (format!("{}\n{}\n", line(1, "a", 1, c1), line(2, "a", 3, c2)), "line 2: default/order/a"),
        (format!("{}\nnot json\n", line(1, "a", 1, c1)), "line 2: not an exported event"),
        (line(1, "a", 1, "nope"), "line 1: metadata.commandId"),
    ];
    for (i, (input, message)) in cases.iter().enumerate() {
        let db = dir.path().join(format!("bad{i}.db"));
        let (ok, _, err) = sourced(&sqlite_url(&db), &["import"], Some(input.as_bytes())).await;
        assert!(!ok && err.contains(message), "case {i}: {err}");
    }
    // A missing input file creates no store.
    let db = dir.path().join("none.db");
    let missing = dir.path().join("missing.ndjson");
    let (ok, _, err) = sourced(&sqlite_url(&db), &["import", "--input", missing.to_str().unwrap()], None).await;
    assert!(!ok && err.contains("cannot open"), "{err}");
    assert!(!db.exists());
}

/// Progress (issue 18): off a terminal, export, import and rebuild write nothing to stderr but
/// their one-line summary; on one (a pseudo-terminal made by `script`), a bar with the rate and
/// the time left, cleared before the summary.
#[tokio::test]
async fn long_commands_show_a_bar_on_a_terminal_and_only_a_summary_off_one() {
    let dir = TempDir::new().unwrap();
    let source = dir.path().join("source.db");
    let app = TestApp::with(|c| c.store = sourced_server::config::StoreUrl::Sqlite(source.clone()));
    write_history(&app).await;
    drop(app);
    let file = dir.path().join("export.ndjson");
    let target = dir.path().join("target.db");
    let steps: [(&Path, Vec<&str>, &str); 3] = [
        (&source, vec!["export", "--output", file.to_str().unwrap()], "sourced export: 13 events in "),
        (&target, vec!["import", "--input", file.to_str().unwrap()], "sourced import: 13 events of "),
        (&target, vec!["rebuild"], "sourced rebuild: 7 streams, 13 events, "),
    ];
    for (db, args, summary) in &steps {
        let (ok, _, err) = sourced(&sqlite_url(db), args, None).await;
        assert!(ok, "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: only the summary off a terminal: {err:?}");
        assert!(lines[0].starts_with(summary), "{args:?}: {err:?}");
    }
    // On a terminal: `script` gives the command a pseudo-terminal (util-linux).
    let has_script = std::process::Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("skipped the terminal half: no `script` (util-linux)");
        return;
    }
    let again = dir.path().join("again.ndjson");
    let line = format!(
        "EVENT_STORE_URL={} LOG_LEVEL=warn {} export --output {}",
        sqlite_url(&source),
        env!("CARGO_BIN_EXE_sourced"),
        again.display()
    );
    let out = tokio::process::Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("events, ") && shown.contains(" left"), "a bar with rate and time left: {shown:?}");
    assert!(shown.contains("\u{1b}[2K"), "the bar is cleared: {shown:?}");
    assert!(shown.contains("sourced export: 13 events in "), "{shown:?}");
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&file).unwrap());
}
