//! The error → problem table of `problem.rs`: every domain error, every limit kind and the
//! engine's and store's errors have one status, one problem type and their extension members.

use sourced_core::{DomainError, ExpectedVersion, LimitKind, StreamHead, Version, Violation};
use sourced_engine::EngineError;
use sourced_server::problem::{Problem, from_engine};
use sourced_store::StoreError;

/// `(status, slug, extension members in order)` of `p`.
fn shape(p: &Problem) -> (u16, &'static str, Vec<&'static str>) {
    (p.status.as_u16(), p.slug, p.extra.iter().map(|(k, _)| *k).collect())
}

#[test]
fn every_error_has_its_one_problem() {
    let v = || vec![Violation::new("/a", "wrong")];
    let limit = |kind| DomainError::over_limit(kind, 1, 2, "over".into());
    let cases: Vec<(DomainError, u16, &str, &[&str])> = vec![
        (DomainError::InvalidCommand(v()), 400, "invalid-command", &["violations"]),
        (DomainError::NotFound, 404, "not-found", &[]),
        (DomainError::Deleted { version: Version(3) }, 410, "deleted", &["currentVersion"]),
        (DomainError::AlreadyExists { version: Version(1) }, 409, "already-exists", &["currentVersion"]),
        (
            DomainError::PatchFailed { index: 0, pointer: "/a".into(), path: "/a".into(), message: "m".into() },
            422,
            "patch-failed",
            &["violations", "operation"],
        ),
        (DomainError::ProtectedField(v()), 422, "protected-field", &["violations"]),
        (DomainError::NoOp, 422, "no-op", &[]),
        (DomainError::UnknownCommand { name: "x".into() }, 422, "unknown-command", &[]),
        (
            DomainError::IllegalTransition {
                field: "status".into(),
                from: None,
                to: "paid".into(),
                allowed: vec![],
                message: "m".into(),
            },
            422,
            "illegal-transition",
            &["violations", "field", "from", "to", "allowed"],
        ),
        (DomainError::RuleViolations(v()), 422, "rule-violation", &["violations"]),
        (DomainError::PreconditionFailed(v()), 422, "command-precondition-failed", &["violations"]),
        (DomainError::InvalidPayload(v()), 422, "invalid-payload", &["violations"]),
        (DomainError::ExpressionFailed { message: "m".into() }, 422, "expression-failed", &[]),
        (DomainError::InvalidDocument(v()), 422, "invalid-document", &["violations"]),
        (DomainError::UnstorableValue(v()), 422, "unstorable-value", &["violations"]),
        (limit(LimitKind::DocumentSize), 413, "document-too-large", &["limit", "actual"]),
        (limit(LimitKind::JsonDepth), 422, "too-deep", &["limit", "actual"]),
        (limit(LimitKind::PatchOps), 422, "too-many-operations", &["limit", "actual"]),
        (limit(LimitKind::ArrayAppends), 422, "too-many-appends", &["limit", "actual"]),
        (limit(LimitKind::ExpressionCost), 422, "expression-too-costly", &["limit", "actual"]),
        (limit(LimitKind::ExpressionValue), 422, "expression-value-too-large", &["limit", "actual"]),
    ];
    for (error, status, slug, extra) in cases {
        let name = format!("{error:?}");
        assert_eq!(shape(&Problem::from(error)), (status, slug, extra.to_vec()), "{name}");
    }
    let head = StreamHead { version: Version(2), deleted: false };
    let conflict = |client_version| EngineError::Conflict {
        expected: ExpectedVersion::Exact(Version(1)),
        actual: head,
        client_version,
    };
    let engine: Vec<(EngineError, bool, u16, &str, &[&str])> = vec![
        (conflict(true), true, 412, "precondition-failed", &["expectedVersion", "currentVersion"]),
        (conflict(true), false, 409, "version-conflict", &["expectedVersion", "currentVersion"]),
        (conflict(false), true, 409, "version-conflict", &["expectedVersion", "currentVersion"]),
        (EngineError::VersionRequired, false, 428, "precondition-required", &[]),
        (EngineError::Domain(DomainError::NoOp), false, 422, "no-op", &[]),
        (EngineError::Store(StoreError::Closed), false, 503, "store-unavailable", &[]),
    ];
    for (error, from_precondition, status, slug, extra) in engine {
        let name = format!("{error:?}");
        assert_eq!(shape(&from_engine(error, from_precondition)), (status, slug, extra.to_vec()), "{name}");
    }
    use sourced_core::artifacts::instance::{Intervention, Status, WrongStatus};
    use sourced_engine::process::InterventionError;
    let wrong = |action, status| InterventionError::WrongStatus(WrongStatus { action, status });
    let steps: Vec<(InterventionError, u16, &str, &[&str])> = vec![
        (InterventionError::NotFound("no".into()), 404, "not-found", &[]),
        (wrong(Intervention::Retry, Status::Running), 409, "process-not-parked", &["instanceStatus"]),
        (wrong(Intervention::Skip, Status::Completed), 409, "process-not-parked", &["instanceStatus"]),
        (wrong(Intervention::Cancel, Status::Cancelled), 409, "process-ended", &["instanceStatus"]),
        (
            InterventionError::Conflict { expected: Version(1), actual: Version(2) },
            409,
            "version-conflict",
            &["expectedVersion", "currentVersion"],
        ),
        (InterventionError::Store(StoreError::Closed), 503, "store-unavailable", &[]),
    ];
    for (error, status, slug, extra) in steps {
        let name = format!("{error:?}");
        assert_eq!(shape(&Problem::from_intervention(error)), (status, slug, extra.to_vec()), "{name}");
    }
}
