//! The public JSON Patch suite (../shared/conformance/json-patch-tests) through the PATCH
//! endpoint: create the document, PATCH it, then compare the state or expect a refusal and an
//! unchanged aggregate. Records whose document is not an object cannot be aggregates; the
//! core's own test runs those.

use serde_json::{Value, json};

use crate::common::TestApp;

fn records() -> Option<Vec<Value>> {
    // `JSON_PATCH_TESTS_DIR` when set (.ci/run sets it for a clone that is not beside
    // ../shared), else beside the checkout.
    let dir = std::env::var_os("JSON_PATCH_TESTS_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/json-patch-tests"),
        std::path::PathBuf::from,
    );
    let mut out = Vec::new();
    for file in ["tests.json", "spec_tests.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            assert!(std::env::var_os("CI").is_none(), "the JSON Patch suite is missing at {}", path.display());
            eprintln!("SKIP: the JSON Patch suite is not at {}", path.display());
            return None;
        };
        let all: Vec<Value> = serde_json::from_str(&text).expect("the suite is JSON");
        out.extend(
            all.into_iter().filter(|r| r.get("patch").is_some() && r.get("disabled") != Some(&Value::Bool(true))),
        );
    }
    Some(out)
}

/// The state part of a GET document.
fn state(doc: &Value) -> Value {
    let mut m = doc.as_object().cloned().unwrap_or_default();
    m.shift_remove("id");
    m.shift_remove("_meta");
    Value::Object(m)
}

#[tokio::test]
async fn every_enabled_object_record_through_patch() {
    let Some(records) = records() else { return };
    let app = TestApp::fresh().await;
    let (mut through_http, mut core_only) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let name = r.get("comment").and_then(Value::as_str).unwrap_or("(no comment)");
        if !r["doc"].is_object() {
            core_only += 1;
            continue;
        }
        let path = format!("/doc/r{i}");
        let mut body = r["doc"].clone();
        body.as_object_mut().unwrap().insert("id".into(), json!(format!("r{i}")));
        app.post("/doc", &body).await.ok(201);
        let res = app.patch(&path, Some("\"1\""), &r["patch"]).await;
        let after = app.get(&path).await;
        match r.get("expected") {
            Some(want) if want == &r["doc"] => {
                // The patch changes nothing (e.g. only `test` ops): refused as a no-op.
                res.problem(422, "no-op");
                assert_eq!(after.body["_meta"]["version"], 1, "{name}");
            }
            Some(want) if want.is_object() => {
                assert_eq!(res.status, 200, "{name}: {}", res.body);
                assert_eq!(&state(&res.body), want, "{name}");
                assert_eq!(&state(&after.body), want, "{name}");
                assert_eq!(after.body["_meta"]["version"], 2, "{name}");
            }
            Some(_) => {
                // The whole document replaced by a non-object: not an aggregate document.
                res.problem(422, "invalid-document");
                assert_eq!(after.body["_meta"]["version"], 1, "{name}");
            }
            None => {
                assert!(matches!(res.status, 400 | 422), "{name}: expected a refusal, got {} {}", res.status, res.body);
                assert_eq!(&state(&after.body), &r["doc"], "{name}: unchanged");
                assert_eq!(after.body["_meta"]["version"], 1, "{name}");
            }
        }
        through_http += 1;
    }
    eprintln!(
        "JSON Patch suite: {through_http} records through PATCH, {core_only} with non-object documents left to the core test"
    );
    assert_eq!(through_http + core_only, records.len());
    assert!(through_http >= 70, "only {through_http} records ran");
}
