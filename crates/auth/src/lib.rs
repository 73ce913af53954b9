//! Sourced's authentication (SPEC §8.1): who a credential says the caller is. API keys from a
//! keys file of SHA-256 hashes ([`keys`]), JWT bearer tokens verified against a pinned key
//! ([`jwt`], keys from [`jwks`]), and [`Authenticator`], which tells the two apart. The result
//! is a [`sourced_core::Principal`]; what it may do is `permissions.yaml`'s business
//! (`sourced_core::artifacts::permissions`). The server's `Gate` (auth.rs) and `Caller`
//! (request.rs) use it on every path.
//!
//! Time is passed in (`now_secs`, seconds since the Unix epoch): no function here reads a
//! clock, so every verification is deterministic under test.

#![warn(missing_docs)]

pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod limits;

pub use jwks::{JwtKey, KeySource, StaticKeys};
pub use jwt::{ClaimPath, JwtSettings, JwtVerifier};
pub use keys::{KeyStore, NewKey};
use sourced_core::{Principal, TenantId};

pub use crate::limits::CREDENTIAL_BYTES_MAX;

/// Which answer a refusal calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one that proves nothing (HTTP 401 with `WWW-Authenticate: Bearer`).
    Unauthenticated,
    /// A valid credential that does not allow this (HTTP 403).
    Forbidden,
}

/// Why a credential is refused. Each has a stable [`slug`](AuthError::slug) for the problem
/// type and a [`refusal`](AuthError::refusal) (401 or 403).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential where one is required.
    #[error("a credential is required")]
    Missing,
    /// Over [`CREDENTIAL_BYTES_MAX`].
    #[error("the credential is {0} bytes, over the limit of {CREDENTIAL_BYTES_MAX}")]
    TooLarge(usize),
    /// Not an API key this service issued, nor a token it can verify.
    #[error("the API key is not known")]
    UnknownKey,
    /// Not three base64url segments of JSON, or a header or claims of the wrong shape.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// The header names another algorithm than the key's (`none`, HS256 for an RSA key, ...).
    #[error("the token's algorithm '{0}' is not the one its key is pinned to")]
    WrongAlgorithm(String),
    /// No configured key has this `kid` (or the token names none and several keys exist).
    #[error("{}", unknown_kid(.0.as_deref()))]
    UnknownKid(Option<String>),
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    InvalidSignature,
    /// `exp` (plus the leeway) has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` (minus the leeway) is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    /// `aud` does not name the configured audience.
    #[error("the token is for another audience")]
    WrongAudience,
    /// A required claim is absent.
    #[error("the token lacks the '{0}' claim")]
    MissingClaim(String),
    /// A claim has the wrong type or an invalid value.
    #[error("the token's '{claim}' claim is invalid: {reason}")]
    InvalidClaim {
        /// The claim.
        claim: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request names a tenant its credential does not allow (never silently switched).
    #[error("the credential does not allow tenant '{0}'")]
    TenantNotAllowed(String),
    /// The credential allows several tenants and the request names none.
    #[error("the credential allows several tenants: name one with X-Tenant")]
    TenantRequired,
}

fn unknown_kid(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("no key is known for kid '{kid}'"),
        None => "the token names no kid and several keys are configured".to_owned(),
    }
}

impl AuthError {
    /// The stable short name of the problem type (`token-expired`, ...).
    pub fn slug(&self) -> &'static str {
        match self {
            AuthError::Missing => "credential-missing",
            AuthError::TooLarge(_) => "credential-too-large",
            AuthError::UnknownKey => "key-unknown",
            AuthError::Malformed(_) => "token-malformed",
            AuthError::WrongAlgorithm(_) => "token-wrong-algorithm",
            AuthError::UnknownKid(_) => "token-unknown-kid",
            AuthError::InvalidSignature => "token-invalid-signature",
            AuthError::Expired => "token-expired",
            AuthError::NotYetValid => "token-not-yet-valid",
            AuthError::WrongIssuer => "token-wrong-issuer",
            AuthError::WrongAudience => "token-wrong-audience",
            AuthError::MissingClaim(_) => "token-missing-claim",
            AuthError::InvalidClaim { .. } => "token-invalid-claim",
            AuthError::TenantNotAllowed(_) => "tenant-not-allowed",
            AuthError::TenantRequired => "tenant-required",
        }
    }

    /// 401 or 403: a tenant the credential does not allow is the only refusal of a valid
    /// credential here; the rest prove nothing about the caller.
    pub fn refusal(&self) -> Refusal {
        match self {
            AuthError::TenantNotAllowed(_) | AuthError::TenantRequired => Refusal::Forbidden,
            _ => Refusal::Unauthenticated,
        }
    }
}

/// A verified caller: the principal, and when its credential stops being valid (`exp` of a
/// token, in seconds since the epoch; `None` for an API key), so a long-lived connection can be
/// closed then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// Who.
    pub principal: Principal,
    /// Until when (seconds since the epoch), if the credential expires.
    pub expires_at: Option<i64>,
}

impl Authenticated {
    /// The tenant a request acts in ([`Principal::resolve_tenant`]), or why not.
    pub fn tenant(&self, named: Option<&TenantId>) -> Result<TenantId, AuthError> {
        self.principal.resolve_tenant(named).ok_or_else(|| match named {
            Some(t) => AuthError::TenantNotAllowed(t.to_string()),
            None => AuthError::TenantRequired,
        })
    }
}

/// The configured ways in (`AUTH=keys,jwt`): a bearer credential starting with
/// [`keys::KEY_PREFIX`] is an API key, anything else a JWT.
#[derive(Default)]
pub struct Authenticator {
    /// API keys, when `keys` is on.
    pub keys: Option<KeyStore>,
    /// JWT verification, when `jwt` is on.
    pub jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// Who `credential` (the value after `Bearer `, or of `X-Api-Key`) is, at `now_secs`.
    pub fn authenticate(&self, credential: &str, now_secs: i64) -> Result<Authenticated, AuthError> {
        if credential.is_empty() {
            return Err(AuthError::Missing);
        }
        if credential.len() > CREDENTIAL_BYTES_MAX {
            return Err(AuthError::TooLarge(credential.len()));
        }
        if credential.starts_with(keys::KEY_PREFIX) {
            let keys = self.keys.as_ref().ok_or(AuthError::UnknownKey)?;
            let principal = keys.lookup(credential).ok_or(AuthError::UnknownKey)?;
            return Ok(Authenticated { principal: principal.clone(), expires_at: None });
        }
        match &self.jwt {
            Some(jwt) => jwt.verify(credential, now_secs),
            None => Err(AuthError::UnknownKey),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slugs are the problem types clients see: each refusal has its own, and they do not
    /// change (docs/security.md lists them).
    #[test]
    fn every_refusal_has_its_own_stable_slug() {
        let all = [
            (AuthError::Missing, "credential-missing", Refusal::Unauthenticated),
            (AuthError::TooLarge(9000), "credential-too-large", Refusal::Unauthenticated),
            (AuthError::UnknownKey, "key-unknown", Refusal::Unauthenticated),
            (AuthError::Malformed("x".into()), "token-malformed", Refusal::Unauthenticated),
            (AuthError::WrongAlgorithm("none".into()), "token-wrong-algorithm", Refusal::Unauthenticated),
            (AuthError::UnknownKid(None), "token-unknown-kid", Refusal::Unauthenticated),
            (AuthError::InvalidSignature, "token-invalid-signature", Refusal::Unauthenticated),
            (AuthError::Expired, "token-expired", Refusal::Unauthenticated),
            (AuthError::NotYetValid, "token-not-yet-valid", Refusal::Unauthenticated),
            (AuthError::WrongIssuer, "token-wrong-issuer", Refusal::Unauthenticated),
            (AuthError::WrongAudience, "token-wrong-audience", Refusal::Unauthenticated),
            (AuthError::MissingClaim("exp".into()), "token-missing-claim", Refusal::Unauthenticated),
            (
                AuthError::InvalidClaim { claim: "tenant".into(), reason: "x".into() },
                "token-invalid-claim",
                Refusal::Unauthenticated,
            ),
            (AuthError::TenantNotAllowed("beta".into()), "tenant-not-allowed", Refusal::Forbidden),
            (AuthError::TenantRequired, "tenant-required", Refusal::Forbidden),
        ];
        let docs = include_str!("../../../docs/security.md");
        let mut seen = std::collections::BTreeSet::new();
        for (e, slug, refusal) in &all {
            assert_eq!((e.slug(), e.refusal()), (*slug, *refusal), "{e}");
            assert!(seen.insert(*slug), "{slug} twice");
            let status = if *refusal == Refusal::Forbidden { 403 } else { 401 };
            assert!(docs.contains(&format!("| `{slug}` | {status} |")), "docs/security.md lacks {slug} ({status})");
        }
    }
}
