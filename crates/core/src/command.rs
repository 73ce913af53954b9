//! The command envelope (SPEC §2.1): parsing a wire object into a validated [`Command`],
//! collecting every violation, and the content fingerprint used for idempotency (SPEC §2.4).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{DomainError, Violation};
use crate::ids::{AggregateId, CommandId, StreamKey, TenantId, TypeName};
use crate::version::ExpectedVersion;

/// The `name` of every generic command.
pub const GENERIC_COMMAND_NAME: &str = "aggregate-modification";
/// Longest command name accepted.
pub const COMMAND_NAME_LEN_MAX: usize = 128;

const ENVELOPE_FIELDS: &[&str] =
    &["id", "type", "name", "tenant", "targetName", "targetId", "version", "body", "context"];

/// What a command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// Create a new aggregate from a document.
    Create,
    /// Apply an RFC 6902 patch.
    Patch,
    /// Apply an RFC 7396 merge patch (HTTP `application/merge-patch+json` only; not a wire type).
    MergePatch,
    /// Replace the document (diffed to a patch), or create it when absent.
    Replace,
    /// Delete the aggregate.
    Delete,
    /// A custom command defined by artifacts (SPEC §4.2).
    Logic,
    /// A command issued by a process manager (SPEC §4.5).
    Orchestration,
}

impl CommandKind {
    /// The wire name (`type` in the envelope).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Create => "create",
            CommandKind::Patch => "patch",
            CommandKind::MergePatch => "merge-patch",
            CommandKind::Replace => "replace",
            CommandKind::Delete => "delete",
            CommandKind::Logic => "logic",
            CommandKind::Orchestration => "orchestration",
        }
    }

    fn from_wire(s: &str) -> Option<Self> {
        Some(match s {
            "create" => CommandKind::Create,
            "patch" => CommandKind::Patch,
            "replace" => CommandKind::Replace,
            "delete" => CommandKind::Delete,
            "logic" => CommandKind::Logic,
            "orchestration" => CommandKind::Orchestration,
            _ => return None,
        })
    }

    /// Whether this is one of the generic commands of SPEC §2.2.
    pub fn is_generic(self) -> bool {
        !matches!(self, CommandKind::Logic | CommandKind::Orchestration)
    }
}

/// A validated command.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// The command id, the idempotency key.
    pub id: CommandId,
    /// What it asks for.
    pub kind: CommandKind,
    /// `aggregate-modification` for generic commands, the custom command's name otherwise.
    pub name: String,
    /// The target stream.
    pub key: StreamKey,
    /// The expected version, if the client gave one.
    pub expected: Option<ExpectedVersion>,
    /// Document, patch, or payload; `Null` when absent.
    pub body: Value,
    /// Free metadata copied to the events.
    pub context: Map<String, Value>,
    /// SHA-256 of the command's content (everything but its id), hex: equal commands, equal
    /// fingerprints, whatever the order of object keys.
    pub fingerprint: String,
}

/// What the transport knows before it reads the envelope.
#[derive(Clone, Debug)]
pub struct EnvelopeDefaults {
    /// The tenant to use when the envelope names none.
    pub tenant: TenantId,
    /// Whether the transport fixes the tenant (an envelope naming another one is refused).
    pub tenant_fixed: bool,
    /// The aggregate id to use for a create that names none.
    pub generated_id: AggregateId,
}

impl Command {
    /// Parses and validates a wire envelope, reporting every violation found.
    pub fn from_envelope(envelope: &Value, defaults: EnvelopeDefaults) -> Result<Command, DomainError> {
        Self::from_envelope_value(envelope.clone(), defaults)
    }

    /// As [`Command::from_envelope`], taking the envelope by value so its body is moved into
    /// the command rather than copied.
    pub fn from_envelope_value(envelope: Value, defaults: EnvelopeDefaults) -> Result<Command, DomainError> {
        let Value::Object(mut env) = envelope else {
            return Err(invalid("", "the command envelope must be a JSON object"));
        };
        // PostgreSQL cannot store U+0000 in jsonb: refused on every path, on every backend.
        crate::json::check_members(&env, "")?;
        let body = env.shift_remove("body").unwrap_or(Value::Null);
        let env = env;
        let mut v = Vec::new();
        for key in env.keys() {
            if !ENVELOPE_FIELDS.contains(&key.as_str()) {
                v.push(Violation::new(format!("/{}", escape(key)), format!("unknown field '{key}'")));
            }
        }
        let id = match env.get("id") {
            None | Some(Value::Null) => Some(CommandId::generate()),
            Some(Value::String(s)) => match Uuid::parse_str(s) {
                Ok(u) => Some(CommandId(u)),
                Err(_) => {
                    v.push(Violation::new("/id", "the command id must be a UUID"));
                    None
                }
            },
            Some(_) => {
                v.push(Violation::new("/id", "the command id must be a UUID string"));
                None
            }
        };
        let kind = match env.get("type") {
            Some(Value::String(s)) => CommandKind::from_wire(s).or_else(|| {
                v.push(Violation::new(
                    "/type",
                    format!("unknown command type '{s}': use create, patch, replace, delete, logic or orchestration"),
                ));
                None
            }),
            Some(_) => {
                v.push(Violation::new("/type", "the command type must be a string"));
                None
            }
            None => {
                v.push(Violation::new("/type", "the command type is required"));
                None
            }
        };
        let name = match env.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= COMMAND_NAME_LEN_MAX => Some(s.clone()),
            Some(_) => {
                v.push(Violation::new(
                    "/name",
                    format!("the command name must be a string of 1 to {COMMAND_NAME_LEN_MAX} characters"),
                ));
                None
            }
        };
        let tenant = match env.get("tenant") {
            None | Some(Value::Null) => Some(defaults.tenant.clone()),
            Some(Value::String(s)) => match TenantId::parse(s) {
                Ok(t) if defaults.tenant_fixed && t != defaults.tenant => {
                    v.push(Violation::new(
                        "/tenant",
                        format!("this connection acts for tenant '{}', not '{t}'", defaults.tenant),
                    ));
                    None
                }
                Ok(t) => Some(t),
                Err(e) => {
                    v.push(e);
                    None
                }
            },
            Some(_) => {
                v.push(Violation::new("/tenant", "the tenant must be a string"));
                None
            }
        };
        let type_name = match env.get("targetName") {
            Some(Value::String(s)) => TypeName::parse(s).map_err(|e| v.push(e)).ok(),
            Some(_) => {
                v.push(Violation::new("/targetName", "targetName must be a string"));
                None
            }
            None => {
                v.push(Violation::new("/targetName", "targetName is required"));
                None
            }
        };
        let given_id = match env.get("targetId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => AggregateId::parse(s).map_err(|e| v.push(e)).ok(),
            Some(_) => {
                v.push(Violation::new("/targetId", "targetId must be a string"));
                None
            }
        };
        let expected = match env.get("version") {
            None | Some(Value::Null) => None,
            Some(x) => match serde_json::from_value::<ExpectedVersion>(x.clone()) {
                Ok(e) => Some(e),
                Err(e) => {
                    v.push(Violation::new("/version", e.to_string()));
                    None
                }
            },
        };
        if !matches!(body, Value::Null | Value::Object(_) | Value::Array(_)) {
            v.push(Violation::new("/body", "the body must be an object or an array"));
        }
        let context = match env.get("context") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                v.push(Violation::new("/context", "the context must be an object"));
                Map::new()
            }
        };

        // Rules that tie fields together, once each field is known.
        let mut target_id = given_id.clone();
        if let Some(kind) = kind {
            match kind {
                CommandKind::Create | CommandKind::Replace => {
                    if !body.is_object() {
                        v.push(Violation::new(
                            "/body",
                            format!("a {} needs a document object as its body", kind.as_str()),
                        ));
                    }
                }
                CommandKind::Patch => {
                    if !body.is_array() {
                        v.push(Violation::new("/body", "a patch needs an RFC 6902 patch array as its body"));
                    }
                }
                CommandKind::MergePatch => {
                    if !body.is_object() {
                        v.push(Violation::new("/body", "a merge patch must be a JSON object"));
                    }
                }
                CommandKind::Delete => {
                    if !body.is_null() {
                        v.push(Violation::new("/body", "a delete takes no body"));
                    }
                }
                CommandKind::Logic | CommandKind::Orchestration => {
                    if name.is_none() {
                        v.push(Violation::new("/name", "a custom command needs its name"));
                    }
                }
            }
            if kind == CommandKind::Create {
                let body_id = body.get("id");
                match (body_id, &given_id) {
                    (Some(Value::String(b)), Some(t)) if b != t.as_str() => {
                        v.push(Violation::new("/body/id", format!("body id '{b}' differs from targetId '{t}'")))
                    }
                    (Some(Value::String(b)), None) => match AggregateId::parse(b) {
                        Ok(id) => target_id = Some(id),
                        Err(e) => v.push(Violation::new("/body/id", e.message)),
                    },
                    (Some(Value::Null) | None, None) => target_id = Some(defaults.generated_id.clone()),
                    (Some(Value::String(_)) | Some(Value::Null) | None, Some(_)) => {}
                    (Some(_), _) => v.push(Violation::new("/body/id", "the id must be a string")),
                }
            } else if given_id.is_none() && env.get("targetId").is_none_or(Value::is_null) {
                v.push(Violation::new("/targetId", format!("targetId is required for {}", kind.as_str())));
            }
            if kind.is_generic() && name.as_deref().is_some_and(|n| n != GENERIC_COMMAND_NAME) {
                v.push(Violation::new("/name", format!("a generic command's name is '{GENERIC_COMMAND_NAME}'")));
            }
        }
        if !v.is_empty() {
            return Err(DomainError::InvalidCommand(v));
        }
        let (Some(id), Some(kind), Some(tenant), Some(type_name), Some(agg_id)) =
            (id, kind, tenant, type_name, target_id)
        else {
            unreachable!("every missing field was reported as a violation");
        };
        let name = name.unwrap_or_else(|| GENERIC_COMMAND_NAME.to_owned());
        let fingerprint =
            content_fingerprint(kind, &name, &tenant, &type_name, given_id.as_ref(), expected, &body, &context);
        Ok(Command {
            id,
            kind,
            name,
            key: StreamKey { tenant, type_name, id: agg_id },
            expected,
            body,
            context,
            fingerprint,
        })
    }
}

impl Command {
    /// Turns a parsed `patch` command into an RFC 7396 merge patch with `merge` as its body
    /// (HTTP `application/merge-patch+json`; the envelope has no such type).
    pub fn into_merge_patch(mut self, merge: Value) -> Result<Command, DomainError> {
        if !merge.is_object() {
            return Err(invalid("/body", "a merge patch must be a JSON object"));
        }
        crate::json::check_strings(&merge, "/body")?;
        self.kind = CommandKind::MergePatch;
        self.body = merge;
        self.fingerprint = content_fingerprint(
            self.kind,
            &self.name,
            &self.key.tenant,
            &self.key.type_name,
            Some(&self.key.id),
            self.expected,
            &self.body,
            &self.context,
        );
        Ok(self)
    }
}

fn invalid(pointer: &str, message: &str) -> DomainError {
    DomainError::InvalidCommand(vec![Violation::new(pointer, message)])
}

/// Escapes a key for use as one JSON Pointer token (RFC 6901).
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// SHA-256, hex, of the canonical JSON (object keys sorted) of a command's content: everything
/// but its id. `target_id` is the id as the client gave it (none for a create that names none).
#[allow(clippy::too_many_arguments)]
fn content_fingerprint(
    kind: CommandKind,
    name: &str,
    tenant: &TenantId,
    type_name: &TypeName,
    target_id: Option<&AggregateId>,
    expected: Option<ExpectedVersion>,
    body: &Value,
    context: &Map<String, Value>,
) -> String {
    let mut h = Sha256::new();
    for scalar in [
        Some(kind.as_str()),
        Some(name),
        Some(tenant.as_str()),
        Some(type_name.as_str()),
        target_id.map(AggregateId::as_str),
    ] {
        // Writing to a hasher cannot fail.
        let _ = serde_json::to_writer(HashWriter(&mut h), &scalar);
        h.update([0x1e]);
    }
    let _ = serde_json::to_writer(HashWriter(&mut h), &expected);
    h.update([0x1e]);
    canonical(body, &mut h);
    h.update([0x1e]);
    canonical_map(context, &mut h);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a hasher through `io::Write`, so scalars are hashed as serde_json writes them.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn canonical_map(m: &Map<String, Value>, h: &mut Sha256) {
    let mut entries: Vec<(&String, &Value)> = m.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    h.update(b"{");
    for (k, v) in entries {
        // Writing to a hasher cannot fail.
        let _ = serde_json::to_writer(HashWriter(h), k);
        h.update(b":");
        canonical(v, h);
        h.update(b",");
    }
    h.update(b"}");
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => canonical_map(m, h),
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        other => {
            let _ = serde_json::to_writer(HashWriter(h), other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> EnvelopeDefaults {
        EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("generated").unwrap(),
        }
    }

    fn pointers(e: DomainError) -> Vec<String> {
        match e {
            DomainError::InvalidCommand(v) => v.into_iter().map(|v| v.pointer).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_takes_id_from_target_then_body_then_generates() {
        let c =
            Command::from_envelope(&json!({"type": "create", "targetName": "order", "body": {}}), defaults()).unwrap();
        assert_eq!(c.key.id.as_str(), "generated");
        let c =
            Command::from_envelope(&json!({"type": "create", "targetName": "order", "body": {"id": "o1"}}), defaults())
                .unwrap();
        assert_eq!(c.key.id.as_str(), "o1");
        let c = Command::from_envelope(
            &json!({"type": "create", "targetName": "order", "targetId": "o2", "body": {}}),
            defaults(),
        )
        .unwrap();
        assert_eq!(c.key.id.as_str(), "o2");
        let e = Command::from_envelope(
            &json!({"type": "create", "targetName": "order", "targetId": "o2", "body": {"id": "o3"}}),
            defaults(),
        )
        .unwrap_err();
        assert_eq!(pointers(e), ["/body/id"]);
    }

    #[test]
    fn every_violation_is_reported() {
        let e = Command::from_envelope(
            &json!({"id": "nope", "type": "jump", "targetName": "Bad", "version": "latest", "extra": 1, "context": 3}),
            defaults(),
        )
        .unwrap_err();
        let mut p = pointers(e);
        p.sort();
        assert_eq!(p, ["/context", "/extra", "/id", "/targetName", "/type", "/version"]);
    }

    #[test]
    fn shape_rules_per_type() {
        for (env, want) in [
            (json!({"type": "patch", "targetName": "o", "targetId": "1", "body": {}}), "/body"),
            (json!({"type": "patch", "targetName": "o", "body": []}), "/targetId"),
            (json!({"type": "delete", "targetName": "o", "targetId": "1", "body": {}}), "/body"),
            (json!({"type": "logic", "targetName": "o", "targetId": "1"}), "/name"),
            (json!({"type": "create", "targetName": "o", "body": []}), "/body"),
            (json!({"type": "create", "targetName": "o", "name": "x", "body": {}}), "/name"),
        ] {
            assert_eq!(pointers(Command::from_envelope(&env, defaults()).unwrap_err()), [want], "{env}");
        }
    }

    #[test]
    fn fixed_tenant_is_enforced() {
        let d = EnvelopeDefaults { tenant_fixed: true, ..defaults() };
        let e = Command::from_envelope(
            &json!({"type": "delete", "tenant": "other", "targetName": "o", "targetId": "1"}),
            d,
        )
        .unwrap_err();
        assert_eq!(pointers(e), ["/tenant"]);
    }

    #[test]
    fn fingerprint_ignores_id_and_key_order() {
        let a = Command::from_envelope(
            &json!({"type": "create", "targetName": "o", "targetId": "1", "body": {"a": 1, "b": 2}}),
            defaults(),
        )
        .unwrap();
        let b = Command::from_envelope(
            &json!({"targetId": "1", "targetName": "o", "type": "create", "body": {"b": 2, "a": 1}}),
            defaults(),
        )
        .unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.fingerprint, b.fingerprint);
        let c = Command::from_envelope(
            &json!({"type": "create", "targetName": "o", "targetId": "1", "body": {"a": 1, "b": 3}}),
            defaults(),
        )
        .unwrap();
        assert_ne!(a.fingerprint, c.fingerprint);
    }
}
