//! Process managers (SPEC §4.5) run by `process::Runner` rounds over a real store (SQLite, or
//! PostgreSQL with `SOURCED_TEST_BACKEND=postgres`), with an injected clock: no test sleeps for
//! a timer, each moves the clock and runs a round.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::instance::{Instance, Status};
use sourced_core::{AggregateId, Command, StreamKey, TenantId, TypeName, Version};
use sourced_engine::process::{ProcessSettings, Runner, Runners};
use sourced_engine::{Clock, Engine, EngineConfig};
use sourced_store::EventStore;
use sourced_store::postgres::{PostgresOptions, PostgresStore};
use sourced_store::sqlite::{SqliteOptions, SqliteStore};

use crate::faults::{Fault, Faulty};

const DEADLINE: &str = r#"
start: {type: order, event: OrderSubmitted, key: event.targetId, state: awaiting-payment}
follow:
  - {type: order, event: OrderPaid, key: event.targetId}
states: [awaiting-payment, reminded, paid, cancelled]
final: [paid, cancelled]
data: {total: document.total}
transitions:
  - from: [awaiting-payment, reminded]
    on: OrderPaid
    to: paid
  - from: awaiting-payment
    after: 30m
    to: reminded
    do:
      - command: {target: order, id: key, name: remind, body: "{}"}
  - from: reminded
    after: 2h
    to: cancelled
    do:
      - command: {target: order, id: key, name: cancel, body: "{'reason': 'unpaid'}"}
"#;

/// The order's commands; `remind` refuses an order over 1000 (the poison of one test).
fn files() -> BTreeMap<String, String> {
    [
        ("types/order/commands/submit.yaml", "creates: true\nemit: [{event: OrderSubmitted, patch: [{op: add, path: /total, expr: command.body.total}]}]"),
        ("types/order/commands/pay.yaml", "emit: [{event: OrderPaid, patch: [{op: add, path: /paid, value: true}]}]"),
        (
            "types/order/commands/remind.yaml",
            "require: [{expr: 'state.total < 1000.0', message: too large to remind}]\nemit: [{event: OrderReminded, patch: [{op: add, path: /reminded, value: true}]}]",
        ),
        ("types/order/commands/cancel.yaml", "emit: [{event: OrderCancelled, patch: [{op: add, path: /cancelled, expr: command.body.reason}]}]"),
        ("processes/deadline.yaml", DEADLINE),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_owned(), t.to_owned()))
    .collect()
}

/// A clock the test moves.
struct TestClock(Mutex<DateTime<Utc>>);

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

impl TestClock {
    fn advance(&self, by: TimeDelta) {
        *self.0.lock().unwrap() += by;
    }
}

struct World {
    store: Arc<Faulty>,
    engine: Engine,
    clock: Arc<TestClock>,
    runner: Runner,
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc)
}

/// Where a test's store lives: a SQLite file, or with `SOURCED_TEST_BACKEND=postgres` a fresh
/// PostgreSQL schema (dropped at the end), so that a restart opens the same store again.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(Scratch),
}

impl Place {
    async fn new() -> Place {
        if std::env::var("SOURCED_TEST_BACKEND").is_ok_and(|b| b == "postgres") {
            Place::Postgres(Scratch::new().await)
        } else {
            Place::Sqlite(tempfile::tempdir().unwrap())
        }
    }

    async fn open(&self) -> Box<dyn EventStore> {
        match self {
            Place::Sqlite(dir) => {
                Box::new(SqliteStore::open(&dir.path().join("s.db"), SqliteOptions::default()).unwrap())
            }
            Place::Postgres(s) => Box::new(PostgresStore::connect(&s.url(), PostgresOptions::default()).await.unwrap()),
        }
    }
}

fn postgres_url() -> String {
    std::env::var("SOURCED_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of one test's own.
struct Scratch(String);

impl Scratch {
    async fn new() -> Scratch {
        let client = pg_client().await;
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let schema = format!("sourced_test_{secs}_{}", uuid::Uuid::new_v4().simple());
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.expect("create a scratch schema");
        Scratch(schema)
    }

    fn url(&self) -> String {
        let url = postgres_url();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-csearch_path%3D{}", self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schema = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let _ = pg_client().await.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
            });
        })
        .join();
    }
}

async fn pg_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("SOURCED_TEST_BACKEND=postgres, but PostgreSQL is not reachable: {e}"));
    tokio::spawn(connection);
    client
}

/// A store in `place` (opened again after a restart), an engine with the order set, a runner.
async fn world(place: &Place, clock: Arc<TestClock>) -> World {
    let inner = place.open().await;
    let store = Arc::new(Faulty { inner, faults: Mutex::new(VecDeque::new()), appends: AtomicU64::new(0) });
    let engine = Engine::new(store.clone(), EngineConfig::default(), clock.clone());
    engine.set_artifacts(Arc::new(ArtifactSet::load(&files()).unwrap_or_else(|p| panic!("{p:#?}"))));
    let settings = ProcessSettings { tries_max: 3, backoff_ms: 1_000, backoff_max_ms: 4_000, poll_ms: 10 };
    let runner = Runner::new(engine.clone(), "deadline".into(), settings);
    World { store, engine, clock, runner }
}

fn clock() -> Arc<TestClock> {
    Arc::new(TestClock(Mutex::new(t0())))
}

impl World {
    async fn send(&self, id: &str, name: &str, body: Value) {
        let env = json!({"type": "logic", "name": name, "targetName": "order", "targetId": id, "body": body});
        let defaults = sourced_engine::fresh::envelope_defaults(TenantId::default_tenant(), false);
        let cmd = Command::from_envelope_value(env, defaults).unwrap();
        self.engine.execute(cmd, None).await.unwrap_or_else(|e| panic!("{name} {id}: {e}"));
    }

    /// Rounds until one finds nothing to do (bounded).
    async fn settle(&mut self) {
        for _ in 0..20 {
            if self.runner.round().await.unwrap() == 0 {
                return;
            }
        }
        panic!("the runner never settled");
    }

    async fn instance(&self, key: &str) -> Option<Instance> {
        let k = StreamKey {
            tenant: TenantId::default_tenant(),
            type_name: TypeName::parse("process-deadline").unwrap(),
            id: AggregateId::parse(key).unwrap(),
        };
        let row = self.store.get_document(&k).await.unwrap()?;
        Some(serde_json::from_value(row.state).unwrap())
    }

    /// The event types of an order, in order.
    async fn order_events(&self, id: &str) -> Vec<String> {
        let k = StreamKey {
            tenant: TenantId::default_tenant(),
            type_name: TypeName::parse("order").unwrap(),
            id: AggregateId::parse(id).unwrap(),
        };
        let events = self.store.read_stream(&k, Version(0), None, 1_000).await.unwrap();
        events.into_iter().map(|e| e.event_type).collect()
    }
}

#[tokio::test]
async fn an_unpaid_order_is_reminded_then_cancelled() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    let inst = w.instance("o1").await.expect("started");
    assert_eq!(
        (inst.state.as_str(), inst.status, inst.data["total"].clone()),
        ("awaiting-payment", Status::Running, json!(12.5))
    );
    w.clock.advance(TimeDelta::minutes(29));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted"], "not yet due");
    w.clock.advance(TimeDelta::minutes(2));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded"]);
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.state.as_str(), inst.pending.len()), ("reminded", 0), "the command issued and confirmed");
    w.clock.advance(TimeDelta::hours(2));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded", "OrderCancelled"]);
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.state.as_str(), inst.status), ("cancelled", Status::Completed));
    w.clock.advance(TimeDelta::days(3));
    w.settle().await;
    assert_eq!(w.order_events("o1").await.len(), 3, "a completed instance does nothing more");
    assert!(w.store.due_wakes("deadline", w.clock.now(), 10).await.unwrap().is_empty());
}

/// The checkpoint is taken when the set loads, not at the runner's first round: an event
/// committed in between starts its instance, and loading the set again moves nothing.
#[tokio::test]
async fn an_event_committed_before_the_first_round_is_heard() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    let runners = Runners::new(w.engine.clone(), ProcessSettings::default());
    runners.anchor(&w.engine.artifacts()).await.unwrap();
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    let inst = w.instance("o1").await.expect("the submit before the first round started it");
    assert_eq!(inst.state.as_str(), "awaiting-payment");
    let handled = w.store.checkpoint("deadline").await.unwrap();
    runners.anchor(&w.engine.artifacts()).await.unwrap();
    assert_eq!(w.store.checkpoint("deadline").await.unwrap(), handled, "loaded again: not moved");
}

#[tokio::test]
async fn a_payment_in_time_completes_the_instance_and_its_timer_never_fires() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    w.clock.advance(TimeDelta::minutes(10));
    w.send("o1", "pay", json!({})).await;
    w.settle().await;
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.state.as_str(), inst.status), ("paid", Status::Completed));
    assert!(inst.timers.is_empty());
    w.clock.advance(TimeDelta::days(1));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderPaid"], "no reminder, no cancel");
    let checkpoint = w.store.checkpoint("deadline").await.unwrap().expect("a checkpoint");
    assert_eq!(checkpoint, w.store.head().await.unwrap(), "every event handled");
}

#[tokio::test]
async fn a_timer_due_while_the_server_was_down_fires_once_after_the_restart() {
    let place = Place::new().await;
    let clock = clock();
    {
        let mut w = world(&place, clock.clone()).await;
        w.settle().await;
        w.send("o1", "submit", json!({"total": 12.5})).await;
        w.send("o2", "submit", json!({"total": 3.0})).await;
        w.settle().await;
        w.store.close().await;
    }
    // Down for three hours: both timers of o1 and o2 fell due, the second only once the first
    // has fired (it starts when the instance enters `reminded`).
    clock.advance(TimeDelta::hours(3));
    let mut w = world(&place, clock.clone()).await;
    w.settle().await;
    for id in ["o1", "o2"] {
        assert_eq!(w.order_events(id).await, ["OrderSubmitted", "OrderReminded"], "{id}: reminded once");
        assert_eq!(w.instance(id).await.unwrap().state, "reminded");
    }
    w.settle().await;
    assert_eq!(w.order_events("o1").await.len(), 2, "not twice");
    clock.advance(TimeDelta::hours(2));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded", "OrderCancelled"]);
}

#[tokio::test]
async fn a_poison_step_parks_one_instance_while_a_hundred_others_complete() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    for i in 0..101 {
        let total = if i == 7 { 5_000.0 } else { f64::from(i) + 1.0 };
        w.send(&format!("o{i}"), "submit", json!({"total": total})).await;
    }
    w.settle().await;
    w.clock.advance(TimeDelta::minutes(31));
    w.settle().await;
    w.clock.advance(TimeDelta::hours(2));
    w.settle().await;
    for i in 0..101 {
        let inst = w.instance(&format!("o{i}")).await.unwrap();
        if i == 7 {
            assert_eq!((inst.state.as_str(), inst.status), ("reminded", Status::Parked));
            let problem = inst.problem.clone().unwrap_or_default();
            assert!(problem.contains("too large to remind"), "{problem}");
            assert_eq!(inst.pending.len(), 1, "the refused command is kept for a retry");
        } else {
            assert_eq!((inst.state.as_str(), inst.status), ("cancelled", Status::Completed), "o{i}");
        }
    }
    assert_eq!(w.order_events("o7").await, ["OrderSubmitted"]);
    assert!(
        w.store.due_wakes("deadline", w.clock.now(), 100).await.unwrap().is_empty(),
        "a parked instance is never due"
    );
}

/// The command commits but its acknowledgement is lost (as in a crash between the command and
/// the step that confirms it): the runner tries again later with the same derived id, and the
/// idempotency record absorbs it, so the order is reminded exactly once.
#[tokio::test]
async fn a_command_whose_outcome_was_lost_is_issued_again_and_happens_once() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    w.clock.advance(TimeDelta::minutes(31));
    // The timer's step, then the command (lost acknowledgement), then the retry record.
    w.store.inject(&[Fault::Delay(std::time::Duration::ZERO), Fault::LostAck]);
    w.settle().await;
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.status, inst.attempts, inst.pending.len()), (Status::Running, 1, 1), "to be tried again");
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded"], "the command did commit");
    w.clock.advance(TimeDelta::seconds(2));
    w.settle().await;
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.state.as_str(), inst.pending.len(), inst.attempts), ("reminded", 0, 0));
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded"], "exactly once");
}

/// A store that stays away: the instance is tried `tries_max` times with backoff, then parked;
/// the other instance is not held up.
#[tokio::test]
async fn transient_failures_are_retried_with_backoff_then_park() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    w.clock.advance(TimeDelta::minutes(31));
    w.store.inject(&[Fault::Delay(std::time::Duration::ZERO), Fault::Unavailable]);
    w.settle().await;
    assert_eq!(w.instance("o1").await.unwrap().attempts, 1);
    // The backoff doubles (1 s, then 2 s): not due before. A retry appends only the command.
    w.store.inject(&[Fault::Unavailable]);
    w.clock.advance(TimeDelta::milliseconds(900));
    w.settle().await;
    assert_eq!(w.instance("o1").await.unwrap().attempts, 1, "not before the backoff");
    w.clock.advance(TimeDelta::milliseconds(200));
    w.settle().await;
    assert_eq!(w.instance("o1").await.unwrap().attempts, 2);
    w.store.inject(&[Fault::Unavailable]);
    w.clock.advance(TimeDelta::seconds(2));
    w.settle().await;
    let inst = w.instance("o1").await.unwrap();
    assert_eq!((inst.status, inst.attempts), (Status::Parked, 3));
    assert!(inst.problem.unwrap_or_default().contains("after 3 tries"));
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted"]);
}

/// `sourced export` then `import` into an empty store: the running instance's timer comes due
/// in the new store (its wake-up is rebuilt from the imported state) and fires once there.
#[tokio::test]
async fn an_imported_instance_keeps_its_timer() {
    let (from, to) = (Place::new().await, Place::new().await);
    let clock = clock();
    let mut w = world(&from, clock.clone()).await;
    w.settle().await;
    w.send("o1", "submit", json!({"total": 12.5})).await;
    w.settle().await;
    let mut file = Vec::new();
    sourced_engine::transfer::export(w.store.as_ref(), &mut file).await.unwrap();
    w.store.close().await;
    let mut w = world(&to, clock.clone()).await;
    sourced_engine::transfer::import(w.store.as_ref(), &file[..], 100).await.unwrap();
    assert_eq!(w.instance("o1").await.unwrap().state, "awaiting-payment");
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted"], "not due yet");
    clock.advance(TimeDelta::minutes(31));
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded"]);
    assert_eq!(w.instance("o1").await.unwrap().state, "reminded");
}

/// Two runners of one process on one store (as two servers on one PostgreSQL schema): only the
/// lease holder acts. Once it is gone the other takes the lease within a bounded number of
/// rounds and carries on from the checkpoint: the timer due meanwhile fires once, and the
/// event written meanwhile starts its instance.
#[tokio::test]
async fn only_the_lease_holder_runs_and_another_takes_over_when_it_is_gone() {
    let place = Place::new().await;
    let mut w = world(&place, clock()).await;
    w.settle().await;
    assert!(w.runner.leads());
    let settings = ProcessSettings { tries_max: 3, backoff_ms: 1_000, backoff_max_ms: 4_000, poll_ms: 10 };
    let mut standby = Runner::new(w.engine.clone(), "deadline".into(), settings);
    w.send("o1", "submit", json!({"total": 12.5})).await;
    assert_eq!(standby.round().await.unwrap(), 0, "the standby waits");
    assert!(!standby.leads());
    assert!(w.instance("o1").await.is_none(), "the standby did nothing");
    w.settle().await;
    assert_eq!(w.instance("o1").await.unwrap().state, "awaiting-payment");
    w.clock.advance(TimeDelta::minutes(31));
    w.send("o2", "submit", json!({"total": 3.0})).await;
    // The holder goes away (its lease with it); the standby takes over.
    std::mem::swap(&mut w.runner, &mut standby);
    drop(standby);
    let mut rounds = 0;
    while !w.runner.leads() {
        rounds += 1;
        assert!(rounds < 400, "the standby never took the lease");
        w.runner.round().await.unwrap();
        if !w.runner.leads() {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    w.settle().await;
    w.settle().await;
    assert_eq!(w.order_events("o1").await, ["OrderSubmitted", "OrderReminded"], "the due timer fired once");
    assert_eq!(w.instance("o1").await.unwrap().state, "reminded");
    assert_eq!(w.instance("o2").await.expect("started by the new holder").state, "awaiting-payment");
    assert_eq!(w.store.checkpoint("deadline").await.unwrap(), Some(w.store.head().await.unwrap()));
}
