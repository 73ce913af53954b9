//! The auth benchmark (issue 16): the main benchmark's HTTP workload with JWT authentication
//! on, HS256 (`JWT_HS256_SECRET`) and ES256 (a P-256 key made here with ring, its JWKS written
//! to a file for `JWT_JWKS`), beside authentication off, in one run, at each concurrency level.
//! Each client sends its own token (`sub` = the client) in `Authorization: Bearer` with every
//! request; the role of the tokens is granted exactly what the workload does (`create`,
//! `patch` on `bench`) by the run's `permissions.yaml`. The three schemes also run with that
//! artifact set when authentication is off, so the only difference is authentication.
//!
//! The machine is shared and noisy: each level runs `rounds` rounds, each measuring off, HS256
//! and ES256 in turn, each on a fresh server and database, and the rounds of one scheme are
//! pooled (requests over the summed windows, latencies merged). A second, smaller table times
//! the verification itself outside HTTP: one signature check, and the verified-token cache's
//! lookup that every request after the first pays instead.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::json;
use sourced_auth::{JwtSettings, JwtVerifier, StaticKeys};
use sourced_server::artifacts::ArtifactsSource;
use sourced_server::auth::Gate;
use sourced_server::config::{Config, RawArgs};

use crate::{HttpMeasure, Machine, load, optional_cell, workload};

/// Most rounds a run may ask for.
pub(crate) const ROUNDS_MAX: usize = 100;
/// Signature checks (and cache lookups) timed per scheme in the verification table.
const VERIFY_ITERATIONS: u32 = 2_000;
/// How long the tokens live past the end of the run: long enough never to expire in it.
const TOKEN_SPARE_SECS: i64 = 3_600;
const ISSUER: &str = "https://issuer.bench.sourced.test";
const AUDIENCE: &str = "sourced-bench";
const TENANT: &str = "bench";
const ROLE: &str = "writer";

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthOptions {
    /// The concurrency levels.
    pub clients: Vec<usize>,
    /// The measured window of each measurement.
    pub duration: Duration,
    /// The warm-up before each measured window (the first request of each token verifies its
    /// signature; later ones hit the cache).
    pub warmup: Duration,
    /// Rounds of (off, HS256, ES256) per level, pooled per scheme.
    pub rounds: usize,
}

impl AuthOptions {
    /// A tiny run that only checks the path works: 1 client, one round of 0.3 s each.
    pub fn smoke() -> AuthOptions {
        AuthOptions {
            clients: vec![1],
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            rounds: 1,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if let Some(bad) = self.clients.iter().find(|&&c| !(1..=crate::CLIENTS_MAX).contains(&c)) {
            problems.push(format!("clients must be 1..={}, not {bad}", crate::CLIENTS_MAX));
        }
        if self.clients.is_empty() {
            problems.push("no concurrency level to run".to_owned());
        }
        if self.duration.is_zero() || self.duration > crate::DURATION_MAX || self.warmup > crate::DURATION_MAX {
            problems.push(format!("durations must be above 0 and at most {} s", crate::DURATION_MAX.as_secs()));
        }
        if !(1..=ROUNDS_MAX).contains(&self.rounds) {
            problems.push(format!("rounds must be 1..={ROUNDS_MAX}, not {}", self.rounds));
        }
        ensure!(problems.is_empty(), "invalid options: {}", problems.join("; "));
        Ok(())
    }
}

/// How requests authenticate in one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthScheme {
    /// `AUTH=none`: no credential, no check (the baseline).
    Off,
    /// `AUTH=jwt` with `JWT_HS256_SECRET`.
    Hs256,
    /// `AUTH=jwt` with `JWT_JWKS`: one P-256 key.
    Es256,
}

impl AuthScheme {
    /// Every scheme, in the order a round measures them.
    pub const ALL: [AuthScheme; 3] = [AuthScheme::Off, AuthScheme::Hs256, AuthScheme::Es256];

    /// Its name in the table.
    pub fn label(self) -> &'static str {
        match self {
            AuthScheme::Off => "off",
            AuthScheme::Hs256 => "JWT HS256",
            AuthScheme::Es256 => "JWT ES256",
        }
    }
}

/// One scheme at one level, its rounds pooled.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthRow {
    /// Clients.
    pub clients: usize,
    /// How they authenticated.
    pub scheme: AuthScheme,
    /// The HTTP load, pooled over the rounds.
    pub measure: HttpMeasure,
    /// Appends the stores committed over the whole runs: one per successful request.
    pub store_appends_total: u64,
}

/// What one token costs outside HTTP, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VerifyCost {
    /// The scheme (never [`AuthScheme::Off`]).
    pub scheme: AuthScheme,
    /// One full verification: parse, signature, claims.
    pub verify_us: f64,
    /// One lookup of an already verified token in the server's cache (hash and LRU).
    pub cached_us: f64,
}

/// A whole auth run.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthReport {
    /// Where it ran.
    pub machine: Machine,
    /// What was asked.
    pub options: AuthOptions,
    /// One row per level and scheme.
    pub rows: Vec<AuthRow>,
    /// The verification costs, HS256 and ES256.
    pub verify: Vec<VerifyCost>,
}

impl AuthReport {
    /// Everything that makes the numbers untrustworthy: failed requests, and store counts that
    /// do not match the successful requests. Empty for a good run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for row in &self.rows {
            let (clients, scheme) = (row.clients, row.scheme.label());
            if row.measure.errors > 0 {
                problems.push(format!(
                    "{clients} clients, auth {scheme}: {} failed requests, e.g. {}",
                    row.measure.errors,
                    row.measure.error_samples.join(" | ")
                ));
            }
            if row.store_appends_total != row.measure.succeeded_total {
                problems.push(format!(
                    "{clients} clients, auth {scheme}: the store committed {} appends but clients saw {} successes",
                    row.store_appends_total, row.measure.succeeded_total
                ));
            }
        }
        problems
    }

    /// The throughput lost against auth off at the same level, as a fraction (negative when
    /// the scheme was faster); `None` without an off row.
    pub fn loss(&self, row: &AuthRow) -> Option<f64> {
        let off = self.rows.iter().find(|r| r.clients == row.clients && r.scheme == AuthScheme::Off)?;
        let off = off.measure.per_sec();
        (off > 0.0).then(|| 1.0 - row.measure.per_sec() / off)
    }

    /// The report as Markdown: the set-up, the HTTP table, the verification table.
    pub fn to_markdown(&self) -> String {
        let (m, o) = (&self.machine, &self.options);
        let mut out = String::new();
        let _ = writeln!(out, "## Sourced auth benchmark\n");
        let _ = writeln!(out, "- machine: {} cores (nproc), {}, {}", m.cores, m.cpu, m.os);
        let load = m.load_average.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "- date: {}; build: {}; load average at start: {load}", m.date, m.profile);
        let _ = writeln!(
            out,
            "- per measurement: {:.1} s warm-up, then {:.1} s measured, fresh server and database; {} round(s) of \
             (off, HS256, ES256), pooled per scheme",
            o.warmup.as_secs_f64(),
            o.duration.as_secs_f64(),
            o.rounds
        );
        let _ = writeln!(
            out,
            "- workload, per client (one keep-alive connection): loop {{ POST /{ty} ({bytes}-byte document); PATCH \
             /{ty}/{{id}} with If-Match }}; with auth on every request carries `Authorization: Bearer` with the \
             client's own token (iss, aud, exp, sub, tenant, roles), granted create and patch by permissions.yaml\n",
            ty = workload::TYPE_NAME,
            bytes = workload::DOCUMENT_BYTES,
        );
        let _ = writeln!(out, "| clients | auth | cmd/s | p50 ms | p99 ms | CPU µs/cmd | loss vs off |");
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let loss = match row.scheme {
                AuthScheme::Off => "–".to_owned(),
                _ => optional_cell(self.loss(row).map(|l| l * 100.0), 1) + "%",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {loss} |",
                row.clients,
                row.scheme.label(),
                row.measure.per_sec(),
                row.measure.p50_ms,
                row.measure.p99_ms,
                optional_cell(row.measure.cpu_us, 0),
            );
        }
        let _ = writeln!(
            out,
            "\nOne token, outside HTTP ({VERIFY_ITERATIONS} iterations each): a full verification, and the cache \
             lookup every later request with the same token pays instead.\n"
        );
        let _ = writeln!(out, "| auth | verify µs | cached µs |");
        let _ = writeln!(out, "|---|---:|---:|");
        for cost in &self.verify {
            let _ = writeln!(out, "| {} | {:.2} | {:.2} |", cost.scheme.label(), cost.verify_us, cost.cached_us);
        }
        crate::write_problems(&mut out, &self.problems());
        out
    }
}

/// The run's credentials and artifacts, in a temporary directory: the HS256 secret, the P-256
/// key and its JWKS file, and the artifact set whose `permissions.yaml` grants the workload.
struct Fixture {
    dir: tempfile::TempDir,
    secret: String,
    es256: EcdsaKeyPair,
}

impl Fixture {
    fn new() -> anyhow::Result<Fixture> {
        let rng = SystemRandom::new();
        let mut secret = [0u8; 32];
        rng.fill(&mut secret).map_err(|_| anyhow::anyhow!("no randomness for the HS256 secret"))?;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
        let es256 = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot read the P-256 key just generated"))?;
        let fixture = Fixture { dir: tempfile::tempdir()?, secret: URL_SAFE_NO_PAD.encode(secret), es256 };
        // The public key is the uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = fixture.es256.public_key().as_ref();
        ensure!(point.len() == 65 && point[0] == 4, "unexpected P-256 public key encoding");
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "bench",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]});
        std::fs::write(fixture.jwks_path(), jwks.to_string())?;
        let artifacts = fixture.artifacts_dir();
        std::fs::create_dir_all(&artifacts)?;
        let grant =
            format!("roles:\n  {ROLE}:\n    - {{types: [{}], actions: [create, patch]}}\n", workload::TYPE_NAME);
        std::fs::write(artifacts.join("permissions.yaml"), grant)?;
        Ok(fixture)
    }

    fn jwks_path(&self) -> PathBuf {
        self.dir.path().join("jwks.json")
    }

    fn artifacts_dir(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    /// The settings a deployment would give for `scheme`.
    fn settings(&self, scheme: AuthScheme) -> RawArgs {
        let jwks = self.jwks_path().display().to_string();
        let mut pairs = vec![("AUTH", "jwt"), ("JWT_ISSUER", ISSUER), ("JWT_AUDIENCE", AUDIENCE)];
        match scheme {
            AuthScheme::Off => pairs = vec![("AUTH", "none")],
            AuthScheme::Hs256 => pairs.push(("JWT_HS256_SECRET", &self.secret)),
            AuthScheme::Es256 => pairs.push(("JWT_JWKS", &jwks)),
        }
        RawArgs::from_pairs(pairs)
    }

    /// A server configuration for `scheme` on a fresh database at `db`.
    fn config(&self, scheme: AuthScheme, db: &Path) -> anyhow::Result<Config> {
        let mut config = Config::embedded(SocketAddr::from(([127, 0, 0, 1], 0)), db.to_owned());
        config.gate = Arc::new(Gate::from_settings(&self.settings(scheme))?);
        config.artifacts = Some(ArtifactsSource::Dir(self.artifacts_dir()));
        Ok(config)
    }

    /// A signed token for `subject`, valid until `exp` (seconds since the epoch).
    fn token(&self, scheme: AuthScheme, subject: &str, exp: i64) -> anyhow::Result<String> {
        let (alg, kid) = match scheme {
            AuthScheme::Off => anyhow::bail!("no token without auth"),
            AuthScheme::Hs256 => ("HS256", None),
            AuthScheme::Es256 => ("ES256", Some("bench")),
        };
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": exp, "tenant": TENANT,
            "roles": [ROLE]});
        let signing =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = match scheme {
            AuthScheme::Hs256 => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
                ring::hmac::sign(&key, signing.as_bytes()).as_ref().to_vec()
            }
            _ => self
                .es256
                .sign(&SystemRandom::new(), signing.as_bytes())
                .map_err(|_| anyhow::anyhow!("cannot sign with the P-256 key"))?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{signing}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// Each client's `Authorization` value: its own token. None when auth is off.
    fn authorizations(&self, scheme: AuthScheme, clients: usize, exp: i64) -> anyhow::Result<Vec<String>> {
        if scheme == AuthScheme::Off {
            return Ok(Vec::new());
        }
        (0..clients).map(|c| Ok(format!("Bearer {}", self.token(scheme, &format!("bench-client-{c}"), exp)?))).collect()
    }
}

/// Runs every level's rounds, then the verification table, with progress on stderr.
pub fn run_auth(options: &AuthOptions) -> anyhow::Result<AuthReport> {
    options.validate()?;
    let machine = Machine::detect();
    let fixture = Fixture::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let timing = load::Timing { warmup: options.warmup, duration: options.duration };
    let per_measure = (options.warmup + options.duration).as_secs() as i64 + 1;
    let levels = options.clients.len() as i64 * AuthScheme::ALL.len() as i64 * options.rounds as i64;
    let exp = chrono::Utc::now().timestamp() + levels * per_measure + TOKEN_SPARE_SECS;
    let mut rows = Vec::new();
    for &clients in &options.clients {
        let mut pooled: [Option<(load::LoadResult, u64)>; 3] = Default::default();
        for round in 1..=options.rounds {
            for (slot, scheme) in pooled.iter_mut().zip(AuthScheme::ALL) {
                eprintln!("[{clients} clients] round {round}/{}: auth {}…", options.rounds, scheme.label());
                let authorizations = fixture.authorizations(scheme, clients, exp)?;
                let (result, appends) =
                    runtime.block_on(measure(&fixture, scheme, clients, timing, &authorizations))?;
                match slot {
                    None => *slot = Some((result, appends)),
                    Some((total, total_appends)) => {
                        total.absorb(result);
                        *total_appends += appends;
                    }
                }
            }
        }
        let seconds = options.duration.as_secs_f64() * options.rounds as f64;
        for (slot, scheme) in pooled.into_iter().zip(AuthScheme::ALL) {
            let (result, store_appends_total) = slot.expect("at least one round");
            rows.push(AuthRow {
                clients,
                scheme,
                measure: HttpMeasure::from_load(result, seconds),
                store_appends_total,
            });
        }
    }
    let verify = [AuthScheme::Hs256, AuthScheme::Es256]
        .into_iter()
        .map(|scheme| verify_cost(&fixture, scheme, exp))
        .collect::<anyhow::Result<_>>()?;
    Ok(AuthReport { machine, options: options.clone(), rows, verify })
}

/// One measurement: a fresh database and server for `scheme`, the load, the store's appends.
async fn measure(
    fixture: &Fixture,
    scheme: AuthScheme,
    clients: usize,
    timing: load::Timing,
    authorizations: &[String],
) -> anyhow::Result<(load::LoadResult, u64)> {
    let db = tempfile::tempdir()?;
    let server = sourced_server::start(fixture.config(scheme, &db.path().join("sourced.db"))?).await?;
    if scheme != AuthScheme::Off {
        // The run measures authentication only if the server asks for it.
        let mut client = sourced_client::Client::connect(server.addr()).await?;
        let body = workload::document("unauthenticated-probe", 0);
        let path = format!("/{}", workload::TYPE_NAME);
        let refused = client.request("POST", &path, &[("content-type", "application/json")], Some(&body)).await?;
        ensure!(refused.status == 401, "auth {}: a request without a token got {}", scheme.label(), refused.status);
    }
    let (result, _, _) = load::run(server.addr(), clients, timing, authorizations, || ()).await?;
    let appends = server.store_stats().appends;
    server.shutdown().await;
    Ok((result, appends))
}

/// Times [`VERIFY_ITERATIONS`] verifications by the verifier the server's gate holds (no cache
/// in front), then as many requests' worth of lookups of one token the gate has verified.
fn verify_cost(fixture: &Fixture, scheme: AuthScheme, exp: i64) -> anyhow::Result<VerifyCost> {
    let token = fixture.token(scheme, "bench-verify", exp)?;
    let now = chrono::Utc::now().timestamp();
    let keys = match scheme {
        AuthScheme::Hs256 => StaticKeys::hs256(fixture.secret.as_bytes()),
        _ => StaticKeys::from_jwks(&std::fs::read_to_string(fixture.jwks_path())?),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let verifier = JwtVerifier::new(JwtSettings::new(ISSUER, AUDIENCE), Arc::new(keys));
    let started = Instant::now();
    for _ in 0..VERIFY_ITERATIONS {
        verifier.verify(&token, now).with_context(|| format!("{} token refused", scheme.label()))?;
    }
    let verify_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(VERIFY_ITERATIONS);
    let gate = Gate::from_settings(&fixture.settings(scheme))?;
    let started = Instant::now();
    for _ in 0..VERIFY_ITERATIONS {
        match gate.authenticate_at(&token, now) {
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("{} token refused by the gate: {e}", scheme.label()),
            None => anyhow::bail!("the gate has auth off"),
        }
    }
    let cached_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(VERIFY_ITERATIONS);
    Ok(VerifyCost { scheme, verify_us, cached_us })
}
