//! `GET /openapi.json`: a valid OpenAPI 3.1 document listing every route, every loaded schema
//! and custom command; the replies of a walkthrough of the order domain (successes and
//! errors) each have their status listed and a body that validates against the document.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::common::{Resp, TestApp};

fn order_app() -> TestApp {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    let set = sourced_server::artifacts::load_dir(&example).expect("the example set is valid");
    TestApp::with(|c| c.artifact_set = Arc::new(set))
}

/// JSON Pointer escaping of one token.
fn esc(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1").replace('{', "%7B").replace('}', "%7D")
}

/// Checks `r` against the operation `method` of `template`: its status is listed, and its body
/// validates against the schema of its media type.
#[track_caller]
fn conforms(doc: &Value, template: &str, method: &str, r: &Resp) {
    let op = &doc["paths"][template][method];
    assert!(op.is_object(), "no operation {method} {template}");
    let response = &op["responses"][r.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {template} answered {} which the document does not list: {}",
        r.status,
        r.body
    );
    if r.raw.is_empty() {
        return;
    }
    let media = r.header("content-type").unwrap_or("").split(';').next().unwrap().trim().to_owned();
    assert!(response["content"][&media].is_object(), "{method} {template} {}: media type {media} not listed", r.status);
    let mut schema = doc.clone();
    schema["$ref"] =
        json!(format!("#/paths/{}/{method}/responses/{}/content/{}/schema", esc(template), r.status, esc(&media)));
    let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&r.body).map(|e| format!("{} {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{method} {template} {}: {errors:?}\n{}", r.status, r.body);
}

#[tokio::test]
async fn the_document_describes_the_routes_and_the_artifacts() {
    let app = order_app();
    let r = app.get("/openapi.json").await;
    let doc = r.ok(200).clone();
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(doc["openapi"], "3.1.0");
    // The order's schema and the payload schemas of its commands are components.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["order"]["required"], json!(["customer", "lines", "total"]));
    assert!(schemas["order"].get("$schema").is_none());
    assert_eq!(schemas["order.pay.payload"]["required"], json!(["amount"]));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/order",
        "/order/{id}",
        "/order/{id}/events",
        "/order/{id}/submit",
        "/order/{id}/pay",
        "/order/{id}/ship",
        "/order/{id}/cancel",
        "/{type}",
        "/{type}/{id}",
        "/{type}/{id}/events",
        "/{type}/{id}/{command}",
        "/commands",
        "/events",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/schemas/{file}",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert_eq!(
        doc["paths"]["/order/{id}/pay"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/order.pay.payload"
    );
    let patch_types: Vec<&String> =
        doc["paths"]["/order/{id}"]["patch"]["requestBody"]["content"].as_object().unwrap().keys().collect();
    assert_eq!(patch_types, ["application/json-patch+json", "application/merge-patch+json", "application/json"]);
    // A create links to the operations on what it made, the id taken from its reply.
    let links = &doc["paths"]["/order"]["post"]["responses"]["201"]["links"];
    assert_eq!(links["Order_Pay"], json!({"operationId": "Order_Pay", "parameters": {"id": "$response.body#/id"}}));
    assert!(links["get_Order"].is_object() && links["history_Order"].is_object(), "{links}");
    let generic = &doc["paths"]["/{type}"]["post"]["responses"]["201"]["links"]["get"];
    assert_eq!(generic["parameters"]["type"], "$request.path.type");
    // Not served unless ADMIN_API=true, so not listed either.
    assert!(!paths.contains_key("/admin/reload"));
    // Every operation id is unique.
    let mut ids: Vec<&str> = paths
        .values()
        .flat_map(|p| p.as_object().unwrap().values())
        .map(|o| o["operationId"].as_str().unwrap())
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n);
    // Without artifacts only the generic paths are there.
    let plain = TestApp::new().get("/openapi.json").await;
    assert!(plain.body["paths"].get("/order").is_none());
    assert!(plain.body["paths"].get("/{type}/{id}/{command}").is_some());
}

/// Tidy check: every route `router.rs` registers is in the document (WebSocket excepted).
#[tokio::test]
async fn every_route_of_the_router_is_listed() {
    let source = include_str!("../../src/router.rs");
    let doc = TestApp::with(|c| c.admin_api = true).get("/openapi.json").await.body;
    let mut seen = 0;
    for piece in source.split(".route(\"").skip(1) {
        let route = piece.split('"').next().unwrap();
        if route == "/ws" {
            continue;
        }
        seen += 1;
        assert!(doc["paths"].get(route).is_some(), "route {route} is not in /openapi.json");
    }
    assert!(seen >= 10, "found {seen} routes in router.rs");
}

#[tokio::test]
async fn replies_conform_to_the_document() {
    let app = order_app();
    let doc = app.get("/openapi.json").await.body;
    let c = |m: &str, p: &str, h: &'static [(&'static str, &'static str)], b: Option<Value>| {
        let (m, p) = (m.to_owned(), p.to_owned());
        let app = &app;
        async move { app.call(&m, &p, h, b.map(|b| b.to_string()).as_deref()).await }
    };
    let cases: Vec<(&str, &str, Resp)> = vec![
        ("/order", "post", c("POST", "/order", &[], Some(json!({"id": "o1", "customer": "ada", "lines": [{"sku": "tea", "qty": 2, "price": 4.25}], "total": 8.5}))).await),
        ("/order", "post", c("POST", "/order", &[], Some(json!({"id": "o1", "customer": "ada", "lines": [], "total": 0}))).await),
        ("/order", "post", c("POST", "/order", &[], Some(json!({"customer": ""}))).await),
        ("/order", "post", c("POST", "/order", &[("content-type", "text/plain")], Some(json!({}))).await),
        ("/order", "post", c("POST", "/order", &[("prefer", "return=minimal")], Some(json!({"id": "o2", "customer": "bo", "lines": [], "total": 0}))).await),
        ("/order", "get", c("GET", "/order?limit=1", &[], None).await),
        ("/order", "get", c("GET", "/order?limit=0", &[], None).await),
        ("/order/{id}", "get", c("GET", "/order/o1", &[], None).await),
        ("/order/{id}", "get", c("GET", "/order/o1", &[("if-none-match", "\"1\"")], None).await),
        ("/order/{id}", "get", c("GET", "/order/nope", &[], None).await),
        ("/order/{id}/submit", "post", c("POST", "/order/o2/submit", &[], Some(json!({}))).await),
        ("/order/{id}/submit", "post", c("POST", "/order/o1/submit", &[], Some(json!({}))).await),
        ("/order/{id}/pay", "post", c("POST", "/order/o1/pay", &[], Some(json!({"amount": "x"}))).await),
        ("/order/{id}/ship", "post", c("POST", "/order/o1/ship", &[], Some(json!({"trackingNumber": "Z"}))).await),
        ("/order/{id}/pay", "post", c("POST", "/order/o1/pay", &[("if-match", "\"1\"")], Some(json!({"amount": 8.5}))).await),
        ("/order/{id}/pay", "post", c("POST", "/order/o1/pay", &[], Some(json!({"amount": 8.5}))).await),
        ("/order/{id}/cancel", "post", c("POST", "/order/o1/cancel", &[], Some(json!({}))).await),
        ("/order/{id}", "patch", c("PATCH", "/order/o2", &[("content-type", "application/merge-patch+json")], Some(json!({"total": 3}))).await),
        ("/order/{id}", "patch", c("PATCH", "/order/o2", &[("content-type", "application/json-patch+json")], Some(json!([{"op": "test", "path": "/total", "value": 1}]))).await),
        ("/order/{id}", "put", c("PUT", "/order/o3", &[], Some(json!({"customer": "cy", "lines": [], "total": 0}))).await),
        ("/order/{id}", "put", c("PUT", "/order/o3", &[("if-none-match", "*")], Some(json!({"customer": "cy", "lines": [], "total": 0}))).await),
        ("/order/{id}", "delete", c("DELETE", "/order/o3", &[], None).await),
        ("/order/{id}", "get", c("GET", "/order/o3", &[], None).await),
        ("/order/{id}/events", "get", c("GET", "/order/o1/events", &[], None).await),
        ("/{type}/{id}/{command}", "post", c("POST", "/order/o1/teleport", &[], Some(json!({}))).await),
        ("/{type}", "post", c("POST", "/note", &[], Some(json!({"id": "n1", "text": "hi"}))).await),
        ("/{type}/{id}", "patch", c("PATCH", "/note/n1", &[("content-type", "application/json")], Some(json!({"text": "hi"}))).await),
        ("/{type}/{id}", "get", c("GET", "/note/n1?x=1", &[], None).await),
        ("/commands", "post", c("POST", "/commands", &[], Some(json!({"type": "create", "targetName": "note", "targetId": "n2", "body": {}}))).await),
        ("/commands", "post", c("POST", "/commands", &[], Some(json!({"type": "teleport"}))).await),
        ("/events", "get", c("GET", "/events?after=1&limit=2", &[], None).await),
        ("/events", "get", c("GET", "/events?after=x", &[], None).await),
        ("/schemas/{file}", "get", c("GET", "/schemas/order.json", &[], None).await),
        ("/schemas/{file}", "get", c("GET", "/schemas/x.json", &[], None).await),
        ("/healthz", "get", c("GET", "/healthz", &[], None).await),
        ("/readyz", "get", c("GET", "/readyz", &[], None).await),
        ("/openapi.json", "get", c("GET", "/openapi.json", &[], None).await),
    ];
    let mut statuses: Vec<u16> = cases.iter().map(|(_, _, r)| r.status).collect();
    for (template, method, r) in &cases {
        conforms(&doc, template, method, r);
    }
    statuses.sort_unstable();
    statuses.dedup();
    // The walkthrough covers successes and the error statuses that matter.
    assert_eq!(statuses, [200, 201, 204, 304, 400, 404, 409, 410, 412, 415, 422]);
}

/// The whole document for the order domain (admin route included) is the one on file,
/// `tests/data/openapi/order.json`, key order included: a change to `openapi.rs` that changes
/// the document shows here as a diff to review. `SOURCED_BLESS=1` rewrites the file. The
/// crate's version is written as `<version>`, so a release does not touch the file. With
/// authentication (`AUTH=keys,jwt`) and rate limits on, the document is `order-auth.json`.
#[tokio::test]
async fn the_document_is_the_one_on_file() {
    check_on_file("order.json", |_| {}).await;
    check_on_file("order-auth.json", |c| {
        c.gate = crate::auth::gate();
        c.rate_limit = sourced_server::ratelimit::RateLimiter::new(10, 20).map(Arc::new);
    })
    .await;
}

async fn check_on_file(name: &str, configure: impl FnOnce(&mut sourced_server::config::Config)) {
    let bless = std::env::var("SOURCED_BLESS").is_ok_and(|v| v == "1");
    assert!(!(bless && std::env::var("CI").is_ok_and(|v| v == "true")), "SOURCED_BLESS=1 is refused under CI=true");
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    let set = sourced_server::artifacts::load_dir(&example).expect("the example set is valid");
    let app = TestApp::with(|c| {
        c.artifact_set = Arc::new(set);
        c.admin_api = true;
        configure(c);
    });
    let mut doc = app.get("/openapi.json").await.ok(200).clone();
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    doc["info"]["version"] = json!("<version>");
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/openapi").join(name);
    if bless {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("tests/data/openapi/{name} (SOURCED_BLESS=1 writes it): {e}"));
    if expected != text {
        let line = expected.lines().zip(text.lines()).position(|(e, a)| e != a).unwrap_or(0);
        panic!(
            "/openapi.json differs from tests/data/openapi/{name} from line {} (SOURCED_BLESS=1 to accept):\n- {}\n+ {}",
            line + 1,
            expected.lines().nth(line).unwrap_or(""),
            text.lines().nth(line).unwrap_or("")
        );
    }
}

/// The order domain's app with every route (admin too), authentication (`AUTH=keys,jwt`, the
/// gate of the auth tests) and, with `rate`, a rate limit of (per second, burst).
fn guarded_app(rate: Option<(u64, u64)>) -> TestApp {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    let set = sourced_server::artifacts::load_dir(&example).expect("the example set is valid");
    TestApp::with(|c| {
        c.artifact_set = Arc::new(set);
        c.admin_api = true;
        c.gate = crate::auth::gate();
        c.rate_limit =
            rate.and_then(|(per_sec, burst)| sourced_server::ratelimit::RateLimiter::new(per_sec, burst)).map(Arc::new);
    })
}

/// (path template, method, operation) of every operation of `doc`.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((path.clone(), method.clone(), op.clone()));
        }
    }
    out
}

/// The public routes of docs/security.md's table ("public: they describe the service"), as
/// path templates.
fn public_routes_of_the_docs() -> Vec<String> {
    let doc =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md")).unwrap();
    let row = doc
        .lines()
        .find(|l| l.starts_with('|') && l.contains("| public"))
        .expect("docs/security.md lists the public routes");
    let routes = row.split('|').nth(1).unwrap();
    routes.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// With authentication on, every operation but the public ones lists 401 (with
/// `WWW-Authenticate`) and 403, and 429 when rate limits are on; the public ones need no
/// credential (`security: []`) and are exactly the ones docs/security.md calls public. With
/// authentication off, the document declares no security, and no 401 or 403.
#[tokio::test]
async fn the_document_declares_credentials_where_they_are_checked() {
    for rate in [None, Some((10, 20))] {
        let doc = guarded_app(rate).get("/openapi.json").await.ok(200).clone();
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
        assert_eq!((&schemes["apiKey"]["in"], &schemes["apiKey"]["name"]), (&json!("header"), &json!("X-Api-Key")));
        assert_eq!(doc["security"], json!([{"bearer": []}, {"apiKey": []}]));
        let mut public = Vec::new();
        for (path, method, op) in operations(&doc) {
            let codes = &op["responses"];
            if op.get("security") == Some(&json!([])) {
                public.push(path.clone());
                assert!(codes.get("401").is_none() && codes.get("429").is_none(), "{method} {path}: {codes}");
                continue;
            }
            assert!(codes["401"]["headers"]["WWW-Authenticate"].is_object(), "{method} {path}: {codes}");
            assert!(codes["403"]["content"]["application/problem+json"].is_object(), "{method} {path}");
            assert_eq!(codes.get("429").is_some(), rate.is_some(), "{method} {path}");
        }
        public.dedup();
        public.sort();
        let mut documented = public_routes_of_the_docs();
        documented.sort();
        assert_eq!(public, documented, "docs/security.md and /openapi.json disagree on the public routes");
        assert_eq!(doc["paths"]["/events"]["get"]["security"][2], json!({"accessToken": []}));
    }
    let plain = order_app().get("/openapi.json").await.body;
    assert!(plain.get("security").is_none() && plain["components"].get("securitySchemes").is_none());
    for (path, method, op) in operations(&plain) {
        assert!(op["responses"].get("401").is_none() && op.get("security").is_none(), "{method} {path}");
    }
}

/// A request for `template` with its path parameters filled in (generic types as `note`).
fn concrete(template: &str) -> String {
    let generic = template.starts_with("/{type}");
    template
        .replace("{type}", "note")
        .replace("{id}", "x1")
        .replace("{command}", if generic { "nudge" } else { "submit" })
        .replace("{file}", "command.json")
}

/// Every operation the document guards answers 401 `credential-missing` without a credential,
/// with a body and headers that conform to it; every public one is served. Then a 403 and a
/// 429 conform too.
#[tokio::test]
async fn guarded_operations_refuse_a_request_without_a_credential() {
    let app = guarded_app(None);
    let doc = app.get("/openapi.json").await.ok(200).clone();
    for (template, method, op) in operations(&doc) {
        let path = concrete(&template);
        let body = op.get("requestBody").map(|_| "{}");
        let r = app.call(&method.to_uppercase(), &path, &[], body).await;
        if op.get("security") == Some(&json!([])) {
            assert_eq!(r.status, 200, "public {method} {path}: {}", r.body);
        } else {
            r.problem(401, "credential-missing");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{method} {path}");
        }
        conforms(&doc, &template, &method, &r);
    }
    let clerk = format!("Bearer {}", crate::auth::key_of("clerk"));
    let wrong_tenant = [("authorization", clerk.as_str()), ("x-tenant", "beta")];
    let r = app.call("GET", "/order/o1", &wrong_tenant, None).await;
    r.problem(403, "tenant-not-allowed");
    conforms(&doc, "/order/{id}", "get", &r);

    let app = guarded_app(Some((1, 1)));
    let doc = app.get("/openapi.json").await.ok(200).clone();
    let ops = format!("Bearer {}", crate::auth::key_of("ops"));
    let ops = [("authorization", ops.as_str())];
    app.call("GET", "/order", &ops, None).await.ok(200);
    let r = app.call("GET", "/order", &ops, None).await;
    r.problem(429, "rate-limited");
    conforms(&doc, "/order", "get", &r);
}
