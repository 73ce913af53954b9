//! Configuration in two stages (SPEC §3.4): [`RawArgs`] holds the values as given by flags,
//! the environment and `.env` (flags win); [`Config::resolve`] validates them once into a
//! [`Config`], and a bad value fails start-up with one line naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sourced_core::Limits;
use sourced_core::artifacts::expr::ExprLimits;

use crate::artifacts::ArtifactsSource;
use crate::git::{self, GitSource};
use crate::settings::bad;
pub use crate::settings::{ConfigError, RawArgs};

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
    /// API keys (`AUTH=keys`).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Rebuild the read model and the snapshots (`SNAPSHOT_EVERY`) of the configured store
    /// from its events. Run it while no `sourced serve` uses the store.
    Rebuild {
        /// The store (`EVENT_STORE_URL`) and the other settings.
        #[command(flatten)]
        settings: RawArgs,
    },
}

/// `sourced key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a fresh random API key: print the key once (it is stored nowhere) and, on the next
    /// line, the entry to add to `AUTH_KEYS_FILE` (its SHA-256 hash, principal, tenants, roles).
    New {
        /// The principal the key names (its id in event metadata and CEL's `principal.id`).
        #[arg(long)]
        principal: String,
        /// A tenant it may act in (repeat for several).
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
        /// A role of `permissions.yaml` (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
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
    /// How process managers retry (`PROCESS_TRIES`, `PROCESS_BACKOFF_MS`, `PROCESS_BACKOFF_MAX_MS`).
    pub processes: sourced_engine::process::ProcessSettings,
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
    /// Authentication (`AUTH` and its settings), loaded.
    pub gate: std::sync::Arc<crate::auth::Gate>,
    /// Rate limits (`RATE_LIMIT_PER_SEC`, `RATE_LIMIT_BURST`); none when off.
    pub rate_limit: Option<std::sync::Arc<crate::ratelimit::RateLimiter>>,
    /// HTTPS (`TLS_CERT`, `TLS_KEY`), loaded; plain HTTP when none.
    pub tls: Option<std::sync::Arc<crate::tls::Certificates>>,
}

/// `TLS_CERT` and `TLS_KEY`: both or neither; the pair is read now.
fn parse_tls(raw: &RawArgs) -> Result<Option<crate::tls::Certificates>, ConfigError> {
    let files = match (raw.text("TLS_CERT").filter(|t| !t.is_empty()), raw.text("TLS_KEY").filter(|t| !t.is_empty())) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => crate::tls::TlsFiles { cert: cert.into(), key: key.into() },
        (Some(cert), None) => {
            return Err(bad("TLS_KEY", "", format!("TLS_CERT={cert} needs TLS_KEY, its private key")));
        }
        (None, Some(key)) => return Err(bad("TLS_CERT", "", format!("TLS_KEY={key} needs TLS_CERT, its certificate"))),
    };
    crate::tls::Certificates::load(files).map(Some).map_err(|e| match e {
        crate::tls::TlsError::File { setting, path, why } => bad(setting, &path.display().to_string(), why),
        crate::tls::TlsError::Pair { key, why, .. } => {
            bad("TLS_KEY", &key.display().to_string(), format!("does not fit TLS_CERT: {why}"))
        }
    })
}

pub use crate::limits::INDEXES_MAX;

/// The page size of a list that names no `limit` (at most `MAX_PAGE_LIMIT`).
pub const PAGE_LIMIT_DEFAULT: usize = 100;

/// Parses `INDEXES`: comma-separated field paths, at most [`INDEXES_MAX`].
fn parse_indexes(list: &str) -> Result<Vec<sourced_core::query::FieldPath>, ConfigError> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let fields = list
        .split(',')
        .map(|f| sourced_core::query::FieldPath::parse(f.trim()).map_err(|m| bad("INDEXES", list, m)))
        .collect::<Result<Vec<_>, _>>()?;
    if fields.len() > INDEXES_MAX {
        return Err(bad("INDEXES", list, format!("at most {INDEXES_MAX} indexed fields")));
    }
    Ok(fields)
}

impl Config {
    /// Validates raw settings; every default, bound and message comes from the table in
    /// [`crate::settings`].
    pub fn resolve(raw: &RawArgs) -> Result<Config, ConfigError> {
        let text = |env: &str| raw.text(env).unwrap_or_default();
        let listen = text("LISTEN")
            .parse()
            .map_err(|_| bad("LISTEN", &text("LISTEN"), "expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"))?;
        let store = parse_store_url(&text("EVENT_STORE_URL"))?;
        // Resolved once, against the working directory at start: git runs inside the cache, so
        // a relative path would be taken relative to itself there.
        let cache = match text("ARTIFACTS_CACHE") {
            c if c.is_empty() => return Err(bad("ARTIFACTS_CACHE", "", "give a directory")),
            c => std::path::absolute(&c).map_err(|e| bad("ARTIFACTS_CACHE", &c, e.to_string()))?,
        };
        let git_timeout = std::time::Duration::from_secs(raw.number("ARTIFACTS_GIT_TIMEOUT_SECS")?);
        let artifacts = match raw.text("ARTIFACTS") {
            None => None,
            Some(a) if a.is_empty() => None,
            Some(a) => Some(parse_artifacts(&a, cache, git_timeout)?),
        };
        let expr_limits = ExprLimits {
            source_bytes_max: raw.size("EXPR_BYTES_MAX")?,
            nodes_max: raw.size("EXPR_NODES_MAX")?,
            cost_max: raw.number("EXPR_COST_MAX")?,
            value_bytes_max: raw.number("EXPR_VALUE_BYTES_MAX")?,
        };
        let limits = Limits {
            json_depth_max: raw.size("MAX_JSON_DEPTH")?,
            patch_ops_max: raw.size("MAX_PATCH_OPS")?,
            array_appends_max: raw.size("MAX_ARRAY_APPENDS")?,
            document_bytes_max: raw.size("MAX_DOCUMENT_BYTES")?,
        };
        let page_limit_max = raw.size("MAX_PAGE_LIMIT")?;
        let http = HttpLimits {
            body_bytes_max: raw.size("MAX_BODY_BYTES")?,
            page_limit_default: PAGE_LIMIT_DEFAULT.min(page_limit_max),
            page_limit_max,
            header_read_timeout_ms: raw.number("HEADER_READ_TIMEOUT_MS")?,
            body_read_timeout_ms: raw.number("BODY_READ_TIMEOUT_MS")?,
            idle_timeout_ms: raw.number("IDLE_TIMEOUT_MS")?,
        };
        let gate = crate::auth::Gate::from_settings(raw)?;
        gate.check_listen(listen, raw.flag("INSECURE")?)?;
        let ws = WsLimits {
            inflight_max: raw.size("WS_INFLIGHT_MAX")?,
            message_bytes_max: raw.size("WS_MESSAGE_BYTES_MAX")?,
            subscriptions_max: raw.size("WS_SUBSCRIPTIONS_MAX")?,
            outbound_max: raw.size("WS_OUTBOUND_MAX")?,
            slow_client_timeout_ms: raw.number("WS_SLOW_CLIENT_TIMEOUT_MS")?,
            sse_streams_max: raw.size("SSE_STREAMS_MAX")?,
            sse_slow_client_timeout_ms: raw.number("SSE_SLOW_CLIENT_TIMEOUT_MS")?,
        };
        Ok(Config {
            listen,
            store,
            artifacts,
            expr_limits,
            artifact_set: Default::default(),
            indexes: parse_indexes(raw.text("INDEXES").as_deref().unwrap_or(""))?,
            snapshot_every: raw.number("SNAPSHOT_EVERY")?,
            processes: sourced_engine::process::ProcessSettings {
                tries_max: u32::try_from(raw.number("PROCESS_TRIES")?).unwrap_or(u32::MAX),
                backoff_ms: raw.number("PROCESS_BACKOFF_MS")?,
                backoff_max_ms: raw.number("PROCESS_BACKOFF_MAX_MS")?,
                ..Default::default()
            },
            log_level: raw.choice("LOG_LEVEL")?.to_owned(),
            log_format: match raw.choice("LOG_FORMAT")? {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            },
            require_version: raw.flag("REQUIRE_VERSION")?,
            limits,
            http,
            batch_appends_max: raw.size("BATCH_APPENDS_MAX")?,
            shutdown_timeout_secs: raw.number("SHUTDOWN_TIMEOUT_SECS")?,
            ws,
            live_buffer_events: raw.size("LIVE_BUFFER_EVENTS")?,
            admin_api: raw.flag("ADMIN_API")?,
            gate: std::sync::Arc::new(gate),
            rate_limit: crate::ratelimit::RateLimiter::new(
                raw.number("RATE_LIMIT_PER_SEC")?,
                raw.number("RATE_LIMIT_BURST")?,
            )
            .map(std::sync::Arc::new),
            tls: parse_tls(raw)?.map(std::sync::Arc::new),
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
        let raw = RawArgs::from_pairs([("WS_SLOW_CLIENT_TIMEOUT_MS", "500")]);
        assert_eq!(Config::resolve(&raw).unwrap().ws.sse_slow_client_timeout_ms, 500);
        let c = Config::resolve(&RawArgs::from_pairs([("MAX_BODY_BYTES", "4096")])).unwrap();
        assert_eq!(c.ws.message_bytes_max, 4096);
        let raw = RawArgs::from_pairs([("WS_MESSAGE_BYTES_MAX", "100")]);
        assert_eq!(Config::resolve(&raw).unwrap().ws.message_bytes_max, 100);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases: Vec<(RawArgs, &str)> = vec![
            (RawArgs::from_pairs([("LISTEN", "nowhere")]), "LISTEN"),
            (RawArgs::from_pairs([("INDEXES", "status,a..b")]), "INDEXES"),
            (RawArgs::from_pairs([("SNAPSHOT_EVERY", "-1")]), "SNAPSHOT_EVERY"),
            (RawArgs::from_pairs([("EVENT_STORE_URL", "mysql://x")]), "EVENT_STORE_URL"),
            (RawArgs::from_pairs([("LOG_LEVEL", "loud")]), "LOG_LEVEL"),
            (RawArgs::from_pairs([("LOG_FORMAT", "xml")]), "LOG_FORMAT"),
            (RawArgs::from_pairs([("MAX_BODY_BYTES", "-1")]), "MAX_BODY_BYTES"),
            (RawArgs::from_pairs([("MAX_JSON_DEPTH", "1000")]), "MAX_JSON_DEPTH"),
            (RawArgs::from_pairs([("REQUIRE_VERSION", "maybe")]), "REQUIRE_VERSION"),
            (RawArgs::from_pairs([("WS_INFLIGHT_MAX", "0")]), "WS_INFLIGHT_MAX"),
            (RawArgs::from_pairs([("WS_MESSAGE_BYTES_MAX", "big")]), "WS_MESSAGE_BYTES_MAX"),
            (RawArgs::from_pairs([("WS_SUBSCRIPTIONS_MAX", "5000")]), "WS_SUBSCRIPTIONS_MAX"),
            (RawArgs::from_pairs([("WS_OUTBOUND_MAX", "0")]), "WS_OUTBOUND_MAX"),
            (RawArgs::from_pairs([("WS_SLOW_CLIENT_TIMEOUT_MS", "0")]), "WS_SLOW_CLIENT_TIMEOUT_MS"),
            (RawArgs::from_pairs([("LIVE_BUFFER_EVENTS", "0")]), "LIVE_BUFFER_EVENTS"),
            (RawArgs::from_pairs([("HEADER_READ_TIMEOUT_MS", "0")]), "HEADER_READ_TIMEOUT_MS"),
            (RawArgs::from_pairs([("BODY_READ_TIMEOUT_MS", "1s")]), "BODY_READ_TIMEOUT_MS"),
            (RawArgs::from_pairs([("IDLE_TIMEOUT_MS", "3600001")]), "IDLE_TIMEOUT_MS"),
            (RawArgs::from_pairs([("ARTIFACTS", "/no/such/dir")]), "ARTIFACTS"),
            (RawArgs::from_pairs([("ARTIFACTS", "file:///r#")]), "ARTIFACTS"),
            (RawArgs::from_pairs([("ARTIFACTS", "https://h/r#--upload-pack=x")]), "ARTIFACTS"),
            (RawArgs::from_pairs([("ARTIFACTS_CACHE", " ")]), "ARTIFACTS_CACHE"),
            (RawArgs::from_pairs([("ARTIFACTS_GIT_TIMEOUT_SECS", "0")]), "ARTIFACTS_GIT_TIMEOUT_SECS"),
            (RawArgs::from_pairs([("ADMIN_API", "maybe")]), "ADMIN_API"),
            (RawArgs::from_pairs([("EXPR_BYTES_MAX", "1")]), "EXPR_BYTES_MAX"),
            (RawArgs::from_pairs([("EXPR_NODES_MAX", "0")]), "EXPR_NODES_MAX"),
            (RawArgs::from_pairs([("EXPR_COST_MAX", "lots")]), "EXPR_COST_MAX"),
            (RawArgs::from_pairs([("EXPR_VALUE_BYTES_MAX", "-5")]), "EXPR_VALUE_BYTES_MAX"),
            (RawArgs::from_pairs([("SSE_STREAMS_MAX", "many")]), "SSE_STREAMS_MAX"),
            (RawArgs::from_pairs([("SSE_SLOW_CLIENT_TIMEOUT_MS", "0")]), "SSE_SLOW_CLIENT_TIMEOUT_MS"),
        ];
        for (raw, setting) in cases {
            let e = Config::resolve(&raw).unwrap_err();
            assert_eq!(e.setting, setting);
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn artifacts_from_a_directory_or_git() {
        let raw = RawArgs::from_pairs([("ARTIFACTS", "https://example.org/a.git#v1")]);
        match Config::resolve(&raw).unwrap().artifacts {
            Some(ArtifactsSource::Git(g)) => {
                assert_eq!((g.url.as_str(), g.reference.as_deref()), ("https://example.org/a.git", Some("v1")));
                assert!(g.cache.is_absolute() && g.cache.ends_with("data/artifacts-cache"), "{:?}", g.cache);
                assert_eq!(g.timeout, std::time::Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
        let dir = std::env::temp_dir();
        let raw = RawArgs::from_pairs([("ARTIFACTS", dir.display().to_string().as_str())]);
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
