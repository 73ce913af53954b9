//! Data-driven scenarios: each directory under `crates/server/tests/data/scenarios/` holds a
//! `scenario.yaml` (the artifact set to load and the HTTP requests to send, in order) and three
//! snapshot files of what came out: `replies.json` (status, chosen headers and body of every
//! reply), `events.json` (the tenant's whole feed afterwards) and `state.json` (every document of
//! the types the requests touched, deleted ones included). One check function runs them all and
//! reports every scenario that differs, not only the first.
//!
//! Snapshots are deterministic: timestamps become `<time>` and each distinct UUID becomes
//! `<uuid-N>` in order of first appearance (so a command id seen twice keeps one name).
//! `SOURCED_BLESS=1 cargo test -p sourced-server --test api -- scenarios` rewrites the snapshots
//! from the actual output (refused under `CI=true`); review the diff before committing it.
//!
//! `scenario.yaml`:
//! ```yaml
//! description: what it shows
//! artifacts: examples/order        # a path from the repository root, or omit it and put the
//!                                  # set in an `artifacts/` directory beside scenario.yaml
//! steps:
//!   - request: POST /order         # method and path (with query)
//!     headers: {if-match: '"1"'}   # optional; content-type defaults to application/json
//!     body: {id: o1, customer: ada, lines: [], total: 0}   # optional; sent as JSON
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::common::TestApp;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    #[allow(dead_code)]
    description: String,
    artifacts: Option<String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    request: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<Value>,
}

/// Reply headers kept in the snapshot (the others vary or say nothing about the domain).
const HEADERS: &[&str] = &["content-type", "etag", "location", "idempotent-replayed"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/scenarios")
}

/// Replaces what differs between runs: timestamps, and UUIDs (numbered by first appearance).
struct Masker {
    uuids: BTreeMap<String, usize>,
}

impl Masker {
    fn mask(&mut self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if is_uuid(s) {
                    let n = self.uuids.len() + 1;
                    let n = *self.uuids.entry(s.clone()).or_insert(n);
                    *s = format!("<uuid-{n}>");
                } else if is_timestamp(s) {
                    *s = "<time>".to_owned();
                } else if s.contains('/') {
                    // Paths such as a Location header may end in a generated id.
                    let parts: Vec<String> = s
                        .split('/')
                        .map(|p| {
                            let mut v = Value::from(p);
                            self.mask(&mut v);
                            v.as_str().unwrap_or_default().to_owned()
                        })
                        .collect();
                    *s = parts.join("/");
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.mask(x)),
            Value::Object(m) => m.values_mut().for_each(|x| self.mask(x)),
            _ => {}
        }
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
}

fn is_timestamp(s: &str) -> bool {
    s.len() >= 20 && s.as_bytes()[4] == b'-' && s.contains('T') && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// Runs one scenario and returns its three snapshots, masked.
async fn run(dir: &Path) -> Result<BTreeMap<&'static str, Value>, String> {
    let text = std::fs::read_to_string(dir.join("scenario.yaml")).map_err(|e| format!("scenario.yaml: {e}"))?;
    let scenario: Scenario = yaml_serde::from_str(&text).map_err(|e| format!("scenario.yaml: {e}"))?;
    let set_dir = match &scenario.artifacts {
        Some(p) => root().join(p),
        None => dir.join("artifacts"),
    };
    let set = sourced_server::artifacts::load_dir(&set_dir)
        .map_err(|p| format!("the artifact set {} has problems: {p:#?}", set_dir.display()))?;
    let app = TestApp::with(|c| c.artifact_set = Arc::new(set));
    let mut replies = Vec::new();
    let mut types = BTreeSet::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let (method, path) =
            step.request.split_once(' ').ok_or_else(|| format!("step {i}: request is 'METHOD /path'"))?;
        let first = path.trim_start_matches('/').split(['/', '?']).next().unwrap_or("");
        if !first.is_empty() && !["commands", "events", "schemas", "openapi.json"].contains(&first) {
            types.insert(first.to_owned());
        }
        let body = step.body.as_ref().map(Value::to_string);
        let headers: Vec<(&str, &str)> = step.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = app.call(method, path, &headers, body.as_deref()).await;
        let mut h = Map::new();
        for name in HEADERS {
            if let Some(v) = r.header(name) {
                h.insert((*name).to_owned(), Value::from(v));
            }
        }
        replies.push(json!({"request": step.request, "status": r.status, "headers": h, "body": r.body}));
    }
    let events = app.get("/events?limit=1000").await.body["items"].clone();
    let mut state = Map::new();
    for t in &types {
        let page = app.get(&format!("/{t}?includeDeleted=true&limit=1000")).await;
        state.insert(t.clone(), page.body["items"].clone());
    }
    let mut masker = Masker { uuids: BTreeMap::new() };
    let mut out = BTreeMap::new();
    for (name, mut v) in [("replies", Value::Array(replies)), ("events", events), ("state", Value::Object(state))] {
        masker.mask(&mut v);
        out.insert(name, v);
    }
    Ok(out)
}

/// Runs every scenario; compares (or with `SOURCED_BLESS=1` writes) its snapshots, and fails
/// listing every scenario that differs.
#[tokio::test]
async fn scenarios() {
    let bless = std::env::var("SOURCED_BLESS").is_ok_and(|v| v == "1");
    assert!(
        !(bless && std::env::var("CI").is_ok_and(|v| v == "true")),
        "SOURCED_BLESS=1 is refused under CI=true: snapshots are written by people, and reviewed"
    );
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .expect("tests/data/scenarios exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("scenario.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6, "found only {} scenarios", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let actual = match run(dir).await {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        for (file, value) in actual {
            let path = dir.join(format!("{file}.json"));
            let text = serde_json::to_string_pretty(&value).unwrap() + "\n";
            if bless {
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(expected) if expected == text => {}
                Ok(expected) => failures.push(format!(
                    "{name}/{file}.json differs (rerun with SOURCED_BLESS=1 to accept):\n{}",
                    first_difference(&expected, &text)
                )),
                Err(_) => failures.push(format!("{name}/{file}.json is missing (SOURCED_BLESS=1 writes it)")),
            }
        }
    }
    assert!(failures.is_empty(), "{} scenario snapshot(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

/// The first differing line, with a little context, for a readable failure.
fn first_difference(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let i = e.iter().zip(&a).position(|(x, y)| x != y).unwrap_or(e.len().min(a.len()));
    let from = i.saturating_sub(3);
    let show = |lines: &[&str]| lines.iter().skip(from).take(i - from + 4).copied().collect::<Vec<_>>().join("\n");
    format!("line {}:\n--- expected\n{}\n+++ actual\n{}", i + 1, show(&e), show(&a))
}
