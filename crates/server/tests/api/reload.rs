//! Artifact sets from git (`ARTIFACTS=file:///…#ref`, a repository made here) and reloading a
//! set while serving: `POST /admin/reload`, SIGHUP to the binary, a broken set keeping the old
//! one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sourced_client::Client;
use tempfile::TempDir;

use crate::common::{config_in, spawn_sourced_with};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/order")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A repository holding the example set on `main`, tagged `v1`.
fn example_repo(root: &Path) -> PathBuf {
    let repo = root.join("repo");
    copy_dir(&example(), &repo);
    git(&repo, &["init", "--quiet"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "--quiet", "-m", "the order example"]);
    git(&repo, &["tag", "v1"]);
    repo
}

fn file_url(repo: &Path) -> String {
    format!("file://{}", repo.display())
}

const ARCHIVE: &str =
    "emit:\n  - event: OrderArchived\n    patch:\n      - {op: add, path: /cancelReason, value: archived}\n";

async fn create_order(c: &mut Client, id: &str) {
    let r = c
        .send_json("POST", "/order", &[], &json!({"id": id, "customer": "ada", "lines": [], "total": 0}))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
}

async fn start_with(dir: &TempDir, artifacts: &str, cache: &Path) -> sourced_server::RunningServer {
    let mut config = config_in(dir);
    config.admin_api = true;
    config.artifacts =
        Some(sourced_server::config::parse_artifacts(artifacts, cache.to_owned(), Duration::from_secs(60)).unwrap());
    sourced_server::start(config).await.expect("starts")
}

#[tokio::test]
async fn a_git_url_with_a_tag_serves_the_custom_commands() {
    let dir = TempDir::new().unwrap();
    let repo = example_repo(dir.path());
    // Later commits on main do not change what the tag names.
    std::fs::remove_file(repo.join("types/order/commands/pay.yaml")).unwrap();
    git(&repo, &["commit", "--quiet", "-am", "no more paying"]);
    let cache = dir.path().join("cache");
    let server = start_with(&dir, &format!("{}#v1", file_url(&repo)), &cache).await;
    let mut c = Client::connect(server.addr()).await.unwrap();
    c.send_json(
        "POST",
        "/order",
        &[],
        &json!({"id": "o1", "customer": "ada", "lines": [{"sku": "tea", "qty": 2, "price": 4.25}], "total": 8.5}),
    )
    .await
    .unwrap();
    assert_eq!(c.send_json("POST", "/order/o1/submit", &[], &json!({})).await.unwrap().json()["status"], "submitted");
    let paid = c.send_json("POST", "/order/o1/pay", &[], &json!({"amount": 8.5})).await.unwrap();
    assert_eq!(paid.status, 200, "{}", paid.text());
    assert_eq!(paid.json()["status"], "paid");
    // One clone in the cache, named by a hash of the URL and ref, holding a detached checkout.
    let clones: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(clones.len(), 1, "{clones:?}");
    assert!(clones[0].join("types/order/commands/pay.yaml").is_file());
    server.shutdown().await;
}

#[tokio::test]
async fn reloading_a_branch_fetches_its_new_commits() {
    let dir = TempDir::new().unwrap();
    let repo = example_repo(dir.path());
    let cache = dir.path().join("cache");
    let server = start_with(&dir, &format!("{}#main", file_url(&repo)), &cache).await;
    let mut c = Client::connect(server.addr()).await.unwrap();
    create_order(&mut c, "o1").await;
    let r = c.send_json("POST", "/order/o1/archive", &[], &json!({})).await.unwrap();
    assert_eq!(r.json()["type"], "urn:sourced:problem:unknown-command");

    std::fs::write(repo.join("types/order/commands/archive.yaml"), ARCHIVE).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "--quiet", "-m", "archive"]);
    let r = c.request("POST", "/admin/reload", &[], None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let summary = r.json();
    assert_eq!(summary["types"][0]["commands"], json!(["archive", "cancel", "pay", "ship", "submit"]));
    assert!(summary["origin"].as_str().unwrap().contains("#main at "), "{summary}");
    let r = c.send_json("POST", "/order/o1/archive", &[], &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // The repository disappears: a reload keeps the set and says why (502), the server serves on.
    std::fs::rename(&repo, dir.path().join("gone")).unwrap();
    let r = c.request("POST", "/admin/reload", &[], None).await.unwrap();
    assert_eq!(r.status, 200, "the cached checkout of main is used: {}", r.text());
    assert!(r.json()["staleBecause"].as_str().unwrap().contains("git fetch failed"), "{}", r.text());
    server.shutdown().await;

    // A restart while the git host is down starts from the cached checkout, with a warning.
    let loaded = sourced_server::artifacts::load(
        &sourced_server::config::parse_artifacts(
            &format!("{}#main", file_url(&repo)),
            cache.clone(),
            Duration::from_secs(60),
        )
        .unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert!(loaded.stale.is_some());
    assert!(loaded.set.types().next().unwrap().1.commands.contains_key("archive"));
    // A ref never cached, while the repository is gone: the clone fails.
    let e = sourced_server::artifacts::load(
        &sourced_server::config::parse_artifacts(&format!("{}#v9", file_url(&repo)), cache, Duration::from_secs(60))
            .unwrap(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("git clone failed:"), "{e}");
}

#[test]
fn a_bad_ref_or_repository_fails_start_up_with_one_line() {
    let dir = TempDir::new().unwrap();
    let repo = example_repo(dir.path());
    let run = |artifacts: String| {
        Command::new(env!("CARGO_BIN_EXE_sourced"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ARTIFACTS", &artifacts)
            .env("ARTIFACTS_CACHE", dir.path().join("cache"))
            .env("LISTEN", "127.0.0.1:0")
            .env("EVENT_STORE_URL", format!("sqlite://{}", dir.path().join("x.db").display()))
            .output()
            .unwrap()
    };
    let out = run(format!("{}#v9", file_url(&repo)));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ARTIFACTS=file://") && err.contains("no branch, tag or commit named 'v9'"), "{err}");

    let out = run(format!("{}#v1", file_url(&dir.path().join("nothing-here"))));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ARTIFACTS=") && err.contains("git clone failed:"), "{err}");
    assert!(err.contains("does not appear to be a git repository") || err.contains("not found"), "{err}");
    // Nothing half-made is left in the cache.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().collect();
    assert_eq!(left.len(), 1, "only the clone of the first run: {left:?}");

    // `sourced check` takes the same URLs.
    let check = |url: String| {
        Command::new(env!("CARGO_BIN_EXE_sourced"))
            .args(["check", &url, "--artifacts-cache"])
            .arg(dir.path().join("cache"))
            .output()
            .unwrap()
    };
    let ok = check(format!("{}#v1", file_url(&repo)));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("(1 types, 4 custom commands)"));
    let bad = check(format!("{}#v9", file_url(&repo)));
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test]
async fn a_broken_set_keeps_the_old_one_and_lists_every_problem() {
    let dir = TempDir::new().unwrap();
    let set = dir.path().join("set");
    copy_dir(&example(), &set);
    let server = start_with(&dir, &set.display().to_string(), &dir.path().join("cache")).await;
    let mut c = Client::connect(server.addr()).await.unwrap();
    create_order(&mut c, "o1").await;
    std::fs::write(set.join("types/order/commands/archive.yaml"), ARCHIVE).unwrap();
    assert_eq!(c.request("POST", "/admin/reload", &[], None).await.unwrap().status, 200);
    assert_eq!(c.send_json("POST", "/order/o1/archive", &[], &json!({})).await.unwrap().status, 200);

    // Break it twice over: the reload is refused with both problems, and archive still works.
    std::fs::write(set.join("types/order/rules.yaml"), "rules: [\n").unwrap();
    std::fs::write(set.join("types/order/commands/archive.yaml"), "emit: []\n").unwrap();
    let r = c.request("POST", "/admin/reload", &[], None).await.unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let body = r.json();
    assert_eq!(body["type"], "urn:sourced:problem:invalid-artifacts");
    let problems: Vec<(Value, Value)> =
        body["problems"].as_array().unwrap().iter().map(|p| (p["file"].clone(), p["location"].clone())).collect();
    assert_eq!(
        problems,
        [
            (json!("types/order/commands/archive.yaml"), json!("/emit")),
            (json!("types/order/rules.yaml"), json!("line 2 column 1")),
        ],
        "{body}"
    );
    let r = c.send_json("POST", "/order/o1/archive", &[], &json!({})).await.unwrap();
    assert_eq!(r.status, 200, "the old set still defines archive: {}", r.text());
    assert_eq!(r.json()["_meta"]["version"], 3);
    server.shutdown().await;
}

#[tokio::test]
async fn the_admin_endpoint_exists_only_when_enabled() {
    let dir = TempDir::new().unwrap();
    let mut config = config_in(&dir);
    config.artifacts = Some(sourced_server::artifacts::ArtifactsSource::Dir(example()));
    let server = sourced_server::start(config).await.unwrap();
    let mut c = Client::connect(server.addr()).await.unwrap();
    let r = c.request("POST", "/admin/reload", &[], None).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.json()["detail"].as_str().unwrap().contains("ADMIN_API=true"), "{}", r.text());
    server.shutdown().await;
    // Enabled without ARTIFACTS: nothing to reload.
    let app = crate::common::TestApp::with(|c| c.admin_api = true);
    app.call("POST", "/admin/reload", &[], None).await.problem(409, "no-artifacts-source");
}

#[tokio::test]
async fn sighup_reloads_the_set() {
    let dir = TempDir::new().unwrap();
    let set = dir.path().join("set");
    copy_dir(&example(), &set);
    let env = [
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", dir.path().join("s.db").display())),
        ("ARTIFACTS".to_owned(), set.display().to_string()),
    ];
    let (mut child, addr) = spawn_sourced_with(&env, None).await;
    let mut c = Client::connect(addr).await.unwrap();
    create_order(&mut c, "o1").await;
    std::fs::write(set.join("types/order/commands/archive.yaml"), ARCHIVE).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    // The reload runs beside serving: poll, bounded.
    let mut status = 0;
    for _ in 0..100 {
        status = c.send_json("POST", "/order/o1/archive", &[], &json!({})).await.unwrap().status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "archive is served within 10 s of SIGHUP");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// Issue 18's bug: tried as a new user would, in an empty working directory, with every path
/// setting at its relative default (`./data/sourced.db`, `./data/artifacts-cache`), a git set
/// failed to load and left `data/artifacts-cache/data/artifacts-cache/…` behind.
#[tokio::test]
async fn a_git_set_loads_with_the_relative_default_paths_in_a_fresh_directory() {
    let dir = TempDir::new().unwrap();
    let repo = example_repo(dir.path());
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    let env = [("ARTIFACTS".to_owned(), format!("{}#v1", file_url(&repo)))];
    let (mut child, addr) = spawn_sourced_with(&env, Some(&fresh)).await;
    let mut c = Client::connect(addr).await.unwrap();
    create_order(&mut c, "o1").await;
    let submitted = c.send_json("POST", "/order/o1/submit", &[], &json!({})).await.unwrap();
    assert!(submitted.status < 500, "a custom command of the set is served: {}", submitted.text());
    assert!(fresh.join("data/sourced.db").is_file());
    let cache: Vec<String> = std::fs::read_dir(fresh.join("data/artifacts-cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cache.len(), 1, "one clone in the cache, nothing nested: {cache:?}");
    assert!(!fresh.join("data/artifacts-cache/data").exists());
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[test]
fn a_git_command_that_hangs_is_killed_at_the_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("git");
    std::fs::write(&fake, "#!/bin/sh\nsleep 600\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sourced"))
        .env_clear()
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .env("ARTIFACTS", "file:///nowhere#v1")
        .env("ARTIFACTS_CACHE", dir.path().join("cache"))
        .env("ARTIFACTS_GIT_TIMEOUT_SECS", "1")
        .env("LISTEN", "127.0.0.1:0")
        .env("EVENT_STORE_URL", format!("sqlite://{}", dir.path().join("x.db").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        "sourced: cannot load ARTIFACTS=file:///nowhere#v1: git clone did not finish within 1 s (killed)"
    );
    // Not a timing assertion: far below the fake git's 600 s, so the kill happened.
    assert!(started.elapsed() < Duration::from_secs(300));
}

/// Processes that share `ARTIFACTS_CACHE` take turns with a clone: concurrent checkouts of one
/// URL and ref (the first clones; the others fetch, check out and clean the same working tree)
/// all succeed, and each reads the whole set while it holds its checkout. Threads stand in for
/// processes: the lock is `flock`, held per open file, so it keeps threads apart too.
#[test]
fn checkouts_that_share_a_cache_take_turns() {
    let dir = TempDir::new().unwrap();
    let repo = example_repo(dir.path());
    let source = sourced_server::config::parse_artifacts(
        &format!("{}#v1", file_url(&repo)),
        dir.path().join("cache"),
        Duration::from_secs(60),
    )
    .unwrap();
    let sourced_server::artifacts::ArtifactsSource::Git(git_source) = source else { panic!("a git source") };
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let g = git_source.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let checkout = g.checkout().unwrap_or_else(|e| panic!("a checkout failed: {e}"));
                    let set = sourced_server::artifacts::load_dir(&checkout.dir)
                        .unwrap_or_else(|p| panic!("the set as read: {p:?}"));
                    assert_eq!(set.types().count(), 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().collect();
    assert_eq!(entries.len(), 1, "one clone, nothing else: {entries:?}");
}
