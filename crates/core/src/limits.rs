//! Limits on what grows with client input (SPEC §8.3) that the core itself enforces.

use serde_json::Value;

use crate::error::{DomainError, LimitKind};

/// The core's share of the limits; the server adds body and frame sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deepest JSON nesting accepted in a command body or document.
    pub json_depth_max: usize,
    /// Most operations in one patch.
    pub patch_ops_max: usize,
    /// Most `/-` array appends in one patch.
    pub array_appends_max: usize,
    /// Largest serialized document after a command.
    pub document_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { json_depth_max: 64, patch_ops_max: 1_000, array_appends_max: 1_000, document_bytes_max: 1024 * 1024 }
    }
}

/// The nesting depth of a JSON value: scalars are 0, `[]` and `{}` are 1.
/// Iterative, so a deep value cannot exhaust the stack here.
pub fn json_depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|c| (c, d + 1))),
            _ => {}
        }
        if matches!(v, Value::Array(_) | Value::Object(_)) {
            deepest = deepest.max(d + 1);
        }
    }
    deepest
}

impl Limits {
    /// Refuses a value nested deeper than [`Limits::json_depth_max`].
    pub fn check_depth(&self, v: &Value) -> Result<(), DomainError> {
        let depth = json_depth(v);
        if depth > self.json_depth_max {
            return Err(DomainError::LimitExceeded {
                kind: LimitKind::JsonDepth,
                limit: self.json_depth_max as u64,
                actual: depth as u64,
                message: format!("JSON nesting depth {depth} exceeds the limit of {}", self.json_depth_max),
            });
        }
        Ok(())
    }

    /// Refuses a document whose serialized form is larger than [`Limits::document_bytes_max`].
    pub fn check_document_size(&self, doc: &Value) -> Result<(), DomainError> {
        let size = serialized_len(doc);
        if size > self.document_bytes_max {
            return Err(DomainError::LimitExceeded {
                kind: LimitKind::DocumentSize,
                limit: self.document_bytes_max as u64,
                actual: size as u64,
                message: format!(
                    "the resulting document is {size} bytes, over the limit of {} bytes",
                    self.document_bytes_max
                ),
            });
        }
        Ok(())
    }
}

/// The length of a value's compact JSON form, without building the string.
pub fn serialized_len(v: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depths() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}]})), 4);
        assert_eq!(serialized_len(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#.len());
    }
}
