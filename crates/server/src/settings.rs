//! Every setting of `sourced serve` as data (SPEC §3.4): one table of name, default, kind with
//! bounds, and help, from which the flags and `--help`, the parsing of values, the error
//! messages and the check of README's settings table all come. A setting is a flag (its name
//! in lower-case kebab form, `--max-body-bytes`) and an environment variable (`MAX_BODY_BYTES`).

use std::collections::BTreeMap;

use clap::{Arg, ArgMatches};

/// What a setting's value may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Free text, checked where it is used (addresses, URLs, paths, lists).
    Text,
    /// A whole number within bounds, inclusive.
    Number {
        /// Smallest value.
        min: u64,
        /// Largest value.
        max: u64,
    },
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
    /// One of a few words.
    Choice(&'static [&'static str]),
}

/// A setting's value when it is not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    /// This value.
    Value(&'static str),
    /// No value: the feature is off or empty.
    Unset,
    /// The value of another setting.
    Follows(&'static str),
}

/// One setting.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The environment name; the flag is derived from it.
    pub env: &'static str,
    /// What it is when not given.
    pub default: Default,
    /// What it may be.
    pub kind: Kind,
    /// One sentence for `--help`.
    pub doc: &'static str,
}

const MIB: u64 = 1024 * 1024;
const HOUR_MS: u64 = 3_600_000;

const fn number(env: &'static str, default: &'static str, min: u64, max: u64, doc: &'static str) -> Setting {
    Setting { env, default: Default::Value(default), kind: Kind::Number { min, max }, doc }
}

const fn text(env: &'static str, default: Default, doc: &'static str) -> Setting {
    Setting { env, default, kind: Kind::Text, doc }
}

const fn flag(env: &'static str, doc: &'static str) -> Setting {
    Setting { env, default: Default::Value("false"), kind: Kind::Bool, doc }
}

/// Every setting, in the order `--help` and README list them.
pub const SETTINGS: &[Setting] = &[
    text("LISTEN", Default::Value("127.0.0.1:8080"), "Address to listen on."),
    text("TLS_CERT", Default::Unset, "HTTPS and WSS: the PEM certificate chain (server first); reloaded on SIGHUP."),
    text("TLS_KEY", Default::Unset, "HTTPS and WSS: the PEM private key of TLS_CERT; reloaded on SIGHUP."),
    text(
        "EVENT_STORE_URL",
        Default::Value("sqlite://./data/sourced.db"),
        "Event store: sqlite://PATH or postgres://USER@HOST:PORT/DATABASE.",
    ),
    text(
        "ARTIFACTS",
        Default::Unset,
        "The artifact set (schemas, rules, commands, lifecycles): a directory, or a git URL \
         (file://, https://, ssh://, git@host:path) with an optional #ref.",
    ),
    text(
        "ARTIFACTS_CACHE",
        Default::Value("./data/artifacts-cache"),
        "Where git artifact sets are cloned, one subdirectory per URL.",
    ),
    number(
        "ARTIFACTS_GIT_TIMEOUT_SECS",
        "120",
        1,
        3_600,
        "Longest time one git command (clone, fetch, checkout) may take, in seconds.",
    ),
    number("EXPR_BYTES_MAX", "4096", 16, MIB, "Longest artifact expression, in bytes."),
    number("EXPR_NODES_MAX", "512", 1, 100_000, "Most nodes in one artifact expression, macros expanded."),
    number(
        "EXPR_COST_MAX",
        "1000000",
        100,
        1_000_000_000,
        "Largest estimated cost of one expression evaluation, in steps.",
    ),
    number(
        "EXPR_VALUE_BYTES_MAX",
        "1048576",
        64,
        64 * MIB,
        "Largest value one expression evaluation may build, in bytes.",
    ),
    flag("ADMIN_API", "Serve the admin endpoints (POST /admin/reload); with AUTH on they need the `admin` action."),
    text("AUTH", Default::Value("none"), "Authentication: none (development only), keys, jwt, or keys,jwt."),
    flag("INSECURE", "With AUTH=none, allow a LISTEN address that is not loopback."),
    text("AUTH_KEYS_FILE", Default::Unset, "With AUTH=keys: the YAML file of API key hashes (sourced key new)."),
    text("JWT_HS256_SECRET", Default::Unset, "With AUTH=jwt: the HS256 secret, at least 32 bytes."),
    text("JWT_HS256_SECRET_FILE", Default::Unset, "With AUTH=jwt: a file holding the HS256 secret."),
    text(
        "JWT_JWKS",
        Default::Unset,
        "With AUTH=jwt: RS256/ES256 public keys chosen by kid: a JWKS file, or an https:// URL fetched at start and kept fresh.",
    ),
    text("JWT_JWKS_CA_FILE", Default::Unset, "With JWT_JWKS=https://…: PEM roots to trust instead of the system's."),
    number("JWT_JWKS_TIMEOUT_SECS", "10", 1, 300, "With JWT_JWKS=https://…: longest time one fetch may take."),
    number(
        "JWT_JWKS_REFRESH_SECS",
        "300",
        60,
        86_400,
        "With JWT_JWKS=https://…: seconds between fetches (a token with an unknown kid also causes one).",
    ),
    number(
        "JWT_JWKS_UNKNOWN_KID_SECS",
        "60",
        1,
        3_600,
        "With JWT_JWKS=https://…: shortest time between two fetches caused by tokens with an unknown kid.",
    ),
    text("JWT_ISSUER", Default::Unset, "With AUTH=jwt: the issuer (iss) tokens must name."),
    text("JWT_AUDIENCE", Default::Unset, "With AUTH=jwt: the audience (aud) tokens must name."),
    number("JWT_LEEWAY_SECS", "30", 0, 3_600, "Seconds of clock skew allowed on exp and nbf."),
    number(
        "RATE_LIMIT_PER_SEC",
        "0",
        0,
        1_000_000,
        "Requests and WebSocket/Socket.IO commands a second per principal (per address without one); 0: no limit.",
    ),
    number("RATE_LIMIT_BURST", "100", 1, 1_000_000, "How many of them a caller may send at once after a pause."),
    text(
        "JWT_TENANT_CLAIM",
        Default::Value("tenant"),
        "The claim naming the token's tenant (a name, or a JSON Pointer starting with /).",
    ),
    text(
        "JWT_ROLES_CLAIM",
        Default::Value("roles"),
        "The claim naming the token's roles, a string or a list (a name, or a JSON Pointer).",
    ),
    Setting {
        env: "LOG_LEVEL",
        default: Default::Value("info"),
        kind: Kind::Choice(&["trace", "debug", "info", "warn", "error"]),
        doc: "Log level.",
    },
    Setting {
        env: "LOG_FORMAT",
        default: Default::Value("text"),
        kind: Kind::Choice(&["text", "json"]),
        doc: "Log format.",
    },
    flag("REQUIRE_VERSION", "Require an expected version (If-Match) on writes to existing aggregates."),
    number("MAX_BODY_BYTES", "1048576", 2, 64 * MIB, "Largest request body in bytes."),
    number("MAX_JSON_DEPTH", "64", 1, 120, "Deepest JSON nesting in a body or document."),
    number("MAX_PATCH_OPS", "1000", 1, 100_000, "Most operations in one JSON Patch."),
    number("MAX_ARRAY_APPENDS", "1000", 0, 100_000, "Most `/-` array appends in one JSON Patch."),
    number("MAX_DOCUMENT_BYTES", "1048576", 2, 64 * MIB, "Largest document after a command, in bytes."),
    number(
        "MAX_PAGE_LIMIT",
        "1000",
        1,
        sourced_store::READ_LIMIT_MAX as u64,
        "Largest page a list, history or feed request may ask for.",
    ),
    number("BATCH_APPENDS_MAX", "512", 1, 10_000, "Most commands the embedded store commits in one transaction."),
    number("SHUTDOWN_TIMEOUT_SECS", "30", 0, 3_600, "Seconds to wait for in-flight requests at shutdown."),
    number(
        "HEADER_READ_TIMEOUT_MS",
        "10000",
        1,
        HOUR_MS,
        "Milliseconds a client may take to send a request's head, counted from its first byte.",
    ),
    number(
        "BODY_READ_TIMEOUT_MS",
        "30000",
        1,
        HOUR_MS,
        "Milliseconds a client may take to send a request body, from when the server starts reading it (408).",
    ),
    number(
        "IDLE_TIMEOUT_MS",
        "30000",
        1,
        HOUR_MS,
        "Milliseconds a connection with no request in flight may stay silent before it is closed.",
    ),
    number("WS_INFLIGHT_MAX", "64", 1, 65_536, "Most commands in flight on one WebSocket connection."),
    Setting {
        env: "WS_MESSAGE_BYTES_MAX",
        default: Default::Follows("MAX_BODY_BYTES"),
        kind: Kind::Number { min: 16, max: 64 * MIB },
        doc: "Largest WebSocket message or frame in bytes.",
    },
    number("WS_SUBSCRIPTIONS_MAX", "16", 0, 1_024, "Most subscriptions on one WebSocket connection."),
    number("WS_OUTBOUND_MAX", "256", 1, 65_536, "Most messages queued for one WebSocket client."),
    number(
        "WS_SLOW_CLIENT_TIMEOUT_MS",
        "10000",
        1,
        HOUR_MS,
        "Milliseconds a WebSocket client may leave a message unread before it is closed.",
    ),
    number("SSE_STREAMS_MAX", "1024", 0, 1 << 20, "Most SSE streams open at once; beyond it 503."),
    Setting {
        env: "SSE_SLOW_CLIENT_TIMEOUT_MS",
        default: Default::Follows("WS_SLOW_CLIENT_TIMEOUT_MS"),
        kind: Kind::Number { min: 1, max: HOUR_MS },
        doc: "Milliseconds an SSE client may leave a write blocked before its connection is closed.",
    },
    number(
        "LIVE_BUFFER_EVENTS",
        "4096",
        1,
        sourced_engine::subscriptions::LIVE_BUFFER_EVENTS_MAX as u64,
        "Events the shared live buffer of subscriptions keeps.",
    ),
    text(
        "INDEXES",
        Default::Unset,
        "Document fields to index for filtered lists, comma-separated paths (e.g. status,customer.id).",
    ),
    number(
        "SNAPSHOT_EVERY",
        "100",
        0,
        1_000_000,
        "Store a snapshot of an aggregate every this many events; 0 stores none.",
    ),
    number(
        "PROCESS_TRIES",
        "5",
        1,
        1_000,
        "Tries of a process step's commands failing for a transient reason before the instance parks.",
    ),
    number(
        "PROCESS_BACKOFF_MS",
        "200",
        1,
        3_600_000,
        "First wait before a process step's commands are tried again; it doubles with each try.",
    ),
    number(
        "PROCESS_BACKOFF_MAX_MS",
        "30000",
        1,
        86_400_000,
        "Longest wait before a process step's commands are tried again.",
    ),
];

/// The setting named `env`. Panics on a name the table lacks: that is a bug of the caller.
pub fn setting(env: &str) -> &'static Setting {
    SETTINGS.iter().find(|s| s.env == env).unwrap_or_else(|| panic!("no setting {env} in the table"))
}

/// The flag of a setting: `MAX_BODY_BYTES` → `max-body-bytes`.
pub fn flag_name(env: &str) -> String {
    env.to_ascii_lowercase().replace('_', "-")
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

/// An error about the value of `setting`.
pub fn bad(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { setting, value: value.to_owned(), reason: reason.into() }
}

/// Settings as given, unvalidated, by environment name: from flags, the environment and `.env`
/// (flags win), or built by hand ([`RawArgs::from_pairs`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawArgs {
    values: BTreeMap<&'static str, String>,
}

impl RawArgs {
    /// Settings with these values (tests, and callers that take a few settings from elsewhere).
    /// Panics on a name the table lacks.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> RawArgs {
        let mut raw = RawArgs::default();
        for (env, value) in pairs {
            raw.set(env, value);
        }
        raw
    }

    /// Sets one value. Panics on a name the table lacks.
    pub fn set(&mut self, env: &str, value: impl Into<String>) {
        self.values.insert(setting(env).env, value.into());
    }

    /// The value as given, if it was.
    pub fn given(&self, env: &str) -> Option<&str> {
        self.values.get(setting(env).env).map(String::as_str)
    }

    /// The text of a setting, trimmed: as given, else its default (none when unset).
    pub fn text(&self, env: &str) -> Option<String> {
        match self.given(env) {
            Some(v) => Some(v.trim().to_owned()),
            None => match setting(env).default {
                Default::Value(v) => Some(v.to_owned()),
                Default::Unset => None,
                Default::Follows(other) => self.text(other),
            },
        }
    }

    /// A number setting, within its bounds.
    pub fn number(&self, env: &str) -> Result<u64, ConfigError> {
        let s = setting(env);
        let Kind::Number { min, max } = s.kind else { panic!("{env} is not a number setting") };
        let Some(given) = self.given(env) else {
            return match s.default {
                Default::Value(v) => Ok(v.parse().expect("the table's number defaults parse")),
                Default::Follows(other) => self.number(other),
                Default::Unset => panic!("number setting {env} has no default"),
            };
        };
        match given.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(bad(s.env, given, format!("expected a whole number from {min} to {max}"))),
        }
    }

    /// A number setting as a `usize`.
    pub fn size(&self, env: &str) -> Result<usize, ConfigError> {
        // Every bound in the table fits a usize on the 64-bit targets Sourced builds for.
        self.number(env).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// A boolean setting.
    pub fn flag(&self, env: &str) -> Result<bool, ConfigError> {
        let s = setting(env);
        assert_eq!(s.kind, Kind::Bool, "{env} is not a boolean setting");
        match self.given(env).map(str::trim) {
            None => Ok(s.default == Default::Value("true")),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(bad(s.env, other, "expected true or false")),
        }
    }

    /// A choice setting: one of its words.
    pub fn choice(&self, env: &str) -> Result<&'static str, ConfigError> {
        let s = setting(env);
        let Kind::Choice(words) = s.kind else { panic!("{env} is not a choice setting") };
        let value = self.text(env).unwrap_or_default();
        words.iter().copied().find(|w| *w == value).ok_or_else(|| {
            let (last, rest) = words.split_last().expect("a choice has words");
            bad(s.env, &value, format!("expected {} or {last}", rest.join(", ")))
        })
    }
}

/// The text `--help` shows for a setting: its sentence and its default.
fn help(s: &Setting) -> String {
    let default = match s.default {
        Default::Value(v) => v.to_owned(),
        Default::Unset => "none".to_owned(),
        Default::Follows(other) => other.to_owned(),
    };
    let bounds = match s.kind {
        Kind::Number { min, max } => format!(" ({min} to {max})"),
        Kind::Choice(words) => format!(" ({})", words.join(", ")),
        Kind::Text | Kind::Bool => String::new(),
    };
    format!("{}{bounds} [default: {default}]", s.doc)
}

impl clap::Args for RawArgs {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for s in SETTINGS {
            cmd = cmd.arg(Arg::new(s.env).long(flag_name(s.env)).env(s.env).value_name(s.env).help(help(s)));
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for RawArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut raw = RawArgs::default();
        raw.update_from_arg_matches(matches)?;
        Ok(raw)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for s in SETTINGS {
            if let Ok(Some(v)) = matches.try_get_one::<String>(s.env) {
                self.values.insert(s.env, v.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_consistent() {
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.env).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "a setting is listed twice");
        let raw = RawArgs::default();
        for s in SETTINGS {
            assert!(s.env.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{}", s.env);
            if let Default::Follows(other) = s.default {
                let same = std::mem::discriminant(&setting(other).kind) == std::mem::discriminant(&s.kind);
                assert!(same, "{} follows a setting of another kind", s.env);
            }
            // Every default is valid by its own rule.
            match s.kind {
                Kind::Number { min, max } => {
                    let n = raw.number(s.env).unwrap();
                    assert!((min..=max).contains(&n), "{}'s default {n} is out of its bounds", s.env);
                }
                Kind::Bool => {
                    raw.flag(s.env).unwrap();
                }
                Kind::Choice(_) => {
                    raw.choice(s.env).unwrap();
                }
                Kind::Text => {}
            }
        }
    }

    #[test]
    fn values_are_read_by_their_kind() {
        let raw = RawArgs::from_pairs([("MAX_BODY_BYTES", " 4096 "), ("ADMIN_API", "yes"), ("LOG_FORMAT", "json")]);
        assert_eq!(raw.number("MAX_BODY_BYTES").unwrap(), 4096);
        assert_eq!(raw.number("WS_MESSAGE_BYTES_MAX").unwrap(), 4096, "follows MAX_BODY_BYTES");
        assert!(raw.flag("ADMIN_API").unwrap());
        assert_eq!(raw.choice("LOG_FORMAT").unwrap(), "json");
        assert_eq!(raw.text("ARTIFACTS"), None);
        let e = RawArgs::from_pairs([("LOG_LEVEL", "loud")]).choice("LOG_LEVEL").unwrap_err();
        assert_eq!(e.to_string(), r#"invalid LOG_LEVEL "loud": expected trace, debug, info, warn or error"#);
        let e = RawArgs::from_pairs([("MAX_JSON_DEPTH", "1000")]).number("MAX_JSON_DEPTH").unwrap_err();
        assert_eq!(e.to_string(), r#"invalid MAX_JSON_DEPTH "1000": expected a whole number from 1 to 120"#);
    }

    #[test]
    fn flags_and_help_come_from_the_table() {
        use clap::{Args, FromArgMatches};
        let cmd = RawArgs::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = cmd.clone().try_get_matches_from(["--max-body-bytes", "77", "--listen=[::1]:1"]).unwrap();
        let raw = RawArgs::from_arg_matches(&matches).unwrap();
        assert_eq!(raw, RawArgs::from_pairs([("MAX_BODY_BYTES", "77"), ("LISTEN", "[::1]:1")]));
        let help = cmd.clone().render_long_help().to_string();
        for s in SETTINGS {
            assert!(help.contains(&format!("--{}", flag_name(s.env))), "--help lacks {}", s.env);
        }
        assert!(help.contains("Largest request body in bytes. (2 to 67108864) [default: 1048576]"), "{help}");
    }

    /// README's settings table names every setting with its default, and no other.
    #[test]
    fn the_readme_lists_every_setting_with_its_default() {
        let readme = include_str!("../../../README.md");
        let mut listed: BTreeMap<String, String> = BTreeMap::new();
        for line in readme.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let ticked = |cell: &str| -> Vec<String> {
                cell.split('`').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>()
            };
            let names: Vec<String> = ticked(cells[1])
                .into_iter()
                .filter(|n| {
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                })
                .collect();
            if names.is_empty() {
                continue;
            }
            let defaults = if cells[2] == "none" { vec!["none".to_owned(); names.len()] } else { ticked(cells[2]) };
            assert_eq!(names.len(), defaults.len(), "README row {line:?}: one default per setting");
            for (n, d) in names.into_iter().zip(defaults) {
                assert!(listed.insert(n.clone(), d).is_none(), "README lists {n} twice");
            }
        }
        for s in SETTINGS {
            let want = match s.default {
                Default::Value(v) => v,
                Default::Unset => "none",
                Default::Follows(other) => other,
            };
            match listed.remove(s.env) {
                Some(d) => assert_eq!(d, want, "README's default of {}", s.env),
                None => panic!("README's settings table lacks {}", s.env),
            }
        }
        assert!(listed.is_empty(), "README lists settings the service does not have: {listed:?}");
    }
}
