//! Conversions between Rust values and SQL columns, the same for both backends: JSON as text,
//! unsigned counts as SQL's signed 64-bit integers, and the error of a row that does not decode.

use serde_json::Value;

use crate::StoreError;

/// A JSON value as the text the store keeps.
pub(crate) fn to_json(value: &Value) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::InvalidRequest(format!("a JSON value cannot be stored: {e}")))
}

/// A stored JSON text of `column`.
pub(crate) fn from_json(text: &str, column: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt_row(column, e))
}

/// A number to write: refused beyond what a column holds.
pub(crate) fn to_sql_int(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::InvalidRequest(format!("{n} is beyond what the store can hold")))
}

/// For bounds of reads: nothing stored is above `i64::MAX`.
pub(crate) fn clamp_sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored number, which is never negative.
pub(crate) fn from_sql_int(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("a negative {what}: {n}")))
}

/// The error of a `column` whose value does not decode.
pub(crate) fn corrupt_row(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column} does not decode: {e}"))
}
