//! Limits on what grows with client input (SPEC §8.3) that the core itself enforces.

use serde_json::Value;

use crate::error::{DomainError, LimitKind};

// Used by command.rs.
/// Longest command name accepted.
pub const COMMAND_NAME_LEN_MAX: usize = 128;

// Used by event.rs.
/// Longest event type name accepted.
pub const EVENT_TYPE_LEN_MAX: usize = 128;

// Used by ids.rs.
/// Longest tenant name accepted.
pub const TENANT_LEN_MAX: usize = 64;
/// Longest aggregate id accepted (SPEC §1).
pub const AGGREGATE_ID_LEN_MAX: usize = 128;
/// Longest aggregate type accepted (SPEC §1).
pub const TYPE_NAME_LEN_MAX: usize = 64;

// Used by json.rs.
/// Most violations one scan reports; the rest are counted in the last one's message.
pub const JSON_VIOLATIONS_MAX: usize = 20;

// Used by query.rs.
/// Most segments in a field path.
pub const PATH_SEGMENTS_MAX: usize = 8;
/// Longest segment of a field path, in bytes.
pub const SEGMENT_BYTES_MAX: usize = 64;
/// Most filters in one query.
pub const FILTERS_MAX: usize = 16;
/// Most values in one `in` filter.
pub const IN_VALUES_MAX: usize = 100;
/// Most sort keys in one query (the id tie-break not counted).
pub const SORT_KEYS_MAX: usize = 4;
/// Most fields in one projection.
pub const FIELDS_MAX: usize = 32;
/// Longest filter value, in bytes.
pub const VALUE_BYTES_MAX: usize = 1_024;

// Used by artifacts/expr.rs.
/// Longest expression accepted by default, in bytes.
pub const EXPR_LEN_MAX: usize = 4_096;

// Used by artifacts/lifecycle.rs.
/// Most states one lifecycle may define.
pub const STATES_MAX: usize = 256;

// Used by artifacts/mod.rs.
/// Most files one artifact set may hold.
pub const FILES_MAX: usize = 10_000;
/// Largest artifact file, in bytes.
pub const FILE_BYTES_MAX: usize = 1024 * 1024;
/// Most fields one type's `indexes.yaml` may name: each index costs every write.
pub const INDEXES_PER_TYPE_MAX: usize = 32;

// Used by artifacts/process.rs.
/// Most transitions one process may define.
pub const PROCESS_TRANSITIONS_MAX: usize = 256;
/// Most `follow` entries one process may define.
pub const PROCESS_FOLLOW_MAX: usize = 64;
/// Most commands one transition may issue.
pub const PROCESS_COMMANDS_MAX: usize = 16;
/// Most `data` keys one process or transition may set.
pub const PROCESS_DATA_KEYS_MAX: usize = 64;
/// Longest timer (`after`), in seconds: 366 days.
pub const PROCESS_TIMER_SECS_MAX: u64 = 366 * 24 * 3600;

// Used by artifacts/schema.rs.
/// Most violations reported for one document.
pub const DOCUMENT_VIOLATIONS_MAX: usize = 100;

// Used by principal.rs.
/// Longest principal id accepted (a JWT `sub` or a keys file `principal`), in bytes.
pub const PRINCIPAL_ID_LEN_MAX: usize = 256;
/// Most tenants one principal may be allowed.
pub const PRINCIPAL_TENANTS_MAX: usize = 64;
/// Most roles one principal may carry.
pub const PRINCIPAL_ROLES_MAX: usize = 64;
/// Longest role name accepted, in bytes.
pub const ROLE_LEN_MAX: usize = 64;

// Used by artifacts/permissions.rs.
/// Most roles one permissions file may define.
pub const ROLES_MAX: usize = 256;
/// Most grants one role may hold.
pub const GRANTS_PER_ROLE_MAX: usize = 256;

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
            let message = format!("JSON nesting depth {depth} exceeds the limit of {}", self.json_depth_max);
            return Err(DomainError::over_limit(LimitKind::JsonDepth, self.json_depth_max, depth, message));
        }
        Ok(())
    }

    /// Refuses a document whose serialized form is larger than [`Limits::document_bytes_max`].
    pub fn check_document_size(&self, doc: &Value) -> Result<(), DomainError> {
        let size = serialized_len(doc);
        if size > self.document_bytes_max {
            let max = self.document_bytes_max;
            let message = format!("the resulting document is {size} bytes, over the limit of {max} bytes");
            return Err(DomainError::over_limit(LimitKind::DocumentSize, max, size, message));
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
