//! JWT bearer tokens (`AUTH=jwt`, RFC 7519 in JWS compact form): [`JwtVerifier::verify`] checks
//! a token against a [`KeySource`] at a given time and makes its [`Principal`].
//!
//! The order of the checks: size (before any parsing), three base64url segments, a JSON header
//! whose `alg` is the one the selected key is pinned to (never the token's choice), the
//! signature, then the claims: `exp` (required), `nbf` (if present), both with the leeway,
//! `iss` and `aud` (required, equal to the settings), `sub` (the principal id), the tenant and
//! the roles from their configured claims.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value};
use sourced_core::Principal;

use crate::jwks::KeySource;
use crate::{AuthError, Authenticated, CREDENTIAL_BYTES_MAX};

/// The leeway on `exp` and `nbf` when none is configured, in seconds (`JWT_LEEWAY_SECS`).
pub const LEEWAY_SECS_DEFAULT: u64 = 30;

/// Where a claim is: a top-level claim name (`tenant`, `https://example.com/tenant`), or, when it
/// starts with `/`, a JSON Pointer into the claims (`/realm_access/roles`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimPath(String);

impl ClaimPath {
    /// A claim path as configured (see the type).
    pub fn new(path: &str) -> Result<ClaimPath, String> {
        if path.is_empty() || path == "/" {
            return Err("a claim path is a claim name or a JSON Pointer such as /realm_access/roles".into());
        }
        Ok(ClaimPath(path.to_owned()))
    }

    /// The claim's value in `claims`.
    pub fn find<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        if self.0.starts_with('/') {
            let (first, rest) = self.0[1..].split_once('/').map_or((&self.0[1..], None), |(f, r)| (f, Some(r)));
            let first = first.replace("~1", "/").replace("~0", "~");
            let top = claims.get(&first)?;
            match rest {
                Some(rest) => top.pointer(&format!("/{rest}")),
                None => Some(top),
            }
        } else {
            claims.get(&self.0)
        }
    }

    /// As configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a token must say (`JWT_ISSUER`, `JWT_AUDIENCE`, `JWT_LEEWAY_SECS`) and where its tenant
/// and roles are.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// The required `iss`.
    pub issuer: String,
    /// The audience `aud` must name (a string, or one of a list).
    pub audience: String,
    /// Tolerated clock skew on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// The tenant claim (a string or a list of strings), default `tenant`.
    pub tenant_claim: ClaimPath,
    /// The roles claim (a string or a list of strings; absent is no role), default `roles`.
    pub roles_claim: ClaimPath,
}

impl JwtSettings {
    /// Settings with the default leeway and claims.
    pub fn new(issuer: &str, audience: &str) -> JwtSettings {
        JwtSettings {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs: LEEWAY_SECS_DEFAULT,
            tenant_claim: ClaimPath("tenant".into()),
            roles_claim: ClaimPath("roles".into()),
        }
    }
}

/// Verifies tokens with one key source and one set of settings.
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: Arc<dyn KeySource>,
}

fn malformed(what: &str) -> AuthError {
    AuthError::Malformed(what.to_owned())
}

fn decode_segment(s: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| malformed(&format!("the {what} is not base64url")))
}

fn decode_object(s: &str, what: &str) -> Result<Map<String, Value>, AuthError> {
    match serde_json::from_slice(&decode_segment(s, what)?) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(malformed(&format!("the {what} is not a JSON object"))),
    }
}

/// A NumericDate claim (seconds; fractions are cut).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => {
            v.as_i64().or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)).map(Some).ok_or_else(|| {
                AuthError::InvalidClaim {
                    claim: name.to_owned(),
                    reason: "a NumericDate is a number of seconds".into(),
                }
            })
        }
    }
}

/// A claim that is a string or a list of strings.
fn strings(v: &Value, claim: &str) -> Result<Vec<String>, AuthError> {
    let invalid =
        || AuthError::InvalidClaim { claim: claim.to_owned(), reason: "a string or a list of strings".into() };
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(list) => list.iter().map(|s| s.as_str().map(str::to_owned).ok_or_else(invalid)).collect(),
        _ => Err(invalid()),
    }
}

impl JwtVerifier {
    /// A verifier of tokens signed by `keys` that meet `settings`.
    pub fn new(settings: JwtSettings, keys: Arc<dyn KeySource>) -> JwtVerifier {
        JwtVerifier { settings, keys }
    }

    /// Verifies `token` at `now_secs` (seconds since the Unix epoch) and returns its principal
    /// with `exp`.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Authenticated, AuthError> {
        if token.len() > CREDENTIAL_BYTES_MAX {
            return Err(AuthError::TooLarge(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("a token is three segments separated by '.'"));
        };
        let header = decode_object(header_b64, "header")?;
        let alg = header.get("alg").and_then(Value::as_str).ok_or_else(|| malformed("the header has no 'alg'"))?;
        if header.contains_key("crit") {
            return Err(malformed("the header has 'crit' extensions, which are not supported"));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(malformed("'kid' is not a string")),
        };
        let key = self.keys.key(kid).ok_or_else(|| AuthError::UnknownKid(kid.map(str::to_owned)))?;
        if alg != key.algorithm().name() {
            return Err(AuthError::WrongAlgorithm(alg.chars().take(32).collect()));
        }
        let sig = decode_segment(sig_b64, "signature")?;
        let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
        if !key.verifies(signed.as_bytes(), &sig) {
            return Err(AuthError::InvalidSignature);
        }
        let claims = decode_object(claims_b64, "claims")?;
        self.check_claims(&claims, now_secs)
    }

    fn check_claims(&self, claims: &Map<String, Value>, now_secs: i64) -> Result<Authenticated, AuthError> {
        let s = &self.settings;
        let leeway = i64::try_from(s.leeway_secs).unwrap_or(i64::MAX);
        let exp = numeric_date(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        if now_secs >= exp.saturating_add(leeway) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = numeric_date(claims, "nbf")?
            && now_secs < nbf.saturating_sub(leeway)
        {
            return Err(AuthError::NotYetValid);
        }
        match claims.get("iss") {
            None => return Err(AuthError::MissingClaim("iss".into())),
            Some(Value::String(iss)) if *iss == s.issuer => {}
            Some(_) => return Err(AuthError::WrongIssuer),
        }
        let audiences = strings(claims.get("aud").ok_or_else(|| AuthError::MissingClaim("aud".into()))?, "aud")?;
        if !audiences.contains(&s.audience) {
            return Err(AuthError::WrongAudience);
        }
        let sub = match claims.get("sub") {
            None => return Err(AuthError::MissingClaim("sub".into())),
            Some(Value::String(sub)) => sub,
            Some(_) => return Err(AuthError::InvalidClaim { claim: "sub".into(), reason: "a string".into() }),
        };
        let tenant_claim = s.tenant_claim.as_str();
        let tenants = strings(
            s.tenant_claim.find(claims).ok_or_else(|| AuthError::MissingClaim(tenant_claim.to_owned()))?,
            tenant_claim,
        )?;
        let roles = match s.roles_claim.find(claims) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => strings(v, s.roles_claim.as_str())?,
        };
        let principal = Principal::new(sub, &tenants, &roles).map_err(|e| {
            let claim = match e {
                sourced_core::principal::PrincipalError::Id => "sub",
                sourced_core::principal::PrincipalError::Roles | sourced_core::principal::PrincipalError::Role(_) => {
                    s.roles_claim.as_str()
                }
                _ => tenant_claim,
            };
            AuthError::InvalidClaim { claim: claim.to_owned(), reason: e.to_string() }
        })?;
        Ok(Authenticated { principal, expires_at: Some(exp) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_paths_find_names_and_pointers() {
        let claims = serde_json::json!({
            "tenant": "acme",
            "https://example.com/tenant": "beta",
            "realm_access": {"roles": ["a", "b"]},
            "a/b": {"c": 1}
        });
        let claims = claims.as_object().unwrap();
        let find = |p: &str| ClaimPath::new(p).unwrap().find(claims).cloned();
        assert_eq!(find("tenant"), Some("acme".into()));
        assert_eq!(find("https://example.com/tenant"), Some("beta".into()));
        assert_eq!(find("/realm_access/roles"), Some(serde_json::json!(["a", "b"])));
        assert_eq!(find("/a~1b/c"), Some(1.into()));
        assert_eq!(find("/missing/x"), None);
        assert!(ClaimPath::new("").is_err());
    }
}
