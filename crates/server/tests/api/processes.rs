//! Process managers in a running server (SPEC §4.5): the example domain's `payment-deadline`
//! started by a submitted order and completed by its payment, its instance readable like any
//! other aggregate, and closed to clients' writes. On the backend of `SOURCED_TEST_BACKEND`.
//! The timers themselves are tested with an injected clock (crates/engine/tests/engine).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use sourced_client::Client;

use crate::common::TestBackend;

/// How long a test waits for the runner: `PATIENCE_TRIES` × 25 ms (60 s), bounded.
const PATIENCE_TRIES: usize = 2_400;

/// GETs `path` until `done` holds for its 200 body (the runner works in the background), every
/// 25 ms for at most 60 s (`PATIENCE_TRIES`): on a loaded CI machine, with every test of the binary running
/// at once on PostgreSQL, a runner's first round (its lease's connection, its first read) has
/// been seen to take over 5 s.
async fn eventually(c: &mut Client, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = String::new();
    for _ in 0..PATIENCE_TRIES {
        let r = c.get(path).await.unwrap();
        if r.status == 200 && done(&r.json()) {
            return r.json();
        }
        last = format!("{} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} never got there; last: {last}");
}

/// Waits (bounded) until `process` shows a checkpoint. Since the checkpoint is taken when the
/// set loads (before the first request), this holds at once; the tests keep the wait so that
/// their writes never depend on when the runner's first round comes.
async fn runner_started(c: &mut Client, process: &str) {
    eventually(c, "/processes", |d| {
        d["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|p| p["name"] == process && p["checkpoint"].as_u64().is_some()))
    })
    .await;
}

#[tokio::test]
async fn a_submitted_order_starts_an_instance_that_its_payment_completes() {
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(example));
    let server = sourced_server::start(config).await.unwrap();
    let mut c = Client::connect(server.addr()).await.unwrap();
    runner_started(&mut c, "payment-deadline").await;
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
    runner_started(&mut c, "payment-deadline").await;
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
    for _ in 0..PATIENCE_TRIES {
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
    for _ in 0..PATIENCE_TRIES {
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

/// `poison`: a paid order's instance submits the order `x-<key>`, which does not exist until a
/// test creates it, so the step is refused and the instance parks (in its final state).
const POISON: &str = "start: {type: order, event: OrderSubmitted, key: event.targetId, state: waiting}
follow:
  - {type: order, event: OrderPaid, key: event.targetId}
states: [waiting, done]
final: [done]
transitions:
  - from: waiting
    on: OrderPaid
    to: done
    do:
      - command: {target: order, id: \"'x-' + key\", name: submit, body: \"{}\"}
";

/// The example's order type with the `poison` process (and no other), in `dir`.
fn poison_set(dir: &std::path::Path) -> PathBuf {
    let set = dir.join("set");
    let types = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order/types/order");
    let to = set.join("types/order");
    std::fs::create_dir_all(to.join("commands")).unwrap();
    for entry in std::fs::read_dir(&types).unwrap().chain(std::fs::read_dir(types.join("commands")).unwrap()) {
        let path = entry.unwrap().path();
        if path.is_file() {
            let rel = path.strip_prefix(&types).unwrap();
            std::fs::copy(&path, to.join(rel)).unwrap();
        }
    }
    std::fs::create_dir_all(set.join("processes")).unwrap();
    std::fs::write(set.join("processes/poison.yaml"), POISON).unwrap();
    set
}

async fn order(c: &mut Client, id: &str, then: &[&str]) {
    let body = json!({"id": id, "customer": "ada", "lines": [{"sku": "tea", "qty": 1, "price": 2.0}], "total": 2.0});
    let r = c.send_json("POST", "/order", &[], &body).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    for command in then {
        let body = if *command == "pay" { json!({"amount": 2.0}) } else { json!({}) };
        let r = c.send_json("POST", &format!("/order/{id}/{command}"), &[], &body).await.unwrap();
        assert_eq!(r.status, 200, "{command} {id}: {}", r.text());
    }
}

async fn step(c: &mut Client, key: &str, action: &str) -> sourced_client::Response {
    c.send_json("POST", &format!("/processes/poison/{key}/{action}"), &[], &json!({})).await.unwrap()
}

fn history(inst: &Value) -> Vec<String> {
    inst["history"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

fn keys(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_parked_instance_is_retried_skipped_or_cancelled_by_an_operator() {
    let backend = TestBackend::new().await;
    let mut config = backend.config();
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(poison_set(backend.dir.path())));
    let server = sourced_server::start(config).await.unwrap();
    let mut c = Client::connect(server.addr()).await.unwrap();
    runner_started(&mut c, "poison").await;
    for id in ["o1", "o2"] {
        order(&mut c, id, &["submit", "pay"]).await;
    }
    order(&mut c, "o3", &["submit"]).await;
    for id in ["o1", "o2"] {
        let inst = eventually(&mut c, &format!("/processes/poison/{id}"), |d| d["status"] == "parked").await;
        assert!(inst["problem"].as_str().unwrap().contains(&format!("x-{id}")), "{inst}");
        assert_eq!((inst["state"].clone(), inst["pending"].as_array().unwrap().len()), (json!("done"), 1));
    }
    eventually(&mut c, "/processes/poison/o3", |d| d["state"] == "waiting").await;
    // Wrong states: only a parked instance is retried or skipped; an ended one is not cancelled.
    let r = step(&mut c, "o3", "retry").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.json()["type"].as_str().unwrap().ends_with("process-not-parked"), "{}", r.text());
    assert_eq!((r.json()["status"].clone(), r.json()["instanceStatus"].clone()), (json!(409), json!("running")));
    assert_eq!(step(&mut c, "o3", "skip").await.status, 409);
    assert_eq!(step(&mut c, "o9", "retry").await.status, 404, "no instance");
    assert_eq!(c.send_json("POST", "/processes/nope/o1/retry", &[], &json!({})).await.unwrap().status, 404);
    // The list: filtered by status and state, paged.
    let parked = c.get("/processes/poison?status=parked").await.unwrap();
    assert_eq!(parked.status, 200, "{}", parked.text());
    assert_eq!((keys(&parked.json()), parked.json()["next"].clone()), (vec!["o1".into(), "o2".into()], Value::Null));
    assert_eq!(keys(&c.get("/processes/poison?state=waiting").await.unwrap().json()), ["o3"]);
    assert_eq!(keys(&c.get("/processes/poison?status=completed").await.unwrap().json()), Vec::<String>::new());
    let first = c.get("/processes/poison?limit=2").await.unwrap().json();
    assert_eq!(keys(&first), ["o1", "o2"]);
    let next = first["next"].as_str().unwrap().to_owned();
    let second = c.get(&format!("/processes/poison?limit=2&cursor={next}")).await.unwrap().json();
    assert_eq!((keys(&second), second["next"].clone()), (vec!["o3".into()], Value::Null));
    for path in [
        "/processes/poison?status=asleep",
        "/processes/poison?colour=red",
        "/processes/poison?limit=0",
        "/processes/poison?cursor=zzz",
        "/processes/nope",
    ] {
        let r = c.get(path).await.unwrap();
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{path}: {}", r.text());
        assert_eq!(r.status, if path.ends_with("nope") { 404 } else { 400 }, "{path}");
    }
    // The cause fixed, a retry issues the pending command again and the instance completes.
    order(&mut c, "x-o1", &[]).await;
    let r = step(&mut c, "o1", "retry").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["status"].clone(), r.json()["problem"].clone()), (json!("completed"), Value::Null));
    let inst = eventually(&mut c, "/processes/poison/o1", |d| d["pending"] == json!([])).await;
    assert_eq!(history(&inst), ["ProcessStarted", "ProcessMoved", "ProcessParked", "ProcessRetried", "ProcessActed"]);
    assert_eq!(c.get("/order/x-o1").await.unwrap().json()["status"], "submitted");
    // Skip drops the failed step's command; the order x-o2 is never submitted.
    let r = step(&mut c, "o2", "skip").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["status"].clone(), r.json()["pending"].clone()), (json!("completed"), json!([])));
    assert_eq!(history(&r.json()).last().unwrap(), "ProcessSkipped");
    assert_eq!(step(&mut c, "o2", "retry").await.status, 409, "no longer parked");
    // Cancel ends a running instance; it is then neither moved nor cancelled again.
    let r = step(&mut c, "o3", "cancel").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((r.json()["status"].clone(), r.json()["timers"].clone()), (json!("cancelled"), json!([])));
    let r = step(&mut c, "o3", "cancel").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.json()["type"].as_str().unwrap().ends_with("process-ended"), "{}", r.text());
    assert_eq!(r.json()["instanceStatus"], "cancelled");
    assert_eq!(c.send_json("POST", "/order/o3/pay", &[], &json!({"amount": 2.0})).await.unwrap().status, 200);
    assert_eq!(keys(&c.get("/processes/poison?status=cancelled").await.unwrap().json()), ["o3"]);
    let p = &c.get("/processes").await.unwrap().json()["items"][0];
    let counts = ["running", "completed", "parked", "cancelled"].map(|k| p[k].as_u64().unwrap());
    // Running: x-o1, which the retried command submitted, started an instance of its own.
    assert_eq!(counts, [1, 2, 0, 1], "{p}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inst = c.get("/processes/poison/o3").await.unwrap().json();
    assert_eq!((inst["state"].clone(), inst["status"].clone()), (json!("waiting"), json!("cancelled")));
    assert_eq!(history(&inst), ["ProcessStarted", "ProcessCancelled"]);
    // The steps are the instance's events, with who did them in the metadata.
    let events = c.get("/process-poison/o3/events").await.unwrap().json();
    let cancelled = &events["items"][1];
    assert_eq!(
        (cancelled["type"].clone(), cancelled["metadata"]["step"].clone()),
        (json!("ProcessCancelled"), json!(2))
    );
    assert!(cancelled["metadata"].as_object().unwrap().contains_key("principal"), "{cancelled}");
    server.shutdown().await;
}

/// The operators' steps need the `admin` action; the reads need `read` on the instance type.
#[tokio::test]
async fn the_operators_steps_need_admin_and_the_list_needs_read() {
    let mut files: std::collections::BTreeMap<String, String> = [
        ("types/order/schema.json", r#"{"type": "object"}"#),
        ("types/order/commands/submit.yaml", "emit: [{event: OrderSubmitted}]"),
        ("types/order/commands/pay.yaml", "emit: [{event: OrderPaid}]"),
        (
            "permissions.yaml",
            "roles:\n  clerk:\n    - {types: [order], actions: [read, list]}\n  \
             auditor:\n    - {types: [\"*\"], actions: [read, list]}\n  ops:\n    - {types: [\"*\"], actions: [read, admin]}\n  \
             intern:\n    - {types: [order], actions: [read]}\n",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    files.insert("processes/poison.yaml".into(), POISON.to_owned());
    let set =
        std::sync::Arc::new(sourced_core::artifacts::ArtifactSet::load(&files).unwrap_or_else(|p| panic!("{p:?}")));
    let gate = crate::auth::gate();
    let t = crate::common::TestApp::fresh_with(move |c| {
        c.gate = gate;
        c.artifact_set = set;
    })
    .await;
    let as_ = |who: &str| vec![("x-api-key", crate::auth::key_of(who))];
    for action in ["retry", "skip", "cancel"] {
        let path = format!("/processes/poison/o1/{action}");
        assert_eq!(t.call("POST", &path, &[], None).await.problem(401, "credential-missing")["status"], 401);
        t.call("POST", &path, &as_("auditor"), None).await.problem(403, "forbidden");
        t.call("POST", &path, &as_("ops"), None).await.problem(404, "not-found");
    }
    for path in ["/processes/poison", "/processes/poison/o1"] {
        assert_eq!(t.call("GET", path, &[], None).await.status, 401, "{path}");
        t.call("GET", path, &as_("intern"), None).await.problem(403, "forbidden");
    }
    assert_eq!(t.call("GET", "/processes/poison", &as_("auditor"), None).await.ok(200)["items"], json!([]));
}
