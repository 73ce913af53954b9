//! Given events, when a command, then events or an error (the cqrs-es harness shape).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sourced_core::{
    Aggregate, AggregateId, Command, DomainError, EnvelopeDefaults, Limits, RecordedEvent, TenantId, Version, decide,
    new_events,
};

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

struct Given {
    agg: Aggregate,
    limits: Limits,
}

fn given(events: &[(&str, Value)]) -> Given {
    let mut agg = Aggregate::default();
    for (i, (ty, data)) in events.iter().enumerate() {
        let e = RecordedEvent {
            id: sourced_core::CommandId(uuid::Uuid::from_u128(2)).event_id(0),
            position: sourced_core::Position(i as u64 + 1),
            tenant: TenantId::default_tenant(),
            target_name: sourced_core::TypeName::parse("order").unwrap(),
            target_id: AggregateId::parse("o1").unwrap(),
            version: Version(i as u64 + 1),
            event_type: (*ty).to_owned(),
            data: data.clone(),
            metadata: Value::Null,
            timestamp: t0(),
        };
        agg.apply(&e).expect("given events fold");
    }
    Given { agg, limits: Limits::default() }
}

fn nothing() -> Given {
    given(&[])
}

struct When {
    result: Result<(Vec<(String, Value)>, Aggregate), DomainError>,
}

impl Given {
    fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn when(self, mut envelope: Value) -> When {
        let m = envelope.as_object_mut().unwrap();
        m.entry("targetName").or_insert(json!("order"));
        if m.get("type") != Some(&json!("create")) {
            m.entry("targetId").or_insert(json!("o1"));
        }
        let defaults = EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("o1").unwrap(),
            generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        };
        let result = Command::from_envelope(&envelope, defaults).and_then(|cmd| {
            let d = decide(&self.agg, &cmd, &self.limits, t0())?;
            let events = new_events(&cmd, &d.changes, None);
            assert_eq!(events.len(), d.changes.len());
            Ok((d.changes.into_iter().map(|c| (c.event_type, c.data)).collect(), d.next))
        });
        When { result }
    }

    fn when_merge(self, merge: Value) -> When {
        let defaults = EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("o1").unwrap(),
            generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        };
        let env = json!({"type": "patch", "targetName": "order", "targetId": "o1", "body": []});
        let result = Command::from_envelope(&env, defaults).and_then(|c| c.into_merge_patch(merge)).and_then(|cmd| {
            let d = decide(&self.agg, &cmd, &self.limits, t0())?;
            Ok((d.changes.into_iter().map(|c| (c.event_type, c.data)).collect(), d.next))
        });
        When { result }
    }
}

impl When {
    #[track_caller]
    fn then_events(self, want: &[(&str, Value)]) -> Aggregate {
        let (events, next) = self.result.unwrap_or_else(|e| panic!("expected events, got error {e:?}"));
        let got: Vec<(&str, &Value)> = events.iter().map(|(t, d)| (t.as_str(), d)).collect();
        let want: Vec<(&str, &Value)> = want.iter().map(|(t, d)| (*t, d)).collect();
        assert_eq!(got, want);
        next
    }

    #[track_caller]
    fn then_state(self, want: Value) {
        let (_, next) = self.result.unwrap_or_else(|e| panic!("expected events, got error {e:?}"));
        assert_eq!(next.state, Some(want));
    }

    #[track_caller]
    fn then_error(self, check: impl FnOnce(&DomainError) -> bool) {
        match self.result {
            Ok(ok) => panic!("expected an error, got {ok:?}"),
            Err(e) => assert!(check(&e), "unexpected error {e:?}"),
        }
    }
}

#[test]
fn create_on_nothing() {
    let next = nothing()
        .when(json!({"type": "create", "body": {"id": "o1", "total": 3}}))
        .then_events(&[("created", json!({"total": 3}))]);
    assert_eq!(next.version, Version(1));
    let doc = next.document(&AggregateId::parse("o1").unwrap()).unwrap();
    assert_eq!(doc["id"], "o1");
    assert_eq!(doc["total"], 3);
    assert_eq!(doc["_meta"]["version"], 1);
    assert_eq!(doc["_meta"]["deleted"], false);
}

#[test]
fn create_twice_conflicts() {
    given(&[("created", json!({}))])
        .when(json!({"type": "create", "body": {"id": "o1"}}))
        .then_error(|e| matches!(e, DomainError::AlreadyExists { version: Version(1) }));
}

#[test]
fn create_after_delete_is_gone() {
    given(&[("created", json!({})), ("deleted", Value::Null)])
        .when(json!({"type": "create", "body": {"id": "o1"}}))
        .then_error(|e| matches!(e, DomainError::Deleted { version: Version(2) }));
}

#[test]
fn create_refuses_meta_and_non_objects() {
    nothing()
        .when(json!({"type": "create", "body": {"_meta": {}}}))
        .then_error(|e| matches!(e, DomainError::ProtectedField(_)));
    nothing().when(json!({"type": "create", "body": [1]})).then_error(|e| matches!(e, DomainError::InvalidCommand(_)));
}

#[test]
fn patch_emits_the_patch_as_applied() {
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [{"op": "replace", "path": "/a", "value": 2}]}))
        .then_events(&[("patched", json!([{"op": "replace", "path": "/a", "value": 2}]))]);
}

#[test]
fn patch_on_nothing_is_not_found() {
    nothing()
        .when(json!({"type": "patch", "body": [{"op": "add", "path": "/a", "value": 2}]}))
        .then_error(|e| matches!(e, DomainError::NotFound));
}

#[test]
fn patch_on_deleted_is_gone() {
    given(&[("created", json!({"a": 1})), ("deleted", Value::Null)])
        .when(json!({"type": "patch", "body": [{"op": "add", "path": "/a", "value": 2}]}))
        .then_error(|e| matches!(e, DomainError::Deleted { .. }));
}

#[test]
fn no_op_patch_is_refused() {
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [{"op": "replace", "path": "/a", "value": 1}]}))
        .then_error(|e| matches!(e, DomainError::NoOp));
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [{"op": "test", "path": "/a", "value": 1}]}))
        .then_error(|e| matches!(e, DomainError::NoOp));
}

#[test]
fn failed_test_op_is_refused() {
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [
            {"op": "test", "path": "/a", "value": 5},
            {"op": "replace", "path": "/a", "value": 2}
        ]}))
        .then_error(|e| matches!(e, DomainError::PatchFailed { index: 0, .. }));
}

#[test]
fn server_owned_fields_are_protected() {
    for path in ["/id", "/_meta", "/_meta/version"] {
        given(&[("created", json!({"a": 1}))])
            .when(json!({"type": "patch", "body": [{"op": "add", "path": path, "value": 2}]}))
            .then_error(|e| matches!(e, DomainError::ProtectedField(_)));
    }
    // Replacing the root with a document that carries _meta is refused too.
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [{"op": "replace", "path": "", "value": {"_meta": 1}}]}))
        .then_error(|e| matches!(e, DomainError::ProtectedField(_)));
    // ...and the root must stay an object.
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "patch", "body": [{"op": "replace", "path": "", "value": [1]}]}))
        .then_error(|e| matches!(e, DomainError::InvalidDocument(_)));
}

#[test]
fn replace_diffs_to_a_patch_or_creates() {
    given(&[("created", json!({"a": 1, "b": 2}))])
        .when(json!({"type": "replace", "body": {"id": "o1", "a": 1, "c": 3}}))
        .then_state(json!({"a": 1, "c": 3}));
    nothing().when(json!({"type": "replace", "body": {"a": 1}})).then_events(&[("created", json!({"a": 1}))]);
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "replace", "body": {"a": 1}}))
        .then_error(|e| matches!(e, DomainError::NoOp));
    given(&[("created", json!({"a": 1}))])
        .when(json!({"type": "replace", "body": {"id": "other", "a": 1}}))
        .then_error(|e| matches!(e, DomainError::ProtectedField(_)));
}

#[test]
fn merge_patch_becomes_an_equivalent_json_patch() {
    let next = given(&[("created", json!({"a": 1, "b": {"c": 1, "d": 2}}))])
        .when_merge(json!({"a": null, "b": {"c": 9}}))
        .then_events(&[(
            "patched",
            json!([{"op": "replace", "path": "/b/c", "value": 9}, {"op": "remove", "path": "/a"}]),
        )]);
    assert_eq!(next.state, Some(json!({"b": {"c": 9, "d": 2}})));
    given(&[("created", json!({"a": 1}))]).when_merge(json!({"a": 1})).then_error(|e| matches!(e, DomainError::NoOp));
    given(&[("created", json!({"a": 1}))])
        .when_merge(json!({"_meta": {"version": 9}}))
        .then_error(|e| matches!(e, DomainError::ProtectedField(_)));
}

#[test]
fn delete_marks_and_keeps_state() {
    let next =
        given(&[("created", json!({"a": 1}))]).when(json!({"type": "delete"})).then_events(&[("deleted", Value::Null)]);
    assert!(next.deleted);
    assert_eq!(next.state, Some(json!({"a": 1})));
    given(&[("created", json!({"a": 1})), ("deleted", Value::Null)])
        .when(json!({"type": "delete"}))
        .then_error(|e| matches!(e, DomainError::Deleted { .. }));
}

#[test]
fn custom_commands_need_artifacts() {
    given(&[("created", json!({}))])
        .when(json!({"type": "logic", "name": "ship", "body": {}}))
        .then_error(|e| matches!(e, DomainError::UnknownCommand { .. }));
}

#[test]
fn limits_are_enforced() {
    let small = Limits { document_bytes_max: 20, json_depth_max: 3, ..Limits::default() };
    given(&[("created", json!({"a": 1}))])
        .limits(small.clone())
        .when(json!({"type": "patch", "body": [{"op": "add", "path": "/b", "value": "a long string value"}]}))
        .then_error(|e| matches!(e, DomainError::LimitExceeded { kind: sourced_core::LimitKind::DocumentSize, .. }));
    nothing()
        .limits(small)
        .when(json!({"type": "create", "body": {"a": {"b": {"c": {}}}}}))
        .then_error(|e| matches!(e, DomainError::LimitExceeded { kind: sourced_core::LimitKind::JsonDepth, .. }));
}

#[test]
fn custom_events_fold_as_patches() {
    // A domain event (as a custom command will emit) carries a patch; the generic fold applies it.
    let agg = given(&[
        ("created", json!({"status": "draft"})),
        ("OrderSubmitted", json!([{"op": "replace", "path": "/status", "value": "submitted"}])),
    ])
    .agg;
    assert_eq!(agg.state, Some(json!({"status": "submitted"})));
    assert_eq!(agg.version, Version(2));
}
