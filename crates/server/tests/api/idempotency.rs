//! Idempotency (SPEC §2.4): a retried command returns the stored reply without new events,
//! also after a restart; the same key with other content is refused.

use serde_json::json;

use crate::common::{TestApp, TestBackend};

#[tokio::test]
async fn retries_return_the_same_reply() {
    let app = TestApp::fresh().await;
    let h = [("idempotency-key", "key-1")];
    let first = app.call("POST", "/order", &h, Some(r#"{"id":"o1","n":1}"#)).await;
    first.ok(201);
    let again = app.call("POST", "/order", &h, Some(r#"{"n":1,"id":"o1"}"#)).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // Other content under the same key is refused, naming the key as the client sent it (on
    // every path that takes the header), not the command id derived from it.
    let reused = [
        ("POST", "/order", r#"{"id":"o1","n":2}"#),
        ("PUT", "/order/o1", r#"{"n":2}"#),
        ("POST", "/commands", r#"{"type":"create","targetName":"order","targetId":"o1","body":{"n":2}}"#),
    ];
    for (method, path, body) in reused {
        let r = app.call(method, path, &h, Some(body)).await;
        let p = r.problem(422, "idempotency-key-reused");
        assert_eq!(p["idempotencyKey"], "key-1", "{method} {path}: {p}");
        let detail = p["detail"].as_str().unwrap();
        let derived = sourced_core::CommandId::from_idempotency_key("key-1").to_string();
        assert!(detail.contains("\"key-1\"") && !detail.contains(&derived), "{method} {path}: {detail}");
    }

    // A patch retried after later writes still answers with the state it produced.
    let ph = [("idempotency-key", "key-2"), ("content-type", "application/json-patch+json")];
    let patch = r#"[{"op":"replace","path":"/n","value":2}]"#;
    let p1 = app.call("PATCH", "/order/o1", &ph, Some(patch)).await;
    assert_eq!(p1.ok(200)["n"], 2);
    app.patch("/order/o1", None, &json!([{"op": "replace", "path": "/n", "value": 3}])).await.ok(200);
    let p2 = app.call("PATCH", "/order/o1", &ph, Some(patch)).await;
    assert_eq!(p2.body, p1.body);
    assert_eq!(app.get("/order/o1/events").await.body["items"].as_array().unwrap().len(), 3);

    // The envelope id is the key on /commands.
    let env =
        json!({"id": "0190a0b0-0000-7000-8000-000000000001", "type": "create", "targetName": "order", "body": {}});
    let c1 = app.post("/commands", &env).await;
    let c2 = app.post("/commands", &env).await;
    assert_eq!(c1.ok(200), c2.ok(200));
    assert_eq!(c2.header("idempotent-replayed"), Some("true"));

    // Prefer: return=minimal on /commands is 204 with the headers only, first time and on a retry.
    let env = r#"{"id":"0190a0b0-0000-7000-8000-000000000002","type":"create","targetName":"order","body":{}}"#;
    for replayed in [None, Some("true")] {
        let r = app.call("POST", "/commands", &[("prefer", "return=minimal")], Some(env)).await;
        assert_eq!(r.status, 204, "{}", r.body);
        assert!(r.raw.is_empty(), "{:?}", r.raw);
        assert_eq!(r.header("etag"), Some("\"1\""));
        assert_eq!(r.header("idempotent-replayed"), replayed);
    }
}

#[tokio::test]
async fn retries_survive_a_restart() {
    let backend = TestBackend::new().await;
    let config = backend.config();
    let env = json!({"id": "0190a0b0-0000-7000-8000-000000000002", "type": "create", "targetName": "order", "targetId": "o9", "body": {"n": 1}});
    let first = {
        let server = sourced_server::start(config.clone()).await.unwrap();
        let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
        let r = c.send_json("POST", "/commands", &[], &env).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        server.shutdown().await;
        r.json()
    };
    let server = sourced_server::start(config).await.unwrap();
    let mut c = sourced_client::Client::connect(server.addr()).await.unwrap();
    let r = c.send_json("POST", "/commands", &[], &env).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(r.json(), first);
    let h = c.get("/order/o9/events").await.unwrap();
    assert_eq!(h.json()["items"].as_array().unwrap().len(), 1);
    server.shutdown().await;
}
