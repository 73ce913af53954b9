//! The append pipeline both backends share: a caller validates and encodes its append, queues
//! it for the backend's one writer ([`enqueue`]) and builds the recorded events from the
//! answer; the writer decides each append by one rule ([`decide_append`]), writes the batch its
//! own way, and answers ([`answer`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use sourced_core::timestamp::truncate;
use sourced_core::{Position, RecordedEvent, StreamHead, Version};

use crate::sql::{to_json, to_sql_int};
use crate::{AppendOutcome, AppendRequest, CommandRecord, StoreError, StoreStats, validate_append};

/// One append waiting for the writer, and where its answer goes.
pub(crate) struct Job {
    pub(crate) request: AppendRequest,
    /// The request's text columns, encoded by the caller so the single writer does not.
    pub(crate) encoded: Encoded,
    /// The answer, with the request handed back so the caller can build the recorded events
    /// without the writer copying them.
    reply: oneshot::Sender<(AppendRequest, Result<Written, StoreError>)>,
}

#[cfg(test)]
impl Job {
    /// A job for `request` as [`enqueue`] would queue it, for tests that drive a writer's
    /// batch directly (nobody waits for its answer).
    pub(crate) fn for_test(request: AppendRequest) -> Job {
        let encoded = Encoded::new(&request).expect("a request that encodes");
        let (reply, _) = oneshot::channel();
        Job { request, encoded, reply }
    }
}

/// An append's text columns, ready to bind: the JSON texts, and the ids as text (SQLite binds
/// them so; PostgreSQL binds the ids as `uuid` from the request).
pub(crate) struct Encoded {
    pub(crate) event_ids: Vec<String>,
    pub(crate) data: Vec<String>,
    pub(crate) metadata: Vec<String>,
    pub(crate) state: String,
    pub(crate) command_id: String,
    pub(crate) extra: String,
}

impl Encoded {
    fn new(request: &AppendRequest) -> Result<Encoded, StoreError> {
        Ok(Encoded {
            event_ids: request.events.iter().map(|e| e.id.0.to_string()).collect(),
            data: request.events.iter().map(|e| to_json(&e.data)).collect::<Result<_, _>>()?,
            metadata: request.events.iter().map(|e| to_json(&e.metadata)).collect::<Result<_, _>>()?,
            state: to_json(&request.document.state)?,
            command_id: request.command.id.0.to_string(),
            extra: to_json(&request.command.extra)?,
        })
    }
}

/// What the writer did with one append; the caller builds the recorded events from its own
/// request, so the writer copies no JSON.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Written {
    Appended {
        /// The first event's position; the others follow without gaps.
        first_position: Position,
        /// The first event's version; the others follow without gaps.
        first_version: Version,
    },
    Duplicate(CommandRecord),
}

/// The counters a store keeps of its appends and reads.
#[derive(Default)]
pub(crate) struct Counters {
    commits: AtomicU64,
    appends: AtomicU64,
    events: AtomicU64,
    /// Events returned by reads.
    events_read: AtomicU64,
    /// Appends handed to the writer's queue.
    accepted: AtomicU64,
    /// Appends the writer has answered.
    answered: AtomicU64,
}

impl Counters {
    /// The counters as [`StoreStats`].
    pub(crate) fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.commits.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            events_read: self.events_read.load(Ordering::Relaxed),
        }
    }

    /// Appends handed to the writer and not answered yet (queued, or in the batch being
    /// committed). It may briefly count low, never high.
    pub(crate) fn pending_appends(&self) -> u64 {
        // Accepted first: answers counted after it can only make the difference smaller.
        let accepted = self.accepted.load(Ordering::SeqCst);
        accepted.saturating_sub(self.answered.load(Ordering::SeqCst))
    }

    /// Counts the events a read returned.
    pub(crate) fn counted(
        &self,
        events: Result<Vec<RecordedEvent>, StoreError>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if let Ok(events) = &events {
            self.events_read.fetch_add(events.len() as u64, Ordering::Relaxed);
        }
        events
    }

    /// Counts one committed batch; returns the number of events it appended.
    pub(crate) fn committed(&self, batch: &[Job], results: &[Result<Written, StoreError>]) -> u64 {
        let mut appends = 0;
        let mut events = 0;
        for (job, result) in batch.iter().zip(results) {
            if let Ok(Written::Appended { .. }) = result {
                appends += 1;
                events += job.request.events.len() as u64;
            }
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.appends.fetch_add(appends, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        events
    }
}

/// A backend's handle on its writer: the sending end of the writer's queue, and whatever else
/// the backend keeps to stop it.
pub(crate) trait WriterHandle {
    /// Where appends are queued for the writer.
    fn sender(&self) -> &mpsc::Sender<Job>;
}

/// The store's writer handle; `None` once the store is closed, when appends get
/// [`StoreError::Closed`].
pub(crate) struct WriterSlot<W> {
    slot: Mutex<Option<W>>,
    /// Names the writer in errors: `SQLite`, `PostgreSQL`.
    backend: &'static str,
}

impl<W: WriterHandle> WriterSlot<W> {
    pub(crate) fn new(writer: W, backend: &'static str) -> WriterSlot<W> {
        WriterSlot { slot: Mutex::new(Some(writer)), backend }
    }

    fn lock(&self) -> MutexGuard<'_, Option<W>> {
        self.slot.lock().unwrap_or_else(|_| panic!("the {} writer mutex is poisoned", self.backend))
    }

    /// Whether the store is closed (appends are refused).
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().is_none()
    }

    /// Takes the handle out: appends are refused from now on.
    pub(crate) fn take(&self) -> Option<W> {
        self.lock().take()
    }

    /// [`WriterSlot::take`] without locking, whatever an earlier panic left (for `Drop`).
    pub(crate) fn take_mut(&mut self) -> Option<W> {
        self.slot.get_mut().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Whether the writer takes appends: [`StoreError::Closed`] once the store is closed,
    /// [`StoreError::Unavailable`] when the writer has stopped by itself.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        let writer_stopped = match self.lock().as_ref() {
            None => return Err(StoreError::Closed),
            Some(w) => w.sender().is_closed(),
        };
        if writer_stopped {
            return Err(StoreError::unavailable(format!("the {} writer has stopped", self.backend)));
        }
        Ok(())
    }
}

/// The caller's half of an append: checks and encodes the request, queues it for the writer
/// (taking the sender only after the encoding), and waits for the answer.
pub(crate) async fn enqueue(
    request: AppendRequest,
    writer: &WriterSlot<impl WriterHandle>,
    counters: &Counters,
) -> Result<AppendOutcome, StoreError> {
    validate_append(&request)?;
    let encoded = Encoded::new(&request)?;
    let backend = writer.backend;
    let sender = writer.lock().as_ref().map(|w| w.sender().clone()).ok_or(StoreError::Closed)?;
    let (reply, answer) = oneshot::channel();
    sender
        .send(Job { request, encoded, reply })
        .await
        .map_err(|_| StoreError::unavailable(format!("the {backend} writer has stopped")))?;
    counters.accepted.fetch_add(1, Ordering::SeqCst);
    drop(sender);
    let (request, written) =
        answer.await.map_err(|_| StoreError::unavailable(format!("the {backend} writer stopped before answering")))?;
    match written? {
        Written::Duplicate(record) => Ok(AppendOutcome::Duplicate(record)),
        Written::Appended { first_position, first_version } => {
            Ok(AppendOutcome::Appended(crate::recorded_events(request, first_position, first_version)))
        }
    }
}

/// The writer's last step for a batch: answers each append, emptying `batch`.
pub(crate) fn answer(batch: &mut Vec<Job>, results: Vec<Result<Written, StoreError>>, counters: &Counters) {
    for (job, result) in batch.drain(..).zip(results) {
        // The caller may have gone away; the write stands either way.
        let _ = job.reply.send((job.request, result));
        counters.answered.fetch_add(1, Ordering::SeqCst);
    }
}

/// Every append's result when its batch did not commit: the batch's error.
pub(crate) fn batch_failed(e: &StoreError, appends: usize) -> Vec<Result<Written, StoreError>> {
    (0..appends)
        .map(|_| {
            Err(match e {
                StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
                StoreError::Closed => StoreError::Closed,
                other => StoreError::backend(format!("the batch was not committed: {other}")),
            })
        })
        .collect()
}

/// The events one commit stored, in position order, for the commit listener.
pub(crate) fn committed_events(batch: &[Job], results: &[Result<Written, StoreError>]) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    for (job, result) in batch.iter().zip(results) {
        if let Ok(Written::Appended { first_position, first_version }) = result {
            let r = &job.request;
            let timestamp = truncate(r.timestamp);
            out.extend(r.events.iter().enumerate().map(|(i, e)| RecordedEvent {
                id: e.id,
                position: Position(first_position.0 + i as u64),
                tenant: r.key.tenant.clone(),
                target_name: r.key.type_name.clone(),
                target_id: r.key.id.clone(),
                version: Version(first_version.0 + i as u64),
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                metadata: e.metadata.clone(),
                timestamp,
            }));
        }
    }
    debug_assert!(
        out.windows(2).all(|w| w[0].position.0 + 1 == w[1].position.0),
        "a commit's positions are contiguous"
    );
    out
}

/// What to do with one append.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Decision {
    /// The tenant has a record of the command id: write nothing, answer with the record.
    Duplicate(CommandRecord),
    /// The stream's head does not meet the expected version: write nothing.
    Conflict(StreamHead),
    /// Write the events here.
    Write(Span),
}

/// Where an accepted append's events go: contiguous versions after the stream's head, and
/// contiguous positions from the writer's next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) first_position: Position,
    pub(crate) first_version: Version,
    /// How many events (at least one).
    pub(crate) events: u64,
}

impl Span {
    /// The last event's version.
    pub(crate) fn last_version(&self) -> Version {
        Version(self.first_version.0 + self.events - 1)
    }

    /// The position after the last event's: the writer's next one.
    pub(crate) fn next_position(&self) -> u64 {
        self.first_position.0 + self.events
    }

    /// What the writer answers once the span is written.
    pub(crate) fn written(&self) -> Written {
        Written::Appended { first_position: self.first_position, first_version: self.first_version }
    }
}

/// The rule of an append, for every writer: the command record first (a recorded command id is
/// a duplicate, whatever the stream), then the expected version against the stream's head
/// (`head` is asked only when there is no record), then the events at contiguous versions after
/// the head and contiguous positions from `next_position`, all within what the store holds.
pub(crate) fn decide_append(
    record: Option<CommandRecord>,
    head: impl FnOnce() -> Result<StreamHead, StoreError>,
    request: &AppendRequest,
    next_position: u64,
) -> Result<Decision, StoreError> {
    if let Some(record) = record {
        return Ok(Decision::Duplicate(record));
    }
    let head = head()?;
    if !request.expected.matches(head) {
        return Ok(Decision::Conflict(head));
    }
    let span = Span {
        first_position: Position(next_position),
        first_version: head.version.next(),
        events: request.events.len() as u64,
    };
    if span.events == 0 {
        return Err(StoreError::invalid_request("an append needs at least one event"));
    }
    to_sql_int(span.last_version().0)?;
    to_sql_int(span.next_position() - 1)?;
    Ok(Decision::Write(span))
}

/// Records one commit of a writer in the process's metrics (`metrics.rs` of the server renders
/// them): how many appends it carried, how long it took, and whether it failed.
pub(crate) fn record_commit(backend: &'static str, appends: usize, started: std::time::Instant, ok: bool) {
    metrics::histogram!("sourced_store_batch_appends", "backend" => backend).record(appends as f64);
    metrics::histogram!("sourced_store_commit_seconds", "backend" => backend).record(started.elapsed().as_secs_f64());
    if !ok {
        metrics::counter!("sourced_store_batch_failures_total", "backend" => backend).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::{TimeZone, Utc};
    use serde_json::json;
    use sourced_core::{AggregateId, CommandId, EventId, ExpectedVersion, NewEvent, StreamKey, TenantId, TypeName};
    use uuid::Uuid;

    use crate::{CommandWrite, DocumentWrite};

    fn key() -> StreamKey {
        StreamKey {
            tenant: TenantId::parse("t").expect("a tenant"),
            type_name: TypeName::parse("order").expect("a type"),
            id: AggregateId::parse("o1").expect("an id"),
        }
    }

    fn request(expected: ExpectedVersion, events: usize) -> AppendRequest {
        AppendRequest {
            key: key(),
            expected,
            events: (0..events)
                .map(|i| NewEvent {
                    id: EventId(Uuid::from_u128(i as u128 + 1)),
                    event_type: "Happened".into(),
                    data: json!({ "i": i }),
                    metadata: json!({}),
                })
                .collect(),
            timestamp: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("a time"),
            document: DocumentWrite { state: json!({}), deleted: false },
            command: CommandWrite { id: CommandId(Uuid::from_u128(7)), fingerprint: "f".into(), extra: json!(null) },
            snapshot: None,
            checkpoint: None,
            wake: None,
        }
    }

    fn record() -> CommandRecord {
        CommandRecord {
            id: CommandId(Uuid::from_u128(7)),
            fingerprint: "f".into(),
            key: key(),
            first_version: Version(1),
            last_version: Version(2),
            extra: json!(null),
        }
    }

    fn head(version: u64, deleted: bool) -> StreamHead {
        StreamHead { version: Version(version), deleted }
    }

    fn write(first_position: u64, first_version: u64, events: u64) -> Decision {
        Decision::Write(Span {
            first_position: Position(first_position),
            first_version: Version(first_version),
            events,
        })
    }

    /// A row of the table: its name, the record, the head, the expected version, the events,
    /// the next position, and what is decided (`None`: refused as an invalid request).
    type Case = (&'static str, Option<CommandRecord>, StreamHead, ExpectedVersion, usize, u64, Option<Decision>);

    #[test]
    fn decide_append_applies_the_rule_in_order() {
        use ExpectedVersion::{Any, Exact, Exists, NoStream};
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a new stream", None, head(0, false), NoStream, 1, 1, Some(write(1, 1, 1))),
            ("an existing stream", None, head(2, false), Exists, 1, 8, Some(write(8, 3, 1))),
            ("a deleted stream", None, head(2, true), Exists, 1, 8, Some(Decision::Conflict(head(2, true)))),
            ("events continue the head and the positions", None, head(3, false), Exact(Version(3)), 2, 10, Some(write(10, 4, 2))),
            ("any version", None, head(5, false), Any, 3, 42, Some(write(42, 6, 3))),
            ("a record wins over a conflict", Some(record()), head(9, false), NoStream, 1, 1, Some(Decision::Duplicate(record()))),
            ("a record wins over a matching head", Some(record()), head(0, false), NoStream, 1, 1, Some(Decision::Duplicate(record()))),
            ("a stale expected version", None, head(4, false), Exact(Version(3)), 1, 5, Some(Decision::Conflict(head(4, false)))),
            ("no stream on an existing stream", None, head(1, false), NoStream, 1, 5, Some(Decision::Conflict(head(1, false)))),
            ("the last position beyond i64", None, head(0, false), Any, 2, i64::MAX as u64, None),
            ("the last position at i64::MAX", None, head(0, false), Any, 1, i64::MAX as u64, Some(write(i64::MAX as u64, 1, 1))),
            ("the last version beyond i64", None, head(i64::MAX as u64, false), Any, 1, 1, None),
            ("no events", None, head(0, false), Any, 0, 1, None),
        ];
        for (name, record, stream_head, expected, events, next_position, want) in cases {
            let got = decide_append(record, || Ok(stream_head), &request(expected, events), next_position);
            match (got, want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{name}"),
                (Err(StoreError::InvalidRequest(_)), None) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_head_is_asked_only_without_a_record() {
        let asked = std::cell::Cell::new(false);
        let head = || {
            asked.set(true);
            Err(StoreError::corrupt("a bad head"))
        };
        let decided = decide_append(Some(record()), head, &request(ExpectedVersion::NoStream, 1), 1);
        assert!(matches!(decided, Ok(Decision::Duplicate(_))), "{decided:?}");
        assert!(!asked.get());
        let decided = decide_append(None, head, &request(ExpectedVersion::NoStream, 1), 1);
        assert!(matches!(decided, Err(StoreError::Corrupt(_))), "{decided:?}");
        assert!(asked.get());
    }
}
