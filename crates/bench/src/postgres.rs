//! The benchmark on PostgreSQL (`sourced-bench --postgres URL`): durable commands over
//! Sourced's HTTP API with the PostgreSQL backend, beside two baselines on the same server in the
//! same run, at the same concurrency, with the same durability (`synchronous_commit` as the
//! server has it, by default on: every command waits for its WAL flush):
//!
//! - the substrate ceiling: the rows one command leaves in Sourced's tables (an event, the
//!   read-model row, the command record), written by plain tokio-postgres clients, one
//!   connection per client, one single-statement transaction per command, positions from a
//!   `SEQUENCE` (no global order, no checks, no HTTP): an upper bound, not a peer;
//! - Message DB (`@eventide/message-db`): `write_message` with expected versions from plain
//!   clients, over 100 categories and over one, in a database where it is installed
//!   (`--message-db-url`; default: the same server, database `sourced_bench_messagedb`).
//!
//! Every client runs Sourced's workload shape: create an aggregate (a stream), then one write to
//! it expecting the version just written. Each level of Sourced and of the ceiling gets a fresh
//! schema (dropped afterwards); Message DB's table is emptied before each run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tokio_postgres::NoTls;

use crate::load::{self, Timing};
use crate::{HttpMeasure, Machine, StoreWindow, workload};

/// Categories of the "many categories" Message DB case.
pub(crate) const MESSAGE_DB_CATEGORIES: usize = 100;
/// The database the benchmark expects Message DB in when `--message-db-url` is not given.
pub(crate) const MESSAGE_DB_DATABASE: &str = "sourced_bench_messagedb";
/// Most iterations one plain client runs, whatever the duration.
const ITERATIONS_MAX: u64 = 100_000_000;

/// What the PostgreSQL mode runs.
#[derive(Clone, Debug, PartialEq)]
pub struct PgOptions {
    /// The server and database Sourced and the ceiling use (scratch schemas are made in it).
    pub url: String,
    /// Where Message DB is installed; `None`: [`MESSAGE_DB_DATABASE`] on the same server.
    pub message_db_url: Option<String>,
    /// Concurrency levels.
    pub clients: Vec<usize>,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Each measured window.
    pub duration: Duration,
}

/// Plain-client writes measured over one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlainMeasure {
    /// Writes (commands) that started and finished inside the window.
    pub writes: u64,
    /// The window, in seconds.
    pub seconds: f64,
    /// Failed writes over the whole run.
    pub errors: u64,
    /// The first error, if any.
    pub error_sample: Option<String>,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

impl PlainMeasure {
    /// Writes per second.
    pub fn per_sec(&self) -> f64 {
        crate::rate(self.writes, self.seconds)
    }
}

/// One concurrency level.
#[derive(Clone, Debug, PartialEq)]
pub struct PgRow {
    /// Clients.
    pub clients: usize,
    /// Sourced over HTTP on PostgreSQL.
    pub sourced: HttpMeasure,
    /// The store's counters over Sourced's window.
    pub store: StoreWindow,
    /// The substrate ceiling.
    pub ceiling: PlainMeasure,
    /// Message DB over [`MESSAGE_DB_CATEGORIES`] categories, and over one (when installed).
    pub message_db: Option<(PlainMeasure, PlainMeasure)>,
}

/// A whole PostgreSQL run.
#[derive(Clone, Debug, PartialEq)]
pub struct PgReport {
    /// Where it ran.
    pub machine: Machine,
    /// PostgreSQL's version and `synchronous_commit`.
    pub server: String,
    /// What was asked.
    pub options: PgOptions,
    /// One row per level.
    pub rows: Vec<PgRow>,
    /// Why Message DB was not measured, if it was not.
    pub message_db_missing: Option<String>,
}

/// What a plain client writes.
#[derive(Clone, Copy, Debug)]
enum Plain {
    Ceiling,
    MessageDb { categories: usize },
}

/// Runs every level: Sourced, the ceiling, Message DB (many categories, one).
pub fn run_postgres(options: &PgOptions) -> anyhow::Result<PgReport> {
    ensure!(!options.clients.is_empty(), "at least one concurrency level is needed");
    ensure!(
        options.clients.iter().all(|c| (1..=crate::CLIENTS_MAX).contains(c)),
        "clients must be 1..={}",
        crate::CLIENTS_MAX
    );
    let machine = Machine::detect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let timing = Timing { warmup: options.warmup, duration: options.duration };
    runtime.block_on(async {
        let admin = connect(&options.url).await.with_context(|| format!("cannot connect to {}", options.url))?;
        let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
        let sync: String = admin.query_one("SHOW synchronous_commit", &[]).await?.get(0);
        let server = format!("PostgreSQL {version}, synchronous_commit={sync}");
        let mdb_url =
            options.message_db_url.clone().unwrap_or_else(|| with_database(&options.url, MESSAGE_DB_DATABASE));
        let message_db_missing = match connect(&mdb_url).await {
            Err(e) => Some(format!("cannot connect to {mdb_url}: {e}")),
            Ok(c) => match c.query_one("SELECT message_store.message_store_version()", &[]).await {
                Err(e) => Some(format!("Message DB is not installed in {mdb_url}: {e}")),
                Ok(_) => None,
            },
        };
        let mut rows = Vec::new();
        for &clients in &options.clients {
            eprintln!("[{clients} clients] Sourced on PostgreSQL…");
            let (sourced, store) = measure_sourced(&admin, &options.url, clients, timing).await?;
            eprintln!("[{clients} clients] substrate ceiling…");
            let ceiling = {
                let schema = Schema::create(&admin).await?;
                let url = schema.url(&options.url);
                let store = sourced_store::postgres::PostgresStore::connect(&url, Default::default()).await?;
                sourced_store::EventStore::close(&store).await;
                admin.batch_execute(&format!("CREATE SEQUENCE {}.bench_position", schema.0)).await?;
                let measure = plain_load(&url, clients, timing, Plain::Ceiling).await;
                schema.drop(&admin).await;
                measure?
            };
            let message_db = match message_db_missing {
                Some(_) => None,
                None => {
                    let mut both = Vec::new();
                    for categories in [MESSAGE_DB_CATEGORIES, 1] {
                        eprintln!("[{clients} clients] Message DB, {categories} categories…");
                        connect(&mdb_url).await?.batch_execute("TRUNCATE message_store.messages").await?;
                        both.push(plain_load(&mdb_url, clients, timing, Plain::MessageDb { categories }).await?);
                    }
                    let one = both.pop().expect("two runs");
                    Some((both.pop().expect("two runs"), one))
                }
            };
            rows.push(PgRow { clients, sourced, store, ceiling, message_db });
        }
        Ok(PgReport { machine, server, options: options.clone(), rows, message_db_missing })
    })
}

/// Sourced at one level on a fresh schema.
async fn measure_sourced(
    admin: &tokio_postgres::Client,
    url: &str,
    clients: usize,
    timing: Timing,
) -> anyhow::Result<(HttpMeasure, StoreWindow)> {
    let schema = Schema::create(admin).await?;
    let dir = tempfile::tempdir()?;
    let mut config = sourced_server::Config::embedded(([127, 0, 0, 1], 0).into(), dir.path().join("unused.db"));
    config.store = sourced_server::StoreUrl::Postgres(schema.url(url));
    let outcome = async {
        let server = sourced_server::start(config).await?;
        let (result, start, end) = load::run(server.addr(), clients, timing, &[], || server.store_stats()).await?;
        server.shutdown().await;
        let store = StoreWindow {
            commits: end.value.commits - start.value.commits,
            appends: end.value.appends - start.value.appends,
            events: end.value.events - start.value.events,
            seconds: end.at.duration_since(start.at).as_secs_f64(),
        };
        anyhow::Ok((HttpMeasure::from_load(result, timing.duration.as_secs_f64()), store))
    }
    .await;
    schema.drop(admin).await;
    outcome
}

/// `clients` plain connections writing in a loop until the window ends.
async fn plain_load(url: &str, clients: usize, timing: Timing, what: Plain) -> anyhow::Result<PlainMeasure> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = connect(url).await?;
        if let Plain::MessageDb { .. } = what {
            client.batch_execute("SET search_path = message_store, public").await?;
        }
        connections.push(client);
    }
    let window_start = Instant::now() + timing.warmup;
    let window_end = window_start + timing.duration;
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(index, client)| tokio::spawn(plain_client(client, index, what, window_start, window_end)))
        .collect();
    let mut latencies = Vec::new();
    let mut measure = PlainMeasure { seconds: timing.duration.as_secs_f64(), ..PlainMeasure::default() };
    for task in tasks {
        let (mine, errors, sample) = task.await.context("a plain client panicked")?;
        measure.writes += mine.len() as u64;
        latencies.extend(mine);
        measure.errors += errors;
        if measure.error_sample.is_none() {
            measure.error_sample = sample;
        }
    }
    latencies.sort_unstable();
    measure.p50_ms = load::quantile(&latencies, 0.50) as f64 / 1e6;
    measure.p99_ms = load::quantile(&latencies, 0.99) as f64 / 1e6;
    Ok(measure)
}

/// One plain client: create a stream, write to it expecting version 1 (0 in Message DB's
/// numbering), repeat. Returns the window's latencies (ns), errors and a sample.
async fn plain_client(
    client: tokio_postgres::Client,
    index: usize,
    what: Plain,
    window_start: Instant,
    window_end: Instant,
) -> (Vec<u64>, u64, Option<String>) {
    let sql = match what {
        Plain::Ceiling => {
            "WITH p AS (SELECT nextval('bench_position') AS pos),
             e AS (INSERT INTO sourced_events (position, tenant, type, agg_id, version, event_id, event_type, data,
                                               metadata, ts)
                   SELECT pos, 'default', 'bench', $1, $2, $3, $4, $5::text::json, $6::text::json, now() FROM p),
             d AS (INSERT INTO sourced_documents (tenant, type, agg_id, version, state, deleted, created_at, updated_at)
                   VALUES ('default', 'bench', $1, $2, $7::text::json, false, now(), now())
                   ON CONFLICT (tenant, type, agg_id) DO UPDATE SET
                       version = excluded.version, state = excluded.state, updated_at = excluded.updated_at)
             INSERT INTO sourced_commands (tenant, command_id, fingerprint, type, agg_id, first_version, last_version,
                                           extra)
             VALUES ('default', $3, 'fingerprint', 'bench', $1, $2, $2, 'null')"
        }
        Plain::MessageDb { .. } => {
            "SELECT write_message($1::varchar, $2::varchar, $3::varchar, $4::text::jsonb, $5::text::jsonb, $6::bigint)"
        }
    };
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut sample = None;
    let statement = match client.prepare(sql).await {
        Ok(s) => s,
        Err(e) => return (latencies, 1, Some(e.to_string())),
    };
    'outer: for seq in 0..ITERATIONS_MAX {
        let id = workload::aggregate_id(index, seq);
        let document = String::from_utf8(workload::document(&id, seq)).expect("the workload is UTF-8");
        let patch = String::from_utf8(workload::patch(seq)).expect("the workload is UTF-8");
        for version in [1i64, 2] {
            if Instant::now() >= window_end || errors >= 100 {
                break 'outer;
            }
            let command = uuid::Uuid::new_v4();
            let metadata = format!(r#"{{"commandId":"{command}"}}"#);
            let data = if version == 1 { &document } else { &patch };
            let started = Instant::now();
            let outcome = match what {
                Plain::Ceiling => {
                    let event_type = if version == 1 { "created" } else { "patched" };
                    client
                        .execute(&statement, &[&id, &version, &command, &event_type, data, &metadata, &document])
                        .await
                }
                Plain::MessageDb { categories } => {
                    let category = (index + seq as usize) % categories;
                    let stream = if categories == 1 { format!("bench-{id}") } else { format!("bench{category}-{id}") };
                    let message_type = if version == 1 { "Created" } else { "Patched" };
                    // Message DB numbers from 0 and expects -1 for "no stream".
                    let expected = version - 2;
                    client
                        .execute(
                            &statement,
                            &[&command.to_string(), &stream, &message_type, &data, &metadata, &expected],
                        )
                        .await
                }
            };
            let finished = Instant::now();
            match outcome {
                Ok(_) if started >= window_start && finished <= window_end => {
                    latencies.push(u64::try_from(finished.duration_since(started).as_nanos()).unwrap_or(u64::MAX));
                }
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    sample.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    (latencies, errors, sample)
}

impl PgReport {
    /// HTTP errors, plain-client errors.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for row in &self.rows {
            if row.sourced.errors > 0 {
                problems.push(format!(
                    "{} clients, Sourced: {} failed requests, e.g. {}",
                    row.clients,
                    row.sourced.errors,
                    row.sourced.error_samples.join(" | ")
                ));
            }
            let mut plain = vec![("ceiling", &row.ceiling)];
            if let Some((many, one)) = &row.message_db {
                plain.push(("Message DB, many categories", many));
                plain.push(("Message DB, one category", one));
            }
            for (what, m) in plain {
                if m.errors > 0 {
                    problems.push(format!(
                        "{} clients, {what}: {} failed writes, e.g. {}",
                        row.clients,
                        m.errors,
                        m.error_sample.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        problems
    }

    /// The report as Markdown.
    pub fn to_markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "## Sourced benchmark on PostgreSQL\n");
        let _ = writeln!(out, "- machine: {} cores (nproc), {}, {}; {}", m.cores, m.cpu, m.os, self.server);
        let load = m.load_average.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "- date: {}; build: {}; load average at start: {load}", m.date, m.profile);
        let _ = writeln!(
            out,
            "- per measurement: {:.1} s warm-up, then {:.1} s measured; every write is one durable command \
             (create a stream, then one write to it with an expected version)",
            self.options.warmup.as_secs_f64(),
            self.options.duration.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "- Sourced: HTTP API in process, PostgreSQL backend, fresh schema per level; ceiling: the same three \
             rows per command from plain tokio-postgres clients, one statement per command, positions from a \
             sequence; Message DB: `write_message` with expected versions over {MESSAGE_DB_CATEGORIES} categories \
             and over 1\n"
        );
        let _ = writeln!(
            out,
            "| clients | Sourced cmd/s | p50 ms | p99 ms | commits/s | mean batch | ceiling cmd/s | ceiling p99 ms | \
             Message DB {MESSAGE_DB_CATEGORIES} cat. cmd/s | p99 ms | Message DB 1 cat. cmd/s | p99 ms | \
             Sourced/ceiling | Sourced/Message DB ({MESSAGE_DB_CATEGORIES} cat.) |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let batch = crate::optional_cell(row.store.mean_batch(), 2);
            let (many, one, vs_mdb) = match &row.message_db {
                Some((many, one)) => (
                    format!("{:.0} | {:.2}", many.per_sec(), many.p99_ms),
                    format!("{:.0} | {:.2}", one.per_sec(), one.p99_ms),
                    format!("{:.2}×", crate::ratio(row.sourced.per_sec(), many.per_sec())),
                ),
                None => ("– | –".to_owned(), "– | –".to_owned(), "–".to_owned()),
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {} | {:.0} | {:.2} | {} | {} | {:.0}% | {} |",
                row.clients,
                row.sourced.per_sec(),
                row.sourced.p50_ms,
                row.sourced.p99_ms,
                row.store.commits_per_sec(),
                batch,
                row.ceiling.per_sec(),
                row.ceiling.p99_ms,
                many,
                one,
                crate::ratio(row.sourced.per_sec(), row.ceiling.per_sec()) * 100.0,
                vs_mdb,
            );
        }
        if let Some(missing) = &self.message_db_missing {
            let _ = writeln!(
                out,
                "\nMessage DB was not measured: {missing}. Install it with `npm install @eventide/message-db` and \
                 `DATABASE_NAME={MESSAGE_DB_DATABASE} bash node_modules/@eventide/message-db/database/install.sh` \
                 (with PGHOST/PGUSER set)."
            );
        }
        crate::write_problems(&mut out, &self.problems());
        out
    }
}

/// A scratch schema `sourced_bench_<uuid>`.
pub(crate) struct Schema(String);

impl Schema {
    pub(crate) async fn create(admin: &tokio_postgres::Client) -> anyhow::Result<Schema> {
        let schema = format!("sourced_bench_{}", uuid::Uuid::new_v4().simple());
        admin.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
        Ok(Schema(schema))
    }

    pub(crate) fn url(&self, base: &str) -> String {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{}", self.0)
    }

    pub(crate) async fn drop(self, admin: &tokio_postgres::Client) {
        if let Err(e) = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0)).await {
            eprintln!("warning: the schema {} was not dropped: {e}", self.0);
        }
    }
}

pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let path_start = url[scheme_end..].find('/').map(|i| scheme_end + i);
    let query_start = url.find('?');
    match (path_start, query_start) {
        (Some(p), Some(q)) if p < q => format!("{}/{database}{}", &url[..p], &url[q..]),
        (Some(p), None) => format!("{}/{database}", &url[..p]),
        (_, Some(q)) => format!("{}/{database}{}", &url[..q], &url[q..]),
        (None, None) => format!("{url}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_message_db_url_names_its_database() {
        assert_eq!(with_database("postgres://u@h:5432/test", "m"), "postgres://u@h:5432/m");
        assert_eq!(with_database("postgres://u@h/test?x=1", "m"), "postgres://u@h/m?x=1");
        assert_eq!(with_database("postgres://u@h", "m"), "postgres://u@h/m");
    }
}
