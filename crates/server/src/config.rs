//! Configuration in two stages (SPEC §3.4): [`RawArgs`] holds the values as given by flags,
//! the environment and `.env` (flags win); [`Config::resolve`] validates them once into a
//! [`Config`], and a bad value fails start-up with one line naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use sourced_core::Limits;
use sourced_core::artifacts::expr::ExprLimits;

use crate::artifacts::ArtifactsSource;
use crate::git::{self, GitSource};

/// Command line of the `sourced` binary.
#[derive(Debug, Parser)]
#[command(name = "sourced", version, about = "A generic CQRS / event-sourcing service")]
pub struct Cli {
    /// What to run; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    /// Settings of `serve`, also accepted without the subcommand.
    #[command(flatten)]
    pub serve: RawArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the service (the default).
    Serve(RawArgs),
    /// Check an artifact set: print every problem with its file and location; exit 1 if any.
    Check {
        /// The artifact set: a directory, or a git URL with an optional `#ref` (as `ARTIFACTS`).
        artifacts: String,
        /// Where a git set is cloned [default: ./data/artifacts-cache].
        #[arg(long, env = "ARTIFACTS_CACHE")]
        artifacts_cache: Option<String>,
    },
    /// Write every event of the configured store, in position order, as NDJSON (one event per
    /// line, the wire shape) to stdout or `--output FILE`.
    Export {
        /// The file to write (created or truncated) instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// The store (`EVENT_STORE_URL`) and the other settings.
        #[command(flatten)]
        settings: RawArgs,
    },
    /// Load an NDJSON export from stdin or `--input FILE` into the configured store, which must
    /// hold no events; positions, versions, ids and timestamps come out identical.
    Import {
        /// The file to read instead of stdin.
        #[arg(long)]
        input: Option<PathBuf>,
        /// The store (`EVENT_STORE_URL`) and the other settings.
        #[command(flatten)]
        settings: RawArgs,
    },
    /// Rebuild the read model and the snapshots (`SNAPSHOT_EVERY`) of the configured store
    /// from its events. Run it while no `sourced serve` uses the store.
    Rebuild {
        /// The store (`EVENT_STORE_URL`) and the other settings.
        #[command(flatten)]
        settings: RawArgs,
    },
}

/// Settings as given, unvalidated. Each is a flag and an environment variable of the same
/// name in upper case (`--listen` / `LISTEN`).
#[derive(Debug, Default, Clone, Args)]
pub struct RawArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "LISTEN")]
    pub listen: Option<String>,
    /// Event store: `sqlite://PATH` or `postgres://USER@HOST:PORT/DATABASE`
    /// [default: sqlite://./data/sourced.db].
    #[arg(long, env = "EVENT_STORE_URL")]
    pub event_store_url: Option<String>,
    /// The artifact set (schemas, rules, commands, lifecycles): a directory, or a git URL
    /// (`file://`, `https://`, `ssh://`, `git@host:path`) with an optional `#ref` [default: none].
    #[arg(long, env = "ARTIFACTS")]
    pub artifacts: Option<String>,
    /// Store a snapshot of an aggregate every this many events; 0 stores none [default: 100].
    #[arg(long, env = "SNAPSHOT_EVERY")]
    pub snapshot_every: Option<String>,
    /// Document fields to index for filtered lists, comma-separated paths (e.g.
    /// `status,customer.id`); each index serves every type [default: none].
    #[arg(long, env = "INDEXES")]
    pub indexes: Option<String>,
    /// Where git artifact sets are cloned, one subdirectory per URL [default: ./data/artifacts-cache].
    #[arg(long, env = "ARTIFACTS_CACHE")]
    pub artifacts_cache: Option<String>,
    /// Longest time one git command (clone, fetch, checkout) may take, in seconds [default: 120].
    #[arg(long, env = "ARTIFACTS_GIT_TIMEOUT_SECS")]
    pub artifacts_git_timeout_secs: Option<String>,
    /// Longest artifact expression, in bytes [default: 4096].
    #[arg(long, env = "EXPR_BYTES_MAX")]
    pub expr_bytes_max: Option<String>,
    /// Most nodes in one artifact expression, macros expanded [default: 512].
    #[arg(long, env = "EXPR_NODES_MAX")]
    pub expr_nodes_max: Option<String>,
    /// Largest estimated cost of one expression evaluation, in steps [default: 1000000].
    #[arg(long, env = "EXPR_COST_MAX")]
    pub expr_cost_max: Option<String>,
    /// Largest value one expression evaluation may build, in bytes [default: 1048576].
    #[arg(long, env = "EXPR_VALUE_BYTES_MAX")]
    pub expr_value_bytes_max: Option<String>,
    /// Serve the admin endpoints (`POST /admin/reload`); unauthenticated for now [default: false].
    #[arg(long, env = "ADMIN_API")]
    pub admin_api: Option<String>,
    /// trace, debug, info, warn or error [default: info].
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// text or json [default: text].
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Require an expected version (If-Match) on writes to existing aggregates [default: false].
    #[arg(long, env = "REQUIRE_VERSION")]
    pub require_version: Option<String>,
    /// Largest request body in bytes [default: 1048576].
    #[arg(long, env = "MAX_BODY_BYTES")]
    pub max_body_bytes: Option<String>,
    /// Deepest JSON nesting in a body or document [default: 64].
    #[arg(long, env = "MAX_JSON_DEPTH")]
    pub max_json_depth: Option<String>,
    /// Most operations in one JSON Patch [default: 1000].
    #[arg(long, env = "MAX_PATCH_OPS")]
    pub max_patch_ops: Option<String>,
    /// Most `/-` array appends in one JSON Patch [default: 1000].
    #[arg(long, env = "MAX_ARRAY_APPENDS")]
    pub max_array_appends: Option<String>,
    /// Largest document after a command, in bytes [default: 1048576].
    #[arg(long, env = "MAX_DOCUMENT_BYTES")]
    pub max_document_bytes: Option<String>,
    /// Largest page a list, history or feed request may ask for [default: 1000].
    #[arg(long, env = "MAX_PAGE_LIMIT")]
    pub max_page_limit: Option<String>,
    /// Most commands the embedded store commits in one transaction [default: 512].
    #[arg(long, env = "BATCH_APPENDS_MAX")]
    pub batch_appends_max: Option<String>,
    /// Seconds to wait for in-flight requests at shutdown [default: 30].
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<String>,
    /// Milliseconds a client may take to send a request's head (request line and headers),
    /// counted from its first byte [default: 10000].
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<String>,
    /// Milliseconds a client may take to send a request body, counted from when the server
    /// starts reading it (408) [default: 30000].
    #[arg(long, env = "BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<String>,
    /// Milliseconds a connection with no request in flight may stay silent (a new one, or one
    /// kept alive between requests) before it is closed [default: 30000].
    #[arg(long, env = "IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<String>,
    /// Most commands in flight on one WebSocket connection [default: 64].
    #[arg(long, env = "WS_INFLIGHT_MAX")]
    pub ws_inflight_max: Option<String>,
    /// Largest WebSocket message or frame in bytes [default: MAX_BODY_BYTES].
    #[arg(long, env = "WS_MESSAGE_BYTES_MAX")]
    pub ws_message_bytes_max: Option<String>,
    /// Most subscriptions on one WebSocket connection [default: 16].
    #[arg(long, env = "WS_SUBSCRIPTIONS_MAX")]
    pub ws_subscriptions_max: Option<String>,
    /// Most messages queued for one WebSocket client [default: 256].
    #[arg(long, env = "WS_OUTBOUND_MAX")]
    pub ws_outbound_max: Option<String>,
    /// Milliseconds a WebSocket client may leave a message unread before it is closed [default: 10000].
    #[arg(long, env = "WS_SLOW_CLIENT_TIMEOUT_MS")]
    pub ws_slow_client_timeout_ms: Option<String>,
    /// Most SSE streams open at once; beyond it 503 [default: 1024].
    #[arg(long, env = "SSE_STREAMS_MAX")]
    pub sse_streams_max: Option<String>,
    /// Milliseconds an SSE client may leave a write blocked before its connection is closed
    /// [default: WS_SLOW_CLIENT_TIMEOUT_MS].
    #[arg(long, env = "SSE_SLOW_CLIENT_TIMEOUT_MS")]
    pub sse_slow_client_timeout_ms: Option<String>,
    /// Events the shared live buffer of subscriptions keeps [default: 4096].
    #[arg(long, env = "LIVE_BUFFER_EVENTS")]
    pub live_buffer_events: Option<String>,
}

/// Where events are stored.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded SQLite store at this path.
    Sqlite(PathBuf),
    /// A PostgreSQL database: `postgres://…` or `postgresql://…`, as given.
    Postgres(String),
}

/// Shows a PostgreSQL URL without its password: the configuration is logged at start.
impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            StoreUrl::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits the HTTP layer enforces itself (SPEC §8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request body.
    pub body_bytes_max: usize,
    /// Default page size.
    pub page_limit_default: usize,
    /// Largest page size.
    pub page_limit_max: usize,
    /// Time allowed for a request's head, from its first byte.
    pub header_read_timeout_ms: u64,
    /// Time allowed for reading a request body (408 beyond).
    pub body_read_timeout_ms: u64,
    /// Time a connection with no request in flight may stay silent.
    pub idle_timeout_ms: u64,
}

/// Limits of live connections: WebSocket (SPEC §3.2, §8.3) and SSE streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsLimits {
    /// Most commands in flight per connection; beyond it the server reads no more frames.
    pub inflight_max: usize,
    /// Largest message and frame (close 1009 beyond).
    pub message_bytes_max: usize,
    /// Most subscriptions per connection.
    pub subscriptions_max: usize,
    /// Most messages queued for the client.
    pub outbound_max: usize,
    /// How long one message may wait for the client to take it before it is closed (1008).
    pub slow_client_timeout_ms: u64,
    /// Most SSE streams open at once (all clients together); beyond it 503.
    pub sse_streams_max: usize,
    /// How long a write to an SSE client may stay blocked before its connection is closed.
    pub sse_slow_client_timeout_ms: u64,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Event store.
    pub store: StoreUrl,
    /// Where the artifact set comes from, if anywhere.
    pub artifacts: Option<ArtifactsSource>,
    /// Limits on artifact expressions (compiled into the set at load).
    pub expr_limits: ExprLimits,
    /// The loaded artifact set ([`crate::start`] loads it from `artifacts`; empty until then).
    pub artifact_set: std::sync::Arc<sourced_core::artifacts::ArtifactSet>,
    /// Events between snapshots of an aggregate (0: none).
    pub snapshot_every: u64,
    /// Document fields indexed for filtered lists (created at start where missing).
    pub indexes: Vec<sourced_core::query::FieldPath>,
    /// Log filter directive (a level).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Require expected versions on writes to existing aggregates.
    pub require_version: bool,
    /// The core's limits.
    pub limits: Limits,
    /// The HTTP layer's limits.
    pub http: HttpLimits,
    /// Embedded store: most commands per commit.
    pub batch_appends_max: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_timeout_secs: u64,
    /// WebSocket limits.
    pub ws: WsLimits,
    /// Events the shared live buffer of subscriptions keeps.
    pub live_buffer_events: usize,
    /// Whether the admin endpoints are served.
    pub admin_api: bool,
}

/// A setting that could not be used; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting} {value:?}: {reason}")]
pub struct ConfigError {
    /// The setting's environment name.
    pub setting: &'static str,
    /// The value given.
    pub value: String,
    /// What is expected.
    pub reason: String,
}

/// Most fields `INDEXES` may name: each index costs every write.
pub const INDEXES_MAX: usize = 32;

fn bad(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { setting, value: value.to_owned(), reason: reason.into() }
}

fn number(
    setting: &'static str,
    raw: &Option<String>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let Some(s) = raw else { return Ok(default) };
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(setting, s, format!("expected a whole number from {min} to {max}"))),
    }
}

impl Config {
    /// Validates raw settings.
    pub fn resolve(raw: &RawArgs) -> Result<Config, ConfigError> {
        let listen = match &raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| bad("LISTEN", s, "expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"))?,
        };
        let store = match &raw.event_store_url {
            None => StoreUrl::Sqlite(PathBuf::from("./data/sourced.db")),
            Some(s) => parse_store_url(s)?,
        };
        let cache = match raw.artifacts_cache.as_deref().map(str::trim) {
            None => PathBuf::from("./data/artifacts-cache"),
            Some("") => return Err(bad("ARTIFACTS_CACHE", "", "give a directory")),
            Some(c) => PathBuf::from(c),
        };
        let git_timeout = number("ARTIFACTS_GIT_TIMEOUT_SECS", &raw.artifacts_git_timeout_secs, 120, 1, 3_600)? as u64;
        let artifacts = match raw.artifacts.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(parse_artifacts(a, cache, std::time::Duration::from_secs(git_timeout))?),
        };
        let expr_limits = ExprLimits {
            source_bytes_max: number("EXPR_BYTES_MAX", &raw.expr_bytes_max, 4_096, 16, 1024 * 1024)?,
            nodes_max: number("EXPR_NODES_MAX", &raw.expr_nodes_max, 512, 1, 100_000)?,
            cost_max: number("EXPR_COST_MAX", &raw.expr_cost_max, 1_000_000, 100, 1_000_000_000)? as u64,
            value_bytes_max: number("EXPR_VALUE_BYTES_MAX", &raw.expr_value_bytes_max, MIB, 64, 64 * MIB)? as u64,
        };
        let admin_api = match raw.admin_api.as_deref().map(str::trim) {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(other) => return Err(bad("ADMIN_API", other, "expected true or false")),
        };
        let indexes = match raw.indexes.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(list) => {
                let fields = list
                    .split(',')
                    .map(|f| sourced_core::query::FieldPath::parse(f.trim()).map_err(|m| bad("INDEXES", list, m)))
                    .collect::<Result<Vec<_>, _>>()?;
                if fields.len() > INDEXES_MAX {
                    return Err(bad("INDEXES", list, format!("at most {INDEXES_MAX} indexed fields")));
                }
                fields
            }
        };
        let log_level = match raw.log_level.as_deref().map(str::trim) {
            None => "info".to_owned(),
            Some(l @ ("trace" | "debug" | "info" | "warn" | "error")) => l.to_owned(),
            Some(other) => return Err(bad("LOG_LEVEL", other, "expected trace, debug, info, warn or error")),
        };
        let log_format = match raw.log_format.as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(bad("LOG_FORMAT", other, "expected text or json")),
        };
        let require_version = match raw.require_version.as_deref().map(str::trim) {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(other) => return Err(bad("REQUIRE_VERSION", other, "expected true or false")),
        };
        const MIB: usize = 1024 * 1024;
        let limits = Limits {
            json_depth_max: number("MAX_JSON_DEPTH", &raw.max_json_depth, 64, 1, 120)?,
            patch_ops_max: number("MAX_PATCH_OPS", &raw.max_patch_ops, 1_000, 1, 100_000)?,
            array_appends_max: number("MAX_ARRAY_APPENDS", &raw.max_array_appends, 1_000, 0, 100_000)?,
            document_bytes_max: number("MAX_DOCUMENT_BYTES", &raw.max_document_bytes, MIB, 2, 64 * MIB)?,
        };
        let http = HttpLimits {
            body_bytes_max: number("MAX_BODY_BYTES", &raw.max_body_bytes, MIB, 2, 64 * MIB)?,
            page_limit_default: 100,
            page_limit_max: number("MAX_PAGE_LIMIT", &raw.max_page_limit, 1_000, 1, sourced_store::READ_LIMIT_MAX)?,
            header_read_timeout_ms: number("HEADER_READ_TIMEOUT_MS", &raw.header_read_timeout_ms, 10_000, 1, 3_600_000)?
                as u64,
            body_read_timeout_ms: number("BODY_READ_TIMEOUT_MS", &raw.body_read_timeout_ms, 30_000, 1, 3_600_000)?
                as u64,
            idle_timeout_ms: number("IDLE_TIMEOUT_MS", &raw.idle_timeout_ms, 30_000, 1, 3_600_000)? as u64,
        };
        let http = HttpLimits { page_limit_default: http.page_limit_default.min(http.page_limit_max), ..http };
        let ws_slow_ms =
            number("WS_SLOW_CLIENT_TIMEOUT_MS", &raw.ws_slow_client_timeout_ms, 10_000, 1, 3_600_000)? as u64;
        let ws = WsLimits {
            inflight_max: number("WS_INFLIGHT_MAX", &raw.ws_inflight_max, 64, 1, 65_536)?,
            message_bytes_max: number(
                "WS_MESSAGE_BYTES_MAX",
                &raw.ws_message_bytes_max,
                http.body_bytes_max,
                16,
                64 * MIB,
            )?,
            subscriptions_max: number("WS_SUBSCRIPTIONS_MAX", &raw.ws_subscriptions_max, 16, 0, 1_024)?,
            outbound_max: number("WS_OUTBOUND_MAX", &raw.ws_outbound_max, 256, 1, 65_536)?,
            slow_client_timeout_ms: ws_slow_ms,
            sse_streams_max: number("SSE_STREAMS_MAX", &raw.sse_streams_max, 1_024, 0, 1 << 20)?,
            sse_slow_client_timeout_ms: number(
                "SSE_SLOW_CLIENT_TIMEOUT_MS",
                &raw.sse_slow_client_timeout_ms,
                ws_slow_ms as usize,
                1,
                3_600_000,
            )? as u64,
        };
        let live_buffer_events = number(
            "LIVE_BUFFER_EVENTS",
            &raw.live_buffer_events,
            4_096,
            1,
            sourced_engine::subscriptions::LIVE_BUFFER_EVENTS_MAX,
        )?;
        Ok(Config {
            listen,
            store,
            artifacts,
            expr_limits,
            artifact_set: Default::default(),
            indexes,
            snapshot_every: number("SNAPSHOT_EVERY", &raw.snapshot_every, 100, 0, 1_000_000)? as u64,
            log_level,
            log_format,
            require_version,
            limits,
            http,
            batch_appends_max: number("BATCH_APPENDS_MAX", &raw.batch_appends_max, 512, 1, 10_000)?,
            shutdown_timeout_secs: number("SHUTDOWN_TIMEOUT_SECS", &raw.shutdown_timeout_secs, 30, 0, 3_600)? as u64,
            ws,
            live_buffer_events,
            admin_api,
        })
    }

    /// Defaults for everything but the address and the embedded store's file (tests, benches).
    pub fn embedded(listen: SocketAddr, db_path: PathBuf) -> Config {
        let mut c = Config::resolve(&RawArgs::default()).expect("the defaults are valid");
        c.listen = listen;
        c.store = StoreUrl::Sqlite(db_path);
        c
    }
}

/// Parses `ARTIFACTS`: an existing directory, or a git URL with an optional `#ref`, cloned
/// into a subdirectory of `cache`.
pub fn parse_artifacts(
    value: &str,
    cache: PathBuf,
    timeout: std::time::Duration,
) -> Result<ArtifactsSource, ConfigError> {
    // A directory wins, so a path that happens to contain '#' still works.
    if std::path::Path::new(value).is_dir() {
        return Ok(ArtifactsSource::Dir(PathBuf::from(value)));
    }
    if !git::is_git_url(value) {
        return Err(bad(
            "ARTIFACTS",
            value,
            "not a directory, nor a git URL (file://, https://, ssh://, git@host:path, with an optional #ref)",
        ));
    }
    let (url, reference) = git::parse_url(value).map_err(|reason| bad("ARTIFACTS", value, reason))?;
    Ok(ArtifactsSource::Git(GitSource { url, reference, cache, timeout }))
}

/// Parses `EVENT_STORE_URL`.
pub fn parse_store_url(s: &str) -> Result<StoreUrl, ConfigError> {
    let t = s.trim();
    if let Some(path) = t.strip_prefix("sqlite://").or_else(|| t.strip_prefix("sqlite:")) {
        if path.is_empty() {
            return Err(bad("EVENT_STORE_URL", s, "the sqlite URL needs a file path, e.g. sqlite://./data/sourced.db"));
        }
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
    }
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        if let Err(e) = sourced_store::postgres::check_url(t) {
            return Err(bad("EVENT_STORE_URL", &redact_url(s), e.to_string().replace('\n', " ")));
        }
        return Ok(StoreUrl::Postgres(t.to_owned()));
    }
    Err(bad("EVENT_STORE_URL", s, "expected sqlite://PATH or postgres://USER@HOST:PORT/DATABASE"))
}

/// The URL with its password, if any, replaced by `***` (for logs and error messages).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &rest[..colon], &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::resolve(&RawArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.store, StoreUrl::Sqlite(PathBuf::from("./data/sourced.db")));
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn ws_defaults_follow_the_body_limit() {
        let c = Config::resolve(&RawArgs::default()).unwrap();
        assert_eq!(
            c.ws,
            WsLimits {
                inflight_max: 64,
                message_bytes_max: 1024 * 1024,
                subscriptions_max: 16,
                outbound_max: 256,
                slow_client_timeout_ms: 10_000,
                sse_streams_max: 1_024,
                sse_slow_client_timeout_ms: 10_000,
            }
        );
        assert_eq!(c.live_buffer_events, 4_096);
        // The SSE deadline follows the WebSocket one unless set.
        let raw = RawArgs { ws_slow_client_timeout_ms: Some("500".into()), ..Default::default() };
        assert_eq!(Config::resolve(&raw).unwrap().ws.sse_slow_client_timeout_ms, 500);
        let c = Config::resolve(&RawArgs { max_body_bytes: Some("4096".into()), ..Default::default() }).unwrap();
        assert_eq!(c.ws.message_bytes_max, 4096);
        let raw = RawArgs { ws_message_bytes_max: Some("100".into()), ..Default::default() };
        assert_eq!(Config::resolve(&raw).unwrap().ws.message_bytes_max, 100);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases: Vec<(RawArgs, &str)> = vec![
            (RawArgs { listen: Some("nowhere".into()), ..Default::default() }, "LISTEN"),
            (RawArgs { indexes: Some("status,a..b".into()), ..Default::default() }, "INDEXES"),
            (RawArgs { snapshot_every: Some("-1".into()), ..Default::default() }, "SNAPSHOT_EVERY"),
            (RawArgs { event_store_url: Some("mysql://x".into()), ..Default::default() }, "EVENT_STORE_URL"),
            (RawArgs { log_level: Some("loud".into()), ..Default::default() }, "LOG_LEVEL"),
            (RawArgs { log_format: Some("xml".into()), ..Default::default() }, "LOG_FORMAT"),
            (RawArgs { max_body_bytes: Some("-1".into()), ..Default::default() }, "MAX_BODY_BYTES"),
            (RawArgs { max_json_depth: Some("1000".into()), ..Default::default() }, "MAX_JSON_DEPTH"),
            (RawArgs { require_version: Some("maybe".into()), ..Default::default() }, "REQUIRE_VERSION"),
            (RawArgs { ws_inflight_max: Some("0".into()), ..Default::default() }, "WS_INFLIGHT_MAX"),
            (RawArgs { ws_message_bytes_max: Some("big".into()), ..Default::default() }, "WS_MESSAGE_BYTES_MAX"),
            (RawArgs { ws_subscriptions_max: Some("5000".into()), ..Default::default() }, "WS_SUBSCRIPTIONS_MAX"),
            (RawArgs { ws_outbound_max: Some("0".into()), ..Default::default() }, "WS_OUTBOUND_MAX"),
            (
                RawArgs { ws_slow_client_timeout_ms: Some("0".into()), ..Default::default() },
                "WS_SLOW_CLIENT_TIMEOUT_MS",
            ),
            (RawArgs { live_buffer_events: Some("0".into()), ..Default::default() }, "LIVE_BUFFER_EVENTS"),
            (RawArgs { header_read_timeout_ms: Some("0".into()), ..Default::default() }, "HEADER_READ_TIMEOUT_MS"),
            (RawArgs { body_read_timeout_ms: Some("1s".into()), ..Default::default() }, "BODY_READ_TIMEOUT_MS"),
            (RawArgs { idle_timeout_ms: Some("3600001".into()), ..Default::default() }, "IDLE_TIMEOUT_MS"),
            (RawArgs { artifacts: Some("/no/such/dir".into()), ..Default::default() }, "ARTIFACTS"),
            (RawArgs { artifacts: Some("file:///r#".into()), ..Default::default() }, "ARTIFACTS"),
            (RawArgs { artifacts: Some("https://h/r#--upload-pack=x".into()), ..Default::default() }, "ARTIFACTS"),
            (RawArgs { artifacts_cache: Some(" ".into()), ..Default::default() }, "ARTIFACTS_CACHE"),
            (
                RawArgs { artifacts_git_timeout_secs: Some("0".into()), ..Default::default() },
                "ARTIFACTS_GIT_TIMEOUT_SECS",
            ),
            (RawArgs { admin_api: Some("maybe".into()), ..Default::default() }, "ADMIN_API"),
            (RawArgs { expr_bytes_max: Some("1".into()), ..Default::default() }, "EXPR_BYTES_MAX"),
            (RawArgs { expr_nodes_max: Some("0".into()), ..Default::default() }, "EXPR_NODES_MAX"),
            (RawArgs { expr_cost_max: Some("lots".into()), ..Default::default() }, "EXPR_COST_MAX"),
            (RawArgs { expr_value_bytes_max: Some("-5".into()), ..Default::default() }, "EXPR_VALUE_BYTES_MAX"),
            (RawArgs { sse_streams_max: Some("many".into()), ..Default::default() }, "SSE_STREAMS_MAX"),
            (
                RawArgs { sse_slow_client_timeout_ms: Some("0".into()), ..Default::default() },
                "SSE_SLOW_CLIENT_TIMEOUT_MS",
            ),
        ];
        for (raw, setting) in cases {
            let e = Config::resolve(&raw).unwrap_err();
            assert_eq!(e.setting, setting);
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn artifacts_from_a_directory_or_git() {
        let raw = RawArgs { artifacts: Some("https://example.org/a.git#v1".into()), ..Default::default() };
        match Config::resolve(&raw).unwrap().artifacts {
            Some(ArtifactsSource::Git(g)) => {
                assert_eq!((g.url.as_str(), g.reference.as_deref()), ("https://example.org/a.git", Some("v1")));
                assert_eq!(g.cache, PathBuf::from("./data/artifacts-cache"));
                assert_eq!(g.timeout, std::time::Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
        let dir = std::env::temp_dir();
        let raw = RawArgs { artifacts: Some(dir.display().to_string()), ..Default::default() };
        assert_eq!(Config::resolve(&raw).unwrap().artifacts, Some(ArtifactsSource::Dir(dir)));
        assert!(!Config::resolve(&RawArgs::default()).unwrap().admin_api);
    }

    #[test]
    fn store_urls() {
        assert_eq!(parse_store_url("sqlite:///tmp/x.db").unwrap(), StoreUrl::Sqlite(PathBuf::from("/tmp/x.db")));
        assert_eq!(parse_store_url("sqlite:x.db").unwrap(), StoreUrl::Sqlite(PathBuf::from("x.db")));
        assert!(parse_store_url("sqlite://").is_err());
        for url in ["postgres://u@localhost:5432/db", "postgresql://u:pw@h/db?options=-csearch_path%3Dx"] {
            assert_eq!(parse_store_url(url).unwrap(), StoreUrl::Postgres(url.to_owned()));
        }
        let e = parse_store_url("postgres://u:secret@h/db?sslmode=sometimes").unwrap_err();
        assert_eq!(e.setting, "EVENT_STORE_URL");
        assert!(!e.to_string().contains('\n') && !e.to_string().contains("secret"), "{e}");
        assert_eq!(
            format!("{:?}", StoreUrl::Postgres("postgres://u:secret@h:5432/db".into())),
            r#"Postgres("postgres://u:***@h:5432/db")"#
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
