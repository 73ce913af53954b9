//! Sourced's command pipeline (SPEC §2.3): idempotency, load, decide, fold, check, append with
//! optimistic concurrency and bounded retries, and replay of recorded outcomes. The only crate
//! that combines the domain core with an event store.

#![warn(missing_docs)]

mod cache;
pub mod fresh;
pub mod limits;
pub mod process;
mod reads;
pub mod rebuild;
pub mod subscriptions;
pub mod transfer;

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use cache::AggregateCache;
use sourced_core::aggregate::FOLD_VERSION;
use sourced_core::artifacts::{self, ArtifactSet};
use sourced_core::{
    Aggregate, AggregateId, Command, CommandId, CommandKind, DomainError, ExpectedVersion, FoldError, Limits, NewEvent,
    RecordedEvent, StreamHead, StreamKey, TenantId, TypeName, Version, new_events, timestamp,
};
use sourced_store::{
    AppendOutcome, AppendRequest, CommandRecord, CommandWrite, DocumentWrite, EventStore, READ_LIMIT_MAX,
    SnapshotWrite, StoreError,
};
pub use subscriptions::{Hub, SharedEvent, Start, Subscription, SubscriptionFilter, SubscriptionItem};

/// A source of the current time; tests pass a fixed one.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// How the engine behaves.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The core's limits.
    pub limits: Limits,
    /// How many times a command without a client version is decided again after losing a
    /// race (SPEC §2.3 step 7).
    pub conflict_retries_max: u32,
    /// Whether every command on an existing aggregate must carry an expected version.
    pub require_version: bool,
    /// Most aggregates kept folded in memory (0 disables the cache).
    pub cache_aggregates_max: usize,
    /// About how many bytes of documents the cache may hold.
    pub cache_bytes_max: usize,
    /// Events the live buffer of subscriptions keeps (SPEC §6); a subscriber further behind
    /// reads the store instead.
    pub live_buffer_events: usize,
    /// A snapshot of an aggregate's state is stored each time its version crosses a multiple
    /// of this (SPEC §5); 0 stores none.
    pub snapshot_every: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            conflict_retries_max: 3,
            require_version: false,
            cache_aggregates_max: 10_000,
            cache_bytes_max: 64 * 1024 * 1024,
            live_buffer_events: 4_096,
            snapshot_every: 100,
        }
    }
}

/// The reply to a command (SPEC §2.5).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandResult {
    /// The command id.
    pub id: CommandId,
    /// The aggregate type.
    pub target_name: TypeName,
    /// The aggregate id.
    pub target_id: AggregateId,
    /// The aggregate's version after the command.
    pub version: Version,
    /// The events the command appended.
    pub events: Vec<RecordedEvent>,
    /// Warnings from rules of severity `warn`.
    pub warnings: Vec<Value>,
}

/// A command's result and the aggregate it led to.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandOutcome {
    /// The reply.
    pub result: CommandResult,
    /// The aggregate at the result's version (shared with the cache).
    pub aggregate: Arc<Aggregate>,
    /// Whether this is the stored outcome of an earlier identical command (SPEC §2.4).
    pub replayed: bool,
}

impl CommandOutcome {
    /// The document at the result's version, as GET shows it (`_meta.deleted` set after a
    /// delete). Built on demand: the WebSocket's reply carries no document.
    pub fn document(&self) -> Value {
        self.aggregate.document(&self.result.target_id).unwrap_or(Value::Null)
    }
}

/// Why the engine refused or failed a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The command is invalid or the domain refuses it.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The stream is not at the expected version (the client's, or the loaded one after the
    /// retries ran out).
    #[error("version conflict: expected {expected}, the aggregate is at version {}", .actual.version)]
    Conflict {
        /// What was expected.
        expected: ExpectedVersion,
        /// Where the stream is.
        actual: StreamHead,
        /// Whether the expected version came from the client (else the retries ran out).
        client_version: bool,
    },
    /// The command id was used before for a command with other content.
    #[error("command id {id} was already used for a different command")]
    IdempotencyMismatch {
        /// The command id.
        id: CommandId,
    },
    /// The deployment requires an expected version and the command has none.
    #[error("this deployment requires an expected version on every write")]
    VersionRequired,
    /// A stored stream could not be folded.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The command pipeline over one store.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn EventStore>,
    config: Arc<EngineConfig>,
    clock: Arc<dyn Clock>,
    cache: Arc<AggregateCache>,
    hub: Arc<Hub>,
    /// The loaded artifact set, replaced whole on reload (SPEC §4: never a partial set).
    artifacts: Arc<RwLock<Arc<ArtifactSet>>>,
}

impl Engine {
    /// An engine over `store`.
    pub fn new(store: Arc<dyn EventStore>, config: EngineConfig, clock: Arc<dyn Clock>) -> Self {
        let cache = Arc::new(AggregateCache::new(config.cache_aggregates_max, config.cache_bytes_max));
        let hub = Hub::new(config.live_buffer_events);
        if !hub.attach(store.as_ref()) {
            tracing::info!("the store does not feed live events; subscriptions read the store after each append");
        }
        Self {
            store,
            config: Arc::new(config),
            clock,
            cache,
            hub,
            artifacts: Arc::new(RwLock::new(Arc::new(ArtifactSet::empty()))),
        }
    }

    /// The artifact set commands are decided with.
    pub fn artifacts(&self) -> Arc<ArtifactSet> {
        self.artifacts.read().expect("the artifacts lock is never poisoned").clone()
    }

    /// Replaces the artifact set, atomically: every command is decided with one whole set.
    pub fn set_artifacts(&self, set: Arc<ArtifactSet>) {
        *self.artifacts.write().expect("the artifacts lock is never poisoned") = set;
    }

    /// A live subscription to a tenant's events (SPEC §6): every event matching `filter` after
    /// `start`, exactly once and in position order, then a caught-up marker, then live events.
    pub fn subscribe(&self, tenant: TenantId, filter: SubscriptionFilter, start: Start) -> Subscription {
        Subscription::new(self.store.clone(), self.hub.clone(), tenant, filter, start)
    }

    /// The live buffer shared by subscriptions.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The store, for reads that need no domain logic.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs one command through the pipeline of SPEC §2.3. `principal` (`Principal::to_json`,
    /// none with authentication off) is `principal` in CEL and is recorded in every event's
    /// metadata; whether the principal may send the command is the caller's check.
    ///
    /// The happy path reads nothing before its append: a create assumes the aggregate is new,
    /// other commands use the cached aggregate when there is one, and the idempotency record
    /// is looked up only when something fails (the store refuses a recorded command id at
    /// append, so a retry never writes twice). Every failure is confirmed against a fresh load
    /// and the command records before it is reported.
    pub async fn execute(&self, cmd: Command, principal: Option<&Value>) -> Result<CommandOutcome, EngineError> {
        let client_exact = matches!(cmd.expected, Some(ExpectedVersion::Exact(_) | ExpectedVersion::NoStream));
        let mut retry = Retry::default();
        loop {
            let (setback, error) = match self.pass(&cmd, principal, retry.fresh).await? {
                Pass::Appended(outcome) => return Ok(outcome),
                Pass::Duplicate(record) => return self.replay(&cmd, record).await,
                Pass::Refused(error) => (Setback::Refused, error),
                Pass::LostRace { decided_on, actual } => {
                    self.cache.remove(&cmd.key);
                    let error = match cmd.expected {
                        Some(expected) if client_exact => {
                            EngineError::Conflict { expected, actual, client_version: true }
                        }
                        _ => EngineError::Conflict {
                            expected: ExpectedVersion::Exact(decided_on),
                            actual,
                            client_version: false,
                        },
                    };
                    (Setback::LostRace, error)
                }
            };
            match retry.next(setback, client_exact, self.config.conflict_retries_max) {
                Verdict::Again(next) => {
                    tracing::debug!(command = %cmd.id, ?setback, races_lost = next.races_lost, "deciding again");
                    retry = next;
                }
                Verdict::Report => return self.refuse(&cmd, error).await,
            }
        }
    }

    /// One pass of the pipeline: load (from the store when `fresh`), check the client's
    /// version, decide, append with the version the decision was made on.
    async fn pass(&self, cmd: &Command, principal: Option<&Value>, fresh: bool) -> Result<Pass, EngineError> {
        let agg = self.aggregate_for(cmd, fresh).await?;
        if self.config.require_version && cmd.expected.is_none() && agg.version > Version::ZERO {
            return Ok(Pass::Refused(EngineError::VersionRequired));
        }
        if let Some(expected) = cmd.expected
            && !expected.matches(agg.head())
        {
            return Ok(Pass::Refused(EngineError::Conflict { expected, actual: agg.head(), client_version: true }));
        }
        let now = timestamp::truncate(self.clock.now());
        let artifacts = self.artifacts();
        let checked = match artifacts::decide::decide(&artifacts, &agg, cmd, &self.config.limits, now, principal) {
            Ok(c) => c,
            Err(e) => return Ok(Pass::Refused(e.into())),
        };
        let (decision, warnings) = (checked.decision, checked.warnings);
        // Warnings are stored with the command record so a retry returns them too.
        let extra = if warnings.is_empty() { Value::Null } else { serde_json::json!({"warnings": warnings}) };
        let events = new_events(cmd, &decision.changes, principal);
        let record = CommandWrite { id: cmd.id, fingerprint: cmd.fingerprint.clone(), extra };
        // Always from the version the decision was made on: any write in between must be
        // detected (SPEC §2.3 step 7).
        let request = append_request(
            cmd.key.clone(),
            agg.version,
            &decision.next,
            events,
            now,
            record,
            self.config.snapshot_every,
        );
        match self.store.append(request).await {
            Ok(AppendOutcome::Appended(events)) => {
                self.hub.wake();
                let version = decision.next.version;
                let aggregate = Arc::new(decision.next);
                self.cache.put(&cmd.key, aggregate.clone());
                Ok(Pass::Appended(CommandOutcome {
                    result: CommandResult {
                        id: cmd.id,
                        target_name: cmd.key.type_name.clone(),
                        target_id: cmd.key.id.clone(),
                        version,
                        events,
                        warnings,
                    },
                    aggregate,
                    replayed: false,
                }))
            }
            Ok(AppendOutcome::Duplicate(record)) => Ok(Pass::Duplicate(record)),
            Err(StoreError::Conflict { actual, .. }) => Ok(Pass::LostRace { decided_on: agg.version, actual }),
            Err(e) => Err(e.into()),
        }
    }

    /// The aggregate a command is decided on: from the store when `fresh`, else the cached
    /// one, else (for a create) the empty aggregate it expects, else from the store.
    async fn aggregate_for(&self, cmd: &Command, fresh: bool) -> Result<Arc<Aggregate>, EngineError> {
        if !fresh {
            if let Some(agg) = self.cache.get(&cmd.key) {
                return Ok(agg);
            }
            if cmd.kind == CommandKind::Create {
                return Ok(Arc::new(Aggregate::default()));
            }
        }
        let agg = Arc::new(self.load(&cmd.key, None).await?);
        if agg.version > Version::ZERO {
            self.cache.put(&cmd.key, agg.clone());
        }
        Ok(agg)
    }

    /// Reports a refusal, unless the command was already carried out: then its recorded
    /// outcome is the answer (SPEC §2.4).
    async fn refuse(&self, cmd: &Command, error: EngineError) -> Result<CommandOutcome, EngineError> {
        match self.store.get_command(&cmd.key.tenant, cmd.id).await? {
            Some(record) => self.replay(cmd, record).await,
            None => Err(error),
        }
    }

    /// The stored outcome of an earlier command with the same id (SPEC §2.4).
    async fn replay(&self, cmd: &Command, record: CommandRecord) -> Result<CommandOutcome, EngineError> {
        if record.fingerprint != cmd.fingerprint {
            return Err(EngineError::IdempotencyMismatch { id: cmd.id });
        }
        let first = record.first_version.0.saturating_sub(1);
        let events =
            self.store.read_stream(&record.key, Version(first), Some(record.last_version), READ_LIMIT_MAX).await?;
        let agg = self.load(&record.key, Some(record.last_version)).await?;
        let warnings = match record.extra.get("warnings") {
            Some(Value::Array(w)) => w.clone(),
            _ => Vec::new(),
        };
        Ok(CommandOutcome {
            result: CommandResult {
                id: record.id,
                target_name: record.key.type_name.clone(),
                target_id: record.key.id.clone(),
                version: record.last_version,
                events,
                warnings,
            },
            aggregate: Arc::new(agg),
            replayed: true,
        })
    }

    /// Folds an aggregate up to version `to` (all when `None`): from its latest snapshot at
    /// or below `to` when there is one (SPEC §5), then the events after it.
    pub async fn load(&self, key: &StreamKey, to: Option<Version>) -> Result<Aggregate, EngineError> {
        let mut agg = match self.config.snapshot_every {
            0 => None,
            _ => self.store.load_snapshot(key, FOLD_VERSION, to).await?,
        }
        .unwrap_or_default();
        loop {
            let page = self.store.read_stream(key, agg.version, to, READ_LIMIT_MAX).await?;
            let full = page.len() == READ_LIMIT_MAX;
            for e in &page {
                agg.apply(e)?;
            }
            if !full {
                return Ok(agg);
            }
        }
    }

    /// Folds an aggregate up to its last event at or before `at` (time travel), from the latest
    /// snapshot before it when there is one.
    pub async fn load_at(&self, key: &StreamKey, at: DateTime<Utc>) -> Result<Aggregate, EngineError> {
        // From the latest snapshot whose last event is at or before `at`.
        let mut agg = match self.config.snapshot_every {
            0 => None,
            _ => self.store.load_snapshot_at(key, FOLD_VERSION, at).await?,
        }
        .unwrap_or_default();
        loop {
            let page = self.store.read_stream(key, agg.version, None, READ_LIMIT_MAX).await?;
            let full = page.len() == READ_LIMIT_MAX;
            for e in &page {
                if e.timestamp > at {
                    return Ok(agg);
                }
                agg.apply(e)?;
            }
            if !full {
                return Ok(agg);
            }
        }
    }
}

/// What one pass of [`Engine::execute`] came to.
enum Pass {
    /// The events are appended.
    Appended(CommandOutcome),
    /// The store holds a record of this command id: its outcome is the answer.
    Duplicate(CommandRecord),
    /// The command was refused on the aggregate this pass loaded.
    Refused(EngineError),
    /// Another write reached the stream between the load and the append.
    LostRace {
        /// The version the decision was made on.
        decided_on: Version,
        /// Where the stream is.
        actual: StreamHead,
    },
}

/// A pass that ended without an answer, as the retry rule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setback {
    Refused,
    LostRace,
}

/// Where a command's execution stands (SPEC §2.3 step 7): whether the aggregate comes from the
/// store, and how many races a fresh decision has lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Retry {
    fresh: bool,
    races_lost: u32,
}

/// What the rule says after a setback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Decide again, from this state.
    Again(Retry),
    /// Report the setback (unless the command turns out to be already carried out).
    Report,
}

impl Retry {
    /// The retry rule. A setback on a cached or guessed aggregate is confirmed on a fresh load;
    /// a refusal on a fresh one is reported; a race lost on a fresh one is reported when the
    /// client named the exact version it expected, else decided again at most `retries_max`
    /// times.
    fn next(self, setback: Setback, client_exact: bool, retries_max: u32) -> Verdict {
        match setback {
            _ if !self.fresh => Verdict::Again(Retry { fresh: true, ..self }),
            Setback::Refused => Verdict::Report,
            Setback::LostRace if client_exact || self.races_lost >= retries_max => Verdict::Report,
            Setback::LostRace => Verdict::Again(Retry { fresh: true, races_lost: self.races_lost + 1 }),
        }
    }
}

/// The one builder of an append (live commands and import): events taking a stream from
/// version `before` to the aggregate `after`, expected exactly at `before`, with `after`'s
/// read-model row, the command record and, by the live rule ([`snapshot_due`]), a snapshot.
pub(crate) fn append_request(
    key: StreamKey,
    before: Version,
    after: &Aggregate,
    events: Vec<NewEvent>,
    timestamp: DateTime<Utc>,
    command: CommandWrite,
    snapshot_every: u64,
) -> AppendRequest {
    AppendRequest {
        key,
        expected: ExpectedVersion::Exact(before),
        events,
        timestamp,
        document: DocumentWrite { state: after.state.clone().unwrap_or(Value::Null), deleted: after.deleted },
        command,
        snapshot: snapshot_due(before, after.version, snapshot_every)
            .then(|| after.created_at.map(|created_at| SnapshotWrite { fold: FOLD_VERSION, created_at }))
            .flatten(),
        checkpoint: None,
        wake: None,
    }
}

/// Whether an append taking an aggregate from version `before` to `after` stores a snapshot:
/// when it crosses (or reaches) a multiple of `every` (never when `every` is 0).
pub fn snapshot_due(before: Version, after: Version, every: u64) -> bool {
    every > 0 && before.0 / every < after.0 / every
}

#[cfg(test)]
mod tests {
    use super::{Retry, Setback, Verdict};

    #[test]
    fn the_retry_rule() {
        let cached = Retry::default();
        let fresh = |races_lost| Retry { fresh: true, races_lost };
        let again = Verdict::Again;
        // (state, setback, client named the exact version, verdict), with 2 retries allowed.
        for (state, setback, exact, want) in [
            (cached, Setback::Refused, false, again(fresh(0))),
            (cached, Setback::Refused, true, again(fresh(0))),
            (cached, Setback::LostRace, false, again(fresh(0))),
            (cached, Setback::LostRace, true, again(fresh(0))),
            (fresh(0), Setback::Refused, false, Verdict::Report),
            (fresh(0), Setback::LostRace, true, Verdict::Report),
            (fresh(0), Setback::LostRace, false, again(fresh(1))),
            (fresh(1), Setback::LostRace, false, again(fresh(2))),
            (fresh(2), Setback::LostRace, false, Verdict::Report),
            (fresh(2), Setback::Refused, false, Verdict::Report),
        ] {
            assert_eq!(state.next(setback, exact, 2), want, "{state:?} {setback:?} exact={exact}");
        }
    }
}
