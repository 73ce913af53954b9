//! The SQLite backend's tests: the whole store contract, then what only SQLite has (the file
//! on disk, group commit, the writer's shutdown, fault injection through a second connection).

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

use sourced_core::timestamp::from_micros;
use sourced_core::{
    AggregateId, CommandId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamKey, TenantId, TypeName, Version,
};
use sourced_store::contract::{self, join_all};
use sourced_store::sqlite::{SqliteOptions, SqliteStore};
use sourced_store::{AppendOutcome, AppendRequest, CommandWrite, DocumentWrite, EventStore, StoreError, StoreStats};

/// A fresh store in a temporary directory that lives as long as the store.
async fn fresh() -> (Box<dyn EventStore>, TempDir) {
    let (store, dir) = open_fresh(SqliteOptions::default());
    (Box::new(store), dir)
}

fn open_fresh(options: SqliteOptions) -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // A nested path: open creates the directories.
    let store = SqliteStore::open(&dir.path().join("data/nested/sourced.db"), options).expect("open");
    (store, dir)
}

mod contract_suite {
    use super::*;
    sourced_store::contract_tests!(fresh());
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn key(id: &str) -> StreamKey {
    StreamKey {
        tenant: TenantId::parse("t1").expect("tenant"),
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

async fn feed(store: &dyn EventStore) -> Vec<RecordedEvent> {
    store.read_all(&TenantId::parse("t1").expect("tenant"), Position(0), 10_000).await.expect("read_all")
}

/// A second connection to the database, for what the store itself never does.
fn side_connection(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("a second connection");
    conn.busy_timeout(std::time::Duration::from_secs(10)).expect("busy timeout");
    conn
}

/// Holds SQLite's write lock from a second connection, so the writer blocks on its next batch
/// while appends queue up behind it; dropped (or `release`d), the writer goes on.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(path: &Path) -> WriteLock {
        let conn = side_connection(path);
        conn.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
        WriteLock(conn)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").expect("release the write lock");
    }
}

/// Waits until `n` appends are with the writer (queued, or in the batch it holds).
async fn wait_for_pending(store: &SqliteStore, n: u64) {
    for _ in 0..100_000 {
        if store.pending_appends() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("{n} appends never reached the writer (now {})", store.pending_appends());
}

// ---------------------------------------------------------------------------------------------
// SQLite specifics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_everything_and_positions_continue() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("sourced.db");
    let (before, document, record) = {
        let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        appended(&store, request(&key("a"), ExpectedVersion::NoStream, cmd(1), 3)).await;
        appended(&store, request(&key("b"), ExpectedVersion::NoStream, cmd(2), 2)).await;
        let mut delete = request(&key("a"), ExpectedVersion::Exact(Version(3)), cmd(3), 1);
        delete.document.deleted = true;
        appended(&store, delete).await;
        let before = feed(&store).await;
        let document = store.get_document(&key("a")).await.expect("get_document");
        let record = store.get_command(&key("a").tenant, cmd(3)).await.expect("get_command");
        store.close().await;
        (before, document, record)
    };
    assert_eq!(before.len(), 6);

    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&store).await, before);
    assert_eq!(store.get_document(&key("a")).await.expect("get_document"), document);
    assert_eq!(store.get_command(&key("a").tenant, cmd(3)).await.expect("get_command"), record);
    let read = before.len() as u64;
    assert_eq!(store.stats(), StoreStats { events_read: read, ..Default::default() }, "counters start again at open");
    // The command record survives the restart (SPEC §2.4).
    match store.append(request(&key("a"), ExpectedVersion::Any, cmd(3), 1)).await {
        Ok(AppendOutcome::Duplicate(r)) => assert_eq!(Some(r), record),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    let next = appended(&store, request(&key("b"), ExpectedVersion::Exact(Version(2)), cmd(4), 2)).await;
    let last = before.last().expect("events").position;
    assert_eq!(next.iter().map(|e| e.position.0).collect::<Vec<_>>(), [last.0 + 1, last.0 + 2]);
    assert_eq!(next[0].version, Version(3));
    store.close().await;
    drop(store);

    // Opening again without closing first (a crash is tested by the writer's durability
    // guarantee: replies come after COMMIT with synchronous=FULL).
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&store).await.len(), 8);
    let user_version: i64 =
        side_connection(&path).query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    assert_eq!(user_version, 3);
}

/// A database of schema version 1 (before snapshots and checkpoints) is migrated on open; its
/// data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_migrated() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("sourced.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
    let before = appended(&store, request(&key("a"), ExpectedVersion::NoStream, cmd(1), 3)).await;
    store.close().await;
    drop(store);
    let side = side_connection(&path);
    side.execute_batch("DROP TABLE snapshots; DROP TABLE checkpoints; DROP TABLE wakes; PRAGMA user_version = 1;")
        .expect("back to version 1");
    drop(side);
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&store).await, before);
    assert_eq!(store.load_snapshot(&key("a"), 1, None).await.expect("the snapshots table is back"), None);
    assert_eq!(store.checkpoint("p").await.expect("the checkpoints table is there"), None);
    let user_version: i64 =
        side_connection(&path).query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    assert_eq!(user_version, 3);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("sourced.db");
    drop(SqliteStore::open(&path, SqliteOptions::default()).expect("open"));
    side_connection(&path).pragma_update(None, "user_version", 99).expect("set user_version");
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(StoreError::Backend(m)) => assert!(m.contains("99"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A backend failure keeps the driver's error as its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_fails_with_the_drivers_error_as_source() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("sourced.db");
    std::fs::write(&path, vec![0x5a_u8; 64 * 1024]).expect("write a file that is not a database");
    let e = match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("opened a file that is not a database"),
    };
    let source = std::error::Error::source(&e).unwrap_or_else(|| panic!("no source: {e:?}"));
    let driver = source.downcast_ref::<rusqlite::Error>().unwrap_or_else(|| panic!("not rusqlite's: {source:?}"));
    assert_eq!(driver.sqlite_error_code(), Some(rusqlite::ErrorCode::NotADatabase), "{driver}");
    assert!(e.to_string().contains(&driver.to_string()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let options = SqliteOptions { readers: 0, ..SqliteOptions::default() };
    assert!(matches!(SqliteStore::open(&dir.path().join("s.db"), options), Err(StoreError::InvalidRequest(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_concurrent_appends() {
    const APPENDS: usize = 200;
    let (store, _dir) = open_fresh(SqliteOptions::default());
    let store = Arc::new(store);
    // With the write lock held elsewhere, the writer blocks on its first batch and every
    // other append queues behind it: they then go in one or two commits, deterministically.
    let lock = WriteLock::take(store.path());
    let tasks: Vec<_> = (0..APPENDS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let k = key(&format!("s{i}"));
                store.append(request(&k, ExpectedVersion::NoStream, cmd(1_000 + i as u128), 1)).await
            })
        })
        .collect();
    wait_for_pending(&store, APPENDS as u64).await;
    lock.release();
    for task in tasks {
        assert!(matches!(task.await.expect("task"), Ok(AppendOutcome::Appended(_))));
    }
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (APPENDS as u64, APPENDS as u64));
    assert!(stats.commits <= 2, "{APPENDS} queued appends took {} commits", stats.commits);
    let all = feed(&*store).await;
    assert_eq!(all.len(), APPENDS);
    assert!(all.windows(2).all(|w| w[0].position.0 + 1 == w[1].position.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_mixes_appends_conflicts_and_duplicates() {
    let (store, _dir) = open_fresh(SqliteOptions::default());
    let lock = WriteLock::take(store.path());
    let a = key("a");
    let requests = vec![
        request(&a, ExpectedVersion::NoStream, cmd(1), 2), // appended: 1..=2
        request(&a, ExpectedVersion::NoStream, cmd(2), 1), // conflict: the first is in the batch
        request(&a, ExpectedVersion::Exact(Version(2)), cmd(1), 1), // duplicate of the first
        request(&a, ExpectedVersion::Exact(Version(2)), cmd(2), 1), // appended: cmd 2 was not stored
        request(&key("b"), ExpectedVersion::Any, cmd(2), 1), // duplicate of the one before
        request(&key("b"), ExpectedVersion::Exists, cmd(3), 1), // conflict
        request(&key("b"), ExpectedVersion::Any, cmd(4), 3), // appended
    ];
    let outcomes = {
        let all = join_all(requests.into_iter().map(|r| store.append(r)).collect());
        tokio::pin!(all);
        // Poll once so every request is queued, then let the writer go.
        tokio::select! {
            biased;
            _ = &mut all => panic!("the writer ran while the write lock was held"),
            () = wait_for_pending(&store, 7) => {}
        }
        lock.release();
        all.await
    };
    let shape: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Ok(AppendOutcome::Appended(e)) => format!("appended {}..={}", e[0].version, e[e.len() - 1].version),
            Ok(AppendOutcome::Duplicate(r)) => format!("duplicate {}..={}", r.first_version, r.last_version),
            Err(StoreError::Conflict { actual, .. }) => format!("conflict at {}", actual.version),
            Err(e) => format!("error {e}"),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "appended 1..=2",
            "conflict at 2",
            "duplicate 1..=2",
            "appended 3..=3",
            "duplicate 3..=3",
            "conflict at 0",
            "appended 1..=3"
        ]
    );
    assert!(store.stats().commits <= 2);
    let all = feed(&store).await;
    assert_eq!(all.iter().map(|e| e.position.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_check_in_batches() {
    for seed in [1, 2, 3] {
        // The queue holds a whole group, so the appends reach the writer in the order issued
        // (senders that wait for room may be let in in any order).
        let options =
            SqliteOptions { batch_appends_max: 8, readers: 1, queue_capacity: 32, ..SqliteOptions::default() };
        let (store, _dir) = open_fresh(options);
        contract::model_check(&store, seed, 800, 24).await;
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_then_append_is_closed() {
    let (store, _dir) = open_fresh(SqliteOptions::default());
    appended(&store, request(&key("a"), ExpectedVersion::NoStream, cmd(1), 1)).await;
    store.ping().await.expect("ping");
    store.close().await;
    match store.append(request(&key("a"), ExpectedVersion::Any, cmd(2), 1)).await {
        Err(StoreError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(matches!(store.ping().await, Err(StoreError::Closed)));
    assert!(matches!(store.get_document(&key("a")).await, Err(StoreError::Closed)));
    store.close().await; // twice is fine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_finishes_queued_appends() {
    const APPENDS: usize = 50;
    let (store, dir) = open_fresh(SqliteOptions::default());
    let path = store.path().to_owned();
    let store = Arc::new(store);
    let lock = WriteLock::take(&path);
    let tasks: Vec<_> = (0..APPENDS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store.append(request(&key(&format!("s{i}")), ExpectedVersion::NoStream, cmd(i as u128), 2)).await
            })
        })
        .collect();
    wait_for_pending(&store, APPENDS as u64).await;
    let closing = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.close().await })
    };
    // Once close has taken the writer, new appends are refused, but the queued ones stand.
    for _ in 0..100_000 {
        if store.is_closed() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(store.is_closed());
    assert!(matches!(
        store.append(request(&key("late"), ExpectedVersion::Any, cmd(999), 1)).await,
        Err(StoreError::Closed)
    ));
    lock.release();
    closing.await.expect("close");
    for task in tasks {
        assert!(matches!(task.await.expect("task"), Ok(AppendOutcome::Appended(_))));
    }
    drop(store);
    let reopened = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&reopened).await.len(), APPENDS * 2);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_without_close_stops_the_writer() {
    let (store, dir) = open_fresh(SqliteOptions::default());
    let path = store.path().to_owned();
    let store: Arc<dyn EventStore> = Arc::new(store);
    let written = appended(&*store, request(&key("a"), ExpectedVersion::NoStream, cmd(1), 1)).await;
    // Drop joins the writer thread (it returns only once the thread has ended).
    drop(store);
    let reopened = SqliteStore::open(&path, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&reopened).await, written);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_rolls_back_alone_and_uses_no_position() {
    let (store, _dir) = open_fresh(SqliteOptions::default());
    let a = key("a");
    appended(&store, request(&a, ExpectedVersion::NoStream, cmd(1), 1)).await;
    // Fault injection: an event at version 3 that the read model does not know, so the
    // second event of the next two-event append collides after the first was written.
    side_connection(store.path())
        .execute(
            "INSERT INTO events (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
             VALUES (1000000, 't1', 'order', 'a', 3, ?1, 'patched', 'null', '{}', 0)",
            [Uuid::from_u128(7).to_string()],
        )
        .expect("inject an event");
    match store.append(request(&a, ExpectedVersion::Exact(Version(1)), cmd(2), 2)).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("disagree"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(store.get_command(&a.tenant, cmd(2)).await.expect("get_command"), None);
    let row = store.get_document(&a).await.expect("get_document").expect("a row");
    assert_eq!(row.version, Version(1));
    // Reading the damaged stream says so.
    assert!(matches!(store.read_stream(&a, Version(0), None, 100).await, Err(StoreError::Corrupt(_))));
    // The next append takes the position the failed one had used for its first event.
    let next = appended(&store, request(&key("b"), ExpectedVersion::NoStream, cmd(3), 1)).await;
    assert_eq!(next[0].position, Position(2));
    assert_eq!(store.stats().appends, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_reads_than_readers_all_answer() {
    let (store, _dir) = open_fresh(SqliteOptions { readers: 2, ..SqliteOptions::default() });
    let written = appended(&store, request(&key("a"), ExpectedVersion::NoStream, cmd(1), 5)).await;
    let a = key("a");
    let reads = join_all((0..64).map(|_| store.read_stream(&a, Version(0), None, 100)).collect()).await;
    for read in reads {
        assert_eq!(read.expect("read_stream"), written);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_appends_wait() {
    const APPENDS: usize = 100;
    let (store, _dir) =
        open_fresh(SqliteOptions { batch_appends_max: 3, readers: 1, queue_capacity: 2, ..SqliteOptions::default() });
    let keys: Vec<StreamKey> = (0..4).map(|i| key(&format!("s{i}"))).collect();
    let requests: Vec<_> =
        (0..APPENDS).map(|i| request(&keys[i % 4], ExpectedVersion::Any, cmd(i as u128), 1 + i % 2)).collect();
    let outcomes = join_all(requests.into_iter().map(|r| store.append(r)).collect()).await;
    assert!(outcomes.iter().all(|o| matches!(o, Ok(AppendOutcome::Appended(_)))));
    let all = feed(&store).await;
    assert_eq!(all.len(), APPENDS / 2 * 3);
    assert!(all.windows(2).all(|w| w[0].position.0 + 1 == w[1].position.0));
    for k in &keys {
        let events = store.read_stream(k, Version(0), None, 1_000).await.expect("read_stream");
        assert!(events.iter().enumerate().all(|(i, e)| e.version.0 == i as u64 + 1), "{k}");
    }
    let stats = store.stats();
    assert_eq!(stats.appends, APPENDS as u64);
    assert!(stats.commits >= (APPENDS as u64).div_ceil(3), "batches hold at most 3 appends");
}

// ---------------------------------------------------------------------------------------------
// The WAL (issue 14, item 8)

/// The WAL file beside `db` (0 when absent).
fn wal_len(db: &Path) -> u64 {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    std::fs::metadata(Path::new(&name)).map_or(0, |m| m.len())
}

/// An append of one event carrying about 4 KiB, so the WAL grows by a few pages a commit.
fn bulky(n: u128) -> AppendRequest {
    let mut req = request(&key(&format!("w{n}")), ExpectedVersion::NoStream, cmd(50_000 + n), 1);
    req.events[0].data = json!({"pad": "x".repeat(4_096)});
    req
}

fn wal_options(wal_bytes_max: u64) -> SqliteOptions {
    SqliteOptions { wal_bytes_max, ..SqliteOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_or_dropping_the_store_truncates_the_wal() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("sourced.db");
    for close in [true, false] {
        let store = SqliteStore::open(&db, SqliteOptions::default()).expect("open");
        for n in 0..50 {
            appended(&store, bulky(n + if close { 0 } else { 1_000 })).await;
        }
        assert!(wal_len(&db) > 0, "the appends went through the WAL");
        if close {
            store.close().await;
        } else {
            drop(store);
        }
        assert_eq!(wal_len(&db), 0, "the WAL is empty or gone once the store is closed (close: {close})");
    }
    let store = SqliteStore::open(&db, SqliteOptions::default()).expect("reopen");
    assert_eq!(feed(&store).await.len(), 100, "everything was copied into the database");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_within_its_bound_under_sustained_writes() {
    const BOUND: u64 = 256 * 1024;
    let (store, dir) = open_fresh(wal_options(BOUND));
    let db = store.path().to_owned();
    let store: Arc<SqliteStore> = Arc::new(store);
    // Short reads all along, as subscriptions and GETs make them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                store.read_all(&TenantId::parse("t1").expect("tenant"), Position(0), 16).await.expect("read_all");
                tokio::task::yield_now().await;
            }
        })
    };
    let mut largest = 0;
    for n in 0..600 {
        appended(store.as_ref(), bulky(n)).await;
        largest = largest.max(wal_len(&db));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.await.expect("the reader");
    // 600 commits of a few pages each went through a WAL that never held much more than its
    // bound (a truncation that readers delayed is retried a few commits later).
    assert!(largest <= BOUND + 1024 * 1024, "the WAL reached {largest} bytes, bound {BOUND}");
    store.close().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_delays_the_wal_truncation_but_not_writes() {
    const BOUND: u64 = 256 * 1024;
    let (store, _dir) = open_fresh(wal_options(BOUND));
    let db = store.path().to_owned();
    appended(&store, bulky(0)).await;
    // A read transaction that stays open: its snapshot pins the WAL.
    let held = side_connection(&db);
    held.execute_batch("BEGIN").expect("begin");
    let n: i64 = held.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).expect("read");
    assert_eq!(n, 1);
    for n in 1..300 {
        appended(&store, bulky(n)).await;
    }
    let pinned = wal_len(&db);
    assert!(pinned > 4 * BOUND, "the held read keeps the WAL from being truncated: {pinned} bytes");
    assert_eq!(store.stats().appends, 300, "every write went through while the read was held");
    held.execute_batch("COMMIT").expect("end the read");
    for n in 300..340 {
        appended(&store, bulky(n)).await;
    }
    let after = wal_len(&db);
    assert!(after <= 1024 * 1024 && after < pinned, "the WAL is truncated once the read ends: {after} bytes");
    store.close().await;
}
