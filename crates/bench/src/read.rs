//! The read-side benchmark (issue: queries, time travel and snapshots): command cost by
//! stream length with and without snapshots, rebuild rate, GET by id against the HTTP floor,
//! and a filtered list over a large read model with a declared index, on the embedded store
//! and (with `--postgres`) on PostgreSQL. Prints one Markdown table per part.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use sourced_client::Client;
use sourced_core::{
    AggregateId, Command, CommandId, EnvelopeDefaults, ExpectedVersion, NewEvent, StreamKey, TenantId, TypeName,
    Version,
};
use sourced_engine::{Engine, EngineConfig, SystemClock};
use sourced_store::{AppendOutcome, AppendRequest, CommandWrite, DocumentWrite, EventStore};

use crate::floor::FloorServer;
use crate::load::quantile;

/// What to run.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Stream lengths for the command-cost rows.
    pub lengths: Vec<u64>,
    /// Commands timed per stream length and mode.
    pub commands: usize,
    /// Aggregates in the filtered-list read model.
    pub list_rows: usize,
    /// Queries timed on the filtered list.
    pub list_queries: usize,
    /// Clients of the GET load.
    pub get_clients: usize,
    /// Measured seconds of the GET load (and its floor).
    pub get_duration: Duration,
    /// Also run the filtered list on PostgreSQL at this URL (a scratch schema, dropped after).
    pub postgres: Option<String>,
}

impl ReadOptions {
    /// The full run of the issue: streams of 10 to 100 000 events, 1 000 000 listed aggregates.
    pub fn full() -> ReadOptions {
        ReadOptions {
            lengths: vec![10, 1_000, 10_000, 100_000],
            commands: 30,
            list_rows: 1_000_000,
            list_queries: 300,
            get_clients: 64,
            get_duration: Duration::from_secs(5),
            postgres: None,
        }
    }

    /// A tiny run that only checks that every path works.
    pub fn smoke() -> ReadOptions {
        ReadOptions {
            lengths: vec![10, 300],
            commands: 3,
            list_rows: 2_000,
            list_queries: 10,
            get_clients: 2,
            get_duration: Duration::from_millis(300),
            postgres: None,
        }
    }
}

/// Events between snapshots in the "with snapshots" rows.
const SNAPSHOT_EVERY: u64 = 100;
/// Distinct customers in the listed read model (each filter matches rows / this).
const CUSTOMERS: usize = 10_000;
/// Aggregates appended concurrently while filling the read model.
const FILL_IN_FLIGHT: usize = 512;

/// Runs the read-side benchmark; returns its Markdown.
pub fn run_read(options: &ReadOptions) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_async(options))
}

async fn run_async(options: &ReadOptions) -> anyhow::Result<String> {
    let mut out = String::new();
    let dir = tempfile::tempdir()?;

    // 1. Command cost by stream length, and the rebuild rate.
    let store: Arc<dyn EventStore> =
        Arc::new(sourced_store::sqlite::SqliteStore::open(&dir.path().join("streams.db"), Default::default())?);
    for &n in &options.lengths {
        fill_stream(store.as_ref(), &stream_key(n), n).await?;
    }
    let rebuilt = sourced_engine::rebuild::rebuild(store.as_ref(), SNAPSHOT_EVERY, |_| {}).await?;
    let mut rows = Vec::new();
    for &n in &options.lengths {
        let mut row = (n, 0, 0, 0, 0);
        for snapshots in [false, true] {
            let engine = Engine::new(
                store.clone(),
                EngineConfig {
                    cache_aggregates_max: 0,
                    snapshot_every: if snapshots { SNAPSHOT_EVERY } else { 0 },
                    ..EngineConfig::default()
                },
                Arc::new(SystemClock),
            );
            // Without snapshots the longest streams take seconds per command: fewer samples.
            let count = if snapshots || n <= 10_000 { options.commands } else { options.commands.min(5) };
            let (p50, p99) = time_commands(&engine, &stream_key(n), count).await?;
            if snapshots {
                (row.3, row.4) = (p50, p99);
            } else {
                (row.1, row.2) = (p50, p99);
            }
        }
        rows.push(row);
    }
    store.close().await;
    let base = rows.first().map_or(1, |r| r.3.max(1));
    writeln!(out, "### A command on an aggregate of N events (embedded store, aggregate cache off)\n")?;
    writeln!(
        out,
        "| events | p50 no snapshots | p99 no snapshots | p50 snapshots every {SNAPSHOT_EVERY} | p99 snapshots | p50 vs {} events |",
        rows.first().map_or(0, |r| r.0)
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    for (n, p50, p99, s50, s99) in &rows {
        writeln!(
            out,
            "| {n} | {} | {} | {} | {} | {:.2}× |",
            ms(*p50),
            ms(*p99),
            ms(*s50),
            ms(*s99),
            *s50 as f64 / base as f64
        )?;
    }
    writeln!(
        out,
        "\nRebuild: {} streams, {} events, {} snapshots in {:.2} s: **{:.0} events/s**.\n",
        rebuilt.streams,
        rebuilt.events,
        rebuilt.snapshots,
        rebuilt.elapsed.as_secs_f64(),
        rebuilt.events_per_second()
    )?;

    // 2. GET by id against the floor, then the filtered list, on the embedded store.
    let config = sourced_server::Config {
        indexes: vec![sourced_core::query::FieldPath::parse("customer.id").expect("a field path")],
        ..sourced_server::Config::embedded("127.0.0.1:0".parse()?, dir.path().join("list.db"))
    };
    let server = sourced_server::start(config).await?;
    let fill = fill_documents(server.store().as_ref(), options.list_rows).await?;
    let floor = FloorServer::start().await?;
    let floor_get = get_load(floor.addr(), options.get_clients, options.get_duration, options.list_rows).await?;
    floor.shutdown().await?;
    let sourced_get = get_load(server.addr(), options.get_clients, options.get_duration, options.list_rows).await?;
    writeln!(out, "### GET by id ({} clients, {:.1} s)\n", options.get_clients, options.get_duration.as_secs_f64())?;
    writeln!(out, "| server | req/s | p50 | p99 |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for (name, m) in [("HTTP floor (fixed document)", &floor_get), ("Sourced (read model)", &sourced_get)] {
        writeln!(out, "| {name} | {:.0} | {} | {} |", m.0, ms(m.1), ms(m.2))?;
    }
    writeln!(out, "\nSourced / floor: **{:.0}%**.\n", 100.0 * sourced_get.0 / floor_get.0.max(1.0))?;
    let mut lists = vec![(
        "embedded (SQLite)".to_owned(),
        fill,
        list_load(server.addr(), options.list_queries, options.list_rows).await?,
    )];
    server.shutdown().await;

    // 3. The same list on PostgreSQL.
    if let Some(url) = &options.postgres {
        let admin = crate::postgres::connect(url).await.context("cannot connect to --postgres")?;
        let schema = crate::postgres::Schema::create(&admin).await?;
        let result = async {
            let config = sourced_server::Config {
                store: sourced_server::config::parse_store_url(&schema.url(url))?,
                ..sourced_server::Config::embedded("127.0.0.1:0".parse()?, dir.path().join("unused.db"))
            };
            // The index after the fill (as a user adds one to a grown store), then statistics.
            let server = sourced_server::start(config.clone()).await?;
            let fill = fill_documents(server.store().as_ref(), options.list_rows).await?;
            server.shutdown().await;
            let client = crate::postgres::connect(&schema.url(url)).await?;
            let config = sourced_server::Config {
                indexes: vec![sourced_core::query::FieldPath::parse("customer.id").expect("a field path")],
                ..config
            };
            let server = sourced_server::start(config).await?;
            client.batch_execute("ANALYZE sourced_documents").await?;
            let list = list_load(server.addr(), options.list_queries, options.list_rows).await?;
            server.shutdown().await;
            anyhow::Ok((fill, list))
        }
        .await;
        schema.drop(&admin).await;
        let (fill, list) = result?;
        lists.push(("PostgreSQL".to_owned(), fill, list));
    }
    writeln!(out, "### Filtered list: `GET /item?customer.id=cN&limit=50`, index on customer.id, 1 client\n")?;
    writeln!(out, "| store | aggregates | fill rate (aggregates/s) | rows per answer | p50 | p99 |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (name, fill, (rows_per, p50, p99)) in &lists {
        writeln!(
            out,
            "| {name} | {} | {:.0} | {rows_per:.0} | {} | {} |",
            options.list_rows,
            fill,
            ms(*p50),
            ms(*p99)
        )?;
    }
    Ok(out)
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

fn tenant() -> TenantId {
    TenantId::parse("default").expect("a tenant")
}

fn stream_key(n: u64) -> StreamKey {
    StreamKey {
        tenant: tenant(),
        type_name: TypeName::parse("counter").expect("a type"),
        id: AggregateId::parse(&format!("s{n}")).expect("an id"),
    }
}

/// A stream of `n` events written straight to the store: a create, then one-op patches,
/// in appends of up to 1 000 events.
async fn fill_stream(store: &dyn EventStore, key: &StreamKey, n: u64) -> anyhow::Result<()> {
    let mut version = 0u64;
    while version < n {
        let count = (n - version).min(1_000);
        let command = CommandId(uuid::Uuid::new_v4());
        let events = (0..count)
            .map(|i| {
                let v = version + i;
                let (event_type, data) = if v == 0 {
                    ("created", json!({"n": 0, "tags": ["a", "b"], "note": "x".repeat(100)}))
                } else {
                    ("patched", json!([{"op": "replace", "path": "/n", "value": v}]))
                };
                NewEvent {
                    id: command.event_id(i as usize),
                    event_type: event_type.into(),
                    data,
                    metadata: json!({"commandId": command.to_string()}),
                }
            })
            .collect();
        version += count;
        let request = AppendRequest {
            key: key.clone(),
            expected: if version == count {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(Version(version - count))
            },
            events,
            timestamp: chrono::Utc::now(),
            document: DocumentWrite {
                state: json!({"n": version - 1, "tags": ["a", "b"], "note": "x".repeat(100)}),
                deleted: false,
            },
            command: CommandWrite { id: command, fingerprint: String::new(), extra: Value::Null },
            snapshot: None,
            checkpoint: None,
            wake: None,
        };
        ensure!(matches!(store.append(request).await?, AppendOutcome::Appended(_)), "the fill append was refused");
    }
    Ok(())
}

/// `count` patches on one aggregate, one after the other; their p50 and p99 in nanoseconds.
async fn time_commands(engine: &Engine, key: &StreamKey, count: usize) -> anyhow::Result<(u64, u64)> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let envelope = json!({
            "type": "patch",
            "name": "aggregate-modification",
            "tenant": key.tenant.as_str(),
            "targetName": key.type_name.as_str(),
            "targetId": key.id.as_str(),
            "body": [{"op": "replace", "path": "/note", "value": format!("c{i}-{}", uuid::Uuid::new_v4())}],
        });
        let defaults = EnvelopeDefaults {
            tenant: tenant(),
            tenant_fixed: false,
            generated_id: AggregateId::parse("unused").expect("an id"),
            generated_command_id: sourced_engine::fresh::command_id(),
        };
        let command = Command::from_envelope_value(envelope, defaults).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        engine.execute(command, None).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    samples.sort_unstable();
    Ok((quantile(&samples, 0.5), quantile(&samples, 0.99)))
}

fn item_id(i: usize) -> String {
    format!("i{i:07}")
}

/// `rows` aggregates of type `item`, each with a customer among [`CUSTOMERS`], written
/// straight to the store; returns aggregates written per second.
async fn fill_documents(store: &dyn EventStore, rows: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let ty = TypeName::parse("item").expect("a type");
    let mut next = 0;
    while next < rows {
        let end = (next + FILL_IN_FLIGHT).min(rows);
        let appends = (next..end).map(|i| {
            let command = CommandId(uuid::Uuid::new_v4());
            let state = json!({
                "customer": {"id": format!("c{}", i % CUSTOMERS), "name": "Ada"},
                "status": (["draft", "paid", "shipped"][i % 3]),
                "total": i % 1_000,
                "lines": [{"sku": "a", "qty": 1}],
            });
            let request = AppendRequest {
                key: StreamKey {
                    tenant: tenant(),
                    type_name: ty.clone(),
                    id: AggregateId::parse(&item_id(i)).expect("an id"),
                },
                expected: ExpectedVersion::NoStream,
                events: vec![NewEvent {
                    id: command.event_id(0),
                    event_type: "created".into(),
                    data: state.clone(),
                    metadata: json!({"commandId": command.to_string()}),
                }],
                timestamp: chrono::Utc::now(),
                document: DocumentWrite { state, deleted: false },
                command: CommandWrite { id: command, fingerprint: String::new(), extra: Value::Null },
                snapshot: None,
                checkpoint: None,
                wake: None,
            };
            store.append(request)
        });
        for outcome in futures_util::future::join_all(appends).await {
            ensure!(matches!(outcome?, AppendOutcome::Appended(_)), "a fill append was refused");
        }
        next = end;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// `clients` clients GETting random existing aggregates for `duration`; req/s, p50, p99.
async fn get_load(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    rows: usize,
) -> anyhow::Result<(f64, u64, u64)> {
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await?;
                let mut samples = Vec::new();
                let mut i = c * 7_919;
                while Instant::now() < end {
                    i = (i + 104_729) % rows;
                    let started = Instant::now();
                    let r = client.get(&format!("/item/{}", item_id(i))).await?;
                    ensure!(r.status == 200, "GET answered {}", r.status);
                    samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((all.len() as f64 / elapsed, quantile(&all, 0.5), quantile(&all, 0.99)))
}

/// `queries` filtered lists, one after the other; mean rows per answer, p50, p99.
async fn list_load(addr: SocketAddr, queries: usize, rows: usize) -> anyhow::Result<(f64, u64, u64)> {
    let mut client = Client::connect(addr).await?;
    let customers = CUSTOMERS.min(rows);
    let mut samples = Vec::with_capacity(queries);
    let mut returned = 0usize;
    for q in 0..queries {
        let customer = (q * 7_919) % customers;
        let started = Instant::now();
        let r = client.get(&format!("/item?customer.id=c{customer}&limit=50")).await?;
        samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        ensure!(r.status == 200, "the list answered {}: {}", r.status, r.text());
        let items = r.json()["items"].as_array().map_or(0, Vec::len);
        ensure!(items > 0, "the list of customer c{customer} is empty");
        returned += items;
    }
    samples.sort_unstable();
    Ok((returned as f64 / queries.max(1) as f64, quantile(&samples, 0.5), quantile(&samples, 0.99)))
}
