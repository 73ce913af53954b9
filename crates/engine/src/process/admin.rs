//! Operators' steps on an instance (SPEC §4.5): retry, skip and cancel
//! (`POST /processes/{name}/{key}/…`). Each is one append to the instance's stream, made with
//! the version it was decided on (a runner's step in between is a conflict, nothing is lost),
//! carrying the caller's principal in its metadata and the instance's new wake-up.

use serde_json::{Value, json};
use sourced_core::artifacts::instance::{self, Instance, Intervention, WrongStatus};
use sourced_core::artifacts::process;
use sourced_core::{AggregateId, ExpectedVersion, NewEvent, StreamKey, TenantId, Version};
use sourced_store::{AppendOutcome, AppendRequest, CommandWrite, DocumentWrite, StoreError, WakeWrite};

use super::InstanceView;
use crate::Engine;

/// Why an intervention was not recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InterventionError {
    /// The process is not loaded, or has no instance under the key.
    #[error("{0}")]
    NotFound(String),
    /// The instance's status does not allow it.
    #[error(transparent)]
    WrongStatus(#[from] WrongStatus),
    /// The instance moved between the read and the append (its runner took a step).
    #[error("the instance moved on (now at version {actual}); read it and decide again")]
    Conflict {
        /// The version it was decided on.
        expected: Version,
        /// The version found.
        actual: Version,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored instance could not be read or written.
    #[error("instance {key}: {message}")]
    Corrupt {
        /// The instance's stream.
        key: StreamKey,
        /// What is wrong.
        message: String,
    },
}

impl Engine {
    /// Records `action` on the instance of process `name` under `key` in `tenant`, by
    /// `principal` (`Principal::to_json`, none with authentication off), and returns the
    /// instance as it now is. The runners are not told: the caller nudges them.
    pub async fn intervene(
        &self,
        tenant: &TenantId,
        name: &str,
        key: &AggregateId,
        action: Intervention,
        principal: Option<&Value>,
    ) -> Result<InstanceView, InterventionError> {
        let missing = || InterventionError::NotFound(format!("no instance '{key}' of process '{name}'"));
        let set = self.artifacts();
        let (Some(p), Some(type_name)) = (set.processes().get(name), process::instance_type(name)) else {
            return Err(InterventionError::NotFound(format!("no process '{name}'")));
        };
        let k = StreamKey { tenant: tenant.clone(), type_name, id: key.clone() };
        let row = self.store.get_document(&k).await?.ok_or_else(missing)?;
        let corrupt = |message: String| InterventionError::Corrupt { key: k.clone(), message };
        let inst: Instance = serde_json::from_value(row.state.clone()).map_err(|e| corrupt(e.to_string()))?;
        let now = self.clock.now();
        let next = instance::intervene(p, &inst, action, now)?;
        let state = serde_json::to_value(&next).map_err(|e| corrupt(e.to_string()))?;
        let due = next.due(now).map_err(|e| corrupt(e.0))?;
        let id = crate::fresh::command_id();
        let event_type = action.event_type();
        let request = AppendRequest {
            key: k.clone(),
            expected: ExpectedVersion::Exact(row.version),
            events: vec![NewEvent {
                id: id.event_id(0),
                event_type: event_type.to_owned(),
                data: sourced_core::patch::to_value(&sourced_core::patch::diff(&row.state, &state)),
                metadata: json!({
                    "commandId": id, "commandName": event_type, "process": name, "step": next.steps,
                    "principal": principal,
                }),
            }],
            timestamp: now,
            document: DocumentWrite { state, deleted: false },
            command: CommandWrite {
                id,
                fingerprint: format!("process {name} {key} {} {}", next.steps, action.as_str()),
                extra: json!({"warnings": []}),
            },
            snapshot: None,
            checkpoint: None,
            wake: Some(WakeWrite { process: name.to_owned(), due }),
        };
        match self.store.append(request).await {
            Ok(AppendOutcome::Appended(_) | AppendOutcome::Duplicate(_)) => {}
            Err(StoreError::Conflict { actual, .. }) => {
                return Err(InterventionError::Conflict { expected: row.version, actual: actual.version });
            }
            Err(e) => return Err(e.into()),
        }
        self.process_instance(tenant, name, key).await?.ok_or_else(missing)
    }
}
