//! The one path from a command envelope to its outcome, shared by `POST /commands`, `/ws` and
//! Socket.IO: the envelope parsed with the caller's tenant, the command run by the engine, and
//! every failure turned into its problem. Each transport writes its own reply from the
//! outcome (a JSON body, a `result` frame, an acknowledgement).

use serde_json::Value;

use sourced_core::artifacts::permissions::Action;
use sourced_core::{Command, CommandKind, Principal, TenantId};
use sourced_engine::{CommandOutcome, Engine, EngineError};

use crate::problem::{Problem, from_engine};
use crate::request::Caller;

/// A command envelope that failed: the command id, if one was found, and the problem (boxed:
/// the error path is rare and the problem large).
pub(crate) type EnvelopeError = Box<(Option<Value>, Problem)>;

/// Who sends an envelope: the caller (its tenant, if it fixes one: an envelope may name its own
/// when none is fixed; its principal and permissions), and the `Idempotency-Key` the command id
/// came from, if any (a reused key is named as the client gave it, not as the command id
/// derived from it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sender<'a> {
    pub caller: &'a Caller,
    pub idempotency_key: Option<&'a str>,
}

/// The action `permissions.yaml` grants for a command: its kind, or a custom command's name.
pub(crate) fn action_of(cmd: &Command) -> Action {
    match cmd.kind {
        CommandKind::Create => Action::Create,
        CommandKind::Patch | CommandKind::MergePatch => Action::Patch,
        CommandKind::Replace => Action::Replace,
        CommandKind::Delete => Action::Delete,
        CommandKind::Logic | CommandKind::Orchestration => Action::Command(cmd.name.clone()),
    }
}

/// Runs a parsed command for `caller`: 403 unless its roles grant the command's action on its
/// type; the principal goes to the engine (CEL's `principal`, the events' metadata).
pub(crate) async fn run(
    engine: &Engine,
    cmd: Command,
    caller: &Caller,
) -> Result<Result<CommandOutcome, EngineError>, Problem> {
    crate::trace::record_command(&cmd.id);
    let timer = crate::metrics::CommandTimer::start(&engine.artifacts(), &cmd);
    let result = match caller.allow(&action_of(&cmd), &cmd.key.type_name) {
        Err(p) => Err(p),
        Ok(()) => {
            let principal = caller.principal().map(Principal::to_json);
            Ok(engine.execute(cmd, principal.as_ref()).await)
        }
    };
    timer.finish(&result);
    result
}

/// Runs one command envelope: its outcome, or the command id (when one was found) and the
/// problem.
pub(crate) async fn execute_envelope(
    engine: &Engine,
    envelope: Value,
    sender: Sender<'_>,
) -> Result<CommandOutcome, EnvelopeError> {
    let id = envelope.get("id").filter(|v| v.is_string()).cloned();
    if let Some(p) = envelope.get("tenant").and_then(Value::as_str).and_then(|t| sender.caller.refuse_other_tenant(t)) {
        return Err(Box::new((id, p)));
    }
    let fixed = sender.caller.named_tenant();
    let tenant = fixed.cloned().unwrap_or_else(TenantId::default_tenant);
    let defaults = sourced_engine::fresh::envelope_defaults(tenant, fixed.is_some());
    let cmd = match Command::from_envelope_value(envelope, defaults) {
        Ok(c) => c,
        Err(e) => return Err(Box::new((id, Problem::from(e)))),
    };
    let cmd_id = Value::from(cmd.id.to_string());
    // Its own span: on /ws and Socket.IO there is no request span around the command.
    let span = tracing::info_span!("command", command_id = %cmd.id);
    match tracing::Instrument::instrument(run(engine, cmd, sender.caller), span).await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(Box::new((Some(cmd_id), command_problem(e, sender, false)))),
        Err(p) => Err(Box::new((Some(cmd_id), p))),
    }
}

/// The problem of a command the engine refused. `precondition` says whether its expected
/// version came from an HTTP precondition header (a mismatch is then 412, else 409).
pub(crate) fn command_problem(e: EngineError, sender: Sender<'_>, precondition: bool) -> Problem {
    match (e, sender.idempotency_key) {
        (EngineError::IdempotencyMismatch { .. }, Some(key)) => Problem::idempotency_key_reused(key),
        (e, _) => from_engine(e, precondition),
    }
}
