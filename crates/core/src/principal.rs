//! Who issues a request (SPEC §8.1): a [`Principal`] resolved from a credential (an API key or a
//! JWT, in `sourced-auth`) or the anonymous principal, with the tenants it may act in and its
//! roles. Its JSON form ([`Principal::to_json`]) is what CEL expressions see as `principal` and
//! what event metadata records:
//!
//! ```json
//! {"id": "alice", "tenants": ["acme"], "roles": ["clerk"], "anonymous": false}
//! ```
//!
//! `tenants` is always a list (one tenant is a list of one), so an expression is written one
//! way whatever the credential: `principal.tenants.exists(t, t == 'acme')`. The anonymous
//! principal is `{"id": "anonymous", "tenants": [], "roles": [], "anonymous": true}`: its tenant is
//! the one the request names, and its roles are the `anonymous:` roles of `permissions.yaml`
//! (see [`crate::artifacts::permissions`]), not its own.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::TenantId;

pub use crate::limits::PRINCIPAL_ID_LEN_MAX;
pub use crate::limits::PRINCIPAL_ROLES_MAX;
pub use crate::limits::PRINCIPAL_TENANTS_MAX;
pub use crate::limits::ROLE_LEN_MAX;

/// The id of the anonymous principal.
pub const ANONYMOUS_ID: &str = "anonymous";

/// The author of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// Who: a JWT's `sub` or a keys file's `principal`.
    pub id: String,
    /// The tenants it may act in (empty for the anonymous principal, which acts in the tenant
    /// the request names).
    pub tenants: Vec<TenantId>,
    /// Its roles, as the credential gave them (roles `permissions.yaml` does not define grant
    /// nothing).
    pub roles: Vec<String>,
    /// True for a request without a credential.
    #[serde(default)]
    pub anonymous: bool,
}

/// Why a principal could not be made from a credential's values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrincipalError {
    /// The id is empty, too long or holds control characters.
    #[error("principal id must be 1 to {PRINCIPAL_ID_LEN_MAX} bytes without control characters")]
    Id,
    /// No tenant, or too many.
    #[error("a principal needs 1 to {PRINCIPAL_TENANTS_MAX} tenants")]
    Tenants,
    /// A tenant name is not valid.
    #[error("'{0}' is not a valid tenant name")]
    Tenant(String),
    /// Too many roles.
    #[error("a principal has at most {PRINCIPAL_ROLES_MAX} roles")]
    Roles,
    /// A role name is not valid.
    #[error("'{0}' is not a valid role name ([A-Za-z0-9._:-]{{1,{ROLE_LEN_MAX}}})")]
    Role(String),
}

/// Whether `s` is a role name: `[A-Za-z0-9._:-]{1,64}` (`:` for namespaced roles such as
/// `app:admin` that identity providers issue).
pub fn is_role_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= ROLE_LEN_MAX && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

impl Principal {
    /// A principal from a credential's values, checked: an id, at least one tenant, its roles
    /// (duplicates dropped, order kept).
    pub fn new<T: AsRef<str>, R: AsRef<str>>(
        id: &str,
        tenants: &[T],
        roles: &[R],
    ) -> Result<Principal, PrincipalError> {
        if id.is_empty() || id.len() > PRINCIPAL_ID_LEN_MAX || id.chars().any(char::is_control) {
            return Err(PrincipalError::Id);
        }
        if tenants.is_empty() || tenants.len() > PRINCIPAL_TENANTS_MAX {
            return Err(PrincipalError::Tenants);
        }
        let mut parsed: Vec<TenantId> = Vec::with_capacity(tenants.len());
        for t in tenants {
            let t = TenantId::parse(t.as_ref()).map_err(|_| PrincipalError::Tenant(t.as_ref().to_owned()))?;
            if !parsed.contains(&t) {
                parsed.push(t);
            }
        }
        if roles.len() > PRINCIPAL_ROLES_MAX {
            return Err(PrincipalError::Roles);
        }
        let mut kept: Vec<String> = Vec::with_capacity(roles.len());
        for r in roles {
            let r = r.as_ref();
            if !is_role_name(r) {
                return Err(PrincipalError::Role(r.to_owned()));
            }
            if !kept.iter().any(|k| k == r) {
                kept.push(r.to_owned());
            }
        }
        Ok(Principal { id: id.to_owned(), tenants: parsed, roles: kept, anonymous: false })
    }

    /// The principal of a request without a credential.
    pub fn anonymous() -> Principal {
        Principal { id: ANONYMOUS_ID.to_owned(), tenants: Vec::new(), roles: Vec::new(), anonymous: true }
    }

    /// Whether it may act in `tenant`: one of its tenants, or any tenant for the anonymous
    /// principal (whose grants come from `permissions.yaml`'s `anonymous:` alone).
    pub fn may_use_tenant(&self, tenant: &TenantId) -> bool {
        self.anonymous || self.tenants.contains(tenant)
    }

    /// The tenant a request acts in: the one it names (`X-Tenant`) if this principal may use
    /// it, else `None` (403, never silently switched); with no tenant named, its only tenant,
    /// or `None` when it has several (the request must say which).
    pub fn resolve_tenant(&self, named: Option<&TenantId>) -> Option<TenantId> {
        match named {
            Some(t) => self.may_use_tenant(t).then(|| t.clone()),
            None if self.anonymous => Some(TenantId::default_tenant()),
            None => match self.tenants.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            },
        }
    }

    /// Its JSON form, `principal` in CEL and in event metadata (see the module docs).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    #[test]
    fn json_shape_is_the_documented_one() {
        let p = Principal::new("alice", &["acme"], &["clerk", "clerk", "app:ops"]).unwrap();
        assert_eq!(
            p.to_json(),
            serde_json::json!({"id": "alice", "tenants": ["acme"], "roles": ["clerk", "app:ops"], "anonymous": false})
        );
        let back: Principal = serde_json::from_value(p.to_json()).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            Principal::anonymous().to_json(),
            serde_json::json!({"id": "anonymous", "tenants": [], "roles": [], "anonymous": true})
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let none: [&str; 0] = [];
        assert_eq!(Principal::new("", &["a"], &none), Err(PrincipalError::Id));
        assert_eq!(Principal::new("a\n", &["a"], &none), Err(PrincipalError::Id));
        assert_eq!(Principal::new(&"x".repeat(257), &["a"], &none), Err(PrincipalError::Id));
        assert_eq!(Principal::new("a", &none, &none), Err(PrincipalError::Tenants));
        assert_eq!(Principal::new("a", &[".."], &none), Err(PrincipalError::Tenant("..".into())));
        assert_eq!(Principal::new("a", &["t"], &["has space"]), Err(PrincipalError::Role("has space".into())));
        let many: Vec<String> = (0..65).map(|i| format!("r{i}")).collect();
        assert_eq!(Principal::new("a", &["t"], &many), Err(PrincipalError::Roles));
    }

    #[test]
    fn tenants_are_resolved_never_switched() {
        let one = Principal::new("a", &["acme"], &["r"]).unwrap();
        let two = Principal::new("b", &["acme", "beta"], &["r"]).unwrap();
        let anon = Principal::anonymous();
        assert_eq!(one.resolve_tenant(None), Some(tenant("acme")));
        assert_eq!(one.resolve_tenant(Some(&tenant("acme"))), Some(tenant("acme")));
        assert_eq!(one.resolve_tenant(Some(&tenant("beta"))), None);
        assert_eq!(two.resolve_tenant(None), None);
        assert_eq!(two.resolve_tenant(Some(&tenant("beta"))), Some(tenant("beta")));
        assert_eq!(anon.resolve_tenant(Some(&tenant("beta"))), Some(tenant("beta")));
        assert_eq!(anon.resolve_tenant(None), Some(TenantId::default_tenant()));
    }
}
