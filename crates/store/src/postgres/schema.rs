//! The PostgreSQL schema: its migrations, run once under an advisory lock, and the checks a
//! session passes before the store uses it (see the module documentation of `postgres`).

use super::*;

/// The migrations, in order: entry `i` takes the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
    (
        "events, read model, command records, position counter",
        r#"
    CREATE TABLE sourced_position (
        id   boolean PRIMARY KEY DEFAULT true CHECK (id),
        last bigint  NOT NULL CHECK (last >= 0)
    );
    INSERT INTO sourced_position (id, last) VALUES (true, 0);
    CREATE TABLE sourced_events (
        position   bigint           PRIMARY KEY,
        tenant     text COLLATE "C" NOT NULL,
        type       text COLLATE "C" NOT NULL,
        agg_id     text COLLATE "C" NOT NULL,
        version    bigint           NOT NULL CHECK (version >= 1),
        event_id   uuid             NOT NULL,
        event_type text             NOT NULL,
        data       json             NOT NULL,
        metadata   json             NOT NULL,
        ts         timestamptz      NOT NULL,
        UNIQUE (tenant, type, agg_id, version)
    );
    CREATE INDEX sourced_events_tenant_position ON sourced_events (tenant, position);
    CREATE TABLE sourced_documents (
        tenant     text COLLATE "C" NOT NULL,
        type       text COLLATE "C" NOT NULL,
        agg_id     text COLLATE "C" NOT NULL,
        version    bigint           NOT NULL CHECK (version >= 1),
        state      json             NOT NULL,
        deleted    boolean          NOT NULL,
        created_at timestamptz      NOT NULL,
        updated_at timestamptz      NOT NULL,
        PRIMARY KEY (tenant, type, agg_id)
    );
    CREATE TABLE sourced_commands (
        tenant        text COLLATE "C" NOT NULL,
        command_id    uuid             NOT NULL,
        fingerprint   text             NOT NULL,
        type          text COLLATE "C" NOT NULL,
        agg_id        text COLLATE "C" NOT NULL,
        first_version bigint           NOT NULL,
        last_version  bigint           NOT NULL,
        extra         json             NOT NULL,
        PRIMARY KEY (tenant, command_id)
    );
    "#,
    ),
    (
        "snapshots",
        r#"
    CREATE TABLE sourced_snapshots (
        tenant     text COLLATE "C" NOT NULL,
        type       text COLLATE "C" NOT NULL,
        agg_id     text COLLATE "C" NOT NULL,
        version    bigint           NOT NULL CHECK (version >= 1),
        fold       integer          NOT NULL,
        state      json             NOT NULL,
        deleted    boolean          NOT NULL,
        created_at timestamptz      NOT NULL,
        updated_at timestamptz      NOT NULL,
        PRIMARY KEY (tenant, type, agg_id, version)
    );
    "#,
    ),
    (
        "process checkpoints and wake-ups",
        r#"
    CREATE TABLE sourced_checkpoints (
        name     text COLLATE "C" PRIMARY KEY,
        position bigint           NOT NULL CHECK (position >= 0)
    );
    CREATE TABLE sourced_wakes (
        process text COLLATE "C" NOT NULL,
        tenant  text COLLATE "C" NOT NULL,
        type    text COLLATE "C" NOT NULL,
        agg_id  text COLLATE "C" NOT NULL,
        due     timestamptz      NOT NULL,
        PRIMARY KEY (process, tenant, type, agg_id)
    );
    CREATE INDEX sourced_wakes_by_due ON sourced_wakes (process, due, tenant, type, agg_id);
    "#,
    ),
];

/// First key of the advisory lock taken around migrations (the second is the schema's hash).
pub(super) const MIGRATION_LOCK_KEY: i32 = 0x536f_7572; // "Sour"

/// Brings the schema up to date; returns the name of the schema the tables are in.
pub(super) async fn migrate(client: &mut Object) -> Result<String, StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let schema: Option<String> = tx.query_one("SELECT current_schema()", &[]).await.map_err(pg_err)?.get(0);
    let Some(schema) = schema else {
        return Err(StoreError::backend(
            "no schema to create Sourced's tables in: the search_path names no existing schema",
        ));
    };
    // Two processes starting at once: the second waits here, then finds the work done.
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&MIGRATION_LOCK_KEY, &schema])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sourced_schema_migrations (
             version     integer     PRIMARY KEY,
             description text        NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg_err)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM sourced_schema_migrations", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    let latest = MIGRATIONS.len();
    let current = usize::try_from(current).map_err(|_| StoreError::corrupt(format!("schema version {current}")))?;
    if current > latest {
        return Err(StoreError::backend(format!(
            "the database's schema version is {current}, newer than this build's {latest}"
        )));
    }
    for (from, (description, sql)) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        let to = i32::try_from(from + 1).map_err(|_| StoreError::backend("too many migrations"))?;
        tx.execute("INSERT INTO sourced_schema_migrations (version, description) VALUES ($1, $2)", &[&to, description])
            .await
            .map_err(pg_err)?;
        tracing::info!(schema = %schema, from, to, "migrated the PostgreSQL schema");
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(schema)
}

/// The session's `synchronous_commit`.
pub(super) async fn show_synchronous_commit(client: &ClientWrapper) -> Result<String, StoreError> {
    let rows = client.simple_query("SHOW synchronous_commit").await.map_err(pg_err)?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| StoreError::backend("SHOW synchronous_commit returned no row"))
}

/// Refuses a session whose commits are not durable when they return (see Durability).
pub(super) fn check_synchronous_commit(value: &str) -> Result<(), StoreError> {
    if value == "on" {
        Ok(())
    } else {
        Err(StoreError::backend(format!(
            "PostgreSQL runs Sourced's connections with synchronous_commit={value}, although they ask for on: \
             acknowledged writes would not be durable, so Sourced does not start"
        )))
    }
}

/// The highest position committed (the counter; committed transactions only).
pub(super) async fn select_head(client: &ClientWrapper) -> Result<u64, tokio_postgres::Error> {
    let last: i64 = client.query_one("SELECT last FROM sourced_position", &[]).await?.get(0);
    Ok(u64::try_from(last).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synchronous_commit_on_is_durable_enough() {
        assert!(check_synchronous_commit("on").is_ok());
        for value in ["off", "local", "remote_write"] {
            match check_synchronous_commit(value) {
                Err(StoreError::Backend(m)) => assert!(m.contains(&format!("synchronous_commit={value}")), "{m}"),
                other => panic!("{value}: {other:?}"),
            }
        }
    }
}
