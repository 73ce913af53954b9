//! Sourced's event store: the [`EventStore`] trait every backend implements, its error type,
//! the contract suite every backend runs ([`contract`]), the embedded SQLite backend ([`sqlite`])
//! and the PostgreSQL backend ([`postgres`]).
//!
//! A store keeps three things and changes them together, in one transaction per append:
//! the events (streams keyed by tenant, type and id, with contiguous versions and global
//! positions), the read model (one row per aggregate), and the command records that make
//! commands idempotent (SPEC §2.4, §5, §7).

#![warn(missing_docs)]

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;

use sourced_core::query::{FieldPath, Filter, SortKey, SortSlot};
use sourced_core::{
    AggregateId, CommandId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamHead, StreamKey, TenantId,
    TypeName, Version,
};

mod append;
pub mod contract;
pub mod limits;
mod listing;
pub mod postgres;
mod sql;
pub mod sqlite;

pub use crate::limits::APPEND_EVENTS_MAX;
pub use crate::limits::READ_LIMIT_MAX;

/// One command's write: its events, the resulting read-model row and the command record.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    /// The stream the events go to.
    pub key: StreamKey,
    /// The condition on the stream's head; checked inside the write transaction.
    pub expected: ExpectedVersion,
    /// The events, at least one and at most [`APPEND_EVENTS_MAX`]; the store numbers them
    /// from the stream's version + 1 and gives them positions.
    pub events: Vec<NewEvent>,
    /// The events' timestamp.
    pub timestamp: DateTime<Utc>,
    /// The read-model row after the events.
    pub document: DocumentWrite,
    /// The command record, for idempotency.
    pub command: CommandWrite,
    /// Store the aggregate's state after the events as a snapshot too (SPEC §5).
    pub snapshot: Option<SnapshotWrite>,
    /// Move a process's checkpoint in the same transaction (SPEC §4.5).
    pub checkpoint: Option<CheckpointWrite>,
    /// Set or clear, in the same transaction, when the process instance this append's stream
    /// holds is next due (SPEC §4.5).
    pub wake: Option<WakeWrite>,
}

/// When a process instance (the append's stream) is next due: its earliest timer, or at once
/// when it has commands to issue. `due: None` clears it (the instance waits for events only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WakeWrite {
    /// The process's name.
    pub process: String,
    /// When, truncated to microseconds; `None`: never.
    pub due: Option<DateTime<Utc>>,
}

/// A process instance that is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    /// The instance's stream.
    pub key: StreamKey,
    /// When it is due.
    pub due: DateTime<Utc>,
}

/// A process manager's checkpoint written with an append: the last global position the
/// process has handled. A checkpoint never moves back: a lower position leaves it as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointWrite {
    /// The process's name.
    pub name: String,
    /// The last position it handled.
    pub position: Position,
}

/// A snapshot written with an append: the read-model row's state and deletion at the last
/// event's version, with what else the aggregate needs to be loaded from it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotWrite {
    /// The version of the fold that made the state ([`sourced_core::aggregate::FOLD_VERSION`]);
    /// a snapshot of another fold version is never loaded.
    pub fold: u32,
    /// Time of the aggregate's first event.
    pub created_at: DateTime<Utc>,
}

/// The read-model row written with an append. The store sets its version (the last event's),
/// `created_at` (kept from the existing row, or this append's time) and `updated_at`.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentWrite {
    /// The document after the events, without `id` and `_meta`.
    pub state: Value,
    /// Whether the aggregate is deleted after the events.
    pub deleted: bool,
}

/// The command record written with an append.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandWrite {
    /// The command id: unique per tenant.
    pub id: CommandId,
    /// The fingerprint of the command's content.
    pub fingerprint: String,
    /// Anything else the engine wants back on a replay (e.g. warnings); JSON.
    pub extra: Value,
}

/// A stored command record: what a retry of the command gets back.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// The command id.
    pub id: CommandId,
    /// The fingerprint of the command's content.
    pub fingerprint: String,
    /// The stream the command wrote to.
    pub key: StreamKey,
    /// The version of its first event.
    pub first_version: Version,
    /// The version of its last event.
    pub last_version: Version,
    /// What the engine stored with it.
    pub extra: Value,
}

/// What an append did.
#[derive(Clone, Debug, PartialEq)]
pub enum AppendOutcome {
    /// The events were stored; here as stored, with versions and positions.
    Appended(Vec<RecordedEvent>),
    /// The tenant already has a record of this command id; nothing was written.
    Duplicate(CommandRecord),
}

/// One read-model row (SPEC §5).
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentRow {
    /// The aggregate.
    pub key: StreamKey,
    /// Its version.
    pub version: Version,
    /// Its document, without `id` and `_meta`.
    pub state: Value,
    /// Whether it is deleted.
    pub deleted: bool,
    /// Time of its first event.
    pub created_at: DateTime<Utc>,
    /// Time of its last event.
    pub updated_at: DateTime<Utc>,
}

/// A read-model row with its document as the JSON text the store holds, to be served without
/// parsing it: an object's text (`{…}`), without `id` and `_meta`.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentText {
    /// The aggregate.
    pub key: StreamKey,
    /// Its version.
    pub version: Version,
    /// Its document as compact JSON text, as written.
    pub state_json: String,
    /// Whether it is deleted.
    pub deleted: bool,
    /// Time of its first event.
    pub created_at: DateTime<Utc>,
    /// Time of its last event.
    pub updated_at: DateTime<Utc>,
}

impl DocumentText {
    /// The row with its document parsed.
    pub fn parse(self) -> Result<DocumentRow, StoreError> {
        let state = serde_json::from_str(&self.state_json).map_err(|e| {
            StoreError::corrupt(format!("{}: the read model's document is not JSON: {e}", self.key)).with_source(e)
        })?;
        Ok(DocumentRow {
            key: self.key,
            version: self.version,
            state,
            deleted: self.deleted,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

impl From<DocumentRow> for DocumentText {
    fn from(row: DocumentRow) -> DocumentText {
        DocumentText {
            key: row.key,
            version: row.version,
            state_json: row.state.to_string(),
            deleted: row.deleted,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// A page request over one type's read model (SPEC §5): filters, an order, and where the
/// previous page ended. The semantics are those of [`sourced_core::query`], on every backend.
#[derive(Clone, Debug)]
pub struct ListQuery {
    /// The tenant.
    pub tenant: TenantId,
    /// The aggregate type.
    pub type_name: TypeName,
    /// Conditions every returned row meets (at most [`sourced_core::query::FILTERS_MAX`]).
    pub filters: Vec<Filter>,
    /// The order; ties (and an empty list) are ordered by id ascending.
    pub sort: Vec<SortKey>,
    /// Return rows strictly after this position in the order.
    pub after: Option<ListCursor>,
    /// Most rows to return (capped at [`READ_LIMIT_MAX`]).
    pub limit: usize,
    /// Whether deleted aggregates are included.
    pub include_deleted: bool,
}

impl ListQuery {
    /// All live aggregates of a type, in id order, `limit` at a time.
    pub fn new(tenant: TenantId, type_name: TypeName, limit: usize) -> ListQuery {
        ListQuery {
            tenant,
            type_name,
            filters: Vec::new(),
            sort: Vec::new(),
            after: None,
            limit,
            include_deleted: false,
        }
    }

    /// The cursor that continues after `row` in this query's order.
    pub fn cursor_after(&self, row: &DocumentRow) -> ListCursor {
        listing::cursor_after(&self.sort, &row.key.id, &row.state)
    }
}

/// Where a page ended: the last row's slot for each sort key, and its id.
#[derive(Clone, Debug, PartialEq)]
pub struct ListCursor {
    /// One slot per sort key of the query.
    pub slots: Vec<SortSlot>,
    /// The last row's id.
    pub id: AggregateId,
}

/// One stream's read model as `sourced rebuild` made it from the stream's events.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuiltStream {
    /// The read-model row.
    pub row: DocumentRow,
    /// The snapshots to keep (each an aggregate at its version); any others are removed.
    pub snapshots: Vec<sourced_core::Aggregate>,
    /// The fold version the snapshots were made by.
    pub fold: u32,
}

/// Counters a backend keeps, for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed by the writer.
    pub commits: u64,
    /// Appends committed (each a command).
    pub appends: u64,
    /// Events committed.
    pub events: u64,
    /// Events returned by reads ([`EventStore::read_stream`], [`EventStore::read_all`],
    /// [`EventStore::read_global`]); what a subscription or an export cost the store.
    pub events_read: u64,
}

/// A read's `limit` capped at [`READ_LIMIT_MAX`], or `None` when the read returns nothing.
pub(crate) fn read_limit(limit: usize) -> Option<usize> {
    Some(limit.min(READ_LIMIT_MAX)).filter(|&limit| limit > 0)
}

/// Why a store operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream's head did not satisfy the expected version; nothing was written.
    Conflict {
        /// What the append expected.
        expected: ExpectedVersion,
        /// What the stream is at.
        actual: StreamHead,
    },
    /// The request is outside what the store accepts (no events, too many, bad limit).
    InvalidRequest(Detail),
    /// The store cannot be reached or cannot write now; the operation may succeed later.
    Unavailable(Detail),
    /// The store is shutting down and takes no more writes.
    Closed,
    /// Stored data broke an invariant (e.g. a version gap).
    Corrupt(Detail),
    /// Any other backend failure.
    Backend(Detail),
}

impl StoreError {
    /// [`StoreError::InvalidRequest`] with this message.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        StoreError::InvalidRequest(Detail::new(message))
    }

    /// [`StoreError::Unavailable`] with this message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable(Detail::new(message))
    }

    /// [`StoreError::Corrupt`] with this message.
    pub fn corrupt(message: impl Into<String>) -> Self {
        StoreError::Corrupt(Detail::new(message))
    }

    /// [`StoreError::Backend`] with this message.
    pub fn backend(message: impl Into<String>) -> Self {
        StoreError::Backend(Detail::new(message))
    }

    /// The same error with `source` as its [`std::error::Error::source`] (the driver's or the
    /// system's error it was made from); a variant without a [`Detail`] stays as it is.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let StoreError::InvalidRequest(d)
        | StoreError::Unavailable(d)
        | StoreError::Corrupt(d)
        | StoreError::Backend(d) = &mut self
        {
            d.source = Some(Arc::new(source));
        }
        self
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict { expected, actual } => {
                write!(f, "version conflict: expected {expected}, the stream is at version {}", actual.version)
            }
            StoreError::InvalidRequest(d) => write!(f, "invalid store request: {d}"),
            StoreError::Unavailable(d) => write!(f, "the event store is unavailable: {d}"),
            StoreError::Closed => f.write_str("the event store is shutting down"),
            StoreError::Corrupt(d) => write!(f, "stored data is inconsistent: {d}"),
            StoreError::Backend(d) => write!(f, "event store error: {d}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::InvalidRequest(d)
            | StoreError::Unavailable(d)
            | StoreError::Corrupt(d)
            | StoreError::Backend(d) => d.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static)),
            StoreError::Conflict { .. } | StoreError::Closed => None,
        }
    }
}

/// What a [`StoreError`] says (its message, which it displays as) and, when it was made from
/// one, the error underneath (a `rusqlite`, `tokio_postgres` or I/O error), which
/// [`std::error::Error::source`] returns. Shared, so a batch's one failure can be handed to
/// each of its appends.
#[derive(Clone, Debug)]
pub struct Detail {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Detail {
    /// A message without a source.
    pub fn new(message: impl Into<String>) -> Self {
        Detail { message: message.into(), source: None }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::ops::Deref for Detail {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for Detail {
    fn from(message: String) -> Self {
        Detail::new(message)
    }
}

impl From<&str> for Detail {
    fn from(message: &str) -> Self {
        Detail::new(message)
    }
}

/// The event store: every backend implements this and passes [`contract`].
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends one command's events, read-model row and command record atomically, if the
    /// stream's head satisfies `expected` and the tenant has no record of the command id.
    /// Once this returns `Ok`, the write is durable.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Events of one stream with `after < version <= to` (no upper bound when `to` is
    /// `None`), ascending, at most `limit`.
    async fn read_stream(
        &self,
        key: &StreamKey,
        after: Version,
        to: Option<Version>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The tenant's events with position greater than `after`, ascending, at most `limit`.
    /// A reader that has seen position P never later sees a position below P (SPEC §7.3).
    async fn read_all(
        &self,
        tenant: &TenantId,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Every tenant's events with position greater than `after`, ascending, at most `limit`:
    /// the whole store in commit order (export, SPEC §3.3). Same ordering guarantee as
    /// [`EventStore::read_all`].
    async fn read_global(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The read-model row of one aggregate.
    async fn get_document(&self, key: &StreamKey) -> Result<Option<DocumentRow>, StoreError>;

    /// The read-model row of one aggregate with its document as stored text (GET serves it
    /// without parsing). The default parses and writes it again.
    async fn get_document_text(&self, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
        Ok(self.get_document(key).await?.map(DocumentText::from))
    }

    /// A page of one type's read model: the rows matching the filters, after the cursor, in
    /// the query's order, at most `limit`.
    async fn list_documents(&self, query: &ListQuery) -> Result<Vec<DocumentRow>, StoreError>;

    /// How many rows match the query's filters (its cursor and limit aside).
    async fn count_documents(&self, query: &ListQuery) -> Result<u64, StoreError>;

    /// Creates, where missing, an index serving filters on each field path (for every type);
    /// returns the names of the indexes. Safe to call from several processes at once.
    async fn ensure_indexes(&self, fields: &[FieldPath]) -> Result<Vec<String>, StoreError>;

    /// The latest snapshot of the aggregate made by fold version `fold`, at a version no
    /// higher than `at_most` (any when `None`), as the aggregate at that version.
    async fn load_snapshot(
        &self,
        key: &StreamKey,
        fold: u32,
        at_most: Option<Version>,
    ) -> Result<Option<sourced_core::Aggregate>, StoreError>;

    /// The latest snapshot of the aggregate made by fold version `fold` whose last event is at
    /// or before `at` (time travel by time).
    async fn load_snapshot_at(
        &self,
        key: &StreamKey,
        fold: u32,
        at: DateTime<Utc>,
    ) -> Result<Option<sourced_core::Aggregate>, StoreError>;

    /// Every stream's key, in (tenant, type, id) byte order, after `after`, at most `limit`
    /// (capped at [`READ_LIMIT_MAX`]).
    async fn list_streams(&self, after: Option<&StreamKey>, limit: usize) -> Result<Vec<StreamKey>, StoreError>;

    /// Removes every read-model row and snapshot (the first step of `sourced rebuild`, which
    /// runs while no process serves the store).
    async fn clear_read_model(&self) -> Result<(), StoreError>;

    /// Writes rebuilt read-model rows and their snapshots in one transaction, replacing the
    /// streams' rows and snapshots.
    async fn put_read_model(&self, streams: Vec<RebuiltStream>) -> Result<(), StoreError>;

    /// The record of a processed command, if the tenant has one.
    async fn get_command(&self, tenant: &TenantId, id: CommandId) -> Result<Option<CommandRecord>, StoreError>;

    /// The position of the last committed event (0 for an empty store), without reading any
    /// event: every event at or below it is committed and visible to reads, and an append
    /// acknowledged before the call is at or below it. O(1): what a subscription "from now"
    /// starts after (SPEC §6).
    async fn head(&self) -> Result<Position, StoreError>;

    /// A process manager's checkpoint (the last global position it handled), if it has one.
    async fn checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError>;

    /// Moves a process manager's checkpoint on its own, when the events it handled wrote
    /// nothing; never back (a lower position leaves it as it is).
    async fn put_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;

    /// Gives process `name` the checkpoint `position` when it has none (its set was just
    /// loaded), and returns the checkpoint as stored: an existing one is never moved, so a
    /// second server that loads the set later does not skip what the runner has not handled.
    async fn start_checkpoint(&self, name: &str, position: Position) -> Result<Position, StoreError>;

    /// The instances of process `process` due at or before `at`, earliest first (then by
    /// key), at most `limit` (capped at [`READ_LIMIT_MAX`]).
    async fn due_wakes(&self, process: &str, at: DateTime<Utc>, limit: usize) -> Result<Vec<Wake>, StoreError>;

    /// Takes the lease of the runner `name` (a process manager's, SPEC §4.5) when no one holds
    /// it, or `None` when someone does: at most one holder at a time across every process that
    /// shares the store. PostgreSQL: a session advisory lock on a dedicated connection, keyed by
    /// the schema and the name; SQLite (one process per file): exclusive within this store.
    async fn runner_lease(&self, name: &str) -> Result<Option<RunnerLease>, StoreError>;

    /// Checks that the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stops taking writes, finishes those in flight, and releases the backend.
    async fn close(&self);

    /// Counters since the store was opened.
    fn stats(&self) -> StoreStats;

    /// Registers the one listener that hears every committed append in position order
    /// (live subscriptions, SPEC §6). Returns `false` when the backend cannot (the default),
    /// or when a listener is already set; the engine then falls back to reading the store.
    fn set_commit_listener(&self, listener: std::sync::Arc<dyn CommitListener>) -> bool {
        let _ = listener;
        false
    }
}

/// Hears committed appends from a backend, in position order (SPEC §6, §7.3).
///
/// A backend calls [`CommitListener::committed`] once per commit, after the commit is durable
/// and before any of its appends is acknowledged, from one place that sees commits in position
/// order (the SQLite writer thread), so the listener never sees positions out of order. It must
/// not block: it runs on the writer's path.
pub trait CommitListener: Send + Sync + 'static {
    /// Whether the listener wants the events now; when `false` the backend may pass none and
    /// skip building them (it still reports the head).
    fn wants_events(&self) -> bool;

    /// One commit: the highest position committed so far, and (when wanted) the commit's
    /// events in position order.
    fn committed(&self, head: Position, events: Vec<RecordedEvent>);
}

/// The lease of one named runner, from [`EventStore::runner_lease`]: held while this value
/// lives and [`RunnerLease::held`] says so; dropping it gives the lease up. A lease can be lost
/// without being dropped (PostgreSQL: its connection died, so the lock went with it), and once
/// lost it is never held again: the runner stops acting and asks for a new one.
pub struct RunnerLease {
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with the lease, which gives it up (a backend's guard).
    _holder: Box<dyn Send + Sync>,
}

impl RunnerLease {
    /// A lease that `lost` says is lost once set, given up when `holder` is dropped.
    pub fn new(lost: Arc<std::sync::atomic::AtomicBool>, holder: Box<dyn Send + Sync>) -> RunnerLease {
        RunnerLease { lost, _holder: holder }
    }

    /// Whether the lease is still held: check it before each step.
    pub fn held(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl std::fmt::Debug for RunnerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerLease").field("held", &self.held()).finish()
    }
}

/// The leases of one process's store where no other process can share it (SQLite): a name is
/// held by at most one [`RunnerLease`] at a time, and given back when it is dropped.
#[derive(Default)]
pub(crate) struct LocalLeases(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl LocalLeases {
    /// The lease of `name`, unless it is held.
    pub(crate) fn take(&self, name: &str) -> Option<RunnerLease> {
        let mut held = self.0.lock().expect("the leases lock is never poisoned");
        if !held.insert(name.to_owned()) {
            return None;
        }
        let release = LocalRelease { held: Arc::clone(&self.0), name: name.to_owned() };
        Some(RunnerLease::new(Arc::default(), Box::new(release)))
    }
}

/// Gives a local lease back when dropped.
struct LocalRelease {
    held: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    name: String,
}

impl Drop for LocalRelease {
    fn drop(&mut self) {
        self.held.lock().expect("the leases lock is never poisoned").remove(&self.name);
    }
}

/// The events of an accepted append as stored: numbered from `first_version`, positioned from
/// `first_position`, with the request's timestamp at the stored precision. Backends build
/// them from the request itself, so the writer copies no JSON.
pub(crate) fn recorded_events(
    request: AppendRequest,
    first_position: Position,
    first_version: Version,
) -> Vec<RecordedEvent> {
    let AppendRequest { key, events, timestamp, .. } = request;
    let timestamp = sourced_core::timestamp::truncate(timestamp);
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| RecordedEvent {
            id: e.id,
            position: Position(first_position.0 + i as u64),
            tenant: key.tenant.clone(),
            target_name: key.type_name.clone(),
            target_id: key.id.clone(),
            version: Version(first_version.0 + i as u64),
            event_type: e.event_type,
            data: e.data,
            metadata: e.metadata,
            timestamp,
        })
        .collect()
}

/// The invariant of a stream read, checked where data is read (as where it is written):
/// versions continue contiguously from `after`, positions strictly increase.
pub(crate) fn check_stream_read(key: &StreamKey, after: Version, events: &[RecordedEvent]) -> Result<(), StoreError> {
    let mut expected_version = after;
    let mut previous_position = Position(0);
    for event in events {
        expected_version = expected_version.next();
        if event.version != expected_version || event.position <= previous_position {
            return Err(StoreError::corrupt(format!(
                "{key}: read version {} at position {} where version {expected_version} after position \
                 {previous_position} was due",
                event.version, event.position
            )));
        }
        previous_position = event.position;
    }
    Ok(())
}

/// The invariant of a feed read (SPEC §7.3): positions strictly increase after `after`, and
/// every event has a version.
pub(crate) fn check_feed_read(after: Position, events: &[RecordedEvent]) -> Result<(), StoreError> {
    let mut previous = after;
    for event in events {
        if event.position <= previous || event.version == Version::ZERO {
            return Err(StoreError::corrupt(format!(
                "read position {} (version {}) of {} after position {previous}",
                event.position, event.version, event.tenant
            )));
        }
        previous = event.position;
    }
    Ok(())
}

/// FNV-1a, 64 bits: a stable hash for names that must agree across processes and builds.
/// A backend's options, checked: each `(name, value, min, max)` out of its bounds is one problem,
/// all reported at once.
pub(crate) fn check_options<T: PartialOrd + std::fmt::Display>(bounds: &[(&str, T, T, T)]) -> Result<(), StoreError> {
    let problems: Vec<String> = bounds
        .iter()
        .filter(|(_, value, min, max)| !(min..=max).contains(&value))
        .map(|(name, value, min, max)| format!("{name} must be {min}..={max}, not {value}"))
        .collect();
    if problems.is_empty() { Ok(()) } else { Err(StoreError::invalid_request(problems.join("; "))) }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Checks a list query's shape and that its rows come back in its order.
pub(crate) fn check_list(query: &ListQuery) -> Result<(), StoreError> {
    if query.filters.len() > sourced_core::query::FILTERS_MAX {
        return Err(StoreError::invalid_request(format!(
            "a list query has at most {} filters",
            sourced_core::query::FILTERS_MAX
        )));
    }
    if query.sort.len() > sourced_core::query::SORT_KEYS_MAX {
        return Err(StoreError::invalid_request(format!(
            "a list query has at most {} sort keys",
            sourced_core::query::SORT_KEYS_MAX
        )));
    }
    if query.after.as_ref().is_some_and(|c| c.slots.len() != query.sort.len()) {
        return Err(StoreError::invalid_request("the cursor does not fit the query's sort keys"));
    }
    Ok(())
}

/// The invariant of a list read: rows strictly in the query's order.
pub(crate) fn check_list_read(query: &ListQuery, rows: &[DocumentRow]) -> Result<(), StoreError> {
    for pair in rows.windows(2) {
        let a = (pair[0].key.id.as_str(), &pair[0].state);
        let b = (pair[1].key.id.as_str(), &pair[1].state);
        if sourced_core::query::compare_rows(&query.sort, a, b) != std::cmp::Ordering::Less {
            return Err(StoreError::corrupt(format!(
                "documents out of the list's order: {} then {}",
                pair[0].key, pair[1].key
            )));
        }
    }
    Ok(())
}

/// Checks the shape of an append before a backend runs it.
pub fn validate_append(request: &AppendRequest) -> Result<(), StoreError> {
    if request.events.is_empty() {
        return Err(StoreError::invalid_request("an append needs at least one event"));
    }
    if request.events.len() > APPEND_EVENTS_MAX {
        return Err(StoreError::invalid_request(format!(
            "an append carries at most {APPEND_EVENTS_MAX} events, not {}",
            request.events.len()
        )));
    }
    Ok(())
}
