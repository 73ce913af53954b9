//! `sourced rebuild` (SPEC §3.3, §5): the read model and the snapshots made again from the
//! events alone, with the same fold and the same snapshot rule as live appends, so the result
//! equals what live appends wrote.
//!
//! It runs while no process serves the store: it first clears the read model, then writes it
//! back stream by stream, in batches. Interrupted, it leaves a partial read model; running it
//! again finishes the job.

use std::time::{Duration, Instant};

use serde_json::Value;
use sourced_core::aggregate::FOLD_VERSION;
use sourced_core::{Aggregate, RecordedEvent, StreamKey, Version};
use sourced_store::{DocumentRow, EventStore, READ_LIMIT_MAX, RebuiltStream};

use crate::{EngineError, snapshot_due};

/// Streams listed (and written) per batch.
const STREAMS_PER_BATCH: usize = 500;
/// Snapshots held in memory before a batch is written early.
const SNAPSHOTS_PER_BATCH: usize = 10_000;

/// How far a rebuild has come.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    /// Streams rebuilt.
    pub streams: u64,
    /// Events folded.
    pub events: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Time since the rebuild began.
    pub elapsed: Duration,
}

impl Progress {
    /// Events folded per second so far.
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Rebuilds the read model and the snapshots (every `snapshot_every` events; 0: none) from
/// the events; calls `progress` after each batch.
pub async fn rebuild(
    store: &dyn EventStore,
    snapshot_every: u64,
    mut progress: impl FnMut(&Progress),
) -> Result<Progress, EngineError> {
    let start = Instant::now();
    let mut done = Progress::default();
    store.clear_read_model().await?;
    let mut after: Option<StreamKey> = None;
    loop {
        let keys = store.list_streams(after.as_ref(), STREAMS_PER_BATCH).await?;
        let Some(last) = keys.last().cloned() else { break };
        let mut batch = Vec::with_capacity(keys.len());
        let mut held = 0;
        for key in keys {
            let (stream, events) = fold_stream(store, key, snapshot_every).await?;
            done.streams += 1;
            done.events += events;
            done.snapshots += stream.snapshots.len() as u64;
            held += stream.snapshots.len();
            batch.push(stream);
            if held >= SNAPSHOTS_PER_BATCH {
                store.put_read_model(std::mem::take(&mut batch)).await?;
                held = 0;
            }
        }
        if !batch.is_empty() {
            store.put_read_model(batch).await?;
        }
        done.elapsed = start.elapsed();
        progress(&done);
        after = Some(last);
    }
    done.elapsed = start.elapsed();
    Ok(done)
}

/// The command an event came from (its metadata's `commandId`): the events of one append.
fn command_of(event: &RecordedEvent) -> Option<&str> {
    event.metadata.get("commandId").and_then(Value::as_str)
}

/// One stream folded: its read-model row, and a snapshot after each append that crossed a
/// multiple of `every` (an append being the run of events of one command, as live).
async fn fold_stream(store: &dyn EventStore, key: StreamKey, every: u64) -> Result<(RebuiltStream, u64), EngineError> {
    let mut agg = Aggregate::default();
    let mut snapshots = Vec::new();
    // The version before the current append, and the command it comes from.
    let mut append_start = Version::ZERO;
    let mut append_command: Option<String> = None;
    let mut events = 0u64;
    loop {
        let page = store.read_stream(&key, agg.version, None, READ_LIMIT_MAX).await?;
        let full = page.len() == READ_LIMIT_MAX;
        for e in &page {
            let command = command_of(e);
            if append_command.is_none() || command.is_none() || command != append_command.as_deref() {
                // A new append begins: the previous one ended at the current version.
                if snapshot_due(append_start, agg.version, every) {
                    snapshots.push(agg.clone());
                }
                append_start = agg.version;
                append_command = command.map(str::to_owned);
            }
            agg.apply(e)?;
            events += 1;
        }
        if !full {
            break;
        }
    }
    if snapshot_due(append_start, agg.version, every) {
        snapshots.push(agg.clone());
    }
    let (Some(created_at), Some(updated_at)) = (agg.created_at, agg.updated_at) else {
        return Err(EngineError::Store(sourced_store::StoreError::corrupt(format!("{key}: a stream without events"))));
    };
    let row = DocumentRow {
        key,
        version: agg.version,
        state: agg.state.unwrap_or(Value::Null),
        deleted: agg.deleted,
        created_at,
        updated_at,
    };
    Ok((RebuiltStream { row, snapshots, fold: FOLD_VERSION }, events))
}
