//! The one path from a command envelope to its outcome, shared by `POST /commands`, `/ws` and
//! Socket.IO: the envelope parsed with the caller's tenant, the command run by the engine, and
//! every failure turned into its problem. Each transport writes its own reply from the
//! outcome (a JSON body, a `result` frame, an acknowledgement).

use serde_json::Value;

use sourced_core::{Command, TenantId};
use sourced_engine::{CommandOutcome, Engine, EngineError};

use crate::problem::{Problem, from_engine};

/// A command envelope that failed: the command id, if one was found, and the problem (boxed:
/// the error path is rare and the problem large).
pub(crate) type EnvelopeError = Box<(Option<Value>, Problem)>;

/// Who sends an envelope: the tenant the transport fixes, if any (an envelope may name its own
/// when none is fixed), and the `Idempotency-Key` the command id came from, if any (a reused
/// key is named as the client gave it, not as the command id derived from it).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sender<'a> {
    pub tenant: Option<&'a TenantId>,
    pub idempotency_key: Option<&'a str>,
}

/// Runs one command envelope: its outcome, or the command id (when one was found) and the
/// problem.
pub(crate) async fn execute_envelope(
    engine: &Engine,
    envelope: Value,
    sender: Sender<'_>,
) -> Result<CommandOutcome, EnvelopeError> {
    let id = envelope.get("id").filter(|v| v.is_string()).cloned();
    let tenant = sender.tenant.cloned().unwrap_or_else(TenantId::default_tenant);
    let defaults = sourced_engine::fresh::envelope_defaults(tenant, sender.tenant.is_some());
    let cmd = match Command::from_envelope_value(envelope, defaults) {
        Ok(c) => c,
        Err(e) => return Err(Box::new((id, Problem::from(e)))),
    };
    let cmd_id = Value::from(cmd.id.to_string());
    engine.execute(cmd, None).await.map_err(|e| Box::new((Some(cmd_id), command_problem(e, sender, false))))
}

/// The problem of a command the engine refused. `precondition` says whether its expected
/// version came from an HTTP precondition header (a mismatch is then 412, else 409).
pub(crate) fn command_problem(e: EngineError, sender: Sender<'_>, precondition: bool) -> Problem {
    match (e, sender.idempotency_key) {
        (EngineError::IdempotencyMismatch { .. }, Some(key)) => Problem::idempotency_key_reused(key),
        (e, _) => from_engine(e, precondition),
    }
}
