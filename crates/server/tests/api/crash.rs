//! Crash safety (SPEC §7.1, §7.2): a child `sourced` process under write load is killed with
//! SIGKILL and restarted on the same file; every acknowledged command is there, none twice,
//! versions contiguous, positions gap-free.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::json;
use sourced_client::Client;

use crate::common::spawn_sourced;

#[derive(Debug, Default)]
struct Acked {
    /// Aggregate id → highest acknowledged version.
    versions: BTreeMap<String, u64>,
    /// Acknowledged command ids (from Idempotency-Key).
    commands: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_sigkill() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("crash.db");
    let (mut child, addr) = spawn_sourced(&db).await;

    const WRITERS: usize = 8;
    const COMMANDS_PER_WRITER_MAX: usize = 2_000;
    let (kill_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut stop = kill_tx.subscribe();
        writers.push(tokio::spawn(async move {
            let mut acked = Acked::default();
            let Ok(mut c) = Client::connect(addr).await else { return acked };
            let c = &mut c;
            let mut n = 0;
            'outer: for a in 0..COMMANDS_PER_WRITER_MAX {
                let id = format!("w{w}-a{a}");
                for step in 0..3 {
                    if stop.try_recv().is_ok() {
                        break 'outer;
                    }
                    n += 1;
                    let key = format!("cmd-{w}-{n}");
                    let r = if step == 0 {
                        let body = json!({"id": id, "step": 0}).to_string();
                        c.request(
                            "POST",
                            "/crash",
                            &[("idempotency-key", &key), ("content-type", "application/json")],
                            Some(body.as_bytes()),
                        )
                        .await
                    } else {
                        let body = json!([{"op": "replace", "path": "/step", "value": step}]).to_string();
                        c.request(
                            "PATCH",
                            &format!("/crash/{id}"),
                            &[("idempotency-key", &key), ("content-type", "application/json-patch+json")],
                            Some(body.as_bytes()),
                        )
                        .await
                    };
                    match r {
                        Ok(r) if r.status == 200 || r.status == 201 => {
                            acked.versions.insert(id.clone(), step + 1);
                            acked.commands.push(key);
                        }
                        Ok(r) => panic!("unexpected status {}: {}", r.status, r.text()),
                        Err(_) => break 'outer, // the server died
                    }
                }
            }
            acked
        }));
    }
    // Let load build up, then kill without warning.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.start_kill().unwrap();
    let _ = kill_tx.send(());
    child.wait().await.unwrap();
    let mut acked = Acked::default();
    for w in writers {
        let a = w.await.unwrap();
        acked.versions.extend(a.versions);
        acked.commands.extend(a.commands);
    }
    assert!(acked.commands.len() > 50, "too little load before the kill: {}", acked.commands.len());

    let (mut child, addr) = spawn_sourced(&db).await;
    let mut c = Client::connect(addr).await.unwrap();
    for (id, v) in &acked.versions {
        let doc = c.get(&format!("/crash/{id}")).await.unwrap();
        assert_eq!(doc.status, 200, "acknowledged aggregate {id} is missing");
        let got = doc.json()["_meta"]["version"].as_u64().unwrap();
        assert!(got >= *v, "{id}: acknowledged version {v}, found {got}");
    }
    // The whole feed: positions gap-free from 1, each command once, versions contiguous.
    let mut positions = Vec::new();
    let mut commands = HashSet::new();
    let mut stream_versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut after = 0u64;
    loop {
        let page = c.get(&format!("/events?after={after}&limit=1000")).await.unwrap().json();
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            break;
        }
        for e in &items {
            let p = e["position"].as_u64().unwrap();
            positions.push(p);
            after = p;
            let cmd = e["metadata"]["commandId"].as_str().unwrap().to_owned();
            assert!(commands.insert(cmd.clone()), "command {cmd} stored twice");
            stream_versions
                .entry(e["targetId"].as_str().unwrap().to_owned())
                .or_default()
                .push(e["version"].as_u64().unwrap());
        }
    }
    assert_eq!(positions, (1..=positions.len() as u64).collect::<Vec<_>>(), "positions are gap-free");
    for (id, vs) in &stream_versions {
        assert_eq!(vs, &(1..=vs.len() as u64).collect::<Vec<_>>(), "{id}: versions are contiguous");
    }
    // Every acknowledged command id is stored (ids derive from the Idempotency-Key).
    assert!(positions.len() >= acked.commands.len());
    for key in &acked.commands {
        let id = sourced_core::CommandId::from_idempotency_key(key).to_string();
        assert!(commands.contains(&id), "acknowledged command {key} is missing");
    }
    eprintln!(
        "crash: {} acknowledged commands before SIGKILL, {} events after restart",
        acked.commands.len(),
        positions.len()
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
