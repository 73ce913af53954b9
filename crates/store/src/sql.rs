//! Conversions between Rust values and SQL columns, the same for both backends: JSON as text,
//! unsigned counts as SQL's signed 64-bit integers, and the error of a row that does not decode.

use serde_json::Value;

use sourced_core::{AggregateId, StreamKey, TenantId, TypeName};

use crate::StoreError;

/// A JSON value as the text the store keeps.
pub(crate) fn to_json(value: &Value) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::invalid_request(format!("a JSON value cannot be stored: {e}")).with_source(e))
}

/// A stored JSON text of `column`.
pub(crate) fn from_json(text: &str, column: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt_row(column, e))
}

/// A number to write: refused beyond what a column holds.
pub(crate) fn to_sql_int(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::invalid_request(format!("{n} is beyond what the store can hold")))
}

/// For bounds of reads: nothing stored is above `i64::MAX`.
pub(crate) fn clamp_sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored number, which is never negative.
pub(crate) fn from_sql_int(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::corrupt(format!("a negative {what}: {n}")))
}

/// The error of a `column` whose value does not decode.
pub(crate) fn corrupt_row(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(format!("{column} does not decode: {e}"))
}

/// Which events a read selects, and so where each event's stream comes from: the query's key,
/// or the row's own key columns.
pub(crate) enum EventScope<'a> {
    /// One stream (`read_stream`): the key is the query's.
    Stream(&'a StreamKey),
    /// One tenant's feed (`read_all`): type and id are the row's.
    Tenant(&'a TenantId),
    /// Every tenant's feed (`read_global`): tenant, type and id are the row's.
    Global,
}

impl EventScope<'_> {
    /// The key columns a row of this scope carries after the event's own, as SQL (each with a
    /// leading comma), and how many they are.
    pub(crate) fn key_columns(&self) -> (&'static str, usize) {
        match self {
            EventScope::Stream(_) => ("", 0),
            EventScope::Tenant(_) => (", type, agg_id", 2),
            EventScope::Global => (", type, agg_id, tenant", 3),
        }
    }

    /// The event's stream, from the scope and the row's `key` columns (those of
    /// [`EventScope::key_columns`], in order) of `table`.
    pub(crate) fn stream(&self, key: &[String], table: &str) -> Result<StreamKey, StoreError> {
        let column = |i: usize| key.get(i).map_or("", String::as_str);
        let type_name = || TypeName::parse(column(0)).map_err(|v| corrupt_row(&format!("{table}.type"), v.message));
        let id = || AggregateId::parse(column(1)).map_err(|v| corrupt_row(&format!("{table}.agg_id"), v.message));
        Ok(match self {
            EventScope::Stream(key) => (*key).clone(),
            EventScope::Tenant(tenant) => StreamKey { tenant: (*tenant).clone(), type_name: type_name()?, id: id()? },
            EventScope::Global => StreamKey {
                type_name: type_name()?,
                id: id()?,
                tenant: TenantId::parse(column(2)).map_err(|v| corrupt_row(&format!("{table}.tenant"), v.message))?,
            },
        })
    }
}
