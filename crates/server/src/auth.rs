//! The server's side of authentication (SPEC §8.1): the `AUTH` modes and their settings
//! turned into one [`Gate`] at start (keys file and JWT keys read once, every problem named by
//! its setting), and the credential of a request (`Authorization: Bearer`, `X-Api-Key`). Who a
//! credential names and what it may do is decided by `sourced-auth` and `permissions.yaml`;
//! the `Caller` of request.rs puts the two together for every handler.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderMap;

use sourced_auth::jwt::{ClaimPath, JwtSettings};
use sourced_auth::{AuthError, Authenticated, Authenticator, JwtVerifier, KeyStore, StaticKeys};

use crate::settings::{ConfigError, RawArgs, bad};

/// Whether and how requests authenticate: `None` inside is `AUTH=none` (every request is
/// trusted, the tenant is the header's: development only).
#[derive(Default)]
pub struct Gate {
    authenticator: Option<Authenticator>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let modes = match &self.authenticator {
            None => "none".to_owned(),
            Some(a) => {
                let mut m = Vec::new();
                if a.keys.is_some() {
                    m.push("keys");
                }
                if a.jwt.is_some() {
                    m.push("jwt");
                }
                m.join(",")
            }
        };
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
        let jwt = match modes.contains(&"jwt") {
            false => None,
            true => Some(jwt_verifier(raw)?),
        };
        Ok(Gate { authenticator: Some(Authenticator { keys, jwt }) })
    }

    /// A gate with this authenticator (tests).
    pub fn with(authenticator: Authenticator) -> Gate {
        Gate { authenticator: Some(authenticator) }
    }

    /// Whether requests must authenticate.
    pub fn is_on(&self) -> bool {
        self.authenticator.is_some()
    }

    /// Who `credential` names now; `None` when authentication is off.
    pub fn authenticate(&self, credential: &str) -> Option<Result<Authenticated, AuthError>> {
        let now = chrono::Utc::now().timestamp();
        self.authenticator.as_ref().map(|a| a.authenticate(credential, now))
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

fn jwt_verifier(raw: &RawArgs) -> Result<JwtVerifier, ConfigError> {
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
        (None, Some(jwks)) if jwks.starts_with("https://") || jwks.starts_with("http://") => {
            return Err(bad("JWT_JWKS", &jwks, "fetching a JWKS from a URL is not supported yet: give a file"));
        }
        (None, Some(path)) => {
            StaticKeys::from_jwks(&read("JWT_JWKS", &path)?).map_err(|why| bad("JWT_JWKS", &path, why))?
        }
        (None, None) => {
            return Err(bad("JWT_HS256_SECRET", "", "AUTH=jwt needs JWT_HS256_SECRET(_FILE) or JWT_JWKS"));
        }
    };
    Ok(JwtVerifier::new(settings, Arc::new(keys)))
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
