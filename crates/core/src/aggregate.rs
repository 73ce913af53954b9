//! The aggregate: its state folded from events ([`Aggregate::apply`], infallible for events
//! this core decided) and the decision for the generic commands ([`decide`], SPEC §2.2).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::command::{Command, CommandKind};
use crate::error::DomainError;
use crate::event::{CREATED, DELETED, NewEvent, PATCHED, RecordedEvent};
use crate::ids::{AggregateId, Version};
use crate::limits::Limits;
use crate::patch;
use crate::timestamp;
use crate::version::StreamHead;

/// The version of the fold ([`evolve`]): snapshots carry it, and one made by another version
/// is ignored (and replaced by `sourced rebuild`). Raise it whenever the fold's result for
/// the same events changes.
pub const FOLD_VERSION: u32 = 1;

/// The state of one aggregate at some version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Aggregate {
    /// The number of events folded.
    pub version: Version,
    /// The document, without the server-owned `id` and `_meta`; `None` before the first event.
    pub state: Option<Value>,
    /// Whether the last event deleted the aggregate. A deleted aggregate keeps its last state.
    pub deleted: bool,
    /// Time of the first event.
    pub created_at: Option<DateTime<Utc>>,
    /// Time of the last event.
    pub updated_at: Option<DateTime<Utc>>,
}

/// An event folded onto a state it does not fit: a corrupt or foreign stream.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("cannot fold event at version {version}: {message}")]
pub struct FoldError {
    /// The event's version.
    pub version: Version,
    /// What did not fit.
    pub message: String,
}

/// An event's effect, before the store gives it an id, version and position.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Event type: `created`, `patched`, `deleted` or a domain event type.
    pub event_type: String,
    /// Document, RFC 6902 patch, or null.
    pub data: Value,
}

/// What a command decided: the events to append and the state they lead to.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The events, in order.
    pub changes: Vec<Change>,
    /// The aggregate after the events.
    pub next: Aggregate,
}

/// What one event leads to: the document after it and whether the aggregate is deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct Evolved {
    /// The document (none before the first `created`).
    pub state: Option<Value>,
    /// Whether a `deleted` event was applied.
    pub deleted: bool,
}

/// The state a change leads to, from the state before it. The one fold of the system: replay
/// and decision both use it. `created` sets the document, `deleted` marks the aggregate, and
/// every other event type carries an RFC 6902 patch applied to the document (`{}` when none).
pub fn evolve(state: Option<&Value>, event_type: &str, data: &Value) -> Result<Evolved, String> {
    evolve_with(state, event_type, data, None).map_err(|e| e.to_string())
}

/// [`evolve`] for a decision: a patch event is applied with [`patch::apply_bounded`], so a
/// custom command's patch costs no more than a client's. Replay uses [`evolve`] (what was
/// stored was bounded when it was accepted); both reach the same state when neither fails.
pub(crate) fn evolve_bounded(
    state: Option<&Value>,
    event_type: &str,
    data: &Value,
    limits: &Limits,
) -> Result<Evolved, DomainError> {
    evolve_with(state, event_type, data, Some(limits))
}

fn evolve_with(
    state: Option<&Value>,
    event_type: &str,
    data: &Value,
    limits: Option<&Limits>,
) -> Result<Evolved, DomainError> {
    let failed =
        |message: String| DomainError::PatchFailed { index: 0, pointer: String::new(), path: String::new(), message };
    match event_type {
        CREATED => {
            if data.is_object() {
                Ok(Evolved { state: Some(data.clone()), deleted: false })
            } else {
                Err(failed("a created event's data must be an object".to_owned()))
            }
        }
        DELETED => Ok(Evolved { state: state.cloned(), deleted: true }),
        _ => {
            let p: json_patch::Patch = serde_json::from_value(data.clone())
                .map_err(|e| failed(format!("event data is not a JSON Patch: {e}")))?;
            let base = state.cloned().unwrap_or_else(|| Value::Object(Map::new()));
            let next = match limits {
                Some(l) => patch::apply_bounded(&base, &p, l)?,
                None => patch::apply(&base, &p)?,
            };
            Ok(Evolved { state: Some(next), deleted: false })
        }
    }
}

impl Aggregate {
    /// What a store needs to check an expected version.
    pub fn head(&self) -> StreamHead {
        StreamHead { version: self.version, deleted: self.deleted }
    }

    /// Whether the aggregate exists and is not deleted.
    pub fn is_live(&self) -> bool {
        self.state.is_some() && !self.deleted
    }

    /// Folds one stored event. Its version must be the next one: streams are contiguous.
    pub fn apply(&mut self, event: &RecordedEvent) -> Result<(), FoldError> {
        if event.version != self.version.next() {
            return Err(FoldError {
                version: event.version,
                message: format!("expected version {}", self.version.next()),
            });
        }
        self.apply_change(&event.event_type, &event.data, event.timestamp)
            .map_err(|message| FoldError { version: event.version, message })
    }

    fn apply_change(&mut self, event_type: &str, data: &Value, at: DateTime<Utc>) -> Result<(), String> {
        let Evolved { state, deleted } = evolve(self.state.as_ref(), event_type, data)?;
        self.state = state;
        self.deleted = deleted;
        self.version = self.version.next();
        self.created_at.get_or_insert(at);
        self.updated_at = Some(at);
        Ok(())
    }

    /// Folds a sequence of events from version 0.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Result<Aggregate, FoldError> {
        let mut a = Aggregate::default();
        for e in events {
            a.apply(e)?;
        }
        Ok(a)
    }

    /// The document as GET shows it (SPEC §2.5): `id` first, the state, then `_meta`.
    pub fn document(&self, id: &AggregateId) -> Option<Value> {
        let state = self.state.as_ref()?.as_object()?;
        Some(document(id, state, self.version, self.created_at, self.updated_at, self.deleted))
    }
}

/// Builds the output document from its parts: `id`, the state's fields, `_meta`.
pub fn document(
    id: &AggregateId,
    state: &Map<String, Value>,
    version: Version,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    deleted: bool,
) -> Value {
    let mut out = Map::with_capacity(state.len() + 2);
    out.insert("id".to_owned(), Value::from(id.as_str()));
    for (k, v) in state {
        if k != "id" {
            out.insert(k.clone(), v.clone());
        }
    }
    out.insert(
        "_meta".to_owned(),
        json!({
            "version": version.0,
            "createdAt": created_at.as_ref().map(timestamp::format),
            "updatedAt": updated_at.as_ref().map(timestamp::format),
            "deleted": deleted,
        }),
    );
    Value::Object(out)
}

/// Decides a generic command (SPEC §2.2) against the aggregate's current state. The expected
/// version is not checked here: the engine checks it before and the store again at append.
/// `now` is the time given to the resulting state's timestamps.
pub fn decide(agg: &Aggregate, cmd: &Command, limits: &Limits, now: DateTime<Utc>) -> Result<Decision, DomainError> {
    limits.check_depth(&cmd.body)?;
    let id = cmd.key.id.as_str();
    // Each generic command yields one event and the state after it, computed once here; the
    // fold (`evolve`) reaches the same state from the event on replay (a property test checks
    // that the two agree).
    let (change, state, deleted) = match cmd.kind {
        CommandKind::Create => {
            ensure_absent(agg)?;
            created(&cmd.body, id)?
        }
        CommandKind::Replace => {
            if agg.version == Version::ZERO {
                created(&cmd.body, id)?
            } else {
                let current = ensure_live(agg)?;
                patch::check_document_shape(&cmd.body, Some(id))?;
                let mut next = cmd.body.clone();
                strip_id(&mut next);
                // The state is the diff applied to the current one, not the body itself, so that
                // it is exactly what the fold will rebuild (key order included).
                patched(patch::diff(current, &next), current, limits)?
            }
        }
        CommandKind::Patch => {
            let current = ensure_live(agg)?;
            let p = patch::parse_patch(&cmd.body, limits)?;
            patch::check_protected(&p)?;
            patched(p, current, limits)?
        }
        CommandKind::MergePatch => {
            let current = ensure_live(agg)?;
            patch::check_document_shape(&cmd.body, Some(id))?;
            let mut merge = cmd.body.clone();
            strip_id(&mut merge);
            patched(patch::merge_to_patch(current, &merge), current, limits)?
        }
        CommandKind::Delete => {
            let current = ensure_live(agg)?;
            (Change { event_type: DELETED.to_owned(), data: Value::Null }, current.clone(), true)
        }
        CommandKind::Logic | CommandKind::Orchestration => {
            return Err(DomainError::UnknownCommand { name: cmd.name.clone() });
        }
    };
    patch::check_document_shape(&state, None)?;
    limits.check_document_size(&state)?;
    limits.check_depth(&state)?;
    let next = Aggregate {
        version: agg.version.next(),
        state: Some(state),
        deleted,
        created_at: agg.created_at.or(Some(now)),
        updated_at: Some(now),
    };
    Ok(Decision { changes: vec![change], next })
}

fn ensure_absent(agg: &Aggregate) -> Result<(), DomainError> {
    if agg.deleted {
        Err(DomainError::Deleted { version: agg.version })
    } else if agg.version > Version::ZERO {
        Err(DomainError::AlreadyExists { version: agg.version })
    } else {
        Ok(())
    }
}

fn ensure_live(agg: &Aggregate) -> Result<&Value, DomainError> {
    match &agg.state {
        None => Err(DomainError::NotFound),
        Some(_) if agg.deleted => Err(DomainError::Deleted { version: agg.version }),
        Some(s) => Ok(s),
    }
}

fn strip_id(doc: &mut Value) {
    if let Value::Object(m) = doc {
        m.shift_remove("id");
    }
}

fn created(body: &Value, id: &str) -> Result<(Change, Value, bool), DomainError> {
    patch::check_document_shape(body, Some(id))?;
    let mut doc = body.clone();
    strip_id(&mut doc);
    Ok((Change { event_type: CREATED.to_owned(), data: doc.clone() }, doc, false))
}

fn patched(p: json_patch::Patch, current: &Value, limits: &Limits) -> Result<(Change, Value, bool), DomainError> {
    let next = patch::apply_bounded(current, &p, limits)?;
    if &next == current {
        return Err(DomainError::NoOp);
    }
    Ok((Change { event_type: PATCHED.to_owned(), data: patch::to_value(&p) }, next, false))
}

/// Turns decided changes into events with deterministic ids and the command's metadata.
pub fn new_events(cmd: &Command, changes: &[Change], principal: Option<&Value>) -> Vec<NewEvent> {
    let correlation = cmd.context.get("correlationId").cloned().unwrap_or_else(|| Value::from(cmd.id.to_string()));
    let causation = cmd.context.get("causationId").cloned().unwrap_or_else(|| Value::from(cmd.id.to_string()));
    let metadata = json!({
        "commandId": cmd.id.to_string(),
        "commandName": cmd.name,
        "correlationId": correlation,
        "causationId": causation,
        "principal": principal,
        "context": Value::Object(cmd.context.clone()),
    });
    changes
        .iter()
        .enumerate()
        .map(|(i, c)| NewEvent {
            id: cmd.id.event_id(i),
            event_type: c.event_type.clone(),
            data: c.data.clone(),
            metadata: metadata.clone(),
        })
        .collect()
}
