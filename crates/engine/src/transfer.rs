//! `sourced export` and `sourced import` (SPEC §3.3): every event of the store as NDJSON, one
//! event per line in the wire shape of SPEC §2.5, in position order; and back, into an empty
//! store of either backend (backup, restore, moving between SQLite and PostgreSQL).
//!
//! Import replays the export as ordinary appends, so the store rebuilds the read model and the
//! command records itself, in the same transactions as always: consecutive events of one
//! stream with one `metadata.commandId` (one command's events are always contiguous) become one
//! append with that command id, the events' ids, the stream's exact expected version and the
//! events' timestamp, with a snapshot wherever the live rule (`SNAPSHOT_EVERY`) would have
//! written one. The target must be empty, and each append must come back with exactly
//! the positions and versions of the file; anything else stops the import with an error naming
//! the line (a gap in the file's positions, another writer on the store, a broken stream).
//!
//! What does not survive the trip: a command record's fingerprint (the content hash a retry is
//! compared with) is not part of the events, so imported records carry [`IMPORTED_FINGERPRINT`];
//! a retry of an imported command id is still never applied twice, but is refused as a reused
//! key (422) rather than answered with the original reply. There is no `--force`: an import
//! into a store that holds events is always refused (an empty schema or a new file is cheap,
//! and merging two histories cannot keep their positions).

use std::io::{BufRead, Write};

use serde_json::Value;

use sourced_core::aggregate::Aggregate;
use sourced_core::{CommandId, NewEvent, Position, RecordedEvent, StreamKey};
use sourced_store::{APPEND_EVENTS_MAX, AppendOutcome, CommandWrite, EventStore, StoreError};

use crate::append_request;

/// A process instance's wake-up (SPEC §4.5) from its imported state, so that its timers and
/// pending commands come due in the new store as in the old; `None` for other streams.
fn process_wake(
    key: &StreamKey,
    aggregate: &Aggregate,
    at: chrono::DateTime<chrono::Utc>,
) -> Option<sourced_store::WakeWrite> {
    if !key.type_name.as_str().starts_with(sourced_core::artifacts::process::TYPE_PREFIX) {
        return None;
    }
    let instance: sourced_core::artifacts::instance::Instance =
        serde_json::from_value(aggregate.state.clone()?).ok()?;
    let due = instance.due(at).ok()?;
    Some(sourced_store::WakeWrite { process: instance.process, due })
}

/// Events one export read takes from the store.
pub const EXPORT_PAGE_EVENTS: usize = 1_000;
/// The fingerprint of command records written by an import (see the module documentation).
pub const IMPORTED_FINGERPRINT: &str = "imported";

/// Why an export or import stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Reading the input or writing the output failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target store already holds events.
    #[error("the store already holds events (position {0} and maybe more): import only into an empty store")]
    NotEmpty(Position),
    /// A line of the input is not what an export writes, or does not continue the history.
    #[error("line {line}: {message}")]
    Input {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        message: String,
    },
}

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Events written.
    pub events: u64,
    /// Appends (commands) written.
    pub commands: u64,
}

/// Writes every event of `store` to `out`, one JSON object per line, in position order;
/// returns how many.
pub async fn export(store: &dyn EventStore, out: &mut dyn Write) -> Result<u64, TransferError> {
    export_with(store, out, &mut |_| {}).await
}

/// [`export`], telling `progress` how many events are written after each page.
pub async fn export_with(
    store: &dyn EventStore,
    out: &mut dyn Write,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, TransferError> {
    let mut after = Position(0);
    let mut count = 0u64;
    loop {
        let page = store.read_global(after, EXPORT_PAGE_EVENTS).await?;
        for event in &page {
            assert!(event.position > after, "read_global returns increasing positions");
            after = event.position;
            serde_json::to_writer(&mut *out, event).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
            count += 1;
        }
        progress(count);
        if page.len() < EXPORT_PAGE_EVENTS {
            break;
        }
    }
    out.flush()?;
    Ok(count)
}

/// Reads an export from `input` into `store`, which must hold no events (see the module
/// documentation).
/// Snapshots are written as live appends write them, every `snapshot_every` versions (0: none).
pub async fn import(
    store: &dyn EventStore,
    input: impl BufRead,
    snapshot_every: u64,
) -> Result<ImportSummary, TransferError> {
    if let Some(e) = store.read_global(Position(0), 1).await?.first() {
        return Err(TransferError::NotEmpty(e.position));
    }
    let mut summary = ImportSummary::default();
    // One command's events, and the line of the first.
    let mut group: Vec<RecordedEvent> = Vec::new();
    let mut group_line = 0;
    let mut group_command = None;
    let mut line_no = 0u64;
    for line in input.lines() {
        line_no += 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| TransferError::Input { line: line_no, message };
        let event: RecordedEvent =
            serde_json::from_str(&line).map_err(|e| bad(format!("not an exported event: {e}")))?;
        let expected_position = summary.events + group.len() as u64 + 1;
        if event.position.0 != expected_position {
            return Err(bad(format!(
                "position {} where {expected_position} was due (an export's positions run from 1 without gaps)",
                event.position
            )));
        }
        let command = command_id(&event).map_err(bad)?;
        let continues = group.last().is_some_and(|last| {
            same_stream(last, &event) && group_command == Some(command) && group.len() < APPEND_EVENTS_MAX
        });
        if !continues && !group.is_empty() {
            append_group(store, std::mem::take(&mut group), group_line, snapshot_every, &mut summary).await?;
        }
        if group.is_empty() {
            group_line = line_no;
            group_command = Some(command);
        }
        group.push(event);
    }
    if !group.is_empty() {
        append_group(store, group, group_line, snapshot_every, &mut summary).await?;
    }
    Ok(summary)
}

fn command_id(event: &RecordedEvent) -> Result<CommandId, String> {
    let id = event.metadata.get("commandId").and_then(Value::as_str).ok_or("no metadata.commandId")?;
    uuid::Uuid::parse_str(id).map(CommandId).map_err(|e| format!("metadata.commandId {id:?}: {e}"))
}

fn same_stream(a: &RecordedEvent, b: &RecordedEvent) -> bool {
    a.tenant == b.tenant && a.target_name == b.target_name && a.target_id == b.target_id
}

/// Appends one command's events (from line `line` on) as the store's next append, and checks
/// that they got the file's positions and versions.
async fn append_group(
    store: &dyn EventStore,
    group: Vec<RecordedEvent>,
    line: u64,
    snapshot_every: u64,
    summary: &mut ImportSummary,
) -> Result<(), TransferError> {
    let bad = |message: String| TransferError::Input { line, message };
    let first = &group[0];
    let key =
        StreamKey { tenant: first.tenant.clone(), type_name: first.target_name.clone(), id: first.target_id.clone() };
    let command = command_id(first).map_err(bad)?;
    let timestamp = first.timestamp;
    if let Some(e) = group.iter().find(|e| e.timestamp != timestamp) {
        return Err(bad(format!(
            "the events of command {command} carry different timestamps ({} and {})",
            timestamp, e.timestamp
        )));
    }
    // The stream so far, from the read model this import has written.
    let mut aggregate = match store.get_document(&key).await? {
        None => Aggregate::default(),
        Some(row) => Aggregate {
            version: row.version,
            state: Some(row.state),
            deleted: row.deleted,
            created_at: Some(row.created_at),
            updated_at: Some(row.updated_at),
        },
    };
    let before = aggregate.version;
    for event in &group {
        aggregate.apply(event).map_err(|e| bad(format!("{key}: {e}")))?;
    }
    let events = group
        .iter()
        .map(|e| NewEvent {
            id: e.id,
            event_type: e.event_type.clone(),
            data: e.data.clone(),
            metadata: e.metadata.clone(),
        })
        .collect();
    let record = CommandWrite { id: command, fingerprint: IMPORTED_FINGERPRINT.to_owned(), extra: Value::Null };
    let mut request = append_request(key.clone(), before, &aggregate, events, timestamp, record, snapshot_every);
    request.wake = process_wake(&key, &aggregate, timestamp);
    let stored = match store.append(request).await {
        Ok(AppendOutcome::Appended(stored)) => stored,
        Ok(AppendOutcome::Duplicate(record)) => {
            return Err(bad(format!("command {command} was already recorded (on {})", record.key)));
        }
        Err(StoreError::Conflict { actual, .. }) => {
            return Err(bad(format!(
                "{key} is at version {} where {before} was due: another writer is using the store",
                actual.version
            )));
        }
        Err(e) => return Err(e.into()),
    };
    for (want, got) in group.iter().zip(&stored) {
        if (want.position, want.version) != (got.position, got.version) {
            return Err(bad(format!(
                "{key}: stored at position {} version {}, where the file has position {} version {}: \
                 another writer is using the store",
                got.position, got.version, want.position, want.version
            )));
        }
    }
    summary.events += stored.len() as u64;
    summary.commands += 1;
    Ok(())
}
