//! Time travel (SPEC §3.1, §5): documents as they were at a version or a time, history
//! ranges, diffs between versions, and snapshots under all of them.

use serde_json::{Value, json};

use sourced_core::aggregate::FOLD_VERSION;
use sourced_core::{AggregateId, StreamKey, TenantId, TypeName, Version};

use crate::common::TestApp;

fn key(id: &str) -> StreamKey {
    StreamKey {
        tenant: TenantId::parse("default").unwrap(),
        type_name: TypeName::parse("doc").unwrap(),
        id: AggregateId::parse(id).unwrap(),
    }
}

/// A document at versions 1..=10 (`n` = version), then deleted at version 11.
async fn history_of_ten(app: &TestApp) -> Vec<Value> {
    let mut docs = vec![app.post("/doc", &json!({"id": "d1", "n": 1, "tags": []})).await.ok(201).clone()];
    for v in 2..=10 {
        let patch = json!([{"op": "replace", "path": "/n", "value": v}, {"op": "add", "path": "/tags/-", "value": v}]);
        docs.push(app.patch("/doc/d1", Some(&format!("\"{}\"", v - 1)), &patch).await.ok(200).clone());
    }
    app.call("DELETE", "/doc/d1", &[], None).await.ok(200);
    docs
}

#[tokio::test]
async fn documents_at_every_version_and_time() {
    let app = TestApp::fresh_with(|c| c.snapshot_every = 3).await;
    let docs = history_of_ten(&app).await;
    // Snapshots were stored at 3, 6, 9 with the fold's version.
    let snap = app.store.load_snapshot(&key("d1"), FOLD_VERSION, None).await.unwrap().expect("a snapshot");
    assert_eq!(snap.version, Version(9));
    assert_eq!(app.store.load_snapshot(&key("d1"), FOLD_VERSION + 1, None).await.unwrap(), None);

    for (i, want) in docs.iter().enumerate() {
        let v = i + 1;
        let r = app.get(&format!("/doc/d1?version={v}")).await;
        assert_eq!(r.ok(200), want, "version {v}");
        assert_eq!(r.header("etag"), Some(format!("\"{v}\"").as_str()));
        let at = want["_meta"]["updatedAt"].as_str().unwrap();
        let r = app.get(&format!("/doc/d1?at={}", at.replace('+', "%2B"))).await;
        assert_eq!(r.ok(200)["_meta"]["updatedAt"], at, "at {at}");
    }
    // Deleted at 11: as GET says for a deleted aggregate.
    app.get("/doc/d1?version=11").await.problem(410, "deleted");
    app.get("/doc/d1").await.problem(410, "deleted");
    app.get("/doc/d1?version=12").await.problem(404, "not-found");
    app.get("/doc/d1?at=2000-01-01T00:00:00Z").await.problem(404, "not-found");
    app.get("/doc/d1?version=0").await.problem(400, "invalid-request");
    app.get("/doc/d1?at=yesterday").await.problem(400, "invalid-request");
    app.get("/doc/d1?version=1&at=2000-01-01T00:00:00Z").await.problem(400, "invalid-request");
    app.get("/doc/nope?version=1").await.problem(404, "not-found");
}

#[tokio::test]
async fn history_ranges_and_diffs() {
    let app = TestApp::fresh_with(|c| c.snapshot_every = 4).await;
    let docs = history_of_ten(&app).await;

    let r = app.get("/doc/d1/events?from=3&to=7&limit=2").await;
    let mut versions: Vec<u64> = Vec::new();
    let mut body = r.ok(200).clone();
    for _ in 0..10 {
        versions.extend(body["items"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()));
        let Some(c) = body["next"].as_str() else { break };
        body = app.get(&format!("/doc/d1/events?to=7&limit=2&cursor={c}")).await.ok(200).clone();
    }
    assert_eq!(versions, [3, 4, 5, 6, 7]);
    app.get("/doc/d1/events?from=0").await.problem(400, "invalid-request");
    app.get("/doc/nope/events?from=2").await.problem(404, "not-found");

    // The diff from 2 to 9 turns the document at 2 into the one at 9.
    let r = app.get("/doc/d1/diff?from=2&to=9").await;
    let body = r.ok(200);
    assert_eq!((body["from"].as_u64(), body["to"].as_u64()), (Some(2), Some(9)));
    let patch: json_patch::Patch = serde_json::from_value(body["patch"].clone()).unwrap();
    let strip = |d: &Value| {
        let mut d = d.clone();
        let m = d.as_object_mut().unwrap();
        m.remove("id");
        m.remove("_meta");
        d
    };
    let mut at2 = strip(&docs[1]);
    json_patch::patch(&mut at2, &patch).unwrap();
    assert_eq!(at2, strip(&docs[8]));
    // To the latest by default: deleted at 11, the document as it was left.
    let r = app.get("/doc/d1/diff?from=10").await;
    assert_eq!(r.ok(200)["to"], 11);
    assert_eq!(r.body["deleted"], json!({"from": false, "to": true}));
    assert_eq!(r.body["patch"], json!([]));
    app.get("/doc/d1/diff?from=9&to=2").await.problem(400, "invalid-request");
    app.get("/doc/d1/diff?from=2&to=40").await.problem(404, "not-found");
    app.get("/doc/d1/diff").await.problem(400, "invalid-request");
}

#[tokio::test]
async fn commands_load_from_snapshots_after_a_restart_of_the_cache() {
    // Two apps on one store: the second has a cold cache, so it loads from the snapshot.
    let app = TestApp::fresh_with(|c| c.snapshot_every = 5).await;
    app.post("/doc", &json!({"id": "d2", "n": 0})).await.ok(201);
    for v in 1..=12 {
        app.patch("/doc/d2", None, &json!([{"op": "replace", "path": "/n", "value": v}])).await.ok(200);
    }
    let snap = app.store.load_snapshot(&key("d2"), FOLD_VERSION, None).await.unwrap().expect("a snapshot");
    assert_eq!((snap.version, snap.state.clone()), (Version(10), Some(json!({"n": 9}))));
    let config = sourced_server::Config::embedded("127.0.0.1:0".parse().unwrap(), app.dir.path().join("unused.db"));
    let cold = sourced_server::app(&sourced_server::Config { snapshot_every: 5, ..config }, app.store.clone());
    let cold =
        TestApp { router: cold, store: app.store.clone(), dir: tempfile::TempDir::new().unwrap(), scratch: None };
    let r = cold.patch("/doc/d2", Some("\"13\""), &json!([{"op": "replace", "path": "/n", "value": 13}])).await;
    assert_eq!(r.ok(200)["n"], 13);
    assert_eq!(r.body["_meta"]["version"], 14);
    assert_eq!(cold.get("/doc/d2").await.ok(200), &r.body);
}
