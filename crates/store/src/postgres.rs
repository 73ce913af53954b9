//! The PostgreSQL backend: several Sourced processes share one database (SPEC §7.1); each
//! process has one writer task that commits concurrent appends in batches (group commit), and
//! a connection pool (deadpool) for reads. Feed reads (`read_all`, `read_global`: subscriptions
//! catching up, exports) have a small pool of their own, so long catch-ups and the writer (or
//! a GET) never wait for each other's connections.
//!
//! # Durability
//!
//! An append is acknowledged after its `COMMIT` returns, which makes it durable only when the
//! session's `synchronous_commit` is on. Every connection of the store is opened with
//! `-c synchronous_commit=on` appended to its options, whatever the URL or the server's
//! configuration says, and [`PostgresStore::connect`] checks with `SHOW` that it holds and
//! refuses to start when it does not (a connection pooler that drops startup options, say).
//!
//! # Global order: serialized position assignment
//!
//! Positions come from a single-row counter table, `sourced_position`. Every writing
//! transaction, of every process, starts with `SELECT last FROM sourced_position FOR UPDATE`:
//! it takes the counter's row lock *first*, before it reads or writes anything else, gives its
//! events the positions `last + 1 ..`, stores the new `last`, and holds the lock until it
//! commits. Why this makes SPEC §7.3 hold:
//!
//! - Positions are gap-free: a transaction that rolls back also rolls back its counter update,
//!   so the next one reuses the same positions (a `SEQUENCE` would leave a hole).
//! - Commit order is position order: the next holder of the row lock wakes only after the
//!   previous holder has ended, and PostgreSQL releases a transaction's locks only after its
//!   commit is visible to new snapshots. So by the time transaction B even learns its first
//!   position, every transaction with lower positions is visible; any snapshot that sees B
//!   sees all of them. A reader (one `SELECT … WHERE position > P ORDER BY position`, one
//!   snapshot) therefore always sees a gap-free prefix of the positions, and can never later
//!   meet a position below one it has already seen.
//! - A rolled-back or crashed writer never stalls readers: nothing is ever in flight below a
//!   visible position. It stalls other *writers* at most for its transaction's life; a dead
//!   connection's locks go with it, and a writer waits at most `lock_timeout_ms` for the lock
//!   (then its batch fails as [`StoreError::Unavailable`]).
//!
//! The price: writing transactions of the whole cluster run one at a time. Group commit pays
//! for it: one transaction carries every append queued in the process, in two round trips
//! whatever its size (array parameters, pipelined statements):
//!
//! 1. `BEGIN; SET LOCAL lock_timeout …; SELECT last FROM sourced_position FOR UPDATE`, then the
//!    lookups of the batch's command records and stream heads. PostgreSQL runs pipelined
//!    statements in the order sent, so the lookups run under the lock.
//! 2. The writes (events, read-model rows, command records, the counter, snapshots), then
//!    `NOTIFY …; COMMIT`, decided in memory from the lookups. If a write fails, PostgreSQL
//!    aborts the transaction, so the `NOTIFY` fails and the `COMMIT` after it in the same query
//!    string never runs; the writer sees the write's error and rolls back. A batch counts as
//!    committed only when every statement of the pipeline succeeded.
//!
//! # Expected versions across processes
//!
//! Because every writer holds the counter lock while it checks heads and command ids, the
//! checks and the writes that follow are not a read-then-check race: no other writer, in any
//! process, can change a stream in between. The unique constraints on
//! `(tenant, type, agg_id, version)` and `(tenant, command_id)` back this up; should one ever
//! fire (a writer that bypassed the lock), the batch is re-run append by append with one
//! savepoint each, and the failing append alone gets [`StoreError::Corrupt`].
//!
//! # Storage details
//!
//! JSON is stored as `json` (not `jsonb`), which keeps the text as written: key order and
//! number spelling come back unchanged. Ids are `text COLLATE "C"`, so they sort by bytes as
//! Rust's `String` does. Timestamps are `timestamptz` (microseconds). Migrations are versioned
//! in `sourced_schema_migrations` and run at start under `pg_advisory_xact_lock`, so two
//! processes starting at once migrate once. The tables live in the connection's
//! `current_schema()` (set `options=-csearch_path=NAME` in the URL to choose another schema).
//!
//! # Live notifications across processes: LISTEN/NOTIFY plus a read
//!
//! A commit listener (the engine's hub, SPEC §6) must hear every committed event of the whole
//! cluster, once, in position order. Each writing transaction sends `NOTIFY` on the schema's
//! channel (`sourced_commits_<hash of the schema>`) with its new head position; PostgreSQL
//! delivers it only on commit. Once a listener is registered, a task per process holds one
//! dedicated connection (outside the pool: pooled connections lose notifications) that
//! `LISTEN`s, and on each notification, on a timer (a safety net for anything missed) and after
//! each reconnect it reads the events after the last position it fed, across all tenants, in
//! position order, and passes them to the listener (see [`Feed`]). The process's own writer
//! feeds its commits too, before it acknowledges them (reading first whatever other processes
//! committed below them), so a local client that saw its append acknowledged finds the hub at
//! least that far, as with the embedded store. Both paths share one lock and one "fed up to"
//! position, so nothing is fed twice; global order (above) makes every position up to a
//! notified or read head visible, so nothing is skipped. The LISTEN connection reconnects with
//! backoff; while it is down the timer still reads through the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row, SimpleQueryMessage, Statement};
use uuid::Uuid;

use sourced_core::timestamp::truncate;
use sourced_core::{
    Aggregate, AggregateId, CommandId, EventId, Position, RecordedEvent, StreamHead, StreamKey, TenantId, TypeName,
    Version,
};

use crate::append::{
    self, Counters, Decision, Job, WriterHandle, WriterSlot, Written, committed_events, decide_append,
};
use crate::listing::{self, Dialect, Param};
use crate::sql::{EventScope, clamp_sql_int, corrupt_row, from_json, from_sql_int, to_json, to_sql_int};
use crate::{
    AppendOutcome, AppendRequest, CommandRecord, CommitListener, DocumentRow, DocumentText, EventStore, ListQuery,
    READ_LIMIT_MAX, RebuiltStream, StoreError, StoreStats,
};
use sourced_core::query::FieldPath;

/// The migrations, in order: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[
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
];

/// First key of the advisory lock taken around migrations (the second is the schema's hash).
const MIGRATION_LOCK_KEY: i32 = 0x536f_7572; // "Sour"

/// Most connections a pool may hold.
pub const POOL_SIZE_MAX: usize = 1_024;
/// Most appends one commit may carry.
pub const BATCH_APPENDS_MAX: usize = 65_536;
/// Most events one commit may carry (an append alone may carry up to
/// [`APPEND_EVENTS_MAX`](crate::APPEND_EVENTS_MAX)).
pub const BATCH_EVENTS_MAX: usize = 20_000;
/// Most appends that may wait for the writer.
pub const QUEUE_CAPACITY_MAX: usize = 1 << 20;
/// Longest time any wait may be configured to last.
pub const TIMEOUT_MS_MAX: u64 = 600_000;

/// Tuning of a [`PostgresStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most appends committed in one transaction; 1 ..= [`BATCH_APPENDS_MAX`].
    pub batch_appends_max: usize,
    /// Most connections (the writer's and the readers'); 2 ..= [`POOL_SIZE_MAX`].
    pub pool_size: usize,
    /// Most appends waiting for the writer; a caller beyond it waits for room;
    /// 1 ..= [`QUEUE_CAPACITY_MAX`].
    pub queue_capacity: usize,
    /// How long connecting, or waiting for a free connection, may take before the operation
    /// fails as [`StoreError::Unavailable`]; 1 ..= [`TIMEOUT_MS_MAX`].
    pub connect_timeout_ms: u64,
    /// How long a batch waits for the position counter's lock (held by another process's
    /// batch) before it fails as [`StoreError::Unavailable`]; 1 ..= [`TIMEOUT_MS_MAX`].
    pub lock_timeout_ms: u64,
    /// Connections of the feed reads' own pool (`read_all`, `read_global`), besides
    /// `pool_size`; 1 ..= [`POOL_SIZE_MAX`].
    pub feed_pool_size: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            batch_appends_max: 512,
            pool_size: 8,
            queue_capacity: 4_096,
            connect_timeout_ms: 5_000,
            lock_timeout_ms: 10_000,
            feed_pool_size: 2,
        }
    }
}

impl PostgresOptions {
    fn validate(&self) -> Result<(), StoreError> {
        let mut problems = Vec::new();
        if !(1..=BATCH_APPENDS_MAX).contains(&self.batch_appends_max) {
            problems.push(format!("batch_appends_max must be 1..={BATCH_APPENDS_MAX}, not {}", self.batch_appends_max));
        }
        if !(2..=POOL_SIZE_MAX).contains(&self.pool_size) {
            problems.push(format!("pool_size must be 2..={POOL_SIZE_MAX}, not {}", self.pool_size));
        }
        if !(1..=POOL_SIZE_MAX).contains(&self.feed_pool_size) {
            problems.push(format!("feed_pool_size must be 1..={POOL_SIZE_MAX}, not {}", self.feed_pool_size));
        }
        if !(1..=QUEUE_CAPACITY_MAX).contains(&self.queue_capacity) {
            problems.push(format!("queue_capacity must be 1..={QUEUE_CAPACITY_MAX}, not {}", self.queue_capacity));
        }
        for (name, value) in
            [("connect_timeout_ms", self.connect_timeout_ms), ("lock_timeout_ms", self.lock_timeout_ms)]
        {
            if !(1..=TIMEOUT_MS_MAX).contains(&value) {
                problems.push(format!("{name} must be 1..={TIMEOUT_MS_MAX}, not {value}"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(StoreError::InvalidRequest(problems.join("; "))) }
    }
}

/// The PostgreSQL event store (see the module documentation).
pub struct PostgresStore {
    pool: Pool,
    /// The feed reads' own connections (see the module documentation).
    feed_pool: Pool,
    writer: WriterSlot<Writer>,
    counters: Arc<Counters>,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("pool", &self.pool.status()).field("stats", &self.stats()).finish()
    }
}

/// The handle on the writer task.
struct Writer {
    sender: mpsc::Sender<Job>,
    task: JoinHandle<()>,
}

impl WriterHandle for Writer {
    fn sender(&self) -> &mpsc::Sender<Job> {
        &self.sender
    }
}

/// Checks that `url` is a PostgreSQL connection URL this backend accepts, without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|e| StoreError::InvalidRequest(format!("not a PostgreSQL URL: {e}")))
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`, optionally with
    /// `?options=-csearch_path%3DNAME`), brings the schema up to date and starts the writer.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        options.validate()?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::InvalidRequest(format!("not a PostgreSQL URL: {e}")))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Backend("the PostgreSQL store needs a tokio runtime".into()))?;
        let connect_timeout = Duration::from_millis(options.connect_timeout_ms);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("sourced");
        }
        // Last, so that it wins over any `-c synchronous_commit=…` of the URL's (see Durability).
        let url_options = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{url_options} -c synchronous_commit=on").trim_start());
        let listen_config = config.clone();
        let build = |config: tokio_postgres::Config, size: usize| {
            let manager =
                Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(connect_timeout))
                .create_timeout(Some(connect_timeout))
                .recycle_timeout(Some(connect_timeout))
                .build()
                .map_err(|e| StoreError::Backend(format!("cannot build the PostgreSQL pool: {e}")))
        };
        let pool = build(config.clone(), options.pool_size)?;
        let feed_pool = build(config, options.feed_pool_size)?;
        let (schema, head) = {
            let mut client = pool.get().await.map_err(pool_err)?;
            check_synchronous_commit(&show_synchronous_commit(&client).await?)?;
            let schema = migrate(&mut client).await?;
            (schema, select_head(&client).await.map_err(pg_err)?)
        };
        let feed = Arc::new(Feed::new(&schema, listen_config, head, runtime));
        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::channel(options.queue_capacity);
        let task =
            tokio::spawn(write_loop(pool.clone(), receiver, options.clone(), Arc::clone(&counters), Arc::clone(&feed)));
        tracing::debug!("opened the PostgreSQL store");
        Ok(PostgresStore {
            pool,
            feed_pool,
            writer: WriterSlot::new(Writer { sender, task }, "PostgreSQL"),
            counters,
            feed,
        })
    }

    /// `synchronous_commit` as the store's connections run with it (`SHOW`): `on`, whatever
    /// the URL asked (see the module documentation).
    pub async fn synchronous_commit(&self) -> Result<String, StoreError> {
        let (writer, feed) = (self.client().await?, self.feed_pool.get().await.map_err(pool_err)?);
        let (writer, feed) = (show_synchronous_commit(&writer).await?, show_synchronous_commit(&feed).await?);
        if writer != feed {
            return Err(StoreError::Backend(format!(
                "synchronous_commit is {writer} on one pool, {feed} on the other"
            )));
        }
        Ok(writer)
    }

    /// Appends handed to the writer and not answered yet (queued, or in the batch being
    /// committed), for metrics and tests. It may briefly count low, never high.
    pub fn pending_appends(&self) -> u64 {
        self.counters.pending_appends()
    }

    /// The latest snapshot of `fold` meeting `condition` (on `$4`, bound to `bound`).
    async fn snapshot_where(
        &self,
        condition: &'static str,
        key: &StreamKey,
        fold: u32,
        bound: &(dyn ToSql + Sync),
    ) -> Result<Option<Aggregate>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT version, state::text, deleted, created_at, updated_at FROM sourced_snapshots
                 WHERE tenant = $1 AND type = $2 AND agg_id = $3 AND {condition} AND fold = $5
                 ORDER BY version DESC LIMIT 1"
            ))
            .await
            .map_err(pg_err)?;
        let fold = i32::try_from(fold).unwrap_or(i32::MAX);
        let row = client
            .query_opt(&stmt, &[&key.tenant.as_str(), &key.type_name.as_str(), &key.id.as_str(), bound, &fold])
            .await
            .map_err(pg_err)?;
        let Some(r) = row else { return Ok(None) };
        let state: String = r.try_get(1).map_err(pg_err)?;
        let state = from_json(&state, "sourced_snapshots.state")?;
        let created: DateTime<Utc> = r.try_get(3).map_err(pg_err)?;
        let updated: DateTime<Utc> = r.try_get(4).map_err(pg_err)?;
        Ok(Some(Aggregate {
            version: Version(from_sql_int(r.try_get(0).map_err(pg_err)?, "sourced_snapshots.version")?),
            state: (!state.is_null()).then_some(state),
            deleted: r.try_get(2).map_err(pg_err)?,
            created_at: Some(created),
            updated_at: Some(updated),
        }))
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Ends the LISTEN task of a store dropped without `close`.
        self.feed.stop.send_replace(true);
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        append::enqueue(request, &self.writer, &self.counters).await
    }

    async fn read_stream(
        &self,
        key: &StreamKey,
        after: Version,
        to: Option<Version>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = limit.min(READ_LIMIT_MAX);
        if limit == 0 || to.is_some_and(|to| to <= after) {
            return Ok(Vec::new());
        }
        let upper = to.map_or(i64::MAX, |v| clamp_sql_int(v.0));
        let client = self.client().await?;
        let events = select_events(
            &client,
            &EventScope::Stream(key),
            "tenant = $1 AND type = $2 AND agg_id = $3 AND version > $4 AND version <= $5 ORDER BY version LIMIT $6",
            &[
                &key.tenant.as_str(),
                &key.type_name.as_str(),
                &key.id.as_str(),
                &clamp_sql_int(after.0),
                &upper,
                &(limit as i64),
            ],
        )
        .await?;
        crate::check_stream_read(key, after, &events)?;
        self.counters.counted(Ok(events))
    }

    async fn read_all(
        &self,
        tenant: &TenantId,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = limit.min(READ_LIMIT_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.feed_pool.get().await.map_err(pool_err)?;
        let events = select_events(
            &client,
            &EventScope::Tenant(tenant),
            "tenant = $1 AND position > $2 ORDER BY position LIMIT $3",
            &[&tenant.as_str(), &clamp_sql_int(after.0), &(limit as i64)],
        )
        .await?;
        crate::check_feed_read(after, &events)?;
        self.counters.counted(Ok(events))
    }

    async fn read_global(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.feed_pool.get().await.map_err(pool_err)?;
        self.counters.counted(read_global(&client, after, limit).await)
    }

    async fn get_document(&self, key: &StreamKey) -> Result<Option<DocumentRow>, StoreError> {
        self.get_document_text(key).await?.map(DocumentText::parse).transpose()
    }

    async fn get_document_text(&self, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT agg_id, version, state::text, deleted, created_at, updated_at FROM sourced_documents
                 WHERE tenant = $1 AND type = $2 AND agg_id = $3",
            )
            .await
            .map_err(pg_err)?;
        let row = client
            .query_opt(&stmt, &[&key.tenant.as_str(), &key.type_name.as_str(), &key.id.as_str()])
            .await
            .map_err(pg_err)?;
        row.map(|r| decode_document_text(&r, &key.tenant, &key.type_name)).transpose()
    }

    async fn list_documents(&self, query: &ListQuery) -> Result<Vec<DocumentRow>, StoreError> {
        crate::check_list(query)?;
        let limit = query.limit.min(READ_LIMIT_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sql = listing::select(Dialect::Postgres, query, limit);
        let client = self.client().await?;
        // Not cached: the statement's text varies with the query's shape, without bound.
        let params = pg_params(&sql.params);
        let rows = client.query(sql.text.as_str(), &pg_param_refs(&params)).await.map_err(pg_err)?;
        let rows =
            rows.iter().map(|r| decode_document(r, &query.tenant, &query.type_name)).collect::<Result<Vec<_>, _>>()?;
        crate::check_list_read(query, &rows)?;
        Ok(rows)
    }

    async fn count_documents(&self, query: &ListQuery) -> Result<u64, StoreError> {
        crate::check_list(query)?;
        let sql = listing::count(Dialect::Postgres, query);
        let client = self.client().await?;
        let params = pg_params(&sql.params);
        let n: i64 = client.query_one(sql.text.as_str(), &pg_param_refs(&params)).await.map_err(pg_err)?.get(0);
        from_sql_int(n, "count")
    }

    async fn ensure_indexes(&self, fields: &[FieldPath]) -> Result<Vec<String>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Two processes starting at once: the second waits here, then finds the indexes made.
        tx.execute("SELECT pg_advisory_xact_lock($1, 1)", &[&MIGRATION_LOCK_KEY]).await.map_err(pg_err)?;
        let mut names = Vec::new();
        for field in fields {
            let (name, ddl) = Dialect::Postgres.index_ddl(field);
            tx.batch_execute(&ddl).await.map_err(pg_err)?;
            names.push(name);
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(names)
    }

    async fn load_snapshot(
        &self,
        key: &StreamKey,
        fold: u32,
        at_most: Option<Version>,
    ) -> Result<Option<Aggregate>, StoreError> {
        let at_most = at_most.map_or(i64::MAX, |v| clamp_sql_int(v.0));
        self.snapshot_where("version <= $4", key, fold, &at_most).await
    }

    async fn load_snapshot_at(
        &self,
        key: &StreamKey,
        fold: u32,
        at: DateTime<Utc>,
    ) -> Result<Option<Aggregate>, StoreError> {
        self.snapshot_where("updated_at <= $4", key, fold, &at).await
    }

    async fn list_streams(&self, after: Option<&StreamKey>, limit: usize) -> Result<Vec<StreamKey>, StoreError> {
        let limit = limit.min(READ_LIMIT_MAX) as i64;
        let (t, ty, id) = after.map_or(("", "", ""), |k| (k.tenant.as_str(), k.type_name.as_str(), k.id.as_str()));
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT tenant, type, agg_id FROM sourced_events
                 WHERE version = 1 AND (tenant, type, agg_id) > ($1::text, $2::text, $3::text)
                 ORDER BY tenant, type, agg_id LIMIT $4",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&t, &ty, &id, &limit]).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                let (t, ty, id): (String, String, String) =
                    (r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?, r.try_get(2).map_err(pg_err)?);
                Ok(StreamKey {
                    tenant: TenantId::parse(&t).map_err(|v| corrupt_row("sourced_events.tenant", v.message))?,
                    type_name: TypeName::parse(&ty).map_err(|v| corrupt_row("sourced_events.type", v.message))?,
                    id: AggregateId::parse(&id).map_err(|v| corrupt_row("sourced_events.agg_id", v.message))?,
                })
            })
            .collect()
    }

    async fn clear_read_model(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.batch_execute("TRUNCATE sourced_documents, sourced_snapshots").await.map_err(pg_err)
    }

    async fn put_read_model(&self, streams: Vec<RebuiltStream>) -> Result<(), StoreError> {
        let t: Vec<&str> = streams.iter().map(|s| s.row.key.tenant.as_str()).collect();
        let ty: Vec<&str> = streams.iter().map(|s| s.row.key.type_name.as_str()).collect();
        let id: Vec<&str> = streams.iter().map(|s| s.row.key.id.as_str()).collect();
        let version: Vec<i64> = streams.iter().map(|s| clamp_sql_int(s.row.version.0)).collect();
        let state = streams.iter().map(|s| to_json(&s.row.state)).collect::<Result<Vec<_>, _>>()?;
        let deleted: Vec<bool> = streams.iter().map(|s| s.row.deleted).collect();
        let created: Vec<DateTime<Utc>> = streams.iter().map(|s| s.row.created_at).collect();
        let updated: Vec<DateTime<Utc>> = streams.iter().map(|s| s.row.updated_at).collect();
        let mut snaps = Vec::new();
        for s in &streams {
            let (tenant, type_name, agg_id) = head_key(&s.row.key);
            for a in &s.snapshots {
                snaps.push(SnapWrite {
                    tenant: tenant.clone(),
                    type_name: type_name.clone(),
                    agg_id: agg_id.clone(),
                    version: clamp_sql_int(a.version.0),
                    fold: i32::try_from(s.fold).unwrap_or(i32::MAX),
                    state: to_json(a.state.as_ref().unwrap_or(&serde_json::Value::Null))?,
                    deleted: a.deleted,
                    created_at: a.created_at.unwrap_or_default(),
                    updated_at: a.updated_at.unwrap_or_default(),
                });
            }
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute(
            "DELETE FROM sourced_snapshots s USING unnest($1::text[], $2::text[], $3::text[]) AS k(t, ty, a)
             WHERE s.tenant = k.t COLLATE \"C\" AND s.type = k.ty COLLATE \"C\" AND s.agg_id = k.a COLLATE \"C\"",
            &[&t, &ty, &id],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "INSERT INTO sourced_documents (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
             SELECT t, ty, a, v, s::json, d, c, u
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::bool[],
                         $7::timestamptz[], $8::timestamptz[]) AS x(t, ty, a, v, s, d, c, u)
             ON CONFLICT (tenant, type, agg_id) DO UPDATE SET version = excluded.version,
                 state = excluded.state, deleted = excluded.deleted, created_at = excluded.created_at,
                 updated_at = excluded.updated_at",
            &[&t, &ty, &id, &version, &state, &deleted, &created, &updated],
        )
        .await
        .map_err(pg_err)?;
        if !snaps.is_empty() {
            tx.execute(INSERT_SNAPSHOTS, &SnapColumns::new(&snaps).params()).await.map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn get_command(&self, tenant: &TenantId, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT tenant, command_id, fingerprint, type, agg_id, first_version, last_version, extra::text
                 FROM sourced_commands WHERE tenant = $1 AND command_id = $2",
            )
            .await
            .map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&tenant.as_str(), &id.0]).await.map_err(pg_err)?;
        row.map(|r| decode_command(&r)).transpose()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        // One row, read without a lock (the writers' `FOR UPDATE` does not block it): the
        // counter as of the last commit.
        let client = self.client().await?;
        Ok(Position(select_head(&client).await.map_err(pg_err)?))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.writer.check()?;
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }

    async fn close(&self) {
        let writer = self.writer.take();
        if let Some(Writer { sender, task }) = writer {
            // The task ends once every sender is gone and the queue is drained.
            drop(sender);
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the PostgreSQL writer task failed");
            }
        }
        self.feed.stop().await;
        self.pool.close();
        self.feed_pool.close();
    }

    fn stats(&self) -> StoreStats {
        self.counters.stats()
    }

    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) -> bool {
        if self.writer.is_closed() || self.feed.listener.set(listener).is_err() {
            return false;
        }
        let task = self.feed.runtime.spawn(listen_loop(Arc::clone(&self.feed), self.pool.clone()));
        *self.feed.task.lock().expect("the feed task mutex is poisoned") = Some(task);
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

/// Brings the schema up to date; returns the name of the schema the tables are in.
async fn migrate(client: &mut Object) -> Result<String, StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let schema: Option<String> = tx.query_one("SELECT current_schema()", &[]).await.map_err(pg_err)?.get(0);
    let Some(schema) = schema else {
        return Err(StoreError::Backend(
            "no schema to create Sourced's tables in: the search_path names no existing schema".into(),
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
    let current = usize::try_from(current).map_err(|_| StoreError::Corrupt(format!("schema version {current}")))?;
    if current > latest {
        return Err(StoreError::Backend(format!(
            "the database's schema version is {current}, newer than this build's {latest}"
        )));
    }
    for (from, (description, sql)) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        let to = i32::try_from(from + 1).map_err(|_| StoreError::Backend("too many migrations".into()))?;
        tx.execute("INSERT INTO sourced_schema_migrations (version, description) VALUES ($1, $2)", &[&to, description])
            .await
            .map_err(pg_err)?;
        tracing::info!(schema = %schema, from, to, "migrated the PostgreSQL schema");
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(schema)
}

/// The session's `synchronous_commit`.
async fn show_synchronous_commit(client: &ClientWrapper) -> Result<String, StoreError> {
    let rows = client.simple_query("SHOW synchronous_commit").await.map_err(pg_err)?;
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| StoreError::Backend("SHOW synchronous_commit returned no row".into()))
}

/// Refuses a session whose commits are not durable when they return (see Durability).
fn check_synchronous_commit(value: &str) -> Result<(), StoreError> {
    if value == "on" {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "PostgreSQL runs Sourced's connections with synchronous_commit={value}, although they ask for on: \
             acknowledged writes would not be durable, so Sourced does not start"
        )))
    }
}

/// The highest position committed (the counter; committed transactions only).
async fn select_head(client: &ClientWrapper) -> Result<u64, tokio_postgres::Error> {
    let last: i64 = client.query_one("SELECT last FROM sourced_position", &[]).await?.get(0);
    Ok(u64::try_from(last).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// The writer

/// The writer task: waits for an append, takes every other one already queued (within the
/// batch limits), commits them together, then answers them.
async fn write_loop(
    pool: Pool,
    mut receiver: mpsc::Receiver<Job>,
    options: PostgresOptions,
    counters: Arc<Counters>,
    feed: Arc<Feed>,
) {
    let mut carried: Option<Job> = None;
    let mut batch: Vec<Job> = Vec::with_capacity(options.batch_appends_max.min(1_024));
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match receiver.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut events = first.request.events.len();
        batch.push(first);
        while batch.len() < options.batch_appends_max {
            match receiver.try_recv() {
                Ok(job) if events + job.request.events.len() > BATCH_EVENTS_MAX => {
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    events += job.request.events.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let results = commit_batch(&pool, &batch, options.lock_timeout_ms, &counters, &feed.channel).await;
        debug_assert_eq!(results.len(), batch.len());
        // Committed: the listener hears it before any caller does (see `Feed`).
        feed.feed_local(&pool, &batch, &results).await;
        append::answer(&mut batch, results, &counters);
    }
    tracing::debug!("the PostgreSQL writer has stopped");
}

/// Commits one batch: the fast path (one transaction, no savepoints), and when PostgreSQL
/// refuses a statement of it, the slow path (one savepoint per append). Each request gets its
/// own outcome, or every request gets the batch's error.
async fn commit_batch(
    pool: &Pool,
    batch: &[Job],
    lock_timeout_ms: u64,
    counters: &Counters,
    channel: &str,
) -> Vec<Result<Written, StoreError>> {
    let outcome = async {
        let client = pool.get().await.map_err(pool_err)?;
        let results = match run_batch(&client, batch, lock_timeout_ms, channel).await {
            Ok(results) => results,
            Err(e) if e.as_db_error().is_some() && !is_unavailable(&e) => {
                tracing::warn!(error = %e, appends = batch.len(), "a batch failed; retrying it append by append");
                end_transaction(client, "ROLLBACK").await.map_err(pg_err)?;
                let client = pool.get().await.map_err(pool_err)?;
                match run_batch_with_savepoints(&client, batch, lock_timeout_ms, channel).await {
                    Ok(results) => results,
                    Err(e) => {
                        discard(client).await;
                        return Err(pg_err(e));
                    }
                }
            }
            Err(e) => {
                discard(client).await;
                return Err(pg_err(e));
            }
        };
        Ok::<_, StoreError>(results)
    }
    .await;
    match outcome {
        Ok(results) => {
            counters.committed(batch, &results);
            results
        }
        Err(e) => {
            tracing::error!(error = %e, appends = batch.len(), "a PostgreSQL batch was not committed");
            append::batch_failed(&e, batch.len())
        }
    }
}

/// Ends the transaction on `client`; on failure the connection is closed rather than
/// returned to the pool in an unknown state.
async fn end_transaction(client: Object, sql: &str) -> Result<(), tokio_postgres::Error> {
    match client.batch_execute(sql).await {
        Ok(()) => Ok(()),
        Err(e) => {
            drop(Object::take(client));
            Err(e)
        }
    }
}

/// After a failure mid-transaction: rolls back, or closes the connection if that fails.
async fn discard(client: Object) {
    if client.is_closed() {
        drop(Object::take(client));
        return;
    }
    let _ = end_transaction(client, "ROLLBACK").await;
}

/// The writer's lookup of a batch's command records. Each key is looked up on its own through
/// the primary key (`LATERAL … LIMIT 1` keeps the planner from turning it into a join), so
/// the plan stays an index lookup whatever the table's size was when it was made: a prepared
/// statement keeps its generic plan, and the join form, planned on a young table, kept a hash
/// join over a sequential scan as the table grew, so every batch read the whole table.
#[doc(hidden)]
pub const LOOK_UP_COMMANDS: &str = "SELECT c.tenant, c.command_id, c.fingerprint, c.type, c.agg_id, c.first_version,
        c.last_version, c.extra::text
 FROM unnest($1::text[], $2::uuid[]) AS k(tenant, command_id)
 CROSS JOIN LATERAL (
     SELECT * FROM sourced_commands c
     WHERE c.tenant = k.tenant COLLATE \"C\" AND c.command_id = k.command_id
     LIMIT 1
 ) c";

/// The writer's lookup of a batch's stream heads, key by key (see [`LOOK_UP_COMMANDS`]).
#[doc(hidden)]
pub const LOOK_UP_HEADS: &str = "SELECT d.tenant, d.type, d.agg_id, d.version, d.deleted
 FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, type, agg_id)
 CROSS JOIN LATERAL (
     SELECT * FROM sourced_documents d
     WHERE d.tenant = k.tenant COLLATE \"C\" AND d.type = k.type COLLATE \"C\" AND d.agg_id = k.agg_id COLLATE \"C\"
     LIMIT 1
 ) d";

/// The writer's statements, prepared once per connection (deadpool caches them with the
/// connection, so after a connection's first batch this costs no round trip).
struct Statements {
    select_commands: Statement,
    select_heads: Statement,
    insert_events: Statement,
    upsert_documents: Statement,
    insert_commands: Statement,
    update_counter: Statement,
    insert_snapshots: Statement,
}

impl Statements {
    async fn prepare(client: &ClientWrapper) -> Result<Statements, tokio_postgres::Error> {
        let (
            select_commands,
            select_heads,
            insert_events,
            upsert_documents,
            insert_commands,
            update_counter,
            insert_snapshots,
        ) = tokio::try_join!(
            client.prepare_cached(LOOK_UP_COMMANDS),
            client.prepare_cached(LOOK_UP_HEADS),
            client.prepare_cached(
                "INSERT INTO sourced_events
                 (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
                 SELECT p, t, ty, a, v, e, et, d::json, m::json, ts
                 FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::uuid[], $7::text[],
                             $8::text[], $9::text[], $10::timestamptz[])
                      AS u(p, t, ty, a, v, e, et, d, m, ts)",
            ),
            client.prepare_cached(
                "INSERT INTO sourced_documents (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
                 SELECT t, ty, a, v, s::json, d, c, u
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::bool[],
                             $7::timestamptz[], $8::timestamptz[]) AS x(t, ty, a, v, s, d, c, u)
                 ON CONFLICT (tenant, type, agg_id) DO UPDATE SET
                     version = excluded.version, state = excluded.state,
                     deleted = excluded.deleted, updated_at = excluded.updated_at",
            ),
            client.prepare_cached(
                "INSERT INTO sourced_commands
                 (tenant, command_id, fingerprint, type, agg_id, first_version, last_version, extra)
                 SELECT t, c, f, ty, a, fv, lv, x::json
                 FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],
                             $8::text[]) AS u(t, c, f, ty, a, fv, lv, x)",
            ),
            client.prepare_cached("UPDATE sourced_position SET last = $1"),
            client.prepare_cached(INSERT_SNAPSHOTS),
        )?;
        Ok(Statements {
            select_commands,
            select_heads,
            insert_events,
            upsert_documents,
            insert_commands,
            update_counter,
            insert_snapshots,
        })
    }
}

/// Begins a writing transaction and takes the position counter's lock (always first, so two
/// writers never wait on each other in opposite orders). Returns the last position used, or
/// `None` when the counter's row is missing (the migration inserts it; nothing may be written
/// without it).
async fn begin_and_lock(client: &ClientWrapper, lock_timeout_ms: u64) -> Result<Option<u64>, tokio_postgres::Error> {
    let messages = client
        .simple_query(&format!(
            "BEGIN; SET LOCAL lock_timeout = {lock_timeout_ms}; SELECT last FROM sourced_position FOR UPDATE"
        ))
        .await?;
    Ok(messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(|s| s.parse::<u64>().ok()),
        _ => None,
    }))
}

/// The fast path: one transaction for the batch, every check decided in memory from two
/// lookups, every write one statement with array parameters, in two round trips (see
/// [`lock_and_look_up`] and [`Plan::write_and_commit`]). An error means the transaction did
/// not commit (and may still be open on `client`).
async fn run_batch(
    client: &ClientWrapper,
    batch: &[Job],
    lock_timeout_ms: u64,
    channel: &str,
) -> Result<Vec<Result<Written, StoreError>>, tokio_postgres::Error> {
    let statements = Statements::prepare(client).await?;
    let jobs: Vec<&Job> = batch.iter().collect();
    let (last, found) = lock_and_look_up(client, &statements, &jobs, lock_timeout_ms).await?;
    let mut plan = plan(&jobs, last, &found)?;
    plan.write_and_commit(client, &statements, channel).await?;
    Ok(std::mem::take(&mut plan.results))
}

/// Round trip 1 of a batch: begins the transaction, takes the counter's lock and reads the
/// batch's command records and stream heads, as one pipeline. tokio-postgres sends a request
/// when its future is first polled, so futures polled together are sent together, in the order
/// polled (`biased` makes `try_join!` poll in argument order every time), and PostgreSQL runs
/// them in the order received: the lookups run only once the lock is held. Answers come back
/// in the same order, so the first failure in pipeline order is the error returned (if taking
/// the lock fails, the lookups fail too, in the aborted transaction, and the lock's error is
/// the one reported).
async fn lock_and_look_up(
    client: &ClientWrapper,
    statements: &Statements,
    jobs: &[&Job],
    lock_timeout_ms: u64,
) -> Result<(Option<u64>, Found), tokio_postgres::Error> {
    tokio::try_join!(biased; begin_and_lock(client, lock_timeout_ms), look_up(client, statements, jobs))
}

/// Reads the command records and stream heads of `jobs`: two statements, pipelined.
async fn look_up(
    client: &ClientWrapper,
    statements: &Statements,
    jobs: &[&Job],
) -> Result<Found, tokio_postgres::Error> {
    let tenants: Vec<&str> = jobs.iter().map(|j| j.request.key.tenant.as_str()).collect();
    let command_ids: Vec<Uuid> = jobs.iter().map(|j| j.request.command.id.0).collect();
    let types: Vec<&str> = jobs.iter().map(|j| j.request.key.type_name.as_str()).collect();
    let ids: Vec<&str> = jobs.iter().map(|j| j.request.key.id.as_str()).collect();
    let command_params: [&(dyn ToSql + Sync); 2] = [&tenants, &command_ids];
    let head_params: [&(dyn ToSql + Sync); 3] = [&tenants, &types, &ids];
    let (commands, heads) = tokio::try_join!(
        biased;
        client.query(&statements.select_commands, &command_params),
        client.query(&statements.select_heads, &head_params),
    )?;
    Ok(Found { commands, heads })
}

/// The slow path: one savepoint per append, so a failing append fails alone.
async fn run_batch_with_savepoints(
    client: &ClientWrapper,
    batch: &[Job],
    lock_timeout_ms: u64,
    channel: &str,
) -> Result<Vec<Result<Written, StoreError>>, tokio_postgres::Error> {
    let statements = Statements::prepare(client).await?;
    let Some(first) = begin_and_lock(client, lock_timeout_ms).await? else {
        client.batch_execute("COMMIT").await?;
        return Ok(batch.iter().map(|_| Err(missing_counter())).collect());
    };
    let mut last = first;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        client.batch_execute("SAVEPOINT append").await?;
        let attempt = async {
            let found = look_up(client, &statements, &[job]).await?;
            let plan = plan(&[job], Some(last), &found)?;
            plan.write(client, &statements).await?;
            Ok::<_, tokio_postgres::Error>(plan)
        }
        .await;
        match attempt {
            Ok(mut plan) => {
                client.batch_execute("RELEASE SAVEPOINT append").await?;
                last += plan.events;
                results.push(plan.results.pop().expect("a plan of one append has one result"));
            }
            Err(e) if e.as_db_error().is_some() && !is_unavailable(&e) => {
                client.batch_execute("ROLLBACK TO SAVEPOINT append").await?;
                tracing::error!(key = %job.request.key, error = %e, "an append found inconsistent data");
                results.push(Err(StoreError::Corrupt(format!("the events and the read model disagree: {e}"))));
            }
            Err(e) => return Err(e),
        }
    }
    client.batch_execute(&commit_sql(channel, first, last)).await?;
    Ok(results)
}

/// The error of every append when the counter's row is missing.
fn missing_counter() -> StoreError {
    StoreError::Corrupt("the position counter's row (sourced_position) is missing".into())
}

/// Commits the open transaction; when it wrote events (`before < head`), it first queues a
/// notification of the new head on `channel`, which PostgreSQL delivers only if the commit
/// succeeds. When the transaction is aborted (a statement before it failed), `NOTIFY` fails and
/// the `COMMIT` after it in the same query string does not run: the error is reported and the
/// transaction stays open for the caller to roll back.
fn commit_sql(channel: &str, before: u64, head: u64) -> String {
    if head > before {
        // The channel is `sourced_commits_` and hex digits, the payload digits: nothing to quote.
        format!("NOTIFY {channel}, '{head}'; COMMIT")
    } else {
        "COMMIT".to_owned()
    }
}

/// The rows a batch's lookups found: command records and stream heads.
struct Found {
    commands: Vec<Row>,
    heads: Vec<Row>,
}

/// What a batch will write, decided in memory under the counter lock.
#[derive(Default)]
struct Plan {
    results: Vec<Result<Written, StoreError>>,
    /// The counter's value when the plan was made; its writes continue from here.
    last_position: u64,
    /// Events the plan appends.
    events: u64,
    ev_position: Vec<i64>,
    ev_tenant: Vec<String>,
    ev_type: Vec<String>,
    ev_agg: Vec<String>,
    ev_version: Vec<i64>,
    ev_id: Vec<Uuid>,
    ev_type_name: Vec<String>,
    ev_data: Vec<String>,
    ev_metadata: Vec<String>,
    ev_ts: Vec<DateTime<Utc>>,
    /// One read-model row per stream (the last append's), in first-touched order.
    docs: Vec<DocWrite>,
    /// Where each stream's row is in `docs`.
    doc_index: HashMap<HeadKey, usize>,
    cmd_tenant: Vec<String>,
    cmd_id: Vec<Uuid>,
    cmd_fingerprint: Vec<String>,
    cmd_type: Vec<String>,
    cmd_agg: Vec<String>,
    cmd_first: Vec<i64>,
    cmd_last: Vec<i64>,
    cmd_extra: Vec<String>,
    /// Snapshots, one per append that asks for one.
    snaps: Vec<SnapWrite>,
}

struct SnapWrite {
    tenant: String,
    type_name: String,
    agg_id: String,
    version: i64,
    fold: i32,
    state: String,
    deleted: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Inserts snapshots from the column arrays of [`SnapColumns`], replacing any at the same
/// version: the writer's statement, and `sourced rebuild`'s.
const INSERT_SNAPSHOTS: &str = "INSERT INTO sourced_snapshots
     (tenant, type, agg_id, version, fold, state, deleted, created_at, updated_at)
     SELECT t, ty, a, v, f, s::json, d, c, u
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int4[], $6::text[], $7::bool[],
                 $8::timestamptz[], $9::timestamptz[]) AS x(t, ty, a, v, f, s, d, c, u)
     ON CONFLICT (tenant, type, agg_id, version) DO UPDATE SET
         fold = excluded.fold, state = excluded.state, deleted = excluded.deleted,
         created_at = excluded.created_at, updated_at = excluded.updated_at";

/// The parameters of [`INSERT_SNAPSHOTS`]: one array per column.
struct SnapColumns<'a> {
    tenant: Vec<&'a str>,
    type_name: Vec<&'a str>,
    agg_id: Vec<&'a str>,
    version: Vec<i64>,
    fold: Vec<i32>,
    state: Vec<&'a str>,
    deleted: Vec<bool>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
}

impl<'a> SnapColumns<'a> {
    fn new(snaps: &'a [SnapWrite]) -> SnapColumns<'a> {
        SnapColumns {
            tenant: snaps.iter().map(|x| x.tenant.as_str()).collect(),
            type_name: snaps.iter().map(|x| x.type_name.as_str()).collect(),
            agg_id: snaps.iter().map(|x| x.agg_id.as_str()).collect(),
            version: snaps.iter().map(|x| x.version).collect(),
            fold: snaps.iter().map(|x| x.fold).collect(),
            state: snaps.iter().map(|x| x.state.as_str()).collect(),
            deleted: snaps.iter().map(|x| x.deleted).collect(),
            created_at: snaps.iter().map(|x| x.created_at).collect(),
            updated_at: snaps.iter().map(|x| x.updated_at).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.tenant,
            &self.type_name,
            &self.agg_id,
            &self.version,
            &self.fold,
            &self.state,
            &self.deleted,
            &self.created_at,
            &self.updated_at,
        ]
    }
}

struct DocWrite {
    tenant: String,
    type_name: String,
    agg_id: String,
    version: i64,
    state: String,
    deleted: bool,
    /// Used only when the row is new.
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

type HeadKey = (String, String, String);

fn head_key(key: &StreamKey) -> HeadKey {
    (key.tenant.as_str().to_owned(), key.type_name.as_str().to_owned(), key.id.as_str().to_owned())
}

/// Decides each append of `jobs` in order, as if they ran one after the other, from the rows
/// its lookups `found` under the counter's lock (`last`: the counter's value, `None` when its
/// row is missing, which fails every append and writes nothing).
fn plan(jobs: &[&Job], last: Option<u64>, found: &Found) -> Result<Plan, tokio_postgres::Error> {
    let Some(last_position) = last else {
        return Ok(Plan { results: jobs.iter().map(|_| Err(missing_counter())).collect(), ..Plan::default() });
    };
    let mut known = Known::new(found)?;
    let mut plan = Plan { last_position, ..Plan::default() };
    for job in jobs {
        let result = plan.add(job, &mut known);
        plan.results.push(result);
    }
    debug_assert_eq!(plan.results.len(), jobs.len());
    assert!(
        plan.ev_position.len() as u64 == plan.events
            && plan.ev_position.iter().enumerate().all(|(i, p)| *p as u64 == last_position + 1 + i as u64),
        "a batch's positions must continue the counter exactly"
    );
    Ok(plan)
}

/// What a batch's appends know of the store, as decided so far: the command records and stream
/// heads its lookups found, then those of the appends planned. Rows that do not decode are kept
/// as their error's text, reported to the append that meets them.
struct Known {
    records: HashMap<(String, Uuid), Result<CommandRecord, String>>,
    heads: HashMap<HeadKey, Result<StreamHead, String>>,
}

impl Known {
    fn new(found: &Found) -> Result<Known, tokio_postgres::Error> {
        let mut records = HashMap::new();
        for row in &found.commands {
            let tenant: String = row.try_get(0)?;
            let id: Uuid = row.try_get(1)?;
            records.insert((tenant, id), decode_command(row).map_err(|e| e.to_string()));
        }
        let mut heads = HashMap::new();
        for row in &found.heads {
            let key: HeadKey = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let version: i64 = row.try_get(3)?;
            let deleted: bool = row.try_get(4)?;
            let head = match u64::try_from(version) {
                Ok(v) if v > 0 => Ok(StreamHead { version: Version(v), deleted }),
                _ => Err(format!("{}/{}/{}: a read-model row at version {version}", key.0, key.1, key.2)),
            };
            heads.insert(key, head);
        }
        Ok(Known { records, heads })
    }
}

impl Plan {
    /// Decides one append (see [`decide_append`]) and, when accepted, adds its writes.
    fn add(&mut self, job: &Job, known: &mut Known) -> Result<Written, StoreError> {
        let request = &job.request;
        let key = &request.key;
        let record_key = (key.tenant.as_str().to_owned(), request.command.id.0);
        let record = known.records.get(&record_key).cloned().transpose().map_err(StoreError::Corrupt)?;
        let hk = head_key(key);
        let head = || known.heads.get(&hk).cloned().unwrap_or(Ok(StreamHead::default())).map_err(StoreError::Corrupt);
        let span = match decide_append(record, head, request, self.last_position + 1 + self.events)? {
            Decision::Duplicate(record) => return Ok(Written::Duplicate(record)),
            Decision::Conflict(actual) => return Err(StoreError::Conflict { expected: request.expected, actual }),
            Decision::Write(span) => span,
        };
        let last_version = span.last_version();
        let last_sql = to_sql_int(last_version.0)?;
        let ts = truncate(request.timestamp);
        for (i, event) in request.events.iter().enumerate() {
            self.ev_position.push((span.first_position.0 + i as u64) as i64);
            self.ev_tenant.push(hk.0.clone());
            self.ev_type.push(hk.1.clone());
            self.ev_agg.push(hk.2.clone());
            self.ev_version.push((span.first_version.0 + i as u64) as i64);
            self.ev_id.push(event.id.0);
            self.ev_type_name.push(event.event_type.clone());
            self.ev_data.push(job.encoded.data[i].clone());
            self.ev_metadata.push(job.encoded.metadata[i].clone());
            self.ev_ts.push(ts);
        }
        self.events += span.events;
        let doc = DocWrite {
            tenant: hk.0.clone(),
            type_name: hk.1.clone(),
            agg_id: hk.2.clone(),
            version: last_sql,
            state: job.encoded.state.clone(),
            deleted: request.document.deleted,
            created_at: ts,
            updated_at: ts,
        };
        match self.doc_index.get(&hk) {
            // A later append of the same stream: its row, the first one's creation time.
            Some(&i) => self.docs[i] = DocWrite { created_at: self.docs[i].created_at, ..doc },
            None => {
                self.doc_index.insert(hk.clone(), self.docs.len());
                self.docs.push(doc);
            }
        }
        if let Some(snapshot) = &request.snapshot {
            self.snaps.push(SnapWrite {
                tenant: hk.0.clone(),
                type_name: hk.1.clone(),
                agg_id: hk.2.clone(),
                version: last_sql,
                fold: i32::try_from(snapshot.fold).unwrap_or(i32::MAX),
                state: job.encoded.state.clone(),
                deleted: request.document.deleted,
                created_at: truncate(snapshot.created_at),
                updated_at: ts,
            });
        }
        self.cmd_tenant.push(hk.0.clone());
        self.cmd_id.push(request.command.id.0);
        self.cmd_fingerprint.push(request.command.fingerprint.clone());
        self.cmd_type.push(hk.1.clone());
        self.cmd_agg.push(hk.2.clone());
        self.cmd_first.push(span.first_version.0 as i64);
        self.cmd_last.push(last_sql);
        self.cmd_extra.push(job.encoded.extra.clone());
        let record = CommandRecord {
            id: request.command.id,
            fingerprint: request.command.fingerprint.clone(),
            key: key.clone(),
            first_version: span.first_version,
            last_version,
            extra: request.command.extra.clone(),
        };
        known.records.insert(record_key, Ok(record));
        known.heads.insert(hk, Ok(StreamHead { version: last_version, deleted: request.document.deleted }));
        Ok(span.written())
    }

    /// The plan's writes (events, read-model rows, command records, the counter, snapshots) as
    /// one pipeline of array statements; nothing when the plan appends nothing.
    async fn write(&self, client: &ClientWrapper, statements: &Statements) -> Result<(), tokio_postgres::Error> {
        if self.events == 0 {
            return Ok(());
        }
        let doc_tenant: Vec<&str> = self.docs.iter().map(|d| d.tenant.as_str()).collect();
        let doc_type: Vec<&str> = self.docs.iter().map(|d| d.type_name.as_str()).collect();
        let doc_agg: Vec<&str> = self.docs.iter().map(|d| d.agg_id.as_str()).collect();
        let doc_version: Vec<i64> = self.docs.iter().map(|d| d.version).collect();
        let doc_state: Vec<&str> = self.docs.iter().map(|d| d.state.as_str()).collect();
        let doc_deleted: Vec<bool> = self.docs.iter().map(|d| d.deleted).collect();
        let doc_created: Vec<DateTime<Utc>> = self.docs.iter().map(|d| d.created_at).collect();
        let doc_updated: Vec<DateTime<Utc>> = self.docs.iter().map(|d| d.updated_at).collect();
        let new_last = (self.last_position + self.events) as i64;
        let event_params: [&(dyn ToSql + Sync); 10] = [
            &self.ev_position,
            &self.ev_tenant,
            &self.ev_type,
            &self.ev_agg,
            &self.ev_version,
            &self.ev_id,
            &self.ev_type_name,
            &self.ev_data,
            &self.ev_metadata,
            &self.ev_ts,
        ];
        let doc_params: [&(dyn ToSql + Sync); 8] =
            [&doc_tenant, &doc_type, &doc_agg, &doc_version, &doc_state, &doc_deleted, &doc_created, &doc_updated];
        let command_params: [&(dyn ToSql + Sync); 8] = [
            &self.cmd_tenant,
            &self.cmd_id,
            &self.cmd_fingerprint,
            &self.cmd_type,
            &self.cmd_agg,
            &self.cmd_first,
            &self.cmd_last,
            &self.cmd_extra,
        ];
        let counter_params: [&(dyn ToSql + Sync); 1] = [&new_last];
        let snapshots = SnapColumns::new(&self.snaps);
        let (inserted_events, _, inserted_commands, counters, inserted_snapshots) = tokio::try_join!(
            biased;
            client.execute(&statements.insert_events, &event_params),
            client.execute(&statements.upsert_documents, &doc_params),
            client.execute(&statements.insert_commands, &command_params),
            client.execute(&statements.update_counter, &counter_params),
            async {
                if self.snaps.is_empty() {
                    return Ok(0);
                }
                client.execute(&statements.insert_snapshots, &snapshots.params()).await
            },
        )?;
        // Each statement writes all its rows or fails (no `ON CONFLICT DO NOTHING`, the counter's
        // row is locked), so these hold whenever every statement succeeded.
        assert_eq!(inserted_events, self.events, "every planned event is inserted");
        assert_eq!(inserted_commands as usize, self.cmd_id.len(), "every planned command record is inserted");
        assert_eq!(counters, 1, "the position counter has exactly one row");
        assert_eq!(inserted_snapshots as usize, self.snaps.len(), "every planned snapshot is inserted");
        Ok(())
    }

    /// Round trip 2 of a batch: the writes, then `NOTIFY` and `COMMIT`, as one pipeline (sent in
    /// this order, run in this order; see [`lock_and_look_up`]). If any write fails, PostgreSQL
    /// aborts the transaction, the `NOTIFY` fails and the `COMMIT` is not run; the first error
    /// in pipeline order, the write's own, is returned, and the caller rolls back or discards the
    /// connection. The commit counts only when every write and the commit itself succeeded.
    async fn write_and_commit(
        &self,
        client: &ClientWrapper,
        statements: &Statements,
        channel: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let commit = commit_sql(channel, self.last_position, self.last_position + self.events);
        tokio::try_join!(biased; self.write(client, statements), client.batch_execute(&commit))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Live notifications (see the module documentation)

/// Events one read of the feed takes.
const FEED_PAGE_EVENTS: usize = 1_000;
/// How often the feed reads the store without a notification (the safety net).
const FEED_POLL_MS: u64 = 1_000;
/// Bounds of the wait before reconnecting the LISTEN connection (doubling from the first).
const LISTEN_BACKOFF_MS: (u64, u64) = (100, 5_000);

/// What feeds the commit listener: the position fed so far, and the LISTEN task.
struct Feed {
    /// The schema's notification channel: `sourced_commits_` and 16 hex digits.
    channel: String,
    /// Where the dedicated LISTEN connection goes (the pool's settings).
    config: tokio_postgres::Config,
    listener: OnceLock<Arc<dyn CommitListener>>,
    /// The highest position passed to the listener (or known to it as its head). Held across
    /// a read and the listener calls that follow, so feeds never interleave.
    fed: tokio::sync::Mutex<u64>,
    /// The highest head any notification announced.
    notified: AtomicU64,
    /// Wakes the LISTEN task: a notification came.
    wake: Notify,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
}

impl Feed {
    /// A feed for `schema` whose listener will hear commits after `head`.
    fn new(schema: &str, config: tokio_postgres::Config, head: u64, runtime: tokio::runtime::Handle) -> Feed {
        Feed {
            channel: format!("sourced_commits_{:016x}", crate::fnv1a(schema.as_bytes())),
            config,
            listener: OnceLock::new(),
            fed: tokio::sync::Mutex::new(head),
            notified: AtomicU64::new(0),
            wake: Notify::new(),
            stop: watch::channel(false).0,
            task: Mutex::new(None),
            runtime,
        }
    }

    /// Ends the LISTEN task, if any.
    async fn stop(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().expect("the feed task mutex is poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// After this process's writer committed `batch`: feeds what other processes committed
    /// below it (read from the store), then the batch's own events. Called before any append of
    /// the batch is acknowledged. When the read fails the LISTEN task is woken to retry, and the
    /// batch is acknowledged anyway (its events reach the listener from that task's read).
    async fn feed_local(&self, pool: &Pool, batch: &[Job], results: &[Result<Written, StoreError>]) {
        let Some(listener) = self.listener.get() else { return };
        // The batch's positions: contiguous, from its first appended event to its last.
        let mut span: Option<(u64, u64)> = None;
        for (job, result) in batch.iter().zip(results) {
            if let Ok(Written::Appended { first_position, .. }) = result {
                let last = first_position.0 + job.request.events.len() as u64 - 1;
                span = Some((span.map_or(first_position.0, |(first, _)| first), last));
            }
        }
        let Some((first, head)) = span else { return };
        let mut fed = self.fed.lock().await;
        if *fed >= head {
            return;
        }
        if !listener.wants_events() {
            listener.committed(Position(head), Vec::new());
            *fed = head;
            return;
        }
        if *fed + 1 < first
            && let Err(e) = feed_from_store(pool, listener.as_ref(), &mut fed, Some(first - 1)).await
        {
            tracing::warn!(error = %e, "cannot read other processes' commits for the live feed; retrying later");
            self.wake.notify_one();
            return;
        }
        let events: Vec<RecordedEvent> =
            committed_events(batch, results).into_iter().filter(|e| e.position.0 > *fed).collect();
        if events.first().map(|e| e.position.0) != Some(*fed + 1) {
            // Cannot happen (the read above stops only at `first - 1`); the store is the truth.
            tracing::error!(fed = *fed, first, "the live feed would skip positions; reading the store instead");
            self.wake.notify_one();
            return;
        }
        listener.committed(Position(head), events);
        *fed = head;
    }

    /// One pass of the LISTEN task: feeds everything committed after the fed position. With no
    /// one wanting events, only the head moves: the notified one, or (`poll`) the counter's.
    async fn feed_pass(&self, pool: &Pool, poll: bool) -> Result<(), StoreError> {
        let Some(listener) = self.listener.get() else { return Ok(()) };
        let mut fed = self.fed.lock().await;
        let notified = self.notified.load(Ordering::SeqCst);
        if !poll && notified <= *fed {
            return Ok(());
        }
        if !listener.wants_events() {
            let head = if notified > *fed {
                notified
            } else {
                let client = pool.get().await.map_err(pool_err)?;
                select_head(&client).await.map_err(pg_err)?
            };
            if head > *fed {
                listener.committed(Position(head), Vec::new());
                *fed = head;
            }
            return Ok(());
        }
        feed_from_store(pool, listener.as_ref(), &mut fed, None).await
    }
}

/// Reads the events after `*fed` (up to `upto`, or all) in position order across tenants and
/// passes them to `listener` page by page, moving `*fed` along. Positions must continue `*fed`
/// exactly (they are gap-free, and a visible position implies every lower one is visible).
async fn feed_from_store(
    pool: &Pool,
    listener: &dyn CommitListener,
    fed: &mut u64,
    upto: Option<u64>,
) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    loop {
        let limit = upto.map_or(FEED_PAGE_EVENTS as u64, |u| u.saturating_sub(*fed).min(FEED_PAGE_EVENTS as u64));
        if limit == 0 {
            return Ok(());
        }
        let page = read_global(&client, Position(*fed), limit as usize).await?;
        let Some(last) = page.last().map(|e| e.position.0) else { return Ok(()) };
        if page.first().map(|e| e.position.0) != Some(*fed + 1) || last != *fed + page.len() as u64 {
            return Err(StoreError::Corrupt(format!(
                "the live feed read positions {:?}..={last} after position {fed}",
                page.first().map(|e| e.position.0)
            )));
        }
        let full = page.len() as u64 == limit;
        listener.committed(Position(last), page);
        *fed = last;
        if !full {
            return Ok(());
        }
    }
}

/// The LISTEN task: one dedicated connection, reconnected with backoff; a feed pass after each
/// (re)connect, on each notification and on a timer.
async fn listen_loop(feed: Arc<Feed>, pool: Pool) {
    let mut stop = feed.stop.subscribe();
    let mut backoff_ms = LISTEN_BACKOFF_MS.0;
    let mut ticks = tokio::time::interval(Duration::from_millis(FEED_POLL_MS));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        match listen(&feed).await {
            Ok((client, mut driver)) => {
                tracing::debug!(channel = %feed.channel, "listening for commits of other processes");
                backoff_ms = LISTEN_BACKOFF_MS.0;
                let mut poll = true;
                loop {
                    if let Err(e) = feed.feed_pass(&pool, poll).await {
                        tracing::warn!(error = %e, "the live feed cannot read the store; retrying");
                    }
                    poll = tokio::select! {
                        _ = stop.changed() => break,
                        ended = &mut driver => {
                            let reason = ended.unwrap_or_else(|e| e.to_string());
                            tracing::warn!(reason, "the LISTEN connection ended; reconnecting");
                            break;
                        }
                        _ = feed.wake.notified() => false,
                        _ = ticks.tick() => true,
                    };
                }
                drop(client);
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, backoff_ms, "cannot LISTEN for commits; retrying"),
        }
        // Disconnected: the timer's pass still runs through the pool, then a wait.
        if let Err(e) = feed.feed_pass(&pool, true).await {
            tracing::debug!(error = %e, "the live feed cannot read the store");
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
        }
        backoff_ms = (backoff_ms * 2).min(LISTEN_BACKOFF_MS.1);
    }
}

/// Opens the dedicated connection, starts the task that drives it (recording notifications and
/// waking the feed), and `LISTEN`s. The task's result says why the connection ended.
async fn listen(feed: &Arc<Feed>) -> Result<(tokio_postgres::Client, JoinHandle<String>), tokio_postgres::Error> {
    let (client, mut connection) = feed.config.connect(NoTls).await?;
    let sink = Arc::clone(feed);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Ok(head) = n.payload().parse::<u64>() {
                        sink.notified.fetch_max(head, Ordering::SeqCst);
                    }
                    sink.wake.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "closed by the server".to_owned(),
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {}", feed.channel)).await {
        driver.abort();
        return Err(e);
    }
    Ok((client, driver))
}

/// The events after `after`, across tenants, in position order, at most `limit`.
async fn read_global(client: &ClientWrapper, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
    let limit = limit.min(READ_LIMIT_MAX);
    if limit == 0 {
        return Ok(Vec::new());
    }
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
const EVENT_COLUMNS: &str = "position, version, event_id, event_type, data::text, metadata::text, ts";

/// The events of `scope` meeting `condition` (the SQL after `WHERE`, with its order and limit).
async fn select_events(
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

// ---------------------------------------------------------------------------------------------
// Decoding

/// An event from a row of [`EVENT_COLUMNS`] and then `key_count` key columns of `scope`.
fn decode_event(r: &Row, scope: &EventScope<'_>, key_count: usize) -> Result<RecordedEvent, StoreError> {
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
fn decode_document(r: &Row, tenant: &TenantId, type_name: &TypeName) -> Result<DocumentRow, StoreError> {
    decode_document_text(r, tenant, type_name)?.parse()
}

fn decode_document_text(r: &Row, tenant: &TenantId, type_name: &TypeName) -> Result<DocumentText, StoreError> {
    let agg_id: String = r.try_get(0).map_err(pg_err)?;
    let id = AggregateId::parse(&agg_id).map_err(|v| corrupt_row("sourced_documents.agg_id", v.message))?;
    let version = Version(from_sql_int(r.try_get(1).map_err(pg_err)?, "version")?);
    if version == Version::ZERO {
        return Err(StoreError::Corrupt(format!("{tenant}/{type_name}/{id}: a read-model row at version 0")));
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
fn decode_command(r: &Row) -> Result<CommandRecord, StoreError> {
    let tenant: String = r.try_get(0).map_err(pg_err)?;
    let id = CommandId(r.try_get(1).map_err(pg_err)?);
    let type_name: String = r.try_get(3).map_err(pg_err)?;
    let agg_id: String = r.try_get(4).map_err(pg_err)?;
    let first_version = Version(from_sql_int(r.try_get(5).map_err(pg_err)?, "first_version")?);
    let last_version = Version(from_sql_int(r.try_get(6).map_err(pg_err)?, "last_version")?);
    let extra: String = r.try_get(7).map_err(pg_err)?;
    if first_version == Version::ZERO || last_version < first_version {
        return Err(StoreError::Corrupt(format!(
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

// ---------------------------------------------------------------------------------------------
// Conversions and errors

type PgParam = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

fn pg_params(params: &[Param]) -> Vec<PgParam> {
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

fn pg_param_refs(params: &[PgParam]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

/// Whether an error means the database cannot be reached or cannot serve now (and a retry
/// later may succeed): a lost or refused connection, a server shutting down or out of
/// resources, a lock wait that timed out, a read-only server.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
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
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if is_unavailable(&e) {
        return StoreError::Unavailable(format!("PostgreSQL: {e}"));
    }
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("XX00") => StoreError::Corrupt(format!("PostgreSQL: {e}")),
        None if e.to_string().contains("deserializ") => StoreError::Corrupt(format!("PostgreSQL: {e}")),
        _ => match e.as_db_error() {
            Some(db) => StoreError::Backend(format!("PostgreSQL: {}: {}", db.code().code(), db.message())),
            None => StoreError::Backend(format!("PostgreSQL: {e}")),
        },
    }
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("timed out getting a PostgreSQL connection ({kind:?})"))
        }
        PoolError::Backend(e) => match pg_err(e) {
            StoreError::Backend(m) => StoreError::Unavailable(m),
            other => other,
        },
        PoolError::Closed => StoreError::Closed,
        other => StoreError::Backend(format!("PostgreSQL pool: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(PostgresOptions::default().validate().is_ok());
        let bad = PostgresOptions {
            batch_appends_max: 0,
            pool_size: 1,
            queue_capacity: 0,
            connect_timeout_ms: 0,
            lock_timeout_ms: TIMEOUT_MS_MAX + 1,
            feed_pool_size: 0,
        };
        match bad.validate() {
            Err(StoreError::InvalidRequest(m)) => {
                for name in [
                    "batch_appends_max",
                    "pool_size",
                    "queue_capacity",
                    "connect_timeout_ms",
                    "lock_timeout_ms",
                    "feed_pool_size",
                ] {
                    assert!(m.contains(name), "{m}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

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
