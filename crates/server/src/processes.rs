//! The process managers' read API (SPEC §4.5): `GET /processes` (each process of the set with
//! its instances counted in the caller's tenant and its lag) and `GET /processes/{name}/{key}`
//! (one instance: its state, data, timers, pending commands, the problem that parked it, and
//! its latest steps). The instances are also aggregates, `process-<name>/<key>`, readable
//! through the generic routes.

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sourced_core::artifacts::permissions::Action;
use sourced_core::artifacts::process;

use crate::problem::Problem;
use crate::request::{Caller, aggregate_id, query_pairs};
use crate::state::{AppState, Result};

/// `GET /processes`: the processes the caller may read the instances of.
pub(crate) async fn list(State(s): State<AppState>, caller: Caller, RawQuery(q): RawQuery) -> Result<Response> {
    query_pairs(&q, &[])?;
    let mut items = Vec::new();
    for summary in s.engine.process_summaries(&caller.tenant()).await? {
        let Some(t) = process::instance_type(&summary.name) else { continue };
        if caller.allow(&Action::Read, &t).is_ok() {
            items.push(json!({
                "name": summary.name,
                "instanceType": t.as_str(),
                "running": summary.running,
                "completed": summary.completed,
                "parked": summary.parked,
                "checkpoint": summary.checkpoint,
                "lag": summary.lag,
            }));
        }
    }
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// `GET /processes/{name}/{key}`: one instance, 404 when the process is not loaded or the
/// instance does not exist.
pub(crate) async fn instance(
    State(s): State<AppState>,
    caller: Caller,
    Path((name, key)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    query_pairs(&q, &[])?;
    let Some(t) = process::instance_type(&name).filter(|_| process::valid_name(&name)) else {
        return Err(Problem::not_found(format!("no process '{name}'")));
    };
    caller.allow(&Action::Read, &t)?;
    let id = aggregate_id(&key)?;
    let Some(view) = s.engine.process_instance(&caller.tenant(), &name, &id).await? else {
        return Err(Problem::not_found(format!("no instance '{key}' of process '{name}'")));
    };
    let mut body = match view.row.state {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let steps: Vec<Value> = view
        .steps
        .iter()
        .map(|e| {
            json!({
                "version": e.version.0,
                "position": e.position.0,
                "type": e.event_type,
                "timestamp": sourced_core::timestamp::format(&e.timestamp),
            })
        })
        .collect();
    body.insert("history".into(), Value::Array(steps));
    body.insert(
        "_meta".into(),
        json!({
            "version": view.row.version.0,
            "createdAt": sourced_core::timestamp::format(&view.row.created_at),
            "updatedAt": sourced_core::timestamp::format(&view.row.updated_at),
        }),
    );
    Ok(axum::Json(Value::Object(body)).into_response())
}
