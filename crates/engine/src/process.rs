//! Process-manager runners (SPEC §4.5): one task per process reads the global feed after its
//! checkpoint, starts and moves instances (core's `artifacts::instance`), fires the timers that
//! fall due, and issues the commands each step decided through the engine.
//!
//! A step is one append to the instance's stream (`process-<name>/<key>`): its event carries
//! the change as a patch, and the same transaction moves the process's checkpoint (for an event)
//! and the instance's wake-up (its earliest timer, or at once while it has commands to issue).
//! The commands come after the step, with ids derived from it; once all are accepted a second
//! append (`ProcessActed`) clears them. A crash between the two replays the same ids, and the
//! idempotency records absorb them. A business refusal (4xx) parks the instance; a transient
//! failure is tried again with capped exponential backoff, then parks it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sourced_core::artifacts::instance::{self, Input, Instance, Route, Status, StepError};
use sourced_core::artifacts::process::{self, Process};
use sourced_core::{
    AggregateId, CommandDraft, CommandKind, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamKey, TypeName,
    Version,
};
use sourced_store::{
    AppendOutcome, AppendRequest, CheckpointWrite, CommandWrite, DocumentWrite, RunnerLease, StoreError, WakeWrite,
};
use tokio::sync::Notify;

use crate::{Engine, EngineError};

mod admin;
pub use admin::InterventionError;

pub use crate::limits::{PROCESS_EVENTS_PER_ROUND_MAX, PROCESS_LEASE_WAIT_MS_MAX, PROCESS_WAKES_PER_ROUND_MAX};

/// How runners behave (the server reads these from its settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSettings {
    /// Tries of a step's commands that fail for a transient reason before the instance parks.
    pub tries_max: u32,
    /// The first backoff after a transient failure; it doubles with each try.
    pub backoff_ms: u64,
    /// The longest backoff.
    pub backoff_max_ms: u64,
    /// How often an idle runner looks for new events and due timers.
    pub poll_ms: u64,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        ProcessSettings { tries_max: 5, backoff_ms: 200, backoff_max_ms: 30_000, poll_ms: 100 }
    }
}

/// Why a round stopped: the store failed, or another writer moved an instance first. The round
/// is run again from the checkpoint, which did not move past the event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runner's lease was lost (PostgreSQL: its connection died) in the middle of the
    /// round: it stops before the next step, and acts again only once it holds a new lease.
    #[error("the runner's lease was lost")]
    LeaseLost,
    /// A stored instance could not be read.
    #[error("instance {key}: {message}")]
    Corrupt {
        /// The instance's stream.
        key: StreamKey,
        /// What is wrong.
        message: String,
    },
}

/// The runners of a server: one task per process, started by [`Runners::sync`].
pub struct Runners {
    engine: Engine,
    settings: ProcessSettings,
    started: std::sync::Mutex<std::collections::BTreeMap<String, tokio::task::JoinHandle<()>>>,
    wake: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Runners {
    /// No runner yet.
    pub fn new(engine: Engine, settings: ProcessSettings) -> Runners {
        Runners {
            engine,
            settings,
            started: Default::default(),
            wake: Arc::new(Notify::new()),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts a runner for every process of the loaded set that has none. A runner whose
    /// process a reload removed idles until it comes back (its instances stay as they are).
    pub fn sync(&self) {
        let mut started = self.started.lock().expect("the runners lock is never poisoned");
        for name in self.engine.artifacts().processes().keys() {
            if !started.contains_key(name) {
                let runner = Runner::new(self.engine.clone(), name.clone(), self.settings.clone());
                let (wake, stop) = (self.wake.clone(), self.stop.clone());
                started.insert(name.clone(), tokio::spawn(runner.run(wake, stop)));
            }
        }
    }

    /// Gives every process of `set` that has no checkpoint one at the store's head, before the
    /// set is in use (at start, before serving; in a reload, before the swap): a new process
    /// hears every event committed from then on, however late its runner's first round comes.
    pub async fn anchor(&self, set: &sourced_core::artifacts::ArtifactSet) -> Result<(), StoreError> {
        let store = self.engine.store();
        let mut head = None;
        for name in set.processes().keys() {
            // A read first: on a start or reload where every process has one, nothing is written.
            if store.checkpoint(name).await?.is_none() {
                let at = match head {
                    Some(h) => h,
                    None => *head.insert(store.head().await?),
                };
                store.start_checkpoint(name, at).await?;
            }
        }
        Ok(())
    }

    /// Makes every runner look for work now (after a write, or after a test moved its clock).
    pub fn nudge(&self) {
        self.wake.notify_waiters();
    }

    /// Stops every runner and waits for it (a step in flight finishes).
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        let tasks: Vec<_> = std::mem::take(&mut *self.started.lock().expect("the runners lock is never poisoned"))
            .into_values()
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One process's runner.
pub struct Runner {
    engine: Engine,
    name: String,
    instance_type: TypeName,
    settings: ProcessSettings,
    /// The last position handled, once read from the store.
    checkpoint: Option<Position>,
    /// The lease that makes this the one runner of the process in the cluster, while held.
    lease: Option<RunnerLease>,
    /// Whether it said it waits for the lease (said once per wait).
    waiting: bool,
}

/// A stored instance and its stream's version.
struct Stored {
    key: StreamKey,
    version: Version,
    instance: Instance,
}

impl Runner {
    /// A runner of process `name` (a valid process name).
    pub fn new(engine: Engine, name: String, settings: ProcessSettings) -> Runner {
        let instance_type = process::instance_type(&name).expect("a loaded process has a valid name");
        Runner { engine, name, instance_type, settings, checkpoint: None, lease: None, waiting: false }
    }

    /// Rounds until `stop`. A runner without the lease asks for it again every
    /// [`PROCESS_LEASE_WAIT_MS_MAX`] at most (or sooner when nudged), and does nothing else.
    async fn run(mut self, wake: Arc<Notify>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            let notified = wake.notified();
            let worked = match self.round().await {
                Ok(n) => n > 0,
                Err(RunnerError::LeaseLost) => false,
                Err(e) => {
                    tracing::warn!(process = %self.name, error = %e, "a process round failed; it runs again");
                    false
                }
            };
            if !worked {
                let idle_ms = if self.leads() { self.settings.poll_ms } else { PROCESS_LEASE_WAIT_MS_MAX };
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(Duration::from_millis(idle_ms)) => {}
                }
            }
        }
        // Given up at once, so that another process takes over without waiting for the store
        // to close.
        self.lease = None;
        self.show_lease(false);
    }

    /// `sourced_process_lease_held{process}`: 1 in the process whose runner holds the lease.
    fn show_lease(&self, held: bool) {
        metrics::gauge!("sourced_process_lease_held", "process" => self.name.clone()).set(f64::from(u8::from(held)));
    }

    /// Whether this runner holds the process's lease (it is the cluster's one runner).
    pub fn leads(&self) -> bool {
        self.lease.as_ref().is_some_and(RunnerLease::held)
    }

    /// Takes the lease when this runner does not hold it; whether it does now. A new holder
    /// reads the checkpoint again, since another runner may have moved it.
    async fn lead(&mut self) -> Result<bool, RunnerError> {
        if self.leads() {
            return Ok(true);
        }
        if self.lease.take().is_some() {
            tracing::warn!(process = %self.name, "lost the process's lease: another process may run it now");
        }
        match self.engine.store().runner_lease(&self.name).await? {
            Some(lease) => {
                tracing::info!(process = %self.name, lease = "held", "this process runs the process manager now");
                (self.lease, self.checkpoint, self.waiting) = (Some(lease), None, false);
                self.show_lease(true);
                Ok(true)
            }
            None => {
                if !self.waiting {
                    tracing::info!(process = %self.name, lease = "waiting", "another process runs the process manager");
                    self.waiting = true;
                    self.show_lease(false);
                }
                Ok(false)
            }
        }
    }

    /// Checked before each step: a lost lease ends the round.
    fn still_leads(&self) -> Result<(), RunnerError> {
        if self.leads() { Ok(()) } else { Err(RunnerError::LeaseLost) }
    }

    /// One round, only while this runner holds the process's lease (taken here when free): the
    /// events after the checkpoint, then the instances due. Returns how many it looked at (0:
    /// idle, or another process runs it).
    pub async fn round(&mut self) -> Result<usize, RunnerError> {
        let Some(p) = self.engine.artifacts().processes().get(&self.name).cloned() else { return Ok(0) };
        if !self.lead().await? {
            return Ok(0);
        }
        let store = self.engine.store().clone();
        let after = match self.checkpoint {
            Some(c) => c,
            None => self.first_checkpoint().await?,
        };
        let events = store.read_global(after, PROCESS_EVENTS_PER_ROUND_MAX).await?;
        let mut written_up_to = after;
        for e in &events {
            self.still_leads()?;
            if self.event(&p, e).await? {
                written_up_to = e.position;
            }
            self.checkpoint = Some(e.position);
        }
        if let Some(last) = events.last()
            && last.position > written_up_to
        {
            store.put_checkpoint(&self.name, last.position).await?;
        }
        let wakes = store.due_wakes(&self.name, self.engine.clock.now(), PROCESS_WAKES_PER_ROUND_MAX).await?;
        for w in &wakes {
            self.still_leads()?;
            self.wake(&p, &w.key).await?;
        }
        Ok(events.len() + wakes.len())
    }

    /// The stored checkpoint. [`Runners::anchor`] set it when the set was loaded; a runner
    /// started without it (a test's) starts at the head.
    async fn first_checkpoint(&mut self) -> Result<Position, RunnerError> {
        let store = self.engine.store();
        let c = match store.checkpoint(&self.name).await? {
            Some(c) => c,
            None => store.start_checkpoint(&self.name, store.head().await?).await?,
        };
        self.checkpoint = Some(c);
        Ok(c)
    }

    /// Hands one event to the instances it starts or moves; whether a step was written (with
    /// the checkpoint at this event).
    async fn event(&self, p: &Process, e: &RecordedEvent) -> Result<bool, RunnerError> {
        let heard = |t: &TypeName, ev: &str| *t == e.target_name && ev == e.event_type;
        if !heard(&p.start.type_name, &p.start.event) && !p.follow.iter().any(|f| heard(&f.type_name, &f.event)) {
            return Ok(false);
        }
        let key = StreamKey { tenant: e.tenant.clone(), type_name: e.target_name.clone(), id: e.target_id.clone() };
        let document = match self.engine.load(&key, Some(e.version)).await {
            Ok(agg) if !agg.deleted => agg.document(&e.target_id),
            Ok(_) => None,
            Err(EngineError::Store(s)) => return Err(s.into()),
            Err(err) => {
                tracing::warn!(process = %self.name, %key, error = %err, "the event's aggregate cannot be loaded");
                None
            }
        };
        let wire = serde_json::to_value(e).unwrap_or(Value::Null);
        let input = Input {
            event: &wire,
            type_name: e.target_name.as_str(),
            event_type: &e.event_type,
            position: e.position.0,
            document: document.as_ref(),
        };
        let now = self.engine.clock.now();
        let routes = match instance::route(p, &input, &instance::time_text(now)) {
            Ok(r) => r,
            Err(err) => {
                tracing::warn!(process = %self.name, position = e.position.0, error = %err, "an event could not be routed");
                return Ok(false);
            }
        };
        let mut wrote = false;
        for r in routes {
            wrote |= self.routed(p, e, &input, r, now).await?;
        }
        Ok(wrote)
    }

    /// One route of an event: start an instance, or move a running one.
    async fn routed(
        &self,
        p: &Process,
        e: &RecordedEvent,
        input: &Input<'_>,
        route: Route,
        now: DateTime<Utc>,
    ) -> Result<bool, RunnerError> {
        let (Route::Start(k) | Route::Follow(k)) = &route;
        let Ok(id) = AggregateId::parse(k) else { return Ok(false) };
        let key = StreamKey { tenant: e.tenant.clone(), type_name: self.instance_type.clone(), id };
        let stored = self.read(&key).await?;
        let checkpoint = Some(e.position);
        let next = match (&route, &stored) {
            // One instance per key, ever: a start for a key that has one (a replay) is ignored.
            (Route::Start(_), Some(_)) | (Route::Follow(_), None) => return Ok(false),
            (Route::Start(k), None) => match instance::start(p, k, input, now) {
                Ok(inst) => Some(("ProcessStarted", inst)),
                Err(err) => {
                    tracing::warn!(process = %self.name, %key, error = %err, "an instance could not start");
                    return Ok(false);
                }
            },
            (Route::Follow(_), Some(s)) => match instance::on_event(p, &s.instance, &key.tenant, input, now) {
                Ok(next) => next.map(|n| ("ProcessMoved", n)),
                Err(err) => Some(("ProcessParked", parked(&s.instance, &err))),
            },
        };
        let Some((event_type, next)) = next else { return Ok(false) };
        let acts = !next.pending.is_empty() && next.status != Status::Parked && next.retry_at.is_none();
        let index = if event_type == "ProcessParked" { "parked" } else { "step" };
        let version = self.write(&key, stored.as_ref(), &next, event_type, checkpoint, index).await?;
        if acts {
            self.act(Stored { key, version, instance: next }).await?;
        }
        Ok(true)
    }

    /// An instance that is due: issue its pending commands, or fire its earliest timer.
    async fn wake(&self, p: &Process, key: &StreamKey) -> Result<(), RunnerError> {
        let Some(s) = self.read(key).await? else { return Ok(()) };
        let now = self.engine.clock.now();
        if !s.instance.pending.is_empty() && s.instance.status != Status::Parked {
            return self.act(s).await;
        }
        let (event_type, next, index) = match instance::on_timer(p, &s.instance, &key.tenant, now) {
            Ok(Some(next)) => ("ProcessMoved", next, "step".to_owned()),
            // Not due after all (a wake left by an older definition): set it right.
            Ok(None) => ("ProcessWoken", s.instance.clone(), format!("woken {}", instance::time_text(now))),
            Err(err) => ("ProcessParked", parked(&s.instance, &err), "parked".to_owned()),
        };
        let acts = !next.pending.is_empty() && next.status != Status::Parked && next.retry_at.is_none();
        let version = self.write(key, Some(&s), &next, event_type, None, &index).await?;
        if acts {
            self.act(Stored { key: key.clone(), version, instance: next }).await?;
        }
        Ok(())
    }

    /// Issues the pending commands of `s`'s last step, in order, then records the outcome: all
    /// accepted (`ProcessActed`), refused (`ProcessParked`) or to be tried again
    /// (`ProcessRetrying`, parked after [`ProcessSettings::tries_max`] tries).
    async fn act(&self, s: Stored) -> Result<(), RunnerError> {
        let mut next = s.instance.clone();
        for c in &s.instance.pending {
            match self.issue(&s.key, c).await {
                Ok(()) => {}
                Err(Failure::Refused(problem)) => {
                    next.park(problem);
                    self.write(&s.key, Some(&s), &next, "ProcessParked", None, "parked").await?;
                    return Ok(());
                }
                Err(Failure::Transient(problem)) => return self.retry_later(s, problem).await,
            }
        }
        next.pending.clear();
        (next.attempts, next.retry_at) = (0, None);
        self.write(&s.key, Some(&s), &next, "ProcessActed", None, "acted").await?;
        Ok(())
    }

    async fn retry_later(&self, s: Stored, problem: String) -> Result<(), RunnerError> {
        let mut next = s.instance.clone();
        next.attempts += 1;
        if next.attempts >= self.settings.tries_max {
            next.park(format!("{problem} (after {} tries)", next.attempts));
            self.write(&s.key, Some(&s), &next, "ProcessParked", None, "parked").await?;
            return Ok(());
        }
        let shift = (next.attempts - 1).min(32);
        let backoff = self.settings.backoff_ms.saturating_mul(1u64 << shift).min(self.settings.backoff_max_ms);
        let at = self.engine.clock.now() + TimeDelta::milliseconds(i64::try_from(backoff).unwrap_or(i64::MAX));
        next.retry_at = Some(instance::time_text(at));
        next.problem = Some(problem);
        let index = format!("retry-{}", next.attempts);
        self.write(&s.key, Some(&s), &next, "ProcessRetrying", None, &index).await?;
        Ok(())
    }

    /// Sends one command through the engine, with the tenant of the instance.
    async fn issue(&self, key: &StreamKey, c: &instance::Issued) -> Result<(), Failure> {
        let refused = |m: String| Failure::Refused(format!("{} {}/{}: {m}", c.name, c.target, c.id));
        let kind = match c.name.as_str() {
            "create" => CommandKind::Create,
            "patch" => CommandKind::Patch,
            "replace" => CommandKind::Replace,
            "delete" => CommandKind::Delete,
            _ => CommandKind::Logic,
        };
        let type_name = TypeName::parse(&c.target).map_err(|v| refused(v.message))?;
        let mut draft = CommandDraft::new(kind, type_name);
        draft.id = Some(c.command_id);
        draft.name = (kind == CommandKind::Logic).then(|| c.name.clone());
        draft.tenant = Some(key.tenant.clone());
        draft.target_id = Some(AggregateId::parse(&c.id).map_err(|v| refused(v.message))?);
        draft.body = c.body.clone();
        draft.context.insert("process".into(), json!({"name": self.name, "key": key.id.as_str()}));
        let defaults = crate::fresh::envelope_defaults(key.tenant.clone(), true);
        let cmd = draft.resolve(&defaults).map_err(|e| refused(e.to_string()))?;
        match self.engine.execute(cmd, None).await {
            Ok(_) => Ok(()),
            Err(EngineError::Store(e)) => Err(Failure::Transient(format!("{} {}/{}: {e}", c.name, c.target, c.id))),
            Err(EngineError::Conflict { client_version: false, .. }) => {
                Err(Failure::Transient(format!("{} {}/{}: the aggregate kept changing", c.name, c.target, c.id)))
            }
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// The instance stored under `key`, if any.
    async fn read(&self, key: &StreamKey) -> Result<Option<Stored>, RunnerError> {
        let Some(row) = self.engine.store().get_document(key).await? else { return Ok(None) };
        let instance = serde_json::from_value(row.state)
            .map_err(|e| RunnerError::Corrupt { key: key.clone(), message: e.to_string() })?;
        Ok(Some(Stored { key: key.clone(), version: row.version, instance }))
    }

    /// Appends one step of an instance: the change as a patch, the wake-up, and the checkpoint
    /// when an event caused it. Returns the stream's new version. A step recorded before (the
    /// same derived id) is not written again.
    async fn write(
        &self,
        key: &StreamKey,
        prev: Option<&Stored>,
        next: &Instance,
        event_type: &str,
        checkpoint: Option<Position>,
        index: &str,
    ) -> Result<Version, RunnerError> {
        let now = self.engine.clock.now();
        let before = prev.map_or_else(|| json!({}), |s| serde_json::to_value(&s.instance).unwrap_or(Value::Null));
        let state = serde_json::to_value(next)
            .map_err(|e| RunnerError::Corrupt { key: key.clone(), message: e.to_string() })?;
        let id = instance::action_command_id(&self.name, &key.tenant, &next.key, next.steps, index);
        let due = next.due(now).map_err(|e| RunnerError::Corrupt { key: key.clone(), message: e.0 })?;
        let request = AppendRequest {
            key: key.clone(),
            expected: prev.map_or(ExpectedVersion::NoStream, |s| ExpectedVersion::Exact(s.version)),
            events: vec![NewEvent {
                id: id.event_id(0),
                event_type: event_type.to_owned(),
                data: sourced_core::patch::to_value(&sourced_core::patch::diff(&before, &state)),
                metadata: json!({"commandId": id, "commandName": event_type, "process": self.name, "step": next.steps}),
            }],
            timestamp: now,
            document: DocumentWrite { state, deleted: false },
            command: CommandWrite {
                id,
                fingerprint: format!("process {} {} {} {index}", self.name, next.key, next.steps),
                extra: json!({"warnings": []}),
            },
            snapshot: None,
            checkpoint: checkpoint.map(|position| CheckpointWrite { name: self.name.clone(), position }),
            wake: Some(WakeWrite { process: self.name.clone(), due }),
        };
        match self.engine.store().append(request).await? {
            AppendOutcome::Appended(events) => Ok(events.last().map_or(Version(0), |e| e.version)),
            AppendOutcome::Duplicate(record) => Ok(record.last_version),
        }
    }
}

/// Why a command was not issued.
enum Failure {
    /// The domain refused it (a 4xx): the instance parks.
    Refused(String),
    /// The store or a race: tried again later.
    Transient(String),
}

fn parked(inst: &Instance, err: &StepError) -> Instance {
    let mut next = inst.clone();
    next.park(err.0.clone());
    next
}

/// What `GET /processes` shows of one process in one tenant.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcessSummary {
    /// The process's name.
    pub name: String,
    /// Its instances running, completed, parked and cancelled, in the tenant.
    pub running: u64,
    /// Completed.
    pub completed: u64,
    /// Parked.
    pub parked: u64,
    /// Cancelled by an operator.
    pub cancelled: u64,
    /// The last global position it handled (all tenants); none before its first round.
    pub checkpoint: Option<u64>,
    /// Positions committed after the checkpoint: how far behind it is.
    pub lag: u64,
}

/// One instance as `GET /processes/{name}/{key}` shows it: its stream's row and its latest
/// steps.
#[derive(Clone, Debug)]
pub struct InstanceView {
    /// The read-model row of `process-<name>/<key>`.
    pub row: sourced_store::DocumentRow,
    /// Its latest steps (events), oldest first, at most [`PROCESS_STEPS_SHOWN_MAX`].
    pub steps: Vec<RecordedEvent>,
}

pub use crate::limits::PROCESS_STEPS_SHOWN_MAX;

impl Engine {
    /// Every process of the loaded set with its instances counted in `tenant` and its lag.
    pub async fn process_summaries(&self, tenant: &sourced_core::TenantId) -> Result<Vec<ProcessSummary>, StoreError> {
        use sourced_core::query::{Field, FieldPath, Filter};
        let set = self.artifacts();
        let head = self.store.head().await?.0;
        let mut out = Vec::with_capacity(set.processes().len());
        for name in set.processes().keys() {
            let t = process::instance_type(name).expect("a loaded process has a valid name");
            let mut counts = [0u64; 4];
            for (count, status) in counts.iter_mut().zip(["running", "completed", "parked", "cancelled"]) {
                let mut q = sourced_store::ListQuery::new(tenant.clone(), t.clone(), 1);
                let field = Field::Doc(FieldPath::parse("status").expect("a valid field path"));
                q.filters.push(Filter::In { field, values: vec![Value::from(status)] });
                *count = self.store.count_documents(&q).await?;
            }
            let checkpoint = self.store.checkpoint(name).await?.map(|p| p.0);
            let lag = head.saturating_sub(checkpoint.unwrap_or(0));
            let [running, completed, parked, cancelled] = counts;
            out.push(ProcessSummary { name: name.clone(), running, completed, parked, cancelled, checkpoint, lag });
        }
        Ok(out)
    }

    /// The instance of process `name` under `key` in `tenant`, if the process is loaded and the
    /// instance exists.
    pub async fn process_instance(
        &self,
        tenant: &sourced_core::TenantId,
        name: &str,
        key: &AggregateId,
    ) -> Result<Option<InstanceView>, StoreError> {
        if !self.artifacts().processes().contains_key(name) {
            return Ok(None);
        }
        let Some(type_name) = process::instance_type(name) else { return Ok(None) };
        let k = StreamKey { tenant: tenant.clone(), type_name, id: key.clone() };
        let Some(row) = self.store.get_document(&k).await? else { return Ok(None) };
        let after = Version(row.version.0.saturating_sub(PROCESS_STEPS_SHOWN_MAX as u64));
        let steps = self.store.read_stream(&k, after, None, PROCESS_STEPS_SHOWN_MAX).await?;
        Ok(Some(InstanceView { row, steps }))
    }
}
