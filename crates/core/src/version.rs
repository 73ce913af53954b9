//! Expected versions (SPEC §1): the optimistic-concurrency condition a command carries.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::ids::Version;

/// The condition on the stream's version under which a command may be appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ExpectedVersion {
    /// No condition.
    #[default]
    Any,
    /// The stream has no events (same as `Exact(0)`).
    NoStream,
    /// The stream has at least one event and the aggregate is not deleted.
    Exists,
    /// The stream is at exactly this version.
    Exact(Version),
}

/// What a store knows about a stream's head, enough to check an [`ExpectedVersion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
pub struct StreamHead {
    /// The number of events in the stream.
    pub version: Version,
    /// Whether the aggregate's last event deleted it.
    pub deleted: bool,
}

impl ExpectedVersion {
    /// Whether a stream at `head` satisfies this condition.
    pub fn matches(self, head: StreamHead) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => head.version == Version::ZERO,
            ExpectedVersion::Exists => head.version > Version::ZERO && !head.deleted,
            ExpectedVersion::Exact(v) => head.version == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::Exists => f.write_str("exists"),
            ExpectedVersion::Exact(v) => v.fmt(f),
        }
    }
}

impl Serialize for ExpectedVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpectedVersion::Exact(v) => s.serialize_u64(v.0),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for ExpectedVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ExpectedVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a non-negative integer, "any", "no_stream" or "exists""#)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ExpectedVersion::Exact(Version(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(|v| ExpectedVersion::Exact(Version(v)))
                    .map_err(|_| E::custom("version must not be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "any" => Ok(ExpectedVersion::Any),
                    "no_stream" => Ok(ExpectedVersion::NoStream),
                    "exists" => Ok(ExpectedVersion::Exists),
                    other => Err(E::custom(format!(
                        r#"unknown expected version "{other}": use an integer, "any", "no_stream" or "exists""#
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(v: u64, deleted: bool) -> StreamHead {
        StreamHead { version: Version(v), deleted }
    }

    #[test]
    fn matching_table() {
        // (expected, version, deleted, matches)
        let table = [
            (ExpectedVersion::Any, 0, false, true),
            (ExpectedVersion::Any, 5, true, true),
            (ExpectedVersion::NoStream, 0, false, true),
            (ExpectedVersion::NoStream, 1, false, false),
            (ExpectedVersion::Exists, 0, false, false),
            (ExpectedVersion::Exists, 3, false, true),
            (ExpectedVersion::Exists, 3, true, false),
            (ExpectedVersion::Exact(Version(3)), 3, false, true),
            (ExpectedVersion::Exact(Version(3)), 3, true, true),
            (ExpectedVersion::Exact(Version(0)), 0, false, true),
            (ExpectedVersion::Exact(Version(2)), 3, false, false),
        ];
        for (e, v, d, want) in table {
            assert_eq!(e.matches(head(v, d)), want, "{e} vs {v} deleted={d}");
        }
    }

    #[test]
    fn wire_forms() {
        for (text, want) in [
            ("3", ExpectedVersion::Exact(Version(3))),
            (r#""any""#, ExpectedVersion::Any),
            (r#""no_stream""#, ExpectedVersion::NoStream),
            (r#""exists""#, ExpectedVersion::Exists),
        ] {
            let got: ExpectedVersion = serde_json::from_str(text).unwrap();
            assert_eq!(got, want);
            assert_eq!(serde_json::to_string(&got).unwrap(), text);
        }
        for bad in ["-1", r#""latest""#, "1.5", "null"] {
            assert!(serde_json::from_str::<ExpectedVersion>(bad).is_err(), "{bad}");
        }
    }
}
