//! The store contract: what every [`EventStore`] backend must do, as async test functions that
//! any backend runs unchanged (SPEC §7.1).
//!
//! Each function takes a FRESH, empty store and panics when the store breaks the contract.
//! A backend runs the whole suite with [`contract_tests!`](crate::contract_tests), which
//! expands to one `#[tokio::test]` per function:
//!
//! ```
//! mod contract {
//!     use sourced_store::{EventStore, sqlite::{SqliteOptions, SqliteStore}};
//!
//!     async fn fresh() -> (Box<dyn EventStore>, tempfile::TempDir) {
//!         let dir = tempfile::tempdir().expect("a temporary directory");
//!         let path = dir.path().join("sourced.db");
//!         let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
//!         (Box::new(store), dir)
//!     }
//!
//!     sourced_store::contract_tests!(fresh());
//! }
//! ```
//!
//! What the suite pins down beyond the trait's documentation:
//! - positions are gap-free across all tenants (each event's position is the previous one's
//!   plus one), start at 1 or above, and a failed append consumes none;
//! - the command id check comes before the expected-version check, so a retry of a stored
//!   command gets its record even when its expected version no longer holds;
//! - a `limit` of 0 returns nothing, and every limit is capped at [`READ_LIMIT_MAX`];
//! - `read_stream` with `to <= after` returns nothing;
//! - aggregate ids sort by bytes (`"B" < "a"`), as Rust's `String` does: a PostgreSQL backend
//!   needs `COLLATE "C"` on the id column;
//! - JSON comes back as written, keys in the order written (`serde_json`'s `preserve_order`);
//!   timestamps come back truncated to microseconds;
//! - `stats()` counts the appends and events committed since the store was opened, and the
//!   events reads returned; `head()` reads none.
//!
//! Concurrency here comes from many appends in flight at once within one task ([`join_all`]),
//! which is what a backend sees from many clients: the functions borrow the store, so they
//! cannot spawn tasks. Backend-specific suites add what cannot be said generically (slow
//! transactions, crashes, restarts).

use std::collections::{BTreeMap, HashMap};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use sourced_core::query::FieldPath;
use sourced_core::timestamp::{from_micros, truncate};
use sourced_core::{
    AggregateId, CommandId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamHead, StreamKey, TenantId,
    TypeName, Version,
};

use crate::{
    APPEND_EVENTS_MAX, AppendOutcome, AppendRequest, CommandRecord, CommandWrite, DocumentRow, DocumentWrite,
    EventStore, ListCursor, ListQuery, READ_LIMIT_MAX, SnapshotWrite, StoreError,
};

/// Expands to one `#[tokio::test]` per contract function, each on a fresh store.
///
/// The argument is an expression evaluating to a future of a [`FreshStore`]: a
/// `Box<dyn EventStore>`, an `Arc<dyn EventStore>`, or a pair of one of these and a guard
/// that must outlive the store (a temporary directory, a scratch database), e.g.
/// `contract_tests!(fresh())` with `async fn fresh() -> (Box<dyn EventStore>, TempDir)`, or an
/// `Option` of any of these: `None` skips the test (for a backend whose server is not there;
/// the set-up says so). The expression is evaluated once per test. Each test closes the store
/// at the end.
///
/// The tests are named after the functions of [`contract`](crate::contract); invoke the macro
/// inside a module of its own (`mod contract { use super::*; contract_tests!(fresh()); }`).
/// The invoking crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! contract_tests {
    ($fresh:expr) => {
        $crate::contract_tests!(@each $fresh;
            append_then_read_stream,
            versions_are_contiguous_and_positions_increase,
            expected_version_variants,
            conflict_writes_nothing,
            head_is_the_last_committed_position_and_reads_no_event,
            duplicate_command_id_returns_record,
            duplicate_command_ids_in_flight_together,
            read_model_row_follows_appends,
            list_documents_pages_in_id_order,
            read_all_is_per_tenant_and_ordered,
            read_global_spans_tenants_in_order,
            read_stream_bounds,
            reads_cap_limits,
            concurrent_appends_one_winner_per_version,
            tailing_reader_never_skips,
            rejects_empty_and_oversized_appends,
            json_round_trips,
            json_key_order_is_kept,
            model_based_random_appends,
            list_queries_agree_with_the_reference,
            list_pages_survive_concurrent_inserts,
            snapshots_load_the_latest_at_or_below,
            streams_list_in_key_order_and_the_read_model_can_be_replaced,
            checkpoints_move_with_their_append_and_never_back,
            a_checkpoint_is_started_only_when_absent,
            wakes_are_set_and_cleared_with_their_append,
            a_runner_lease_has_one_holder_at_a_time,
        );
    };
    (@each $fresh:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fresh = $fresh.await;
                if $crate::contract::FreshStore::skipped(&fresh) {
                    return;
                }
                let store = $crate::contract::FreshStore::store(&fresh);
                $crate::contract::$name(store).await;
                store.close().await;
            }
        )+
    };
}

/// A fresh store as a backend's test set-up hands it to [`contract_tests!`](crate::contract_tests),
/// with whatever must outlive it.
pub trait FreshStore: Send {
    /// The store under test.
    fn store(&self) -> &dyn EventStore;

    /// Whether there is no store to test (a backend whose server is not reachable, which its
    /// set-up has reported): the test then returns at once.
    fn skipped(&self) -> bool {
        false
    }
}

/// `None`: the backend's set-up found no server to test against and said so; the test is
/// skipped.
impl<S: FreshStore> FreshStore for Option<S> {
    fn store(&self) -> &dyn EventStore {
        self.as_ref().expect("a skipped test has no store").store()
    }

    fn skipped(&self) -> bool {
        self.as_ref().is_none_or(FreshStore::skipped)
    }
}

impl FreshStore for Box<dyn EventStore> {
    fn store(&self) -> &dyn EventStore {
        &**self
    }
}

impl FreshStore for Arc<dyn EventStore> {
    fn store(&self) -> &dyn EventStore {
        &**self
    }
}

/// A store and a guard (a temporary directory, a scratch database) dropped after it.
impl<S: FreshStore, G: Send> FreshStore for (S, G) {
    fn store(&self) -> &dyn EventStore {
        self.0.store()
    }

    fn skipped(&self) -> bool {
        self.0.skipped()
    }
}

// ---------------------------------------------------------------------------------------------
// The contract

/// An append comes back with versions from 1, increasing positions and the request's content;
/// `read_stream`, `read_all` and `get_command` then show exactly that.
pub async fn append_then_read_stream(store: &dyn EventStore) {
    let k = key("t1", "order", "o-1");
    let req = request(&k, ExpectedVersion::NoStream, cmd(1), 3, 1);
    let events = appended(store, req.clone()).await;
    assert_eq!(events.len(), 3);
    for (i, (event, new)) in events.iter().zip(&req.events).enumerate() {
        assert_eq!(event.id, new.id);
        assert_eq!(event.event_type, new.event_type);
        assert_eq!(event.data, new.data);
        assert_eq!(event.metadata, new.metadata);
        assert_eq!((&event.tenant, &event.target_name, &event.target_id), (&k.tenant, &k.type_name, &k.id));
        assert_eq!(event.version, Version(i as u64 + 1));
        assert_eq!(event.timestamp, truncate(req.timestamp), "timestamps are kept to the microsecond");
    }
    assert!(events[0].position >= Position(1), "positions start at 1");
    assert_gap_free(&events);

    assert_eq!(stream(store, &k).await, events);
    assert_eq!(all_events(store, &k.tenant).await, events);
    let record = store.get_command(&k.tenant, cmd(1)).await.expect("get_command");
    assert_eq!(
        record,
        Some(CommandRecord {
            id: cmd(1),
            fingerprint: req.command.fingerprint.clone(),
            key: k.clone(),
            first_version: Version(1),
            last_version: Version(3),
            extra: req.command.extra.clone(),
        })
    );

    // Neighbours see nothing: another id, another type, another tenant.
    for other in [key("t1", "order", "o-2"), key("t1", "invoice", "o-1"), key("t2", "order", "o-1")] {
        assert_eq!(stream(store, &other).await, Vec::new(), "{other}");
        assert_eq!(store.get_document(&other).await.expect("get_document"), None, "{other}");
    }
    assert_eq!(all_events(store, &tenant("t2")).await, Vec::new());
    assert_eq!(store.get_command(&tenant("t2"), cmd(1)).await.expect("get_command"), None);
    assert_eq!(store.get_command(&k.tenant, cmd(2)).await.expect("get_command"), None);
    store.ping().await.expect("ping");
}

/// Appends interleaved over several streams: each stream's versions run 1, 2, 3… and the
/// global positions increase by one per event.
pub async fn versions_are_contiguous_and_positions_increase(store: &dyn EventStore) {
    let keys = [key("t1", "order", "a"), key("t1", "order", "b"), key("t1", "invoice", "a")];
    let mut heads = [0u64; 3];
    let mut returned = Vec::new();
    for step in 0..30u64 {
        let i = (step % 3) as usize;
        let n = (step % 4 + 1) as usize;
        let events =
            appended(store, request(&keys[i], ExpectedVersion::Any, cmd(100 + u128::from(step)), n, step as i64)).await;
        let versions: Vec<u64> = events.iter().map(|e| e.version.0).collect();
        assert_eq!(versions, (heads[i] + 1..=heads[i] + n as u64).collect::<Vec<_>>());
        heads[i] += n as u64;
        returned.extend(events);
    }
    assert_gap_free(&returned);
    for (i, k) in keys.iter().enumerate() {
        let events = stream(store, k).await;
        assert_eq!(events.iter().map(|e| e.version.0).collect::<Vec<_>>(), (1..=heads[i]).collect::<Vec<_>>());
        assert!(events.windows(2).all(|w| w[0].position < w[1].position), "{k}: positions increase");
        let mine: Vec<_> = returned.iter().filter(|e| stream_of(e) == *k).cloned().collect();
        assert_eq!(events, mine, "{k}: read back as returned");
    }
    assert_eq!(all_events(store, &tenant("t1")).await, returned);
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (30, returned.len() as u64));
}

/// `any`, `no_stream`, `exists` and exact versions, on new, live and deleted aggregates.
pub async fn expected_version_variants(store: &dyn EventStore) {
    use ExpectedVersion::{Any, Exact, Exists, NoStream};
    let a = key("t1", "order", "a");
    let head = |v: u64, deleted: bool| StreamHead { version: Version(v), deleted };
    let mut n = 200u128;
    let mut next_cmd = || {
        n += 1;
        cmd(n)
    };

    // A new stream: exists and exact(1) fail, no_stream holds.
    assert_eq!(conflict(store, request(&a, Exists, next_cmd(), 1, 1)).await, (Exists, head(0, false)));
    assert_eq!(
        conflict(store, request(&a, Exact(Version(1)), next_cmd(), 1, 1)).await,
        (Exact(Version(1)), head(0, false))
    );
    assert_eq!(last_version(&appended(store, request(&a, NoStream, next_cmd(), 1, 1)).await), 1);
    // A live stream.
    assert_eq!(conflict(store, request(&a, NoStream, next_cmd(), 1, 2)).await, (NoStream, head(1, false)));
    assert_eq!(
        conflict(store, request(&a, Exact(Version(0)), next_cmd(), 1, 2)).await,
        (Exact(Version(0)), head(1, false))
    );
    assert_eq!(last_version(&appended(store, request(&a, Exists, next_cmd(), 1, 2)).await), 2);
    assert_eq!(last_version(&appended(store, request(&a, Exact(Version(2)), next_cmd(), 2, 3)).await), 4);
    assert_eq!(
        conflict(store, request(&a, Exact(Version(2)), next_cmd(), 1, 4)).await,
        (Exact(Version(2)), head(4, false))
    );
    assert_eq!(
        conflict(store, request(&a, Exact(Version(9)), next_cmd(), 1, 4)).await,
        (Exact(Version(9)), head(4, false))
    );
    assert_eq!(last_version(&appended(store, request(&a, Any, next_cmd(), 1, 5)).await), 5);

    // Deleted: exists and no_stream fail, exact and any hold.
    let mut delete = request(&a, Exists, next_cmd(), 1, 6);
    delete.document.deleted = true;
    assert_eq!(last_version(&appended(store, delete).await), 6);
    assert_eq!(conflict(store, request(&a, Exists, next_cmd(), 1, 7)).await, (Exists, head(6, true)));
    assert_eq!(conflict(store, request(&a, NoStream, next_cmd(), 1, 7)).await, (NoStream, head(6, true)));
    assert_eq!(
        conflict(store, request(&a, Exact(Version(5)), next_cmd(), 1, 7)).await,
        (Exact(Version(5)), head(6, true))
    );
    let mut still_deleted = request(&a, Any, next_cmd(), 1, 7);
    still_deleted.document.deleted = true;
    assert_eq!(last_version(&appended(store, still_deleted).await), 7);
    // Re-created at an exact version: exists holds again.
    assert_eq!(last_version(&appended(store, request(&a, Exact(Version(7)), next_cmd(), 1, 8)).await), 8);
    assert_eq!(last_version(&appended(store, request(&a, Exists, next_cmd(), 1, 9)).await), 9);
    let row = store.get_document(&a).await.expect("get_document").expect("a row");
    assert_eq!((row.version, row.deleted), (Version(9), false));

    // Exact(0) and any on new streams.
    let b = key("t1", "order", "b");
    assert_eq!(last_version(&appended(store, request(&b, Exact(Version(0)), next_cmd(), 2, 1)).await), 2);
    let c = key("t1", "order", "c");
    assert_eq!(last_version(&appended(store, request(&c, Any, next_cmd(), 1, 1)).await), 1);
    assert_eq!(stream(store, &a).await.len(), 9);
}

/// The head is the last committed position (0 when empty), moves with each commit and not
/// with a refused append, and reading it reads no event (while reads count what they return).
pub async fn head_is_the_last_committed_position_and_reads_no_event(store: &dyn EventStore) {
    assert_eq!(store.head().await.expect("head"), Position(0), "an empty store");
    let mut last = Position(0);
    for step in 0..6u64 {
        let k = key(["t1", "t2"][(step % 2) as usize], "order", &format!("h{}", step % 3));
        let events =
            appended(store, request(&k, ExpectedVersion::Any, cmd(1_900 + u128::from(step)), 2, step as i64)).await;
        last = events.last().expect("events").position;
        assert_eq!(store.head().await.expect("head"), last, "after step {step}");
    }
    let k = key("t1", "order", "h0");
    conflict(store, request(&k, ExpectedVersion::NoStream, cmd(1_999), 1, 9)).await;
    assert_eq!(store.head().await.expect("head"), last, "a refused append does not move the head");

    let read_before = store.stats().events_read;
    for _ in 0..10 {
        assert_eq!(store.head().await.expect("head"), last);
    }
    assert_eq!(store.stats().events_read, read_before, "head() reads no event");
    let t1 = store.read_all(&tenant("t1"), Position(0), 1_000).await.expect("read_all");
    let global = store.read_global(Position(0), 1_000).await.expect("read_global");
    assert_eq!(global.last().map(|e| e.position), Some(last));
    assert_eq!(
        store.stats().events_read,
        read_before + (t1.len() + global.len()) as u64,
        "reads count the events they return"
    );
    assert!(store.read_all(&tenant("t1"), last, 1_000).await.expect("read_all").is_empty(), "nothing after the head");
}

/// A conflict leaves no trace: no events, no read-model change, no command record, no
/// position used; the same command id can then succeed.
pub async fn conflict_writes_nothing(store: &dyn EventStore) {
    let k = key("t1", "order", "a");
    let t = tenant("t1");
    appended(store, request(&k, ExpectedVersion::NoStream, cmd(300), 2, 1)).await;
    let events_before = all_events(store, &t).await;
    let row_before = store.get_document(&k).await.expect("get_document");
    let stats_before = store.stats();

    let mut losing = request(&k, ExpectedVersion::Exact(Version(1)), cmd(301), 3, 2);
    losing.document.state = json!({"lost": true});
    losing.document.deleted = true;
    let (_, actual) = conflict(store, losing).await;
    assert_eq!(actual, StreamHead { version: Version(2), deleted: false });
    // Also on a stream that does not exist yet: no read-model row appears.
    let other = key("t1", "order", "b");
    conflict(store, request(&other, ExpectedVersion::Exists, cmd(302), 1, 2)).await;

    assert_eq!(all_events(store, &t).await, events_before);
    assert_eq!(store.get_document(&k).await.expect("get_document"), row_before);
    assert_eq!(store.get_document(&other).await.expect("get_document"), None);
    assert_eq!(store.get_command(&t, cmd(301)).await.expect("get_command"), None);
    assert_eq!(store.get_command(&t, cmd(302)).await.expect("get_command"), None);
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (stats_before.appends, stats_before.events));

    // The command id was not used up, and neither were positions.
    let retried = appended(store, request(&k, ExpectedVersion::Exact(Version(2)), cmd(301), 1, 3)).await;
    assert_eq!(retried[0].version, Version(3));
    assert_eq!(retried[0].position.0, events_before.last().expect("events").position.0 + 1);
}

/// A command id the tenant has used returns its record (even when the retry's expected
/// version no longer holds) and writes nothing; another tenant's identical id is independent.
pub async fn duplicate_command_id_returns_record(store: &dyn EventStore) {
    let k = key("t1", "order", "a");
    let mut first = request(&k, ExpectedVersion::Any, cmd(400), 1, 1);
    first.command.extra = json!({"warnings": ["w1"]});
    appended(store, first).await;
    let mut req = request(&k, ExpectedVersion::Exact(Version(1)), cmd(401), 2, 2);
    req.command.extra = json!({"warnings": ["w2", "w3"], "n": 2});
    req.command.fingerprint = "fp-original".into();
    let events = appended(store, req.clone()).await;
    let record = CommandRecord {
        id: cmd(401),
        fingerprint: "fp-original".into(),
        key: k.clone(),
        first_version: Version(2),
        last_version: Version(3),
        extra: req.command.extra.clone(),
    };
    let all_before = all_events(store, &k.tenant).await;

    // A retry: same id, content changed, expected version stale, even another stream.
    for (i, target) in [k.clone(), key("t1", "order", "b"), key("t1", "invoice", "a")].iter().enumerate() {
        let mut retry = request(target, ExpectedVersion::Exact(Version(1)), cmd(401), 1 + i, 5);
        retry.command.fingerprint = "fp-changed".into();
        retry.command.extra = json!(null);
        match store.append(retry).await {
            Ok(AppendOutcome::Duplicate(r)) => assert_eq!(r, record),
            other => panic!("a retry of a stored command must be a duplicate, got {other:?}"),
        }
    }
    assert_eq!(all_events(store, &k.tenant).await, all_before, "a duplicate writes nothing");
    assert_eq!(store.get_document(&key("t1", "order", "b")).await.expect("get_document"), None);
    assert_eq!(store.get_command(&k.tenant, cmd(401)).await.expect("get_command"), Some(record.clone()));
    assert_eq!(stream(store, &k).await[1..], events[..]);

    // The same command id in another tenant is another command.
    let k2 = key("t2", "order", "a");
    let mut theirs = request(&k2, ExpectedVersion::NoStream, cmd(401), 1, 6);
    theirs.command.fingerprint = "fp-theirs".into();
    let their_events = appended(store, theirs).await;
    assert_eq!(their_events[0].version, Version(1));
    let their_record = store.get_command(&k2.tenant, cmd(401)).await.expect("get_command").expect("a record");
    assert_eq!((their_record.fingerprint.as_str(), their_record.key.clone()), ("fp-theirs", k2.clone()));
    assert_eq!((their_record.first_version, their_record.last_version), (Version(1), Version(1)));
    assert_eq!(store.get_command(&k.tenant, cmd(401)).await.expect("get_command"), Some(record));
}

/// Many appends with one command id in flight at once: exactly one is stored, every other
/// gets its record, whatever the streams they target.
pub async fn duplicate_command_ids_in_flight_together(store: &dyn EventStore) {
    const IN_FLIGHT: usize = 16;
    let t = tenant("t1");
    for (round, same_stream) in [(0u128, true), (1, false)] {
        let id = cmd(500 + round);
        let requests: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                let target =
                    if same_stream { key("t1", "order", "same") } else { key("t1", "order", &format!("s{i}")) };
                request(&target, ExpectedVersion::Any, id, 1 + i % 3, i as i64)
            })
            .collect();
        let outcomes = join_all(requests.into_iter().map(|r| store.append(r)).collect()).await;
        let mut winners = Vec::new();
        let mut records = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(AppendOutcome::Appended(events)) => winners.push(events),
                Ok(AppendOutcome::Duplicate(record)) => records.push(record),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one append of a command id is stored");
        let winner = &winners[0];
        let expected = store.get_command(&t, id).await.expect("get_command").expect("a record");
        assert_eq!(expected.key, stream_of(&winner[0]));
        assert_eq!((expected.first_version, expected.last_version), (winner[0].version, last_version_of(winner)));
        assert_eq!(records.len(), IN_FLIGHT - 1);
        assert!(records.iter().all(|r| *r == expected), "round {round}: every duplicate gets the stored record");
    }
    let all = all_events(store, &t).await;
    assert_gap_free(&all);
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (2, all.len() as u64));
}

/// The read-model row: written with the append, version and timestamps follow, `created_at`
/// stays, the deleted flag follows the last append.
pub async fn read_model_row_follows_appends(store: &dyn EventStore) {
    let k = key("t1", "order", "a");
    assert_eq!(store.get_document(&k).await.expect("get_document"), None);
    let mut create = request(&k, ExpectedVersion::NoStream, cmd(600), 1, 1);
    create.document.state = json!({"status": "new", "total": 10});
    appended(store, create.clone()).await;
    let created_at = truncate(create.timestamp);
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    assert_eq!(
        row,
        DocumentRow {
            key: k.clone(),
            version: Version(1),
            state: json!({"status": "new", "total": 10}),
            deleted: false,
            created_at,
            updated_at: created_at,
        }
    );

    let mut patch = request(&k, ExpectedVersion::Exact(Version(1)), cmd(601), 2, 2);
    patch.document.state = json!({"status": "paid", "total": 12});
    appended(store, patch.clone()).await;
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    assert_eq!((row.version, row.deleted), (Version(3), false));
    assert_eq!(row.state, json!({"status": "paid", "total": 12}));
    assert_eq!((row.created_at, row.updated_at), (created_at, truncate(patch.timestamp)));

    let mut delete = request(&k, ExpectedVersion::Exists, cmd(602), 1, 3);
    delete.document = DocumentWrite { state: json!({"status": "paid", "total": 12}), deleted: true };
    appended(store, delete.clone()).await;
    let row = store.get_document(&k).await.expect("get_document").expect("a deleted row stays");
    assert_eq!((row.version, row.deleted), (Version(4), true));
    assert_eq!((row.created_at, row.updated_at), (created_at, truncate(delete.timestamp)));

    // An append timestamped earlier than the last one (a clock step back) is taken as is.
    let mut recreate = request(&k, ExpectedVersion::Exact(Version(4)), cmd(603), 1, 0);
    recreate.document.state = json!({"status": "new"});
    appended(store, recreate.clone()).await;
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    assert_eq!((row.version, row.deleted, row.state.clone()), (Version(5), false, json!({"status": "new"})));
    assert_eq!((row.created_at, row.updated_at), (created_at, truncate(recreate.timestamp)));

    for other in [key("t2", "order", "a"), key("t1", "invoice", "a"), key("t1", "order", "b")] {
        assert_eq!(store.get_document(&other).await.expect("get_document"), None, "{other}");
    }
}

/// `list_documents` pages in byte order of ids, `after` exclusive (also for an id that does not
/// exist), `limit` respected, deleted rows only when asked, one tenant and type only.
pub async fn list_documents_pages_in_id_order(store: &dyn EventStore) {
    let ids = ["m", "b", "B", "a-1", "a", "z~", "0", "c", "d", "a.b", "_x"];
    let deleted = ["c", "0"];
    for (i, id) in ids.iter().enumerate() {
        let k = key("t1", "order", id);
        let mut req = request(&k, ExpectedVersion::NoStream, cmd(700 + i as u128), 1, i as i64);
        req.document.state = json!({"id": id});
        appended(store, req).await;
        if deleted.contains(id) {
            let mut delete = request(&k, ExpectedVersion::Exact(Version(1)), cmd(750 + i as u128), 1, 20);
            delete.document.deleted = true;
            appended(store, delete).await;
        }
    }
    // Neighbours that must not show.
    appended(store, request(&key("t1", "invoice", "a"), ExpectedVersion::Any, cmd(790), 1, 1)).await;
    appended(store, request(&key("t2", "order", "b"), ExpectedVersion::Any, cmd(791), 1, 1)).await;

    let mut sorted: Vec<&str> = ids.to_vec();
    sorted.sort_unstable(); // byte order, as `String` compares
    let live: Vec<&str> = sorted.iter().copied().filter(|id| !deleted.contains(id)).collect();
    for include_deleted in [false, true] {
        let want: &[&str] = if include_deleted { &sorted } else { &live };
        let full = list(store, "t1", "order", None, 100, include_deleted).await;
        assert_eq!(ids_of(&full), want, "include_deleted={include_deleted}");
        for row in &full {
            assert_eq!(row.deleted, deleted.contains(&row.key.id.as_str()), "{}", row.key);
            let single = store.get_document(&row.key).await.expect("get_document");
            assert_eq!(single.as_ref(), Some(row), "a listed row equals the row read alone");
        }
        for page_size in [1, 2, 3, 5] {
            let mut paged = Vec::new();
            let mut after: Option<AggregateId> = None;
            for _ in 0..=ids.len() {
                let page = list(store, "t1", "order", after.clone(), page_size, include_deleted).await;
                assert!(page.len() <= page_size);
                let Some(last) = page.last() else { break };
                after = Some(last.key.id.clone());
                paged.extend(page);
            }
            assert_eq!(paged, full, "pages of {page_size}, include_deleted={include_deleted}");
        }
    }
    // `after` need not exist; past the end is empty; limit 0 is empty.
    let after_missing = list(store, "t1", "order", Some(aggregate_id("a-0")), 100, false).await;
    assert_eq!(ids_of(&after_missing), live.iter().copied().filter(|id| *id > "a-0").collect::<Vec<_>>());
    assert_eq!(list(store, "t1", "order", Some(aggregate_id("~")), 100, true).await, Vec::new());
    assert_eq!(list(store, "t1", "order", None, 0, true).await, Vec::new());
    assert_eq!(ids_of(&list(store, "t1", "invoice", None, 100, true).await), ["a"]);
    assert_eq!(ids_of(&list(store, "t2", "order", None, 100, true).await), ["b"]);
    assert_eq!(list(store, "t3", "order", None, 100, true).await, Vec::new());
}

/// A value of every JSON kind for field `v`, chosen by `i`.
fn mixed_value(i: u64) -> Option<Value> {
    Some(match i % 17 {
        0 => return None,
        1 => Value::Null,
        2 => json!(false),
        3 => json!(true),
        4 => json!(i as i64 - 40),
        5 => json!(i as f64 / 4.0 - 3.0),
        6 => json!(7),
        7 => json!(7.0),
        8 => json!("7"),
        9 => json!(format!("s{}", i % 5)),
        10 => json!("Zebra"),
        11 => json!("apple"),
        12 => json!("äpfel ✓"),
        13 => json!(""),
        14 => json!([i, "x"]),
        15 => json!({"k": i}),
        _ => json!(i64::MIN + 1),
    })
}

/// The list queries of SPEC §5 (filters of every operator on every JSON kind, multi-key sorts
/// in both directions, cursor pages, counts, deleted rows, indexes) give exactly the answers of
/// the reference semantics in `sourced_core::query`.
pub async fn list_queries_agree_with_the_reference(store: &dyn EventStore) {
    use sourced_core::query::{Filter, compare_rows, parse_sort};
    let mut rng = Rng::new(7);
    let mut docs: Vec<(String, Value, bool)> = Vec::new();
    for i in 0..70u64 {
        let id = format!("d{:02}{}", rng.below(100), ["", "a", "B", "~"][(i % 4) as usize]);
        if docs.iter().any(|(d, ..)| *d == id) {
            continue;
        }
        let mut doc = serde_json::Map::new();
        if let Some(v) = mixed_value(rng.below(1_000)) {
            doc.insert("v".into(), v);
        }
        doc.insert("n".into(), if i % 3 == 0 { json!(rng.below(10) as f64 / 2.0) } else { json!(rng.below(10)) });
        doc.insert("s".into(), json!(["paid", "draft", "shipped", "Paid", "paid-late"][rng.below(5) as usize]));
        if i % 4 != 0 {
            doc.insert("c".into(), json!({"id": format!("c{}", rng.below(6)), "vip": i % 8 == 1}));
        }
        let deleted = i % 11 == 5;
        let k = key("tq", "item", &id);
        let mut req = request(&k, ExpectedVersion::NoStream, cmd(5_000 + u128::from(i)), 1, i as i64);
        req.document = DocumentWrite { state: Value::Object(doc.clone()), deleted };
        appended(store, req).await;
        docs.push((id, Value::Object(doc), deleted));
    }
    // Neighbours that no query of tq/item may return.
    for (t, ty) in [("tq", "other"), ("tz", "item")] {
        let mut req = request(&key(t, ty, "d50"), ExpectedVersion::NoStream, cmd(5_900), 1, 1);
        req.document.state = json!({"v": 7, "n": 1, "s": "paid"});
        req.command.id = CommandId(Uuid::new_v4());
        appended(store, req).await;
    }

    let queries: &[(&[(&str, &str)], &str)] = &[
        (&[], ""),
        (&[("v", "7")], ""),
        (&[("v", "\"7\"")], ""),
        (&[("v", "true")], ""),
        (&[("v", "false")], "-n"),
        (&[("v", "null")], ""),
        (&[("v[exists]", "false")], ""),
        (&[("v[exists]", "true")], "v"),
        (&[("v[gt]", "0")], "v"),
        (&[("v[lte]", "-3")], "-v"),
        (&[("v[gte]", "s2")], "v"),
        (&[("v[lt]", "apple")], "-v,n"),
        (&[("v[in]", "7,apple,null,true")], "v"),
        (&[("v[prefix]", "s")], ""),
        (&[("v[prefix]", "äp")], ""),
        (&[("s", "paid")], "-n"),
        (&[("s[prefix]", "paid")], "n,-id"),
        (&[("s[in]", "Paid,shipped")], "s,n"),
        (&[("n[gte]", "2"), ("n[lt]", "4.5")], "-n,s"),
        (&[("n", "2")], ""),
        (&[("n", "2.0")], ""),
        (&[("c.id", "c3")], ""),
        (&[("c.id[in]", "c1,c2"), ("s[in]", "paid,draft")], "c.id,-n"),
        (&[("c.vip", "true")], "c.id"),
        (&[("c[exists]", "false")], "-s"),
        (&[("c.id[gt]", "c4")], "-c.id"),
        (&[("id[prefix]", "d1")], "-id"),
        (&[("id[gte]", "d50")], "n"),
        (&[("id", "d07a")], ""),
        (&[("missing.deep.path", "1")], ""),
        (&[("n[gt]", "text")], ""),
        (&[], "v"),
        (&[], "-v"),
        (&[], "c,n"),
        (&[], "-c.vip,s,-v,n"),
        (&[], "id"),
    ];
    let all = store
        .list_documents(&ListQuery { include_deleted: true, ..ListQuery::new(tenant("tq"), type_name("item"), 1_000) })
        .await
        .expect("list");
    assert_eq!(all.len(), docs.len(), "every row listed once");

    // Indexes change speed, never answers: run every query before and after creating some.
    let mut selective = 0;
    for round in 0..2 {
        if round == 1 {
            let fields: Vec<FieldPath> =
                ["v", "n", "s", "c.id"].iter().map(|f| FieldPath::parse(f).expect("a field path")).collect();
            let names = store.ensure_indexes(&fields).await.expect("ensure_indexes");
            assert_eq!(names.len(), 4, "one index per field: {names:?}");
            assert_eq!(store.ensure_indexes(&fields).await.expect("ensure_indexes again"), names, "idempotent");
        }
        for (filters, sort) in queries {
            for include_deleted in [false, true] {
                let context = format!("filters {filters:?}, sort {sort:?}, include_deleted={include_deleted}");
                let filters: Vec<Filter> =
                    filters.iter().map(|(k, v)| Filter::parse(k, v).expect("a valid filter")).collect();
                let sort = if sort.is_empty() { Vec::new() } else { parse_sort(sort).expect("a valid sort") };
                let mut want: Vec<&(String, Value, bool)> = docs
                    .iter()
                    .filter(|(id, doc, deleted)| {
                        (include_deleted || !deleted) && filters.iter().all(|f| f.matches(id, doc))
                    })
                    .collect();
                want.sort_by(|a, b| compare_rows(&sort, (&a.0, &a.1), (&b.0, &b.1)));
                let want_ids: Vec<&str> = want.iter().map(|(id, ..)| id.as_str()).collect();
                selective += usize::from(!want_ids.is_empty() && want_ids.len() < docs.len());

                let query = ListQuery {
                    filters,
                    sort,
                    include_deleted,
                    ..ListQuery::new(tenant("tq"), type_name("item"), 1_000)
                };
                let got = store.list_documents(&query).await.expect("list_documents");
                assert_eq!(ids_of(&got), want_ids, "{context}");
                for (row, (_, doc, deleted)) in got.iter().zip(&want) {
                    assert_eq!((&row.state, row.deleted), (doc, *deleted), "{context}: row {}", row.key);
                }
                let count = store.count_documents(&query).await.expect("count_documents");
                assert_eq!(count, want_ids.len() as u64, "{context}: count");
                for page_size in [1, 4] {
                    let mut paged = Vec::new();
                    let mut q = ListQuery { limit: page_size, ..query.clone() };
                    for _ in 0..=docs.len() {
                        let page = store.list_documents(&q).await.expect("a page");
                        let Some(last) = page.last() else { break };
                        q.after = Some(q.cursor_after(last));
                        paged.extend(page);
                    }
                    assert_eq!(ids_of(&paged), want_ids, "{context}: pages of {page_size}");
                }
            }
        }
    }

    assert!(selective > 100, "most queries select some rows but not all ({selective})");
    // A cursor that does not fit the sort is refused, not misread.
    let bad = ListQuery {
        sort: parse_sort("n").expect("a sort"),
        after: Some(ListCursor { slots: Vec::new(), id: aggregate_id("d00") }),
        ..ListQuery::new(tenant("tq"), type_name("item"), 10)
    };
    assert!(matches!(store.list_documents(&bad).await, Err(StoreError::InvalidRequest(_))));
}

/// Cursor pages under concurrent inserts (SPEC §5): every row that existed before the scan
/// began is returned exactly once, whatever is inserted between pages, for several orders.
pub async fn list_pages_survive_concurrent_inserts(store: &dyn EventStore) {
    use sourced_core::query::parse_sort;
    let mut rng = Rng::new(11);
    let mut next_cmd = 6_000u128;
    let mut insert = async |rng: &mut Rng, ty: &str, n: usize| {
        for _ in 0..n {
            next_cmd += 1;
            let id = format!("r{:016x}", rng.next());
            let mut req = request(&key("tp", ty, &id), ExpectedVersion::NoStream, cmd(next_cmd), 1, 1);
            req.document.state = json!({"n": rng.below(20), "s": format!("s{}", rng.below(7))});
            appended(store, req).await;
        }
    };
    for (round, sort) in ["", "n", "-n,s", "s,-id"].into_iter().enumerate() {
        let ty = format!("page{round}");
        insert(&mut rng, &ty, 40).await;
        let before: Vec<String> =
            ids_of(&store.list_documents(&ListQuery::new(tenant("tp"), type_name(&ty), 1_000)).await.expect("list"))
                .into_iter()
                .map(str::to_owned)
                .collect();
        let sort = if sort.is_empty() { Vec::new() } else { parse_sort(sort).expect("a sort") };
        let mut q = ListQuery { sort, ..ListQuery::new(tenant("tp"), type_name(&ty), 3) };
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..200 {
            let page = store.list_documents(&q).await.expect("a page");
            let Some(last) = page.last() else { break };
            q.after = Some(q.cursor_after(last));
            seen.extend(page.iter().map(|r| r.key.id.as_str().to_owned()));
            insert(&mut rng, &ty, 2).await;
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "sort {:?}: no row twice", q.sort);
        for id in &before {
            assert!(seen.contains(id), "sort {:?}: row {id}, there before the scan, was skipped", q.sort);
        }
    }
}

/// A process manager's checkpoint (SPEC §4.5) moves in the transaction of the append that
/// carries it, or on its own, and never back; a refused or replayed append moves none.
pub async fn checkpoints_move_with_their_append_and_never_back(store: &dyn EventStore) {
    use crate::CheckpointWrite;
    let ckpt = |name: &str, position: u64| Some(CheckpointWrite { name: name.into(), position: Position(position) });
    assert_eq!(store.checkpoint("p").await.expect("read"), None, "none before the first");
    let mut req = request(&key("tc", "process-p", "i1"), ExpectedVersion::NoStream, cmd(9_100), 1, 1);
    req.checkpoint = ckpt("p", 5);
    let events = appended(store, req.clone()).await;
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(5)));
    // Replayed (the same command id): a duplicate writes nothing, the checkpoint included.
    req.checkpoint = ckpt("p", 50);
    assert!(matches!(store.append(req).await, Ok(AppendOutcome::Duplicate(_))));
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(5)), "a replay moves nothing");
    // Refused by its expected version: nothing moves.
    let mut refused = request(&key("tc", "process-p", "i1"), ExpectedVersion::NoStream, cmd(9_101), 1, 2);
    refused.checkpoint = ckpt("q", 100);
    conflict(store, refused).await;
    assert_eq!(store.checkpoint("q").await.expect("read"), None, "a refused append moves no checkpoint");
    // Two appends at once (likely one batch): the higher position wins, whatever the order.
    let mut a = request(&key("tc", "process-p", "i2"), ExpectedVersion::NoStream, cmd(9_102), 1, 3);
    a.checkpoint = ckpt("p", 7);
    let mut b = request(&key("tc", "process-p", "i3"), ExpectedVersion::NoStream, cmd(9_103), 1, 4);
    b.checkpoint = ckpt("p", 6);
    let (ra, rb) = tokio::join!(store.append(a), store.append(b));
    assert!(matches!((ra, rb), (Ok(AppendOutcome::Appended(_)), Ok(AppendOutcome::Appended(_)))));
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(7)));
    let mut back =
        request(&key("tc", "process-p", "i1"), ExpectedVersion::Exact(last_version_of(&events)), cmd(9_104), 1, 5);
    back.checkpoint = ckpt("p", 2);
    appended(store, back).await;
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(7)), "never back with an append");
    store.put_checkpoint("p", Position(3)).await.expect("put");
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(7)), "never back on its own");
    store.put_checkpoint("p", Position(9)).await.expect("put");
    store.put_checkpoint("r", Position(1)).await.expect("put");
    assert_eq!(store.checkpoint("p").await.expect("read"), Some(Position(9)));
    assert_eq!(store.checkpoint("r").await.expect("read"), Some(Position(1)), "checkpoints are per name");
}

/// A process's first checkpoint (SPEC §4.5) is set when its set loads, only if it has none:
/// starting again, lower or higher, never moves one, and the ones started at once agree.
pub async fn a_checkpoint_is_started_only_when_absent(store: &dyn EventStore) {
    assert_eq!(store.start_checkpoint("s", Position(4)).await.expect("start"), Position(4), "absent: set");
    assert_eq!(store.checkpoint("s").await.expect("read"), Some(Position(4)));
    assert_eq!(store.start_checkpoint("s", Position(9)).await.expect("start"), Position(4), "higher: kept");
    assert_eq!(store.start_checkpoint("s", Position(1)).await.expect("start"), Position(4), "lower: kept");
    store.put_checkpoint("s", Position(6)).await.expect("put");
    assert_eq!(store.start_checkpoint("s", Position(2)).await.expect("start"), Position(6), "a moved one is kept");
    // Several servers loading the same set at once: one value wins and every caller sees it.
    let (a, b, c) = tokio::join!(
        store.start_checkpoint("t", Position(10)),
        store.start_checkpoint("t", Position(20)),
        store.start_checkpoint("t", Position(30)),
    );
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert!(a == b && b == c, "one winner: {a:?} {b:?} {c:?}");
    assert_eq!(store.checkpoint("t").await.expect("read"), Some(a));
    assert_eq!(store.checkpoint("s").await.expect("read"), Some(Position(6)), "per name");
}

/// A process instance's wake-up (SPEC §4.5) is set, moved and cleared by the appends to its
/// stream, in their transactions; `due_wakes` lists those due, earliest first, per process.
pub async fn wakes_are_set_and_cleared_with_their_append(store: &dyn EventStore) {
    use crate::{Wake, WakeWrite};
    let wake = |due: Option<i64>| Some(WakeWrite { process: "p".into(), due: due.map(at) });
    let due = |k: &StreamKey, step: i64| Wake { key: k.clone(), due: truncate(at(step)) };
    let (a, b, c) = (key("tw", "process-p", "a"), key("tw", "process-p", "b"), key("tx", "process-p", "c"));
    let mut heads = BTreeMap::new();
    let mut step = |k: &StreamKey, w: Option<WakeWrite>, n: u128| {
        let expected = heads.get(k).map_or(ExpectedVersion::NoStream, |v| ExpectedVersion::Exact(Version(*v)));
        *heads.entry(k.clone()).or_insert(0) += 1;
        let mut req = request(k, expected, cmd(9_200 + n), 1, n as i64);
        req.wake = w;
        req
    };
    appended(store, step(&a, wake(Some(30)), 1)).await;
    appended(store, step(&b, wake(Some(20)), 2)).await;
    appended(store, step(&c, wake(Some(25)), 3)).await;
    let mut other = step(&key("tw", "process-q", "a"), None, 4);
    other.wake = Some(WakeWrite { process: "q".into(), due: Some(at(1)) });
    appended(store, other).await;
    assert_eq!(store.due_wakes("p", at(100), 10).await.expect("read"), [due(&b, 20), due(&c, 25), due(&a, 30)]);
    assert_eq!(store.due_wakes("p", at(25), 10).await.expect("read"), [due(&b, 20), due(&c, 25)], "due at or before");
    assert_eq!(store.due_wakes("p", at(100), 1).await.expect("read"), [due(&b, 20)], "at most limit");
    // Moved, cleared, and untouched by an append without a wake.
    appended(store, step(&b, wake(Some(40)), 5)).await;
    appended(store, step(&c, wake(None), 6)).await;
    appended(store, step(&a, None, 7)).await;
    assert_eq!(store.due_wakes("p", at(100), 10).await.expect("read"), [due(&a, 30), due(&b, 40)]);
    // A refused append changes nothing.
    let mut refused = request(&a, ExpectedVersion::NoStream, cmd(9_299), 1, 8);
    refused.wake = wake(None);
    conflict(store, refused).await;
    assert_eq!(store.due_wakes("p", at(100), 10).await.expect("read").len(), 2);
    assert_eq!(store.due_wakes("q", at(100), 10).await.expect("read").len(), 1, "per process");
}

/// A runner's lease (SPEC §4.5: one runner per process manager) has one holder at a time: a
/// second try is refused while it is held, other names are apart, and once dropped it can be
/// taken again (at once on SQLite; on PostgreSQL once the server has released the lock, so
/// within a bounded number of tries).
pub async fn a_runner_lease_has_one_holder_at_a_time(store: &dyn EventStore) {
    let first = store.runner_lease("p").await.expect("take").expect("granted when no one holds it");
    assert!(first.held());
    for _ in 0..3 {
        assert!(store.runner_lease("p").await.expect("try").is_none(), "refused while held");
    }
    let other = store.runner_lease("q").await.expect("take").expect("another name is apart");
    drop(first);
    let mut again = None;
    for _ in 0..200 {
        again = store.runner_lease("p").await.expect("try");
        if again.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let again = again.expect("taken again once given up");
    assert!(again.held() && other.held(), "{again:?} {other:?}");
    assert!(store.runner_lease("q").await.expect("try").is_none(), "still held: q");
}

/// Snapshots (SPEC §5) are written with their append and load as the aggregate at their
/// version: the latest at or below the version asked, of the fold version asked only.
pub async fn snapshots_load_the_latest_at_or_below(store: &dyn EventStore) {
    use sourced_core::Aggregate;
    let k = key("ts", "order", "s1");
    let created = at(1);
    let mut expected = ExpectedVersion::NoStream;
    for step in 1..=7i64 {
        let mut req = request(&k, expected, cmd(7_000 + step as u128), 2, step);
        req.document = DocumentWrite { state: json!({"step": step, "z": [step]}), deleted: step == 7 };
        if step % 3 == 0 || step == 7 {
            req.snapshot = Some(SnapshotWrite { fold: 1, created_at: created });
        }
        let events = appended(store, req).await;
        expected = ExpectedVersion::Exact(last_version_of(&events));
    }
    let snapshot = |step: i64| Aggregate {
        version: Version(step as u64 * 2),
        state: Some(json!({"step": step, "z": [step]})),
        deleted: step == 7,
        created_at: Some(truncate(created)),
        updated_at: Some(truncate(at(step))),
    };
    let load = |at_most: Option<u64>, fold: u32| store.load_snapshot(&k, fold, at_most.map(Version));
    assert_eq!(load(None, 1).await.expect("load"), Some(snapshot(7)), "the latest");
    assert_eq!(load(Some(13), 1).await.expect("load"), Some(snapshot(6)), "at or below 13");
    assert_eq!(load(Some(12), 1).await.expect("load"), Some(snapshot(6)), "at 12");
    assert_eq!(load(Some(11), 1).await.expect("load"), Some(snapshot(3)), "below 11");
    assert_eq!(load(Some(5), 1).await.expect("load"), None, "none so early");
    assert_eq!(load(None, 2).await.expect("load"), None, "another fold's snapshots are never loaded");
    assert_eq!(store.load_snapshot(&key("ts", "order", "s2"), 1, None).await.expect("load"), None);
    assert_eq!(store.load_snapshot(&key("tt", "order", "s1"), 1, None).await.expect("load"), None);
    // By time: the latest snapshot whose last event is at or before the time.
    let load_at = |step: i64, fold: u32| store.load_snapshot_at(&k, fold, truncate(at(step)));
    assert_eq!(load_at(3, 1).await.expect("load_at"), Some(snapshot(3)), "at step 3's time");
    assert_eq!(load_at(5, 1).await.expect("load_at"), Some(snapshot(3)), "at step 5's time");
    assert_eq!(load_at(6, 1).await.expect("load_at"), Some(snapshot(6)), "at step 6's time");
    assert_eq!(load_at(2, 1).await.expect("load_at"), None, "before the first snapshot");
    assert_eq!(load_at(7, 2).await.expect("load_at"), None, "another fold's");
    // The snapshot's state is the read model's at that version.
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    assert_eq!((row.version, row.state, row.deleted), (Version(14), json!({"step": 7, "z": [7]}), true));
}

/// `list_streams` pages every stream in (tenant, type, id) byte order; `clear_read_model` and
/// `put_read_model` replace the read model and snapshots (`sourced rebuild`).
pub async fn streams_list_in_key_order_and_the_read_model_can_be_replaced(store: &dyn EventStore) {
    use crate::RebuiltStream;
    let keys =
        [("tb", "order", "a"), ("ta", "order", "b"), ("ta", "order", "B"), ("ta", "invoice", "z"), ("tc", "a", "1")];
    for (i, (t, ty, id)) in keys.iter().enumerate() {
        let k = key(t, ty, id);
        let mut req = request(&k, ExpectedVersion::NoStream, cmd(8_000 + i as u128), 2, i as i64);
        req.snapshot = Some(SnapshotWrite { fold: 1, created_at: at(i as i64) });
        appended(store, req).await;
    }
    let mut want: Vec<StreamKey> = keys.iter().map(|(t, ty, id)| key(t, ty, id)).collect();
    want.sort_by(|a, b| {
        (a.tenant.as_str(), a.type_name.as_str(), a.id.as_str()).cmp(&(
            b.tenant.as_str(),
            b.type_name.as_str(),
            b.id.as_str(),
        ))
    });
    let mut got = Vec::new();
    let mut after: Option<StreamKey> = None;
    for _ in 0..10 {
        let page = store.list_streams(after.as_ref(), 2).await.expect("list_streams");
        assert!(page.len() <= 2);
        let Some(last) = page.last().cloned() else { break };
        after = Some(last);
        got.extend(page);
    }
    assert_eq!(got, want);

    let k = key("ta", "order", "b");
    let row = store.get_document(&k).await.expect("get").expect("a row");
    store.clear_read_model().await.expect("clear_read_model");
    assert_eq!(store.get_document(&k).await.expect("get"), None);
    assert_eq!(store.load_snapshot(&k, 1, None).await.expect("load"), None);
    assert_eq!(store.list_streams(None, 100).await.expect("list_streams").len(), keys.len(), "events stay");

    let snapshot = sourced_core::Aggregate {
        version: Version(1),
        state: Some(json!({"at": 1})),
        deleted: false,
        created_at: Some(truncate(at(3))),
        updated_at: Some(truncate(at(3))),
    };
    let rebuilt = RebuiltStream { row: row.clone(), snapshots: vec![snapshot.clone()], fold: 1 };
    store.put_read_model(vec![rebuilt.clone()]).await.expect("put_read_model");
    store.put_read_model(vec![rebuilt]).await.expect("put_read_model again replaces");
    assert_eq!(store.get_document(&k).await.expect("get"), Some(row));
    assert_eq!(store.load_snapshot(&k, 1, None).await.expect("load"), Some(snapshot));
}

/// `read_all` returns one tenant's events only, in increasing positions, pages by `after`
/// (any position, also another tenant's) and `limit`.
pub async fn read_all_is_per_tenant_and_ordered(store: &dyn EventStore) {
    let tenants = [tenant("t1"), tenant("t2"), tenant("t3")];
    let mut returned: Vec<RecordedEvent> = Vec::new();
    for step in 0..24u64 {
        let t = tenants[(step % 3) as usize].as_str();
        let k = key(t, "order", &format!("s{}", step % 2));
        returned.extend(
            appended(
                store,
                request(&k, ExpectedVersion::Any, cmd(800 + u128::from(step)), 1 + (step % 2) as usize, step as i64),
            )
            .await,
        );
    }
    assert_gap_free(&returned);
    for t in &tenants {
        let mine: Vec<RecordedEvent> = returned.iter().filter(|e| e.tenant == *t).cloned().collect();
        let read = store.read_all(t, Position(0), 1_000).await.expect("read_all");
        assert_eq!(read, mine, "tenant {t}");
        // Pages of 3, each starting after the last position seen.
        let mut paged = Vec::new();
        let mut after = Position(0);
        for _ in 0..=mine.len() {
            let page = store.read_all(t, after, 3).await.expect("read_all");
            assert!(page.len() <= 3);
            let Some(last) = page.last() else { break };
            after = last.position;
            paged.extend(page);
        }
        assert_eq!(paged, mine, "tenant {t}, pages of 3");
        // After any position, also one of another tenant.
        for e in &returned {
            let read = store.read_all(t, e.position, 1_000).await.expect("read_all");
            let want: Vec<_> = mine.iter().filter(|m| m.position > e.position).cloned().collect();
            assert_eq!(read, want, "tenant {t} after {}", e.position);
        }
        assert_eq!(store.read_all(t, Position(0), 0).await.expect("read_all"), Vec::new(), "limit 0");
    }
    assert_eq!(store.read_all(&tenant("t4"), Position(0), 1_000).await.expect("read_all"), Vec::new());
    assert_eq!(store.read_all(&tenants[0], Position(u64::MAX), 1_000).await.expect("read_all"), Vec::new());
}

/// `read_global` returns every tenant's events in increasing positions, paged by `after` and
/// `limit`: exactly what the appends returned, all tenants interleaved.
pub async fn read_global_spans_tenants_in_order(store: &dyn EventStore) {
    let mut returned: Vec<RecordedEvent> = Vec::new();
    for step in 0..15u64 {
        let k = key(&format!("t{}", step % 3), "order", &format!("s{}", step % 2));
        returned.extend(
            appended(
                store,
                request(&k, ExpectedVersion::Any, cmd(900 + u128::from(step)), 1 + (step % 2) as usize, step as i64),
            )
            .await,
        );
    }
    assert_gap_free(&returned);
    assert_eq!(store.read_global(Position(0), 1_000).await.expect("read_global"), returned);
    let mut paged = Vec::new();
    let mut after = Position(0);
    for _ in 0..=returned.len() {
        let page = store.read_global(after, 4).await.expect("read_global");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = last.position;
        paged.extend(page);
    }
    assert_eq!(paged, returned, "pages of 4");
    let middle = returned[returned.len() / 2].position;
    let tail: Vec<_> = returned.iter().filter(|e| e.position > middle).cloned().collect();
    assert_eq!(store.read_global(middle, 1_000).await.expect("read_global"), tail);
    assert_eq!(store.read_global(Position(0), 0).await.expect("read_global"), Vec::new(), "limit 0");
    assert_eq!(store.read_global(Position(u64::MAX), 10).await.expect("read_global"), Vec::new());
}

/// `read_stream` bounds: `after` exclusive, `to` inclusive, `limit`.
pub async fn read_stream_bounds(store: &dyn EventStore) {
    let k = key("t1", "order", "a");
    let mut all = Vec::new();
    for step in 0..4u64 {
        all.extend(
            appended(
                store,
                request(&k, ExpectedVersion::Any, cmd(900 + u128::from(step)), 1 + step as usize % 3, step as i64),
            )
            .await,
        );
    }
    // A neighbour with the same id under another type.
    appended(store, request(&key("t1", "invoice", "a"), ExpectedVersion::Any, cmd(990), 3, 9)).await;
    let n = all.len() as u64;
    assert_eq!(n, 7);
    let versions = |events: Vec<RecordedEvent>| events.iter().map(|e| e.version.0).collect::<Vec<u64>>();
    let read =
        |after: u64, to: Option<u64>, limit: usize| store.read_stream(&k, Version(after), to.map(Version), limit);
    assert_eq!(read(0, None, 100).await.expect("read"), all);
    assert_eq!(versions(read(2, Some(5), 100).await.expect("read")), [3, 4, 5]);
    assert_eq!(versions(read(2, Some(5), 2).await.expect("read")), [3, 4]);
    assert_eq!(versions(read(2, None, 2).await.expect("read")), [3, 4]);
    assert_eq!(versions(read(0, Some(1), 100).await.expect("read")), [1]);
    assert_eq!(versions(read(6, None, 100).await.expect("read")), [7]);
    assert_eq!(versions(read(5, Some(100), 100).await.expect("read")), [6, 7]);
    assert_eq!(versions(read(n, None, 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(versions(read(n + 5, None, 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(versions(read(0, Some(0), 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(versions(read(4, Some(3), 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(versions(read(4, Some(4), 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(versions(read(0, None, 0).await.expect("read")), Vec::<u64>::new());
    assert_eq!(read(0, Some(u64::MAX), usize::MAX).await.expect("read"), all);
    assert_eq!(versions(read(u64::MAX, None, 100).await.expect("read")), Vec::<u64>::new());
    assert_eq!(read(3, Some(6), 100).await.expect("read"), all[3..6]);
}

/// Every read returns at most [`READ_LIMIT_MAX`] rows, whatever the limit asked.
pub async fn reads_cap_limits(store: &dyn EventStore) {
    let k = key("t1", "order", "long");
    let appends = READ_LIMIT_MAX / APPEND_EVENTS_MAX + 1;
    for i in 0..appends {
        let mut req = request(
            &k,
            ExpectedVersion::Exact(Version((i * APPEND_EVENTS_MAX) as u64)),
            cmd(1_000 + i as u128),
            APPEND_EVENTS_MAX,
            i as i64,
        );
        for event in &mut req.events {
            event.data = json!(null);
        }
        assert_eq!(appended(store, req).await.len(), APPEND_EVENTS_MAX);
    }
    let total = (appends * APPEND_EVENTS_MAX) as u64;
    assert!(total > READ_LIMIT_MAX as u64);
    for limit in [usize::MAX, READ_LIMIT_MAX + 1] {
        let events = store.read_stream(&k, Version(0), None, limit).await.expect("read_stream");
        assert_eq!(events.len(), READ_LIMIT_MAX, "read_stream limit {limit}");
        assert_eq!(events.last().map(|e| e.version), Some(Version(READ_LIMIT_MAX as u64)));
        let events = store.read_all(&k.tenant, Position(0), limit).await.expect("read_all");
        assert_eq!(events.len(), READ_LIMIT_MAX, "read_all limit {limit}");
        assert!(events.windows(2).all(|w| w[0].position.0 + 1 == w[1].position.0));
    }
    let rest = store.read_stream(&k, Version(READ_LIMIT_MAX as u64), None, usize::MAX).await.expect("read_stream");
    assert_eq!(rest.len() as u64, total - READ_LIMIT_MAX as u64);
    assert_eq!(rest.last().map(|e| e.version), Some(Version(total)));
}

/// Many writers race with exact expected versions on one stream: each version is won by
/// exactly one append, versions stay contiguous, and positions increase without gaps.
pub async fn concurrent_appends_one_winner_per_version(store: &dyn EventStore) {
    const WRITERS: u64 = 32;
    const TARGET_VERSION: u64 = 96;
    let k = key("t1", "order", "race");
    let writer = |w: u64| {
        let k = k.clone();
        async move {
            let mut wins: Vec<Vec<RecordedEvent>> = Vec::new();
            let mut known = 0u64;
            // Every lost race means the stream moved on, so this bound is never reached.
            for attempt in 0..TARGET_VERSION + 2 {
                if known >= TARGET_VERSION {
                    return wins;
                }
                let id = cmd(u128::from(w) << 32 | u128::from(attempt) | 1 << 80);
                let events = 1 + (w % 2) as usize;
                let req = request(&k, ExpectedVersion::Exact(Version(known)), id, events, attempt as i64);
                match store.append(req).await {
                    Ok(AppendOutcome::Appended(recorded)) => {
                        assert_eq!(recorded[0].version, Version(known + 1), "writer {w}");
                        known = last_version_of(&recorded).0;
                        wins.push(recorded);
                    }
                    Err(StoreError::Conflict { actual, .. }) => {
                        assert!(actual.version.0 > known, "writer {w}: a conflict means the stream moved on");
                        known = actual.version.0;
                    }
                    other => panic!("writer {w}: {other:?}"),
                }
            }
            panic!("writer {w} did not reach version {TARGET_VERSION}");
        }
    };
    let results = join_all((0..WRITERS).map(writer).collect()).await;
    let mut wins: Vec<Vec<RecordedEvent>> = results.into_iter().flatten().collect();
    wins.sort_by_key(|w| w[0].version);
    let mut next = 1u64;
    for win in &wins {
        assert_eq!(win[0].version.0, next, "each version is won exactly once");
        next = last_version_of(win).0 + 1;
    }
    let head = next - 1;
    assert!(head >= TARGET_VERSION);
    let winners: Vec<RecordedEvent> = wins.into_iter().flatten().collect();
    let read = stream(store, &k).await;
    assert_eq!(read.iter().map(|e| e.version.0).collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>());
    assert_eq!(read, winners, "the stream holds exactly the winning appends");
    let all = all_events(store, &k.tenant).await;
    assert_gap_free(&all);
    assert_eq!(all, winners, "commit order follows the versions");
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    assert_eq!(row.version, Version(head));
}

/// SPEC §7.3: a reader tailing `read_all` while many appends commit sees every event exactly
/// once, in increasing positions, never one below a position it has seen.
pub async fn tailing_reader_never_skips(store: &dyn EventStore) {
    const WRITERS: usize = 8;
    const APPENDS_PER_WRITER: usize = 25;
    let t = tenant("t1");
    let finished = AtomicUsize::new(0);
    let mut tasks: Vec<Pin<Box<dyn Future<Output = Vec<RecordedEvent>> + Send + '_>>> = Vec::new();
    for w in 0..WRITERS {
        let finished = &finished;
        tasks.push(Box::pin(async move {
            // Odd writers write to another tenant, interleaving positions.
            let k = key(if w % 2 == 0 { "t1" } else { "t2" }, "order", &format!("w{w}"));
            let mut mine = Vec::new();
            for i in 0..APPENDS_PER_WRITER {
                let id = cmd((w * 1_000 + i) as u128 | 1 << 90);
                mine.extend(appended(store, request(&k, ExpectedVersion::Any, id, 1 + i % 3, i as i64)).await);
            }
            finished.fetch_add(1, Ordering::SeqCst);
            mine
        }));
    }
    let reader = {
        let (t, finished) = (&t, &finished);
        async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = Position(0);
            // Bounded: writers finish, then one empty read ends the loop.
            for _ in 0..1_000_000 {
                let writers_done = finished.load(Ordering::SeqCst) == WRITERS;
                let page = store.read_all(t, after, 7).await.expect("read_all");
                for e in &page {
                    assert!(e.position > after, "position {} after {after}", e.position);
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
            panic!("the tailing reader did not finish");
        }
    };
    tasks.push(Box::pin(reader));
    let mut results = join_all(tasks).await;
    let seen = results.pop().expect("the reader's result");
    let all = all_events(store, &t).await;
    assert_eq!(seen, all, "the tailing reader saw every event once, in order");
    let mut written: Vec<RecordedEvent> = results.into_iter().flatten().filter(|e| e.tenant == t).collect();
    written.sort_by_key(|e| e.position);
    assert_eq!(all, written);
    let mut everything = all.clone();
    everything.extend(all_events(store, &tenant("t2")).await);
    assert_gap_free(&everything);
    assert_eq!(all.len(), WRITERS / 2 * (APPENDS_PER_WRITER / 3 * 6 + [0, 1, 3][APPENDS_PER_WRITER % 3]));
}

/// An append of no events, or of more than [`APPEND_EVENTS_MAX`], is refused and leaves no
/// trace; exactly [`APPEND_EVENTS_MAX`] is accepted.
pub async fn rejects_empty_and_oversized_appends(store: &dyn EventStore) {
    let k = key("t1", "order", "a");
    let mut empty = request(&k, ExpectedVersion::Any, cmd(1_100), 1, 1);
    empty.events.clear();
    let oversized = request(&k, ExpectedVersion::Any, cmd(1_101), APPEND_EVENTS_MAX + 1, 1);
    for req in [empty, oversized] {
        let id = req.command.id;
        match store.append(req).await {
            Err(StoreError::InvalidRequest(_)) => {}
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        assert_eq!(store.get_command(&k.tenant, id).await.expect("get_command"), None);
    }
    assert_eq!(stream(store, &k).await, Vec::new());
    assert_eq!(store.get_document(&k).await.expect("get_document"), None);
    let full = appended(store, request(&k, ExpectedVersion::NoStream, cmd(1_101), APPEND_EVENTS_MAX, 2)).await;
    assert_eq!(full.len(), APPEND_EVENTS_MAX);
    assert_eq!(last_version_of(&full), Version(APPEND_EVENTS_MAX as u64));
    assert_gap_free(&full);
    assert_eq!(stream(store, &k).await, full);
}

/// Event data and metadata, documents and command extras come back as written: nesting,
/// unicode, escapes, big and negative numbers, nulls.
pub async fn json_round_trips(store: &dyn EventStore) {
    let values = [
        json!(null),
        json!(true),
        json!(-0.25),
        json!("plain"),
        json!([]),
        json!({}),
        json!({"s": "ü€😀 \"quoted\" \\ \n\t\u{0001}", "n": [u64::MAX, i64::MIN, 0, 1.5, 3.0e10]}),
        json!({"deep": {"er": {"est": [[[{"x": null}]]]}}, "empty": {"a": [], "o": {}}}),
        json!([1, "two", {"three": 3}, [4], null, false]),
    ];
    for (i, value) in values.iter().enumerate() {
        let k = key("t1", "order", &format!("j{i}"));
        let mut req = request(&k, ExpectedVersion::NoStream, cmd(1_200 + i as u128), 1, i as i64);
        req.events[0].data = value.clone();
        req.events[0].metadata = json!({"context": value});
        req.document.state = json!({"value": value});
        req.command.extra = value.clone();
        let events = appended(store, req.clone()).await;
        assert_eq!((&events[0].data, &events[0].metadata), (value, &req.events[0].metadata));
        let read = stream(store, &k).await;
        assert_eq!(read, events, "value {i}");
        let row = store.get_document(&k).await.expect("get_document").expect("a row");
        assert_eq!(row.state, req.document.state, "value {i}");
        let record = store.get_command(&k.tenant, req.command.id).await.expect("get_command").expect("a record");
        assert_eq!(&record.extra, value, "value {i}");
    }
}

/// JSON objects come back with their keys in the order written (documents are shown as the
/// client wrote them).
pub async fn json_key_order_is_kept(store: &dyn EventStore) {
    let value: Value =
        serde_json::from_str(r#"{"zeta":1,"alpha":{"z":true,"a":false,"m":null},"mid":[{"y":1,"b":2}],"10":0,"2":0}"#)
            .expect("valid JSON");
    let text = serde_json::to_string(&value).expect("serializable");
    let k = key("t1", "order", "ordered");
    let mut req = request(&k, ExpectedVersion::NoStream, cmd(1_300), 1, 1);
    req.events[0].data = value.clone();
    req.events[0].metadata = value.clone();
    req.document.state = value.clone();
    req.command.extra = value.clone();
    appended(store, req).await;
    let event = stream(store, &k).await.pop().expect("an event");
    let row = store.get_document(&k).await.expect("get_document").expect("a row");
    let record = store.get_command(&k.tenant, cmd(1_300)).await.expect("get_command").expect("a record");
    for (what, got) in
        [("data", &event.data), ("metadata", &event.metadata), ("state", &row.state), ("extra", &record.extra)]
    {
        assert_eq!(serde_json::to_string(got).expect("serializable"), text, "{what}");
    }
}

/// [`model_check`] with a fixed seed, one append at a time.
pub async fn model_based_random_appends(store: &dyn EventStore) {
    model_check(store, 0x5EED_0001, 600, 1).await;
}

// ---------------------------------------------------------------------------------------------
// Model-based check

/// Applies `steps` random appends (seeded by `seed`) over a few tenants, types and ids, with
/// random expected versions and reused command ids, to the store and to a reference model,
/// and compares every outcome, then every stream, feed, read-model row and command record.
///
/// With `in_flight > 1`, groups of that many appends are issued at once, in order; the model
/// assumes the store applies them in the order issued (true of a single-writer queue such as
/// the SQLite backend's; not a requirement of the contract in general).
pub async fn model_check(store: &dyn EventStore, seed: u64, steps: usize, in_flight: usize) {
    assert!(in_flight >= 1);
    let tenants = [tenant("ta"), tenant("tb")];
    let types = [type_name("order"), type_name("invoice")];
    let ids = [aggregate_id("1"), aggregate_id("2"), aggregate_id("3")];
    let mut keys = Vec::new();
    for t in &tenants {
        for ty in &types {
            for id in &ids {
                keys.push(StreamKey { tenant: t.clone(), type_name: ty.clone(), id: id.clone() });
            }
        }
    }
    let mut rng = Rng::new(seed);
    let mut model = Model::default();
    let mut used_commands: Vec<CommandId> = Vec::new();
    let mut step = 0usize;
    while step < steps {
        let group_len = in_flight.min(steps - step);
        let mut group = Vec::with_capacity(group_len);
        let mut predictions = Vec::with_capacity(group_len);
        for _ in 0..group_len {
            let req = random_request(&mut rng, &keys, &mut used_commands, &model, seed, step);
            predictions.push(model.predict(&req));
            // Later requests of the group see this one's effect, as the store will.
            if let Prediction::Appended { first_version } = predictions[predictions.len() - 1] {
                model.commit(&req, first_version);
            }
            group.push(req);
            step += 1;
        }
        let outcomes = join_all(group.iter().cloned().map(|r| store.append(r)).collect()).await;
        for (i, ((req, prediction), outcome)) in group.iter().zip(&predictions).zip(outcomes).enumerate() {
            let at = step - group_len + i;
            let context = format!("seed {seed:#x}, step {at}, {} expecting {}", req.key, req.expected);
            match (prediction, outcome) {
                (Prediction::Appended { .. }, Ok(AppendOutcome::Appended(events))) => {
                    model.check_appended(req, &events, &context);
                }
                (Prediction::Duplicate(want), Ok(AppendOutcome::Duplicate(got))) => {
                    assert_eq!(&got, want, "{context}");
                }
                (Prediction::Conflict(want), Err(StoreError::Conflict { expected, actual })) => {
                    assert_eq!((expected, actual), (req.expected, *want), "{context}");
                }
                (want, got) => panic!("{context}: the model says {want:?}, the store {got:?}"),
            }
        }
        if step % 150 < group_len {
            model.compare(store, &keys, &tenants, &format!("seed {seed:#x}, after step {step}")).await;
        }
    }
    model.compare(store, &keys, &tenants, &format!("seed {seed:#x}, at the end")).await;
    let stats = store.stats();
    assert_eq!((stats.appends, stats.events), (model.appends, model.all.len() as u64), "seed {seed:#x}: stats");
}

fn random_request(
    rng: &mut Rng,
    keys: &[StreamKey],
    used_commands: &mut Vec<CommandId>,
    model: &Model,
    seed: u64,
    step: usize,
) -> AppendRequest {
    let k = &keys[rng.below(keys.len() as u64) as usize];
    let head = model.head(k);
    let expected = match rng.below(100) {
        0..30 => ExpectedVersion::Any,
        30..45 => ExpectedVersion::NoStream,
        45..60 => ExpectedVersion::Exists,
        60..85 => ExpectedVersion::Exact(head.version),
        85..93 => ExpectedVersion::Exact(Version((head.version.0 + 1).saturating_sub(rng.below(3)))),
        _ => ExpectedVersion::Exact(Version(rng.below(6))),
    };
    let command = if !used_commands.is_empty() && rng.below(100) < 25 {
        used_commands[rng.below(used_commands.len() as u64) as usize]
    } else {
        let id = cmd(u128::from(seed) << 64 | step as u128);
        used_commands.push(id);
        id
    };
    let event_count = 1 + rng.below(3) as usize;
    let mut req = request(k, expected, command, event_count, step as i64);
    for (i, event) in req.events.iter_mut().enumerate() {
        event.event_type = ["created", "patched", "deleted", "line-added"][rng.below(4) as usize].to_owned();
        event.data = json!({"step": step, "i": i, "r": rng.next() >> 11, "s": "ü\"\n"});
    }
    // Timestamps move mostly forwards, sometimes back (clock steps).
    req.timestamp = at(step as i64) + TimeDelta::microseconds(rng.below(3_000_000) as i64 - 1_000_000);
    req.document = DocumentWrite { state: json!({"step": step, "r": rng.next() >> 40}), deleted: rng.below(100) < 15 };
    req.command.fingerprint = format!("fp-{step}-{}", rng.below(1_000));
    req.command.extra = if rng.below(2) == 0 { json!(null) } else { json!({"warnings": [format!("w{step}")]}) };
    req
}

/// What the model expects of one append.
#[derive(Debug)]
enum Prediction {
    Appended { first_version: Version },
    Duplicate(CommandRecord),
    Conflict(StreamHead),
}

/// The reference: what a correct store holds, kept in plain collections.
#[derive(Default)]
struct Model {
    streams: BTreeMap<StreamKey, Vec<RecordedEvent>>,
    documents: BTreeMap<StreamKey, DocumentRow>,
    commands: HashMap<(TenantId, CommandId), CommandRecord>,
    /// Every event, in position order; positions are filled in as the store reports them.
    all: Vec<RecordedEvent>,
    /// Events committed in the model whose positions the store has not reported yet.
    unconfirmed: usize,
    appends: u64,
}

impl Model {
    fn head(&self, key: &StreamKey) -> StreamHead {
        self.documents
            .get(key)
            .map_or_else(StreamHead::default, |row| StreamHead { version: row.version, deleted: row.deleted })
    }

    fn predict(&self, req: &AppendRequest) -> Prediction {
        if let Some(record) = self.commands.get(&(req.key.tenant.clone(), req.command.id)) {
            return Prediction::Duplicate(record.clone());
        }
        let head = self.head(&req.key);
        if req.expected.matches(head) {
            Prediction::Appended { first_version: head.version.next() }
        } else {
            Prediction::Conflict(head)
        }
    }

    /// Records an append the model expects to succeed; positions are checked and filled in
    /// by [`Model::check_appended`].
    fn commit(&mut self, req: &AppendRequest, first_version: Version) {
        let timestamp = truncate(req.timestamp);
        let mut version = Version(first_version.0 - 1);
        let stream = self.streams.entry(req.key.clone()).or_default();
        for new in &req.events {
            version = version.next();
            let event = RecordedEvent {
                id: new.id,
                position: Position(0),
                tenant: req.key.tenant.clone(),
                target_name: req.key.type_name.clone(),
                target_id: req.key.id.clone(),
                version,
                event_type: new.event_type.clone(),
                data: new.data.clone(),
                metadata: new.metadata.clone(),
                timestamp,
            };
            stream.push(event.clone());
            self.all.push(event);
        }
        self.unconfirmed += req.events.len();
        let created_at = self.documents.get(&req.key).map_or(timestamp, |row| row.created_at);
        self.documents.insert(
            req.key.clone(),
            DocumentRow {
                key: req.key.clone(),
                version,
                state: req.document.state.clone(),
                deleted: req.document.deleted,
                created_at,
                updated_at: timestamp,
            },
        );
        self.commands.insert(
            (req.key.tenant.clone(), req.command.id),
            CommandRecord {
                id: req.command.id,
                fingerprint: req.command.fingerprint.clone(),
                key: req.key.clone(),
                first_version,
                last_version: version,
                extra: req.command.extra.clone(),
            },
        );
        self.appends += 1;
    }

    /// Compares an append's events with the model's, and fills in their positions: the next
    /// after the last confirmed one (gap-free), or, for the first event, any from 1.
    fn check_appended(&mut self, req: &AppendRequest, events: &[RecordedEvent], context: &str) {
        assert_eq!(events.len(), req.events.len(), "{context}");
        let confirmed = self.all.len() - self.unconfirmed;
        let mut position = match confirmed.checked_sub(1) {
            Some(last) => Position(self.all[last].position.0 + 1),
            None => {
                assert!(events[0].position >= Position(1), "{context}: positions start at 1");
                events[0].position
            }
        };
        let stream = self.streams.get_mut(&req.key).expect("the model committed this append");
        for (i, event) in events.iter().enumerate() {
            let slot = &mut self.all[confirmed + i];
            assert_eq!(
                (slot.tenant.clone(), slot.target_name.clone(), slot.target_id.clone()),
                (event.tenant.clone(), event.target_name.clone(), event.target_id.clone()),
                "{context}: applied out of order"
            );
            slot.position = position;
            assert_eq!(event, slot, "{context}: event {i}");
            let in_stream = stream.iter_mut().find(|e| e.version == event.version).expect("the model has this version");
            in_stream.position = position;
            position = Position(position.0 + 1);
        }
        self.unconfirmed -= events.len();
    }

    async fn compare(&self, store: &dyn EventStore, keys: &[StreamKey], tenants: &[TenantId], context: &str) {
        assert_eq!(self.unconfirmed, 0, "{context}");
        for t in tenants {
            let want: Vec<RecordedEvent> = self.all.iter().filter(|e| e.tenant == *t).cloned().collect();
            let mut got = Vec::new();
            let mut after = Position(0);
            for _ in 0..=want.len() {
                let page = store.read_all(t, after, 97).await.expect("read_all");
                let Some(last) = page.last() else { break };
                after = last.position;
                got.extend(page);
            }
            assert_eq!(got, want, "{context}: read_all of {t}");
        }
        for k in keys {
            let want = self.streams.get(k).cloned().unwrap_or_default();
            assert_eq!(stream(store, k).await, want, "{context}: read_stream of {k}");
            let row = store.get_document(k).await.expect("get_document");
            assert_eq!(row.as_ref(), self.documents.get(k), "{context}: document {k}");
        }
        let mut lists: BTreeMap<(TenantId, TypeName), Vec<DocumentRow>> = BTreeMap::new();
        for k in keys {
            lists.entry((k.tenant.clone(), k.type_name.clone())).or_default();
        }
        for row in self.documents.values() {
            lists.entry((row.key.tenant.clone(), row.key.type_name.clone())).or_default().push(row.clone());
        }
        for ((t, ty), rows) in lists {
            for include_deleted in [false, true] {
                let query = ListQuery { include_deleted, ..ListQuery::new(t.clone(), ty.clone(), 100) };
                let got = store.list_documents(&query).await.expect("list_documents");
                let want: Vec<DocumentRow> = rows.iter().filter(|r| include_deleted || !r.deleted).cloned().collect();
                assert_eq!(got, want, "{context}: list of {t}/{ty}, include_deleted={include_deleted}");
            }
        }
        for ((t, id), record) in &self.commands {
            let got = store.get_command(t, *id).await.expect("get_command");
            assert_eq!(got.as_ref(), Some(record), "{context}: command {id} of {t}");
        }
    }
}

/// xorshift64*: a tiny deterministic generator, enough to pick test operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds diverge and 0 is allowed.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs the futures concurrently within the current task and returns their outputs in order.
/// Each is first polled in order, so requests that a backend queues are queued in order.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future completed")).collect()
}

/// A fixed, deterministic time: `step` seconds after 2023-11-14, plus sub-microsecond noise
/// that the store must drop.
fn at(step: i64) -> DateTime<Utc> {
    from_micros(1_700_000_000_000_000 + step * 1_000_000 + 123) + TimeDelta::nanoseconds(456)
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("a valid tenant")
}

fn type_name(name: &str) -> TypeName {
    TypeName::parse(name).expect("a valid type name")
}

fn aggregate_id(id: &str) -> AggregateId {
    AggregateId::parse(id).expect("a valid aggregate id")
}

fn key(t: &str, ty: &str, id: &str) -> StreamKey {
    StreamKey { tenant: tenant(t), type_name: type_name(ty), id: aggregate_id(id) }
}

fn cmd(n: u128) -> CommandId {
    CommandId(Uuid::from_u128(n))
}

fn stream_of(event: &RecordedEvent) -> StreamKey {
    StreamKey { tenant: event.tenant.clone(), type_name: event.target_name.clone(), id: event.target_id.clone() }
}

/// An append of `events` events with deterministic ids, content and time.
fn request(k: &StreamKey, expected: ExpectedVersion, command: CommandId, events: usize, step: i64) -> AppendRequest {
    AppendRequest {
        key: k.clone(),
        expected,
        events: (0..events)
            .map(|i| NewEvent {
                id: command.event_id(i),
                event_type: if i == 0 { "created".into() } else { "patched".into() },
                data: json!({"step": step, "index": i}),
                metadata: json!({"commandId": command.to_string(), "commandName": "aggregate-modification"}),
            })
            .collect(),
        timestamp: at(step),
        document: DocumentWrite { state: json!({"step": step}), deleted: false },
        command: CommandWrite { id: command, fingerprint: format!("fp-{command}"), extra: json!({"warnings": []}) },
        snapshot: None,
        checkpoint: None,
        wake: None,
    }
}

async fn appended(store: &dyn EventStore, req: AppendRequest) -> Vec<RecordedEvent> {
    let context = format!("{} expecting {}", req.key, req.expected);
    match store.append(req).await {
        Ok(AppendOutcome::Appended(events)) => events,
        other => panic!("{context}: expected the append to be stored, got {other:?}"),
    }
}

async fn conflict(store: &dyn EventStore, req: AppendRequest) -> (ExpectedVersion, StreamHead) {
    let context = format!("{} expecting {}", req.key, req.expected);
    match store.append(req).await {
        Err(StoreError::Conflict { expected, actual }) => (expected, actual),
        other => panic!("{context}: expected a conflict, got {other:?}"),
    }
}

/// A whole stream.
async fn stream(store: &dyn EventStore, k: &StreamKey) -> Vec<RecordedEvent> {
    store.read_stream(k, Version(0), None, READ_LIMIT_MAX).await.expect("read_stream")
}

/// A tenant's whole feed, page by page.
async fn all_events(store: &dyn EventStore, t: &TenantId) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Position(0);
    loop {
        let page = store.read_all(t, after, 1_000).await.expect("read_all");
        let Some(last) = page.last() else { return all };
        assert!(last.position > after);
        after = last.position;
        all.extend(page);
    }
}

async fn list(
    store: &dyn EventStore,
    t: &str,
    ty: &str,
    after: Option<AggregateId>,
    limit: usize,
    include_deleted: bool,
) -> Vec<DocumentRow> {
    let after = after.map(|id| ListCursor { slots: Vec::new(), id });
    let query = ListQuery { after, include_deleted, ..ListQuery::new(tenant(t), type_name(ty), limit) };
    store.list_documents(&query).await.expect("list_documents")
}

fn ids_of(rows: &[DocumentRow]) -> Vec<&str> {
    rows.iter().map(|r| r.key.id.as_str()).collect()
}

fn last_version(events: &[RecordedEvent]) -> u64 {
    last_version_of(events).0
}

fn last_version_of(events: &[RecordedEvent]) -> Version {
    events.last().expect("at least one event").version
}

/// Positions strictly increasing by one.
fn assert_gap_free(events: &[RecordedEvent]) {
    let mut sorted: Vec<u64> = events.iter().map(|e| e.position.0).collect();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        assert_eq!(pair[0] + 1, pair[1], "positions are gap-free: {} then {}", pair[0], pair[1]);
    }
}
