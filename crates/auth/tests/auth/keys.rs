//! API keys and the authenticator: a key made by `NewKey` authenticates through its keys file
//! line; tokens and keys are told apart by the `sk_` prefix.

use std::sync::Arc;

use sourced_auth::jwt::{JwtSettings, JwtVerifier};
use sourced_auth::{AuthError, Authenticator, KeyStore, NewKey, Refusal, StaticKeys};
use sourced_core::{Principal, TenantId};

#[test]
fn keys_and_tokens_go_their_own_way() {
    let clerk = Principal::new("billing-job", &["acme"], &["clerk"]).unwrap();
    let made = NewKey::generate(&clerk).unwrap();
    let auth = Authenticator { keys: Some(KeyStore::parse("keys.yaml", &made.line).unwrap()), jwt: None };
    let who = auth.authenticate(&made.key, 0).unwrap();
    assert_eq!(who.principal, clerk);
    assert_eq!(who.expires_at, None);
    assert_eq!(who.tenant(None).unwrap(), TenantId::parse("acme").unwrap());
    let beta = TenantId::parse("beta").unwrap();
    let refused = who.tenant(Some(&beta)).unwrap_err();
    assert_eq!((refused.slug(), refused.refusal()), ("tenant-not-allowed", Refusal::Forbidden));

    let unknown = auth.authenticate("sk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 0).unwrap_err();
    assert_eq!((unknown.slug(), unknown.refusal()), ("key-unknown", Refusal::Unauthenticated));
    assert_eq!(auth.authenticate("", 0).unwrap_err(), AuthError::Missing);
    assert_eq!(auth.authenticate(&"x".repeat(9000), 0).unwrap_err().slug(), "credential-too-large");
    // JWT is off: a token is not a known key either.
    assert_eq!(auth.authenticate("a.b.c", 0).unwrap_err().slug(), "key-unknown");

    let secret = b"TEST-ONLY hs256 secret, 32+ bytes, never deploy";
    let jwt = JwtVerifier::new(JwtSettings::new("iss", "aud"), Arc::new(StaticKeys::hs256(secret).unwrap()));
    let both = Authenticator { keys: auth.keys.clone(), jwt: Some(jwt) };
    assert_eq!(both.authenticate(&made.key, 0).unwrap().principal, clerk);
    assert_eq!(both.authenticate("a.b.c", 0).unwrap_err().slug(), "token-malformed");
}
