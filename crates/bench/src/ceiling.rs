//! The raw SQLite ceiling: the rows one benchmark command leaves in the embedded store (an
//! event, the read-model row, the command record), written with rusqlite directly in
//! transactions of a given mean size, with the store's settings (WAL, `synchronous=FULL`)
//! and its own schema. The aggregate ids are those of the load generator's clients, taken in
//! turn, so that each commit touches as many places of the indexes as Sourced's commits do.
//! No HTTP, no engine, and none of the store's per-append reads (idempotency and version
//! checks) or savepoints: an upper bound, not a peer.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use sourced_store::EventStore as _;
use sourced_store::sqlite::{SqliteOptions, SqliteStore};

use crate::load::Timing;
use crate::workload;

/// Most transactions one ceiling run commits, whatever the duration.
const COMMITS_MAX: u64 = 100_000_000;
/// The tenant the server uses when a request names none.
const TENANT: &str = "default";

/// What the ceiling measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CeilingMeasure {
    /// Commands whose transaction began and committed inside the measured window.
    pub commands: u64,
    /// Those transactions.
    pub commits: u64,
    /// The measured window, in seconds.
    pub seconds: f64,
    /// The mean transaction size asked for.
    pub batch_mean: f64,
}

impl CeilingMeasure {
    /// Commands per second.
    pub fn per_sec(&self) -> f64 {
        crate::rate(self.commands, self.seconds)
    }
}

/// Creates the store's schema at `path` by opening (and closing) the real store, so that the
/// ceiling writes to exactly the tables and indexes Sourced does.
pub(crate) async fn create_schema(path: &Path) -> anyhow::Result<()> {
    let store = SqliteStore::open(path, SqliteOptions::default()).context("cannot create the store's schema")?;
    store.close().await;
    Ok(())
}

/// Writes commands to the database at `path` (already holding the schema) in transactions
/// whose sizes average `batch_mean`, for the warm-up and the measured window, to the
/// aggregates of `clients` clients in turn.
pub(crate) fn run(path: &Path, clients: usize, batch_mean: f64, timing: Timing) -> anyhow::Result<CeilingMeasure> {
    ensure!(clients >= 1, "at least one client");
    ensure!(batch_mean.is_finite() && batch_mean >= 1.0, "a batch holds at least one command, not {batch_mean}");
    let mut conn = Connection::open(path)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "{} cannot use WAL", path.display());
    conn.pragma_update(None, "synchronous", "FULL")?;

    let window_start = Instant::now() + timing.warmup;
    let window_end = window_start + timing.duration;
    let mut measure =
        CeilingMeasure { seconds: timing.duration.as_secs_f64(), batch_mean, ..CeilingMeasure::default() };
    let mut command = 0u64;
    for commit in 0..COMMITS_MAX {
        let began = Instant::now();
        if began >= window_end {
            break;
        }
        let size = batch_size(commit, batch_mean);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for _ in 0..size {
            write_command(&tx, clients, command)?;
            command += 1;
        }
        tx.commit()?;
        if began >= window_start && Instant::now() <= window_end {
            measure.commands += size;
            measure.commits += 1;
        }
    }
    Ok(measure)
}

/// The size of the `commit`-th transaction: sizes alternate between ⌊mean⌋ and ⌈mean⌉ so
/// that every prefix of the sequence averages `mean` (within one command).
fn batch_size(commit: u64, mean: f64) -> u64 {
    let before = (commit as f64 * mean).floor() as u64;
    let after = ((commit + 1) as f64 * mean).floor() as u64;
    (after - before).max(1)
}

/// The rows of command `n`: even `n` creates the `n / 2`-th aggregate, odd `n` patches it;
/// the aggregates belong to the `clients` clients in turn, as the load generator's ids do.
fn write_command(tx: &Transaction<'_>, clients: usize, n: u64) -> anyhow::Result<()> {
    let aggregate = n / 2;
    let created = n.is_multiple_of(2);
    let (client, seq) = ((aggregate % clients as u64) as usize, aggregate / clients as u64);
    let id = workload::aggregate_id(client, seq);
    let document = workload::document(&id, seq);
    let document = std::str::from_utf8(&document)?;
    let patch = workload::patch(seq);
    let data = if created { document } else { std::str::from_utf8(&patch)? };
    let version: i64 = if created { 1 } else { 2 };
    let command_id = fake_uuid(n);
    let metadata = format!(
        r#"{{"commandId":"{command_id}","commandName":"aggregate-modification","correlationId":"{command_id}","causationId":"{command_id}","principal":null,"context":{{}}}}"#
    );
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as i64;

    tx.prepare_cached(
        "INSERT INTO events (position, tenant, type, agg_id, version, event_id, event_type, data, metadata, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        (n + 1) as i64,
        TENANT,
        workload::TYPE_NAME,
        id,
        version,
        fake_uuid(n | 1 << 63),
        if created { "created" } else { "patched" },
        data,
        metadata,
        ts,
    ])?;
    tx.prepare_cached(
        "INSERT INTO documents (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6)
         ON CONFLICT (tenant, type, agg_id) DO UPDATE SET
             version = excluded.version, state = excluded.state,
             deleted = excluded.deleted, updated_at = excluded.updated_at",
    )?
    .execute(params![TENANT, workload::TYPE_NAME, id, version, document, ts])?;
    tx.prepare_cached(
        "INSERT INTO commands (tenant, command_id, fingerprint, type, agg_id, first_version, last_version, extra)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 'null')",
    )?
    .execute(params![
        TENANT,
        command_id,
        format!("{:064x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        workload::TYPE_NAME,
        id,
        version
    ])?;
    Ok(())
}

/// A UUID-shaped id, unique per `n`, as long as the store's ids.
fn fake_uuid(n: u64) -> String {
    format!("{:08x}-{:04x}-7000-8000-{:012x}", n >> 48, (n >> 32) & 0xffff, n & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_average_the_mean() {
        for mean in [1.0, 1.4, 2.5, 7.0, 31.3] {
            let commits = 1_000u64;
            let total: u64 = (0..commits).map(|commit| batch_size(commit, mean)).sum();
            let expected = (commits as f64 * mean).floor() as u64;
            assert!(total.abs_diff(expected) <= 1, "mean {mean}: {total} vs {expected}");
            assert!((0..commits).all(|commit| batch_size(commit, mean) >= mean.floor() as u64));
        }
    }

    #[test]
    fn ceiling_writes_rows_into_the_store_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ceiling.db");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(create_schema(&path)).unwrap();
        let timing = Timing { warmup: Duration::ZERO, duration: Duration::from_millis(100) };
        let measure = run(&path, 4, 2.5, timing).unwrap();
        assert!(measure.commands > 0 && measure.commits > 0);

        let conn = Connection::open(&path).unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| row.get(0)).unwrap()
        };
        let events = count("events");
        assert!(events >= measure.commands as i64);
        assert_eq!(count("commands"), events);
        assert_eq!(count("documents"), (events + 1) / 2);
        let clients: i64 =
            conn.query_row("SELECT COUNT(DISTINCT substr(agg_id, 1, 5)) FROM documents", [], |row| row.get(0)).unwrap();
        assert_eq!(clients, 4.min((events + 1) / 2), "the aggregates of every client");
    }
}
