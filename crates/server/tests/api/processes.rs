//! Process managers in a running server (SPEC §4.5): the example domain's `payment-deadline`
//! started by a submitted order and completed by its payment, its instance readable like any
//! other aggregate, and closed to clients' writes. On the backend of `SOURCED_TEST_BACKEND`.
//! The timers themselves are tested with an injected clock (crates/engine/tests/engine).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use sourced_client::Client;

use crate::common::TestBackend;

/// GETs `path` until `done` holds for its 200 body (the runner works in the background),
/// at most 200 times 25 ms.
async fn eventually(c: &mut Client, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = String::new();
    for _ in 0..200 {
        let r = c.get(path).await.unwrap();
        if r.status == 200 && done(&r.json()) {
            return r.json();
        }
        last = format!("{} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never got there; last: {last}");
}

#[tokio::test]
async fn a_submitted_order_starts_an_instance_that_its_payment_completes() {
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(example));
    let server = sourced_server::start(config).await.unwrap();
    let mut c = Client::connect(server.addr()).await.unwrap();
    let order =
        json!({"id": "o1", "customer": "ada", "lines": [{"sku": "tea", "qty": 2, "price": 4.25}], "total": 8.5});
    assert_eq!(c.send_json("POST", "/order", &[], &order).await.unwrap().status, 201);
    assert_eq!(c.send_json("POST", "/order/o1/submit", &[], &json!({})).await.unwrap().status, 200);
    let path = "/process-payment-deadline/o1";
    let inst = eventually(&mut c, path, |d| d["state"] == "awaiting-payment").await;
    assert_eq!(inst["status"], "running");
    assert!(inst["data"]["submittedAt"].as_str().unwrap().ends_with('Z'), "{inst}");
    assert_eq!(inst["timers"].as_array().unwrap().len(), 1, "the 30m timer: {inst}");
    // A client cannot move an instance.
    let patch = json!([{"op": "replace", "path": "/state", "value": "paid"}]);
    let r = c.send_json("PATCH", path, &[("content-type", "application/json-patch+json")], &patch).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("holds process instances"), "{}", r.text());
    assert_eq!(c.send_json("POST", "/order/o1/pay", &[], &json!({"amount": 8.5})).await.unwrap().status, 200);
    let inst = eventually(&mut c, path, |d| d["status"] == "completed").await;
    assert_eq!((inst["state"].clone(), inst["data"]["paidAmount"].clone()), (json!("paid"), json!(8.5)));
    assert_eq!(inst["timers"], json!([]), "the timer is dropped");
    // The steps are events of the instance's stream.
    let h = c.get(&format!("{path}/events")).await.unwrap().json();
    let types: Vec<&str> = h["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ProcessStarted", "ProcessMoved"]);
    // The process API: the instance with its steps, and the process with its counts.
    let r = c.get("/processes/payment-deadline/o1").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let inst = r.json();
    assert_eq!((inst["state"].clone(), inst["status"].clone()), (json!("paid"), json!("completed")));
    let steps: Vec<&str> = inst["history"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(steps, ["ProcessStarted", "ProcessMoved"]);
    assert_eq!(inst["_meta"]["version"], 2);
    let list = c.get("/processes").await.unwrap().json();
    let p = &list["items"][0];
    assert_eq!(
        (p["name"].clone(), p["instanceType"].clone()),
        (json!("payment-deadline"), json!("process-payment-deadline"))
    );
    assert_eq!((p["running"].clone(), p["completed"].clone(), p["parked"].clone()), (json!(0), json!(1), json!(0)));
    assert!(p["checkpoint"].as_u64().is_some(), "{list}");
    // Errors are problems.
    for (path, status) in [
        ("/processes/no-such/o1", 404),
        ("/processes/payment-deadline/o2", 404),
        ("/processes/payment-deadline/o1?x=1", 400),
        ("/processes?limit=1", 400),
    ] {
        let r = c.get(path).await.unwrap();
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{path}");
    }
    server.shutdown().await;
}

/// Tenant isolation (issue 16): an instance lives in the tenant of the event that started it;
/// the same order id in two tenants starts two instances, and neither tenant sees the other's.
#[tokio::test]
async fn process_instances_are_kept_to_their_tenant() {
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(example));
    let server = sourced_server::start(config).await.unwrap();
    let mut c = Client::connect(server.addr()).await.unwrap();
    let order =
        json!({"id": "o1", "customer": "ada", "lines": [{"sku": "tea", "qty": 2, "price": 4.25}], "total": 8.5});
    for tenant in ["acme", "beta"] {
        let h = [("x-tenant", tenant)];
        assert_eq!(c.send_json("POST", "/order", &h, &order).await.unwrap().status, 201);
    }
    // Only acme submits: only acme has an instance.
    let acme = [("x-tenant", "acme")];
    let beta = [("x-tenant", "beta")];
    assert_eq!(c.send_json("POST", "/order/o1/submit", &acme, &json!({})).await.unwrap().status, 200);
    let mut found = false;
    for _ in 0..200 {
        let r = c.send_json("GET", "/processes/payment-deadline/o1", &acme, &Value::Null).await.unwrap();
        if r.status == 200 {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(found, "acme's instance starts");
    for path in ["/processes/payment-deadline/o1", "/process-payment-deadline/o1"] {
        let r = c.send_json("GET", path, &beta, &Value::Null).await.unwrap();
        assert_eq!(r.status, 404, "beta must not see acme's instance at {path}: {}", r.text());
    }
    let counts = |v: Value| (v["items"][0]["running"].clone(), v["items"][0]["completed"].clone());
    let r = c.send_json("GET", "/processes", &beta, &Value::Null).await.unwrap();
    assert_eq!(counts(r.json()), (json!(0), json!(0)), "beta's counts");
    let r = c.send_json("GET", "/processes", &acme, &Value::Null).await.unwrap();
    assert_eq!(counts(r.json()), (json!(1), json!(0)), "acme's counts");
    // beta's payment of its own o1 does not complete acme's instance.
    assert_eq!(c.send_json("POST", "/order/o1/submit", &beta, &json!({})).await.unwrap().status, 200);
    assert_eq!(c.send_json("POST", "/order/o1/pay", &beta, &json!({"amount": 8.5})).await.unwrap().status, 200);
    let mut beta_done = false;
    for _ in 0..200 {
        let r = c.send_json("GET", "/processes/payment-deadline/o1", &beta, &Value::Null).await.unwrap();
        if r.status == 200 && r.json()["status"] == "completed" {
            beta_done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(beta_done, "beta's own instance starts and completes");
    let r = c.send_json("GET", "/processes/payment-deadline/o1", &acme, &Value::Null).await.unwrap();
    assert_eq!(r.json()["status"], "running", "acme's instance is untouched: {}", r.text());
    server.shutdown().await;
}
