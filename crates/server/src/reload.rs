//! Reloading the artifact set while serving (SPEC §4, issue 5): on `SIGHUP` and on
//! `POST /admin/reload` the set is read again from its source (a git source is fetched and
//! checked out again) and swapped into the engine whole; a broken set leaves the running one in
//! place and every problem is logged (and returned to the admin endpoint's caller).

use std::sync::Arc;

use serde_json::{Value, json};
use sourced_core::artifacts::ArtifactSet;
use sourced_core::artifacts::expr::ExprLimits;
use sourced_engine::Engine;
use sourced_engine::process::Runners;

use crate::artifacts::{self, ArtifactsSource, LoadError, Loaded};

/// The artifact source of a running server and the engine whose set it replaces.
pub struct Reloader {
    source: Option<ArtifactsSource>,
    limits: ExprLimits,
    engine: Engine,
    /// Started for the processes a reload adds.
    runners: Arc<Runners>,
    /// One reload at a time: two would race on the git working tree.
    running: tokio::sync::Mutex<()>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// `ARTIFACTS` is not set.
    #[error("ARTIFACTS is not set: there is no artifact set to reload")]
    NoSource,
    /// The new set could not be read or has problems; the old one stays.
    #[error("{source_name}: {error}; the previous set stays loaded")]
    Load {
        /// `ARTIFACTS` as configured.
        source_name: String,
        /// What failed.
        error: LoadError,
    },
    /// The loading task died (a bug).
    #[error("the reload task failed: {0}")]
    Task(String),
}

impl Reloader {
    /// A reloader of `source` into `engine`.
    pub fn new(source: Option<ArtifactsSource>, limits: ExprLimits, engine: Engine, runners: Arc<Runners>) -> Self {
        Self { source, limits, engine, runners, running: tokio::sync::Mutex::new(()) }
    }

    /// Reads the set again and swaps it in whole, or changes nothing. Every outcome is
    /// logged: the new set's summary, or each problem.
    pub async fn reload(&self) -> Result<Value, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        let Some(source) = self.source.clone() else {
            tracing::warn!("reload asked for, but ARTIFACTS is not set: nothing to reload");
            return Err(ReloadError::NoSource);
        };
        let source_name = source.to_string();
        let limits = self.limits;
        let loaded = tokio::task::spawn_blocking(move || artifacts::load(&source, &limits))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))?;
        match loaded {
            Ok(Loaded { set, origin, stale }) => {
                if let Some(why) = &stale {
                    tracing::warn!(artifacts = %source_name, error = %why, "git fetch failed: reloaded the cached checkout");
                }
                let summary = summary(&set, &origin, stale.as_deref());
                // The new set's indexes before the set: its lists are fast from the first.
                let fields = set.indexed_fields();
                if !fields.is_empty() {
                    match self.engine.ensure_indexes(&fields).await {
                        Ok(names) => {
                            tracing::info!(indexes = ?names, "read-model indexes of the artifact set in place")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the artifact set's indexes could not be created; lists work without them")
                        }
                    }
                }
                // The checkpoints of the processes it adds before the swap: they hear every
                // event committed under the new set. Should the store fail here, a runner's
                // first round sets it (at the head then).
                if let Err(e) = self.runners.anchor(&set).await {
                    tracing::error!(error = %e, "the new processes' first checkpoints could not be set");
                }
                self.engine.set_artifacts(Arc::new(set));
                self.runners.sync();
                tracing::info!(artifacts = %origin, summary = %summary, "artifact set reloaded");
                metrics::counter!("sourced_artifact_reloads_total", "outcome" => "ok").increment(1);
                Ok(summary)
            }
            Err(error) => {
                if let LoadError::Problems(problems) = &error {
                    for p in problems {
                        tracing::error!(artifacts = %source_name, problem = %p, "artifact set problem");
                    }
                }
                tracing::error!(artifacts = %source_name, error = %error, "reload refused: the previous set stays loaded");
                metrics::counter!("sourced_artifact_reloads_total", "outcome" => "refused").increment(1);
                Err(ReloadError::Load { source_name, error })
            }
        }
    }
}

/// What a set holds, for logs and the admin endpoint: its types with their custom commands.
pub fn summary(set: &ArtifactSet, origin: &str, stale: Option<&str>) -> Value {
    let types: Vec<Value> = set
        .types()
        .map(|(name, a)| {
            json!({
                "name": name.as_str(),
                "schema": a.schema.is_some(),
                "commands": a.commands.keys().collect::<Vec<_>>(),
                "rules": a.rules.len(),
                "lifecycle": a.lifecycle.is_some(),
                "indexes": a.indexes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let commands: usize = set.types().map(|(_, a)| a.commands.len()).sum();
    json!({"origin": origin, "types": types, "typeCount": types.len(), "commandCount": commands, "staleBecause": stale})
}
