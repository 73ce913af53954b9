//! JSON Schema 2020-12 (SPEC §4.1): compiled once at load; validation returns every violation
//! with the JSON Pointer of the offending value.

use std::sync::Arc;

use serde_json::Value;

use crate::error::Violation;

/// A compiled schema and its source.
#[derive(Clone)]
pub struct Schema {
    source: Arc<Value>,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Schema").field(&self.source).finish()
    }
}

/// Most violations reported for one document.
pub const VIOLATIONS_MAX: usize = 100;

impl Schema {
    /// Compiles a schema (draft 2020-12 unless it names another with `$schema`); `format` is
    /// asserted. No remote references are fetched. The error is the JSON Pointer of the
    /// offending keyword inside the schema (empty for the whole) and a message.
    pub fn compile(source: &Value) -> Result<Schema, (String, String)> {
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(source)
            .map_err(|e| (e.instance_path().to_string(), format!("invalid JSON Schema: {e}")))?;
        Ok(Schema { source: Arc::new(source.clone()), validator: Arc::new(validator) })
    }

    /// The schema as written.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Every violation of `instance` (at most [`VIOLATIONS_MAX`]), each at its JSON Pointer
    /// prefixed with `prefix` (e.g. `/body` for a payload).
    pub fn violations(&self, instance: &Value, prefix: &str) -> Vec<Violation> {
        self.validator
            .iter_errors(instance)
            .take(VIOLATIONS_MAX)
            .map(|e| Violation::new(format!("{prefix}{}", e.instance_path()), e.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_every_violation_with_its_pointer() {
        let s = Schema::compile(&json!({
            "type": "object",
            "properties": {"total": {"type": "number", "minimum": 0}, "email": {"type": "string", "format": "email"}},
            "required": ["total"]
        }))
        .unwrap();
        assert!(s.violations(&json!({"total": 3}), "").is_empty());
        let v = s.violations(&json!({"total": -1, "email": "nope"}), "");
        let mut pointers: Vec<_> = v.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort();
        assert_eq!(pointers, ["/email", "/total"]);
        let v = s.violations(&json!({}), "/body");
        assert_eq!(v[0].pointer, "/body");
    }

    #[test]
    fn invalid_schemas_are_refused() {
        assert!(Schema::compile(&json!({"type": "nonsense"})).is_err());
        assert!(Schema::compile(&json!({"minimum": "ten"})).is_err());
    }
}
