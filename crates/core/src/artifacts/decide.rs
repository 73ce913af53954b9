//! The decision with artifacts (SPEC §2.3 steps 5–6): generic or custom command, then the next
//! state checked against the type's schema, its lifecycle and its business rules.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::expr::{Bindings, ExprError};
use super::rules::Severity;
use super::{ArtifactSet, CustomCommand, OpValue, TypeArtifacts};
use crate::aggregate::{Aggregate, Change, Decision, decide as decide_generic, evolve_bounded};
use crate::command::{Command, CommandKind};
use crate::error::{DomainError, Violation};
use crate::limits::Limits;
use crate::patch;
use crate::timestamp;

/// A decision and the warnings of rules of severity `warn`.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    /// The events and the next state.
    pub decision: Decision,
    /// `{"rule", "message"}` per warning rule that failed.
    pub warnings: Vec<Value>,
}

/// The name rules and transitions use for a command: the custom command's name, or its generic
/// type (a merge patch is a `patch`).
pub fn rule_name(cmd: &Command) -> &str {
    match cmd.kind {
        CommandKind::Logic | CommandKind::Orchestration => &cmd.name,
        CommandKind::MergePatch => "patch",
        k => k.as_str(),
    }
}

/// The command as expressions see it (`command`): the envelope, with `body`.
pub fn command_json(cmd: &Command) -> Value {
    json!({
        "id": cmd.id.to_string(),
        "type": cmd.kind.as_str(),
        "name": cmd.name,
        "tenant": cmd.key.tenant.as_str(),
        "targetName": cmd.key.type_name.as_str(),
        "targetId": cmd.key.id.as_str(),
        "version": cmd.expected,
        "body": cmd.body,
        "context": Value::Object(cmd.context.clone()),
    })
}

/// Decides `cmd` with the artifacts of its type (none: the generic rules alone).
pub fn decide(
    set: &ArtifactSet,
    agg: &Aggregate,
    cmd: &Command,
    limits: &Limits,
    now: DateTime<Utc>,
    principal: Option<&Value>,
) -> Result<Checked, DomainError> {
    let Some(ta) = set.for_type(&cmd.key.type_name) else {
        return Ok(Checked { decision: decide_generic(agg, cmd, limits, now)?, warnings: Vec::new() });
    };
    let now_text = timestamp::format(&now);
    let command = command_json(cmd);
    let decision = match cmd.kind {
        CommandKind::Logic | CommandKind::Orchestration => {
            let def =
                ta.commands.get(&cmd.name).ok_or_else(|| DomainError::UnknownCommand { name: cmd.name.clone() })?;
            decide_custom(def, agg, cmd, &command, limits, now, &now_text, principal)?
        }
        CommandKind::Create | CommandKind::Replace if agg.version.0 == 0 => {
            // A new document starts in the lifecycle's initial state when it names none.
            match &ta.lifecycle {
                Some(l) if cmd.body.pointer(&l.field).is_none() => {
                    let mut with_initial = cmd.clone();
                    l.apply_initial(&mut with_initial.body);
                    decide_generic(agg, &with_initial, limits, now)?
                }
                _ => decide_generic(agg, cmd, limits, now)?,
            }
        }
        _ => decide_generic(agg, cmd, limits, now)?,
    };
    let warnings = check(ta, agg, cmd, &decision, &command, &now_text, principal)?;
    Ok(Checked { decision, warnings })
}

/// Schema, lifecycle and rules on the decided next state.
fn check(
    ta: &TypeArtifacts,
    agg: &Aggregate,
    cmd: &Command,
    decision: &Decision,
    command: &Value,
    now: &str,
    principal: Option<&Value>,
) -> Result<Vec<Value>, DomainError> {
    let next = decision.next.state.as_ref();
    let deleting = decision.next.deleted;
    let b = Bindings {
        state: agg.state.as_ref(),
        next,
        command: Some(command),
        event: None,
        principal,
        now: Some(now),
        ..Default::default()
    };
    if !deleting && let (Some(schema), Some(next)) = (&ta.schema, next) {
        let v = schema.violations(next, "");
        if !v.is_empty() {
            return Err(DomainError::InvalidDocument(v));
        }
    }
    if !deleting && let (Some(l), Some(next)) = (&ta.lifecycle, next) {
        let prev = if agg.version.0 == 0 { None } else { agg.state.as_ref() };
        l.check(prev, next, rule_name(cmd), &b)?;
    }
    let mut violations = Vec::new();
    let mut warnings = Vec::new();
    for rule in ta.rules.iter().filter(|r| r.applies_to(rule_name(cmd))) {
        // A rule that cannot be evaluated refuses the command, whatever its severity.
        let (failed_message, hard) = match rule.require.eval_bool(&b) {
            Ok(true) => continue,
            Ok(false) => (rule.message.clone(), rule.severity == Severity::Reject),
            // An expression over its cost or size limits is that limit's error, not the rule's.
            Err(e @ ExprError::Limit { .. }) => return Err(e.into()),
            Err(e) => (format!("{} (the rule could not be evaluated: {e})", rule.message), true),
        };
        if hard {
            violations.push(Violation {
                pointer: String::new(),
                message: failed_message,
                rule: Some(rule.name.clone()),
            });
        } else {
            warnings.push(json!({"rule": rule.name, "message": failed_message}));
        }
    }
    if violations.is_empty() { Ok(warnings) } else { Err(DomainError::RuleViolations(violations)) }
}

#[allow(clippy::too_many_arguments)]
fn decide_custom(
    def: &CustomCommand,
    agg: &Aggregate,
    cmd: &Command,
    command: &Value,
    limits: &Limits,
    now: DateTime<Utc>,
    now_text: &str,
    principal: Option<&Value>,
) -> Result<Decision, DomainError> {
    limits.check_depth(&cmd.body)?;
    if agg.deleted {
        return Err(DomainError::Deleted { version: agg.version });
    }
    if agg.state.is_none() && !def.creates {
        return Err(DomainError::NotFound);
    }
    if let Some(schema) = &def.payload {
        let v = schema.violations(&cmd.body, "/body");
        if !v.is_empty() {
            return Err(DomainError::InvalidPayload(v));
        }
    }
    let b = Bindings {
        state: agg.state.as_ref(),
        next: None,
        command: Some(command),
        event: None,
        principal,
        now: Some(now_text),
        ..Default::default()
    };
    let mut failed = Vec::new();
    for (i, (expr, message)) in def.require.iter().enumerate() {
        match expr.eval_bool(&b) {
            Ok(true) => {}
            Ok(false) => failed.push(Violation::new(format!("/require/{i}"), message.clone())),
            Err(e) => return Err(e.into()),
        }
    }
    if !failed.is_empty() {
        return Err(DomainError::PreconditionFailed(failed));
    }
    let mut state = agg.state.clone().unwrap_or_else(|| Value::Object(Map::new()));
    let mut changes = Vec::with_capacity(def.emit.len());
    for spec in &def.emit {
        // Values are computed against the state before the command: every event of one
        // command sees the same `state`.
        let mut ops = Vec::with_capacity(spec.patch.len());
        for op in &spec.patch {
            let mut o = Map::new();
            o.insert("op".into(), Value::from(op.op.clone()));
            o.insert("path".into(), Value::from(op.path.clone()));
            if let Some(from) = &op.from {
                o.insert("from".into(), Value::from(from.clone()));
            }
            match &op.value {
                Some(OpValue::Literal(v)) => {
                    o.insert("value".into(), v.clone());
                }
                Some(OpValue::Expr(e)) => {
                    let v = e.eval(&b).map_err(DomainError::from)?;
                    o.insert("value".into(), v);
                }
                None => {}
            }
            ops.push(Value::Object(o));
        }
        let data = Value::Array(ops);
        let next = evolve_bounded(Some(&state), &spec.event, &data, limits).map_err(|e| match e {
            // The patch is the command definition's, not the client's: no pointer into the command.
            DomainError::PatchFailed { index, path, message, .. } => DomainError::PatchFailed {
                index,
                pointer: String::new(),
                path,
                message: format!("event {}: {message}", spec.event),
            },
            other => other,
        })?;
        state = next.state.unwrap_or(Value::Null);
        changes.push(Change { event_type: spec.event.clone(), data });
    }
    patch::check_document_shape(&state, None)?;
    limits.check_document_size(&state)?;
    limits.check_depth(&state)?;
    let next = Aggregate {
        version: crate::ids::Version(agg.version.0 + changes.len() as u64),
        state: Some(state),
        deleted: false,
        created_at: agg.created_at.or(Some(now)),
        updated_at: Some(now),
    };
    Ok(Decision { changes, next })
}
