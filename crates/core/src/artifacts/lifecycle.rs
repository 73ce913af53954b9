//! Lifecycle state machines (SPEC §4.4): a document field holds the state; a command may move
//! it only along a defined transition (from, to, which commands, an optional CEL guard).

use serde::Deserialize;
use serde_json::Value;

use super::expr::{Bindings, Expr, ExprLimits};
use super::from_json;
use crate::error::DomainError;

pub use crate::limits::STATES_MAX;

/// A state machine over one field.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// JSON Pointer of the state field (e.g. `/status`).
    pub field: String,
    /// The state every aggregate starts in.
    pub initial: String,
    /// All states.
    pub states: Vec<String>,
    /// The allowed moves.
    pub transitions: Vec<Transition>,
}

/// One allowed move.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The states it leaves from.
    pub from: Vec<String>,
    /// The state it goes to.
    pub to: String,
    /// The commands that may take it; any when empty.
    pub on: Vec<String>,
    /// Must be true for the move to be allowed.
    pub guard: Option<Expr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLifecycle {
    field: String,
    initial: String,
    states: Vec<String>,
    #[serde(default)]
    transitions: Vec<RawTransition>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransition {
    from: OneOrMany,
    to: String,
    #[serde(default)]
    on: Vec<String>,
    guard: Option<String>,
}

impl Lifecycle {
    /// Parses and checks `lifecycle.yaml`. Returns the lifecycle as far as it could be read
    /// beside every problem, so that checks across files still see its transitions (a set with
    /// any problem is never used).
    pub fn parse(doc: &Value, limits: &ExprLimits) -> (Option<Lifecycle>, Vec<(String, String)>) {
        let raw: RawLifecycle = match from_json(doc, "") {
            Ok(r) => r,
            Err(e) => return (None, e),
        };
        let mut problems = Vec::new();
        if !raw.field.starts_with('/') || crate::patch::is_server_owned(&raw.field) {
            problems.push((
                "/field".to_owned(),
                "the state field is a JSON Pointer like /status, not /id or /_meta".to_owned(),
            ));
        }
        if raw.states.is_empty() || raw.states.len() > STATES_MAX {
            problems.push(("/states".to_owned(), format!("a lifecycle has 1 to {STATES_MAX} states")));
        }
        for (i, s) in raw.states.iter().enumerate() {
            if raw.states[..i].contains(s) {
                problems.push((format!("/states/{i}"), format!("state '{s}' is listed twice")));
            }
        }
        let known = |s: &str| raw.states.iter().any(|x| x == s);
        if !known(&raw.initial) {
            problems.push(("/initial".to_owned(), format!("initial state '{}' is not among the states", raw.initial)));
        }
        let mut transitions = Vec::new();
        for (i, t) in raw.transitions.into_iter().enumerate() {
            let from = match t.from {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            for (j, f) in from.iter().enumerate() {
                if !known(f) {
                    problems.push((format!("/transitions/{i}/from/{j}"), format!("state '{f}' is not defined")));
                }
            }
            if !known(&t.to) {
                problems.push((format!("/transitions/{i}/to"), format!("state '{}' is not defined", t.to)));
            }
            let guard = match t.guard.as_deref().map(|g| Expr::compile_with(g, limits)) {
                Some(Ok(g)) => Some(g),
                Some(Err(m)) => {
                    problems.push((format!("/transitions/{i}/guard"), m));
                    None
                }
                None => None,
            };
            transitions.push(Transition { from, to: t.to, on: t.on, guard });
        }
        (Some(Lifecycle { field: raw.field, initial: raw.initial, states: raw.states, transitions }), problems)
    }

    /// Sets the state field to the initial state when a new document has none.
    pub fn apply_initial(&self, doc: &mut Value) {
        if doc.pointer(&self.field).is_none()
            && let Some((parent, key)) = self.field.rsplit_once('/')
        {
            let parent = if parent.is_empty() { Some(&mut *doc) } else { doc.pointer_mut(parent) };
            if let Some(Value::Object(m)) = parent {
                m.insert(key.replace("~1", "/").replace("~0", "~"), Value::from(self.initial.clone()));
            }
        }
    }

    /// Checks the move from `prev` (None for a new aggregate) to `next` made by `command`. A
    /// command that some transition names must take one of its transitions from the current
    /// state; generic commands and other custom commands may not change the state.
    pub fn check(
        &self,
        prev: Option<&Value>,
        next: &Value,
        command: &str,
        b: &Bindings<'_>,
    ) -> Result<(), DomainError> {
        let to = next.pointer(&self.field);
        let Some(Value::String(to)) = to else {
            return Err(self.illegal(
                prev,
                &format!("{}", to.unwrap_or(&Value::Null)),
                command,
                b,
                "the state field must hold one of the states",
            ));
        };
        if !self.states.contains(to) {
            return Err(self.illegal(prev, to, command, b, "not a state of this lifecycle"));
        }
        let Some(prev) = prev else {
            return if *to == self.initial {
                Ok(())
            } else {
                Err(self.illegal(None, to, command, b, "a new aggregate starts in the initial state"))
            };
        };
        let from = prev.pointer(&self.field).and_then(Value::as_str).unwrap_or("");
        // A custom command named by some transition is a lifecycle command: it must take one
        // of its transitions. Generic commands, and custom commands no transition names, may
        // run as long as they leave the state alone.
        let generic = matches!(command, "create" | "patch" | "replace" | "delete");
        let lifecycle_command = !generic && self.transitions.iter().any(|t| t.on.iter().any(|c| c == command));
        if from == to && !lifecycle_command {
            return Ok(());
        }
        for t in self.matching(from, command) {
            if t.to != *to {
                continue;
            }
            match &t.guard {
                None => return Ok(()),
                Some(g) => match g.eval_bool(b) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => return Err(e.into()),
                },
            }
        }
        Err(self.illegal(Some(prev), to, command, b, "no transition allows this move"))
    }

    fn matching<'a>(&'a self, from: &'a str, command: &'a str) -> impl Iterator<Item = &'a Transition> + 'a {
        self.transitions
            .iter()
            .filter(move |t| t.from.iter().any(|f| f == from) && (t.on.is_empty() || t.on.iter().any(|c| c == command)))
    }

    fn illegal(&self, prev: Option<&Value>, to: &str, command: &str, b: &Bindings<'_>, why: &str) -> DomainError {
        let from = prev.map(|p| p.pointer(&self.field).and_then(Value::as_str).unwrap_or("").to_owned());
        let allowed: Vec<String> = match &from {
            None => vec![self.initial.clone()],
            Some(f) => self
                .matching(f, command)
                .filter(|t| t.guard.as_ref().is_none_or(|g| g.eval_bool(b).unwrap_or(false)))
                .map(|t| t.to.clone())
                .collect(),
        };
        DomainError::IllegalTransition {
            field: self.field.clone(),
            from,
            to: to.to_owned(),
            allowed,
            message: why.to_owned(),
        }
    }
}
