//! The keys that verify tokens. Each [`JwtKey`] is pinned to one algorithm: a token naming any
//! other (`none`, HS256 against an RSA key, ...) is refused before its signature is looked at,
//! so the token never chooses how it is checked.
//!
//! [`KeySource`] is where keys come from. [`StaticKeys`] holds an HS256 secret
//! (`JWT_HS256_SECRET`) or a JWKS file (`JWT_JWKS`) read at start. An https JWKS fetcher is later
//! work and fits the same trait: it would keep the last fetched set (behind an `ArcSwap`), answer
//! lookups from it without blocking, and on an unknown `kid` start at most one refresh a minute
//! (with a timeout), so a flood of made-up `kid`s cannot make it hammer the identity provider.

use std::sync::Arc;

use base64::Engine as _;
use ring::{hmac, signature};
use serde_json::Value;

/// The shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash's size).
pub const HS256_SECRET_BYTES_MIN: usize = 32;
pub use crate::limits::JWKS_KEYS_MAX;

/// The algorithms Sourced verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC with SHA-256, a shared secret.
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA keys of 2048 to 8192 bits.
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
}

impl Algorithm {
    /// Its name in a JOSE header.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }
}

enum Verify {
    Hmac(hmac::Key),
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec(Vec<u8>),
}

/// One verification key, pinned to its algorithm.
pub struct JwtKey {
    kid: Option<String>,
    algorithm: Algorithm,
    verify: Verify,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey").field("kid", &self.kid).field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl JwtKey {
    /// An HS256 key from a shared secret of at least [`HS256_SECRET_BYTES_MIN`] bytes.
    pub fn hs256(secret: &[u8]) -> Result<JwtKey, String> {
        if secret.len() < HS256_SECRET_BYTES_MIN {
            return Err(format!(
                "the HS256 secret is {} bytes; at least {HS256_SECRET_BYTES_MIN} are needed",
                secret.len()
            ));
        }
        Ok(JwtKey {
            kid: None,
            algorithm: Algorithm::Hs256,
            verify: Verify::Hmac(hmac::Key::new(hmac::HMAC_SHA256, secret)),
        })
    }

    /// Its `kid`, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm it verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Whether `signature` signs `message` under this key (HMAC compared in constant time).
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.verify {
            Verify::Hmac(key) => hmac::verify(key, message, sig).is_ok(),
            Verify::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            Verify::Ec(point) => signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, sig)
                .is_ok(),
        }
    }

    /// One JWK (RFC 7517) of a JWKS: `kty: RSA` (RS256) or `kty: EC` with `crv: P-256`
    /// (ES256). An `alg` member must agree; `use` other than `sig` is refused. Symmetric (`oct`)
    /// keys are not read from a JWKS: an HS256 secret is its own setting.
    pub fn from_jwk(jwk: &Value) -> Result<JwtKey, String> {
        let m = jwk.as_object().ok_or("a JWK is an object")?;
        let text = |name: &str| m.get(name).and_then(Value::as_str);
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            let s = text(name).ok_or_else(|| format!("'{name}' is required"))?;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|e| format!("'{name}' is not base64url: {e}"))
        };
        if let Some(u) = text("use").filter(|u| *u != "sig") {
            return Err(format!("use '{u}': only signing keys (use: sig) verify tokens"));
        }
        let kid = text("kid").map(str::to_owned);
        let (algorithm, verify) = match text("kty") {
            Some("RSA") => {
                let (n, e) = (bytes("n")?, bytes("e")?);
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(format!("the RSA modulus has about {bits} bits; at least 2048 are needed"));
                }
                (Algorithm::Rs256, Verify::Rsa { n, e })
            }
            Some("EC") => {
                if text("crv") != Some("P-256") {
                    return Err("only EC keys on P-256 (ES256) are supported".into());
                }
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err("a P-256 key has 32-byte x and y".into());
                }
                let mut point = vec![4u8];
                point.extend(x);
                point.extend(y);
                (Algorithm::Es256, Verify::Ec(point))
            }
            Some(other) => return Err(format!("kty '{other}' is not supported (RSA or EC)")),
            None => return Err("'kty' is required".into()),
        };
        if let Some(alg) = text("alg").filter(|a| *a != algorithm.name()) {
            return Err(format!("alg '{alg}' does not fit this key; it verifies {}", algorithm.name()));
        }
        Ok(JwtKey { kid, algorithm, verify })
    }
}

/// Where verification keys come from.
pub trait KeySource: Send + Sync {
    /// The key for a token's `kid` (`None` when the token names none), or `None` when no key
    /// fits. Must not block: a fetching source answers from what it has and refreshes aside.
    fn key(&self, kid: Option<&str>) -> Option<Arc<JwtKey>>;
}

/// Keys known at start: an HS256 secret, or the keys of a JWKS file.
#[derive(Debug)]
pub struct StaticKeys {
    keys: Vec<Arc<JwtKey>>,
}

impl StaticKeys {
    /// One HS256 secret: it verifies every token signed HS256, whatever its `kid`.
    pub fn hs256(secret: &[u8]) -> Result<StaticKeys, String> {
        Ok(StaticKeys { keys: vec![Arc::new(JwtKey::hs256(secret)?)] })
    }

    /// The keys of a JWKS document (`{"keys": [...]}`); a problem names the key's index. Every
    /// key needs a distinct `kid`, except a JWKS of one key.
    pub fn from_jwks(text: &str) -> Result<StaticKeys, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let list = doc.get("keys").and_then(Value::as_array).ok_or("a JWKS is an object with a 'keys' list")?;
        if list.is_empty() || list.len() > JWKS_KEYS_MAX {
            return Err(format!("a JWKS holds 1 to {JWKS_KEYS_MAX} keys"));
        }
        let mut keys: Vec<Arc<JwtKey>> = Vec::with_capacity(list.len());
        for (i, jwk) in list.iter().enumerate() {
            let key = JwtKey::from_jwk(jwk).map_err(|m| format!("keys/{i}: {m}"))?;
            if list.len() > 1 && key.kid.is_none() {
                return Err(format!("keys/{i}: 'kid' is required when a JWKS holds several keys"));
            }
            if keys.iter().any(|k| k.kid.is_some() && k.kid == key.kid) {
                return Err(format!("keys/{i}: kid {:?} is used twice", key.kid.unwrap_or_default()));
            }
            keys.push(Arc::new(key));
        }
        Ok(StaticKeys { keys })
    }
}

impl KeySource for StaticKeys {
    fn key(&self, kid: Option<&str>) -> Option<Arc<JwtKey>> {
        match (self.keys.as_slice(), kid) {
            // One secret or one key: the token's kid (if any) must not name another key.
            ([only], kid) if only.kid.is_none() || kid.is_none() || only.kid.as_deref() == kid => Some(only.clone()),
            (keys, Some(kid)) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
            _ => None,
        }
    }
}
