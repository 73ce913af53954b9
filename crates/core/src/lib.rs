//! Sourced's domain core: the command envelope, ids and versions, the generic decide and fold,
//! and JSON Patch handling. Pure: no I/O, no clock, no async (time is passed in).

#![warn(missing_docs)]

pub mod aggregate;
pub mod artifacts;
pub mod command;
pub mod error;
pub mod event;
pub mod ids;
pub mod json;
pub mod limits;
pub mod patch;
pub mod principal;
pub mod query;
pub mod timestamp;
pub mod version;
pub mod violation;

pub use aggregate::{Aggregate, Change, Decision, Evolved, FoldError, decide, evolve, new_events};
pub use command::{Command, CommandDraft, CommandKind, EnvelopeDefaults};
pub use error::{DomainError, LimitKind, Violation};
pub use event::{NewEvent, RecordedEvent};
pub use ids::{AggregateId, CommandId, EventId, Position, StreamKey, TenantId, TypeName, Version};
pub use limits::Limits;
pub use principal::Principal;
pub use version::{ExpectedVersion, StreamHead};
