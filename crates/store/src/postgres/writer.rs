//! The PostgreSQL writer task: group commit in two round trips, each append decided in memory
//! under the position counter's lock (see the module documentation of `postgres`).

use super::*;

/// The writer task: waits for an append, takes every other one already queued (within the
/// batch limits), commits them together, then answers them.
pub(super) async fn write_loop(
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
pub(super) async fn commit_batch(
    pool: &Pool,
    batch: &[Job],
    lock_timeout_ms: u64,
    counters: &Counters,
    channel: &str,
) -> Vec<Result<Written, StoreError>> {
    let started = std::time::Instant::now();
    let outcome = async {
        let client = pool.get().await.map_err(pool_err)?;
        let results = match run_batch(Batch { client: &client, batch, lock_timeout_ms, channel }).await {
            Ok(results) => results,
            Err(e) if e.as_db_error().is_some() && !is_unavailable(&e) => {
                tracing::warn!(error = %e, appends = batch.len(), "a batch failed; retrying it append by append");
                end_transaction(client, "ROLLBACK").await.map_err(pg_err)?;
                let client = pool.get().await.map_err(pool_err)?;
                match run_batch_with_savepoints(Batch { client: &client, batch, lock_timeout_ms, channel }).await {
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
    append::record_commit("postgres", batch.len(), started, outcome.is_ok());
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
pub(super) async fn end_transaction(client: Object, sql: &str) -> Result<(), tokio_postgres::Error> {
    match client.batch_execute(sql).await {
        Ok(()) => Ok(()),
        Err(e) => {
            drop(Object::take(client));
            Err(e)
        }
    }
}

/// After a failure mid-transaction: rolls back, or closes the connection if that fails.
pub(super) async fn discard(client: Object) {
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
pub(super) struct Statements {
    select_commands: Statement,
    select_heads: Statement,
    insert_events: Statement,
    upsert_documents: Statement,
    insert_commands: Statement,
    update_counter: Statement,
    insert_snapshots: Statement,
    upsert_checkpoints: Statement,
    upsert_wakes: Statement,
    delete_wakes: Statement,
}

impl Statements {
    async fn prepare(client: &ClientWrapper) -> Result<Statements, tokio_postgres::Error> {
        // In the order of the struct's fields.
        let prepared = tokio::try_join!(
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
            client.prepare_cached(
                "INSERT INTO sourced_checkpoints (name, position)
                 SELECT n, p FROM unnest($1::text[], $2::int8[]) AS x(n, p)
                 ON CONFLICT (name) DO UPDATE SET
                     position = GREATEST(sourced_checkpoints.position, excluded.position)",
            ),
            client.prepare_cached(
                "INSERT INTO sourced_wakes (process, tenant, type, agg_id, due)
                 SELECT p, t, ty, a, d FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
                      AS x(p, t, ty, a, d)
                 ON CONFLICT (process, tenant, type, agg_id) DO UPDATE SET due = excluded.due",
            ),
            client.prepare_cached(
                "DELETE FROM sourced_wakes w USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS x(p, t, ty, a)
                 WHERE w.process = x.p AND w.tenant = x.t AND w.type = x.ty AND w.agg_id = x.a",
            ),
        )?;
        Ok(Statements {
            select_commands: prepared.0,
            select_heads: prepared.1,
            insert_events: prepared.2,
            upsert_documents: prepared.3,
            insert_commands: prepared.4,
            update_counter: prepared.5,
            insert_snapshots: prepared.6,
            upsert_checkpoints: prepared.7,
            upsert_wakes: prepared.8,
            delete_wakes: prepared.9,
        })
    }
}

/// Begins a writing transaction and takes the position counter's lock (always first, so two
/// writers never wait on each other in opposite orders). Returns the last position used, or
/// `None` when the counter's row is missing (the migration inserts it; nothing may be written
/// without it).
pub(super) async fn begin_and_lock(
    client: &ClientWrapper,
    lock_timeout_ms: u64,
) -> Result<Option<u64>, tokio_postgres::Error> {
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

/// One batch of appends to write, on the writer's connection.
#[derive(Clone, Copy)]
pub(super) struct Batch<'a> {
    client: &'a ClientWrapper,
    batch: &'a [Job],
    lock_timeout_ms: u64,
    channel: &'a str,
}

/// The fast path: one transaction for the batch, every check decided in memory from two
/// lookups, every write one statement with array parameters, in two round trips (see
/// [`lock_and_look_up`] and [`Plan::write_and_commit`]). An error means the transaction did
/// not commit (and may still be open on `client`).
pub(super) async fn run_batch(b: Batch<'_>) -> Result<Vec<Result<Written, StoreError>>, tokio_postgres::Error> {
    let Batch { client, batch, lock_timeout_ms, channel } = b;
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
pub(super) async fn lock_and_look_up(
    client: &ClientWrapper,
    statements: &Statements,
    jobs: &[&Job],
    lock_timeout_ms: u64,
) -> Result<(Option<u64>, Found), tokio_postgres::Error> {
    tokio::try_join!(biased; begin_and_lock(client, lock_timeout_ms), look_up(client, statements, jobs))
}

/// Reads the command records and stream heads of `jobs`: two statements, pipelined.
pub(super) async fn look_up(
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
pub(super) async fn run_batch_with_savepoints(
    b: Batch<'_>,
) -> Result<Vec<Result<Written, StoreError>>, tokio_postgres::Error> {
    let Batch { client, batch, lock_timeout_ms, channel } = b;
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
                results.push(Err(
                    StoreError::corrupt(format!("the events and the read model disagree: {e}")).with_source(e)
                ));
            }
            Err(e) => return Err(e),
        }
    }
    client.batch_execute(&commit_sql(channel, first, last)).await?;
    Ok(results)
}

/// The error of every append when the counter's row is missing.
pub(super) fn missing_counter() -> StoreError {
    StoreError::corrupt("the position counter's row (sourced_position) is missing")
}

/// Commits the open transaction; when it wrote events (`before < head`), it first queues a
/// notification of the new head on `channel`, which PostgreSQL delivers only if the commit
/// succeeds. When the transaction is aborted (a statement before it failed), `NOTIFY` fails and
/// the `COMMIT` after it in the same query string does not run: the error is reported and the
/// transaction stays open for the caller to roll back.
pub(super) fn commit_sql(channel: &str, before: u64, head: u64) -> String {
    if head > before {
        // The channel is `sourced_commits_` and hex digits, the payload digits: nothing to quote.
        format!("NOTIFY {channel}, '{head}'; COMMIT")
    } else {
        "COMMIT".to_owned()
    }
}

/// The rows a batch's lookups found: command records and stream heads.
pub(super) struct Found {
    commands: Vec<Row>,
    heads: Vec<Row>,
}

/// What a batch will write, decided in memory under the counter lock.
#[derive(Default)]
pub(super) struct Plan {
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
    /// Checkpoints, the highest position per name (one statement cannot update a row twice).
    checkpoints: std::collections::BTreeMap<String, i64>,
    /// Wake-ups by (process, tenant, type, id): the last append's (`None` deletes).
    wakes: std::collections::BTreeMap<[String; 4], Option<DateTime<Utc>>>,
}

pub(super) struct SnapWrite {
    pub(super) tenant: String,
    pub(super) type_name: String,
    pub(super) agg_id: String,
    pub(super) version: i64,
    pub(super) fold: i32,
    pub(super) state: String,
    pub(super) deleted: bool,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
}

/// The plan's wake-ups as column arrays: those to set, those to delete.
struct WakeColumns<'a> {
    set: [Vec<&'a str>; 4],
    due: Vec<DateTime<Utc>>,
    clear: [Vec<&'a str>; 4],
}

impl<'a> WakeColumns<'a> {
    fn new(wakes: &'a std::collections::BTreeMap<[String; 4], Option<DateTime<Utc>>>) -> WakeColumns<'a> {
        let mut out = WakeColumns { set: Default::default(), due: Vec::new(), clear: Default::default() };
        for (k, due) in wakes {
            let columns = match due {
                Some(d) => {
                    out.due.push(*d);
                    &mut out.set
                }
                None => &mut out.clear,
            };
            for (c, v) in columns.iter_mut().zip(k) {
                c.push(v.as_str());
            }
        }
        out
    }

    /// Both statements, each only when it has rows.
    async fn write(&self, client: &ClientWrapper, statements: &Statements) -> Result<u64, tokio_postgres::Error> {
        let [p, t, ty, a] = &self.set;
        if !p.is_empty() {
            client.execute(&statements.upsert_wakes, &[p, t, ty, a, &self.due]).await?;
        }
        let [p, t, ty, a] = &self.clear;
        if !p.is_empty() {
            client.execute(&statements.delete_wakes, &[p, t, ty, a]).await?;
        }
        Ok(0)
    }
}

/// Inserts snapshots from the column arrays of [`SnapColumns`], replacing any at the same
/// version: the writer's statement, and `sourced rebuild`'s.
pub(super) const INSERT_SNAPSHOTS: &str = "INSERT INTO sourced_snapshots
     (tenant, type, agg_id, version, fold, state, deleted, created_at, updated_at)
     SELECT t, ty, a, v, f, s::json, d, c, u
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int4[], $6::text[], $7::bool[],
                 $8::timestamptz[], $9::timestamptz[]) AS x(t, ty, a, v, f, s, d, c, u)
     ON CONFLICT (tenant, type, agg_id, version) DO UPDATE SET
         fold = excluded.fold, state = excluded.state, deleted = excluded.deleted,
         created_at = excluded.created_at, updated_at = excluded.updated_at";

/// The parameters of [`INSERT_SNAPSHOTS`]: one array per column.
pub(super) struct SnapColumns<'a> {
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
    pub(super) fn new(snaps: &'a [SnapWrite]) -> SnapColumns<'a> {
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

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 9] {
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

pub(super) struct DocWrite {
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

pub(super) type HeadKey = (String, String, String);

pub(super) fn head_key(key: &StreamKey) -> HeadKey {
    (key.tenant.as_str().to_owned(), key.type_name.as_str().to_owned(), key.id.as_str().to_owned())
}

/// Decides each append of `jobs` in order, as if they ran one after the other, from the rows
/// its lookups `found` under the counter's lock (`last`: the counter's value, `None` when its
/// row is missing, which fails every append and writes nothing).
pub(super) fn plan(jobs: &[&Job], last: Option<u64>, found: &Found) -> Result<Plan, tokio_postgres::Error> {
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
pub(super) struct Known {
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
        let record = known.records.get(&record_key).cloned().transpose().map_err(StoreError::corrupt)?;
        let hk = head_key(key);
        let head = || known.heads.get(&hk).cloned().unwrap_or(Ok(StreamHead::default())).map_err(StoreError::corrupt);
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
        if let Some(w) = &request.wake {
            let k = [w.process.clone(), hk.0.clone(), hk.1.clone(), hk.2.clone()];
            self.wakes.insert(k, w.due.map(truncate));
        }
        if let Some(c) = &request.checkpoint {
            let position = i64::try_from(c.position.0).unwrap_or(i64::MAX);
            let entry = self.checkpoints.entry(c.name.clone()).or_insert(position);
            *entry = (*entry).max(position);
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
        let checkpoint_names: Vec<&str> = self.checkpoints.keys().map(String::as_str).collect();
        let checkpoint_positions: Vec<i64> = self.checkpoints.values().copied().collect();
        let checkpoint_params: [&(dyn ToSql + Sync); 2] = [&checkpoint_names, &checkpoint_positions];
        let wakes = WakeColumns::new(&self.wakes);
        let (inserted_events, _, inserted_commands, counters, inserted_snapshots, _, _) = tokio::try_join!(
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
            async {
                if self.checkpoints.is_empty() {
                    return Ok(0);
                }
                client.execute(&statements.upsert_checkpoints, &checkpoint_params).await
            },
            wakes.write(client, statements),
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
