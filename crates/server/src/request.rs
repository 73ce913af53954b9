//! The pieces of a request every handler reads the same way: the tenant (`X-Tenant`), the
//! path's type and id, the query string's pairs and common parameters, the body within its
//! size and time limits, its media type, and the `Idempotency-Key` and `Prefer` headers. Each
//! refuses what it cannot use with a problem naming it.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use std::collections::BTreeSet;
use std::sync::Arc;

use sourced_auth::{AuthError, Authenticated};
use sourced_core::Principal;
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::permissions::{Action, Selection};
use sourced_core::ids::RESERVED_TYPE_NAMES;
use sourced_engine::{Engine, SubscriptionFilter};

use crate::auth::Gate;
use crate::ratelimit::RateLimiter;
use sourced_core::{AggregateId, CommandId, StreamKey, TenantId, TypeName, Violation};

use crate::config::HttpLimits;
use crate::problem::Problem;
use crate::state::{AppState, Result};

/// The tenant named by `X-Tenant`, if any (SPEC §1: until auth, the header chooses it).
fn tenant_header(headers: &HeaderMap) -> Result<Option<TenantId>> {
    match headers.get("x-tenant") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("\u{0}");
            TenantId::parse(s).map(Some).map_err(|mut e| {
                e.pointer = String::new();
                Problem::bad_request(format!("invalid X-Tenant header: {}", e.message), vec![e])
            })
        }
    }
}

/// Who asks, and for which tenant: resolved once per request, before its handler runs (SPEC
/// §1, §8). With `AUTH=none` the tenant is `X-Tenant`'s and everything is allowed; with
/// authentication on, the credential names the principal, `X-Tenant` may only name one of its
/// tenants (403, never switched), and [`Caller::allow`] checks `permissions.yaml`. Every
/// handler takes it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The tenant the request names, if it names one.
    named: Option<TenantId>,
    /// With authentication on: who, where, and what the artifact set lets them do.
    access: Option<Arc<Access>>,
}

/// An authenticated (or, where `permissions.yaml` allows it, anonymous) caller.
#[derive(Debug)]
pub struct Access {
    /// Who.
    pub principal: Principal,
    /// The tenant every operation of the request acts in.
    pub tenant: TenantId,
    /// When the credential stops being valid (seconds since the epoch), if it does.
    pub expires_at: Option<i64>,
    /// The artifact set whose `permissions.yaml` decides (the one current at the request).
    set: Arc<ArtifactSet>,
}

impl Caller {
    /// The caller of a request with these headers, authentication off (`AUTH=none`).
    pub fn from_headers(headers: &HeaderMap) -> Result<Caller> {
        Ok(Caller { named: tenant_header(headers)?, access: None })
    }

    /// The caller of a request with these headers, as `state`'s gate sees it: 401 for a
    /// missing or invalid credential, 403 for a tenant it does not allow.
    pub fn resolve(headers: &HeaderMap, state: &AppState) -> Result<Caller> {
        Caller::resolve_with(headers, &state.gate, &state.engine)
    }

    /// [`Caller::resolve`] with the gate and the engine (whose artifact set holds the
    /// permissions) given apart.
    pub fn resolve_with(headers: &HeaderMap, gate: &Gate, engine: &Engine) -> Result<Caller> {
        Caller::resolve_token(headers, None, gate, engine)
    }

    /// [`Caller::resolve_with`], with `token` as the credential when the headers carry none:
    /// the forms a browser can send (the first `/ws` frame, the Socket.IO CONNECT payload, an
    /// SSE `access_token` or cookie).
    pub fn resolve_token(headers: &HeaderMap, token: Option<&str>, gate: &Gate, engine: &Engine) -> Result<Caller> {
        let named = tenant_header(headers)?;
        if !gate.is_on() {
            return Ok(Caller { named, access: None });
        }
        let set = engine.artifacts();
        let credential = crate::auth::credential(headers).map_err(|e| Problem::auth(&e))?.or(token);
        let authenticated = match credential {
            Some(credential) => match gate.authenticate(credential) {
                Some(Ok(a)) => a,
                Some(Err(e)) => return Err(Problem::auth(&e)),
                None => unreachable!("the gate is on"),
            },
            None if set.permissions().anonymous_allowed() => {
                Authenticated { principal: Principal::anonymous(), expires_at: None }
            }
            None => return Err(Problem::auth(&AuthError::Missing)),
        };
        let tenant = authenticated.tenant(named.as_ref()).map_err(|e| Problem::auth(&e))?;
        let Authenticated { principal, expires_at } = authenticated;
        Ok(Caller { named, access: Some(Arc::new(Access { principal, tenant, expires_at, set })) })
    }

    /// The tenant the request acts for: the credential's (with authentication on), else the
    /// one it names, else the default tenant.
    pub fn tenant(&self) -> TenantId {
        match &self.access {
            Some(a) => a.tenant.clone(),
            None => self.named.clone().unwrap_or_else(TenantId::default_tenant),
        }
    }

    /// The tenant the request fixes, if any: the credential's with authentication on, else
    /// the one `X-Tenant` names (an envelope may name one when none is fixed).
    pub fn named_tenant(&self) -> Option<&TenantId> {
        match &self.access {
            Some(a) => Some(&a.tenant),
            None => self.named.as_ref(),
        }
    }

    /// With authentication on, a tenant an envelope or a subscription names other than the
    /// credential's: 403 `tenant-not-allowed`, as for `X-Tenant` (never switched). `None` when
    /// it is the caller's, or with authentication off (the transport then refuses a tenant
    /// other than the one `X-Tenant` fixed, 400).
    pub fn refuse_other_tenant(&self, named: &str) -> Option<Problem> {
        let a = self.access.as_ref()?;
        (a.tenant.as_str() != named).then(|| Problem::auth(&AuthError::TenantNotAllowed(named.to_owned())))
    }

    /// One token of this caller's rate limit (its principal's bucket, or its address's when it
    /// has none), or 429.
    pub fn take_token(&self, limiter: &RateLimiter, peer: Option<std::net::SocketAddr>) -> Result<()> {
        let key = match self.principal() {
            Some(p) if !p.anonymous => format!("principal:{}", p.id),
            _ => format!("address:{}", peer.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string())),
        };
        limiter.take(&key, std::time::Instant::now()).map_err(Problem::rate_limited)
    }

    /// Resolves when the caller's credential expires (a token's `exp`); never for a key or
    /// with authentication off. Long-lived connections (WebSocket, SSE) end then.
    pub fn expired(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let at = self.access.as_ref().and_then(|a| a.expires_at).map(|exp| {
            let left = u64::try_from(exp - chrono::Utc::now().timestamp()).unwrap_or(0);
            tokio::time::Instant::now() + std::time::Duration::from_secs(left)
        });
        async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Who, with authentication on.
    pub fn principal(&self) -> Option<&Principal> {
        self.access.as_ref().map(|a| &a.principal)
    }

    /// 403 unless the caller may do `action` on `type_name` (always allowed with
    /// authentication off).
    pub fn allow(&self, action: &Action, type_name: &TypeName) -> Result<()> {
        match &self.access {
            Some(a) if !a.set.permissions().allows(&a.principal, action, type_name) => {
                Err(Problem::forbidden(action.name(), Some(type_name.as_str())))
            }
            _ => Ok(()),
        }
    }

    /// 403 unless the caller holds the `admin` action (always allowed with authentication off).
    pub fn allow_admin(&self) -> Result<()> {
        match &self.access {
            Some(a) if !a.set.permissions().allows_admin(&a.principal) => Err(Problem::forbidden("admin", None)),
            _ => Ok(()),
        }
    }

    /// 403 unless the caller may do `action` on some type; `Some` of the types it may, when
    /// not on every type (`None`: every type, or authentication off). Subscriptions and the
    /// feed use it with `subscribe`, keeping to the types the caller may also read.
    pub fn types_allowed(&self, action: &Action) -> Result<Option<BTreeSet<TypeName>>> {
        let Some(a) = &self.access else { return Ok(None) };
        let permissions = a.set.permissions();
        let both = match (permissions.types_allowed(&a.principal, action), permissions.readable_types(&a.principal)) {
            (Selection::All, Selection::All) => return Ok(None),
            (Selection::All, Selection::Only(t)) | (Selection::Only(t), Selection::All) => t,
            (Selection::Only(x), Selection::Only(y)) => x.intersection(&y).cloned().collect(),
        };
        if both.is_empty() {
            return Err(Problem::forbidden(action.name(), None));
        }
        Ok(Some(both))
    }

    /// Keeps a subscription (WebSocket, SSE) or a feed read to the types the caller may
    /// subscribe to and read: 403 when it names a type outside them, or when there are none.
    pub fn restrict(&self, filter: &mut SubscriptionFilter) -> Result<()> {
        let Some(types) = self.types_allowed(&Action::Subscribe)? else { return Ok(()) };
        if let Some(t) = &filter.target_name
            && !types.contains(t)
        {
            return Err(Problem::forbidden("subscribe", Some(t.as_str())));
        }
        filter.types = Some(Arc::new(types));
        Ok(())
    }

    /// The stream a resource path names, in the caller's tenant.
    pub fn key(&self, ty: &str, id: &str) -> Result<StreamKey> {
        Ok(StreamKey { tenant: self.tenant(), type_name: type_name(ty)?, id: aggregate_id(id)? })
    }
}

impl axum::extract::FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Caller> {
        // EventSource cannot set headers: `GET /events` also takes `access_token` or the
        // `sourced_token` cookie (docs/security.md names the risks).
        let token = (parts.uri.path() == "/events").then(|| sse_token(parts)).flatten();
        let caller = Caller::resolve_token(&parts.headers, token.as_deref(), &state.gate, &state.engine)?;
        if let Some(limiter) = &state.rate_limit {
            let peer =
                parts.extensions.get::<axum::extract::ConnectInfo<crate::stall::StallGuard>>().and_then(|c| c.0.peer());
            caller.take_token(limiter, peer)?;
        }
        Ok(caller)
    }
}

/// An aggregate type from the path: reserved names have no resource here (404).
pub(crate) fn type_name(raw: &str) -> Result<TypeName> {
    if RESERVED_TYPE_NAMES.contains(&raw) {
        return Err(Problem::not_found(format!("'{raw}' is not available in this version")));
    }
    TypeName::parse(raw)
        .map_err(|e| Problem::bad_request(format!("invalid aggregate type in path: {}", e.message), vec![]))
}

pub(crate) fn aggregate_id(raw: &str) -> Result<AggregateId> {
    AggregateId::parse(raw)
        .map_err(|e| Problem::bad_request(format!("invalid aggregate id in path: {}", e.message), vec![]))
}

/// Reads the whole body, refusing one over the limit with 413 before or while reading, and one
/// that takes longer than `BODY_READ_TIMEOUT_MS` with 408 (and the connection is closed).
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limits: &HttpLimits) -> Result<Bytes> {
    let limit = limits.body_bytes_max;
    let after = std::time::Duration::from_millis(limits.body_read_timeout_ms);
    match tokio::time::timeout(after, read_body_within(body, headers, limit)).await {
        Ok(read) => read,
        Err(_) => Err(Problem::body_timeout(limits.body_read_timeout_ms)),
    }
}

pub(crate) async fn read_body_within(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes> {
    let too_large = || Problem::body_too_large(limit);
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Problem::bad_request(format!("could not read the request body: {e}"), vec![])),
    }
}

/// Parses a client's JSON body, nested at most `depth_max` deep (the core's limit on bodies
/// plus the levels of the envelope around them), refusing what could not be stored as sent
/// (`sourced_core::json`).
pub(crate) fn parse_json(bytes: &[u8], depth_max: usize) -> Result<Value> {
    if bytes.is_empty() {
        return Err(Problem::bad_request("the request body is empty; a JSON value is required", vec![]));
    }
    sourced_core::json::parse(bytes, depth_max).map_err(Problem::from)
}

/// The media type of the body, lower-case, without parameters.
pub(crate) fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

pub(crate) fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

pub(crate) fn unsupported_media(got: Option<String>, allowed: &[&str]) -> Problem {
    Problem::unsupported_media_type(got.as_deref(), allowed)
}

pub(crate) fn query_pairs(raw: &Option<String>, known: &[&str]) -> Result<Vec<(String, String)>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| Problem::bad_request(format!("malformed query string: {e}"), vec![]))?;
    let unknown: Vec<Violation> = pairs
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, _)| Violation::new("", format!("unknown query parameter '{k}'")))
        .collect();
    if !unknown.is_empty() {
        return Err(Problem::bad_request(
            format!("unknown query parameter; known here: {}", known.join(", ")),
            unknown,
        ));
    }
    Ok(pairs)
}

pub(crate) fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

pub(crate) fn page_limit(pairs: &[(String, String)], limits: &HttpLimits) -> Result<usize> {
    match param(pairs, "limit") {
        None => Ok(limits.page_limit_default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=limits.page_limit_max).contains(&n) => Ok(n),
            _ => Err(Problem::bad_request(
                format!("limit must be a whole number from 1 to {}", limits.page_limit_max),
                vec![],
            )),
        },
    }
}

pub(crate) fn flag(pairs: &[(String, String)], name: &str) -> Result<bool> {
    match param(pairs, name) {
        None | Some("false") => Ok(false),
        Some("" | "true") => Ok(true),
        Some(other) => Err(Problem::bad_request(format!("{name} must be true or false, not {other:?}"), vec![])),
    }
}

/// The `Idempotency-Key` header as a command id.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<CommandId>> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    match v.to_str() {
        Ok(s) if !s.trim().is_empty() && s.len() <= 256 => Ok(Some(CommandId::from_idempotency_key(s.trim()))),
        _ => Err(Problem::bad_request("Idempotency-Key must be 1 to 256 visible ASCII characters", vec![])),
    }
}

/// The token of an SSE request: its `access_token` query parameter, else its `sourced_token`
/// cookie.
fn sse_token(parts: &axum::http::request::Parts) -> Option<String> {
    let query = parts.uri.query().unwrap_or("");
    let from_query = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "access_token").map(|(_, v)| v));
    from_query.or_else(|| {
        parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix("sourced_token=").map(str::to_owned))
    })
}

/// The `Idempotency-Key` header as the client sent it (trimmed), to name it in a problem.
pub(crate) fn idempotency_key_text(headers: &HeaderMap) -> Option<&str> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

pub(crate) fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("return=minimal"))
}
