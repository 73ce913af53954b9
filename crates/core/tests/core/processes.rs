//! Process instances (SPEC §4.5): the pure steps, with the time passed in.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sourced_core::TenantId;
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::instance::{self, Input, Instance, Intervention, Route, Status, WrongStatus};
use sourced_core::artifacts::process::Process;

const DEADLINE: &str = r#"
start: {type: order, event: OrderSubmitted, key: event.targetId, guard: "document.total > 0.0", state: awaiting-payment}
follow:
  - {type: order, event: OrderPaid, key: event.targetId}
states: [awaiting-payment, reminded, paid, cancelled]
final: [paid, cancelled]
data: {total: document.total}
transitions:
  - from: [awaiting-payment, reminded]
    on: OrderPaid
    to: paid
    data: {paid: document.paidAmount}
  - from: awaiting-payment
    after: 30m
    to: reminded
    do:
      - command: {target: order, id: key, name: remind, body: "{'total': instance.data.total}"}
  - from: reminded
    after: 2h
    to: cancelled
    do:
      - command: {target: order, id: key, name: cancel, body: "{'reason': 'unpaid'}"}
"#;

fn process() -> Process {
    let files: BTreeMap<String, String> = [
        ("types/order/commands/submit.yaml", "emit: [{event: OrderSubmitted, patch: []}]"),
        ("types/order/commands/pay.yaml", "emit: [{event: OrderPaid, patch: []}]"),
        ("types/order/commands/remind.yaml", "emit: [{event: OrderReminded, patch: []}]"),
        ("types/order/commands/cancel.yaml", "emit: [{event: OrderCancelled, patch: []}]"),
        ("processes/deadline.yaml", DEADLINE),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_owned(), t.to_owned()))
    .collect();
    let set = ArtifactSet::load(&files).unwrap_or_else(|p| panic!("{p:#?}"));
    set.processes()["deadline"].clone()
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z").unwrap().with_timezone(&Utc)
}

fn event(event_type: &str, id: &str) -> Value {
    json!({"targetName": "order", "targetId": id, "type": event_type})
}

fn input<'a>(event: &'a Value, document: &'a Value, position: u64) -> Input<'a> {
    Input { event, type_name: "order", event_type: event["type"].as_str().unwrap(), position, document: Some(document) }
}

fn started(p: &Process) -> Instance {
    let (e, doc) = (event("OrderSubmitted", "o1"), json!({"total": 12.5}));
    let routes = instance::route(p, &input(&e, &doc, 1), "now").unwrap();
    assert_eq!(routes, [Route::Start("o1".into())]);
    instance::start(p, "o1", &input(&e, &doc, 1), t0()).unwrap()
}

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

#[test]
fn an_unpaid_order_is_reminded_then_cancelled() {
    let p = process();
    let inst = started(&p);
    assert_eq!((inst.state.as_str(), inst.status, inst.steps), ("awaiting-payment", Status::Running, 1));
    assert_eq!(inst.data["total"], json!(12.5));
    assert_eq!(inst.due(t0()).unwrap(), Some(t0() + TimeDelta::minutes(30)), "the 30m timer");
    // Not yet due: nothing happens.
    assert_eq!(instance::on_timer(&p, &inst, &tenant(), t0() + TimeDelta::minutes(29)).unwrap(), None);
    let reminded = instance::on_timer(&p, &inst, &tenant(), t0() + TimeDelta::minutes(31)).unwrap().unwrap();
    assert_eq!((reminded.state.as_str(), reminded.steps), ("reminded", 2));
    assert_eq!(reminded.pending.len(), 1);
    assert_eq!((reminded.pending[0].name.as_str(), &reminded.pending[0].body), ("remind", &json!({"total": 12.5})));
    assert_eq!(reminded.due(t0()).unwrap(), Some(t0()), "commands to issue: due at once");
    let mut reminded = reminded;
    reminded.pending.clear();
    // The 2h timer runs from entering `reminded`, at 31m.
    let due = t0() + TimeDelta::minutes(31) + TimeDelta::hours(2);
    assert_eq!(reminded.due(t0()).unwrap(), Some(due));
    let cancelled = instance::on_timer(&p, &reminded, &tenant(), due).unwrap().unwrap();
    assert_eq!((cancelled.state.as_str(), cancelled.status), ("cancelled", Status::Completed));
    assert_eq!(cancelled.pending[0].body, json!({"reason": "unpaid"}));
    assert!(cancelled.timers.is_empty());
    assert_eq!(cancelled.due(t0()).unwrap(), Some(t0()), "due at once for its last commands");
    let mut cancelled = cancelled;
    cancelled.pending.clear();
    assert_eq!(cancelled.due(t0()).unwrap(), None, "then a completed instance is never due");
}

#[test]
fn a_payment_in_time_completes_the_instance_and_drops_its_timer() {
    let p = process();
    let inst = started(&p);
    let (e, doc) = (event("OrderPaid", "o1"), json!({"total": 12.5, "paidAmount": 12.5}));
    assert_eq!(instance::route(&p, &input(&e, &doc, 5), "now").unwrap(), [Route::Follow("o1".into())]);
    let paid = instance::on_event(&p, &inst, &tenant(), &input(&e, &doc, 5), t0()).unwrap().unwrap();
    assert_eq!((paid.state.as_str(), paid.status, paid.handled), ("paid", Status::Completed, 5));
    assert_eq!(paid.data["paid"], json!(12.5));
    assert!(paid.timers.is_empty() && paid.pending.is_empty());
    assert_eq!(instance::on_timer(&p, &paid, &tenant(), t0() + TimeDelta::days(1)).unwrap(), None, "never fires");
    // The same event again (a replay) is not handled twice.
    assert_eq!(instance::on_event(&p, &inst, &tenant(), &input(&e, &doc, 1), t0()).unwrap(), None);
}

#[test]
fn guards_and_events_the_process_does_not_hear() {
    let p = process();
    let (e, free) = (event("OrderSubmitted", "o2"), json!({"total": 0.0}));
    assert_eq!(instance::route(&p, &input(&e, &free, 1), "now").unwrap(), [], "the start guard is false");
    let other = event("OrderShipped", "o2");
    assert_eq!(instance::route(&p, &input(&other, &free, 2), "now").unwrap(), []);
    let bad = json!({"targetName": "order", "targetId": 7, "type": "OrderPaid"});
    let err = instance::route(&p, &input(&bad, &free, 3), "now").unwrap_err();
    assert!(err.0.contains("not an aggregate id"), "{err}");
}

#[test]
fn command_ids_are_derived_from_the_step() {
    let p = process();
    let inst = started(&p);
    let at = t0() + TimeDelta::hours(1);
    let a = instance::on_timer(&p, &inst, &tenant(), at).unwrap().unwrap();
    let b = instance::on_timer(&p, &inst, &tenant(), at + TimeDelta::minutes(5)).unwrap().unwrap();
    assert_eq!(a.pending[0].command_id, b.pending[0].command_id, "the same step, the same id");
    let other = TenantId::parse("acme").unwrap();
    let c = instance::on_timer(&p, &inst, &other, at).unwrap().unwrap();
    assert_ne!(a.pending[0].command_id, c.pending[0].command_id, "per tenant");
    assert_ne!(
        instance::step_command_id("deadline", &tenant(), "o1", 2),
        instance::step_command_id("deadline", &tenant(), "o1", 3)
    );
}

/// A reload that changed the definition under a running instance: a timer whose transition is
/// not a timer from the instance's state any more parks it rather than firing another move.
#[test]
fn a_timer_the_definition_lost_parks_the_instance() {
    let p = process();
    let inst = started(&p);
    let mut changed = p.clone();
    changed.transitions.swap(0, 1);
    let err = instance::on_timer(&changed, &inst, &tenant(), t0() + TimeDelta::hours(1)).unwrap_err();
    assert!(err.0.contains("not in the process's definition any more"), "{err}");
}

/// An event that moves an instance whose last commands wait for a retry queues its own after
/// them, keeping their retry schedule: no command is dropped.
#[test]
fn a_step_queues_its_commands_after_those_still_pending() {
    let p = process();
    let inst = started(&p);
    let mut reminded = instance::on_timer(&p, &inst, &tenant(), t0() + TimeDelta::minutes(31)).unwrap().unwrap();
    (reminded.attempts, reminded.retry_at) = (2, Some("2026-12-01T10:40:00.000000Z".into()));
    let cancelled = instance::on_timer(
        &p,
        &Instance { pending: Vec::new(), ..reminded.clone() },
        &tenant(),
        t0() + TimeDelta::hours(3),
    )
    .unwrap()
    .unwrap();
    assert_eq!((cancelled.pending.len(), cancelled.attempts), (1, 0), "nothing pending before: a fresh schedule");
    let (e, doc) = (event("OrderPaid", "o1"), json!({"total": 12.5, "paidAmount": 12.5}));
    let mut paying = reminded.clone();
    paying.pending[0].name = "remind".into();
    let paid = instance::on_event(&p, &paying, &tenant(), &input(&e, &doc, 9), t0() + TimeDelta::minutes(35))
        .unwrap()
        .unwrap();
    assert_eq!(paid.state, "paid");
    assert_eq!(paid.pending.len(), 1, "the paid transition issues nothing; the reminder stays");
    assert_eq!((paid.attempts, paid.retry_at.as_deref()), (2, Some("2026-12-01T10:40:00.000000Z")));
}

/// An operator's steps: only a parked instance is retried or skipped; skip drops what a retry
/// would try (the pending commands, else the due timer); cancel ends a running or parked one.
#[test]
fn operators_retry_skip_and_cancel_only_in_the_statuses_that_allow_it() {
    let p = process();
    let running = started(&p);
    let at = t0() + TimeDelta::minutes(31);
    for action in [Intervention::Retry, Intervention::Skip] {
        let e = instance::intervene(&p, &running, action, at).unwrap_err();
        assert_eq!(e, WrongStatus { action, status: Status::Running });
        assert_eq!(e.to_string(), format!("cannot {} an instance that is running", action.as_str()));
    }
    // Parked with its reminder refused: retry keeps the command, skip drops it.
    let mut parked = instance::on_timer(&p, &running, &tenant(), at).unwrap().unwrap();
    parked.park("refused".into());
    parked.attempts = 2;
    let retried = instance::intervene(&p, &parked, Intervention::Retry, at).unwrap();
    assert_eq!((retried.status, retried.steps, retried.pending.len()), (Status::Running, parked.steps + 1, 1));
    assert_eq!((retried.problem.clone(), retried.attempts), (None, 0));
    assert_eq!(retried.due(at).unwrap(), Some(at), "its command is issued at once");
    let skipped = instance::intervene(&p, &parked, Intervention::Skip, at).unwrap();
    assert_eq!((skipped.status, skipped.state.as_str(), skipped.pending.len()), (Status::Running, "reminded", 0));
    assert_eq!(skipped.timers, parked.timers, "the state's timers stay");
    // Parked at a failed timer (nothing pending): retry fires it again, skip drops it.
    let mut at_timer = running.clone();
    at_timer.park("the timer failed".into());
    let retried = instance::intervene(&p, &at_timer, Intervention::Retry, at).unwrap();
    assert_eq!((retried.timers.len(), retried.due(at).unwrap()), (1, Some(t0() + TimeDelta::minutes(30))));
    let skipped = instance::intervene(&p, &at_timer, Intervention::Skip, at).unwrap();
    assert!(skipped.timers.is_empty(), "{skipped:?}");
    let early = instance::intervene(&p, &at_timer, Intervention::Skip, t0()).unwrap();
    assert_eq!(early.timers.len(), 1, "a timer not yet due is not the failed step");
    // A parked instance in a final state comes back completed.
    let mut final_parked =
        instance::on_timer(&p, &skipped_reminded(&p), &tenant(), at + TimeDelta::hours(3)).unwrap().unwrap();
    final_parked.park("refused".into());
    let retried = instance::intervene(&p, &final_parked, Intervention::Retry, at).unwrap();
    assert_eq!(
        (retried.state.as_str(), retried.status, retried.due(at).unwrap()),
        ("cancelled", Status::Completed, Some(at))
    );
    // Cancel: timers and commands dropped, never due; an ended instance is not cancelled again.
    for inst in [&running, &parked] {
        let cancelled = instance::intervene(&p, inst, Intervention::Cancel, at).unwrap();
        assert_eq!((cancelled.status, cancelled.timers.len(), cancelled.pending.len()), (Status::Cancelled, 0, 0));
        assert_eq!(cancelled.due(at).unwrap(), None);
        assert_eq!(cancelled.state, inst.state, "it stays in its state");
        let again = instance::intervene(&p, &cancelled, Intervention::Cancel, at).unwrap_err();
        assert_eq!(again.status, Status::Cancelled);
        assert_eq!(instance::on_timer(&p, &cancelled, &tenant(), at + TimeDelta::days(1)).unwrap(), None);
    }
    let mut completed = retried;
    completed.pending.clear();
    assert_eq!(instance::intervene(&p, &completed, Intervention::Cancel, at).unwrap_err().status, Status::Completed);
}

/// The instance in `reminded` with its reminder issued.
fn skipped_reminded(p: &Process) -> Instance {
    let mut reminded = instance::on_timer(p, &started(p), &tenant(), t0() + TimeDelta::minutes(31)).unwrap().unwrap();
    reminded.pending.clear();
    reminded
}
