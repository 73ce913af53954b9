//! The process managers' API (SPEC §4.5): `GET /processes` (each process of the set with its
//! instances counted in the caller's tenant and its lag), `GET /processes/{name}` (its
//! instances, filtered by state and status, paged), `GET /processes/{name}/{key}` (one
//! instance: its state, data, timers, pending commands, the problem that parked it, and its
//! latest steps), and the operators' steps `POST /processes/{name}/{key}/retry`, `/skip` and
//! `/cancel` (the `admin` action). The instances are also aggregates, `process-<name>/<key>`,
//! readable through the generic routes.

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sourced_core::artifacts::instance::{Intervention, Status};
use sourced_core::artifacts::permissions::Action;
use sourced_core::artifacts::process;
use sourced_core::query::{Field, FieldPath, Filter};
use sourced_core::{Principal, TypeName};
use sourced_engine::process::InstanceView;
use sourced_store::{DocumentRow, ListQuery};

use crate::http::{cursor_json, decode_cursor, encode_cursor, list_cursor};
use crate::problem::Problem;
use crate::request::{Caller, aggregate_id, page_limit, param, query_pairs};
use crate::state::{AppState, Result};

/// The statuses `?status=` takes.
const STATUSES: [Status; 4] = [Status::Running, Status::Parked, Status::Completed, Status::Cancelled];

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
                "cancelled": summary.cancelled,
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
    let t = instance_type(&name)?;
    caller.allow(&Action::Read, &t)?;
    let id = aggregate_id(&key)?;
    let Some(view) = s.engine.process_instance(&caller.tenant(), &name, &id).await? else {
        return Err(Problem::not_found(format!("no instance '{key}' of process '{name}'")));
    };
    Ok(axum::Json(instance_body(view)).into_response())
}

/// The aggregate type of process `name`'s instances; 404 for a name no process can have.
fn instance_type(name: &str) -> Result<TypeName> {
    process::instance_type(name)
        .filter(|_| process::valid_name(name))
        .ok_or_else(|| Problem::not_found(format!("no process '{name}'")))
}

/// An instance's document with its `_meta` (version, times).
fn row_body(row: DocumentRow) -> serde_json::Map<String, Value> {
    let mut body = match row.state {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    body.insert(
        "_meta".into(),
        json!({
            "version": row.version.0,
            "createdAt": sourced_core::timestamp::format(&row.created_at),
            "updatedAt": sourced_core::timestamp::format(&row.updated_at),
        }),
    );
    body
}

/// What `GET /processes/{name}/{key}` and the operators' steps answer: the instance and its
/// latest steps.
fn instance_body(view: InstanceView) -> Value {
    let mut body = row_body(view.row);
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
    Value::Object(body)
}

/// `GET /processes/{name}?state=…&status=…&limit=…&cursor=…`: the process's instances in the
/// caller's tenant, by key, paged as `GET /{type}` is. 404 when the process is not loaded.
pub(crate) async fn instances(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let pairs = query_pairs(&q, &["state", "status", "limit", "cursor"])?;
    let t = instance_type(&name)?;
    caller.allow(&Action::Read, &t)?;
    if !s.engine.artifacts().processes().contains_key(&name) {
        return Err(Problem::not_found(format!("no process '{name}'")));
    }
    let mut list = ListQuery::new(caller.tenant(), t, page_limit(&pairs, &s.http)?);
    if let Some(status) = param(&pairs, "status") {
        if !STATUSES.iter().any(|s| s.as_str() == status) {
            let known: Vec<&str> = STATUSES.iter().map(|s| s.as_str()).collect();
            return Err(Problem::bad_request(format!("status must be one of {}", known.join(", ")), vec![]));
        }
        list.filters.push(field_is("status", status));
    }
    if let Some(state) = param(&pairs, "state") {
        // A NUL could not be bound (PostgreSQL), and no state holds one.
        if state.contains('\0') {
            return Err(Problem::bad_request("a state holds no U+0000", vec![]));
        }
        list.filters.push(field_is("state", state));
    }
    if let Some(c) = param(&pairs, "cursor") {
        list.after = Some(list_cursor(&decode_cursor("process-instances", c)?, "")?);
    }
    let rows = s.engine.list_documents(&list).await?;
    let next = match rows.last() {
        Some(last) if rows.len() == list.limit => {
            Some(encode_cursor("process-instances", cursor_json(&list.cursor_after(last), "")))
        }
        _ => None,
    };
    let items: Vec<Value> = rows.into_iter().map(|r| Value::Object(row_body(r))).collect();
    Ok(axum::Json(json!({"items": items, "next": next})).into_response())
}

fn field_is(field: &str, value: &str) -> Filter {
    let field = Field::Doc(FieldPath::parse(field).expect("a valid field path"));
    Filter::In { field, values: vec![Value::from(value)] }
}

/// The path and query of an operator's step.
type StepRequest = (Path<(String, String)>, RawQuery);

/// `POST /processes/{name}/{key}/retry`: a parked instance tries its failed step again now.
pub(crate) async fn retry(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    intervene(s, caller, (Path(p), RawQuery(q)), Intervention::Retry).await
}

/// `POST /processes/{name}/{key}/skip`: a parked instance drops its failed step and goes on.
pub(crate) async fn skip(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    intervene(s, caller, (Path(p), RawQuery(q)), Intervention::Skip).await
}

/// `POST /processes/{name}/{key}/cancel`: a running or parked instance ends, cancelled.
pub(crate) async fn cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(p): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    intervene(s, caller, (Path(p), RawQuery(q)), Intervention::Cancel).await
}

/// An operator's step on an instance, recorded on its stream with the caller's principal; the
/// runners are nudged. 403 without the `admin` action; 404 for an unloaded process or no
/// instance; 409 when the instance's status does not allow it (`process-not-parked`,
/// `process-ended`) or it moved meanwhile (`version-conflict`).
async fn intervene(
    s: AppState,
    caller: Caller,
    (Path((name, key)), RawQuery(q)): StepRequest,
    action: Intervention,
) -> Result<Response> {
    query_pairs(&q, &[])?;
    instance_type(&name)?;
    caller.allow_admin()?;
    let id = aggregate_id(&key)?;
    let principal = caller.principal().map(Principal::to_json);
    let view = s
        .engine
        .intervene(&caller.tenant(), &name, &id, action, principal.as_ref())
        .await
        .map_err(Problem::from_intervention)?;
    s.runners.nudge();
    Ok(axum::Json(instance_body(view)).into_response())
}
