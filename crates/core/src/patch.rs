//! JSON Patch (RFC 6902) and JSON Merge Patch (RFC 7396) on aggregate documents, through the
//! `json-patch` crate. Server-owned fields (`/id`, `/_meta`) are refused here.

use json_patch::{Patch, PatchOperation};
use serde_json::Value;

use crate::error::{DomainError, LimitKind, Violation};
use crate::limits::Limits;

/// Top-level keys of a document that only the server writes (SPEC §2.2).
pub const SERVER_OWNED_KEYS: &[&str] = &["id", "_meta"];

/// Parses a patch body, collecting a violation per malformed operation (pointers are relative
/// to the body), then applies the op-count and append limits.
pub fn parse_patch(body: &Value, limits: &Limits) -> Result<Patch, DomainError> {
    let Value::Array(ops) = body else {
        return Err(DomainError::InvalidCommand(vec![Violation::new(
            "/body",
            "a JSON Patch must be an array of operations",
        )]));
    };
    if ops.len() > limits.patch_ops_max {
        return Err(DomainError::LimitExceeded {
            kind: LimitKind::PatchOps,
            limit: limits.patch_ops_max as u64,
            actual: ops.len() as u64,
            message: format!("the patch has {} operations, over the limit of {}", ops.len(), limits.patch_ops_max),
        });
    }
    let mut parsed = Vec::with_capacity(ops.len());
    let mut violations = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match serde_json::from_value::<PatchOperation>(op.clone()) {
            Ok(op) => parsed.push(op),
            Err(e) => violations.push(Violation::new(format!("/body/{i}"), format!("invalid patch operation: {e}"))),
        }
    }
    if !violations.is_empty() {
        return Err(DomainError::InvalidCommand(violations));
    }
    let appends = parsed
        .iter()
        .filter(|op| matches!(op, PatchOperation::Add(_) | PatchOperation::Copy(_) | PatchOperation::Move(_)))
        .filter(|op| op.path().as_str().ends_with("/-"))
        .count();
    if appends > limits.array_appends_max {
        return Err(DomainError::LimitExceeded {
            kind: LimitKind::ArrayAppends,
            limit: limits.array_appends_max as u64,
            actual: appends as u64,
            message: format!(
                "the patch appends {appends} array elements, over the limit of {}",
                limits.array_appends_max
            ),
        });
    }
    Ok(Patch(parsed))
}

/// Whether a JSON Pointer names a server-owned field or something inside one.
pub fn is_server_owned(pointer: &str) -> bool {
    SERVER_OWNED_KEYS.iter().any(|k| {
        let p = pointer.strip_prefix('/').unwrap_or("");
        let first = p.split('/').next().unwrap_or("");
        pointer.starts_with('/') && first == *k
    })
}

/// Refuses operations that touch server-owned fields, listing each.
pub fn check_protected(patch: &Patch) -> Result<(), DomainError> {
    let mut violations = Vec::new();
    for (i, op) in patch.0.iter().enumerate() {
        let from = match op {
            PatchOperation::Move(m) => Some(m.from.as_str()),
            PatchOperation::Copy(c) => Some(c.from.as_str()),
            _ => None,
        };
        let writes = !matches!(op, PatchOperation::Test(_));
        if writes && is_server_owned(op.path().as_str()) {
            violations.push(Violation::new(
                format!("/body/{i}/path"),
                format!("'{}' is owned by the server and cannot be written", op.path()),
            ));
        }
        if let (Some(from), PatchOperation::Move(_)) = (from, op)
            && is_server_owned(from)
        {
            violations.push(Violation::new(
                format!("/body/{i}/from"),
                format!("'{from}' is owned by the server and cannot be moved"),
            ));
        }
    }
    if violations.is_empty() { Ok(()) } else { Err(DomainError::ProtectedField(violations)) }
}

/// Refuses a document (a create or replace body, or the result of a patch) that is not an
/// object or that carries a server-owned key. `id` is allowed when it equals `expected_id`:
/// clients may echo the aggregate's id back.
pub fn check_document_shape(doc: &Value, expected_id: Option<&str>) -> Result<(), DomainError> {
    let Value::Object(map) = doc else {
        return Err(DomainError::InvalidDocument(vec![Violation::new(
            "",
            "an aggregate document must be a JSON object",
        )]));
    };
    let mut violations = Vec::new();
    if map.contains_key("_meta") {
        violations.push(Violation::new("/_meta", "'_meta' is owned by the server and cannot be written"));
    }
    if let Some(id) = map.get("id")
        && Some(id.as_str().unwrap_or("\u{0}")) != expected_id
    {
        violations.push(Violation::new("/id", "'id' is owned by the server; it may only repeat the aggregate's id"));
    }
    if violations.is_empty() { Ok(()) } else { Err(DomainError::ProtectedField(violations)) }
}

/// Applies a patch to a copy of `doc` and returns the result; `doc` is unchanged on failure.
pub fn apply(doc: &Value, patch: &Patch) -> Result<Value, DomainError> {
    let mut next = doc.clone();
    json_patch::patch(&mut next, &patch.0).map_err(|e| DomainError::PatchFailed {
        index: e.operation,
        path: e.path.to_string(),
        message: e.kind.to_string(),
    })?;
    Ok(next)
}

/// The RFC 6902 patch equivalent to applying RFC 7396 merge patch `merge` to `doc`.
pub fn merge_to_patch(doc: &Value, merge: &Value) -> Patch {
    let mut target = doc.clone();
    json_patch::merge(&mut target, merge);
    json_patch::diff(doc, &target)
}

/// The RFC 6902 patch that turns `old` into `new`.
pub fn diff(old: &Value, new: &Value) -> Patch {
    json_patch::diff(old, new)
}

/// A patch as a JSON array, the form stored in `patched` events.
pub fn to_value(patch: &Patch) -> Value {
    serde_json::to_value(patch).unwrap_or(Value::Array(Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_owned_pointers() {
        for p in ["/id", "/_meta", "/_meta/version", "/id/x"] {
            assert!(is_server_owned(p), "{p}");
        }
        for p in ["", "/ids", "/a/id", "/_metadata", "/x"] {
            assert!(!is_server_owned(p), "{p}");
        }
    }

    #[test]
    fn protected_ops_are_listed() {
        let patch = parse_patch(
            &json!([
                {"op": "replace", "path": "/id", "value": "x"},
                {"op": "test", "path": "/id", "value": "x"},
                {"op": "add", "path": "/_meta/x", "value": 1},
                {"op": "copy", "from": "/id", "path": "/copy"}
            ]),
            &Limits::default(),
        )
        .unwrap();
        let Err(DomainError::ProtectedField(v)) = check_protected(&patch) else { panic!() };
        let pointers: Vec<_> = v.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/body/0/path", "/body/2/path"]);
    }

    #[test]
    fn merge_patch_becomes_json_patch() {
        let doc = json!({"a": 1, "b": {"c": 2, "d": 3}});
        let p = merge_to_patch(&doc, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        let next = apply(&doc, &p).unwrap();
        assert_eq!(next, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }

    #[test]
    fn failed_patch_reports_index_and_leaves_doc() {
        let doc = json!({"a": 1});
        let p = parse_patch(
            &json!([{"op": "add", "path": "/b", "value": 1}, {"op": "test", "path": "/a", "value": 2}]),
            &Limits::default(),
        )
        .unwrap();
        let Err(DomainError::PatchFailed { index, .. }) = apply(&doc, &p) else { panic!() };
        assert_eq!(index, 1);
        assert_eq!(doc, json!({"a": 1}));
    }

    #[test]
    fn malformed_ops_each_reported() {
        let Err(DomainError::InvalidCommand(v)) = parse_patch(
            &json!([{"op": "add", "path": "/a"}, {"op": "jump", "path": "/b"}, {"op": "remove", "path": "/c"}]),
            &Limits::default(),
        ) else {
            panic!()
        };
        let pointers: Vec<_> = v.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/body/0", "/body/1"]);
    }

    #[test]
    fn op_and_append_limits() {
        let limits = Limits { patch_ops_max: 2, array_appends_max: 1, ..Limits::default() };
        let three = Value::Array(vec![json!({"op": "test", "path": "", "value": {}}); 3]);
        assert!(matches!(
            parse_patch(&three, &limits),
            Err(DomainError::LimitExceeded { kind: LimitKind::PatchOps, .. })
        ));
        let appends = json!([{"op": "add", "path": "/a/-", "value": 1}, {"op": "add", "path": "/a/-", "value": 2}]);
        assert!(matches!(
            parse_patch(&appends, &limits),
            Err(DomainError::LimitExceeded { kind: LimitKind::ArrayAppends, .. })
        ));
    }
}
