//! The JWT attack corpus: every case of `tests/data/jwt/cases.json` is built, signed with the
//! TEST-ONLY keys of `tests/data/jwt/test-keys.json`, verified, and its outcome compared with the
//! expected slug.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::{hmac, signature};
use serde_json::{Map, Value};
use sourced_auth::jwt::{JwtSettings, JwtVerifier};
use sourced_auth::{AuthError, Authenticated, StaticKeys};
use sourced_core::TenantId;

fn data(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/jwt").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Keys {
    rsa: signature::RsaKeyPair,
    rsa_other: signature::RsaKeyPair,
    ec: signature::EcdsaKeyPair,
    rsa_public_jwk: String,
}

fn keys() -> Keys {
    let doc: Value = serde_json::from_str(&data("test-keys.json")).unwrap();
    let der =
        |name: &str| base64::engine::general_purpose::STANDARD.decode(doc["private"][name].as_str().unwrap()).unwrap();
    let jwks: Value = serde_json::from_str(&data("jwks.json")).unwrap();
    Keys {
        rsa: signature::RsaKeyPair::from_der(&der("rsa-1")).unwrap(),
        rsa_other: signature::RsaKeyPair::from_der(&der("rsa-other")).unwrap(),
        ec: signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der("ec-1"),
            &SystemRandom::new(),
        )
        .unwrap(),
        rsa_public_jwk: jwks["keys"][0].to_string(),
    }
}

fn rsa_sign(key: &signature::RsaKeyPair, message: &[u8]) -> Vec<u8> {
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig).unwrap();
    sig
}

fn sign(how: &str, keys: &Keys, secret: &str, message: &[u8]) -> Vec<u8> {
    let hs = |secret: &[u8]| hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), message).as_ref().to_vec();
    match how {
        "hs256" => hs(secret.as_bytes()),
        "hs256-wrong-secret" => hs(b"another secret of at least 32 bytes, also test-only"),
        "hs256-rsa-public" => hs(keys.rsa_public_jwk.as_bytes()),
        "rs256" => rsa_sign(&keys.rsa, message),
        "rs256-other" => rsa_sign(&keys.rsa_other, message),
        "es256" => keys.ec.sign(&SystemRandom::new(), message).unwrap().as_ref().to_vec(),
        "none" => Vec::new(),
        other => panic!("unknown signing '{other}'"),
    }
}

fn merge(base: &Value, over: Option<&Value>) -> Map<String, Value> {
    let mut claims = base.as_object().unwrap().clone();
    for (k, v) in over.and_then(Value::as_object).into_iter().flatten() {
        if v.is_null() {
            claims.remove(k);
        } else {
            claims.insert(k.clone(), v.clone());
        }
    }
    claims
}

/// The token a case describes.
fn token(case: &Value, corpus: &Value, keys: &Keys) -> String {
    if let Some(t) = case["token"].as_str() {
        return t.to_owned();
    }
    let mut claims = merge(&corpus["base_claims"], case.get("claims"));
    if let Some(size) = case["pad_claims_to"].as_u64() {
        claims.insert("pad".into(), "x".repeat(size as usize).into());
    }
    let header = b64(case["header"].to_string().as_bytes());
    let payload = match case["raw_claims"].as_str() {
        Some(raw) => b64(raw.as_bytes()),
        None => b64(Value::Object(claims.clone()).to_string().as_bytes()),
    };
    let message = format!("{header}.{payload}");
    let sig = sign(case["sign"].as_str().unwrap(), keys, corpus["hs256_secret"].as_str().unwrap(), message.as_bytes());
    let mut sig = b64(&sig);
    if let Some(replacement) = case["replace_signature"].as_str() {
        sig = replacement.to_owned();
    }
    let payload = match case.get("tamper_claims") {
        Some(over) => {
            let tampered = merge(&Value::Object(claims), Some(over));
            b64(Value::Object(tampered).to_string().as_bytes())
        }
        None => payload,
    };
    format!("{header}.{payload}.{sig}")
}

fn outcome(result: &Result<Authenticated, AuthError>, case: &Value) -> Result<Authenticated, String> {
    let authenticated = result.clone().map_err(|e| e.slug().to_owned())?;
    // The request's tenant: the case's x_tenant (null: none named), else the first tenant.
    let named = match case.get("x_tenant") {
        Some(Value::Null) => None,
        Some(t) => Some(TenantId::parse(t.as_str().unwrap()).unwrap()),
        None => authenticated.principal.tenants.first().cloned(),
    };
    authenticated.tenant(named.as_ref()).map_err(|e| e.slug().to_owned())?;
    Ok(authenticated)
}

#[test]
fn the_attack_corpus() {
    let corpus: Value = serde_json::from_str(&data("cases.json")).unwrap();
    let keys = keys();
    let s = &corpus["settings"];
    let mut settings = JwtSettings::new(s["issuer"].as_str().unwrap(), s["audience"].as_str().unwrap());
    settings.leeway_secs = s["leeway_secs"].as_u64().unwrap();
    let hs256 = JwtVerifier::new(
        settings.clone(),
        Arc::new(StaticKeys::hs256(corpus["hs256_secret"].as_str().unwrap().as_bytes()).unwrap()),
    );
    let jwks = JwtVerifier::new(settings, Arc::new(StaticKeys::from_jwks(&data("jwks.json")).unwrap()));
    let now = corpus["now"].as_i64().unwrap();
    let cases = corpus["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "the corpus has only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut slugs = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let verifier = match case["verifier"].as_str().unwrap() {
            "hs256" => &hs256,
            "jwks" => &jwks,
            other => panic!("{name}: unknown verifier '{other}'"),
        };
        let token = token(case, &corpus, &keys);
        let got = outcome(&verifier.verify(&token, now), case);
        let expected = case["expect"].as_str().unwrap();
        slugs.insert(expected.to_owned());
        match (&got, expected) {
            (Ok(a), "ok") => {
                if let Some(p) = case.get("principal")
                    && a.principal.to_json() != *p
                {
                    failures.push(format!("{name}: principal {} instead of {p}", a.principal.to_json()));
                }
                if let Some(exp) = case["expires_at"].as_i64()
                    && a.expires_at != Some(exp)
                {
                    failures.push(format!("{name}: expires_at {:?} instead of {exp}", a.expires_at));
                }
            }
            (Err(slug), expected) if slug == expected => {}
            (got, expected) => failures.push(format!("{name}: expected {expected}, got {got:?}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(slugs.len() >= 14, "the corpus covers only {slugs:?}");
}

#[test]
fn jwks_files_are_checked_key_by_key() {
    let bad = [
        (r#"{"keys": []}"#, "1 to 100 keys"),
        (r#"{"nope": 1}"#, "'keys' list"),
        (r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, "keys/0: kty 'oct'"),
        (r#"{"keys": [{"kty": "EC", "crv": "P-384", "x": "", "y": ""}]}"#, "keys/0: only EC keys on P-256"),
        (r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#, "at least 2048"),
        (r#"{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}"#, "'n' is not base64url"),
        (r#"{"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}"#, "use 'enc'"),
        ("not json", "invalid JSON"),
    ];
    for (text, expected) in bad {
        let e = StaticKeys::from_jwks(text).unwrap_err();
        assert!(e.contains(expected), "{text}: {e}");
    }
    let jwks: Value = serde_json::from_str(&data("jwks.json")).unwrap();
    let mut rsa = jwks["keys"][0].clone();
    rsa["alg"] = "HS256".into();
    let e = StaticKeys::from_jwks(&serde_json::json!({"keys": [rsa]}).to_string()).unwrap_err();
    assert!(e.contains("alg 'HS256' does not fit"), "{e}");
    let mut two = jwks.clone();
    two["keys"][1]["kid"] = "rsa-1".into();
    assert!(StaticKeys::from_jwks(&two.to_string()).unwrap_err().contains("used twice"));
    assert!(StaticKeys::hs256(b"short").unwrap_err().contains("at least 32"));
}

#[test]
fn a_single_key_without_kid_verifies_tokens_without_kid() {
    let corpus: Value = serde_json::from_str(&data("cases.json")).unwrap();
    let keys = keys();
    let jwks: Value = serde_json::from_str(&data("jwks.json")).unwrap();
    let mut ec = jwks["keys"][1].clone();
    ec.as_object_mut().unwrap().remove("kid");
    let source = StaticKeys::from_jwks(&serde_json::json!({"keys": [ec]}).to_string()).unwrap();
    let verifier = JwtVerifier::new(JwtSettings::new("https://id.example.com", "sourced"), Arc::new(source));
    let case = serde_json::json!({"header": {"alg": "ES256"}, "sign": "es256"});
    let token = token(&case, &corpus, &keys);
    let now = corpus["now"].as_i64().unwrap();
    assert_eq!(verifier.verify(&token, now).unwrap().principal.id, "alice");
    // The same token an hour after its exp.
    assert_eq!(verifier.verify(&token, now + 3600).unwrap_err().slug(), "token-expired");
}
