//! Conditional requests (RFC 9110 §13.1) on every method of a document: `If-Match` compares
//! strongly, `If-None-Match` weakly; both take `*` or a list, and several header lines are one
//! list; a failed condition is 412 (304 for `If-None-Match` on GET/HEAD) and changes nothing; a
//! malformed entity tag is 400 naming the header. Runs on both backends.

use serde_json::json;

use crate::common::TestApp;

const IM: &str = "if-match";
const INM: &str = "if-none-match";

/// (method, headers, whether the document exists at version 1, expected status).
type Case = (&'static str, &'static [(&'static str, &'static str)], bool, u16);

const CASES: &[Case] = &[
    // GET and HEAD: If-None-Match → 304 by weak comparison, If-Match → 412 by strong.
    ("GET", &[], true, 200),
    ("GET", &[(INM, "\"1\"")], true, 304),
    ("GET", &[(INM, "W/\"1\"")], true, 304),
    ("GET", &[(INM, "\"2\"")], true, 200),
    ("GET", &[(INM, "\"2\", \"1\"")], true, 304),
    ("GET", &[(INM, "\"2\""), (INM, "\"1\"")], true, 304),
    ("GET", &[(INM, "*")], true, 304),
    ("GET", &[(INM, "\"01\"")], true, 200),
    ("GET", &[(INM, "\"x\", ,W/\"y\"")], true, 200),
    ("GET", &[(IM, "\"1\"")], true, 200),
    ("GET", &[(IM, "W/\"1\"")], true, 412),
    ("GET", &[(IM, "\"2\"")], true, 412),
    ("GET", &[(IM, "\"1\""), (INM, "\"1\"")], true, 304),
    ("GET", &[(IM, "\"2\""), (INM, "\"1\"")], true, 412),
    ("GET", &[(INM, "1")], true, 400),
    ("GET", &[(INM, "*")], false, 404),
    ("HEAD", &[(INM, "\"1\"")], true, 304),
    ("HEAD", &[(INM, "\"2\"")], true, 200),
    // PATCH: If-Match strong, any of a list, lines combined; If-None-Match weak, * = exists.
    ("PATCH", &[], true, 200),
    ("PATCH", &[(IM, "\"1\"")], true, 200),
    ("PATCH", &[(IM, "\"2\"")], true, 412),
    ("PATCH", &[(IM, "W/\"1\"")], true, 412),
    ("PATCH", &[(IM, "\"01\"")], true, 412),
    ("PATCH", &[(IM, "\"2\", \"1\"")], true, 200),
    ("PATCH", &[(IM, "\"2\""), (IM, "\"1\"")], true, 200),
    ("PATCH", &[(IM, "\"1\""), (IM, "\"2\"")], true, 200),
    ("PATCH", &[(IM, "\"2\""), (IM, "\"3\"")], true, 412),
    ("PATCH", &[(IM, "*")], true, 200),
    ("PATCH", &[(IM, "*")], false, 412),
    ("PATCH", &[(INM, "*")], true, 412),
    ("PATCH", &[(INM, "*")], false, 404),
    ("PATCH", &[(INM, "\"1\"")], true, 412),
    ("PATCH", &[(INM, "W/\"1\"")], true, 412),
    ("PATCH", &[(INM, "\"2\"")], true, 200),
    ("PATCH", &[(INM, "\"2\", \"3\"")], true, 200),
    ("PATCH", &[(IM, "\"1\""), (INM, "\"2\"")], true, 200),
    ("PATCH", &[(IM, "\"1\""), (INM, "\"1\"")], true, 412),
    ("PATCH", &[(IM, "1")], true, 400),
    ("PATCH", &[(IM, "\"1")], true, 400),
    ("PATCH", &[(IM, "\"1\" \"2\"")], true, 400),
    ("PATCH", &[(IM, "\"1\", *")], true, 400),
    ("PATCH", &[(IM, "w/\"1\"")], true, 400),
    ("PATCH", &[(IM, "")], true, 400),
    ("PATCH", &[(INM, "\"a b\"")], true, 400),
    // PUT: If-None-Match: * is create only.
    ("PUT", &[(INM, "*")], true, 412),
    ("PUT", &[(INM, "*")], false, 201),
    ("PUT", &[(INM, "\"1\"")], false, 201),
    ("PUT", &[(INM, "\"1\"")], true, 412),
    ("PUT", &[(IM, "\"1\"")], true, 200),
    ("PUT", &[(IM, "W/\"1\"")], true, 412),
    ("PUT", &[(IM, "*")], false, 412),
    ("PUT", &[(IM, "\"3\", \"1\"")], true, 200),
    ("PUT", &[(INM, "1")], false, 400),
    // DELETE.
    ("DELETE", &[(IM, "\"1\"")], true, 200),
    ("DELETE", &[(IM, "W/\"1\"")], true, 412),
    ("DELETE", &[(IM, "\"2\"")], true, 412),
    ("DELETE", &[(INM, "*")], true, 412),
    ("DELETE", &[(INM, "W/\"1\"")], true, 412),
    ("DELETE", &[(INM, "\"2\"")], true, 200),
    ("DELETE", &[(IM, "\"1"), (IM, "\"1\"")], true, 400),
    // POST to the collection: it exists and has no entity tag.
    ("POST", &[], false, 201),
    ("POST", &[(IM, "*")], false, 201),
    ("POST", &[(IM, "\"1\"")], false, 412),
    ("POST", &[(INM, "*")], false, 412),
    ("POST", &[(INM, "\"1\"")], false, 201),
    ("POST", &[(IM, "01")], false, 400),
];

#[tokio::test]
async fn preconditions_follow_rfc_9110() {
    let app = TestApp::fresh().await;
    for (i, &(method, headers, existing, expected)) in CASES.iter().enumerate() {
        let id = format!("c{i}");
        if existing {
            app.post("/doc", &json!({"id": id, "a": 1})).await.ok(201);
        }
        let path = if method == "POST" { "/doc".to_owned() } else { format!("/doc/{id}") };
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        let body = match method {
            "PATCH" => {
                h.push(("content-type", "application/merge-patch+json"));
                Some(r#"{"a":2}"#)
            }
            "PUT" | "POST" => Some(r#"{"a":3}"#),
            _ => None,
        };
        let r = app.call(method, &path, &h, body).await;
        let case = format!("case {i}: {method} {headers:?} existing={existing}");
        assert_eq!(r.status, expected, "{case}: {}", r.body);
        match expected {
            304 => {
                assert_eq!(r.header("etag"), Some("\"1\""), "{case}");
                assert!(r.raw.is_empty(), "{case}");
            }
            400 => {
                let p = r.problem(400, "invalid-request");
                let name = p["header"].as_str().unwrap_or_default();
                assert!(headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)), "{case}: {p}");
                assert!(p["detail"].as_str().unwrap().contains(name), "{case}: {p}");
            }
            412 => {
                let p = r.problem(412, "precondition-failed");
                if existing {
                    assert_eq!(p["currentVersion"], 1, "{case}: {p}");
                }
            }
            _ => {}
        }
        // What failed changed nothing: the document is still at version 1 (or still absent).
        if expected >= 400 && method != "POST" {
            let g = app.get(&path).await;
            if existing {
                assert_eq!(g.header("etag"), Some("\"1\""), "{case}: {}", g.body);
            } else {
                assert_eq!(g.status, 404, "{case}: {}", g.body);
            }
        }
    }
}
