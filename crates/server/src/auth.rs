//! The server's side of authentication (SPEC §8.1): the `AUTH` modes and their settings
//! turned into one [`Gate`] at start (keys file and JWT keys read once, every problem named by
//! its setting), and the credential of a request (`Authorization: Bearer`, `X-Api-Key`). Who a
//! credential names and what it may do is decided by `sourced-auth` and `permissions.yaml`;
//! the `Caller` of request.rs puts the two together for every handler.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use axum::http::HeaderMap;

use sourced_auth::jwt::{ClaimPath, JwtSettings};
use sourced_auth::{AuthError, Authenticated, Authenticator, CREDENTIAL_BYTES_MAX, JwtVerifier, KeyStore, StaticKeys};

use crate::jwks_fetch::{FetchSettings, RemoteJwks};
use crate::limits::JWT_CACHE_MAX;

use crate::settings::{ConfigError, RawArgs, bad};

/// Whether and how requests authenticate: `None` inside is `AUTH=none` (every request is
/// trusted, the tenant is the header's: development only).
///
/// A verified token is remembered (by its SHA-256) until its `exp`, so a client that sends the
/// same token with every request pays for its signature once: ES256 and RS256 verifications
/// cost tens of microseconds, a lookup well under one. At most [`JWT_CACHE_MAX`] tokens are
/// kept, least recently used forgotten first; a token past its `exp` is verified again (and
/// refused, within the leeway's rules).
pub struct Gate {
    authenticator: Option<Authenticator>,
    verified: Mutex<LruCache<[u8; 32], Authenticated>>,
    /// `JWT_JWKS=https://…`: fetched by [`Gate::start`].
    remote: Option<Arc<RemoteJwks>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { authenticator: None, verified: Mutex::new(LruCache::new(cache_size())), remote: None }
    }
}

fn cache_size() -> NonZeroUsize {
    NonZeroUsize::new(JWT_CACHE_MAX).expect("a positive bound")
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let modes = self.modes();
        let modes = if modes.is_empty() { "none".to_owned() } else { modes.join(",") };
        f.debug_struct("Gate").field("modes", &modes).finish()
    }
}

fn read(setting: &'static str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| bad(setting, path, format!("cannot read the file: {e}")))
}

impl Gate {
    /// Reads `AUTH` and the settings of its modes (`AUTH_KEYS_FILE`, `JWT_*`), loading the
    /// keys file and the JWT keys now: a deployment with a broken credential setting does not
    /// start.
    pub fn from_settings(raw: &RawArgs) -> Result<Gate, ConfigError> {
        let auth = raw.text("AUTH").unwrap_or_else(|| "none".into());
        let modes: Vec<&str> = auth.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        if let Some(m) = modes.iter().find(|m| !["none", "keys", "jwt"].contains(m)) {
            return Err(bad("AUTH", &auth, format!("unknown mode '{m}': use none, keys, jwt or keys,jwt")));
        }
        if modes.is_empty() || modes == ["none"] {
            return Ok(Gate::default());
        }
        if modes.contains(&"none") {
            return Err(bad("AUTH", &auth, "'none' cannot be combined with other modes"));
        }
        let keys = match modes.contains(&"keys") {
            false => None,
            true => {
                let path = raw.text("AUTH_KEYS_FILE").ok_or_else(|| {
                    bad("AUTH_KEYS_FILE", "", "AUTH=keys needs AUTH_KEYS_FILE, the YAML file of key hashes")
                })?;
                let text = read("AUTH_KEYS_FILE", &path)?;
                let store = KeyStore::parse(&path, &text).map_err(|errors| {
                    let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    bad("AUTH_KEYS_FILE", &path, list.join("; "))
                })?;
                Some(store)
            }
        };
        let (jwt, remote) = match modes.contains(&"jwt") {
            false => (None, None),
            true => {
                let (verifier, remote) = jwt_verifier(raw)?;
                (Some(verifier), remote)
            }
        };
        Ok(Gate { remote, ..Gate::with(Authenticator { keys, jwt }) })
    }

    /// Fetches the keys of `JWT_JWKS=https://…` (once now, then aside while serving); nothing
    /// to do otherwise. An error names the setting and the URL.
    pub async fn start(&self) -> Result<(), ConfigError> {
        match &self.remote {
            None => Ok(()),
            Some(remote) => remote
                .start()
                .await
                .map_err(|why| bad("JWT_JWKS", &remote.url(), format!("cannot fetch the keys: {why}"))),
        }
    }

    /// A gate with this authenticator (tests).
    pub fn with(authenticator: Authenticator) -> Gate {
        Gate { authenticator: Some(authenticator), ..Gate::default() }
    }

    /// Whether requests must authenticate.
    pub fn is_on(&self) -> bool {
        self.authenticator.is_some()
    }

    /// The `AUTH` modes that are on, `keys` before `jwt`; none with `AUTH=none`.
    pub fn modes(&self) -> Vec<&'static str> {
        let Some(a) = &self.authenticator else { return Vec::new() };
        [(a.keys.is_some(), "keys"), (a.jwt.is_some(), "jwt")].into_iter().filter(|m| m.0).map(|m| m.1).collect()
    }

    /// Who `credential` names now; `None` when authentication is off.
    pub fn authenticate(&self, credential: &str) -> Option<Result<Authenticated, AuthError>> {
        self.authenticate_at(credential, chrono::Utc::now().timestamp())
    }

    /// [`Gate::authenticate`] at `now_secs` (seconds since the epoch).
    pub fn authenticate_at(&self, credential: &str, now_secs: i64) -> Option<Result<Authenticated, AuthError>> {
        let a = self.authenticator.as_ref()?;
        // Keys are a hash lookup already; oversized credentials are refused before hashing.
        if credential.starts_with(sourced_auth::keys::KEY_PREFIX) || credential.len() > CREDENTIAL_BYTES_MAX {
            return Some(a.authenticate(credential, now_secs));
        }
        let digest = sourced_auth::keys::hash_key(credential);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = verified.get(&digest)
            && hit.expires_at.is_some_and(|exp| now_secs < exp)
        {
            return Some(Ok(hit.clone()));
        }
        drop(verified);
        let result = a.authenticate(credential, now_secs);
        if let Ok(ok) = &result
            && ok.expires_at.is_some_and(|exp| now_secs < exp)
        {
            self.verified.lock().unwrap_or_else(|e| e.into_inner()).put(digest, ok.clone());
        }
        Some(result)
    }

    /// With `AUTH=none`, only a loopback address may be bound, unless `INSECURE=true`: an
    /// open door must be asked for by name.
    pub fn check_listen(&self, listen: SocketAddr, insecure: bool) -> Result<(), ConfigError> {
        if self.is_on() || insecure || listen.ip().is_loopback() {
            return Ok(());
        }
        Err(bad(
            "LISTEN",
            &listen.to_string(),
            "AUTH=none serves everyone who can reach the port: bind a loopback address, turn on AUTH=keys or \
             AUTH=jwt, or set INSECURE=true",
        ))
    }
}

fn jwt_verifier(raw: &RawArgs) -> Result<(JwtVerifier, Option<Arc<RemoteJwks>>), ConfigError> {
    let issuer = raw.text("JWT_ISSUER").ok_or_else(|| bad("JWT_ISSUER", "", "AUTH=jwt needs the accepted issuer"))?;
    let audience =
        raw.text("JWT_AUDIENCE").ok_or_else(|| bad("JWT_AUDIENCE", "", "AUTH=jwt needs the accepted audience"))?;
    let mut settings = JwtSettings::new(&issuer, &audience);
    settings.leeway_secs = raw.number("JWT_LEEWAY_SECS")?;
    for (setting, slot) in
        [("JWT_TENANT_CLAIM", &mut settings.tenant_claim), ("JWT_ROLES_CLAIM", &mut settings.roles_claim)]
    {
        if let Some(path) = raw.text(setting) {
            *slot = ClaimPath::new(&path).map_err(|why| bad(setting, &path, why))?;
        }
    }
    let secret = match (raw.text("JWT_HS256_SECRET"), raw.text("JWT_HS256_SECRET_FILE")) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "JWT_HS256_SECRET",
                "(hidden)",
                "give JWT_HS256_SECRET or JWT_HS256_SECRET_FILE, not both",
            ));
        }
        (Some(s), None) => Some(s),
        (None, Some(path)) => Some(read("JWT_HS256_SECRET_FILE", &path)?.trim_end_matches(['\r', '\n']).to_owned()),
        (None, None) => None,
    };
    let keys = match (secret, raw.text("JWT_JWKS")) {
        (Some(_), Some(_)) => {
            return Err(bad("JWT_JWKS", "", "give an HS256 secret or a JWKS, not both"));
        }
        (Some(secret), None) => {
            StaticKeys::hs256(secret.as_bytes()).map_err(|why| bad("JWT_HS256_SECRET", "(hidden)", why))?
        }
        (None, Some(jwks)) if jwks.contains("://") => {
            let fetch = FetchSettings {
                timeout: std::time::Duration::from_secs(raw.number("JWT_JWKS_TIMEOUT_SECS")?),
                refresh_every: std::time::Duration::from_secs(raw.number("JWT_JWKS_REFRESH_SECS")?),
                unknown_kid_every: std::time::Duration::from_secs(raw.number("JWT_JWKS_UNKNOWN_KID_SECS")?),
                ca_file: raw.text("JWT_JWKS_CA_FILE").map(Into::into),
            };
            let remote = Arc::new(RemoteJwks::new(&jwks, &fetch).map_err(|why| bad("JWT_JWKS", &jwks, why))?);
            return Ok((JwtVerifier::new(settings, remote.clone()), Some(remote)));
        }
        (None, Some(path)) => {
            StaticKeys::from_jwks(&read("JWT_JWKS", &path)?).map_err(|why| bad("JWT_JWKS", &path, why))?
        }
        (None, None) => {
            return Err(bad("JWT_HS256_SECRET", "", "AUTH=jwt needs JWT_HS256_SECRET(_FILE) or JWT_JWKS"));
        }
    };
    Ok((JwtVerifier::new(settings, Arc::new(keys)), None))
}

/// The credential a request carries: `Authorization: Bearer <credential>`, else `X-Api-Key`.
/// `Err` for an `Authorization` header of another scheme or not text (401, never ignored).
pub fn credential(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let text = v.to_str().map_err(|_| AuthError::Malformed("the Authorization header is not text".into()))?;
        let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed(format!("the Authorization scheme must be Bearer, not '{scheme}'")));
        }
        return Ok(Some(rest.trim()));
    }
    match headers.get("x-api-key") {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| AuthError::Malformed("X-Api-Key is not text".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const SECRET: &[u8] = b"a secret of at least thirty-two bytes!!";

    fn token(exp: i64) -> String {
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
        let claims = serde_json::json!({"iss": "i", "aud": "a", "sub": "s", "exp": exp, "tenant": "acme"});
        let signing = format!("{head}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
        format!("{signing}.{}", URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, signing.as_bytes()).as_ref()))
    }

    fn gate() -> Gate {
        let mut settings = JwtSettings::new("i", "a");
        settings.leeway_secs = 0;
        let jwt = JwtVerifier::new(settings, Arc::new(StaticKeys::hs256(SECRET).unwrap()));
        Gate::with(Authenticator { keys: None, jwt: Some(jwt) })
    }

    /// A verified token is served from the cache until its `exp`, then verified again (and
    /// refused); a token that fails is never cached.
    #[test]
    fn verified_tokens_are_remembered_until_they_expire() {
        let g = gate();
        let t = token(1_000);
        assert!(g.authenticate_at(&t, 900).unwrap().is_ok());
        assert_eq!(g.verified.lock().unwrap().len(), 1);
        assert!(g.authenticate_at(&t, 999).unwrap().is_ok());
        assert_eq!(g.authenticate_at(&t, 1_000).unwrap().unwrap_err(), AuthError::Expired);
        let forged = format!("{}x", &t[..t.len() - 1]);
        assert!(g.authenticate_at(&forged, 900).unwrap().is_err());
        assert_eq!(g.verified.lock().unwrap().len(), 1);
    }
}
