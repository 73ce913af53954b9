//! Process instances (SPEC §4.5): what an instance keeps (its stream's document) and the pure
//! steps that move it: start on an event, move on an event or a due timer. Time comes in as
//! `now`; the ids of the commands a step issues are derived from the step, so a step replayed
//! after a crash issues the same ids and the idempotency records absorb it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::expr::{Bindings, Expr};
use super::process::{Process, Trigger};
use crate::ids::{AggregateId, CommandId, TenantId};

/// Where an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for events, timers, or issuing its last step's commands.
    Running,
    /// In a final state.
    Completed,
    /// Stopped by a problem (a refused command, a failed expression) until an operator acts.
    Parked,
    /// Ended by an operator (`POST /processes/{name}/{key}/cancel`): no timer fires, no
    /// command is issued any more.
    Cancelled,
}

impl Status {
    /// Its name, as the document and `?status=` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Parked => "parked",
            Status::Cancelled => "cancelled",
        }
    }
}

/// What an operator does to an instance (SPEC §4.5, `POST /processes/{name}/{key}/…`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intervention {
    /// A parked instance tries its failed step again now: its pending commands, or else its
    /// earliest timer once due.
    Retry,
    /// A parked instance drops what a retry would try (its pending commands, or else its
    /// earliest timer when due) and goes on in its state.
    Skip,
    /// A running or parked instance ends, cancelled: its timers and pending commands dropped.
    Cancel,
}

impl Intervention {
    /// Its name, the last segment of its path.
    pub fn as_str(self) -> &'static str {
        match self {
            Intervention::Retry => "retry",
            Intervention::Skip => "skip",
            Intervention::Cancel => "cancel",
        }
    }

    /// The event type that records it on the instance's stream.
    pub fn event_type(self) -> &'static str {
        match self {
            Intervention::Retry => "ProcessRetried",
            Intervention::Skip => "ProcessSkipped",
            Intervention::Cancel => "ProcessCancelled",
        }
    }
}

/// An intervention the instance's status does not allow (retry or skip of an instance that is
/// not parked; cancel of one that has ended).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} an instance that is {}", .action.as_str(), .status.as_str())]
pub struct WrongStatus {
    /// What was asked.
    pub action: Intervention,
    /// The instance's status.
    pub status: Status,
}

/// A pending timer: transition `transition` fires at `due`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// The index of the transition it fires.
    pub transition: usize,
    /// When (RFC 3339, UTC, microseconds: text order is time order).
    pub due: String,
}

/// A command a step issues, with its derived id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// The command id ([`action_command_id`]).
    pub command_id: CommandId,
    /// The target type.
    pub target: String,
    /// The target id.
    pub id: String,
    /// The command's name (custom, or create/patch/replace/delete).
    pub name: String,
    /// Its body.
    pub body: Value,
}

/// An instance: the document of its stream, `process-<name>/<key>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// The process's name.
    pub process: String,
    /// The instance key.
    pub key: String,
    /// Its state.
    pub state: String,
    /// Running, completed or parked.
    pub status: Status,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its data.
    pub data: Map<String, Value>,
    /// Steps taken; the current one's number (the first step, the start, is 1).
    pub steps: u64,
    /// The global position of the last event it handled.
    pub handled: u64,
    /// Its timers, earliest first.
    pub timers: Vec<Timer>,
    /// The last step's commands not yet confirmed issued.
    pub pending: Vec<Issued>,
    /// Why it is parked.
    pub problem: Option<String>,
    /// Tries of the pending commands that failed for a transient reason.
    #[serde(default)]
    pub attempts: u32,
    /// When the pending commands are tried again after a transient failure.
    #[serde(default)]
    pub retry_at: Option<String>,
}

/// An event a process hears: its wire shape and the aggregate right after it.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The event as every interface shows it (SPEC §2.5).
    pub event: &'a Value,
    /// Its aggregate type.
    pub type_name: &'a str,
    /// Its event type.
    pub event_type: &'a str,
    /// Its global position.
    pub position: u64,
    /// The aggregate after it (`None` when it was deleted).
    pub document: Option<&'a Value>,
}

/// Why a step could not be made: an expression failed or gave a value of the wrong shape. The
/// instance is parked with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

/// How an event reaches a process: it starts an instance under this key, or goes to the
/// running instance of this key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Start an instance.
    Start(String),
    /// Move the instance.
    Follow(String),
}

/// RFC 3339 in UTC with microseconds: the text of every time an instance keeps.
pub fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StepError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StepError(format!("'{text}' is not an RFC 3339 time: {e}")))
}

/// The namespace of the ids a process derives (UUID v5 of [`action_command_id`]).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_ed00_9a0c_4e55_8c1d_70c3_55e5_0001);

/// A command id derived from a step: the same process, tenant, key, step and index always give
/// the same id (UUID v5 of `process/tenant/key/step/index`; none of the parts holds a `/`).
pub fn action_command_id(process: &str, tenant: &TenantId, key: &str, step: u64, index: &str) -> CommandId {
    let name = format!("{process}/{}/{key}/{step}/{index}", tenant.as_str());
    CommandId(Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()))
}

/// The id of the append that records step `step` of an instance.
pub fn step_command_id(process: &str, tenant: &TenantId, key: &str, step: u64) -> CommandId {
    action_command_id(process, tenant, key, step, "step")
}

impl Instance {
    /// What expressions see as `instance`.
    pub fn view(&self) -> Value {
        json!({"state": self.state, "startedAt": self.started_at, "data": self.data})
    }

    /// When the instance is next due: with commands to issue (a completed instance too, for
    /// those of its last step), at once or at its retry; else its earliest timer while running;
    /// never when parked.
    pub fn due(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, StepError> {
        if self.status == Status::Parked {
            return Ok(None);
        }
        if !self.pending.is_empty() {
            return self.retry_at.as_deref().map_or(Ok(Some(now)), |t| parse_time(t).map(Some));
        }
        if self.status != Status::Running {
            return Ok(None);
        }
        self.timers.first().map(|t| parse_time(&t.due)).transpose()
    }

    /// Parks the instance with `problem` (its pending commands kept, for a retry).
    pub fn park(&mut self, problem: String) {
        self.status = Status::Parked;
        self.problem = Some(problem);
    }
}

/// `inst` after `action` at `now`: one more step, the problem and the retry schedule cleared.
/// A retried or skipped instance is running again, or completed when its state is final (a
/// final step's commands can park it).
pub fn intervene(
    p: &Process,
    inst: &Instance,
    action: Intervention,
    now: DateTime<Utc>,
) -> Result<Instance, WrongStatus> {
    let allowed = match action {
        Intervention::Retry | Intervention::Skip => inst.status == Status::Parked,
        Intervention::Cancel => matches!(inst.status, Status::Running | Status::Parked),
    };
    if !allowed {
        return Err(WrongStatus { action, status: inst.status });
    }
    let mut next = inst.clone();
    next.steps += 1;
    (next.problem, next.attempts, next.retry_at) = (None, 0, None);
    next.status = if p.finals.contains(&next.state) { Status::Completed } else { Status::Running };
    match action {
        Intervention::Retry => {}
        Intervention::Skip if !next.pending.is_empty() => next.pending.clear(),
        Intervention::Skip => {
            let due = next.timers.first().is_some_and(|t| parse_time(&t.due).is_ok_and(|d| d <= now));
            if due {
                next.timers.remove(0);
            }
        }
        Intervention::Cancel => {
            next.status = Status::Cancelled;
            next.timers.clear();
            next.pending.clear();
        }
    }
    Ok(next)
}

/// The bindings of a step: the input's event and document (none for a timer), the key, the
/// instance's view and the time.
fn bind<'a>(input: Option<&Input<'a>>, key: &'a Value, view: &'a Value, now: &'a str) -> Bindings<'a> {
    Bindings {
        event: input.map(|x| x.event),
        document: input.and_then(|x| x.document),
        key: Some(key),
        instance: Some(view),
        now: Some(now),
        ..Default::default()
    }
}

fn eval_key(e: &Expr, b: &Bindings<'_>) -> Result<String, StepError> {
    match e.eval(b).map_err(|e| StepError(e.to_string()))? {
        Value::String(s) if AggregateId::parse(&s).is_ok() => Ok(s),
        other => Err(StepError(format!("`{}` gave {other}, not an aggregate id", e.source()))),
    }
}

fn eval_guard(e: Option<&Expr>, b: &Bindings<'_>) -> Result<bool, StepError> {
    e.map_or(Ok(true), |g| g.eval_bool(b).map_err(|e| StepError(e.to_string())))
}

/// Where an event goes in process `p`: the instances it starts or moves (at most one of each).
/// An event the process does not hear goes nowhere; a failing key or guard is an error (the
/// event cannot be routed).
pub fn route(p: &Process, input: &Input<'_>, now: &str) -> Result<Vec<Route>, StepError> {
    let b = Bindings { event: Some(input.event), document: input.document, now: Some(now), ..Default::default() };
    let mut out = Vec::new();
    let s = &p.start;
    if s.type_name.as_str() == input.type_name && s.event == input.event_type && eval_guard(s.guard.as_ref(), &b)? {
        out.push(Route::Start(eval_key(&s.key, &b)?));
    }
    for f in p.follow.iter().filter(|f| f.type_name.as_str() == input.type_name && f.event == input.event_type) {
        out.push(Route::Follow(eval_key(&f.key, &b)?));
    }
    Ok(out)
}

/// A new instance of `p` under `key`, started by `input`: the start state, its data, its
/// timers.
pub fn start(p: &Process, key: &str, input: &Input<'_>, now: DateTime<Utc>) -> Result<Instance, StepError> {
    let mut inst = Instance {
        process: p.name.clone(),
        key: key.to_owned(),
        state: p.start.state.clone(),
        status: Status::Running,
        started_at: time_text(now),
        data: Map::new(),
        steps: 1,
        handled: input.position,
        timers: Vec::new(),
        pending: Vec::new(),
        problem: None,
        attempts: 0,
        retry_at: None,
    };
    set_data(&mut inst, &p.data, Some(input), now)?;
    inst.timers = timers(p, &inst, Some(input), now)?;
    Ok(inst)
}

/// `inst` moved by `input`: the first transition from its state on this event whose guard
/// holds, or `None` when none applies (or the event was handled before).
pub fn on_event(
    p: &Process,
    inst: &Instance,
    tenant: &TenantId,
    input: &Input<'_>,
    now: DateTime<Utc>,
) -> Result<Option<Instance>, StepError> {
    if inst.status != Status::Running || input.position <= inst.handled {
        return Ok(None);
    }
    let now_text = time_text(now);
    let view = inst.view();
    let key = Value::from(inst.key.clone());
    let b = bind(Some(input), &key, &view, &now_text);
    for (i, t) in p.transitions.iter().enumerate() {
        let heard = matches!(&t.trigger, Trigger::On(e) if e == input.event_type);
        if heard && t.from.contains(&inst.state) && eval_guard(t.guard.as_ref(), &b)? {
            let mut next = take(p, inst, tenant, i, Some(input), now)?;
            next.handled = input.position;
            return Ok(Some(next));
        }
    }
    Ok(None)
}

/// `inst` moved by its earliest timer when it is due at `now`: the timer's transition when its
/// guard holds, else the timer dropped; `None` when no timer is due.
pub fn on_timer(
    p: &Process,
    inst: &Instance,
    tenant: &TenantId,
    now: DateTime<Utc>,
) -> Result<Option<Instance>, StepError> {
    let Some(timer) = inst.timers.first() else { return Ok(None) };
    if inst.status != Status::Running || !inst.pending.is_empty() || parse_time(&timer.due)? > now {
        return Ok(None);
    }
    // A reload may have changed the definition since the timer was set.
    let t = p
        .transitions
        .get(timer.transition)
        .filter(|t| t.from.contains(&inst.state) && !matches!(t.trigger, Trigger::On(_)))
        .ok_or_else(|| {
            StepError(format!(
                "the timer of transition {} from '{}' is not in the process's definition any more",
                timer.transition, inst.state
            ))
        })?;
    let now_text = time_text(now);
    let view = inst.view();
    let key = Value::from(inst.key.clone());
    let b = bind(None, &key, &view, &now_text);
    if eval_guard(t.guard.as_ref(), &b)? {
        return take(p, inst, tenant, timer.transition, None, now).map(Some);
    }
    let mut next = inst.clone();
    next.steps += 1;
    next.timers.remove(0);
    Ok(Some(next))
}

/// Takes transition `i`: data, state, timers (entering a state starts its timers afresh; a final
/// state has none), then the commands, evaluated with the instance as it now is and queued
/// after any still pending.
fn take(
    p: &Process,
    inst: &Instance,
    tenant: &TenantId,
    i: usize,
    input: Option<&Input<'_>>,
    now: DateTime<Utc>,
) -> Result<Instance, StepError> {
    let t = &p.transitions[i];
    let mut next = inst.clone();
    next.steps += 1;
    set_data(&mut next, &t.data, input, now)?;
    next.state = t.to.clone();
    if p.finals.contains(&next.state) {
        next.status = Status::Completed;
        next.timers.clear();
    } else {
        next.timers = timers(p, &next, input, now)?;
    }
    let now_text = time_text(now);
    let view = next.view();
    let key = Value::from(next.key.clone());
    let b = bind(input, &key, &view, &now_text);
    // Commands of an earlier step still waiting for a retry stay first, with their retry
    // schedule: they are issued, in order, before these.
    if next.pending.is_empty() {
        (next.attempts, next.retry_at) = (0, None);
    }
    for (j, c) in t.commands.iter().enumerate() {
        let id = eval_key(&c.id, &b)?;
        let body = c.body.eval(&b).map_err(|e| StepError(e.to_string()))?;
        next.pending.push(Issued {
            command_id: action_command_id(&p.name, tenant, &next.key, next.steps, &j.to_string()),
            target: c.target.to_string(),
            id,
            name: c.name.clone(),
            body,
        });
    }
    Ok(next)
}

/// Evaluates `data` keys (each seeing the instance as it was before any of them) into `inst`.
fn set_data(
    inst: &mut Instance,
    data: &[(String, Expr)],
    input: Option<&Input<'_>>,
    now: DateTime<Utc>,
) -> Result<(), StepError> {
    if data.is_empty() {
        return Ok(());
    }
    let now_text = time_text(now);
    let view = inst.view();
    let key = Value::from(inst.key.clone());
    let b = bind(input, &key, &view, &now_text);
    let mut values = Vec::with_capacity(data.len());
    for (k, e) in data {
        values.push((k.clone(), e.eval(&b).map_err(|e| StepError(format!("data '{k}': {e}")))?));
    }
    inst.data.extend(values);
    Ok(())
}

/// The timers of `inst`'s state, started at `now`, earliest first.
fn timers(
    p: &Process,
    inst: &Instance,
    input: Option<&Input<'_>>,
    now: DateTime<Utc>,
) -> Result<Vec<Timer>, StepError> {
    let now_text = time_text(now);
    let view = inst.view();
    let key = Value::from(inst.key.clone());
    let b = bind(input, &key, &view, &now_text);
    let mut out = Vec::new();
    for (i, t) in p.transitions.iter().enumerate().filter(|(_, t)| t.from.contains(&inst.state)) {
        let due = match &t.trigger {
            Trigger::On(_) => continue,
            Trigger::After(secs) => now + chrono::TimeDelta::seconds(i64::try_from(*secs).unwrap_or(i64::MAX / 1000)),
            Trigger::At(e) => match e.eval(&b).map_err(|e| StepError(e.to_string()))? {
                Value::String(s) => parse_time(&s)?,
                other => return Err(StepError(format!("`{}` gave {other}, not a timestamp", e.source()))),
            },
        };
        out.push(Timer { transition: i, due: time_text(due) });
    }
    out.sort_by(|a, b| a.due.cmp(&b.due).then(a.transition.cmp(&b.transition)));
    Ok(out)
}
