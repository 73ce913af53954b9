//! Newtypes for the names and numbers of SPEC §1: tenants, aggregate types and ids, versions,
//! positions, command and event ids. Each validates on construction.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

use crate::violation::Violation;

/// Names that the service's own routes use; refused as aggregate types (SPEC §1).
pub const RESERVED_TYPE_NAMES: &[&str] = &[
    "events",
    "commands",
    "ws",
    "schemas",
    "healthz",
    "readyz",
    "metrics",
    "openapi.json",
    "socket.io",
    "admin",
    "processes",
];

pub use crate::limits::AGGREGATE_ID_LEN_MAX;
pub use crate::limits::TENANT_LEN_MAX;
pub use crate::limits::TYPE_NAME_LEN_MAX;

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).map_err(|v| serde::de::Error::custom(v.message))
            }
        }
    };
}

string_newtype!(
    /// An isolated namespace (SPEC §1): `[A-Za-z0-9._-]{1,64}`.
    TenantId
);
string_newtype!(
    /// An aggregate type, `targetName` on the wire: `[a-z][a-z0-9_-]{0,63}`, not reserved.
    TypeName
);
string_newtype!(
    /// A client-chosen or generated aggregate id: `[A-Za-z0-9._~-]{1,128}`.
    AggregateId
);

impl TenantId {
    /// Validates a tenant name.
    pub fn parse(s: &str) -> Result<Self, Violation> {
        let ok = !s.is_empty()
            && s.len() <= TENANT_LEN_MAX
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && s != "."
            && s != "..";
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Violation::new(
                "/tenant",
                format!("tenant must match [A-Za-z0-9._-]{{1,{TENANT_LEN_MAX}}} and not be '.' or '..'"),
            ))
        }
    }

    /// The tenant used when a request names none.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

impl TypeName {
    /// Validates an aggregate type name.
    pub fn parse(s: &str) -> Result<Self, Violation> {
        let bytes = s.as_bytes();
        let shape = !bytes.is_empty()
            && bytes.len() <= TYPE_NAME_LEN_MAX
            && bytes[0].is_ascii_lowercase()
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(b));
        if !shape {
            return Err(Violation::new("/targetName", "aggregate type must match [a-z][a-z0-9_-]{0,63}"));
        }
        if RESERVED_TYPE_NAMES.contains(&s) {
            return Err(Violation::new("/targetName", format!("'{s}' is reserved by the service's own routes")));
        }
        Ok(Self(s.to_owned()))
    }
}

impl AggregateId {
    /// Validates a client-chosen aggregate id.
    pub fn parse(s: &str) -> Result<Self, Violation> {
        let ok = !s.is_empty()
            && s.len() <= AGGREGATE_ID_LEN_MAX
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
        // `.` and `..` are path segments that URLs resolve away (RFC 3986 §5.2.4): such an
        // aggregate could only be reached as `%2e%2e`.
        if s == "." || s == ".." {
            return Err(Violation::new("/targetId", "'.' and '..' cannot be aggregate ids (URLs resolve them away)"));
        }
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Violation::new(
                "/targetId",
                format!("aggregate id must match [A-Za-z0-9._~-]{{1,{AGGREGATE_ID_LEN_MAX}}}"),
            ))
        }
    }

    /// The id of a UUID, lower case: the form of the ids the service generates (a UUID v7,
    /// so ids sort by time; made by the engine, as the core reads no clock).
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid.to_string())
    }
}

/// The number of events in a stream (SPEC §1). A new aggregate is at version 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    /// The version of a stream with no events.
    pub const ZERO: Version = Version(0);

    /// The version after one more event.
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A global, strictly increasing, gap-free number given to every event at commit (SPEC §7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Position(pub u64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A command id: the idempotency key of SPEC §2.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub Uuid);

impl CommandId {
    /// A command id derived from an HTTP `Idempotency-Key` of any shape: the key itself when
    /// it is a UUID, else a name-based UUID (v5) of the key, so equal keys give equal ids.
    pub fn from_idempotency_key(key: &str) -> Self {
        match Uuid::parse_str(key) {
            Ok(u) => Self(u),
            Err(_) => Self(Uuid::new_v5(&IDEMPOTENCY_KEY_NAMESPACE, key.as_bytes())),
        }
    }

    /// The id of the `index`-th event this command emits (SPEC §2.4: deterministic).
    pub fn event_id(&self, index: usize) -> EventId {
        EventId(Uuid::new_v5(&self.0, index.to_string().as_bytes()))
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Namespace for name-based command ids made from non-UUID idempotency keys.
const IDEMPOTENCY_KEY_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_9d6e_2b1a_4c3d_8e7f_6a5b_4c3d_2e1f);

/// An event id, derived from its command id and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The key of one stream: (tenant, type, id).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The owning tenant.
    pub tenant: TenantId,
    /// The aggregate type.
    pub type_name: TypeName,
    /// The aggregate id.
    pub id: AggregateId,
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.type_name, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        for ok in ["order", "a", "order_line-2", &"a".repeat(64)] {
            assert!(TypeName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Order", "1order", "events", "ws", "a.b", &"a".repeat(65)] {
            assert!(TypeName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aggregate_ids() {
        for ok in ["a", "A.b_c~d-1", &"x".repeat(128)] {
            assert!(AggregateId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(AggregateId::parse(bad).is_err(), "{bad}");
        }
        let g = AggregateId::from_uuid(Uuid::from_u128(0xABCD_EF01_2345_6789_ABCD_EF01_2345_6789));
        assert!(AggregateId::parse(g.as_str()).is_ok());
        assert_eq!(g.as_str(), g.as_str().to_lowercase());
    }

    #[test]
    fn event_ids_are_deterministic() {
        let c = CommandId(Uuid::from_u128(42));
        assert_eq!(c.event_id(0), c.event_id(0));
        assert_ne!(c.event_id(0), c.event_id(1));
        assert_eq!(CommandId::from_idempotency_key("k-1"), CommandId::from_idempotency_key("k-1"));
    }
}
