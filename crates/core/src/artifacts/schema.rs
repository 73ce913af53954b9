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

/// The meta-schema validator of the draft `schema` names, when it names one the library
/// bundles (or none: then 2020-12, as [`Schema::compile`] builds it). `validator_for` panics on
/// a `$schema` it does not know; such a schema is left to the build, which refuses it clearly.
fn meta_validator(schema: &Value) -> Option<jsonschema::meta::MetaValidator<'static>> {
    const BUNDLED: &[&str] = &[
        "http://json-schema.org/draft-04/schema",
        "http://json-schema.org/draft-06/schema",
        "http://json-schema.org/draft-07/schema",
        "https://json-schema.org/draft/2019-09/schema",
        "https://json-schema.org/draft/2020-12/schema",
    ];
    match schema.get("$schema") {
        None => Some(jsonschema::draft202012::meta::validator()),
        Some(Value::String(uri)) if BUNDLED.contains(&uri.trim_end_matches('#')) => {
            jsonschema::meta::validator_for(schema).ok()
        }
        Some(_) => None,
    }
}

pub use crate::limits::DOCUMENT_VIOLATIONS_MAX as VIOLATIONS_MAX;

impl Schema {
    /// Compiles a schema (draft 2020-12 unless it names another with `$schema`); `format` is
    /// asserted. No remote references are fetched. The error is the JSON Pointer of the
    /// offending keyword inside the schema (empty for the whole) and a message, for every
    /// keyword the draft's meta-schema refuses (at most [`VIOLATIONS_MAX`]).
    pub fn compile(source: &Value) -> Result<Schema, Vec<(String, String)>> {
        let problem =
            |e: &jsonschema::ValidationError<'_>| (e.instance_path().to_string(), format!("invalid JSON Schema: {e}"));
        // Building stops at the first bad keyword; the meta-schema lists them all.
        if let Some(meta) = meta_validator(source) {
            let all: Vec<_> = meta.iter_errors(source).take(VIOLATIONS_MAX).map(|e| problem(&e)).collect();
            if !all.is_empty() {
                return Err(all);
            }
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(source)
            .map_err(|e| vec![problem(&e)])?;
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
        // Every bad keyword, not only the first the builder meets.
        let bad = json!({
            "type": "strin", "minimum": "x", "required": 5, "properties": {"a": {"type": 3}},
            "maxLength": -1, "enum": 1, "pattern": 7
        });
        let all = Schema::compile(&bad).err().unwrap();
        assert!(all.len() >= 7, "{all:?}");
        // A meta-schema the library does not bundle must not panic the meta check.
        let strange = json!({"$schema": "https://example.com/my-meta", "type": "object"});
        let _ = Schema::compile(&strange);
        assert!(Schema::compile(&json!({"minimum": "ten"})).is_err());
    }
}
