//! The artifact benchmark (issue: artifacts): the example order domain's `submit` and `pay`
//! custom commands (payload schema, preconditions, CEL-computed patches, rules, lifecycle,
//! document schema) against plain generic patches of the same size on a type without
//! artifacts, over HTTP at the same concurrency, in one run.
//!
//! Each client loops: create an order; then `submit`, `pay` (artifact path) or two JSON Patches
//! writing the same fields (plain path). Throughput counts every command; latencies are of
//! the last step (`pay` or its plain twin).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::json;
use sourced_client::Client;

use crate::load::quantile;

/// What to run.
#[derive(Clone, Debug)]
pub struct DomainOptions {
    /// Concurrency levels.
    pub clients: Vec<usize>,
    /// Measured seconds per path and level.
    pub duration: Duration,
    /// The example artifact set (`examples/order`).
    pub artifacts: PathBuf,
}

/// One path at one concurrency level.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathMeasure {
    /// Commands per second (creates included).
    pub per_sec: f64,
    /// Median latency of the last step, in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile of the last step, in nanoseconds.
    pub p99_ns: u64,
}

/// Runs both paths at each level; returns the Markdown table.
pub fn run_domain(options: &DomainOptions) -> anyhow::Result<String> {
    ensure!(
        options.artifacts.is_dir(),
        "{} is not a directory (the example order domain)",
        options.artifacts.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut out = String::new();
        writeln!(out, "### Custom commands with artifacts vs plain patches (HTTP, embedded store, {:.1} s per cell)\n", options.duration.as_secs_f64())?;
        writeln!(out, "| clients | artifacts cmd/s | plain cmd/s | artifacts / plain | `pay` p50 | `pay` p99 | plain patch p50 | plain patch p99 |")?;
        writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for &clients in &options.clients {
            let artifacts = measure(Some(&options.artifacts), clients, options.duration).await?;
            let plain = measure(None, clients, options.duration).await?;
            writeln!(
                out,
                "| {clients} | {:.0} | {:.0} | **{:.0}%** | {} | {} | {} | {} |",
                artifacts.per_sec,
                plain.per_sec,
                100.0 * artifacts.per_sec / plain.per_sec.max(1e-9),
                ms(artifacts.p50_ns),
                ms(artifacts.p99_ns),
                ms(plain.p50_ns),
                ms(plain.p99_ns)
            )?;
        }
        Ok(out)
    })
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

/// One path on a fresh server and store.
async fn measure(artifacts: Option<&PathBuf>, clients: usize, duration: Duration) -> anyhow::Result<PathMeasure> {
    let dir = tempfile::tempdir()?;
    let mut config = sourced_server::Config::embedded("127.0.0.1:0".parse()?, dir.path().join("domain.db"));
    config.artifacts = artifacts.map(|a| sourced_server::artifacts::ArtifactsSource::Dir(a.clone()));
    let server = sourced_server::start(config).await?;
    let addr = server.addr();
    let end = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(client_loop(addr, c, artifacts.is_some(), end))).collect();
    let mut commands = 0u64;
    let mut last_step = Vec::new();
    for t in tasks {
        let (n, samples) = t.await.context("a client panicked")??;
        commands += n;
        last_step.extend(samples);
    }
    let elapsed = started.elapsed().as_secs_f64();
    server.shutdown().await;
    last_step.sort_unstable();
    Ok(PathMeasure {
        per_sec: commands as f64 / elapsed,
        p50_ns: quantile(&last_step, 0.5),
        p99_ns: quantile(&last_step, 0.99),
    })
}

async fn client_loop(
    addr: SocketAddr,
    client: usize,
    artifacts: bool,
    end: Instant,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut http = Client::connect(addr).await?;
    let ty = if artifacts { "order" } else { "plain" };
    let (mut commands, mut samples) = (0u64, Vec::new());
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        let id = format!("c{client}-{seq}");
        let doc = json!({
            "id": id, "customer": "ada", "status": "draft", "total": 8.5,
            "lines": [{"sku": "tea", "qty": 2, "price": 4.25}]
        });
        let r = http.send_json("POST", &format!("/{ty}"), &[], &doc).await?;
        ensure!(r.status == 201, "create answered {}: {}", r.status, r.text());
        let steps: [(String, &str, serde_json::Value); 2] = if artifacts {
            [
                (format!("/order/{id}/submit"), "application/json", json!({})),
                (format!("/order/{id}/pay"), "application/json", json!({"amount": 8.5})),
            ]
        } else {
            [
                (
                    format!("/plain/{id}"),
                    "application/json-patch+json",
                    json!([{"op": "replace", "path": "/status", "value": "submitted"},
                           {"op": "add", "path": "/submittedAt", "value": "2026-11-27T12:00:00Z"}]),
                ),
                (
                    format!("/plain/{id}"),
                    "application/json-patch+json",
                    json!([{"op": "replace", "path": "/status", "value": "paid"},
                           {"op": "add", "path": "/paidAmount", "value": 8.5}]),
                ),
            ]
        };
        for (i, (path, media, body)) in steps.iter().enumerate() {
            let method = if artifacts { "POST" } else { "PATCH" };
            let body = body.to_string();
            let started = Instant::now();
            let r = http.request(method, path, &[("content-type", media)], Some(body.as_bytes())).await?;
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            ensure!(r.status == 200, "{method} {path} answered {}: {}", r.status, r.text());
            if i == 1 {
                samples.push(took);
            }
        }
        commands += 3;
    }
    Ok((commands, samples))
}
