//! The public JSON Patch test suite (../shared/conformance/json-patch-tests) through the core's
//! patch path: every enabled record, including those whose document is not an object (the
//! server's own test runs the object records through the PATCH endpoint).

use serde_json::Value;
use sourced_core::Limits;
use sourced_core::patch::{apply, parse_patch};

/// Loads the enabled records of both suite files, or `None` (with a message) when the suite is
/// not beside the checkout. Under CI the suite must be there.
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

#[test]
fn every_enabled_record_through_the_core() {
    let Some(records) = records() else { return };
    let limits = Limits::default();
    let mut checked = 0;
    for r in &records {
        let name = r.get("comment").and_then(Value::as_str).unwrap_or("(no comment)");
        let result = parse_patch(&r["patch"], &limits).and_then(|p| apply(&r["doc"], &p));
        match (r.get("expected"), r.get("error"), result) {
            (Some(want), _, Ok(got)) => assert_eq!(&got, want, "{name}"),
            (Some(_), _, Err(e)) => panic!("{name}: expected success, got {e}"),
            (None, Some(_), Ok(got)) => panic!("{name}: expected an error, got {got}"),
            (None, Some(_), Err(_)) => {}
            (None, None, _) => {} // no expectation: only that it does not panic
        }
        checked += 1;
    }
    eprintln!("JSON Patch suite: {checked} enabled records checked through the core");
    assert!(checked >= 100, "only {checked} records found");
}
