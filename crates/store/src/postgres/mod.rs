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
use tokio_postgres::{AsyncMessage, Row, SimpleQueryMessage, Statement};
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
    READ_LIMIT_MAX, RebuiltStream, StoreError, StoreStats, Wake,
};
use sourced_core::query::FieldPath;

mod decode;
mod feed;
mod lease;
mod schema;
pub mod tls;
mod writer;

use decode::{
    decode_command, decode_document, decode_document_text, is_unavailable, pg_err, pg_param_refs, pg_params, pool_err,
    read_global, select_events,
};
use feed::Feed;
pub use lease::lease_key as runner_lease_key;
use schema::{MIGRATION_LOCK_KEY, check_synchronous_commit, migrate, select_head, show_synchronous_commit};
use writer::{INSERT_SNAPSHOTS, SnapColumns, SnapWrite, head_key, write_loop};
pub use writer::{LOOK_UP_COMMANDS, LOOK_UP_HEADS};

pub use crate::limits::BATCH_APPENDS_MAX;
pub use crate::limits::BATCH_EVENTS_MAX;
pub use crate::limits::POOL_SIZE_MAX;
pub use crate::limits::QUEUE_CAPACITY_MAX;
pub use crate::limits::TIMEOUT_MS_MAX;

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
        let as_u64 = |n: usize| n as u64;
        crate::check_options(&[
            ("batch_appends_max", as_u64(self.batch_appends_max), 1, as_u64(BATCH_APPENDS_MAX)),
            ("pool_size", as_u64(self.pool_size), 2, as_u64(POOL_SIZE_MAX)),
            ("feed_pool_size", as_u64(self.feed_pool_size), 1, as_u64(POOL_SIZE_MAX)),
            ("queue_capacity", as_u64(self.queue_capacity), 1, as_u64(QUEUE_CAPACITY_MAX)),
            ("connect_timeout_ms", self.connect_timeout_ms, 1, TIMEOUT_MS_MAX),
            ("lock_timeout_ms", self.lock_timeout_ms, 1, TIMEOUT_MS_MAX),
        ])
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
    /// The runner leases' own connections (see `lease.rs`).
    leases: lease::Leases,
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
    let (url, _) = tls::split_url(url)?;
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|e| StoreError::invalid_request(format!("not a PostgreSQL URL: {e}")).with_source(e))
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`, optionally with
    /// `?options=-csearch_path%3DNAME`), brings the schema up to date and starts the writer.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        options.validate()?;
        let (url, tls) = tls::split_url(url)?;
        let connector = tls::connector(&tls)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::invalid_request(format!("not a PostgreSQL URL: {e}")).with_source(e))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::backend("the PostgreSQL store needs a tokio runtime"))?;
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
            let manager = Manager::from_config(
                config,
                connector.clone(),
                ManagerConfig { recycling_method: RecyclingMethod::Fast },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(connect_timeout))
                .create_timeout(Some(connect_timeout))
                .recycle_timeout(Some(connect_timeout))
                .build()
                .map_err(|e| StoreError::backend(format!("cannot build the PostgreSQL pool: {e}")).with_source(e))
        };
        let pool = build(config.clone(), options.pool_size)?;
        let feed_pool = build(config, options.feed_pool_size)?;
        let (schema, head) = {
            let mut client = pool.get().await.map_err(pool_err)?;
            check_synchronous_commit(&show_synchronous_commit(&client).await?)?;
            let schema = migrate(&mut client).await?;
            (schema, select_head(&client).await.map_err(pg_err)?)
        };
        let leases = lease::Leases::new(listen_config.clone(), connector.clone(), &schema, connect_timeout);
        let feed = Arc::new(Feed::new(&schema, listen_config, connector, head, runtime));
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
            leases,
        })
    }

    /// `synchronous_commit` as the store's connections run with it (`SHOW`): `on`, whatever
    /// the URL asked (see the module documentation).
    pub async fn synchronous_commit(&self) -> Result<String, StoreError> {
        let (writer, feed) = (self.client().await?, self.feed_pool.get().await.map_err(pool_err)?);
        let (writer, feed) = (show_synchronous_commit(&writer).await?, show_synchronous_commit(&feed).await?);
        if writer != feed {
            return Err(StoreError::backend(format!(
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
        let Some(limit) = crate::read_limit(limit) else { return Ok(Vec::new()) };
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
        let Some(limit) = crate::read_limit(query.limit) else { return Ok(Vec::new()) };
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

    async fn checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let client = self.client().await?;
        let stmt =
            client.prepare_cached("SELECT position FROM sourced_checkpoints WHERE name = $1").await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&name]).await.map_err(pg_err)?;
        Ok(row.map(|r| Position(r.get::<_, i64>(0).max(0) as u64)))
    }

    async fn runner_lease(&self, name: &str) -> Result<Option<crate::RunnerLease>, StoreError> {
        self.leases.take(name).await
    }

    async fn due_wakes(&self, process: &str, at: DateTime<Utc>, limit: usize) -> Result<Vec<Wake>, StoreError> {
        let limit = limit.min(READ_LIMIT_MAX) as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT tenant, type, agg_id, due FROM sourced_wakes WHERE process = $1 AND due <= $2
                 ORDER BY due, tenant, type, agg_id LIMIT $3",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&process, &at, &limit]).await.map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                let (t, ty, id): (String, String, String) =
                    (r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?, r.try_get(2).map_err(pg_err)?);
                Ok(Wake {
                    key: StreamKey {
                        tenant: TenantId::parse(&t).map_err(|v| corrupt_row("sourced_wakes.tenant", v.message))?,
                        type_name: TypeName::parse(&ty).map_err(|v| corrupt_row("sourced_wakes.type", v.message))?,
                        id: AggregateId::parse(&id).map_err(|v| corrupt_row("sourced_wakes.agg_id", v.message))?,
                    },
                    due: r.try_get(3).map_err(pg_err)?,
                })
            })
            .collect()
    }

    async fn put_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        let client = self.client().await?;
        let position = i64::try_from(position.0).unwrap_or(i64::MAX);
        client
            .execute(
                "INSERT INTO sourced_checkpoints (name, position) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET position = GREATEST(sourced_checkpoints.position, excluded.position)",
                &[&name, &position],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn start_checkpoint(&self, name: &str, position: Position) -> Result<Position, StoreError> {
        let client = self.client().await?;
        let at = i64::try_from(position.0).unwrap_or(i64::MAX);
        // Two statements: a concurrent insert makes this one wait, then do nothing, and only a
        // later statement's snapshot sees the row it committed.
        client
            .execute(
                "INSERT INTO sourced_checkpoints (name, position) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &at],
            )
            .await
            .map_err(pg_err)?;
        drop(client);
        Ok(self.checkpoint(name).await?.unwrap_or(position))
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
        self.leases.close().await;
        self.pool.close();
        self.feed_pool.close();
    }

    fn stats(&self) -> StoreStats {
        self.counters.stats()
    }

    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) -> bool {
        !self.writer.is_closed() && self.feed.start(listener, self.pool.clone())
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
}
