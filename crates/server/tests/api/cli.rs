//! The `sourced` binary: configuration errors, `.env`, and graceful shutdown on SIGTERM.

use std::time::Duration;

use serde_json::json;
use sourced_client::Client;

use crate::common::spawn_sourced_with;

fn run_with_env(env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"));
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_settings_fail_with_one_line_naming_them() {
    for (setting, value) in [
        ("LISTEN", "nowhere"),
        ("EVENT_STORE_URL", "mysql://db"),
        ("LOG_LEVEL", "chatty"),
        ("LOG_FORMAT", "xml"),
        ("MAX_BODY_BYTES", "lots"),
    ] {
        let out = run_with_env(&[(setting, value)]);
        assert_eq!(out.status.code(), Some(2), "{setting}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(setting) && err.contains(value), "{err}");
    }
    // A flag wins over the environment.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .env_clear()
        .env("LISTEN", "127.0.0.1:1")
        .args(["--listen", "bad-flag"])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stderr).unwrap().contains("bad-flag"));
}

#[tokio::test]
async fn dotenv_is_read_from_the_working_directory() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join(".env"), "EVENT_STORE_URL=sqlite://./from-dotenv/s.db\n").unwrap();
    let (mut child, addr) = spawn_sourced_with(&[], Some(dir.path())).await;
    let mut c = Client::connect(addr).await.unwrap();
    assert_eq!(c.send_json("POST", "/t", &[], &json!({"id": "x"})).await.unwrap().status, 201);
    assert!(dir.path().join("from-dotenv/s.db").exists());
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_commands() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("term.db");
    let env = [("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", db.display()))];
    let (mut child, addr) = spawn_sourced_with(&env, None).await;
    let mut writers = Vec::new();
    for w in 0..8 {
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let Ok(mut c) = Client::connect(addr).await else { return acked };
            for i in 0..5_000 {
                let id = format!("w{w}-{i}");
                match c.send_json("POST", "/t", &[], &json!({"id": id})).await {
                    Ok(r) if r.status == 201 => acked.push(id),
                    Ok(r) => panic!("unexpected {}: {}", r.status, r.text()),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status =
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert!(status.success(), "clean exit, got {status}");
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(!acked.is_empty());
    let (mut child, addr) = spawn_sourced_with(&env, None).await;
    let mut c = Client::connect(addr).await.unwrap();
    for id in &acked {
        assert_eq!(c.get(&format!("/t/{id}")).await.unwrap().status, 200, "{id} was acknowledged");
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// `sourced key new` prints a key and its keys-file line; a server with `AUTH=keys` and that
/// line accepts the key (as a bearer token and as `X-Api-Key`) and answers 401 without it.
#[tokio::test]
async fn a_new_key_opens_a_server_with_auth_keys() {
    let dir = tempfile::TempDir::new().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .args(["key", "new", "--principal", "billing", "--tenant", "acme", "--role", "ops"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (key, line) = text.trim().split_once('\n').unwrap();
    assert!(key.starts_with("sk_") && !line.contains(key), "{text}");
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, format!("{line}\n")).unwrap();
    let env = [
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", dir.path().join("s.db").display())),
        ("AUTH".to_owned(), "keys".to_owned()),
        ("AUTH_KEYS_FILE".to_owned(), keys.display().to_string()),
    ];
    let (mut child, addr) = spawn_sourced_with(&env, None).await;
    let mut c = Client::connect(addr).await.unwrap();
    let bearer = format!("Bearer {key}");
    let r = c.send_json("POST", "/t", &[("authorization", bearer.as_str())], &json!({"id": "x"})).await.unwrap();
    assert_eq!(r.status, 201);
    let r = c.send_json("GET", "/t/x", &[("x-api-key", key)], &json!(null)).await.unwrap();
    assert_eq!(r.status, 200);
    let r = c.send_json("GET", "/t/x", &[], &json!(null)).await.unwrap();
    assert_eq!(r.status, 401);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // A keys file that is not one: the server does not start, and says which setting.
    std::fs::write(&keys, "- {hash: nonsense}\n").unwrap();
    let out = run_with_env(&[("AUTH", "keys"), ("AUTH_KEYS_FILE", keys.to_str().unwrap())]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_KEYS_FILE"));
}
