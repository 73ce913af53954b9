//! The ids the service generates: UUID v7 (time-ordered, so ids made together sort and are
//! stored near each other), made here because the core reads no clock.

use sourced_core::{AggregateId, CommandId, EnvelopeDefaults, TenantId};
use uuid::Uuid;

/// A fresh aggregate id, for a create that names none.
pub fn aggregate_id() -> AggregateId {
    AggregateId::from_uuid(Uuid::now_v7())
}

/// A fresh command id, for an envelope that names none.
pub fn command_id() -> CommandId {
    CommandId(Uuid::now_v7())
}

/// What a transport passes to [`sourced_core::Command::from_envelope_value`]: its tenant and
/// fresh ids for whatever the envelope leaves out.
pub fn envelope_defaults(tenant: TenantId, tenant_fixed: bool) -> EnvelopeDefaults {
    EnvelopeDefaults { tenant, tenant_fixed, generated_id: aggregate_id(), generated_command_id: command_id() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let (a, b) = (super::aggregate_id(), super::aggregate_id());
        assert!(sourced_core::AggregateId::parse(a.as_str()).is_ok());
        assert_ne!(a, b);
        assert_ne!(super::command_id(), super::command_id());
    }
}
