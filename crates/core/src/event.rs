//! Events: what a decision produces ([`NewEvent`]) and what the store returns
//! ([`RecordedEvent`], the wire shape of SPEC §2.5).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{AggregateId, EventId, Position, TenantId, TypeName, Version};

/// Event type of a generic create: `data` is the whole document.
pub const CREATED: &str = "created";
/// Event type of a generic patch: `data` is the RFC 6902 patch as applied.
pub const PATCHED: &str = "patched";
/// Event type of a delete: `data` is null.
pub const DELETED: &str = "deleted";

pub use crate::limits::EVENT_TYPE_LEN_MAX;

/// An event decided but not yet stored: the store gives it a version and a position.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Derived from the command id and the event's index (SPEC §2.4).
    pub id: EventId,
    /// `created`, `patched`, `deleted`, or a custom domain event type.
    pub event_type: String,
    /// The document (`created`), an RFC 6902 patch (every other type but `deleted`), or null.
    pub data: Value,
    /// `commandId`, `commandName`, `correlationId`, `causationId`, `principal`, `context`.
    pub metadata: Value,
}

/// A stored event, as every interface shows it (SPEC §2.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedEvent {
    /// The event id.
    pub id: EventId,
    /// Global position, strictly increasing in commit order.
    pub position: Position,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Aggregate type.
    pub target_name: TypeName,
    /// Aggregate id.
    pub target_id: AggregateId,
    /// The stream's version after this event (1-based, contiguous).
    pub version: Version,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Document, patch or null.
    pub data: Value,
    /// Command metadata.
    pub metadata: Value,
    /// Commit time, RFC 3339 UTC.
    #[serde(with = "crate::timestamp")]
    pub timestamp: DateTime<Utc>,
}
