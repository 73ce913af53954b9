//! `GET /metrics` (SPEC §9): Prometheus' text format, through the `metrics` facade and its
//! Prometheus exporter.
//!
//! The recorder is the process's (installed by the first [`crate::start`]); every crate
//! records through the facade's macros (the store its commits, the server its requests and
//! commands), and gauges of live state are set when a scrape renders. Labels are bounded:
//! route templates, never paths or ids; methods outside the standard ones are `other`; types
//! are those of the artifact set plus at most [`METRIC_TYPES_MAX`] others seen, the rest
//! `(other)`; custom command names only when the set defines them.
//!
//! The metrics (all prefixed `sourced_`):
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `http_requests_total` | counter | `route`, `method`, `status` |
//! | `http_request_seconds` | histogram | `route`, `method` (to the response head) |
//! | `commands_total` | counter | `type`, `name`, `outcome` |
//! | `command_seconds` | histogram | `type`, `outcome` (received → acknowledged) |
//! | `store_batch_appends` | histogram | `backend` (appends per commit) |
//! | `store_commit_seconds` | histogram | `backend` |
//! | `store_batch_failures_total` | counter | `backend` |
//! | `live_connections`, `sse_streams` | gauge | — |
//! | `slow_clients_closed_total`, `subscription_lag_recoveries_total` | counter | — |
//! | `store_head_position` | gauge | — |
//! | `subscriptions` | gauge | — (live subscriptions: WebSocket, SSE, the engine's own) |
//! | `subscriber_backlog_events` | gauge | — (the slowest subscription's events not yet taken from the live buffer) |
//! | `artifact_reloads_total` | counter | `outcome` (`ok`, `refused`) |
//! | `artifact_set_types` | gauge | — |

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ::metrics::{counter, gauge, histogram};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use sourced_core::artifacts::ArtifactSet;
use sourced_core::{Command, CommandKind};
use sourced_engine::{CommandOutcome, EngineError};

use crate::problem::Problem;
use crate::request::Caller;
use crate::state::AppState;

pub use crate::limits::METRIC_TYPES_MAX;

/// Upper bounds of the latency histograms, in seconds.
const SECONDS_BUCKETS: &[f64] =
    &[0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds of the batch-size histogram.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder once (upkeep every 5 s); `None` when another recorder was
/// installed first (Sourced embedded in a program that has its own).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_appends".into()), BATCH_BUCKETS));
            let handle = match builder.map(PrometheusBuilder::install_recorder) {
                Ok(Ok(handle)) => handle,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(error = %e, "no metrics: a recorder is installed already");
                    return None;
                }
            };
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| tracing::warn!(error = %e, "cannot start the metrics upkeep"))
                .ok();
            Some(handle)
        })
        .as_ref()
}

/// `GET /metrics`: with authentication on, the `admin` action (a scraper sends its bearer
/// token); the text format 0.0.4.
pub(crate) async fn serve(State(state): State<AppState>, caller: Caller) -> Response {
    if let Err(p) = caller.allow_admin() {
        return p.into_response();
    }
    let Some(handle) = install() else {
        return Problem::metrics_unavailable().into_response();
    };
    let live = &state.live;
    use std::sync::atomic::Ordering::Relaxed;
    gauge!("sourced_live_connections").set(live.connections.load(Relaxed) as f64);
    gauge!("sourced_sse_streams").set(live.sse_streams.load(Relaxed) as f64);
    counter!("sourced_slow_clients_closed_total").absolute(live.slow_clients_closed.load(Relaxed));
    counter!("sourced_subscription_lag_recoveries_total").absolute(live.subscription_lag_recoveries.load(Relaxed));
    if let Ok(head) = state.engine.head().await {
        gauge!("sourced_store_head_position").set(head.0 as f64);
    }
    gauge!("sourced_subscriptions").set(state.engine.hub().receivers() as f64);
    gauge!("sourced_subscriber_backlog_events").set(state.engine.hub().backlog() as f64);
    gauge!("sourced_artifact_set_types").set(state.engine.artifacts().types().count() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

/// The method as a label: the standard ones by name, any other `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts every request by route template, method and status, and times it to
/// its response head.
pub(crate) async fn track_http(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    histogram!("sourced_http_request_seconds", "route" => route.clone(), "method" => method)
        .record(started.elapsed().as_secs_f64());
    counter!("sourced_http_requests_total", "route" => route, "method" => method, "status" => status).increment(1);
    res
}

/// Types seen outside the artifact set, as labels (at most [`METRIC_TYPES_MAX`]).
static OTHER_TYPES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn type_label(set: &ArtifactSet, cmd: &Command) -> String {
    let name = cmd.key.type_name.as_str();
    if set.for_type(&cmd.key.type_name).is_some() {
        return name.to_owned();
    }
    let mut seen = OTHER_TYPES.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(name) || (seen.len() < METRIC_TYPES_MAX && seen.insert(name.to_owned())) {
        return name.to_owned();
    }
    "(other)".to_owned()
}

fn name_label(set: &ArtifactSet, cmd: &Command) -> String {
    match cmd.kind {
        CommandKind::Create => "create".into(),
        CommandKind::Patch => "patch".into(),
        CommandKind::MergePatch => "merge-patch".into(),
        CommandKind::Replace => "replace".into(),
        CommandKind::Delete => "delete".into(),
        CommandKind::Logic | CommandKind::Orchestration => {
            let defined = set.for_type(&cmd.key.type_name).is_some_and(|t| t.commands.contains_key(&cmd.name));
            if defined { cmd.name.clone() } else { "(unknown)".into() }
        }
    }
}

/// What became of a command, as a label.
fn outcome_label(result: &Result<Result<CommandOutcome, EngineError>, Problem>) -> &'static str {
    match result {
        Ok(Ok(_)) => "ok",
        Ok(Err(EngineError::Domain(_))) => "rejected",
        Ok(Err(EngineError::Conflict { .. })) => "conflict",
        Ok(Err(EngineError::IdempotencyMismatch { .. })) => "idempotency-mismatch",
        Ok(Err(EngineError::VersionRequired)) => "version-required",
        Ok(Err(EngineError::Store(sourced_store::StoreError::Unavailable(_)))) => "unavailable",
        Ok(Err(_)) => "error",
        Err(_) => "forbidden",
    }
}

/// Records one command: its labels come from `cmd` before it ran, its outcome after.
pub(crate) struct CommandTimer {
    type_label: String,
    name_label: String,
    started: Instant,
}

impl CommandTimer {
    pub(crate) fn start(set: &ArtifactSet, cmd: &Command) -> CommandTimer {
        CommandTimer { type_label: type_label(set, cmd), name_label: name_label(set, cmd), started: Instant::now() }
    }

    pub(crate) fn finish(self, result: &Result<Result<CommandOutcome, EngineError>, Problem>) {
        let outcome = outcome_label(result);
        histogram!("sourced_command_seconds", "type" => self.type_label.clone(), "outcome" => outcome)
            .record(self.started.elapsed().as_secs_f64());
        counter!("sourced_commands_total", "type" => self.type_label, "name" => self.name_label, "outcome" => outcome)
            .increment(1);
    }
}

/// The HELP lines of the metrics.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("sourced_http_requests_total", "HTTP requests by route template, method and status.");
    describe_histogram!("sourced_http_request_seconds", "Time to the response head, by route template and method.");
    describe_counter!("sourced_commands_total", "Commands by aggregate type, command name and outcome.");
    describe_histogram!("sourced_command_seconds", "Command latency, received to acknowledged, by type and outcome.");
    describe_histogram!("sourced_store_batch_appends", "Appends per commit of the store's writer, by backend.");
    describe_histogram!("sourced_store_commit_seconds", "Duration of one commit of the store's writer, by backend.");
    describe_counter!("sourced_store_batch_failures_total", "Commits of the store's writer that failed, by backend.");
    describe_gauge!("sourced_live_connections", "WebSocket and SSE connections open now.");
    describe_gauge!("sourced_sse_streams", "SSE streams open now.");
    describe_gauge!("sourced_subscriptions", "Live subscriptions now.");
    describe_gauge!(
        "sourced_subscriber_backlog_events",
        "Events of the live buffer the slowest subscription has not taken yet."
    );
    describe_counter!("sourced_slow_clients_closed_total", "Connections closed because the client stopped reading.");
    describe_counter!(
        "sourced_subscription_lag_recoveries_total",
        "Times a subscription fell behind the live buffer and read the store again."
    );
    describe_gauge!("sourced_store_head_position", "The store's last global position.");
    describe_counter!("sourced_artifact_reloads_total", "Reloads of the artifact set by outcome.");
    describe_gauge!("sourced_artifact_set_types", "Aggregate types in the loaded artifact set.");
    describe_gauge!(
        "sourced_process_lease_held",
        "1 while this server's runner of the process holds its lease (runs it for the cluster), else 0."
    );
}
