//! What a store of record must never do to what it acknowledged (issue 14): alter a number,
//! pick one of two duplicate keys, take a character one backend cannot keep, or let a patch cost
//! far more than the document it builds. The same answers on both backends (CI runs this module
//! on PostgreSQL too).

use serde_json::{Value, json};

use crate::common::TestApp;

/// Every write path that takes client JSON, with the body spliced in where the document goes.
fn writes(body: &str) -> Vec<(&'static str, String, &'static str, String)> {
    vec![
        ("POST", "/doc".into(), "application/json", body.replace("{", r#"{"id":"n1","#)),
        ("PUT", "/doc/n2".into(), "application/json", body.to_owned()),
        ("PATCH", "/doc/base".into(), "application/merge-patch+json", body.to_owned()),
        (
            "PATCH",
            "/doc/base".into(),
            "application/json-patch+json",
            format!(r#"[{{"op":"add","path":"/v","value":{body}}}]"#),
        ),
        (
            "POST",
            "/commands".into(),
            "application/json",
            format!(r#"{{"type":"create","targetName":"doc","targetId":"n3","body":{body}}}"#),
        ),
    ]
}

#[tokio::test]
async fn values_that_would_change_are_refused_on_every_write_path() {
    let app = TestApp::fresh().await;
    app.call("PUT", "/doc/base", &[], Some(r#"{"title":"base"}"#)).await.ok(201);
    // (body, status, problem type, pointer of the first violation relative to the body)
    let cases = [
        (r#"{"a":123456789012345678901234567890}"#, 422, "unstorable-value", "/a"),
        (r#"{"a":-0}"#, 422, "unstorable-value", "/a"),
        (r#"{"a":[1,0.1000000000000000000001]}"#, 422, "unstorable-value", "/a/1"),
        (r#"{"a":18446744073709551616}"#, 422, "unstorable-value", "/a"),
        (r#"{"a":1,"a":2}"#, 400, "invalid-json", "/a"),
        (r#"{"a":{"b":1,"\u0062":2}}"#, 400, "invalid-json", "/a/b"),
        (r#"{"a":"a\u0000b"}"#, 422, "unstorable-value", "/a"),
        (r#"{"a\u0000":"x"}"#, 422, "unstorable-value", "/a\u{0}"),
    ];
    for (body, status, slug, pointer) in cases {
        for (method, path, media, text) in writes(body) {
            let r = app.call(method, &path, &[("content-type", media)], Some(&text)).await;
            let p = r.problem(status, slug);
            let first = p["violations"][0]["pointer"].as_str().unwrap_or_default().to_owned();
            assert!(first.ends_with(pointer), "{method} {path} {text}: pointer {first}, wanted …{pointer}");
        }
    }
    // Nothing was stored: the only document is the base, unchanged, and lists still work.
    let list = app.get("/doc").await;
    assert_eq!(list.ok(200)["items"].as_array().unwrap().len(), 1, "{}", list.body);
    app.get("/doc?a=x").await.ok(200);
    app.get("/doc?sort=a&includeDeleted=true").await.ok(200);
    assert_eq!(app.get("/doc/base").await.ok(200)["_meta"]["version"], 1);
}

#[tokio::test]
async fn nul_is_refused_in_queries_as_in_documents() {
    let app = TestApp::fresh().await;
    app.call("PUT", "/doc/d1", &[], Some(r#"{"a":"x"}"#)).await.ok(201);
    app.get("/doc?a=x%00y").await.problem(400, "invalid-request");
    app.get("/doc?a[in]=x,%00").await.problem(400, "invalid-request");
    app.get("/doc?a=x").await.ok(200);
}

#[tokio::test]
async fn numbers_come_back_as_their_value_was_sent() {
    let app = TestApp::fresh().await;
    let body = r#"{"u":18446744073709551615,"i":-9223372036854775808,"f":0.1,"g":-2.5e-3,"z":-0.0,"h":1.5e300}"#;
    app.call("PUT", "/doc/n", &[], Some(body)).await.ok(201);
    let got = app.get("/doc/n").await;
    let text = String::from_utf8(got.raw.clone()).unwrap();
    for want in
        [r#""u":18446744073709551615"#, r#""i":-9223372036854775808"#, r#""f":0.1"#, r#""g":-0.0025"#, r#""z":-0.0"#]
    {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert_eq!(got.body["h"], json!(1.5e300));
    // Sorting and filtering see the same numbers on both backends.
    app.get("/doc?u[gte]=1&sort=-u").await.ok(200);
}

#[tokio::test]
async fn deep_nesting_gets_one_answer_whatever_the_depth() {
    let app = TestApp::fresh_with(|c| c.limits.json_depth_max = 5).await;
    for depth in [6, 65, 100_000] {
        let bomb = format!(r#"{{"a":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
        app.call("POST", "/doc", &[], Some(&bomb)).await.problem(422, "too-deep");
        let env = format!(r#"{{"type":"create","targetName":"doc","body":{bomb}}}"#);
        app.call("POST", "/commands", &[], Some(&env)).await.problem(422, "too-deep");
        let unclosed = format!(r#"{{"a":{}"#, "[".repeat(depth));
        app.call("POST", "/doc", &[], Some(&unclosed)).await.problem(422, "too-deep");
    }
    // The limit counts the document's own depth on every path: five levels pass.
    let five = r#"{"a":{"b":{"c":{"d":1}}}}"#;
    app.call("POST", "/doc", &[], Some(five)).await.ok(201);
    let env = format!(r#"{{"type":"create","targetName":"doc","targetId":"e1","body":{five}}}"#);
    app.call("POST", "/commands", &[], Some(&env)).await.ok(200);
}

#[tokio::test]
async fn dot_segments_are_not_ids() {
    let app = TestApp::fresh().await;
    for path in ["/doc/..", "/doc/.", "/doc/%2e%2e", "/doc/%2E"] {
        app.call("PUT", path, &[], Some("{}")).await.problem(400, "invalid-request");
    }
    let env = r#"{"type":"create","targetName":"doc","targetId":"..","body":{}}"#;
    app.call("POST", "/commands", &[], Some(env)).await.problem(400, "invalid-command");
    app.call("PUT", "/doc/a..b", &[], Some("{}")).await.ok(201);
    app.call("PUT", "/doc/x", &[("x-tenant", "..")], Some("{}")).await.problem(400, "invalid-request");
}

#[tokio::test]
async fn a_patch_of_copies_is_refused_before_it_costs_more_than_the_limit() {
    let app = TestApp::fresh_with(|c| c.limits.document_bytes_max = 20_000).await;
    let doc = json!({"a": vec![1234567; 1_500]});
    app.call("PUT", "/doc/big", &[], Some(&doc.to_string())).await.ok(201);
    // The attack of issue 14, scaled down: copy /a to /b, then /b to /c0 … /c998.
    let mut ops = vec![json!({"op": "copy", "from": "/a", "path": "/b"})];
    ops.extend((0..999).map(|i| json!({"op": "copy", "from": "/b", "path": format!("/c{i}")})));
    let r = app.patch("/doc/big", None, &Value::Array(ops)).await;
    let p = r.problem(413, "document-too-large");
    assert!(p["detail"].as_str().unwrap().contains("copy"), "{p}");
    assert_eq!(app.get("/doc/big").await.ok(200)["_meta"]["version"], 1);
    // Copies within the budget still apply.
    let ok =
        json!([{"op": "copy", "from": "/a/0", "path": "/first"}, {"op": "copy", "from": "/first", "path": "/again"}]);
    assert_eq!(app.patch("/doc/big", None, &ok).await.ok(200)["again"], 1234567);
}

#[tokio::test]
async fn a_failed_operation_names_the_member_that_failed() {
    let app = TestApp::fresh().await;
    app.call("PUT", "/doc/p", &[], Some(r#"{"a":1}"#)).await.ok(201);
    let cases = [
        (json!([{"op": "copy", "from": "/nope", "path": "/b"}]), "/body/0/from", "'from'"),
        (
            json!([{"op": "add", "path": "/b", "value": 1}, {"op": "move", "from": "/x", "path": "/c"}]),
            "/body/1/from",
            "'from'",
        ),
        (json!([{"op": "remove", "path": "/nope"}]), "/body/0/path", "'path'"),
        (json!([{"op": "test", "path": "/a", "value": 2}]), "/body/0/path", "test"),
    ];
    for (patch, pointer, says) in cases {
        let r = app.patch("/doc/p", None, &patch).await;
        let p = r.problem(422, "patch-failed");
        assert_eq!(p["violations"][0]["pointer"], pointer, "{p}");
        assert!(p["violations"][0]["message"].as_str().unwrap().contains(says), "{p}");
    }
    // A malformed pointer is named as such, in our words, at the member that holds it.
    let r = app.patch("/doc/p", None, &json!([{"op": "add", "path": "/a~2", "value": 1}])).await;
    let p = r.problem(400, "invalid-command");
    assert_eq!(p["violations"][0]["pointer"], "/body/0/path", "{p}");
    assert!(p["violations"][0]["message"].as_str().unwrap().contains("'~'"), "{p}");
    let r = app.patch("/doc/p", None, &json!([{"op": "copy", "from": "a", "path": "/b"}])).await;
    assert_eq!(r.problem(400, "invalid-command")["violations"][0]["pointer"], "/body/0/from");
}
