//! The HTTP API of SPEC §3.1, request by request.

use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn create_get_patch_delete_walkthrough() {
    let app = TestApp::fresh().await;
    let r = app.post("/order", &json!({"id": "o1", "total": 10, "lines": []})).await;
    let doc = r.ok(201);
    assert_eq!(r.header("location"), Some("/order/o1"));
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(doc["id"], "o1");
    assert_eq!(doc["total"], 10);
    assert_eq!(doc["_meta"]["version"], 1);
    assert_eq!(doc["_meta"]["deleted"], false);
    assert!(doc["_meta"]["createdAt"].as_str().unwrap().ends_with('Z'));

    let g = app.get("/order/o1").await;
    assert_eq!(g.ok(200), doc);
    assert_eq!(g.header("etag"), Some("\"1\""));

    // 304 when the client has the current version.
    let nm = app.call("GET", "/order/o1", &[("if-none-match", "\"1\"")], None).await;
    assert_eq!(nm.status, 304);
    assert!(nm.raw.is_empty());

    let p =
        app.patch("/order/o1", Some("\"1\""), &json!([{"op": "add", "path": "/lines/-", "value": {"sku": "a"}}])).await;
    assert_eq!(p.ok(200)["lines"], json!([{"sku": "a"}]));
    assert_eq!(p.header("etag"), Some("\"2\""));

    // A stale If-Match is 412 with the current version.
    let stale = app.patch("/order/o1", Some("\"1\""), &json!([{"op": "replace", "path": "/total", "value": 1}])).await;
    assert_eq!(stale.problem(412, "precondition-failed")["currentVersion"], 2);

    let d = app.call("DELETE", "/order/o1", &[("if-match", "\"2\"")], None).await;
    assert_eq!(d.ok(200)["_meta"]["deleted"], true);
    assert_eq!(d.header("etag"), Some("\"3\""));
    assert_eq!(app.get("/order/o1").await.problem(410, "deleted")["currentVersion"], 3);
    app.patch("/order/o1", None, &json!([{"op": "add", "path": "/x", "value": 1}])).await.problem(410, "deleted");
    app.call("DELETE", "/order/o1", &[], None).await.problem(410, "deleted");

    // The history stays readable after the delete.
    let h = app.get("/order/o1/events").await;
    let types: Vec<_> =
        h.ok(200)["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(types, ["created", "patched", "deleted"]);
    assert_eq!(h.body["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn events_have_the_wire_shape() {
    let app = TestApp::fresh().await;
    app.call("POST", "/order", &[("x-tenant", "acme")], Some(r#"{"id":"o1","a":1}"#)).await.ok(201);
    let h = app.call("GET", "/order/o1/events", &[("x-tenant", "acme")], None).await;
    let e = &h.ok(200)["items"][0];
    let mut keys: Vec<_> = e.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["data", "id", "metadata", "position", "targetId", "targetName", "tenant", "timestamp", "type", "version"]
    );
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["version"], 1);
    assert_eq!(e["data"], json!({"a": 1}));
    assert_eq!(e["metadata"]["commandName"], "aggregate-modification");
    assert!(e["metadata"]["commandId"].is_string());
}

#[tokio::test]
async fn generated_ids_and_conflicts() {
    let app = TestApp::fresh().await;
    let r = app.post("/order", &json!({"total": 1})).await;
    let id = r.ok(201)["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID");
    assert_eq!(r.header("location").unwrap(), format!("/order/{id}"));
    app.post("/order", &json!({"id": id, "total": 1})).await.problem(409, "already-exists");
}

#[tokio::test]
async fn tenants_are_isolated() {
    let app = TestApp::fresh().await;
    app.call("POST", "/order", &[("x-tenant", "t1")], Some(r#"{"id":"o1"}"#)).await.ok(201);
    app.call("GET", "/order/o1", &[("x-tenant", "t2")], None).await.problem(404, "not-found");
    app.get("/order/o1").await.problem(404, "not-found");
    assert_eq!(app.call("GET", "/events", &[("x-tenant", "t2")], None).await.ok(200)["items"], json!([]));
    // The same id in another tenant is another aggregate.
    app.call("POST", "/order", &[("x-tenant", "t2")], Some(r#"{"id":"o1"}"#)).await.ok(201);
    app.call("GET", "/order/o1", &[("x-tenant", "bad tenant")], None).await.problem(400, "invalid-request");
}

#[tokio::test]
async fn put_creates_replaces_and_honours_preconditions() {
    let app = TestApp::fresh().await;
    let put = |body: &str, h: Vec<(&'static str, &'static str)>| {
        let body = body.to_owned();
        let app = &app;
        async move { app.call("PUT", "/doc/d1", &h, Some(&body)).await }
    };
    let r = put(r#"{"a":1}"#, vec![("if-none-match", "*")]).await;
    r.ok(201);
    assert_eq!(r.header("location"), Some("/doc/d1"));
    put(r#"{"a":2}"#, vec![("if-none-match", "*")]).await.problem(412, "precondition-failed");
    let r = put(r#"{"a":2,"b":[1]}"#, vec![("if-match", "\"1\"")]).await;
    assert_eq!(r.ok(200)["b"], json!([1]));
    put(r#"{"a":2,"b":[1]}"#, vec![]).await.problem(422, "no-op");
    put(r#"{"id":"other"}"#, vec![]).await.problem(422, "protected-field");
    put(r#"{"_meta":{}}"#, vec![]).await.problem(422, "protected-field");
    // The event of a replace is the diff as a JSON Patch.
    let h = app.get("/doc/d1/events").await;
    assert_eq!(h.ok(200)["items"][1]["type"], "patched");
    assert!(h.body["items"][1]["data"].is_array());
}

#[tokio::test]
async fn merge_patch_and_media_types() {
    let app = TestApp::fresh().await;
    app.post("/doc", &json!({"id": "d1", "a": 1, "b": {"c": 1}})).await.ok(201);
    let r = app
        .call(
            "PATCH",
            "/doc/d1",
            &[("content-type", "application/merge-patch+json")],
            Some(r#"{"a":null,"b":{"d":2}}"#),
        )
        .await;
    assert_eq!(r.ok(200)["b"], json!({"c": 1, "d": 2}));
    assert!(r.body.get("a").is_none());
    let h = app.get("/doc/d1/events").await;
    assert!(h.body["items"][1]["data"].is_array(), "stored as RFC 6902");
    app.call("PATCH", "/doc/d1", &[("content-type", "text/plain")], Some("[]"))
        .await
        .problem(415, "unsupported-media-type");
    app.call("POST", "/doc", &[("content-type", "application/xml")], Some("<a/>"))
        .await
        .problem(415, "unsupported-media-type");
    app.call("POST", "/doc", &[], Some("{not json")).await.problem(400, "invalid-json");
    app.call("PATCH", "/doc/d1", &[("content-type", "application/json-patch+json")], Some(r#"{"a":1}"#))
        .await
        .problem(400, "invalid-command");
}

#[tokio::test]
async fn validation_errors_list_every_violation_with_pointers() {
    let app = TestApp::fresh().await;
    app.post("/doc", &json!({"id": "d1", "a": 1})).await.ok(201);
    let r = app
        .patch("/doc/d1", None, &json!([{"op": "add", "path": "/id", "value": 1}, {"op": "remove", "path": "/_meta"}]))
        .await;
    let v = r.problem(422, "protected-field")["violations"].as_array().unwrap().clone();
    let pointers: Vec<_> = v.iter().map(|v| v["pointer"].as_str().unwrap()).collect();
    assert_eq!(pointers, ["/body/0/path", "/body/1/path"]);

    let r = app.patch("/doc/d1", None, &json!([{"op": "add"}, {"op": "fly", "path": "/x"}])).await;
    assert_eq!(r.problem(400, "invalid-command")["violations"].as_array().unwrap().len(), 2);

    let r = app.patch("/doc/d1", None, &json!([{"op": "remove", "path": "/nope"}])).await;
    assert_eq!(r.problem(422, "patch-failed")["operation"], 0);
    app.patch("/doc/d1", None, &json!([{"op": "replace", "path": "/a", "value": 1}])).await.problem(422, "no-op");
    // Nothing was stored by any refused command.
    assert_eq!(app.get("/doc/d1").await.body["_meta"]["version"], 1);
}

#[tokio::test]
async fn commands_endpoint_takes_raw_envelopes() {
    let app = TestApp::fresh().await;
    let r = app
        .post(
            "/commands",
            &json!({"type": "create", "targetName": "order", "targetId": "o1", "body": {"n": 1}, "context": {"correlationId": "c-1"}}),
        )
        .await;
    let res = r.ok(200);
    assert_eq!(res["targetName"], "order");
    assert_eq!(res["version"], 1);
    assert_eq!(res["events"][0]["metadata"]["correlationId"], "c-1");
    assert_eq!(res["warnings"], json!([]));
    // A client-given version that does not match is 409 (not 412: no HTTP precondition).
    let r = app
        .post("/commands", &json!({"type": "patch", "targetName": "order", "targetId": "o1", "version": 5, "body": [{"op": "add", "path": "/m", "value": 1}]}))
        .await;
    assert_eq!(r.problem(409, "version-conflict")["currentVersion"], 1);
    let r = app.post("/commands", &json!({"type": "nope", "targetName": "Order", "extra": 1})).await;
    assert_eq!(r.problem(400, "invalid-command")["violations"].as_array().unwrap().len(), 3);
    // exists / no_stream
    app.post("/commands", &json!({"type": "delete", "targetName": "order", "targetId": "o1", "version": "exists"}))
        .await
        .ok(200);
    app.post(
        "/commands",
        &json!({"type": "create", "targetName": "order", "targetId": "o2", "version": "no_stream", "body": {}}),
    )
    .await
    .ok(200);
    app.post("/commands", &json!({"type": "delete", "targetName": "order", "targetId": "o1", "version": "exists"}))
        .await
        .problem(409, "version-conflict");
    // Tenant named by the header is fixed; an envelope naming another is refused.
    app.call(
        "POST",
        "/commands",
        &[("x-tenant", "a")],
        Some(r#"{"type":"create","tenant":"b","targetName":"order","body":{}}"#),
    )
    .await
    .problem(400, "invalid-command");
    app.post(
        "/commands",
        &json!({"type": "logic", "name": "ship", "targetName": "order", "targetId": "o2", "body": {}}),
    )
    .await
    .problem(422, "unknown-command");
}

#[tokio::test]
async fn lists_page_with_cursors() {
    let app = TestApp::fresh().await;
    for i in 0..7 {
        app.post("/item", &json!({"id": format!("i{i}"), "n": i})).await.ok(201);
    }
    app.call("DELETE", "/item/i3", &[], None).await.ok(200);
    let mut seen = Vec::new();
    let mut path = "/item?limit=2".to_owned();
    for _ in 0..10 {
        let r = app.get(&path).await;
        for d in r.ok(200)["items"].as_array().unwrap() {
            seen.push(d["id"].as_str().unwrap().to_owned());
        }
        match r.body["next"].as_str() {
            Some(c) => path = format!("/item?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["i0", "i1", "i2", "i4", "i5", "i6"]);
    let all = app.get("/item?includeDeleted=true&limit=100").await;
    assert_eq!(all.ok(200)["items"].as_array().unwrap().len(), 7);
    app.get("/item?limit=0").await.problem(400, "invalid-request");
    app.get("/item?limit=100000").await.problem(400, "invalid-request");
    app.get("/item?color[near]=red").await.problem(400, "invalid-request");
    app.get("/item?cursor=garbage").await.problem(400, "invalid-request");
    // A cursor from another listing is refused.
    let feed_cursor = app.get("/events?limit=1").await.body["next"].as_str().unwrap().to_owned();
    app.get(&format!("/item?cursor={feed_cursor}")).await.problem(400, "invalid-request");
}

#[tokio::test]
async fn history_pages_and_unknown_aggregates() {
    let app = TestApp::fresh().await;
    app.post("/doc", &json!({"id": "d1", "n": 0})).await.ok(201);
    for i in 1..5 {
        app.patch("/doc/d1", None, &json!([{"op": "replace", "path": "/n", "value": i}])).await.ok(200);
    }
    let r = app.get("/doc/d1/events?limit=3").await;
    let versions: Vec<_> =
        r.ok(200)["items"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [1, 2, 3]);
    let next = r.body["next"].as_str().unwrap();
    let r = app.get(&format!("/doc/d1/events?limit=3&cursor={next}")).await;
    let versions: Vec<_> =
        r.ok(200)["items"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [4, 5]);
    assert!(r.body["next"].is_null());
    app.get("/doc/nope/events").await.problem(404, "not-found");
    app.get("/doc/nope").await.problem(404, "not-found");
}

#[tokio::test]
async fn global_feed_is_ordered_and_resumable() {
    let app = TestApp::fresh().await;
    for i in 0..5 {
        app.post("/a", &json!({"id": format!("x{i}")})).await.ok(201);
        app.post("/b", &json!({"id": format!("y{i}")})).await.ok(201);
    }
    let mut positions = Vec::new();
    let mut path = "/events?limit=3".to_owned();
    for _ in 0..10 {
        let r = app.get(&path).await;
        let items = r.ok(200)["items"].as_array().unwrap().clone();
        positions.extend(items.iter().map(|e| e["position"].as_u64().unwrap()));
        let next = r.body["next"].as_str().unwrap().to_owned();
        if items.is_empty() {
            break;
        }
        path = format!("/events?limit=3&cursor={next}");
    }
    assert_eq!(positions, (1..=10).collect::<Vec<u64>>());
    let r = app.get("/events?after=8").await;
    assert_eq!(r.ok(200)["items"].as_array().unwrap().len(), 2);
    app.get("/events?after=-1").await.problem(400, "invalid-request");
    // The live feed (SSE) checks its parameters before it starts streaming (see sse.rs).
    let sse = [("accept", "text/event-stream")];
    app.call("GET", "/events?after=x", &sse, None).await.problem(400, "invalid-request");
    app.call("GET", "/events?limit=3", &sse, None).await.problem(400, "invalid-request");
}

#[tokio::test]
async fn limits_answer_with_clear_problems() {
    let app = TestApp::fresh_with(|c| {
        c.http.body_bytes_max = 200;
        c.limits.patch_ops_max = 3;
        c.limits.json_depth_max = 5;
        c.limits.document_bytes_max = 100;
    })
    .await;
    let big = format!(r#"{{"id":"d1","s":"{}"}}"#, "x".repeat(300));
    app.call("POST", "/doc", &[], Some(&big)).await.problem(413, "body-too-large");
    app.post("/doc", &json!({"id": "d1"})).await.ok(201);
    let ops = json!([{"op": "add", "path": "/a", "value": 1}, {"op": "add", "path": "/b", "value": 1}, {"op": "add", "path": "/c", "value": 1}, {"op": "add", "path": "/d", "value": 1}]);
    app.patch("/doc/d1", None, &ops).await.problem(422, "too-many-operations");
    let deep = json!([{"op": "add", "path": "/a", "value": {"b": {"c": {"d": {"e": {"f": 1}}}}}}]);
    app.patch("/doc/d1", None, &deep).await.problem(422, "too-deep");
    let grow = json!([{"op": "add", "path": "/s", "value": "y".repeat(120)}]);
    app.patch("/doc/d1", None, &grow).await.problem(413, "document-too-large");
    // A nesting far past serde's own recursion limit gets the same answer as one just past the
    // limit (faithful.rs tests it on every path).
    let bomb = format!("{}{}", "[".repeat(100), "]".repeat(100));
    app.call("POST", "/commands", &[], Some(&bomb)).await.problem(422, "too-deep");
}

#[tokio::test]
async fn routes_methods_and_reserved_names() {
    let app = TestApp::fresh().await;
    app.get("/healthz").await.ok(200);
    assert_eq!(app.get("/readyz").await.ok(200)["status"], "ready");
    // A reserved name: the metrics, not a type.
    assert_eq!(app.get("/metrics").await.status, 200);
    app.call("POST", "/metrics", &[], Some("{}")).await.problem(405, "method-not-allowed");
    app.get("/Order").await.problem(400, "invalid-request");
    app.get("/order/bad%20id").await.problem(400, "invalid-request");
    app.get("/a/b/c/d").await.problem(404, "not-found");
    app.call("DELETE", "/order", &[], None).await.problem(405, "method-not-allowed");
    app.call("POST", "/order/o1/ship", &[], Some("{}")).await.problem(422, "unknown-command");
}

#[tokio::test]
async fn prefer_minimal_and_require_version() {
    let app = TestApp::fresh_with(|c| c.require_version = true).await;
    let r = app.call("POST", "/doc", &[("prefer", "return=minimal")], Some(r#"{"id":"d1"}"#)).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(r.header("location"), Some("/doc/d1"));
    app.patch("/doc/d1", None, &json!([{"op": "add", "path": "/a", "value": 1}]))
        .await
        .problem(428, "precondition-required");
    app.patch("/doc/d1", Some("\"1\""), &json!([{"op": "add", "path": "/a", "value": 1}])).await.ok(200);
    // If-Match compares strongly: a weak tag never matches (RFC 9110 §13.1.1).
    app.patch("/doc/d1", Some("W/\"2\""), &json!([{"op": "add", "path": "/b", "value": 1}]))
        .await
        .problem(412, "precondition-failed");
    app.patch("/doc/d1", Some("three"), &json!([{"op": "add", "path": "/c", "value": 1}]))
        .await
        .problem(400, "invalid-request");
}
