//! Authentication and authorization end to end (SPEC §8.1): an authorization matrix generated
//! from a table — every HTTP route × {no credential, wrong tenant, a role without the action,
//! a role with it} → the status the table expects — then JWT bearer tokens, the principal in
//! event metadata and in CEL, tenant isolation, and the feed keeping to readable types. Runs on
//! both backends (`SOURCED_TEST_BACKEND=postgres`).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use sourced_auth::jwt::JwtSettings;
use sourced_auth::{Authenticator, JwtVerifier, KeyStore, StaticKeys};
use sourced_core::artifacts::ArtifactSet;
use sourced_server::auth::Gate;

use crate::common::TestApp;

const SECRET: &str = "a test secret of at least thirty-two bytes";

/// (key, principal, tenants, roles) of the keys file; keys are fixed test values.
const KEYS: &[(&str, &str, &[&str], &[&str])] = &[
    ("sk_clerk_acme_0000000000000000000000000000000000", "clerk", &["acme"], &["clerk"]),
    ("sk_auditor_acme_00000000000000000000000000000000", "auditor", &["acme"], &["auditor"]),
    ("sk_ops_acme_000000000000000000000000000000000000", "ops", &["acme"], &["ops"]),
    ("sk_intern_acme_000000000000000000000000000000000", "intern", &["acme"], &["intern"]),
    ("sk_ops_beta_000000000000000000000000000000000000", "ops-beta", &["beta"], &["ops"]),
];

pub(crate) fn key_of(principal: &str) -> &'static str {
    KEYS.iter().find(|k| k.1 == principal).unwrap().0
}

pub(crate) fn artifacts() -> ArtifactSet {
    let files: BTreeMap<String, String> = [
        ("types/order/schema.json", r#"{"type": "object"}"#),
        ("types/invoice/schema.json", r#"{"type": "object"}"#),
        ("types/order/commands/submit.yaml", "emit: [{event: OrderSubmitted}]"),
        (
            // Only a principal whose roles include `ops` may approve: `principal` in CEL.
            "types/order/commands/approve.yaml",
            "require: [{expr: \"principal.roles.exists(r, r == 'ops')\", message: only ops approve}]\n\
             emit: [{event: OrderApproved}]",
        ),
        (
            "permissions.yaml",
            "roles:\n  clerk:\n    - {types: [order], actions: [read, list, create, patch, submit, approve]}\n  \
             auditor:\n    - {types: [\"*\"], actions: [read, list, subscribe]}\n  ops:\n    - {types: [\"*\"], actions: [\"*\"]}\n  \
             intern:\n    - {types: [invoice], actions: [\"*\"]}\n",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    ArtifactSet::load(&files).unwrap_or_else(|p| panic!("{p:?}"))
}

fn keys_file() -> String {
    let mut out = String::new();
    for (key, principal, tenants, roles) in KEYS {
        let hash: String = sourced_auth::keys::hash_key(key).iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(
            "- {{hash: \"sha256:{hash}\", principal: {principal}, tenants: [{}], roles: [{}]}}\n",
            tenants.join(", "),
            roles.join(", ")
        ));
    }
    out
}

/// The gate of these tests: the keys of [`KEYS`] and HS256 tokens for issuer
/// `https://issuer.test`, audience `sourced`.
pub(crate) fn gate() -> Arc<Gate> {
    let keys = KeyStore::parse("keys.yaml", &keys_file()).unwrap_or_else(|e| panic!("{e:?}"));
    let jwt = JwtVerifier::new(
        JwtSettings::new("https://issuer.test", "sourced"),
        Arc::new(StaticKeys::hs256(SECRET.as_bytes()).unwrap()),
    );
    Arc::new(Gate::with(Authenticator { keys: Some(keys), jwt: Some(jwt) }))
}

async fn app() -> TestApp {
    let gate = gate();
    TestApp::fresh_with(move |c| {
        c.gate = gate;
        c.artifact_set = Arc::new(artifacts());
    })
    .await
}

pub(crate) fn hs256(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing = format!("{header}.{body}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, signing.as_bytes()).as_ref());
    format!("{signing}.{sig}")
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Who calls in a matrix column.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    /// The clerk's key naming tenant beta.
    WrongTenant,
    /// A principal whose roles lack the row's action (intern: grants on invoice only).
    Without,
    /// A principal whose roles grant it (the row names which).
    With(&'static str),
}

/// (method, path, body, action, who has it, status when allowed)
type Row = (&'static str, &'static str, Option<&'static str>, &'static str, &'static str, u16);

const ROWS: &[Row] = &[
    ("POST", "/order", Some(r#"{"id": "m1", "n": 1}"#), "create", "clerk", 201),
    ("GET", "/order/o1", None, "read", "auditor", 200),
    ("GET", "/order/o1?version=1", None, "read", "clerk", 200),
    ("GET", "/order/o1/events", None, "read", "clerk", 200),
    ("GET", "/order/o1/diff?from=1&to=1", None, "read", "auditor", 200),
    ("GET", "/order", None, "list", "auditor", 200),
    ("PATCH", "/order/o1", Some(r#"[{"op": "replace", "path": "/n", "value": 2}]"#), "patch", "clerk", 200),
    ("PUT", "/order/o1", Some(r#"{"n": 3}"#), "replace", "ops", 200),
    ("POST", "/order/o1/submit", Some("{}"), "submit", "clerk", 200),
    (
        "POST",
        "/commands",
        Some(r#"{"type": "create", "targetName": "order", "targetId": "m2", "body": {}}"#),
        "create",
        "clerk",
        200,
    ),
    ("DELETE", "/order/o1", None, "delete", "ops", 200),
];

#[tokio::test]
async fn the_authorization_matrix_holds_on_every_route() {
    for row in ROWS {
        let (method, path, body, action, holder, allowed) = *row;
        // One store per row: aggregate o1 at version 1 (m1, m2 absent). The refusals change
        // nothing (checked after each), so the allowed cell, last, sees the same state.
        let t = app().await;
        let ops = [("authorization", format!("Bearer {}", key_of("ops")))];
        t.call("POST", "/order", &hdrs(&ops), Some(r#"{"id": "o1", "n": 1}"#)).await.ok(201);
        for who in [Who::Nobody, Who::WrongTenant, Who::Without, Who::With(holder)] {
            let headers: Vec<(&str, String)> = match who {
                Who::Nobody => vec![],
                Who::WrongTenant => {
                    vec![("authorization", format!("Bearer {}", key_of("clerk"))), ("x-tenant", "beta".into())]
                }
                Who::Without => vec![("x-api-key", key_of("intern").to_owned())],
                Who::With(p) => vec![("authorization", format!("Bearer {}", key_of(p)))],
            };
            let r = t.call(method, path, &hdrs(&headers), body).await;
            let cell = format!("{method} {path} ({action}) as {who:?}");
            match who {
                Who::Nobody => {
                    r.problem(401, "credential-missing");
                    assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{cell}");
                }
                Who::WrongTenant => {
                    r.problem(403, "tenant-not-allowed");
                }
                Who::Without => {
                    let p = r.problem(403, "forbidden");
                    assert_eq!(p["action"], action, "{cell}");
                }
                Who::With(_) => assert_eq!(r.status, allowed, "{cell}: {}", r.body),
            }
            // A refused write changed nothing.
            if !matches!(who, Who::With(_)) {
                let doc = t.call("GET", "/order/o1", &hdrs(&ops), None).await;
                assert_eq!(doc.ok(200)["_meta"]["version"], 1, "{cell}");
            }
        }
    }
}

fn hdrs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn roles_without_an_action_are_refused_it_and_bad_keys_are_401() {
    let t = app().await;
    let as_ = |p: &str| vec![("authorization", format!("Bearer {}", key_of(p)))];
    t.call("POST", "/order", &hdrs(&as_("ops")), Some(r#"{"id": "o1"}"#)).await.ok(201);
    // The auditor reads but does not write; the clerk does not delete.
    t.call("POST", "/order", &hdrs(&as_("auditor")), Some("{}")).await.problem(403, "forbidden");
    t.call("DELETE", "/order/o1", &hdrs(&as_("clerk")), None).await.problem(403, "forbidden");
    // Unknown key, another scheme, an oversized credential.
    let r = t.call("GET", "/order/o1", &[("authorization", "Bearer sk_not_a_key")], None).await;
    r.problem(401, "key-unknown");
    let r = t.call("GET", "/order/o1", &[("authorization", "Basic dXNlcjpwYXNz")], None).await;
    r.problem(401, "token-malformed");
    let big = format!("Bearer {}", "a".repeat(64 * 1024));
    let r = t.call("GET", "/order/o1", &[("authorization", big.as_str())], None).await;
    r.problem(401, "credential-too-large");
    // The public routes stay public.
    t.call("GET", "/healthz", &[], None).await.ok(200);
    t.call("GET", "/openapi.json", &[], None).await.ok(200);
}

#[tokio::test]
async fn jwt_tokens_authenticate_and_their_claims_are_checked() {
    let t = app().await;
    let claims = |extra: Value| {
        let mut c = json!({"iss": "https://issuer.test", "aud": "sourced", "sub": "jwt-clerk", "exp": now() + 300,
            "tenant": "acme", "roles": ["clerk"]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let bearer = |c: &Value| format!("Bearer {}", hs256(c));
    let ok = bearer(&claims(json!({})));
    t.call("POST", "/order", &[("authorization", ok.as_str())], Some(r#"{"id": "j1"}"#)).await.ok(201);
    let cases = [
        (claims(json!({"exp": now() - 3_600})), 401, "token-expired"),
        (claims(json!({"aud": "another"})), 401, "token-wrong-audience"),
        (claims(json!({"iss": "https://evil.test"})), 401, "token-wrong-issuer"),
        (claims(json!({"nbf": now() + 3_600})), 401, "token-not-yet-valid"),
        (claims(json!({"tenant": "beta"})), 403, "tenant-not-allowed"),
    ];
    for (c, status, slug) in cases {
        let b = bearer(&c);
        let r = t.call("GET", "/order/j1", &[("authorization", b.as_str()), ("x-tenant", "acme")], None).await;
        r.problem(status, slug);
    }
    // alg none: the header says none, the key is pinned to HS256.
    let none = format!(
        "Bearer {}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
    );
    t.call("GET", "/order/j1", &[("authorization", none.as_str())], None).await.problem(401, "token-wrong-algorithm");
}

#[tokio::test]
async fn the_principal_is_in_the_events_metadata_and_in_cel() {
    let t = app().await;
    let clerk = format!("Bearer {}", key_of("clerk"));
    let ops = format!("Bearer {}", key_of("ops"));
    t.call("POST", "/order", &[("authorization", clerk.as_str())], Some(r#"{"id": "o1"}"#)).await.ok(201);
    let history = t.call("GET", "/order/o1/events", &[("authorization", clerk.as_str())], None).await;
    let principal = &history.ok(200)["items"][0]["metadata"]["principal"];
    assert_eq!(principal["id"], "clerk", "{}", history.body);
    assert_eq!(principal["roles"], json!(["clerk"]));
    // `approve` is granted to the clerk, but its guard asks CEL for the ops role.
    let r = t.call("POST", "/order/o1/approve", &[("authorization", clerk.as_str())], Some("{}")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = t.call("POST", "/order/o1/approve", &[("authorization", ops.as_str())], Some("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn tenants_are_isolated_and_the_feed_keeps_to_readable_types() {
    let t = app().await;
    let ops = format!("Bearer {}", key_of("ops"));
    let beta = format!("Bearer {}", key_of("ops-beta"));
    let intern = format!("Bearer {}", key_of("intern"));
    t.call("POST", "/order", &[("authorization", beta.as_str())], Some(r#"{"id": "b1"}"#)).await.ok(201);
    t.call("POST", "/order", &[("authorization", ops.as_str())], Some(r#"{"id": "a1"}"#)).await.ok(201);
    t.call("POST", "/invoice", &[("authorization", ops.as_str())], Some(r#"{"id": "i1"}"#)).await.ok(201);
    // Acme's credential never sees beta's document, nor beta's events in its feed.
    t.call("GET", "/order/b1", &[("authorization", ops.as_str())], None).await.problem(404, "not-found");
    let feed = t.call("GET", "/events", &[("authorization", ops.as_str())], None).await;
    let ids: Vec<&str> =
        feed.ok(200)["items"].as_array().unwrap().iter().map(|e| e["targetId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a1", "i1"]);
    // The same command id in two tenants stays two commands.
    let key = [("idempotency-key", "same-key")];
    let a = t.call("POST", "/order", &[key[0], ("authorization", ops.as_str())], Some(r#"{"id": "k"}"#)).await;
    let b = t.call("POST", "/order", &[key[0], ("authorization", beta.as_str())], Some(r#"{"id": "k"}"#)).await;
    assert_eq!((a.status, b.status), (201, 201));
    assert!(b.header("idempotent-replayed").is_none());
    // The intern subscribes to invoices only: the feed shows no order.
    let feed = t.call("GET", "/events", &[("authorization", intern.as_str())], None).await;
    let types: Vec<&str> =
        feed.ok(200)["items"].as_array().unwrap().iter().map(|e| e["targetName"].as_str().unwrap()).collect();
    assert_eq!(types, ["invoice"]);
    // Asking for a type outside the grants is 403, not an empty stream.
    let r = t
        .call(
            "GET",
            "/events?targetName=order",
            &[("authorization", intern.as_str()), ("accept", "text/event-stream")],
            None,
        )
        .await;
    r.problem(403, "forbidden");
}

#[test]
fn auth_none_refuses_a_public_address_unless_insecure() {
    use sourced_server::config::{Config, RawArgs};
    let e = Config::resolve(&RawArgs::from_pairs([("LISTEN", "0.0.0.0:8080")])).unwrap_err();
    assert_eq!(e.setting, "LISTEN", "{e}");
    assert!(e.to_string().contains("INSECURE=true"), "{e}");
    Config::resolve(&RawArgs::from_pairs([("LISTEN", "0.0.0.0:8080"), ("INSECURE", "true")])).unwrap();
    Config::resolve(&RawArgs::from_pairs([("LISTEN", "[::1]:8080")])).unwrap();
    let e = Config::resolve(&RawArgs::from_pairs([("AUTH", "keys")])).unwrap_err();
    assert_eq!(e.setting, "AUTH_KEYS_FILE", "{e}");
    let e = Config::resolve(&RawArgs::from_pairs([("AUTH", "jwt"), ("JWT_ISSUER", "i"), ("JWT_AUDIENCE", "a")]))
        .unwrap_err();
    assert_eq!(e.setting, "JWT_HS256_SECRET", "{e}");
    let e = Config::resolve(&RawArgs::from_pairs([("AUTH", "password")])).unwrap_err();
    assert_eq!(e.setting, "AUTH", "{e}");
}

#[tokio::test]
async fn sse_takes_an_access_token_or_a_cookie() {
    let t = app().await;
    let ops = format!("Bearer {}", key_of("ops"));
    t.call("POST", "/order", &[("authorization", ops.as_str())], Some(r#"{"id": "s1"}"#)).await.ok(201);
    let q = format!("/events?access_token={}", key_of("auditor"));
    t.call("GET", &q, &[], None).await.ok(200);
    let cookie = format!("theme=dark; sourced_token={}", key_of("auditor"));
    t.call("GET", "/events", &[("cookie", cookie.as_str())], None).await.ok(200);
    // Only on the feed: a document read does not take it.
    let q = format!("/order/s1?access_token={}", key_of("auditor"));
    t.call("GET", &q, &[], None).await.problem(401, "credential-missing");
    t.call("GET", "/events?access_token=sk_nope", &[], None).await.problem(401, "key-unknown");
}

#[tokio::test]
async fn the_rate_limit_is_per_principal_and_answers_429_with_retry_after() {
    let gate = gate();
    let t = TestApp::fresh_with(move |c| {
        c.gate = gate;
        c.artifact_set = Arc::new(artifacts());
        c.rate_limit = sourced_server::ratelimit::RateLimiter::new(1, 3).map(Arc::new);
    })
    .await;
    let clerk = format!("Bearer {}", key_of("clerk"));
    let auditor = format!("Bearer {}", key_of("auditor"));
    for _ in 0..3 {
        t.call("GET", "/order", &[("authorization", clerk.as_str())], None).await.ok(200);
    }
    let r = t.call("GET", "/order", &[("authorization", clerk.as_str())], None).await;
    assert_eq!(r.problem(429, "rate-limited")["retryAfter"], 1);
    assert_eq!(r.header("retry-after"), Some("1"));
    // A write is refused the same way, and writes nothing.
    let r = t.call("POST", "/order", &[("authorization", clerk.as_str())], Some(r#"{"id": "r1"}"#)).await;
    r.problem(429, "rate-limited");
    // Another principal has its own bucket.
    t.call("GET", "/order/r1", &[("authorization", auditor.as_str())], None).await.problem(404, "not-found");
}
