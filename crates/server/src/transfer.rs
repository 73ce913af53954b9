//! The `sourced export`, `import` and `rebuild` commands: the configured store opened, the
//! engine's transfer or rebuild run on it (`sourced_engine::transfer`, `sourced_engine::rebuild`),
//! the store closed.

use std::path::Path;

use anyhow::Context as _;

pub use sourced_engine::transfer::{IMPORTED_FINGERPRINT, ImportSummary, TransferError, export, import};

use crate::{Config, open_store};

/// `sourced export`: the configured store to `output` (a file, created or truncated) or stdout.
pub async fn run_export(config: &Config, output: Option<&Path>) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let result = async {
        let count = match output {
            Some(path) => {
                let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
                export(store.as_ref(), &mut std::io::BufWriter::new(file)).await?
            }
            None => export(store.as_ref(), &mut std::io::BufWriter::new(std::io::stdout().lock())).await?,
        };
        tracing::info!(events = count, "exported");
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}

/// `sourced rebuild`: the read model and snapshots of the configured store, made again from
/// its events; progress on stderr every few seconds, and a summary at the end.
pub async fn run_rebuild(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let mut last_report = std::time::Instant::now();
    let result = sourced_engine::rebuild::rebuild(store.as_ref(), config.snapshot_every, |p| {
        if last_report.elapsed() >= std::time::Duration::from_secs(2) {
            last_report = std::time::Instant::now();
            eprintln!(
                "sourced rebuild: {} streams, {} events ({:.0} events/s)",
                p.streams,
                p.events,
                p.events_per_second()
            );
        }
    })
    .await;
    store.close().await;
    let done = result.context("the rebuild failed; run it again to finish")?;
    eprintln!(
        "sourced rebuild: done: {} streams, {} events, {} snapshots in {:.1} s ({:.0} events/s)",
        done.streams,
        done.events,
        done.snapshots,
        done.elapsed.as_secs_f64(),
        done.events_per_second()
    );
    Ok(())
}

/// `sourced import`: `input` (a file) or stdin into the configured store, which must be empty.
pub async fn run_import(config: &Config, input: Option<&Path>) -> anyhow::Result<()> {
    // The input first: a mistyped file name must not create an empty store.
    let file = match input {
        Some(path) => Some(std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?),
        None => None,
    };
    let store = open_store(config).await?;
    let result = async {
        let summary = match file {
            Some(file) => import(store.as_ref(), std::io::BufReader::new(file), config.snapshot_every).await?,
            None => import(store.as_ref(), std::io::stdin().lock(), config.snapshot_every).await?,
        };
        tracing::info!(events = summary.events, commands = summary.commands, "imported");
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}
