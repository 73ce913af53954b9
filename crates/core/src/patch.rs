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
        let (max, n) = (limits.patch_ops_max, ops.len());
        let message = format!("the patch has {n} operations, over the limit of {max}");
        return Err(DomainError::over_limit(LimitKind::PatchOps, max, n, message));
    }
    let mut parsed = Vec::with_capacity(ops.len());
    let mut violations = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let bad_pointers: Vec<Violation> = ["path", "from"]
            .into_iter()
            .filter_map(|member| {
                let p = op.get(member)?.as_str()?;
                pointer_problem(p).map(|why| Violation::new(format!("/body/{i}/{member}"), why))
            })
            .collect();
        if !bad_pointers.is_empty() {
            violations.extend(bad_pointers);
            continue;
        }
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
        let max = limits.array_appends_max;
        let message = format!("the patch appends {appends} array elements, over the limit of {max}");
        return Err(DomainError::over_limit(LimitKind::ArrayAppends, max, appends, message));
    }
    Ok(Patch(parsed))
}

/// Why `p` is not a JSON Pointer (RFC 6901 §3), in the words a client can act on.
fn pointer_problem(p: &str) -> Option<String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Some(format!("'{p}' is not a JSON Pointer: it must be empty or start with '/'"));
    }
    let b = p.as_bytes();
    let bad = b.iter().enumerate().any(|(i, &c)| c == b'~' && !matches!(b.get(i + 1), Some(b'0' | b'1')));
    bad.then(|| format!("'{p}' is not a JSON Pointer: '~' must be followed by '0' or '1' ('~0' is '~', '~1' is '/')"))
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
/// Unbounded: for the fold, which replays events that were bounded when they were accepted.
pub fn apply(doc: &Value, patch: &Patch) -> Result<Value, DomainError> {
    apply_ops(doc, patch, None)
}

/// Applies a patch like [`apply`], bounding the work and memory it may cost as it goes: the
/// values its `copy` operations duplicate may total at most `MAX_DOCUMENT_BYTES`. Counted before
/// each copy is made, so a refused patch never held more than the document, the request and
/// that budget (issue 14: a thousand copies of an 800 KB array once took 61 s and 14 GB before
/// the size check after the last operation refused them). Every other way a patch grows a
/// document is bounded by the request: `add`/`replace` values come from its body, `move` and
/// `remove` never grow it. The size of the result is still checked exactly afterwards.
pub fn apply_bounded(doc: &Value, patch: &Patch, limits: &Limits) -> Result<Value, DomainError> {
    apply_ops(doc, patch, Some(limits.document_bytes_max))
}

fn apply_ops(doc: &Value, patch: &Patch, copy_budget: Option<usize>) -> Result<Value, DomainError> {
    let mut next = doc.clone();
    let mut copied = 0usize;
    for (index, op) in patch.0.iter().enumerate() {
        if let (PatchOperation::Copy(c), Some(budget)) = (op, copy_budget)
            && let Some(source) = next.pointer(c.from.as_str())
        {
            let left = budget.saturating_sub(copied);
            match serialized_len_within(source, left) {
                Some(n) => copied += n,
                None => {
                    let message = format!(
                        "operation {index} would copy more than {budget} bytes in all (the document size \
                         limit); the copies of one patch may not total more than the largest document"
                    );
                    return Err(DomainError::over_limit(LimitKind::DocumentSize, budget, budget + 1, message));
                }
            }
        }
        // The whole document is a private copy, discarded on failure: no undo log is needed.
        json_patch::patch_unsafe(&mut next, std::slice::from_ref(op)).map_err(|e| patch_failed(index, op, &e.kind))?;
    }
    Ok(next)
}

/// A failed operation, located at the member of the operation that made it fail.
fn patch_failed(index: usize, op: &PatchOperation, kind: &json_patch::PatchErrorKind) -> DomainError {
    use json_patch::PatchErrorKind as K;
    let (member, pointer) = match (kind, op) {
        (K::InvalidFromPointer, PatchOperation::Move(m)) => ("from", m.from.as_str()),
        (K::InvalidFromPointer, PatchOperation::Copy(c)) => ("from", c.from.as_str()),
        _ => ("path", op.path().as_str()),
    };
    let message = match kind {
        K::TestFailed => format!("the value at '{pointer}' is not the one the test expects"),
        K::InvalidFromPointer => format!("'from' names '{pointer}', which does not exist"),
        K::InvalidPointer => format!("'path' names '{pointer}', which does not exist or cannot hold a value there"),
        K::CannotMoveInsideItself => format!("cannot move a value inside itself (to '{pointer}')"),
        other => format!("'{pointer}': {other}"),
    };
    DomainError::PatchFailed { index, pointer: format!("/body/{index}/{member}"), path: pointer.to_owned(), message }
}

/// The compact JSON length of `v` if it is at most `cap` bytes; stops counting past the cap.
fn serialized_len_within(v: &Value, cap: usize) -> Option<usize> {
    struct Capped {
        n: usize,
        cap: usize,
    }
    impl std::io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.n += buf.len();
            if self.n > self.cap { Err(std::io::Error::other("over the cap")) } else { Ok(buf.len()) }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Capped { n: 0, cap };
    serde_json::to_writer(&mut c, v).ok().map(|()| c.n)
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
