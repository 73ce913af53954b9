//! Process managers (SPEC §4.5): `processes/<name>.yaml`, a state machine that reacts to events.
//! An event of the `start` type and event type starts an instance under the key its CEL `key`
//! gives; `follow` routes later events to a running instance by key; `transitions` move it on an
//! event (`on`), after a duration in its state (`after`) or at a time (`at`), issue commands
//! (`do`) and update the instance's `data`. Everything is parsed and compiled at load; the
//! checks against other files (types, commands, events) are the loader's.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::expr::{Expr, ExprLimits};
use super::from_json;
use crate::ids::TypeName;

pub use crate::limits::{
    PROCESS_COMMANDS_MAX, PROCESS_DATA_KEYS_MAX, PROCESS_FOLLOW_MAX, PROCESS_TIMER_SECS_MAX, PROCESS_TRANSITIONS_MAX,
};

/// The variables a process's expressions may read.
pub const VARIABLES: [&str; 5] = ["event", "document", "key", "instance", "now"];

/// The prefix of the aggregate type that holds a process's instances: the instances of
/// `payment-deadline` are the streams `process-payment-deadline/<key>`. Clients cannot write to
/// such a type, and no artifact may define one.
pub const TYPE_PREFIX: &str = "process-";

/// A loaded process definition.
#[derive(Clone, Debug)]
pub struct Process {
    /// Its name (the file name without extension).
    pub name: String,
    /// What starts an instance.
    pub start: Start,
    /// The events routed to running instances.
    pub follow: Vec<Follow>,
    /// Every state.
    pub states: Vec<String>,
    /// The states in which an instance is complete.
    pub finals: Vec<String>,
    /// The instance's data when it starts, one expression per key.
    pub data: Vec<(String, Expr)>,
    /// The moves, in file order: the first that applies is taken.
    pub transitions: Vec<Transition>,
}

/// What starts an instance.
#[derive(Clone, Debug)]
pub struct Start {
    /// The aggregate type of the starting event.
    pub type_name: TypeName,
    /// Its event type.
    pub event: String,
    /// The instance key (CEL → string).
    pub key: Expr,
    /// Must be true for the instance to start.
    pub guard: Option<Expr>,
    /// The state a new instance is in.
    pub state: String,
}

/// Events routed to a running instance.
#[derive(Clone, Debug)]
pub struct Follow {
    /// The aggregate type.
    pub type_name: TypeName,
    /// The event type.
    pub event: String,
    /// Which instance it goes to (CEL → string).
    pub key: Expr,
}

/// One move of an instance.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The states it leaves from.
    pub from: Vec<String>,
    /// What makes it happen.
    pub trigger: Trigger,
    /// Must be true for it to be taken.
    pub guard: Option<Expr>,
    /// The state it goes to.
    pub to: String,
    /// Keys of the instance's data it sets, one expression each.
    pub data: Vec<(String, Expr)>,
    /// The commands it issues, in order.
    pub commands: Vec<CommandAction>,
}

/// What makes a transition happen.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// An event of this type reaching the instance.
    On(String),
    /// A timer started when the instance enters the `from` state, in seconds.
    After(u64),
    /// A timer for the time the expression gives (CEL → timestamp), computed when the
    /// instance enters the `from` state.
    At(Expr),
}

/// A command a transition issues.
#[derive(Clone, Debug)]
pub struct CommandAction {
    /// The aggregate type it goes to.
    pub target: TypeName,
    /// The aggregate id (CEL → string).
    pub id: Expr,
    /// A custom command, or `create`/`patch`/`replace`/`delete`.
    pub name: String,
    /// The body (CEL → map).
    pub body: Expr,
}

/// Something a process file names that another file must define, for the loader's checks
/// across files. Kept also when the file has problems of its own, so that one run reports all.
#[derive(Clone, Debug)]
pub enum Reference {
    /// An event of a type (`start`, `follow`): a custom command of the type emits it, or it
    /// is `created`, `patched` or `deleted`.
    Event {
        /// Where in the file.
        at: String,
        /// The type.
        type_name: TypeName,
        /// The event type.
        event: String,
    },
    /// A command of a type (`do`).
    Command {
        /// Where in the file.
        at: String,
        /// The type.
        target: TypeName,
        /// The command.
        name: String,
    },
}

/// What a process file held: the process when it has no problem of its own, what it names,
/// and its problems (JSON Pointer, message).
pub type Parsed = (Option<Process>, Vec<Reference>, Vec<(String, String)>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    start: RawStart,
    #[serde(default)]
    follow: Vec<RawFollow>,
    states: Vec<String>,
    #[serde(default, rename = "final")]
    finals: Vec<String>,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    transitions: Vec<RawTransition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStart {
    #[serde(rename = "type")]
    type_name: String,
    event: String,
    key: String,
    guard: Option<String>,
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFollow {
    #[serde(rename = "type")]
    type_name: String,
    event: String,
    key: String,
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
    on: Option<String>,
    after: Option<String>,
    at: Option<String>,
    guard: Option<String>,
    to: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default, rename = "do")]
    actions: Vec<RawAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    command: RawCommand,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    target: String,
    id: String,
    name: String,
    #[serde(default = "empty_body")]
    body: String,
}

fn empty_body() -> String {
    "{}".to_owned()
}

/// Whether `name` can name a process: `[a-z][a-z0-9_-]*`, short enough that its instances'
/// type (`process-<name>`) is a valid type name.
pub fn valid_name(name: &str) -> bool {
    TypeName::parse(&format!("{TYPE_PREFIX}{name}")).is_ok()
        && name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
}

/// The aggregate type of the instances of process `name` (a [`valid_name`]).
pub fn instance_type(name: &str) -> Option<TypeName> {
    TypeName::parse(&format!("{TYPE_PREFIX}{name}")).ok()
}

/// Parses `processes/<name>.yaml` and checks it on its own.
pub fn parse(name: &str, doc: &Value, limits: &ExprLimits) -> Parsed {
    let raw: RawProcess = match from_json(doc, "") {
        Ok(r) => r,
        Err(e) => return (None, Vec::new(), e),
    };
    let mut p = Parser { limits, problems: Vec::new(), refs: Vec::new(), states: raw.states.clone() };
    p.states(&raw);
    let start = p.start(&raw.start, &raw.finals);
    let follow = p.follow(&raw);
    let data = p.data("/data", &raw.data);
    let transitions = p.transitions(raw.transitions, &raw.finals, &raw.follow);
    let process = match (start, follow, data, transitions) {
        (Some(start), Some(follow), Some(data), Some(transitions)) if p.problems.is_empty() => Some(Process {
            name: name.to_owned(),
            start,
            follow,
            states: raw.states,
            finals: raw.finals,
            data,
            transitions,
        }),
        _ => None,
    };
    (process, p.refs, p.problems)
}

/// One file being checked: its problems and references so far.
struct Parser<'a> {
    limits: &'a ExprLimits,
    problems: Vec<(String, String)>,
    refs: Vec<Reference>,
    states: Vec<String>,
}

impl Parser<'_> {
    fn problem(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.problems.push((at.into(), message.into()));
    }

    fn known(&self, state: &str) -> bool {
        self.states.iter().any(|s| s == state)
    }

    /// A state the file names that `states` does not list is a problem at `at`.
    fn state(&mut self, at: String, state: &str) {
        if !self.known(state) {
            self.problem(at, format!("state '{state}' is not among the states"));
        }
    }

    fn states(&mut self, raw: &RawProcess) {
        if raw.states.is_empty() || raw.states.len() > super::lifecycle::STATES_MAX {
            self.problem("/states", format!("a process has 1 to {} states", super::lifecycle::STATES_MAX));
        }
        for (i, s) in raw.states.iter().enumerate() {
            if s.trim().is_empty() {
                self.problem(format!("/states/{i}"), "a state needs a name");
            } else if raw.states[..i].contains(s) {
                self.problem(format!("/states/{i}"), format!("state '{s}' is listed twice"));
            }
        }
        for (i, f) in raw.finals.iter().enumerate() {
            self.state(format!("/final/{i}"), f);
            if raw.finals[..i].contains(f) {
                self.problem(format!("/final/{i}"), format!("state '{f}' is listed twice"));
            }
        }
    }

    /// Compiles an expression the process evaluates; it may read only [`VARIABLES`].
    fn expr(&mut self, at: &str, source: &str) -> Option<Expr> {
        match Expr::compile_with(source, self.limits) {
            Ok(e) => {
                let unknown: Vec<String> =
                    e.free_variables().into_iter().filter(|v| !VARIABLES.contains(&v.as_str())).collect();
                if unknown.is_empty() {
                    return Some(e);
                }
                let message = format!(
                    "`{source}` reads {}, which a process does not have (it has {})",
                    unknown.join(", "),
                    VARIABLES.join(", ")
                );
                self.problem(at, message);
                None
            }
            Err(m) => {
                self.problem(at, m);
                None
            }
        }
    }

    fn optional_expr(&mut self, at: &str, source: Option<&str>) -> Option<Option<Expr>> {
        match source {
            None => Some(None),
            Some(s) => self.expr(at, s).map(Some),
        }
    }

    fn type_name(&mut self, at: &str, name: &str) -> Option<TypeName> {
        match TypeName::parse(name) {
            Ok(_) if name.starts_with(TYPE_PREFIX) => {
                self.problem(at, format!("'{name}': types named {TYPE_PREFIX}… hold process instances"));
                None
            }
            Ok(t) => Some(t),
            Err(v) => {
                self.problem(at, format!("'{name}' is not a valid aggregate type: {}", v.message));
                None
            }
        }
    }

    /// An event type a process reacts to, and the reference the loader checks.
    fn event(&mut self, at: &str, type_name: Option<&TypeName>, event: &str) {
        let valid = !event.is_empty()
            && event.len() <= crate::event::EVENT_TYPE_LEN_MAX
            && event.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return self.problem(at, format!("'{event}' is not an event type (letters, digits, . _ -)"));
        }
        if let Some(t) = type_name {
            self.refs.push(Reference::Event { at: at.to_owned(), type_name: t.clone(), event: event.to_owned() });
        }
    }

    fn start(&mut self, raw: &RawStart, finals: &[String]) -> Option<Start> {
        let type_name = self.type_name("/start/type", &raw.type_name);
        self.event("/start/event", type_name.as_ref(), &raw.event);
        let key = self.expr("/start/key", &raw.key);
        let guard = self.optional_expr("/start/guard", raw.guard.as_deref());
        self.state("/start/state".to_owned(), &raw.state);
        if finals.contains(&raw.state) {
            self.problem("/start/state", format!("'{}' is final: an instance would be complete at once", raw.state));
        }
        Some(Start {
            type_name: type_name?,
            event: raw.event.clone(),
            key: key?,
            guard: guard?,
            state: raw.state.clone(),
        })
    }

    fn follow(&mut self, raw: &RawProcess) -> Option<Vec<Follow>> {
        if raw.follow.len() > PROCESS_FOLLOW_MAX {
            self.problem("/follow", format!("at most {PROCESS_FOLLOW_MAX} follow entries"));
        }
        let mut out = Some(Vec::new());
        for (i, f) in raw.follow.iter().enumerate() {
            let type_name = self.type_name(&format!("/follow/{i}/type"), &f.type_name);
            self.event(&format!("/follow/{i}/event"), type_name.as_ref(), &f.event);
            let key = self.expr(&format!("/follow/{i}/key"), &f.key);
            let twice = raw.follow[..i].iter().any(|g| g.type_name == f.type_name && g.event == f.event);
            if twice {
                self.problem(format!("/follow/{i}"), format!("{} {} is followed twice", f.type_name, f.event));
            }
            if !raw.transitions.iter().any(|t| t.on.as_deref() == Some(f.event.as_str())) {
                self.problem(format!("/follow/{i}/event"), format!("no transition is on '{}'", f.event));
            }
            match (type_name, key, &mut out) {
                (Some(type_name), Some(key), Some(v)) => v.push(Follow { type_name, event: f.event.clone(), key }),
                _ => out = None,
            }
        }
        out
    }

    fn data(&mut self, at: &str, raw: &BTreeMap<String, String>) -> Option<Vec<(String, Expr)>> {
        if raw.len() > PROCESS_DATA_KEYS_MAX {
            self.problem(at, format!("at most {PROCESS_DATA_KEYS_MAX} data keys"));
        }
        let mut out = Some(Vec::new());
        for (k, source) in raw {
            let key_at = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            let shape = k.len() <= 64
                && k.as_bytes().first().is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !shape {
                self.problem(
                    key_at.clone(),
                    format!("'{k}' is not a data key: it must match [A-Za-z_][A-Za-z0-9_]{{0,63}}"),
                );
            }
            match (self.expr(&key_at, source), &mut out) {
                (Some(e), Some(v)) if shape => v.push((k.clone(), e)),
                _ => out = None,
            }
        }
        out
    }

    fn transitions(
        &mut self,
        raw: Vec<RawTransition>,
        finals: &[String],
        follow: &[RawFollow],
    ) -> Option<Vec<Transition>> {
        if raw.len() > PROCESS_TRANSITIONS_MAX {
            self.problem("/transitions", format!("at most {PROCESS_TRANSITIONS_MAX} transitions"));
        }
        let mut out = Some(Vec::new());
        for (i, t) in raw.into_iter().enumerate() {
            match (self.transition(i, t, finals, follow), &mut out) {
                (Some(t), Some(v)) => v.push(t),
                _ => out = None,
            }
        }
        out
    }

    fn transition(
        &mut self,
        i: usize,
        t: RawTransition,
        finals: &[String],
        follow: &[RawFollow],
    ) -> Option<Transition> {
        let at = format!("/transitions/{i}");
        let from = match t.from {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        for (j, f) in from.iter().enumerate() {
            self.state(format!("{at}/from/{j}"), f);
            if finals.contains(f) {
                self.problem(format!("{at}/from/{j}"), format!("'{f}' is final: no transition leaves it"));
            }
        }
        if from.is_empty() {
            self.problem(format!("{at}/from"), "a transition leaves from at least one state");
        }
        self.state(format!("{at}/to"), &t.to);
        let trigger = self.trigger(&at, t.on, t.after, t.at, follow);
        let guard = self.optional_expr(&format!("{at}/guard"), t.guard.as_deref());
        let data = self.data(&format!("{at}/data"), &t.data);
        if t.actions.len() > PROCESS_COMMANDS_MAX {
            self.problem(format!("{at}/do"), format!("at most {PROCESS_COMMANDS_MAX} commands per transition"));
        }
        let mut commands = Some(Vec::new());
        for (j, a) in t.actions.iter().enumerate() {
            match (self.command(&format!("{at}/do/{j}/command"), &a.command), &mut commands) {
                (Some(c), Some(v)) => v.push(c),
                _ => commands = None,
            }
        }
        Some(Transition { from, trigger: trigger?, guard: guard?, to: t.to, data: data?, commands: commands? })
    }

    fn trigger(
        &mut self,
        at: &str,
        on: Option<String>,
        after: Option<String>,
        time: Option<String>,
        follow: &[RawFollow],
    ) -> Option<Trigger> {
        match (on, after, time) {
            (Some(on), None, None) => {
                if !follow.iter().any(|f| f.event == on) {
                    self.problem(format!("{at}/on"), format!("'{on}' is not an event this process follows"));
                }
                Some(Trigger::On(on))
            }
            (None, Some(after), None) => match parse_duration(&after) {
                Ok(secs) => Some(Trigger::After(secs)),
                Err(m) => {
                    self.problem(format!("{at}/after"), m);
                    None
                }
            },
            (None, None, Some(time)) => self.expr(&format!("{at}/at"), &time).map(Trigger::At),
            _ => {
                self.problem(at, "a transition has exactly one of on, after and at");
                None
            }
        }
    }

    fn command(&mut self, at: &str, c: &RawCommand) -> Option<CommandAction> {
        let target = self.type_name(&format!("{at}/target"), &c.target);
        let id = self.expr(&format!("{at}/id"), &c.id);
        let body = self.expr(&format!("{at}/body"), &c.body);
        if let Some(t) = &target {
            self.refs.push(Reference::Command { at: format!("{at}/name"), target: t.clone(), name: c.name.clone() });
        }
        Some(CommandAction { target: target?, id: id?, name: c.name.clone(), body: body? })
    }
}

/// `30s`, `30m`, `2h`, `7d` → seconds: a whole number above 0 and a unit, at most
/// [`PROCESS_TIMER_SECS_MAX`].
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("'{text}' is not a duration: a whole number and s, m, h or d (30s, 30m, 2h, 7d)");
    let unit = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => return Err(bad()),
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)).filter(|s| *s > 0).ok_or_else(bad)?;
    if secs > PROCESS_TIMER_SECS_MAX {
        return Err(format!("'{text}' is over the longest timer, {} days", PROCESS_TIMER_SECS_MAX / 86_400));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_a_number_and_a_unit() {
        assert_eq!(parse_duration("2s"), Ok(2));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400));
        for bad in ["", "s", "0s", "1.5h", "-1m", "10", "3w", "1 h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("367d").unwrap_err().contains("longest timer"));
    }

    #[test]
    fn names_leave_room_for_the_instance_type() {
        assert!(valid_name("payment-deadline"));
        assert!(!valid_name("Payment"));
        assert!(!valid_name("-x"));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(instance_type("pay").unwrap().to_string(), "process-pay");
    }
}
