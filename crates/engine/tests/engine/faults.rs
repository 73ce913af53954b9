//! `Engine::execute`'s retry rule (SPEC §2.3 step 7, §2.4) against a store that fails on
//! demand: a real SQLite store behind a wrapper that, before an append, answers with an injected
//! conflict, an unavailable store, a lost acknowledgement (the append commits, the caller hears
//! a failure) or a delay. Each test says how many appends reached the store and what it holds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sourced_core::query::FieldPath;
use sourced_core::{
    Aggregate, Command, CommandId, ExpectedVersion, Position, RecordedEvent, StreamHead, StreamKey, TenantId, Version,
};
use sourced_engine::{Engine, EngineConfig, EngineError, SystemClock};
use sourced_store::sqlite::{SqliteOptions, SqliteStore};
use sourced_store::{
    AppendOutcome, AppendRequest, CommandRecord, CommitListener, DocumentRow, DocumentText, EventStore, ListQuery,
    RebuiltStream, StoreError, StoreStats,
};

/// What the wrapper does to the next append.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// Answers a conflict, as if another writer got there first; nothing is written.
    Conflict,
    /// Answers that the store is unavailable; nothing is written.
    Unavailable,
    /// Writes the append, then answers that the store is unavailable (the acknowledgement is lost).
    LostAck,
    /// Waits, then appends.
    Delay(Duration),
}

pub(crate) struct Faulty {
    pub(crate) inner: Box<dyn EventStore>,
    pub(crate) faults: Mutex<VecDeque<Fault>>,
    /// Appends that reached the wrapper.
    pub(crate) appends: AtomicU64,
}

impl Faulty {
    pub(crate) fn inject(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults.iter().copied());
    }

    pub(crate) fn appends(&self) -> u64 {
        self.appends.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventStore for Faulty {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let fault = self.faults.lock().unwrap().pop_front();
        match fault {
            None => self.inner.append(request).await,
            Some(Fault::Conflict) => {
                let version = match request.expected {
                    ExpectedVersion::Exact(v) => v.next(),
                    _ => Version(1),
                };
                Err(StoreError::Conflict { expected: request.expected, actual: StreamHead { version, deleted: false } })
            }
            Some(Fault::Unavailable) => Err(StoreError::unavailable("injected: the store is away")),
            Some(Fault::LostAck) => {
                self.inner.append(request).await?;
                Err(StoreError::unavailable("injected: the acknowledgement was lost"))
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.inner.append(request).await
            }
        }
    }
    async fn read_stream(
        &self,
        key: &StreamKey,
        after: Version,
        to: Option<Version>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(key, after, to, limit).await
    }
    async fn read_all(
        &self,
        tenant: &TenantId,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(tenant, after, limit).await
    }
    async fn read_global(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_global(after, limit).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    async fn get_document(&self, key: &StreamKey) -> Result<Option<DocumentRow>, StoreError> {
        self.inner.get_document(key).await
    }
    async fn get_document_text(&self, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
        self.inner.get_document_text(key).await
    }
    async fn list_documents(&self, query: &ListQuery) -> Result<Vec<DocumentRow>, StoreError> {
        self.inner.list_documents(query).await
    }
    async fn count_documents(&self, query: &ListQuery) -> Result<u64, StoreError> {
        self.inner.count_documents(query).await
    }
    async fn ensure_indexes(&self, fields: &[FieldPath]) -> Result<Vec<String>, StoreError> {
        self.inner.ensure_indexes(fields).await
    }
    async fn load_snapshot(
        &self,
        key: &StreamKey,
        fold: u32,
        at_most: Option<Version>,
    ) -> Result<Option<Aggregate>, StoreError> {
        self.inner.load_snapshot(key, fold, at_most).await
    }
    async fn load_snapshot_at(
        &self,
        key: &StreamKey,
        fold: u32,
        at: DateTime<Utc>,
    ) -> Result<Option<Aggregate>, StoreError> {
        self.inner.load_snapshot_at(key, fold, at).await
    }
    async fn list_streams(&self, after: Option<&StreamKey>, limit: usize) -> Result<Vec<StreamKey>, StoreError> {
        self.inner.list_streams(after, limit).await
    }
    async fn clear_read_model(&self) -> Result<(), StoreError> {
        self.inner.clear_read_model().await
    }
    async fn put_read_model(&self, streams: Vec<RebuiltStream>) -> Result<(), StoreError> {
        self.inner.put_read_model(streams).await
    }
    async fn get_command(&self, tenant: &TenantId, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.get_command(tenant, id).await
    }
    async fn checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.inner.checkpoint(name).await
    }
    async fn put_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.inner.put_checkpoint(name, position).await
    }
    async fn start_checkpoint(&self, name: &str, position: Position) -> Result<Position, StoreError> {
        self.inner.start_checkpoint(name, position).await
    }
    async fn due_wakes(
        &self,
        process: &str,
        at: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<sourced_store::Wake>, StoreError> {
        self.inner.due_wakes(process, at, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn runner_lease(&self, name: &str) -> Result<Option<sourced_store::RunnerLease>, StoreError> {
        self.inner.runner_lease(name).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) -> bool {
        self.inner.set_commit_listener(listener)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<Faulty>,
    engine: Engine,
}

fn setup(conflict_retries_max: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let inner = SqliteStore::open(&dir.path().join("s.db"), SqliteOptions::default()).unwrap();
    let store =
        Arc::new(Faulty { inner: Box::new(inner), faults: Mutex::new(VecDeque::new()), appends: AtomicU64::new(0) });
    let config = EngineConfig { conflict_retries_max, ..EngineConfig::default() };
    let engine = Engine::new(store.clone(), config, Arc::new(SystemClock));
    Setup { _dir: dir, store, engine }
}

fn command(envelope: serde_json::Value) -> Command {
    let defaults = sourced_engine::fresh::envelope_defaults(TenantId::default_tenant(), false);
    Command::from_envelope_value(envelope, defaults).unwrap()
}

fn create() -> Command {
    command(json!({"type": "create", "targetName": "order", "targetId": "o1", "body": {"lines": []}}))
}

/// Appends a line: never a no-op, so a command decided twice would write twice.
fn add_line(version: Option<u64>) -> Command {
    let mut env = json!({"type": "patch", "targetName": "order", "targetId": "o1",
        "body": [{"op": "add", "path": "/lines/-", "value": 1}]});
    if let Some(v) = version {
        env["version"] = json!(v);
    }
    command(env)
}

/// The stream's version and lines, as the store has them.
async fn stored(s: &Setup) -> (u64, usize) {
    let key = create().key;
    let agg = s.engine.load(&key, None).await.unwrap();
    let lines = agg.state.as_ref().and_then(|d| d["lines"].as_array().map(Vec::len)).unwrap_or(0);
    (agg.version.0, lines)
}

#[tokio::test]
async fn a_lost_race_is_decided_again_on_a_fresh_load() {
    let s = setup(3);
    s.engine.execute(create(), None).await.unwrap();
    s.store.inject(&[Fault::Conflict]);
    let before = s.store.appends();
    let outcome = s.engine.execute(add_line(None), None).await.unwrap();
    assert_eq!(outcome.result.version, Version(2));
    assert_eq!(s.store.appends() - before, 2, "the first append lost, the second won");
    assert_eq!(stored(&s).await, (2, 1));
}

#[tokio::test]
async fn races_lost_past_the_limit_are_a_conflict_of_the_retries_not_the_client() {
    let s = setup(2);
    s.engine.execute(create(), None).await.unwrap();
    // On the cached aggregate, then on a fresh load and two more retries.
    s.store.inject(&[Fault::Conflict; 4]);
    let before = s.store.appends();
    let e = s.engine.execute(add_line(None), None).await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict { client_version: false, .. }), "{e:?}");
    assert_eq!(s.store.appends() - before, 4);
    assert_eq!(stored(&s).await, (1, 0), "nothing was written");
    // The store works again: the next command goes through at once.
    s.engine.execute(add_line(None), None).await.unwrap();
    assert_eq!(stored(&s).await, (2, 1));
}

#[tokio::test]
async fn a_client_version_is_not_retried_past_a_fresh_load() {
    let s = setup(3);
    s.engine.execute(create(), None).await.unwrap();
    s.store.inject(&[Fault::Conflict; 2]);
    let before = s.store.appends();
    let e = s.engine.execute(add_line(Some(1)), None).await.unwrap_err();
    assert!(matches!(e, EngineError::Conflict { client_version: true, .. }), "{e:?}");
    assert_eq!(s.store.appends() - before, 2, "the cached decision, then one on a fresh load");
    assert_eq!(stored(&s).await, (1, 0));
}

#[tokio::test]
async fn an_unavailable_store_is_reported_at_once_and_nothing_is_written() {
    let s = setup(3);
    s.engine.execute(create(), None).await.unwrap();
    s.store.inject(&[Fault::Unavailable]);
    let cmd = add_line(None);
    let before = s.store.appends();
    let e = s.engine.execute(cmd.clone(), None).await.unwrap_err();
    assert!(matches!(e, EngineError::Store(StoreError::Unavailable(_))), "{e:?}");
    assert_eq!(s.store.appends() - before, 1, "an unavailable store is not retried behind the client's back");
    assert_eq!(stored(&s).await, (1, 0));
    // The client's retry of the same command is carried out once.
    let outcome = s.engine.execute(cmd, None).await.unwrap();
    assert!(!outcome.replayed);
    assert_eq!(stored(&s).await, (2, 1));
}

#[tokio::test]
async fn a_lost_acknowledgement_is_answered_by_the_recorded_outcome() {
    let s = setup(3);
    s.engine.execute(create(), None).await.unwrap();
    s.store.inject(&[Fault::LostAck]);
    let cmd = add_line(None);
    let e = s.engine.execute(cmd.clone(), None).await.unwrap_err();
    assert!(matches!(e, EngineError::Store(StoreError::Unavailable(_))), "{e:?}");
    assert_eq!(stored(&s).await, (2, 1), "the append committed although its caller heard a failure");
    // The retry decides again on what it has, the store refuses the recorded id, and the
    // recorded outcome is the answer: nothing is written twice.
    let outcome = s.engine.execute(cmd.clone(), None).await.unwrap();
    assert!(outcome.replayed);
    assert_eq!(outcome.result.version, Version(2));
    assert_eq!(outcome.result.events.len(), 1);
    assert_eq!(stored(&s).await, (2, 1));
    // The same id with other content is a mismatch, not a write.
    let mut other = add_line(None);
    other.id = cmd.id;
    other.fingerprint = "other".into();
    let e = s.engine.execute(other, None).await.unwrap_err();
    assert!(matches!(e, EngineError::IdempotencyMismatch { .. }), "{e:?}");
    assert_eq!(stored(&s).await, (2, 1));
}

#[tokio::test]
async fn slow_appends_racing_each_other_lose_no_update() {
    let s = setup(8);
    s.engine.execute(create(), None).await.unwrap();
    s.store.inject(&[Fault::Delay(Duration::from_millis(30)); 4]);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let engine = s.engine.clone();
            tokio::spawn(async move { engine.execute(add_line(None), None).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    assert_eq!(stored(&s).await, (5, 4), "every one of the four lines is there, once");
}
