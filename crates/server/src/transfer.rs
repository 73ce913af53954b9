//! The `sourced export`, `import` and `rebuild` commands: the configured store opened, the
//! engine's transfer or rebuild run on it (`sourced_engine::transfer`, `sourced_engine::rebuild`),
//! the store closed. Each shows its progress (`progress.rs`) and ends with one summary line.

use std::path::Path;

use anyhow::Context as _;

pub use sourced_engine::transfer::{IMPORTED_FINGERPRINT, ImportSummary, TransferError, export, export_with, import};

use crate::progress::{Bar, Unit, rate};
use crate::{Config, open_store};

/// `sourced export`: the configured store to `output` (a file, created or truncated) or stdout.
pub async fn run_export(config: &Config, output: Option<&Path>) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let result = async {
        let head = store.head().await?;
        let bar = Bar::new(Some(head.0), Unit::Events);
        let mut moved = |n: u64| bar.set(n);
        let count = match output {
            Some(path) => {
                let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
                export_with(store.as_ref(), &mut std::io::BufWriter::new(file), &mut moved).await?
            }
            None => {
                export_with(store.as_ref(), &mut std::io::BufWriter::new(std::io::stdout().lock()), &mut moved).await?
            }
        };
        let secs = bar.seconds();
        bar.finish(&format!("sourced export: {count} events in {secs:.1} s ({} events/s)", rate(count, secs)));
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}

/// `sourced rebuild`: the read model and snapshots of the configured store, made again from
/// its events.
pub async fn run_rebuild(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let head = store.head().await.ok().map(|p| p.0);
    let bar = Bar::new(head, Unit::Events);
    let result = sourced_engine::rebuild::rebuild(store.as_ref(), config.snapshot_every, |p| bar.set(p.events)).await;
    store.close().await;
    let done = result.context("the rebuild failed; run it again to finish")?;
    bar.finish(&format!(
        "sourced rebuild: {} streams, {} events, {} snapshots in {:.1} s ({:.0} events/s)",
        done.streams,
        done.events,
        done.snapshots,
        done.elapsed.as_secs_f64(),
        done.events_per_second()
    ));
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
        // A file's size is known: the bar counts its bytes; stdin's is not: a spinner.
        let len = file.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len());
        let bar = Bar::new(len, Unit::Bytes);
        let summary = match file {
            Some(file) => {
                import(store.as_ref(), std::io::BufReader::new(bar.wrap(file)), config.snapshot_every).await?
            }
            None => {
                import(store.as_ref(), std::io::BufReader::new(bar.wrap(std::io::stdin())), config.snapshot_every)
                    .await?
            }
        };
        let secs = bar.seconds();
        bar.finish(&format!(
            "sourced import: {} events of {} commands in {secs:.1} s ({} events/s)",
            summary.events,
            summary.commands,
            rate(summary.events, secs)
        ));
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    result
}
