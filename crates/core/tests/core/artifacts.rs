//! Artifact sets: loading, the problems of broken sets, and decisions with schemas, custom
//! commands, rules and lifecycles (the SPEC §4.6 example).

use std::collections::BTreeMap;

use chrono::DateTime;
use serde_json::{Value, json};
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::decide::decide;
use sourced_core::{Aggregate, AggregateId, Command, DomainError, EnvelopeDefaults, Limits, TenantId, Version};

fn files(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect()
}

const LOAN_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "amount": {"type": "number", "minimum": 0},
    "status": {"enum": ["requested", "approved", "rejected", "paid"]},
    "approver": {"type": "string"}
  },
  "required": ["amount"]
}"#;

const LOAN_RULES: &str = "
rules:
  - name: big-loans-need-senior
    on: [approve]
    require: next.amount <= 10000 || command.body.senior == true
    message: loans above 10000 need a senior approver
  - name: round-amounts
    require: int(next.amount) % 100 == 0
    message: amounts should be round
    severity: warn
";

const LOAN_APPROVE: &str = "
payload: {type: object, properties: {approver: {type: string}, senior: {type: boolean}}, required: [approver]}
creates: false
require:
  - expr: state.amount > 0
    message: nothing to approve
emit:
  - event: LoanApproved
    patch:
      - {op: replace, path: /status, value: approved}
      - {op: add, path: /approver, expr: command.body.approver}
";

const LOAN_DISBURSE: &str = "
emit:
  - event: LoanPaid
    patch:
      - {op: replace, path: /status, value: paid}
";

const LOAN_LIFECYCLE: &str = "
field: /status
initial: requested
states: [requested, approved, rejected, paid]
transitions:
  - {from: requested, to: approved, on: [approve]}
  - {from: requested, to: rejected, on: [patch]}
  - {from: approved, to: paid, on: [disburse], guard: 'state.amount < 100000'}
";

fn loan_set() -> ArtifactSet {
    ArtifactSet::load(&files(&[
        ("types/loan/schema.json", LOAN_SCHEMA),
        ("types/loan/rules.yaml", LOAN_RULES),
        ("types/loan/commands/approve.yaml", LOAN_APPROVE),
        ("types/loan/commands/disburse.yaml", LOAN_DISBURSE),
        ("types/loan/lifecycle.yaml", LOAN_LIFECYCLE),
    ]))
    .unwrap_or_else(|p| panic!("{p:#?}"))
}

fn cmd(env: Value) -> Command {
    let mut env = env;
    let m = env.as_object_mut().unwrap();
    m.entry("targetName").or_insert(json!("loan"));
    m.entry("targetId").or_insert(json!("l1"));
    Command::from_envelope(
        &env,
        EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("l1").unwrap(),
            generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        },
    )
    .unwrap()
}

/// The next state, the events as (type, data), and the warnings.
type Ran = (Aggregate, Vec<(String, Value)>, Vec<Value>);

fn run(set: &ArtifactSet, agg: &Aggregate, env: Value) -> Result<Ran, DomainError> {
    let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let c = decide(set, agg, &cmd(env), &Limits::default(), now, None)?;
    let events = c.decision.changes.iter().map(|c| (c.event_type.clone(), c.data.clone())).collect();
    Ok((c.decision.next, events, c.warnings))
}

#[test]
fn the_loan_example_end_to_end() {
    let set = loan_set();
    // A create starts in the initial state, set when absent.
    let (agg, events, warnings) =
        run(&set, &Aggregate::default(), json!({"type": "create", "body": {"amount": 5000}})).unwrap();
    assert_eq!(agg.state.as_ref().unwrap()["status"], "requested");
    assert_eq!(events[0].1["status"], "requested");
    assert!(warnings.is_empty());

    // The custom command: payload schema, then emitted events with computed values.
    let e = run(&set, &agg, json!({"type": "logic", "name": "approve", "body": {}})).unwrap_err();
    assert!(matches!(&e, DomainError::InvalidPayload(v) if v[0].pointer == "/body"), "{e:?}");
    let (approved, events, _) =
        run(&set, &agg, json!({"type": "logic", "name": "approve", "body": {"approver": "ann"}})).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "LoanApproved");
    assert_eq!(approved.state.as_ref().unwrap()["approver"], "ann");
    assert_eq!(approved.state.as_ref().unwrap()["status"], "approved");
    assert_eq!(approved.version, Version(2));

    // The lifecycle: approve again is not a transition from approved.
    let e = run(&set, &approved, json!({"type": "logic", "name": "approve", "body": {"approver": "bob"}})).unwrap_err();
    match e {
        DomainError::IllegalTransition { from, to, allowed, .. } => {
            assert_eq!(from.as_deref(), Some("approved"));
            assert_eq!(to, "approved");
            assert!(allowed.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // A patch writing the state field directly is held to the same transitions.
    let e = run(
        &set,
        &approved,
        json!({"type": "patch", "body": [{"op": "replace", "path": "/status", "value": "requested"}]}),
    )
    .unwrap_err();
    assert!(matches!(e, DomainError::IllegalTransition { .. }), "{e:?}");
    let e = run(&set, &agg, json!({"type": "patch", "body": [{"op": "replace", "path": "/status", "value": "paid"}]}))
        .unwrap_err();
    match e {
        DomainError::IllegalTransition { allowed, .. } => assert_eq!(allowed, ["rejected"]),
        other => panic!("{other:?}"),
    }
    run(&set, &agg, json!({"type": "patch", "body": [{"op": "replace", "path": "/status", "value": "rejected"}]}))
        .unwrap();
    // A generic command that leaves the state alone is not held to the transitions.
    run(&set, &approved, json!({"type": "patch", "body": [{"op": "replace", "path": "/amount", "value": 4000}]}))
        .unwrap();
    // Disburse with a guard.
    let (paid, _, _) = run(&set, &approved, json!({"type": "logic", "name": "disburse", "body": {}})).unwrap();
    assert_eq!(paid.state.as_ref().unwrap()["status"], "paid");
}

#[test]
fn rules_reject_together_and_warn() {
    let set = loan_set();
    let (agg, _, _) = run(&set, &Aggregate::default(), json!({"type": "create", "body": {"amount": 20000}})).unwrap();
    let e = run(&set, &agg, json!({"type": "logic", "name": "approve", "body": {"approver": "ann"}})).unwrap_err();
    match e {
        DomainError::RuleViolations(v) => {
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].rule.as_deref(), Some("big-loans-need-senior"));
        }
        other => panic!("{other:?}"),
    }
    run(&set, &agg, json!({"type": "logic", "name": "approve", "body": {"approver": "ann", "senior": true}})).unwrap();
    // A warn rule accepts and reports.
    let (_, _, warnings) =
        run(&set, &Aggregate::default(), json!({"type": "create", "body": {"amount": 150}})).unwrap();
    assert_eq!(warnings, [json!({"rule": "round-amounts", "message": "amounts should be round"})]);
    // The schema holds after every command.
    let e = run(&set, &agg, json!({"type": "patch", "body": [{"op": "replace", "path": "/amount", "value": -5}]}))
        .unwrap_err();
    assert!(matches!(&e, DomainError::InvalidDocument(v) if v[0].pointer == "/amount"), "{e:?}");
    // Preconditions and unknown commands.
    let (zero, _, _) = run(&set, &Aggregate::default(), json!({"type": "create", "body": {"amount": 0}})).unwrap();
    let e = run(&set, &zero, json!({"type": "logic", "name": "approve", "body": {"approver": "ann"}})).unwrap_err();
    assert!(matches!(&e, DomainError::PreconditionFailed(v) if v[0].message == "nothing to approve"), "{e:?}");
    let e = run(&set, &zero, json!({"type": "logic", "name": "fly", "body": {}})).unwrap_err();
    assert!(matches!(e, DomainError::UnknownCommand { .. }));
    let e = run(&set, &Aggregate::default(), json!({"type": "logic", "name": "approve", "body": {"approver": "a"}}))
        .unwrap_err();
    assert!(matches!(e, DomainError::NotFound));
}

#[test]
fn expressions_that_fail_at_run_time_refuse_cleanly() {
    let set = ArtifactSet::load(&files(&[(
        "types/t/commands/boom.yaml",
        "creates: true\nemit:\n  - event: Boomed\n    patch:\n      - {op: add, path: /x, expr: 'state.nothing.here + 1'}\n",
    )]))
    .unwrap();
    let now = DateTime::from_timestamp(0, 0).unwrap();
    let c = Command::from_envelope(
        &json!({"type": "logic", "name": "boom", "targetName": "t", "targetId": "x", "body": {}}),
        EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("x").unwrap(),
            generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        },
    )
    .unwrap();
    let e = decide(&set, &Aggregate::default(), &c, &Limits::default(), now, None).unwrap_err();
    assert!(matches!(e, DomainError::ExpressionFailed { .. }), "{e:?}");
}

/// Each broken set and the exact problems expected: (file, location, start of the message).
#[test]
fn broken_sets_list_every_problem() {
    /// Files of a broken set, and the problems expected: (file, location, message start).
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<(&'a str, &'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            vec![("types/a/schema.json", r#"{"type": "nonsense"}"#)],
            vec![("types/a/schema.json", "", "invalid JSON Schema")],
        ),
        (
            vec![("types/a/rules.yaml", "rules:\n  - name: r\n    on: [ship]\n    require: 'true'\n    message: m\n")],
            vec![("types/a/rules.yaml", "/rules/0/on", "rule 'r' names command 'ship'")],
        ),
        (
            vec![("types/a/rules.yaml", "rules:\n  - name: r\n    require: 'next.x >'\n    message: m\n")],
            vec![("types/a/rules.yaml", "/rules/0/require", "CEL syntax error")],
        ),
        // A rule whose expression does not compile still has its commands checked.
        (
            vec![(
                "types/a/rules.yaml",
                "rules:\n  - name: r\n    on: [ship]\n    require: 'next.x >'\n    message: m\n",
            )],
            vec![
                ("types/a/rules.yaml", "/rules/0/require", "CEL syntax error"),
                ("types/a/rules.yaml", "/rules/0/on", "rule 'r' names command 'ship'"),
            ],
        ),
        (
            vec![(
                "types/a/lifecycle.yaml",
                "field: /s\ninitial: a\nstates: [a, b]\ntransitions:\n  - {from: a, to: c}\n",
            )],
            vec![("types/a/lifecycle.yaml", "/transitions/0/to", "state 'c' is not defined")],
        ),
        (
            vec![
                ("types/a/commands/go.yaml", "emit: [{event: Went}]\n"),
                ("types/a/commands/go.yml", "emit: [{event: Went}]\n"),
            ],
            vec![("types/a/commands/go.yml", "", "command 'go' is defined twice")],
        ),
        (vec![("types/a/rules.yaml", "rules: [\n")], vec![("types/a/rules.yaml", "line ", "invalid YAML")]),
        (
            vec![("types/Bad/schema.json", "{}")],
            vec![("types/Bad/schema.json", "", "'Bad' is not a valid aggregate type")],
        ),
        (vec![("typo/a/schema.json", "{}")], vec![("typo/a/schema.json", "", "not part of an artifact set")]),
        (
            vec![
                ("types/a/schema.json", r#"{"type": 1}"#),
                ("types/a/lifecycle.yaml", "field: /s\ninitial: z\nstates: [a]\n"),
            ],
            vec![
                ("types/a/lifecycle.yaml", "/initial", "initial state 'z'"),
                ("types/a/schema.json", "", "invalid JSON Schema"),
            ],
        ),
    ];
    for (set, want) in cases {
        let problems = ArtifactSet::load(&files(&set)).expect_err("the set is broken");
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
        for (p, (file, location, message)) in problems.iter().zip(&want) {
            assert_eq!(p.file, *file, "{p:?}");
            assert!(p.location.starts_with(location), "{p:?}");
            assert!(p.message.starts_with(message), "{p:?}");
        }
    }
}

/// The bad-artifact corpus: each directory under `crates/core/tests/data/bad-artifacts/` holds
/// a broken set in `set/` and, in `problems.json`, the exact problems it must produce
/// (`[{"file", "location", "message"}]`, in the order `sourced check` prints them). Every case
/// that differs is reported. `SOURCED_BLESS=1` writes `problems.json` from the actual output
/// (refused under `CI=true`); review the diff.
#[test]
fn bad_artifact_corpus() {
    fn read_set(root: &std::path::Path, dir: &std::path::Path, files: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                read_set(root, &path, files);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                files.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let bless = std::env::var("SOURCED_BLESS").is_ok_and(|v| v == "1");
    assert!(!(bless && std::env::var("CI").is_ok_and(|v| v == "true")), "SOURCED_BLESS=1 is refused under CI=true");
    let corpus = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad-artifacts");
    let mut cases: Vec<_> = std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 12, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let mut files = BTreeMap::new();
        read_set(&case.join("set"), &case.join("set"), &mut files);
        let actual: Vec<Value> = match ArtifactSet::load(&files) {
            Ok(_) => {
                failures.push(format!("{name}: the set loaded without problems"));
                continue;
            }
            Err(problems) => {
                problems.iter().map(|p| json!({"file": p.file, "location": p.location, "message": p.message})).collect()
            }
        };
        let path = case.join("problems.json");
        let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
        if bless {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == text => {}
            Ok(expected) => failures.push(format!("{name}: expected\n{expected}actual\n{text}")),
            Err(_) => failures.push(format!("{name}/problems.json is missing (SOURCED_BLESS=1 writes it)")),
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n\n{}", failures.len(), failures.join("\n"));
}

/// A process file as issue 17 writes it: every key read, the timers and commands compiled.
#[test]
fn a_process_file_loads_whole() {
    use sourced_core::artifacts::process::Trigger;
    let process = r#"
start: {type: order, event: OrderSubmitted, key: event.targetId, guard: "document.total > 0.0", state: awaiting-payment}
follow:
  - {type: payment, event: created, key: document.orderId}
states: [awaiting-payment, reminded, paid, cancelled]
final: [paid, cancelled]
data: {total: document.total}
transitions:
  - from: [awaiting-payment, reminded]
    on: created
    guard: "double(document.amount) >= 1.0"
    to: paid
    data: {paid: document.amount}
    do:
      - command: {target: order, id: key, name: pay, body: "{'amount': document.amount}"}
  - from: awaiting-payment
    after: 30m
    to: reminded
    do:
      - command: {target: order, id: key, name: patch, body: "{'reminded': true}"}
  - from: reminded
    at: "timestamp(instance.startedAt) + duration('2h')"
    to: cancelled
"#;
    let set = ArtifactSet::load(&files(&[
        ("types/order/commands/submit.yaml", "emit: [{event: OrderSubmitted, patch: []}]"),
        ("types/order/commands/pay.yaml", "emit: [{event: OrderPaid, patch: []}]"),
        ("processes/payment-deadline.yaml", process),
    ]))
    .unwrap_or_else(|p| panic!("{p:#?}"));
    let p = &set.processes()["payment-deadline"];
    assert_eq!((p.start.type_name.as_str(), p.start.event.as_str()), ("order", "OrderSubmitted"));
    assert_eq!(p.start.state, "awaiting-payment");
    assert_eq!(p.follow[0].key.source(), "document.orderId");
    assert_eq!(p.finals, ["paid", "cancelled"]);
    assert_eq!(p.data[0].0, "total");
    assert!(matches!(&p.transitions[0].trigger, Trigger::On(e) if e == "created"));
    assert!(matches!(p.transitions[1].trigger, Trigger::After(1800)));
    assert!(matches!(&p.transitions[2].trigger, Trigger::At(e) if e.source().starts_with("timestamp")));
    assert_eq!(p.transitions[0].commands[0].name, "pay");
    assert_eq!(p.transitions[1].commands[0].body.source(), "{'reminded': true}");
}

/// The example domain's process loads with the rest of examples/order.
#[test]
fn the_example_process_loads() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order");
    let mut set = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                set.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let set = ArtifactSet::load(&set).unwrap_or_else(|p| panic!("{p:#?}"));
    assert_eq!(set.processes().keys().collect::<Vec<_>>(), ["payment-deadline"]);
}

/// Clients cannot write to a process's instances (`process-<name>`): only the process does.
#[test]
fn clients_cannot_write_process_instances() {
    let defaults = EnvelopeDefaults {
        tenant: TenantId::default_tenant(),
        tenant_fixed: false,
        generated_id: AggregateId::parse("x").unwrap(),
        generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
    };
    let env = json!({"type": "patch", "targetName": "process-payment-deadline", "targetId": "o1", "body": [{"op": "add", "path": "/state", "value": "paid"}]});
    match Command::from_envelope(&env, defaults) {
        Err(DomainError::InvalidCommand(v)) => {
            assert_eq!(v[0].pointer, "/targetName", "{v:?}");
            assert!(v[0].message.contains("holds process instances"), "{v:?}");
        }
        other => panic!("{other:?}"),
    }
}
