//! Timestamps on the wire: RFC 3339, UTC, microsecond precision, `Z` suffix.
//! Stored as integer microseconds since the Unix epoch.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// Formats a timestamp for the wire.
pub fn format(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses an RFC 3339 timestamp with any offset into UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// Microseconds since the Unix epoch, the stored form.
pub fn to_micros(t: &DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`]; out-of-range values clamp to the epoch.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Truncates to the stored precision, so a value round-trips through the store unchanged.
pub fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    from_micros(to_micros(&t))
}

/// `serde(with)` serializer.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(t))
}

/// `serde(with)` deserializer.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 timestamp: {s}")))
}
