//! Reading PostgreSQL rows: event reads, rows to events, read-model rows and command records,
//! parameters, and PostgreSQL's errors as store errors.

use super::*;

/// The events after `after`, across tenants, in position order, at most `limit`.
pub(super) async fn read_global(
    client: &ClientWrapper,
    after: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let Some(limit) = crate::read_limit(limit) else { return Ok(Vec::new()) };
    let events = select_events(
        client,
        &EventScope::Global,
        "position > $1 ORDER BY position LIMIT $2",
        &[&clamp_sql_int(after.0), &(limit as i64)],
    )
    .await?;
    crate::check_feed_read(after, &events)?;
    Ok(events)
}

/// The columns of an event of its own, before any key columns (see [`EventScope`]).
pub(super) const EVENT_COLUMNS: &str = "position, version, event_id, event_type, data::text, metadata::text, ts";

/// The events of `scope` meeting `condition` (the SQL after `WHERE`, with its order and limit).
pub(super) async fn select_events(
    client: &ClientWrapper,
    scope: &EventScope<'_>,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<RecordedEvent>, StoreError> {
    let (key_columns, key_count) = scope.key_columns();
    let stmt = client
        .prepare_cached(&format!("SELECT {EVENT_COLUMNS}{key_columns} FROM sourced_events WHERE {condition}"))
        .await
        .map_err(pg_err)?;
    let rows = client.query(&stmt, params).await.map_err(pg_err)?;
    rows.iter().map(|r| decode_event(r, scope, key_count)).collect()
}

/// An event from a row of [`EVENT_COLUMNS`] and then `key_count` key columns of `scope`.
pub(super) fn decode_event(r: &Row, scope: &EventScope<'_>, key_count: usize) -> Result<RecordedEvent, StoreError> {
    let key = (7..7 + key_count).map(|i| r.try_get(i)).collect::<Result<Vec<String>, _>>().map_err(pg_err)?;
    let StreamKey { tenant, type_name, id } = scope.stream(&key, "sourced_events")?;
    let position: i64 = r.try_get(0).map_err(pg_err)?;
    let version: i64 = r.try_get(1).map_err(pg_err)?;
    let data: String = r.try_get(4).map_err(pg_err)?;
    let metadata: String = r.try_get(5).map_err(pg_err)?;
    Ok(RecordedEvent {
        id: EventId(r.try_get(2).map_err(pg_err)?),
        position: Position(from_sql_int(position, "position")?),
        tenant,
        target_name: type_name,
        target_id: id,
        version: Version(from_sql_int(version, "version")?),
        event_type: r.try_get(3).map_err(pg_err)?,
        data: from_json(&data, "sourced_events.data")?,
        metadata: from_json(&metadata, "sourced_events.metadata")?,
        timestamp: r.try_get(6).map_err(pg_err)?,
    })
}

/// A read-model row from: agg_id, version, state, deleted, created_at, updated_at.
pub(super) fn decode_document(r: &Row, tenant: &TenantId, type_name: &TypeName) -> Result<DocumentRow, StoreError> {
    decode_document_text(r, tenant, type_name)?.parse()
}

pub(super) fn decode_document_text(
    r: &Row,
    tenant: &TenantId,
    type_name: &TypeName,
) -> Result<DocumentText, StoreError> {
    let agg_id: String = r.try_get(0).map_err(pg_err)?;
    let id = AggregateId::parse(&agg_id).map_err(|v| corrupt_row("sourced_documents.agg_id", v.message))?;
    let version = Version(from_sql_int(r.try_get(1).map_err(pg_err)?, "version")?);
    if version == Version::ZERO {
        return Err(StoreError::corrupt(format!("{tenant}/{type_name}/{id}: a read-model row at version 0")));
    }
    Ok(DocumentText {
        key: StreamKey { tenant: tenant.clone(), type_name: type_name.clone(), id },
        version,
        state_json: r.try_get(2).map_err(pg_err)?,
        deleted: r.try_get(3).map_err(pg_err)?,
        created_at: r.try_get(4).map_err(pg_err)?,
        updated_at: r.try_get(5).map_err(pg_err)?,
    })
}

/// A command record from: tenant, command_id, fingerprint, type, agg_id, first_version,
/// last_version, extra.
pub(super) fn decode_command(r: &Row) -> Result<CommandRecord, StoreError> {
    let tenant: String = r.try_get(0).map_err(pg_err)?;
    let id = CommandId(r.try_get(1).map_err(pg_err)?);
    let type_name: String = r.try_get(3).map_err(pg_err)?;
    let agg_id: String = r.try_get(4).map_err(pg_err)?;
    let first_version = Version(from_sql_int(r.try_get(5).map_err(pg_err)?, "first_version")?);
    let last_version = Version(from_sql_int(r.try_get(6).map_err(pg_err)?, "last_version")?);
    let extra: String = r.try_get(7).map_err(pg_err)?;
    if first_version == Version::ZERO || last_version < first_version {
        return Err(StoreError::corrupt(format!(
            "command {id} of tenant {tenant}: versions {first_version}..={last_version}"
        )));
    }
    Ok(CommandRecord {
        id,
        fingerprint: r.try_get(2).map_err(pg_err)?,
        key: StreamKey {
            tenant: TenantId::parse(&tenant).map_err(|v| corrupt_row("sourced_commands.tenant", v.message))?,
            type_name: TypeName::parse(&type_name).map_err(|v| corrupt_row("sourced_commands.type", v.message))?,
            id: AggregateId::parse(&agg_id).map_err(|v| corrupt_row("sourced_commands.agg_id", v.message))?,
        },
        first_version,
        last_version,
        extra: from_json(&extra, "sourced_commands.extra")?,
    })
}

pub(super) type PgParam = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

pub(super) fn pg_params(params: &[Param]) -> Vec<PgParam> {
    params
        .iter()
        .map(|p| -> PgParam {
            match p {
                Param::Text(s) | Param::Json(s) => Box::new(s.clone()),
                Param::Int(i) => Box::new(*i),
                Param::Float(f) => Box::new(*f),
                Param::Numeric(n) => Box::new(n.to_string()),
            }
        })
        .collect()
}

pub(super) fn pg_param_refs(params: &[PgParam]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

/// Whether an error means the database cannot be reached or cannot serve now (and a retry
/// later may succeed): a lost or refused connection, a server shutting down or out of
/// resources, a lock wait that timed out, a read-only server.
pub(super) fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: an I/O or connection error has an I/O error under it; a value that
        // did not convert has none.
        None => {
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                if s.is::<std::io::Error>() {
                    return true;
                }
                source = s.source();
            }
            false
        }
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || matches!(code, "55P03" | "40001" | "40P01" | "25006")
        }
    }
}

/// Maps a PostgreSQL error: see [`is_unavailable`]; data corruption is
/// [`StoreError::Corrupt`]; the rest is [`StoreError::Backend`].
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let error = if is_unavailable(&e) { StoreError::unavailable(format!("PostgreSQL: {e}")) } else { pg_failure(&e) };
    error.with_source(e)
}

fn pg_failure(e: &tokio_postgres::Error) -> StoreError {
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("XX00") => StoreError::corrupt(format!("PostgreSQL: {e}")),
        None if e.to_string().contains("deserializ") => StoreError::corrupt(format!("PostgreSQL: {e}")),
        _ => match e.as_db_error() {
            Some(db) => StoreError::backend(format!("PostgreSQL: {}: {}", db.code().code(), db.message())),
            None => StoreError::backend(format!("PostgreSQL: {e}")),
        },
    }
}

pub(super) fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(kind) => {
            StoreError::unavailable(format!("timed out getting a PostgreSQL connection ({kind:?})"))
        }
        PoolError::Backend(e) => match pg_err(e) {
            StoreError::Backend(m) => StoreError::Unavailable(m),
            other => other,
        },
        PoolError::Closed => StoreError::Closed,
        other => StoreError::backend(format!("PostgreSQL pool: {other}")).with_source(other),
    }
}
