//! The PostgreSQL backend's tests, against a real server: the whole store contract, then what
//! only PostgreSQL has (several processes on one database, global order with slow
//! transactions, migrations, a database that goes away and comes back).
//!
//! Each test works in a schema of its own, `sourced_test_<secs>_<uuid>`, dropped at the end
//! (also when the test fails); schemas left by killed runs are dropped by the next run after an
//! hour. `SOURCED_TEST_POSTGRES_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it is not reachable the tests print
//! `SKIP: …` and pass, unless `SOURCED_REQUIRE_POSTGRES=1` (CI), where they fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_postgres::{NoTls, SimpleQueryMessage};
use uuid::Uuid;

use sourced_core::timestamp::from_micros;
use sourced_core::{
    AggregateId, CommandId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamKey, TenantId, TypeName, Version,
};
use sourced_store::postgres::{LOOK_UP_COMMANDS, LOOK_UP_HEADS, PostgresOptions, PostgresStore};
use sourced_store::{AppendOutcome, AppendRequest, CommandWrite, DocumentWrite, EventStore, StoreError};

// ---------------------------------------------------------------------------------------------
// Scratch schemas

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Schemas of earlier runs older than this are someone's leftovers (a killed run).
const STALE_SCHEMA_SECS: u64 = 3_600;

fn server_url() -> String {
    std::env::var("SOURCED_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn required() -> bool {
    std::env::var("SOURCED_REQUIRE_POSTGRES").is_ok_and(|v| v.trim() == "1")
}

/// `url` with one more connection parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A schema of one test's own; dropped (with everything in it) when this is dropped.
struct Scratch {
    schema: String,
}

impl Scratch {
    /// A new, empty schema, or `None` (after printing why) when the server is not reachable
    /// and not required.
    async fn new() -> Option<Scratch> {
        let url = server_url();
        let client = match admin(&url).await {
            Ok(client) => client,
            Err(e) if required() => panic!("PostgreSQL not reachable at {url} (SOURCED_REQUIRE_POSTGRES=1): {e}"),
            Err(e) => {
                eprintln!("SKIP: PostgreSQL not reachable at {url}: {e}");
                return None;
            }
        };
        let now = unix_secs();
        sweep_stale_schemas(&client, now).await;
        let schema = format!("sourced_test_{now}_{}", Uuid::new_v4().simple());
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.expect("create a scratch schema");
        Some(Scratch { schema })
    }

    /// The URL of a store in this schema.
    fn url(&self) -> String {
        with_param(&server_url(), &format!("options=-csearch_path%3D{}", self.schema))
    }

    /// The URL of a store in this schema whose connections carry `name` (so that a test can
    /// find and end them).
    fn url_named(&self, name: &str) -> String {
        with_param(&self.url(), &format!("application_name={name}"))
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect(&self.url(), PostgresOptions::default()).await.expect("connect")
    }

    /// A plain connection with this schema first on its search path.
    async fn client(&self) -> tokio_postgres::Client {
        admin(&self.url()).await.expect("connect")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        // Its own thread and runtime: Drop cannot await, and may run while a test unwinds.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = admin(&server_url()).await.map_err(std::io::Error::other)?;
                client
                    .batch_execute(&format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .map_err(std::io::Error::other)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: the scratch schema {} was not dropped: {dropped:?}", self.schema);
        }
    }
}

async fn admin(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Drops the scratch schemas of runs that died without cleaning up (once per test binary).
async fn sweep_stale_schemas(client: &tokio_postgres::Client, now: u64) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(rows) = client.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sourced\\_test\\_%'", &[]).await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let secs = name.split('_').nth(2).and_then(|s| s.parse::<u64>().ok());
        if secs.is_some_and(|s| s + STALE_SCHEMA_SECS < now) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await;
        }
    }
}

/// A fresh store in a scratch schema that outlives it; `None` skips the test.
async fn fresh() -> Option<(Box<dyn EventStore>, Scratch)> {
    let scratch = Scratch::new().await?;
    let store = scratch.store().await;
    Some((Box::new(store), scratch))
}

#[path = "postgres/tls.rs"]
mod tls;

mod contract_suite {
    use super::*;
    sourced_store::contract_tests!(fresh());
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn key(tenant: &str, id: &str) -> StreamKey {
    StreamKey {
        tenant: TenantId::parse(tenant).expect("tenant"),
        type_name: TypeName::parse("order").expect("type"),
        id: AggregateId::parse(id).expect("id"),
    }
}

fn cmd(n: u128) -> CommandId {
    CommandId(Uuid::from_u128(n))
}

fn request(k: &StreamKey, expected: ExpectedVersion, command: CommandId, events: usize) -> AppendRequest {
    AppendRequest {
        key: k.clone(),
        expected,
        events: (0..events)
            .map(|i| NewEvent {
                id: command.event_id(i),
                event_type: "patched".into(),
                data: json!({"i": i}),
                metadata: json!({"commandId": command.to_string()}),
            })
            .collect(),
        timestamp: from_micros(1_700_000_000_000_000),
        document: DocumentWrite { state: json!({"n": events}), deleted: false },
        command: CommandWrite { id: command, fingerprint: "fp".into(), extra: json!(null) },
        snapshot: None,
        checkpoint: None,
        wake: None,
    }
}

async fn appended(store: &dyn EventStore, req: AppendRequest) -> Vec<RecordedEvent> {
    match store.append(req).await {
        Ok(AppendOutcome::Appended(events)) => events,
        other => panic!("expected Appended, got {other:?}"),
    }
}

/// A tenant's whole feed, page by page.
async fn feed(store: &dyn EventStore, tenant: &str) -> Vec<RecordedEvent> {
    let tenant = TenantId::parse(tenant).expect("tenant");
    let mut all = Vec::new();
    let mut after = Position(0);
    loop {
        let page = store.read_all(&tenant, after, 1_000).await.expect("read_all");
        let Some(last) = page.last() else { return all };
        after = last.position;
        all.extend(page);
    }
}

fn assert_gap_free(events: &[RecordedEvent]) {
    let mut positions: Vec<u64> = events.iter().map(|e| e.position.0).collect();
    positions.sort_unstable();
    for pair in positions.windows(2) {
        assert_eq!(pair[0] + 1, pair[1], "positions are gap-free");
    }
}

// ---------------------------------------------------------------------------------------------
// Several processes on one database

/// Runner leases across processes (SPEC §4.5): of two stores on one schema one holds a name,
/// while a store on another schema is not blocked by it. When the holder's connection ends (as
/// when its process dies) its lease reads lost within seconds and the other store takes it;
/// closing a store gives its leases up before `close` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_runner_lease_per_schema_and_a_dead_holder_hands_it_over() {
    let Some(scratch) = Scratch::new().await else { return };
    let Some(elsewhere) = Scratch::new().await else { return };
    let (a, b, c) = (scratch.store().await, scratch.store().await, elsewhere.store().await);
    let held = a.runner_lease("deadline").await.expect("take").expect("granted");
    assert!(b.runner_lease("deadline").await.expect("try").is_none(), "one holder per schema");
    let apart = c.runner_lease("deadline").await.expect("take").expect("another schema is apart");
    let key = sourced_store::postgres::runner_lease_key(&scratch.schema, "deadline");
    let ended: i64 = scratch
        .client()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
             WHERE locktype = 'advisory' AND objsubid = 1 AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND (classid::int8 << 32 | objid::int8) = $1",
            &[&key],
        )
        .await
        .expect("end the holder's connection")
        .get(0);
    assert_eq!(ended, 1, "one session holds the lock");
    let mut polls = 0;
    while held.held() {
        polls += 1;
        assert!(polls < 300, "the lease never read lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut taken = None;
    for _ in 0..300 {
        taken = b.runner_lease("deadline").await.expect("try");
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken.as_ref().is_some_and(|l| l.held()), "the other store takes the lease over");
    assert!(apart.held(), "the other schema's lease is untouched");
    assert!(a.runner_lease("deadline").await.expect("try").is_none(), "held by b now");
    b.close().await;
    assert!(!taken.as_ref().unwrap().held(), "closing the store gives its leases up");
    assert!(a.runner_lease("deadline").await.expect("try").is_some(), "free once close returned");
    a.close().await;
    c.close().await;
}

/// SPEC §7.3 across processes: 32 writers spread over four stores (four "processes", four
/// pools) append to many streams; a trigger makes every event of the `slow-*` streams sleep
/// inside its append transaction, after its positions were given, so transactions would
/// commit out of order if anything but the counter lock ordered them. Three readers, each on
/// its own store, tail `read_all` throughout: each sees every event exactly once, in
/// strictly increasing positions, and all see the same final feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_order_holds_across_processes_with_slow_transactions() {
    const PROCESSES: usize = 4;
    const WRITERS: usize = 32;
    const APPENDS_PER_WRITER: usize = 12;
    const READERS: usize = 3;
    let Some(scratch) = Scratch::new().await else { return };
    let stores: Vec<Arc<PostgresStore>> = {
        let mut stores = Vec::new();
        for _ in 0..PROCESSES {
            stores.push(Arc::new(scratch.store().await));
        }
        stores
    };
    scratch
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION sourced_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.004); RETURN NEW; END $$;
             CREATE TRIGGER sourced_test_slow BEFORE INSERT ON sourced_events
             FOR EACH ROW WHEN (NEW.agg_id LIKE 'slow-%') EXECUTE FUNCTION sourced_test_slow();",
        )
        .await
        .expect("install the slow-insert trigger");

    let finished = Arc::new(AtomicUsize::new(0));
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&stores[w % PROCESSES]);
        let finished = Arc::clone(&finished);
        writers.spawn(async move {
            let mut mine = Vec::new();
            for i in 0..APPENDS_PER_WRITER {
                // Every fourth writer is slow; streams are shared by pairs of writers.
                let prefix = if w % 4 == 0 { "slow" } else { "fast" };
                let k = key("t1", &format!("{prefix}-{}-{}", w / 2, i % 3));
                let id = cmd((w as u128) << 32 | i as u128);
                mine.extend(appended(&*store, request(&k, ExpectedVersion::Any, id, 1 + (w + i) % 3)).await);
            }
            finished.fetch_add(1, Ordering::SeqCst);
            mine
        });
    }
    let mut readers = JoinSet::new();
    for r in 0..READERS {
        let store = Arc::clone(&stores[(r + 1) % PROCESSES]);
        let finished = Arc::clone(&finished);
        readers.spawn(async move {
            let tenant = TenantId::parse("t1").expect("tenant");
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = Position(0);
            // Bounded: the writers finish, then one empty read ends the loop.
            for _ in 0..1_000_000 {
                let writers_done = finished.load(Ordering::SeqCst) == WRITERS;
                let page = store.read_all(&tenant, after, 5 + r).await.expect("read_all");
                for e in &page {
                    assert!(e.position > after, "reader {r}: position {} after {after}", e.position);
                    // One tenant only, so its positions run without gaps from 1.
                    assert_eq!(e.position.0, after.0 + 1, "reader {r}: a position was skipped");
                    after = e.position;
                }
                if page.is_empty() {
                    if writers_done {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen.extend(page);
            }
            panic!("reader {r} did not finish");
        });
    }
    let mut written = Vec::new();
    while let Some(events) = writers.join_next().await {
        written.extend(events.expect("a writer"));
    }
    written.sort_by_key(|e| e.position);
    assert_gap_free(&written);
    let total: usize = (0..WRITERS).map(|w| (0..APPENDS_PER_WRITER).map(|i| 1 + (w + i) % 3).sum::<usize>()).sum();
    assert_eq!(written.len(), total);
    let all = feed(&*stores[0], "t1").await;
    assert_eq!(all, written, "the feed holds exactly what was acknowledged, in position order");
    while let Some(seen) = readers.join_next().await {
        assert_eq!(seen.expect("a reader"), all, "a tailing reader saw every event once, in order");
    }
    for store in &stores {
        store.close().await;
    }
}

/// Two stores (two processes) race with exact expected versions on the same streams: each
/// version is won exactly once, and a command id sent through both is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_are_safe_across_processes() {
    const WRITERS_PER_PROCESS: u64 = 8;
    const TARGET_VERSION: u64 = 40;
    let Some(scratch) = Scratch::new().await else { return };
    let stores = [Arc::new(scratch.store().await), Arc::new(scratch.store().await)];
    let streams = [key("t1", "race-a"), key("t1", "race-b")];
    let mut tasks = JoinSet::new();
    for (p, store) in stores.iter().enumerate() {
        for w in 0..WRITERS_PER_PROCESS {
            for (s, k) in streams.iter().enumerate() {
                let (store, k) = (Arc::clone(store), k.clone());
                tasks.spawn(async move {
                    let mut wins = Vec::new();
                    let mut known = 0u64;
                    for attempt in 0..TARGET_VERSION + 2 {
                        if known >= TARGET_VERSION {
                            return wins;
                        }
                        let id = cmd((p as u128) << 96 | (s as u128) << 80 | u128::from(w) << 32 | u128::from(attempt));
                        let req = request(&k, ExpectedVersion::Exact(Version(known)), id, 1 + (w % 2) as usize);
                        match store.append(req).await {
                            Ok(AppendOutcome::Appended(events)) => {
                                assert_eq!(events[0].version, Version(known + 1));
                                known = events.last().expect("events").version.0;
                                wins.push(events);
                            }
                            Err(StoreError::Conflict { actual, .. }) => {
                                assert!(actual.version.0 > known, "a conflict means the stream moved on");
                                known = actual.version.0;
                            }
                            other => panic!("process {p}, writer {w}: {other:?}"),
                        }
                    }
                    panic!("process {p}, writer {w} did not reach version {TARGET_VERSION}");
                });
            }
        }
    }
    let mut wins: BTreeMap<StreamKey, Vec<Vec<RecordedEvent>>> = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        for win in result.expect("a writer") {
            wins.entry(key("t1", win[0].target_id.as_str())).or_default().push(win);
        }
    }
    for k in &streams {
        let mut won = wins.remove(k).expect("wins");
        won.sort_by_key(|w| w[0].version);
        let mut next = 1u64;
        for win in &won {
            assert_eq!(win[0].version.0, next, "{k}: each version is won exactly once");
            next = win.last().expect("events").version.0 + 1;
        }
        let winners: Vec<RecordedEvent> = won.into_iter().flatten().collect();
        let read = stores[0].read_stream(k, Version(0), None, 10_000).await.expect("read_stream");
        assert_eq!(read, winners, "{k}: the stream holds exactly the winning appends");
        let row = stores[1].get_document(k).await.expect("get_document").expect("a row");
        assert_eq!(row.version.0, next - 1);
    }
    assert_gap_free(&feed(&*stores[1], "t1").await);

    // One command id sent through both processes at once, to different streams.
    let id = cmd(u128::MAX - 1);
    let (a, b) = tokio::join!(
        stores[0].append(request(&key("t1", "dup-a"), ExpectedVersion::Any, id, 1)),
        stores[1].append(request(&key("t1", "dup-b"), ExpectedVersion::Any, id, 2)),
    );
    let outcomes = [a.expect("append"), b.expect("append")];
    let stored: Vec<_> = outcomes.iter().filter(|o| matches!(o, AppendOutcome::Appended(_))).collect();
    assert_eq!(stored.len(), 1, "{outcomes:?}");
    let record =
        stores[0].get_command(&TenantId::parse("t1").expect("tenant"), id).await.expect("get").expect("a record");
    for outcome in &outcomes {
        if let AppendOutcome::Duplicate(r) = outcome {
            assert_eq!(r, &record);
        }
    }
    for store in &stores {
        store.close().await;
    }
}

/// Two processes starting at once on an empty schema: both come up, the schema is migrated
/// once; a restart keeps everything and positions continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_run_once_and_data_survives_a_restart() {
    let Some(scratch) = Scratch::new().await else { return };
    let url = scratch.url();
    let (a, b) = tokio::join!(
        PostgresStore::connect(&url, PostgresOptions::default()),
        PostgresStore::connect(&url, PostgresOptions::default()),
    );
    let (a, b) = (a.expect("first process"), b.expect("second process"));
    let client = scratch.client().await;
    let versions: Vec<i32> = client
        .query("SELECT version FROM sourced_schema_migrations ORDER BY version", &[])
        .await
        .expect("migrations table")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let first = appended(&a, request(&key("t1", "a"), ExpectedVersion::NoStream, cmd(1), 2)).await;
    let second = appended(&b, request(&key("t1", "b"), ExpectedVersion::NoStream, cmd(2), 1)).await;
    assert_eq!(second[0].position.0, first[1].position.0 + 1);
    a.close().await;
    b.close().await;

    let again = scratch.store().await;
    assert_eq!(feed(&again, "t1").await, [first, second.clone()].concat());
    match again.append(request(&key("t1", "b"), ExpectedVersion::Any, cmd(2), 1)).await {
        Ok(AppendOutcome::Duplicate(r)) => assert_eq!(r.last_version, Version(1)),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    let next = appended(&again, request(&key("t1", "a"), ExpectedVersion::Exact(Version(2)), cmd(3), 1)).await;
    assert_eq!(next[0].position.0, second[0].position.0 + 1);
    assert_eq!(again.stats().appends, 1, "counters start again at connect");
    again.close().await;

    // A schema newer than this build is refused.
    client
        .execute("INSERT INTO sourced_schema_migrations (version, description) VALUES (99, 'future')", &[])
        .await
        .expect("insert");
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(StoreError::Backend(m)) => assert!(m.contains("99"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A URL that does not parse, bad options, and a server that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_options_and_absent_servers_are_refused() {
    assert!(matches!(
        PostgresStore::connect("postgres://127.0.0.1:5432/x?sslmode=nonsense", PostgresOptions::default()).await,
        Err(StoreError::InvalidRequest(_))
    ));
    let options = PostgresOptions { pool_size: 0, ..PostgresOptions::default() };
    assert!(matches!(PostgresStore::connect(DEFAULT_URL, options).await, Err(StoreError::InvalidRequest(_))));
    // Nothing listens on a port we bound and released.
    let port = free_port().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(StoreError::Unavailable(m)) => assert!(!m.is_empty()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A connection failure keeps the driver's error as its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_failure_has_the_drivers_error_as_source() {
    let port = free_port().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let e = match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(e) => e,
        Ok(_) => panic!("connected to a port nothing listens on"),
    };
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let source = std::error::Error::source(&e).unwrap_or_else(|| panic!("no source: {e:?}"));
    assert!(source.downcast_ref::<tokio_postgres::Error>().is_some(), "not tokio-postgres's: {source:?}");
}

/// The database goes away (a proxy in front of it stops, cutting every connection) and comes
/// back: meanwhile ping, appends and reads fail as `Unavailable`; afterwards the same store
/// works again by itself, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_recovers_when_the_database_comes_back() {
    let Some(scratch) = Scratch::new().await else { return };
    let upstream = upstream_addr();
    let proxy = Proxy::start(upstream).await;
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?options=-csearch_path%3D{}",
        upstream_user(),
        proxy.port,
        upstream_db(),
        scratch.schema
    );
    let options = PostgresOptions { connect_timeout_ms: 2_000, ..PostgresOptions::default() };
    let store = PostgresStore::connect(&url, options).await.expect("connect through the proxy");
    let a = key("t1", "a");
    let first = appended(&store, request(&a, ExpectedVersion::NoStream, cmd(1), 1)).await;
    store.ping().await.expect("ping");

    let port = proxy.stop().await;
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
    match store.append(request(&a, ExpectedVersion::Exact(Version(1)), cmd(2), 1)).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(store.get_document(&a).await, Err(StoreError::Unavailable(_))));

    let proxy = Proxy::start_on(upstream, port).await;
    store.ping().await.expect("ping after the database came back");
    // The refused append was not stored: the same command goes through now.
    let second = appended(&store, request(&a, ExpectedVersion::Exact(Version(1)), cmd(2), 1)).await;
    assert_eq!(second[0].position.0, first[0].position.0 + 1);
    assert_eq!(feed(&store, "t1").await, [first, second].concat());
    store.close().await;
    proxy.stop().await;
}

/// The server ends the store's connections (`pg_terminate_backend`, as a failover or an
/// administrator would): the store reconnects by itself; an append that failed meanwhile is
/// retried with the same command id and stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_are_replaced() {
    let Some(scratch) = Scratch::new().await else { return };
    let name = format!("sourced_t_{}", Uuid::new_v4().simple());
    let store = PostgresStore::connect(&scratch.url_named(&name), PostgresOptions::default()).await.expect("connect");
    let a = key("t1", "a");
    appended(&store, request(&a, ExpectedVersion::NoStream, cmd(1), 1)).await;
    let _ = store.get_document(&a).await.expect("get_document");
    let admin = scratch.client().await;
    let ended: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) t",
            &[&name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(ended >= 1, "the store had connections to end");

    let mut outcome = None;
    for attempt in 0..20 {
        match store.append(request(&a, ExpectedVersion::Exact(Version(1)), cmd(2), 1)).await {
            Ok(o) => {
                outcome = Some(o);
                break;
            }
            Err(StoreError::Unavailable(m)) => eprintln!("attempt {attempt}: {m}"),
            Err(e) => panic!("expected Unavailable while reconnecting, got {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match outcome {
        Some(AppendOutcome::Appended(_) | AppendOutcome::Duplicate(_)) => {}
        None => panic!("the store did not recover"),
    }
    store.ping().await.expect("ping");
    let events = store.read_stream(&a, Version(0), None, 100).await.expect("read_stream");
    assert_eq!(events.iter().map(|e| e.version.0).collect::<Vec<_>>(), [1, 2]);
    store.close().await;
}

// ---------------------------------------------------------------------------------------------
// Live notifications across processes (LISTEN/NOTIFY)

/// A commit listener that records every position it hears.
#[derive(Default)]
struct Recorder {
    positions: std::sync::Mutex<Vec<u64>>,
    heads: std::sync::Mutex<Vec<u64>>,
}

impl sourced_store::CommitListener for Recorder {
    fn wants_events(&self) -> bool {
        true
    }

    fn committed(&self, head: Position, events: Vec<RecordedEvent>) {
        self.heads.lock().unwrap().push(head.0);
        self.positions.lock().unwrap().extend(events.iter().map(|e| e.position.0));
    }
}

impl Recorder {
    /// Waits (bounded) until `n` positions were heard; returns them.
    async fn wait_for(&self, n: usize) -> Vec<u64> {
        for _ in 0..600 {
            if self.positions.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.positions.lock().unwrap().clone()
    }
}

/// Two stores on one schema play two processes: a listener on A hears every event appended
/// through B (and through A), exactly once, in position order, with heads never going back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_commit_listener_hears_every_process_in_order() {
    let Some(scratch) = Scratch::new().await else { return };
    let a = Arc::new(scratch.store().await);
    let b = Arc::new(scratch.store().await);
    let recorder = Arc::new(Recorder::default());
    assert!(a.set_commit_listener(recorder.clone()));
    assert!(!a.set_commit_listener(recorder.clone()), "one listener per store");
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 25;
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.spawn(async move {
            for i in 0..PER_WRITER {
                let k = key(&format!("t{}", w % 3), &format!("w{w}-{i}"));
                let c = cmd((w * 1_000 + i) as u128 + 1);
                appended(store.as_ref(), request(&k, ExpectedVersion::NoStream, c, 1 + i % 2)).await;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.expect("writer");
    }
    let total: usize = (0..WRITERS).map(|_| (0..PER_WRITER).map(|i| 1 + i % 2).sum::<usize>()).sum();
    let heard = recorder.wait_for(total).await;
    assert_eq!(heard, (1..=total as u64).collect::<Vec<_>>(), "every position once, in order");
    let heads = recorder.heads.lock().unwrap().clone();
    assert!(heads.windows(2).all(|w| w[0] <= w[1]), "heads never go back: {heads:?}");
    a.close().await;
    b.close().await;
}

/// The LISTEN connection is ended by the server: the store reconnects it, and events appended
/// by another process meanwhile and afterwards still reach the listener, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_commit_listener_survives_a_lost_listen_connection() {
    let Some(scratch) = Scratch::new().await else { return };
    let name = format!("sourced_l_{}", Uuid::new_v4().simple());
    let a = PostgresStore::connect(&scratch.url_named(&name), PostgresOptions::default()).await.expect("connect");
    let b = scratch.store().await;
    let recorder = Arc::new(Recorder::default());
    assert!(a.set_commit_listener(recorder.clone()));
    appended(&b, request(&key("t1", "x"), ExpectedVersion::NoStream, cmd(1), 1)).await;
    assert_eq!(recorder.wait_for(1).await, [1]);
    let admin = scratch.client().await;
    let ended: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE 'LISTEN%') t",
            &[&name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(ended, 1, "the store has one LISTEN connection");
    for i in 2..=20u128 {
        appended(&b, request(&key("t1", &format!("x{i}")), ExpectedVersion::NoStream, cmd(i), 1)).await;
    }
    assert_eq!(recorder.wait_for(20).await, (1..=20).collect::<Vec<u64>>());
    a.close().await;
    b.close().await;
}

// ---------------------------------------------------------------------------------------------
// Group commit and the slow path

/// Holds the position counter's lock from another connection, so the store's writer blocks on
/// its first batch while every other append queues behind it.
async fn lock_counter(scratch: &Scratch) -> tokio_postgres::Client {
    let client = scratch.client().await;
    client.batch_execute("BEGIN; SELECT last FROM sourced_position FOR UPDATE").await.expect("lock the counter");
    client
}

async fn wait_for_pending(store: &PostgresStore, n: u64) {
    for _ in 0..100_000 {
        if store.pending_appends() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{n} appends never reached the writer (now {})", store.pending_appends());
}

/// Queues `requests` while the counter is locked, so the writer takes them as one batch, then
/// releases the lock; the outcomes come back in request order, with their indexes.
async fn append_as_one_batch(
    scratch: &Scratch,
    store: &Arc<PostgresStore>,
    requests: Vec<AppendRequest>,
) -> Vec<(usize, Result<AppendOutcome, StoreError>)> {
    let lock = lock_counter(scratch).await;
    let mut tasks = JoinSet::new();
    for (i, req) in requests.into_iter().enumerate() {
        let writer = Arc::clone(store);
        tasks.spawn(async move { (i, writer.append(req).await) });
        wait_for_pending(store, i as u64 + 1).await;
    }
    lock.batch_execute("ROLLBACK").await.expect("release the counter");
    let mut outcomes: Vec<_> = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome.expect("task"));
    }
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes
}

/// The writer's lookups of command records and stream heads stay primary-key lookups in the
/// plan PostgreSQL keeps for them, even when that plan is made while the tables are empty: a
/// prepared statement keeps its generic plan, and a plan that scans the table would make every
/// batch read all of it as the table grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_lookups_keep_index_plans_made_on_empty_tables() {
    let Some(scratch) = Scratch::new().await else { return };
    let store = scratch.store().await;
    let client = scratch.client().await;
    client.batch_execute("SET plan_cache_mode = force_generic_plan").await.expect("generic plans");
    let lookups = [
        ("commands", LOOK_UP_COMMANDS, "('{default}', '{00000000-0000-7000-8000-000000000001}')"),
        ("heads", LOOK_UP_HEADS, "('{default}', '{order}', '{o-1}')"),
    ];
    for (name, sql, args) in lookups {
        client.batch_execute(&format!("PREPARE look_up_{name} AS {sql}")).await.expect("prepare");
        let messages = client.simple_query(&format!("EXPLAIN EXECUTE look_up_{name}{args}")).await.expect("explain");
        let plan: Vec<&str> = messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Index Scan") || plan.contains("Index Only Scan"), "{name} lookup:\n{plan}");
        assert!(!plan.contains("Seq Scan") && !plan.contains("Hash"), "{name} lookup:\n{plan}");
    }
    store.close().await;
}

/// Appends queued while a batch is being committed go together into the next commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_appends() {
    const APPENDS: usize = 200;
    let Some(scratch) = Scratch::new().await else { return };
    let store = Arc::new(scratch.store().await);
    let lock = lock_counter(&scratch).await;
    let mut tasks = JoinSet::new();
    for i in 0..APPENDS {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let k = key("t1", &format!("s{i}"));
            store.append(request(&k, ExpectedVersion::NoStream, cmd(1_000 + i as u128), 1)).await
        });
    }
    wait_for_pending(&store, APPENDS as u64).await;
    lock.batch_execute("ROLLBACK").await.expect("release the counter");
    while let Some(outcome) = tasks.join_next().await {
        assert!(matches!(outcome.expect("task"), Ok(AppendOutcome::Appended(_))));
    }
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (APPENDS as u64, APPENDS as u64));
    assert!(stats.commits <= 2, "{APPENDS} queued appends took {} commits", stats.commits);
    let all = feed(&*store, "t1").await;
    assert_eq!(all.iter().map(|e| e.position.0).collect::<Vec<_>>(), (1..=APPENDS as u64).collect::<Vec<_>>());
    store.close().await;
}

/// A write that PostgreSQL refuses (here an event injected behind the store's back collides)
/// fails its append alone: the batch is re-run with savepoints, the others are stored, and the
/// failed one uses no position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_append_rolls_back_alone_and_uses_no_position() {
    let Some(scratch) = Scratch::new().await else { return };
    let store = Arc::new(scratch.store().await);
    let a = key("t1", "a");
    appended(&*store, request(&a, ExpectedVersion::NoStream, cmd(1), 1)).await;
    let side = scratch.client().await;
    side.execute(
        "INSERT INTO sourced_events (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
         VALUES (1000000, 't1', 'order', 'a', 3, $1, 'patched', 'null', '{}', now())",
        &[&Uuid::from_u128(7)],
    )
    .await
    .expect("inject an event");
    let outcomes = append_as_one_batch(
        &scratch,
        &store,
        vec![
            request(&key("t1", "b"), ExpectedVersion::NoStream, cmd(2), 1),
            request(&a, ExpectedVersion::Exact(Version(1)), cmd(3), 2),
            request(&key("t1", "c"), ExpectedVersion::NoStream, cmd(4), 1),
        ],
    )
    .await;
    match &outcomes[1].1 {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("disagree"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let positions: Vec<u64> = [&outcomes[0].1, &outcomes[2].1]
        .iter()
        .map(|o| match o {
            Ok(AppendOutcome::Appended(events)) => events[0].position.0,
            other => panic!("expected Appended, got {other:?}"),
        })
        .collect();
    assert_eq!(positions, [2, 3], "the failed append used no position");
    assert_eq!(store.get_command(&a.tenant, cmd(3)).await.expect("get_command"), None);
    assert_eq!(store.get_document(&a).await.expect("get_document").expect("a row").version, Version(1));
    store.close().await;
}

/// The writes, `NOTIFY` and `COMMIT` of a batch go to PostgreSQL as one pipeline: a write that
/// fails there (here the snapshot insert, the last write before `COMMIT`, refused by a trigger
/// for one stream) must leave nothing of the batch committed. The batch is then re-run with
/// savepoints: the refused append fails alone and uses no position, the others are stored
/// once, and the counter matches the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_refused_in_the_commit_pipeline_commits_nothing_of_its_batch() {
    let Some(scratch) = Scratch::new().await else { return };
    let store = Arc::new(scratch.store().await);
    let side = scratch.client().await;
    side.batch_execute(
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.agg_id = 'bad' THEN RAISE EXCEPTION 'refused by the test'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_bad BEFORE INSERT ON sourced_snapshots FOR EACH ROW EXECUTE FUNCTION refuse_bad();",
    )
    .await
    .expect("install the trigger");
    let with_snapshot = |k: &StreamKey, command: CommandId| {
        let mut r = request(k, ExpectedVersion::NoStream, command, 2);
        r.snapshot = Some(sourced_store::SnapshotWrite { fold: 1, created_at: from_micros(1_700_000_000_000_000) });
        r
    };
    let outcomes = append_as_one_batch(
        &scratch,
        &store,
        vec![
            with_snapshot(&key("t1", "a"), cmd(1)),
            with_snapshot(&key("t1", "bad"), cmd(2)),
            request(&key("t1", "c"), ExpectedVersion::NoStream, cmd(3), 1),
        ],
    )
    .await;
    match &outcomes[1].1 {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("disagree"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let positions: Vec<Vec<u64>> = [&outcomes[0].1, &outcomes[2].1]
        .iter()
        .map(|o| match o {
            Ok(AppendOutcome::Appended(events)) => events.iter().map(|e| e.position.0).collect(),
            other => panic!("expected Appended, got {other:?}"),
        })
        .collect();
    assert_eq!(positions, [vec![1, 2], vec![3]], "the refused append used no position");
    let all = feed(&*store, "t1").await;
    assert_eq!(all.iter().map(|e| e.position.0).collect::<Vec<_>>(), [1, 2, 3]);
    let bad = key("t1", "bad");
    assert_eq!(store.get_document(&bad).await.expect("get_document"), None);
    assert_eq!(store.get_command(&bad.tenant, cmd(2)).await.expect("get_command"), None);
    let counter: i64 = side.query_one("SELECT last FROM sourced_position", &[]).await.expect("counter").get(0);
    assert_eq!(counter, 3, "the counter matches the stored events");
    let snapshots: i64 = side.query_one("SELECT count(*) FROM sourced_snapshots", &[]).await.expect("count").get(0);
    assert_eq!(snapshots, 1, "only the stored append's snapshot");
    store.close().await;
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of the shared server, to make "the database" go away without touching
// the server itself.

fn upstream_config() -> tokio_postgres::Config {
    server_url().parse().expect("SOURCED_TEST_POSTGRES_URL parses")
}

fn upstream_addr() -> std::net::SocketAddr {
    let config = upstream_config();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let ip: std::net::IpAddr =
        if host == "localhost" { [127, 0, 0, 1].into() } else { host.parse().expect("an IP host") };
    (ip, port).into()
}

fn upstream_user() -> String {
    upstream_config().get_user().unwrap_or("postgres").to_owned()
}

fn upstream_db() -> String {
    upstream_config().get_dbname().unwrap_or("test").to_owned()
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Forwards 127.0.0.1:`port` to the server; [`Proxy::stop`] closes the listener and cuts
/// every connection, and returns once all are closed.
struct Proxy {
    port: u16,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        Proxy::start_on(upstream, 0).await
    }

    async fn start_on(upstream: std::net::SocketAddr, port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind the proxy");
        let port = listener.local_addr().expect("addr").port();
        let (shutdown, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopping.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { break };
                        connections.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                        // Reap finished connections so the set stays small.
                        while connections.try_join_next().is_some() {}
                    }
                }
            }
            drop(listener);
            // Aborts every connection's task and waits until each has dropped its sockets.
            connections.shutdown().await;
        });
        Proxy { port, shutdown, task }
    }

    async fn stop(self) -> u16 {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        self.port
    }
}

/// Every connection of the store commits synchronously (an acknowledged append is durable),
/// even when its URL asks otherwise (issue 14, item 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_commit_synchronously_whatever_the_url_says() {
    let Some(scratch) = Scratch::new().await else { return };
    let url =
        with_param(&server_url(), &format!("options=-csearch_path%3D{}%20-csynchronous_commit%3Doff", scratch.schema));
    // The URL does what it says for a plain connection…
    let plain = admin(&url).await.expect("connect");
    let row = plain.query_one("SHOW synchronous_commit", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "off", "the URL asks for asynchronous commits");
    // …and not for the store's connections.
    let store = PostgresStore::connect(&url, PostgresOptions::default()).await.expect("connect");
    assert_eq!(store.synchronous_commit().await.expect("show"), "on");
    appended(&store, request(&key("t1", "sync"), ExpectedVersion::NoStream, cmd(77), 1)).await;
    assert_eq!(store.head().await.expect("head"), Position(1));
    store.close().await;
}
