//! The embedded backend: SQLite in WAL mode with one writer thread that commits concurrent
//! appends in batches (group commit), and a small pool of read-only connections (SPEC §7.1).
//!
//! Why one writer: SQLite allows one writing transaction at a time anyway, so a single thread
//! that owns the write connection loses nothing and gains a lot. It can put every append that
//! is waiting into one transaction (one fsync for the lot), it can keep the next global
//! position in memory (positions are then gap-free and increase in commit order, SPEC §7.3),
//! and no append ever waits on SQLite's busy handler. Each append runs in its own SAVEPOINT
//! inside the batch, so a conflict or a failure undoes that append alone; an append's caller
//! hears back only after the batch's COMMIT has returned, so an acknowledged write is durable
//! (`synchronous=FULL`).
//!
//! Reads go to read-only connections, each behind a mutex, on tokio's blocking pool. WAL
//! lets them read the last committed state while the writer commits. Feed reads (`read_all`,
//! `read_global`: subscriptions catching up, exports) have connections of their own, so a long
//! catch-up never holds the connection a GET or a command's read needs.
//!
//! The head (the last committed position) is kept in memory: loaded at open, moved by the
//! writer after each commit and before the commit listener or any caller hears of it, so
//! [`EventStore::head`] reads no event.
//!
//! The WAL is bounded: a checkpointer thread copies it back into the database (PASSIVE, never
//! waiting for readers) every few commits; when the WAL file outgrows
//! [`SqliteOptions::wal_bytes_max`] the writer itself runs a TRUNCATE checkpoint, waiting at
//! most [`WAL_TRUNCATE_WAIT_MS`] for readers and trying again a few commits later if they are
//! still in the way; and the writer's last act at shutdown is a TRUNCATE checkpoint, so a
//! closed store leaves an empty WAL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use sourced_core::timestamp::{from_micros, to_micros, truncate};
use sourced_core::{
    Aggregate, AggregateId, CommandId, EventId, Position, RecordedEvent, StreamHead, StreamKey, TenantId, TypeName,
    Version,
};

use crate::append::{
    self, Counters, Decision, Encoded, Job, WriterHandle, WriterSlot, Written, committed_events, decide_append,
};
use crate::listing::{self, Dialect, Param};
use crate::sql::{EventScope, clamp_sql_int, corrupt_row, from_json, from_sql_int, to_json, to_sql_int};
use crate::{
    AppendOutcome, AppendRequest, CommandRecord, CommitListener, DocumentRow, DocumentText, EventStore, ListQuery,
    READ_LIMIT_MAX, RebuiltStream, StoreError, StoreStats, Wake,
};
use sourced_core::query::FieldPath;

/// The schema version this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 3;

/// The migrations, in order: entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: events, read model, command records.
    "
    CREATE TABLE events (
        position   INTEGER PRIMARY KEY,
        tenant     TEXT    NOT NULL,
        type       TEXT    NOT NULL,
        agg_id     TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        event_id   TEXT    NOT NULL,
        event_type TEXT    NOT NULL,
        data       TEXT    NOT NULL,
        metadata   TEXT    NOT NULL,
        ts         INTEGER NOT NULL,
        UNIQUE (tenant, type, agg_id, version)
    );
    CREATE INDEX events_tenant_position ON events (tenant, position);
    CREATE TABLE documents (
        tenant     TEXT    NOT NULL,
        type       TEXT    NOT NULL,
        agg_id     TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        state      TEXT    NOT NULL,
        deleted    INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, type, agg_id)
    ) WITHOUT ROWID;
    CREATE TABLE commands (
        tenant        TEXT    NOT NULL,
        command_id    TEXT    NOT NULL,
        fingerprint   TEXT    NOT NULL,
        type          TEXT    NOT NULL,
        agg_id        TEXT    NOT NULL,
        first_version INTEGER NOT NULL,
        last_version  INTEGER NOT NULL,
        extra         TEXT    NOT NULL,
        PRIMARY KEY (tenant, command_id)
    ) WITHOUT ROWID;
    ",
    // 1 → 2: snapshots (SPEC §5).
    "
    CREATE TABLE snapshots (
        tenant     TEXT    NOT NULL,
        type       TEXT    NOT NULL,
        agg_id     TEXT    NOT NULL,
        version    INTEGER NOT NULL,
        fold       INTEGER NOT NULL,
        state      TEXT    NOT NULL,
        deleted    INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, type, agg_id, version)
    ) WITHOUT ROWID;
    ",
    // 2 → 3: process managers' checkpoints and wake-ups (SPEC §4.5).
    "
    CREATE TABLE checkpoints (
        name     TEXT    NOT NULL PRIMARY KEY,
        position INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE wakes (
        process TEXT    NOT NULL,
        tenant  TEXT    NOT NULL,
        type    TEXT    NOT NULL,
        agg_id  TEXT    NOT NULL,
        due     INTEGER NOT NULL,
        PRIMARY KEY (process, tenant, type, agg_id)
    ) WITHOUT ROWID;
    CREATE INDEX wakes_by_due ON wakes (process, due, tenant, type, agg_id);
    ",
];

/// Moves a checkpoint, never back.
const UPSERT_CHECKPOINT: &str = "INSERT INTO checkpoints (name, position) VALUES (?1, ?2)
     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position)";

/// How long a connection waits for a lock held by another connection (another process, or a
/// checkpoint) before it reports [`StoreError::Unavailable`].
const BUSY_TIMEOUT_MS: u64 = 5_000;
pub use crate::limits::BATCH_APPENDS_MAX;
pub use crate::limits::QUEUE_CAPACITY_MAX;
pub use crate::limits::READERS_MAX;
/// Smallest WAL bound a store may be given.
pub const WAL_BYTES_MIN: u64 = 64 * 1024;
/// How long the writer's TRUNCATE checkpoint waits for readers before it gives up (for now).
pub const WAL_TRUNCATE_WAIT_MS: u64 = 100;
/// Commits after which a TRUNCATE checkpoint that readers blocked is tried again.
const WAL_TRUNCATE_RETRY_COMMITS: u32 = 16;

/// Tuning of a [`SqliteStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Most appends committed in one transaction (one fsync); 1 ..= [`BATCH_APPENDS_MAX`].
    pub batch_appends_max: usize,
    /// Number of read-only connections; 1 ..= [`READERS_MAX`].
    pub readers: usize,
    /// Most appends waiting for the writer; a caller beyond it waits for room (back-pressure);
    /// 1 ..= [`QUEUE_CAPACITY_MAX`].
    pub queue_capacity: usize,
    /// Read-only connections of the feed reads (`read_all`, `read_global`), apart from the
    /// others; 1 ..= [`READERS_MAX`].
    pub feed_readers: usize,
    /// Size of the WAL file past which the writer truncates it (see the module documentation);
    /// at least [`WAL_BYTES_MIN`]. Also SQLite's `journal_size_limit`.
    pub wal_bytes_max: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { batch_appends_max: 512, readers: 4, queue_capacity: 4_096, feed_readers: 2, wal_bytes_max: 64 << 20 }
    }
}

impl SqliteOptions {
    fn validate(&self) -> Result<(), StoreError> {
        let as_u64 = |n: usize| n as u64;
        crate::check_options(&[
            ("batch_appends_max", as_u64(self.batch_appends_max), 1, as_u64(BATCH_APPENDS_MAX)),
            ("readers", as_u64(self.readers), 1, as_u64(READERS_MAX)),
            ("queue_capacity", as_u64(self.queue_capacity), 1, as_u64(QUEUE_CAPACITY_MAX)),
            ("feed_readers", as_u64(self.feed_readers), 1, as_u64(READERS_MAX)),
            // Stored in a signed SQLite integer.
            ("wal_bytes_max", self.wal_bytes_max, WAL_BYTES_MIN, i64::MAX as u64),
        ])
    }
}

/// The embedded event store: one SQLite file in WAL mode (see the module documentation).
pub struct SqliteStore {
    path: PathBuf,
    writer: WriterSlot<Writer>,
    readers: Arc<ReaderPool>,
    /// The feed reads' own connections (see the module documentation).
    feed_readers: Arc<ReaderPool>,
    counters: Arc<Counters>,
    /// The last committed position; moved by the writer only, after a commit and before
    /// anyone hears of it.
    head: Arc<AtomicU64>,
    /// Hears every commit, from the writer thread (see [`CommitListener`]).
    listener: Arc<OnceLock<Arc<dyn CommitListener>>>,
    /// Names of the read model's field indexes (see [`EventStore::ensure_indexes`]).
    indexes: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    /// The runner leases held (the file lock already keeps other processes out).
    leases: crate::LocalLeases,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).field("stats", &self.stats()).finish()
    }
}

/// The handle on the writer thread.
struct Writer {
    sender: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
    /// Ends when the writer thread does (it holds the only request sender).
    checkpointer: JoinHandle<()>,
}

impl WriterHandle for Writer {
    fn sender(&self) -> &mpsc::Sender<Job> {
        &self.sender
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) the database at `path`,
    /// brings its schema up to date, and starts the writer thread.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        options.validate()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::unavailable(format!("cannot create the directory {}: {e}", parent.display())).with_source(e)
            })?;
        }

        let mut conn = Connection::open(path).map_err(sql_err)?;
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(sql_err)?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::backend(format!("{} cannot use WAL (journal mode is {mode})", path.display())));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql_err)?;
        let wal_bytes_max = i64::try_from(options.wal_bytes_max).unwrap_or(i64::MAX);
        conn.pragma_update(None, "journal_size_limit", wal_bytes_max).map_err(sql_err)?;
        tune(&conn)?;
        migrate(&mut conn)?;
        let next_position = load_next_position(&conn)?;
        let indexes = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'documents'")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>())
            .map_err(sql_err)?;

        let readers = Arc::new(ReaderPool::open(path, options.readers)?);
        let feed_readers = Arc::new(ReaderPool::open(path, options.feed_readers)?);
        let counters = Arc::new(Counters::default());
        let head = Arc::new(AtomicU64::new(next_position - 1));
        // Checkpoints run on their own thread and connection, not inside the writer's commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(sql_err)?;
        let checkpointer_conn = Connection::open(path).map_err(sql_err)?;
        checkpointer_conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(sql_err)?;
        let (checkpoint, checkpoint_requests) = std::sync::mpsc::sync_channel(1);
        let checkpointer = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer_conn, checkpoint_requests))
            .map_err(|e| {
                StoreError::unavailable(format!("cannot start the SQLite checkpointer thread: {e}")).with_source(e)
            })?;
        let (sender, receiver) = mpsc::channel(options.queue_capacity);
        let listener: Arc<OnceLock<Arc<dyn CommitListener>>> = Arc::new(OnceLock::new());
        let thread = {
            let counters = Arc::clone(&counters);
            let head = Arc::clone(&head);
            let listener = Arc::clone(&listener);
            let batch_appends_max = options.batch_appends_max;
            let wal = Wal { path: wal_path(path), bytes_max: options.wal_bytes_max };
            std::thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || {
                    let writer = WriterState { counters: &counters, head: &head, checkpoint, listener: &listener, wal };
                    write_loop(conn, receiver, batch_appends_max, next_position, writer)
                })
                .map_err(|e| {
                    StoreError::unavailable(format!("cannot start the SQLite writer thread: {e}")).with_source(e)
                })?
        };
        tracing::debug!(path = %path.display(), next_position, "opened the SQLite store");
        Ok(SqliteStore {
            path: path.to_owned(),
            writer: WriterSlot::new(Writer { sender, thread, checkpointer }, "SQLite"),
            readers,
            feed_readers,
            counters,
            head,
            listener,
            indexes: Arc::new(std::sync::RwLock::new(indexes)),
            leases: crate::LocalLeases::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends handed to the writer and not answered yet (queued, or in the batch being
    /// committed), for metrics. It may briefly count low, never high.
    pub fn pending_appends(&self) -> u64 {
        self.counters.pending_appends()
    }

    /// Whether [`EventStore::close`] has begun: appends are refused from then on.
    pub fn is_closed(&self) -> bool {
        self.writer.is_closed()
    }

    /// Runs `f` on a read connection, on tokio's blocking pool.
    /// The latest snapshot of `fold` meeting `condition` (on `?4`, bound to `bound`).
    async fn snapshot_where(
        &self,
        condition: &'static str,
        key: &StreamKey,
        fold: u32,
        bound: i64,
    ) -> Result<Option<Aggregate>, StoreError> {
        let key = key.clone();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT version, state, deleted, created_at, updated_at FROM snapshots
                     WHERE tenant = ?1 AND type = ?2 AND agg_id = ?3 AND {condition} AND fold = ?5
                     ORDER BY version DESC LIMIT 1"
                ))
                .map_err(sql_err)?;
            let row = stmt
                .query_row(params![key.tenant.as_str(), key.type_name.as_str(), key.id.as_str(), bound, fold], |r| {
                    <(i64, String, bool, i64, i64)>::try_from(r)
                })
                .optional()
                .map_err(sql_err)?;
            let Some((version, state, deleted, created, updated)) = row else { return Ok(None) };
            let state = from_json(&state, "snapshots.state")?;
            Ok(Some(Aggregate {
                version: Version(from_sql_int(version, "snapshots.version")?),
                state: (!state.is_null()).then_some(state),
                deleted,
                created_at: Some(from_micros(created)),
                updated_at: Some(from_micros(updated)),
            }))
        })
        .await
    }

    /// Runs `f` on a connection of its own, outside the writer thread (maintenance writes:
    /// rebuild). SQLite's lock keeps it apart from the writer's transactions.
    async fn side_write<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open(&path).map_err(sql_err)?;
            conn.busy_timeout(Duration::from_secs(60)).map_err(sql_err)?;
            conn.pragma_update(None, "synchronous", "FULL").map_err(sql_err)?;
            f(&conn).map_err(write_err)
        })
        .await
        .map_err(|e| StoreError::backend(format!("the maintenance task failed: {e}")).with_source(e))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::read_on(&self.readers, f).await
    }

    /// Runs `f` on a connection of `pool`, on tokio's blocking pool.
    async fn read_on<T, F>(pool: &Arc<ReaderPool>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = Arc::clone(pool);
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .map_err(|e| StoreError::backend(format!("a SQLite read task failed: {e}")).with_source(e))?
    }

    /// Takes the writer out (later appends get `Closed`) and waits for its thread to finish
    /// the queued appends. Blocking.
    fn stop_writer(writer: Option<Writer>) {
        if let Some(Writer { sender, thread, checkpointer }) = writer {
            // The thread ends when every sender is gone and the queue is empty; appends in
            // flight hold clones until their job is queued.
            drop(sender);
            if thread.join().is_err() {
                tracing::error!("the SQLite writer thread panicked");
            }
            if checkpointer.join().is_err() {
                tracing::error!("the SQLite checkpointer thread panicked");
            }
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        let writer = self.writer.take_mut();
        Self::stop_writer(writer);
    }
}

#[async_trait]
impl EventStore for SqliteStore {
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
        let upper = to.map_or(i64::MAX, |v| clamp_sql_int(v.0));
        if limit == 0 || to.is_some_and(|to| to <= after) {
            return Ok(Vec::new());
        }
        let key = key.clone();
        self.counters.counted(self.read(move |conn| read_stream(conn, &key, after, upper, limit)).await)
    }

    async fn read_all(
        &self,
        tenant: &TenantId,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let Some(limit) = crate::read_limit(limit) else { return Ok(Vec::new()) };
        let tenant = tenant.clone();
        self.counters
            .counted(Self::read_on(&self.feed_readers, move |conn| read_all(conn, &tenant, after, limit)).await)
    }

    async fn read_global(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let Some(limit) = crate::read_limit(limit) else { return Ok(Vec::new()) };
        self.counters.counted(Self::read_on(&self.feed_readers, move |conn| read_global(conn, after, limit)).await)
    }

    async fn get_document(&self, key: &StreamKey) -> Result<Option<DocumentRow>, StoreError> {
        self.get_document_text(key).await?.map(DocumentText::parse).transpose()
    }

    async fn get_document_text(&self, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
        fn query(conn: &Connection, key: &StreamKey) -> Result<Option<DocumentText>, StoreError> {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT agg_id, version, state, deleted, created_at, updated_at FROM documents
                     WHERE tenant = ?1 AND type = ?2 AND agg_id = ?3",
                )
                .map_err(sql_err)?;
            let raw = stmt
                .query_row(params![key.tenant.as_str(), key.type_name.as_str(), key.id.as_str()], RawDocument::from_row)
                .optional()
                .map_err(sql_err)?;
            raw.map(|raw| raw.decode_text(&key.tenant, &key.type_name)).transpose()
        }
        // A point lookup costs less than the hand-off to the blocking pool: run it here when a
        // reader is free (WAL readers do not wait for the writer).
        if let Some(result) = self.readers.try_with(|conn| query(conn, key)) {
            return result;
        }
        let key = key.clone();
        self.read(move |conn| query(conn, &key)).await
    }

    async fn list_documents(&self, query: &ListQuery) -> Result<Vec<DocumentRow>, StoreError> {
        crate::check_list(query)?;
        let Some(limit) = crate::read_limit(query.limit) else { return Ok(Vec::new()) };
        let query = query.clone();
        let indexes = Arc::clone(&self.indexes);
        self.read(move |conn| {
            let indexes = indexes.read().expect("the index set lock is poisoned");
            let sql = listing::select_hinted(Dialect::Sqlite, &query, limit, &|name| indexes.contains(name));
            // Statements are cached by text; the cache is bounded (LRU).
            let mut stmt = conn.prepare_cached(&sql.text).map_err(sql_err)?;
            let raws = stmt
                .query_map(rusqlite::params_from_iter(sql.params.iter().map(to_sql_param)), RawDocument::from_row)
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            let rows = raws
                .into_iter()
                .map(|raw| raw.decode(&query.tenant, &query.type_name))
                .collect::<Result<Vec<_>, _>>()?;
            crate::check_list_read(&query, &rows)?;
            Ok(rows)
        })
        .await
    }

    async fn count_documents(&self, query: &ListQuery) -> Result<u64, StoreError> {
        crate::check_list(query)?;
        let query = query.clone();
        self.read(move |conn| {
            let sql = listing::count(Dialect::Sqlite, &query);
            let mut stmt = conn.prepare_cached(&sql.text).map_err(sql_err)?;
            let n: i64 = stmt
                .query_row(rusqlite::params_from_iter(sql.params.iter().map(to_sql_param)), |r| r.get(0))
                .map_err(sql_err)?;
            from_sql_int(n, "count")
        })
        .await
    }

    async fn ensure_indexes(&self, fields: &[FieldPath]) -> Result<Vec<String>, StoreError> {
        let (names, ddl): (Vec<String>, Vec<String>) = fields.iter().map(|f| Dialect::Sqlite.index_ddl(f)).unzip();
        // DDL takes the write lock: on a connection of its own, never a reader's.
        self.side_write(move |conn| ddl.iter().try_for_each(|d| conn.execute_batch(d))).await?;
        self.indexes.write().expect("the index set lock is poisoned").extend(names.iter().cloned());
        Ok(names)
    }

    async fn load_snapshot(
        &self,
        key: &StreamKey,
        fold: u32,
        at_most: Option<Version>,
    ) -> Result<Option<Aggregate>, StoreError> {
        let at_most = at_most.map_or(i64::MAX, |v| clamp_sql_int(v.0));
        self.snapshot_where("version <= ?4", key, fold, at_most).await
    }

    async fn load_snapshot_at(
        &self,
        key: &StreamKey,
        fold: u32,
        at: DateTime<Utc>,
    ) -> Result<Option<Aggregate>, StoreError> {
        self.snapshot_where("updated_at <= ?4", key, fold, to_micros(&at)).await
    }

    async fn list_streams(&self, after: Option<&StreamKey>, limit: usize) -> Result<Vec<StreamKey>, StoreError> {
        let limit = limit.min(READ_LIMIT_MAX);
        let after =
            after.map(|k| (k.tenant.as_str().to_owned(), k.type_name.as_str().to_owned(), k.id.as_str().to_owned()));
        self.read(move |conn| {
            let (t, ty, id) = after.unwrap_or_default();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT tenant, type, agg_id FROM events
                     WHERE version = 1 AND (tenant, type, agg_id) > (?1, ?2, ?3)
                     ORDER BY tenant, type, agg_id LIMIT ?4",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![t, ty, id, to_sql_int(limit as u64)?], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows.into_iter().map(|(t, ty, id)| stream_key(&t, &ty, &id, "events")).collect()
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let name = name.to_owned();
        let position = self
            .read(move |conn| {
                conn.prepare_cached("SELECT position FROM checkpoints WHERE name = ?1")
                    .map_err(sql_err)?
                    .query_row(params![name], |r| r.get::<_, i64>(0))
                    .optional()
                    .map_err(sql_err)
            })
            .await?;
        position.map(|p| from_sql_int(p, "checkpoints.position").map(Position)).transpose()
    }

    async fn runner_lease(&self, name: &str) -> Result<Option<crate::RunnerLease>, StoreError> {
        self.writer.check()?;
        Ok(self.leases.take(name))
    }

    async fn due_wakes(&self, process: &str, at: DateTime<Utc>, limit: usize) -> Result<Vec<Wake>, StoreError> {
        let (process, at, limit) = (process.to_owned(), to_micros(&at), to_sql_int(limit.min(READ_LIMIT_MAX) as u64)?);
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT tenant, type, agg_id, due FROM wakes WHERE process = ?1 AND due <= ?2
                     ORDER BY due, tenant, type, agg_id LIMIT ?3",
                )
                .map_err(sql_err)?
                .query_map(params![process, at, limit], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows.into_iter()
                .map(|(t, ty, id, due)| Ok(Wake { key: stream_key(&t, &ty, &id, "wakes")?, due: from_micros(due) }))
                .collect()
        })
        .await
    }

    async fn put_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        let (name, position) = (name.to_owned(), to_sql_int(position.0)?);
        self.side_write(move |conn| conn.execute(UPSERT_CHECKPOINT, params![name, position]).map(|_| ())).await
    }

    async fn start_checkpoint(&self, name: &str, position: Position) -> Result<Position, StoreError> {
        let (owned, at) = (name.to_owned(), to_sql_int(position.0)?);
        self.side_write(move |conn| {
            conn.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                params![owned, at],
            )
            .map(|_| ())
        })
        .await?;
        Ok(self.checkpoint(name).await?.unwrap_or(position))
    }

    async fn clear_read_model(&self) -> Result<(), StoreError> {
        self.side_write(|conn| conn.execute_batch("DELETE FROM documents; DELETE FROM snapshots;")).await
    }

    async fn put_read_model(&self, streams: Vec<RebuiltStream>) -> Result<(), StoreError> {
        // The JSON texts: the row's state, then each snapshot's.
        let mut encoded: Vec<(String, Vec<String>)> = Vec::with_capacity(streams.len());
        for s in &streams {
            let snapshots = s
                .snapshots
                .iter()
                .map(|a| to_json(a.state.as_ref().unwrap_or(&Value::Null)))
                .collect::<Result<Vec<_>, _>>()?;
            encoded.push((to_json(&s.row.state)?, snapshots));
        }
        self.side_write(move |conn| {
            let tx = conn.unchecked_transaction()?;
            for (s, (state, snapshots)) in streams.iter().zip(&encoded) {
                let k = &s.row.key;
                let key_params = params![k.tenant.as_str(), k.type_name.as_str(), k.id.as_str()];
                tx.prepare_cached("DELETE FROM snapshots WHERE tenant = ?1 AND type = ?2 AND agg_id = ?3")?
                    .execute(key_params)?;
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO documents
                     (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    k.tenant.as_str(),
                    k.type_name.as_str(),
                    k.id.as_str(),
                    clamp_sql_int(s.row.version.0),
                    state,
                    s.row.deleted,
                    to_micros(&s.row.created_at),
                    to_micros(&s.row.updated_at),
                ])?;
                for (a, state) in s.snapshots.iter().zip(snapshots) {
                    tx.prepare_cached(
                        "INSERT INTO snapshots
                         (tenant, type, agg_id, version, fold, state, deleted, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?
                    .execute(params![
                        k.tenant.as_str(),
                        k.type_name.as_str(),
                        k.id.as_str(),
                        clamp_sql_int(a.version.0),
                        s.fold,
                        state,
                        a.deleted,
                        a.created_at.as_ref().map_or(0, to_micros),
                        a.updated_at.as_ref().map_or(0, to_micros),
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn get_command(&self, tenant: &TenantId, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |conn| select_command(conn, &tenant, id)).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(Position(self.head.load(Ordering::SeqCst)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.writer.check()?;
        self.read(|conn| {
            let one: i64 = conn.query_row("SELECT 1", [], |r| r.get(0)).map_err(sql_err)?;
            debug_assert_eq!(one, 1);
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        let writer = self.writer.take();
        let readers = Arc::clone(&self.readers);
        let feed_readers = Arc::clone(&self.feed_readers);
        let stopped = tokio::task::spawn_blocking(move || {
            Self::stop_writer(writer);
            readers.close();
            feed_readers.close();
        })
        .await;
        if let Err(e) = stopped {
            tracing::error!(error = %e, "closing the SQLite store failed");
        }
    }

    fn stats(&self) -> StoreStats {
        self.counters.stats()
    }

    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) -> bool {
        self.listener.set(listener).is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql_err)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::backend(format!(
            "the database's schema version is {current}, newer than this build's {SCHEMA_VERSION}"
        )));
    }
    debug_assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION);
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        tx.execute_batch(sql).map_err(sql_err)?;
        tracing::info!(from, to = from + 1, "migrated the SQLite schema");
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql_err)?;
    tx.commit().map_err(sql_err)
}

/// Page cache and memory-mapped reads, for every connection: without them the writer re-reads
/// evicted pages through `read()` on every batch once the file outgrows SQLite's 2 MiB default.
fn tune(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(sql_err)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES).map_err(sql_err)?;
    Ok(())
}

/// Page cache per connection, in KiB.
const CACHE_KIB: i64 = 64 * 1024;
/// Memory-mapped window per connection, in bytes.
const MMAP_BYTES: i64 = 1 << 30;

fn load_next_position(conn: &Connection) -> Result<u64, StoreError> {
    let max: i64 =
        conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| r.get(0)).map_err(sql_err)?;
    let max = from_sql_int(max, "position")?;
    Ok(max + 1)
}

// ---------------------------------------------------------------------------------------------
// The writer

/// The writer thread: waits for an append, takes every other one already queued (up to
/// `batch_appends_max`), commits them together, then answers them. Every few commits it asks
/// the checkpointer to copy the WAL back into the database, off this thread.
fn write_loop(
    mut conn: Connection,
    mut receiver: mpsc::Receiver<Job>,
    batch_appends_max: usize,
    mut next_position: u64,
    writer: WriterState<'_>,
) {
    let WriterState { counters, head, checkpoint, listener, wal } = writer;
    let mut batch: Vec<Job> = Vec::with_capacity(batch_appends_max.min(1_024));
    let mut commits_since_checkpoint = 0u32;
    // Commits to wait before the next TRUNCATE attempt (after readers blocked one).
    let mut truncate_backoff = 0u32;
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < batch_appends_max {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut conn, &batch, &mut next_position, counters);
        debug_assert_eq!(results.len(), batch.len());
        // The head moves before anyone hears of the commit: a subscription that takes its hub
        // receiver and then reads the head misses nothing (engine/src/subscriptions.rs).
        head.store(next_position.saturating_sub(1), Ordering::SeqCst);
        // Committed and durable: the listener hears it before any caller does, in commit
        // (= position) order, since this thread is the only one that commits.
        if let Some(listener) = listener.get() {
            let events = if listener.wants_events() { committed_events(&batch, &results) } else { Vec::new() };
            listener.committed(Position(next_position.saturating_sub(1)), events);
        }
        append::answer(&mut batch, results, counters);
        commits_since_checkpoint += 1;
        if commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS {
            commits_since_checkpoint = 0;
            // Full means a checkpoint is already due: nothing to add.
            let _ = checkpoint.try_send(());
        }
        if truncate_backoff > 0 {
            truncate_backoff -= 1;
        } else if wal.len() > wal.bytes_max && !truncate_wal(&conn, Duration::from_millis(WAL_TRUNCATE_WAIT_MS)) {
            truncate_backoff = WAL_TRUNCATE_RETRY_COMMITS;
        }
    }
    // Nothing writes any more: leave an empty WAL behind (readers still open are idle).
    if !truncate_wal(&conn, Duration::from_millis(BUSY_TIMEOUT_MS)) {
        tracing::warn!("the SQLite WAL could not be truncated at shutdown");
    }
    tracing::debug!("the SQLite writer has stopped");
}

/// The WAL file and its bound.
struct Wal {
    path: PathBuf,
    bytes_max: u64,
}

impl Wal {
    /// The WAL file's size (0 when absent).
    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Copies the whole WAL into the database and truncates it to 0 bytes, waiting at most `wait`
/// for readers of older snapshots; `false` when they (or a checkpoint running elsewhere) were
/// still in the way, or it failed.
fn truncate_wal(conn: &Connection, wait: Duration) -> bool {
    if let Err(e) = conn.busy_timeout(wait) {
        tracing::warn!(error = %e, "cannot set the SQLite busy timeout");
        return false;
    }
    let done = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
    if let Err(e) = conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)) {
        tracing::warn!(error = %e, "cannot set the SQLite busy timeout");
    }
    match done {
        Ok(busy) => busy == 0,
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => false,
        Err(e) => {
            tracing::warn!(error = %e, "a SQLite TRUNCATE checkpoint failed");
            false
        }
    }
}

/// What the writer thread shares with the rest of the store.
struct WriterState<'a> {
    counters: &'a Counters,
    head: &'a AtomicU64,
    checkpoint: std::sync::mpsc::SyncSender<()>,
    listener: &'a OnceLock<Arc<dyn CommitListener>>,
    wal: Wal,
}

/// Commits between two checkpoint requests.
const CHECKPOINT_EVERY_COMMITS: u32 = 32;

/// The checkpointer thread: copies committed WAL frames into the database file with its own
/// connection, so the writer rarely pays for it (the writer runs with `wal_autocheckpoint=0`).
/// PASSIVE only: it never waits for readers; bounding the WAL is the writer's (see
/// [`truncate_wal`]).
fn checkpoint_loop(conn: Connection, requests: std::sync::mpsc::Receiver<()>) {
    while requests.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
            tracing::warn!(error = %e, "a SQLite checkpoint failed; the next one will retry");
        }
    }
}

/// Commits one batch; on success each request gets its own outcome, else every request gets
/// the batch's error and `next_position` is reloaded from the database.
fn commit_batch(
    conn: &mut Connection,
    batch: &[Job],
    next_position: &mut u64,
    counters: &Counters,
) -> Vec<Result<Written, StoreError>> {
    let batch_start_position = *next_position;
    let started = std::time::Instant::now();
    let outcome = run_batch(conn, batch, next_position);
    append::record_commit("sqlite", batch.len(), started, outcome.is_ok());
    match outcome {
        Ok(results) => {
            let events = counters.committed(batch, &results);
            assert_eq!(
                *next_position,
                batch_start_position + events,
                "the writer's next position must move by exactly the events committed"
            );
            results
        }
        Err(e) => {
            tracing::error!(error = %e, appends = batch.len(), "a SQLite batch was not committed");
            *next_position = load_next_position(conn).unwrap_or(batch_start_position);
            append::batch_failed(&e, batch.len())
        }
    }
}

/// One transaction for the batch. An error returned here means the transaction did not commit.
///
/// The fast path checks each append (command id, expected version) before writing it and
/// needs no savepoints: a refused append writes nothing. Should a write fail after its checks
/// passed (which the single writer makes impossible short of I/O errors or corruption), the
/// whole transaction is rolled back and the batch is run again with one savepoint per append,
/// so the failure stays with that append.
fn run_batch(
    conn: &mut Connection,
    batch: &[Job],
    next_position: &mut u64,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let start_position = *next_position;
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        let mut results = Vec::with_capacity(batch.len());
        let mut clean = true;
        for job in batch {
            let result = apply(&tx, &job.request, &job.encoded, next_position);
            if matches!(result, Err(StoreError::Conflict { .. }) | Ok(_)) {
                results.push(result);
            } else {
                clean = false;
                break;
            }
        }
        if clean {
            tx.commit().map_err(sql_err)?;
            return Ok(results);
        }
        // Dropping the transaction rolls it back.
    }
    *next_position = start_position;
    run_batch_with_savepoints(conn, batch, next_position)
}

#[cfg(test)]
thread_local! {
    /// Batches this thread ran on the savepoint path, so a test can show it got there.
    static SAVEPOINT_BATCHES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The slow path of [`run_batch`]: one savepoint per append.
fn run_batch_with_savepoints(
    conn: &mut Connection,
    batch: &[Job],
    next_position: &mut u64,
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    #[cfg(test)]
    SAVEPOINT_BATCHES.with(|n| n.set(n.get() + 1));
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let position_before = *next_position;
        let savepoint = tx.savepoint().map_err(sql_err)?;
        let result = apply(&savepoint, &job.request, &job.encoded, next_position);
        if let Err(StoreError::Corrupt(m)) = &result {
            tracing::error!(key = %job.request.key, error = %m, "an append found inconsistent data");
        }
        if let Ok(Written::Appended { .. }) = result {
            savepoint.commit().map_err(sql_err)?;
        } else {
            // Nothing of this request stays, and its positions go to the next one. If the
            // rollback itself fails, the transaction is in an unknown state: give up on it.
            *next_position = position_before;
            let mut savepoint = savepoint;
            savepoint.rollback().map_err(sql_err)?;
            savepoint.commit().map_err(sql_err)?;
        }
        results.push(result);
    }
    tx.commit().map_err(sql_err)?;
    Ok(results)
}

/// One append: idempotency, then the expected version, then the writes. A refusal (duplicate
/// or conflict) is decided before anything is written.
fn apply(
    conn: &Connection,
    request: &AppendRequest,
    encoded: &Encoded,
    next_position: &mut u64,
) -> Result<Written, StoreError> {
    let key = &request.key;
    let record = select_command(conn, &key.tenant, request.command.id)?;
    let span = match decide_append(record, || select_head(conn, key), request, *next_position)? {
        Decision::Duplicate(record) => return Ok(Written::Duplicate(record)),
        Decision::Conflict(actual) => return Err(StoreError::Conflict { expected: request.expected, actual }),
        Decision::Write(span) => span,
    };

    let ts_us = to_micros(&truncate(request.timestamp));
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO events
             (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(sql_err)?;
    let mut version = Version(span.first_version.0 - 1);
    for (i, event) in request.events.iter().enumerate() {
        version = version.next();
        let position = *next_position;
        *next_position += 1;
        insert
            .execute(params![
                to_sql_int(position)?,
                key.tenant.as_str(),
                key.type_name.as_str(),
                key.id.as_str(),
                to_sql_int(version.0)?,
                encoded.event_ids[i],
                event.event_type,
                encoded.data[i],
                encoded.metadata[i],
                ts_us,
            ])
            .map_err(write_err)?;
    }
    // What was written must continue the stream and the global order exactly.
    if version != span.last_version() || *next_position != span.next_position() {
        return Err(StoreError::corrupt(format!("{key}: an append did not continue its stream contiguously")));
    }

    conn.prepare_cached(
        "INSERT INTO documents (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
         ON CONFLICT (tenant, type, agg_id) DO UPDATE SET
             version = excluded.version, state = excluded.state,
             deleted = excluded.deleted, updated_at = excluded.updated_at",
    )
    .map_err(sql_err)?
    .execute(params![
        key.tenant.as_str(),
        key.type_name.as_str(),
        key.id.as_str(),
        to_sql_int(version.0)?,
        encoded.state,
        request.document.deleted,
        ts_us,
    ])
    .map_err(write_err)?;

    conn.prepare_cached(
        "INSERT INTO commands (tenant, command_id, fingerprint, type, agg_id, first_version, last_version, extra)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(sql_err)?
    .execute(params![
        key.tenant.as_str(),
        encoded.command_id,
        request.command.fingerprint,
        key.type_name.as_str(),
        key.id.as_str(),
        to_sql_int(span.first_version.0)?,
        to_sql_int(version.0)?,
        encoded.extra,
    ])
    .map_err(write_err)?;

    if let Some(snapshot) = &request.snapshot {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO snapshots
             (tenant, type, agg_id, version, fold, state, deleted, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(sql_err)?
        .execute(params![
            key.tenant.as_str(),
            key.type_name.as_str(),
            key.id.as_str(),
            to_sql_int(version.0)?,
            snapshot.fold,
            encoded.state,
            request.document.deleted,
            to_micros(&truncate(snapshot.created_at)),
            ts_us,
        ])
        .map_err(write_err)?;
    }

    write_process_rows(conn, request)?;

    Ok(span.written())
}

/// What an append writes for a process manager (SPEC §4.5), in its transaction: the instance's
/// wake-up and the process's checkpoint.
fn write_process_rows(conn: &Connection, request: &AppendRequest) -> Result<(), StoreError> {
    let key = &request.key;
    if let Some(w) = &request.wake {
        let k = (w.process.as_str(), key.tenant.as_str(), key.type_name.as_str(), key.id.as_str());
        match w.due {
            Some(due) => conn
                .prepare_cached(
                    "INSERT INTO wakes (process, tenant, type, agg_id, due) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (process, tenant, type, agg_id) DO UPDATE SET due = excluded.due",
                )
                .map_err(sql_err)?
                .execute(params![k.0, k.1, k.2, k.3, to_micros(&truncate(due))]),
            None => conn
                .prepare_cached("DELETE FROM wakes WHERE process = ?1 AND tenant = ?2 AND type = ?3 AND agg_id = ?4")
                .map_err(sql_err)?
                .execute(params![k.0, k.1, k.2, k.3]),
        }
        .map_err(write_err)?;
    }

    if let Some(c) = &request.checkpoint {
        conn.prepare_cached(UPSERT_CHECKPOINT)
            .map_err(sql_err)?
            .execute(params![c.name, to_sql_int(c.position.0)?])
            .map_err(write_err)?;
    }
    Ok(())
}

/// The stream's head, from its read-model row (no row: version 0, not deleted).
fn select_head(conn: &Connection, key: &StreamKey) -> Result<StreamHead, StoreError> {
    let row = conn
        .prepare_cached("SELECT version, deleted FROM documents WHERE tenant = ?1 AND type = ?2 AND agg_id = ?3")
        .map_err(sql_err)?
        .query_row(params![key.tenant.as_str(), key.type_name.as_str(), key.id.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?))
        })
        .optional()
        .map_err(sql_err)?;
    match row {
        None => Ok(StreamHead::default()),
        Some((version, deleted)) => {
            let version = Version(from_sql_int(version, "version")?);
            if version == Version::ZERO {
                return Err(StoreError::corrupt(format!("{key}: a read-model row at version 0")));
            }
            Ok(StreamHead { version, deleted })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reads

/// Read-only connections, each behind a mutex; `None` once the store is closed.
struct ReaderPool {
    connections: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
}

impl ReaderPool {
    fn open(path: &Path, count: usize) -> Result<ReaderPool, StoreError> {
        let mut connections = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
            let conn = Connection::open_with_flags(path, flags).map_err(sql_err)?;
            conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(sql_err)?;
            tune(&conn)?;
            connections.push(Mutex::new(Some(conn)));
        }
        Ok(ReaderPool { connections, next: AtomicUsize::new(0) })
    }

    /// Runs `f` on a free connection, or returns `None` when every connection is busy.
    fn try_with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Option<Result<T, StoreError>> {
        let count = self.connections.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        (0..count)
            .find_map(|i| match self.connections[(start + i) % count].try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            })
            .map(|guard| Self::run(guard, f))
    }

    /// Runs `f` on a free connection: the first one free in round-robin order, else waits for
    /// one. Blocking.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let count = self.connections.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        for i in 0..count {
            match self.connections[(start + i) % count].try_lock() {
                Ok(guard) => return Self::run(guard, f),
                // A panic during an earlier read leaves the connection usable: statements are
                // reset when dropped, and a read changes nothing.
                Err(TryLockError::Poisoned(poisoned)) => return Self::run(poisoned.into_inner(), f),
                Err(TryLockError::WouldBlock) => continue,
            }
        }
        let guard = self.connections[start].lock().unwrap_or_else(|e| e.into_inner());
        Self::run(guard, f)
    }

    fn run<T>(
        guard: MutexGuard<'_, Option<Connection>>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match guard.as_ref() {
            Some(conn) => f(conn),
            None => Err(StoreError::Closed),
        }
    }

    /// Closes every connection, waiting for reads in progress. Blocking.
    fn close(&self) {
        for connection in &self.connections {
            let taken = connection.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(conn) = taken
                && let Err((_, e)) = conn.close()
            {
                tracing::warn!(error = %e, "closing a SQLite read connection failed");
            }
        }
    }
}

/// The columns of an event of its own, before any key columns (see [`EventScope`]).
const EVENT_COLUMNS: &str = "position, version, event_id, event_type, data, metadata, ts";

/// An `events` row as stored.
struct RawEvent {
    position: i64,
    version: i64,
    event_id: String,
    event_type: String,
    data: String,
    metadata: String,
    ts: i64,
    /// The key columns the scope asked for.
    key: Vec<String>,
}

impl RawEvent {
    fn from_row(r: &rusqlite::Row<'_>, key_columns: usize) -> rusqlite::Result<RawEvent> {
        Ok(RawEvent {
            position: r.get(0)?,
            version: r.get(1)?,
            event_id: r.get(2)?,
            event_type: r.get(3)?,
            data: r.get(4)?,
            metadata: r.get(5)?,
            ts: r.get(6)?,
            key: (7..7 + key_columns).map(|i| r.get(i)).collect::<rusqlite::Result<_>>()?,
        })
    }

    fn decode(self, scope: &EventScope<'_>) -> Result<RecordedEvent, StoreError> {
        let StreamKey { tenant, type_name, id } = scope.stream(&self.key, "events")?;
        Ok(RecordedEvent {
            id: EventId(Uuid::parse_str(&self.event_id).map_err(|e| corrupt_row("events.event_id", e))?),
            position: Position(from_sql_int(self.position, "position")?),
            tenant,
            target_name: type_name,
            target_id: id,
            version: Version(from_sql_int(self.version, "version")?),
            event_type: self.event_type,
            data: from_json(&self.data, "events.data")?,
            metadata: from_json(&self.metadata, "events.metadata")?,
            timestamp: from_micros(self.ts),
        })
    }
}

/// The events of `scope` meeting `condition` (the SQL after `WHERE`, with its order and limit).
fn select_events(
    conn: &Connection,
    scope: &EventScope<'_>,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let (key_columns, key_count) = scope.key_columns();
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {EVENT_COLUMNS}{key_columns} FROM events WHERE {condition}"))
        .map_err(sql_err)?;
    let raws = stmt
        .query_map(params, |r| RawEvent::from_row(r, key_count))
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    raws.into_iter().map(|raw| raw.decode(scope)).collect()
}

fn read_stream(
    conn: &Connection,
    key: &StreamKey,
    after: Version,
    upper: i64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let events = select_events(
        conn,
        &EventScope::Stream(key),
        "tenant = ?1 AND type = ?2 AND agg_id = ?3 AND version > ?4 AND version <= ?5 ORDER BY version LIMIT ?6",
        params![
            key.tenant.as_str(),
            key.type_name.as_str(),
            key.id.as_str(),
            clamp_sql_int(after.0),
            upper,
            to_sql_int(limit as u64)?
        ],
    )?;
    crate::check_stream_read(key, after, &events)?;
    Ok(events)
}

fn read_all(
    conn: &Connection,
    tenant: &TenantId,
    after: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let events = select_events(
        conn,
        &EventScope::Tenant(tenant),
        "tenant = ?1 AND position > ?2 ORDER BY position LIMIT ?3",
        params![tenant.as_str(), clamp_sql_int(after.0), to_sql_int(limit as u64)?],
    )?;
    crate::check_feed_read(after, &events)?;
    Ok(events)
}

/// Every tenant's events after `after`, in position order.
fn read_global(conn: &Connection, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
    let events = select_events(
        conn,
        &EventScope::Global,
        "position > ?1 ORDER BY position LIMIT ?2",
        params![clamp_sql_int(after.0), to_sql_int(limit as u64)?],
    )?;
    crate::check_feed_read(after, &events)?;
    Ok(events)
}

/// A `documents` row as stored.
struct RawDocument {
    agg_id: String,
    version: i64,
    state: String,
    deleted: bool,
    created_at: i64,
    updated_at: i64,
}

impl RawDocument {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDocument> {
        Ok(RawDocument {
            agg_id: r.get(0)?,
            version: r.get(1)?,
            state: r.get(2)?,
            deleted: r.get(3)?,
            created_at: r.get(4)?,
            updated_at: r.get(5)?,
        })
    }

    fn decode_text(self, tenant: &TenantId, type_name: &TypeName) -> Result<DocumentText, StoreError> {
        let id = AggregateId::parse(&self.agg_id).map_err(|v| corrupt_row("documents.agg_id", v.message))?;
        let version = Version(from_sql_int(self.version, "version")?);
        if version == Version::ZERO {
            return Err(StoreError::corrupt(format!("{tenant}/{type_name}/{id}: a read-model row at version 0")));
        }
        Ok(DocumentText {
            key: StreamKey { tenant: tenant.clone(), type_name: type_name.clone(), id },
            version,
            state_json: self.state,
            deleted: self.deleted,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
        })
    }

    fn decode(self, tenant: &TenantId, type_name: &TypeName) -> Result<DocumentRow, StoreError> {
        self.decode_text(tenant, type_name)?.parse()
    }
}

/// The tenant's record of a command; used by the writer (inside its transaction) and readers.
fn select_command(conn: &Connection, tenant: &TenantId, id: CommandId) -> Result<Option<CommandRecord>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT fingerprint, type, agg_id, first_version, last_version, extra FROM commands
             WHERE tenant = ?1 AND command_id = ?2",
        )
        .map_err(sql_err)?
        .query_row(params![tenant.as_str(), id.0.to_string()], |r| {
            <(String, String, String, i64, i64, String)>::try_from(r)
        })
        .optional()
        .map_err(sql_err)?;
    let Some((fingerprint, type_name, agg_id, first_version, last_version, extra)) = row else {
        return Ok(None);
    };
    let first_version = Version(from_sql_int(first_version, "first_version")?);
    let last_version = Version(from_sql_int(last_version, "last_version")?);
    if first_version == Version::ZERO || last_version < first_version {
        return Err(StoreError::corrupt(format!(
            "command {id} of tenant {tenant}: versions {first_version}..={last_version}"
        )));
    }
    Ok(Some(CommandRecord {
        id,
        fingerprint,
        key: StreamKey {
            tenant: tenant.clone(),
            type_name: TypeName::parse(&type_name).map_err(|v| corrupt_row("commands.type", v.message))?,
            id: AggregateId::parse(&agg_id).map_err(|v| corrupt_row("commands.agg_id", v.message))?,
        },
        first_version,
        last_version,
        extra: from_json(&extra, "commands.extra")?,
    }))
}

// ---------------------------------------------------------------------------------------------
// Conversions and errors

/// A stream key read from a table's columns.
fn stream_key(tenant: &str, type_name: &str, id: &str, table: &str) -> Result<StreamKey, StoreError> {
    Ok(StreamKey {
        tenant: TenantId::parse(tenant).map_err(|v| corrupt_row(&format!("{table}.tenant"), v.message))?,
        type_name: TypeName::parse(type_name).map_err(|v| corrupt_row(&format!("{table}.type"), v.message))?,
        id: AggregateId::parse(id).map_err(|v| corrupt_row(&format!("{table}.agg_id"), v.message))?,
    })
}

fn to_sql_param(p: &Param) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match p {
        Param::Text(s) | Param::Json(s) => V::Text(s.clone()),
        Param::Int(i) => V::Integer(*i),
        Param::Float(f) => V::Real(*f),
        Param::Numeric(n) => match n.as_i64() {
            Some(i) => V::Integer(i),
            None => V::Real(n.as_f64().unwrap_or(0.0)),
        },
    }
}

/// Maps a SQLite error: lock, I/O and space problems may pass ([`StoreError::Unavailable`]);
/// values that do not convert are [`StoreError::Corrupt`]; the rest is [`StoreError::Backend`].
fn sql_err(e: rusqlite::Error) -> StoreError {
    let error = match &e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed => StoreError::unavailable(e.to_string()),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::corrupt(e.to_string()),
            _ => StoreError::backend(e.to_string()),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::corrupt(e.to_string()),
        _ => StoreError::backend(e.to_string()),
    };
    error.with_source(e)
}

/// Like [`sql_err`], but a constraint violation on a write means the events and the read
/// model disagree (the writer checked the head first), so the data is corrupt.
fn write_err(e: rusqlite::Error) -> StoreError {
    if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) {
        StoreError::corrupt(format!("the events and the read model disagree: {e}")).with_source(e)
    } else {
        sql_err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommandWrite, DocumentWrite, NewEvent};
    use sourced_core::ExpectedVersion;

    fn request(id: &str, command: u128, events: usize) -> AppendRequest {
        let command = CommandId(Uuid::from_u128(command));
        AppendRequest {
            key: StreamKey {
                tenant: TenantId::parse("t").expect("a tenant"),
                type_name: TypeName::parse("order").expect("a type"),
                id: AggregateId::parse(id).expect("an id"),
            },
            expected: ExpectedVersion::NoStream,
            events: (0..events)
                .map(|i| NewEvent {
                    id: command.event_id(i),
                    event_type: "created".into(),
                    data: serde_json::json!({"i": i}),
                    metadata: serde_json::json!({}),
                })
                .collect(),
            timestamp: from_micros(1_700_000_000_000_000),
            document: DocumentWrite { state: serde_json::json!({"id": id}), deleted: false },
            command: CommandWrite { id: command, fingerprint: "fp".into(), extra: Value::Null },
            snapshot: None,
            checkpoint: None,
            wake: None,
        }
    }

    /// A write that fails after its append passed its checks sends the batch down the
    /// savepoint path: the appends around it commit, it alone fails and leaves nothing.
    #[test]
    fn a_write_failing_after_its_checks_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut conn = Connection::open(dir.path().join("sourced.db")).expect("a connection");
        migrate(&mut conn).expect("migrate");
        // An event of "b" that the read model does not know: "b"'s append finds no head and no
        // command record, so it passes its checks, and its first event then collides with
        // this one (UNIQUE (tenant, type, agg_id, version)).
        conn.execute(
            "INSERT INTO events (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
             VALUES (1000, 't', 'order', 'b', 1, ?1, 'created', 'null', '{}', 0)",
            [Uuid::from_u128(99).to_string()],
        )
        .expect("inject an event");
        let batch: Vec<Job> =
            [request("a", 1, 2), request("b", 2, 1), request("c", 3, 1)].into_iter().map(Job::for_test).collect();
        let mut next_position = 1;
        let before = SAVEPOINT_BATCHES.with(std::cell::Cell::get);

        let results = run_batch(&mut conn, &batch, &mut next_position).expect("the batch commits");

        assert_eq!(SAVEPOINT_BATCHES.with(std::cell::Cell::get), before + 1, "the savepoint path ran");
        assert!(
            matches!(results[0], Ok(Written::Appended { first_position: Position(1), first_version: Version(1) })),
            "{:?}",
            results[0]
        );
        match &results[1] {
            Err(e @ StoreError::Corrupt(m)) => {
                assert!(m.contains("disagree"), "{m}");
                let source = std::error::Error::source(e).expect("the driver's error");
                assert!(source.downcast_ref::<rusqlite::Error>().is_some(), "{source:?}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // "c" takes the position "b" would have used.
        assert!(
            matches!(results[2], Ok(Written::Appended { first_position: Position(3), first_version: Version(1) })),
            "{:?}",
            results[2]
        );
        assert_eq!(next_position, 4);
        let rows = |sql: &str| -> Vec<String> {
            let mut stmt = conn.prepare(sql).expect("a query");
            stmt.query_map([], |r| r.get::<_, String>(0)).expect("rows").collect::<Result<_, _>>().expect("rows")
        };
        assert_eq!(rows("SELECT agg_id FROM documents ORDER BY agg_id"), ["a", "c"]);
        assert_eq!(rows("SELECT type || '/' || agg_id FROM commands ORDER BY agg_id"), ["order/a", "order/c"]);
        assert_eq!(
            rows("SELECT agg_id || '@' || position FROM events ORDER BY position"),
            ["a@1", "a@2", "c@3", "b@1000"]
        );
    }

    /// A filter on an indexed field is answered from the index (SQLite's plan names it).
    #[tokio::test]
    async fn declared_indexes_serve_filters() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("sourced.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        let field = FieldPath::parse("customer.id").expect("a path");
        let names = store.ensure_indexes(std::slice::from_ref(&field)).await.expect("ensure_indexes");
        let tenant = TenantId::parse("t").expect("a tenant");
        let ty = TypeName::parse("order").expect("a type");
        let plan = |filter: &str, value: &str| {
            let query = ListQuery {
                filters: vec![sourced_core::query::Filter::parse(filter, value).expect("a filter")],
                ..ListQuery::new(tenant.clone(), ty.clone(), 10)
            };
            let sql = listing::select_hinted(Dialect::Sqlite, &query, 10, &|n| names.contains(&n.to_owned()));
            let conn = Connection::open(&path).expect("a connection");
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", sql.text)).expect("explain");
            let rows = stmt
                .query_map(rusqlite::params_from_iter(sql.params.iter().map(to_sql_param)), |r| r.get::<_, String>(3))
                .expect("the plan");
            rows.collect::<Result<Vec<_>, _>>().expect("plan rows").join("; ")
        };
        for (filter, value) in [("customer.id", "c1"), ("customer.id[in]", "c1,c2")] {
            let plan = plan(filter, value);
            assert!(plan.contains(&names[0]), "{filter}={value}: {plan}");
        }
        assert!(!plan("status", "paid").contains(&names[0]), "an unindexed field scans");
        store.close().await;
    }

    #[test]
    fn options_are_checked() {
        assert!(SqliteOptions::default().validate().is_ok());
        let bad =
            SqliteOptions { batch_appends_max: 0, readers: 0, queue_capacity: 0, feed_readers: 0, wal_bytes_max: 1 };
        match bad.validate() {
            Err(StoreError::InvalidRequest(m)) => {
                for option in ["batch_appends_max", "readers", "queue_capacity", "feed_readers", "wal_bytes_max"] {
                    assert!(m.contains(option), "{option}: {m}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_map_to_store_errors() {
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert!(matches!(sql_err(busy), StoreError::Unavailable(_)));
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert!(matches!(sql_err(full), StoreError::Unavailable(_)));
        let constraint =
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT), None);
        assert!(matches!(write_err(constraint), StoreError::Corrupt(_)));
        assert!(matches!(sql_err(rusqlite::Error::QueryReturnedNoRows), StoreError::Backend(_)));
        assert!(matches!(sql_err(rusqlite::Error::IntegralValueOutOfRange(0, -1)), StoreError::Corrupt(_)));
    }
}
