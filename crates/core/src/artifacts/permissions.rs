//! `permissions.yaml` (SPEC §8.1): roles → grants of actions on types, within the principal's
//! tenant, and the pure decision [`Permissions::allows`].
//!
//! ```yaml
//! roles:
//!   clerk:
//!     - {types: [order], actions: [read, list, create, patch, submit]}
//!   auditor:
//!     - {types: ["*"], actions: [read, list, subscribe]}
//!   ops:
//!     - {types: ["*"], actions: ["*"]}
//! anonymous: []          # roles of requests without credentials (default none: 401)
//! ```
//!
//! Without the file ([`Permissions::absent`]) every authenticated principal may do everything
//! within its tenants, and anonymous requests nothing: turning authentication on should not
//! lock a deployment out of its own data, and the file narrows from there.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::TypeArtifacts;
use crate::ids::TypeName;
use crate::principal::{Principal, is_role_name};

pub use crate::limits::GRANTS_PER_ROLE_MAX;
pub use crate::limits::ROLES_MAX;

/// What a request does (SPEC §8.1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// GET of a document, time travel, diff, history.
    Read,
    /// A list of a type's documents.
    List,
    /// The generic create.
    Create,
    /// The generic patch.
    Patch,
    /// The generic replace.
    Replace,
    /// The generic delete.
    Delete,
    /// A live feed: WebSocket, SSE, the global feed.
    Subscribe,
    /// Reload, process retry/skip/cancel.
    Admin,
    /// A custom command, by name.
    Command(String),
}

/// The actions that are not custom commands, by the name a permissions file gives them.
pub const GENERIC_ACTIONS: &[&str] = &["read", "list", "create", "patch", "replace", "delete", "subscribe", "admin"];

impl Action {
    /// The action a name means: a generic action, else a custom command's name. A custom
    /// command named like a generic action is granted by that action's name.
    pub fn parse(name: &str) -> Action {
        match name {
            "read" => Action::Read,
            "list" => Action::List,
            "create" => Action::Create,
            "patch" => Action::Patch,
            "replace" => Action::Replace,
            "delete" => Action::Delete,
            "subscribe" => Action::Subscribe,
            "admin" => Action::Admin,
            other => Action::Command(other.to_owned()),
        }
    }

    /// Its name in a permissions file.
    pub fn name(&self) -> &str {
        match self {
            Action::Read => "read",
            Action::List => "list",
            Action::Create => "create",
            Action::Patch => "patch",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::Subscribe => "subscribe",
            Action::Admin => "admin",
            Action::Command(n) => n,
        }
    }
}

/// Every item, or the ones listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T> {
    /// `"*"`.
    All,
    /// The items named.
    Only(BTreeSet<T>),
}

impl<T: Ord> Selection<T> {
    /// Whether `item` is selected.
    pub fn contains(&self, item: &T) -> bool {
        match self {
            Selection::All => true,
            Selection::Only(s) => s.contains(item),
        }
    }
}

/// One grant: these actions on these types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The types it covers.
    pub types: Selection<TypeName>,
    /// The actions it allows.
    pub actions: Selection<Action>,
}

/// A loaded permissions file, or the rule of its absence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// `None` when the set has no permissions file: every authenticated principal may do
    /// everything.
    roles: Option<BTreeMap<String, Vec<Grant>>>,
    anonymous: Vec<String>,
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions::absent()
    }
}

impl Permissions {
    /// The rule without a permissions file: authenticated principals may do everything within
    /// their tenants, anonymous requests nothing.
    pub fn absent() -> Permissions {
        Permissions { roles: None, anonymous: Vec::new() }
    }

    /// Whether the set has a permissions file.
    pub fn is_defined(&self) -> bool {
        self.roles.is_some()
    }

    /// Whether a request without credentials may do anything at all (else it is 401).
    pub fn anonymous_allowed(&self) -> bool {
        !self.anonymous.is_empty()
    }

    /// The roles that count for `p`: the file's `anonymous:` roles for the anonymous principal,
    /// else its own.
    fn roles_of<'a>(&'a self, p: &'a Principal) -> &'a [String] {
        if p.anonymous { &self.anonymous } else { &p.roles }
    }

    fn grants<'a>(&'a self, p: &'a Principal) -> impl Iterator<Item = &'a Grant> {
        let roles = self.roles.as_ref();
        self.roles_of(p).iter().filter_map(move |r| roles.and_then(|m| m.get(r))).flatten()
    }

    /// Whether `p` may do `action` on type `t` (in a tenant it may use, which the caller
    /// checks with [`Principal::may_use_tenant`]).
    pub fn allows(&self, p: &Principal, action: &Action, t: &TypeName) -> bool {
        if self.roles.is_none() {
            return !p.anonymous;
        }
        self.grants(p).any(|g| g.actions.contains(action) && g.types.contains(t))
    }

    /// Whether `p` may use the service's own operations (reload, process retry/skip/cancel):
    /// some grant of its roles allows `admin` (or `*`), on whatever types.
    pub fn allows_admin(&self, p: &Principal) -> bool {
        if self.roles.is_none() {
            return !p.anonymous;
        }
        self.grants(p).any(|g| g.actions.contains(&Action::Admin))
    }

    /// The types on which `p` may do `action`: all, or the ones its grants name.
    pub fn types_allowed(&self, p: &Principal, action: &Action) -> Selection<TypeName> {
        if self.roles.is_none() {
            return if p.anonymous { Selection::Only(BTreeSet::new()) } else { Selection::All };
        }
        let mut named = BTreeSet::new();
        for g in self.grants(p).filter(|g| g.actions.contains(action)) {
            match &g.types {
                Selection::All => return Selection::All,
                Selection::Only(types) => named.extend(types.iter().cloned()),
            }
        }
        Selection::Only(named)
    }

    /// The types whose events a subscription of `p` may deliver: those it may `read` (a
    /// subscription also needs `subscribe` on the type it asks for, or on `*` for every type).
    pub fn readable_types(&self, p: &Principal) -> Selection<TypeName> {
        self.types_allowed(p, &Action::Read)
    }

    /// Parses and checks a permissions file against the set's types: unknown keys, roles,
    /// types and actions are problems located in the file. A type is unknown when the set
    /// defines types and not this one (with no type defined, every type is free JSON and any
    /// valid name is accepted); an action is unknown when it is neither generic nor a custom
    /// command of one of the grant's types (of any type for `"*"`).
    pub fn parse(doc: &Value, types: &BTreeMap<TypeName, TypeArtifacts>) -> Result<Permissions, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let Some(top) = doc.as_object() else {
            return Err(vec![(String::new(), "a permissions file is an object with 'roles' and 'anonymous'".into())]);
        };
        for k in top.keys().filter(|k| !matches!(k.as_str(), "roles" | "anonymous")) {
            problems.push((format!("/{}", escape(k)), format!("unknown key '{k}'; expected roles or anonymous")));
        }
        let mut roles = BTreeMap::new();
        match top.get("roles") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                if m.len() > ROLES_MAX {
                    problems.push(("/roles".into(), format!("at most {ROLES_MAX} roles")));
                }
                for (name, grants) in m {
                    let at = format!("/roles/{}", escape(name));
                    if !is_role_name(name) {
                        problems.push((at.clone(), format!("'{name}' is not a role name ([A-Za-z0-9._:-]{{1,64}})")));
                    }
                    roles.insert(name.clone(), parse_grants(grants, &at, types, &mut problems));
                }
            }
            Some(_) => problems.push(("/roles".into(), "'roles' maps role names to lists of grants".into())),
        }
        let mut anonymous = Vec::new();
        match top.get("anonymous") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (i, r) in list.iter().enumerate() {
                    match r.as_str() {
                        Some(r) if roles.contains_key(r) => {
                            if !anonymous.iter().any(|a| a == r) {
                                anonymous.push(r.to_owned());
                            }
                        }
                        Some(r) => problems.push((format!("/anonymous/{i}"), format!("no role '{r}' is defined"))),
                        None => problems.push((format!("/anonymous/{i}"), "a role is named by a string".into())),
                    }
                }
            }
            Some(_) => problems.push(("/anonymous".into(), "'anonymous' is a list of role names".into())),
        }
        if problems.is_empty() { Ok(Permissions { roles: Some(roles), anonymous }) } else { Err(problems) }
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn parse_grants(
    v: &Value,
    at: &str,
    types: &BTreeMap<TypeName, TypeArtifacts>,
    problems: &mut Vec<(String, String)>,
) -> Vec<Grant> {
    let Some(list) = v.as_array() else {
        problems.push((at.to_owned(), "a role is a list of grants {types: [...], actions: [...]}".into()));
        return Vec::new();
    };
    if list.len() > GRANTS_PER_ROLE_MAX {
        problems.push((at.to_owned(), format!("at most {GRANTS_PER_ROLE_MAX} grants per role")));
    }
    let mut grants = Vec::new();
    for (i, g) in list.iter().enumerate() {
        let at = format!("{at}/{i}");
        let Some(m) = g.as_object() else {
            problems.push((at, "a grant is an object {types: [...], actions: [...]}".into()));
            continue;
        };
        for k in m.keys().filter(|k| !matches!(k.as_str(), "types" | "actions")) {
            problems.push((format!("{at}/{}", escape(k)), format!("unknown key '{k}'; a grant has types and actions")));
        }
        let type_selection = names(m.get("types"), &format!("{at}/types"), problems).map(|(all, named)| {
            let mut only = BTreeSet::new();
            for (j, name) in named {
                let where_ = format!("{at}/types/{j}");
                match TypeName::parse(&name) {
                    Err(e) => problems.push((where_, format!("'{name}': {}", e.message))),
                    Ok(t) if !types.is_empty() && !types.contains_key(&t) => {
                        problems.push((where_, format!("no type '{t}' is defined in the artifact set")))
                    }
                    Ok(t) => {
                        only.insert(t);
                    }
                }
            }
            if all { Selection::All } else { Selection::Only(only) }
        });
        let action_selection = names(m.get("actions"), &format!("{at}/actions"), problems).map(|(all, named)| {
            let mut only = BTreeSet::new();
            for (j, name) in named {
                let action = Action::parse(&name);
                if let Action::Command(c) = &action {
                    let defined = match &type_selection {
                        Some(Selection::Only(ts)) => ts.iter().any(|t| has_command(types, t, c)),
                        _ => types.values().any(|a| a.commands.contains_key(c)),
                    };
                    if !defined {
                        problems.push((
                            format!("{at}/actions/{j}"),
                            format!(
                                "unknown action '{c}': not one of {} nor a custom command of the grant's types",
                                GENERIC_ACTIONS.join(", ")
                            ),
                        ));
                        continue;
                    }
                }
                only.insert(action);
            }
            if all { Selection::All } else { Selection::Only(only) }
        });
        if let (Some(types), Some(actions)) = (type_selection, action_selection) {
            grants.push(Grant { types, actions });
        }
    }
    grants
}

fn has_command(types: &BTreeMap<TypeName, TypeArtifacts>, t: &TypeName, c: &str) -> bool {
    types.get(t).is_some_and(|a| a.commands.contains_key(c))
}

/// A `types` or `actions` list: whether it holds `"*"`, and the other names with their index.
/// `None` (with a problem) when it is missing or not a non-empty list of strings.
fn names(v: Option<&Value>, at: &str, problems: &mut Vec<(String, String)>) -> Option<(bool, Vec<(usize, String)>)> {
    let Some(list) = v.and_then(Value::as_array).filter(|l| !l.is_empty()) else {
        problems.push((at.to_owned(), "a non-empty list of names (or [\"*\"]) is required".into()));
        return None;
    };
    let mut all = false;
    let mut named = Vec::new();
    for (i, n) in list.iter().enumerate() {
        match n.as_str() {
            Some("*") => all = true,
            Some(s) => named.push((i, s.to_owned())),
            None => problems.push((format!("{at}/{i}"), "a name is a string".into())),
        }
    }
    Some((all, named))
}
