//! Property tests: patches, diffs and merge patches agree with each other, and the fold keeps
//! versions contiguous whatever the commands.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use sourced_core::patch::{apply, diff, merge_to_patch};
use sourced_core::{Aggregate, AggregateId, Command, DomainError, EnvelopeDefaults, Limits, TenantId, Version, decide};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-5i64..5).prop_map(Value::from),
        "[a-c]{0,3}".prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-e]", value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

proptest! {
    #[test]
    fn diff_then_apply_reaches_the_target(a in object(), b in object()) {
        let p = diff(&a, &b);
        prop_assert_eq!(apply(&a, &p).unwrap(), b);
    }

    #[test]
    fn merge_patch_and_its_json_patch_agree(a in object(), m in object()) {
        let mut merged = a.clone();
        json_patch::merge(&mut merged, &m);
        let p = merge_to_patch(&a, &m);
        prop_assert_eq!(apply(&a, &p).unwrap(), merged);
    }

    #[test]
    fn fold_of_accepted_commands_is_contiguous(docs in prop::collection::vec(object(), 1..12)) {
        // Create with the first document, then replace with each next one; every accepted
        // command adds exactly one version, every refused one (no-op) adds none.
        let defaults = || EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("x").unwrap(),
        generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        };
        let now = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let mut agg = Aggregate::default();
        let mut accepted = 0u64;
        for (i, d) in docs.iter().enumerate() {
            let kind = if i == 0 { "create" } else { "replace" };
            let cmd = Command::from_envelope(
                &json!({"type": kind, "targetName": "t", "targetId": "x", "body": d}),
                defaults(),
            ).unwrap();
            match decide(&agg, &cmd, &Limits::default(), now) {
                Ok(dec) => {
                    // The decided state is the one the fold reaches from the events.
                    let mut folded = agg.state.clone();
                    for c in &dec.changes {
                        folded = sourced_core::evolve(folded.as_ref(), &c.event_type, &c.data).unwrap().state;
                    }
                    prop_assert_eq!(folded.as_ref(), dec.next.state.as_ref());
                    prop_assert_eq!(dec.next.version, agg.version.next());
                    prop_assert_eq!(dec.next.state.as_ref(), Some(d));
                    agg = dec.next;
                    accepted += 1;
                }
                Err(DomainError::NoOp) => prop_assert_eq!(agg.state.as_ref(), Some(d)),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
        prop_assert_eq!(agg.version, Version(accepted));
    }

    #[test]
    fn decided_patches_fold_to_the_decided_state(doc in object(), target in object(), merge in object()) {
        let defaults = || EnvelopeDefaults {
            tenant: TenantId::default_tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("x").unwrap(),
        generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)),
        };
        let now = chrono::DateTime::from_timestamp(0, 0).unwrap();
        let agg = Aggregate { version: Version(1), state: Some(doc), ..Aggregate::default() };
        let patch = sourced_core::patch::to_value(&diff(agg.state.as_ref().unwrap(), &target));
        let patch_cmd = Command::from_envelope(
            &json!({"type": "patch", "targetName": "t", "targetId": "x", "body": patch}),
            defaults(),
        ).unwrap();
        let merge_cmd = Command::from_envelope(
            &json!({"type": "patch", "targetName": "t", "targetId": "x", "body": []}),
            defaults(),
        ).unwrap().into_merge_patch(merge).unwrap();
        for cmd in [patch_cmd, merge_cmd] {
            if let Ok(dec) = decide(&agg, &cmd, &Limits::default(), now) {
                let mut folded = agg.clone();
                for c in &dec.changes {
                    let sourced_core::aggregate::Evolved { state, deleted } =
                        sourced_core::evolve(folded.state.as_ref(), &c.event_type, &c.data).unwrap();
                    folded.state = state;
                    folded.deleted = deleted;
                }
                // Byte for byte: the read model (from the decision) and a rebuild (from the
                // fold) must serialize the same, key order included.
                prop_assert_eq!(serde_json::to_string(&folded.state).unwrap(), serde_json::to_string(&dec.next.state).unwrap());
            }
        }
    }

    #[test]
    fn arbitrary_patches_never_panic(doc in object(), ops in prop::collection::vec(value(), 0..5)) {
        let cmd = Command::from_envelope(
            &json!({"type": "patch", "targetName": "t", "targetId": "x", "body": ops}),
            EnvelopeDefaults { tenant: TenantId::default_tenant(), tenant_fixed: false, generated_id: AggregateId::parse("x").unwrap(), generated_command_id: sourced_core::CommandId(uuid::Uuid::from_u128(1)) },
        ).unwrap();
        let agg = Aggregate { version: Version(1), state: Some(doc), ..Aggregate::default() };
        let _ = decide(&agg, &cmd, &Limits::default(), chrono::DateTime::from_timestamp(0, 0).unwrap());
    }
}

/// Any JSON value, with numbers and strings of every kind a client's serializer writes.
fn wire_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
        "[\"\\\\/\t\n\u{1}\u{7f}é😀]{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-c\"\\\\~/é]{0,3}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// What any serializer writes (compact or pretty) comes back from the faithful reader as
    /// the same value: the reader never refuses a number that it would keep, nor gives up on
    /// text the parser accepts.
    #[test]
    fn the_faithful_reader_takes_what_serializers_write(v in wire_value()) {
        for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap()] {
            let back = sourced_core::json::parse(text.as_bytes(), 64);
            prop_assert!(back.is_ok(), "{text}: {:?}", back.err());
            prop_assert_eq!(back.unwrap(), v.clone());
        }
    }
}
