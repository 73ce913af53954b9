//! Races over real sockets (SPEC §7.2): many clients patching one aggregate with expected
//! versions get exactly one winner per version, contiguous versions, and a 409/412 for every
//! loser.

use std::collections::BTreeMap;

use serde_json::json;
use sourced_client::Client;

use crate::common::TestBackend;

const TASKS: usize = 32;
const ATTEMPTS_PER_TASK: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_winner_per_version() {
    let backend = TestBackend::new().await;
    let server = sourced_server::start(backend.config()).await.unwrap();
    let addr = server.addr();
    let mut c = Client::connect(addr).await.unwrap();
    let r = c.send_json("POST", "/race", &[], &json!({"id": "r1", "hits": []})).await.unwrap();
    assert_eq!(r.status, 201);

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            let mut wins = Vec::new();
            let mut losses = 0usize;
            for _ in 0..ATTEMPTS_PER_TASK {
                let g = c.get("/race/r1").await.unwrap();
                let etag = g.header("etag").unwrap().to_owned();
                let patch = json!([{"op": "add", "path": "/hits/-", "value": t}]);
                let body = patch.to_string();
                let r = c
                    .request(
                        "PATCH",
                        "/race/r1",
                        &[("content-type", "application/json-patch+json"), ("if-match", &etag)],
                        Some(body.as_bytes()),
                    )
                    .await
                    .unwrap();
                match r.status {
                    200 => {
                        let v: u64 = r.header("etag").unwrap().trim_matches('"').parse().unwrap();
                        let before: u64 = etag.trim_matches('"').parse().unwrap();
                        assert_eq!(v, before + 1, "a win moves the version by one");
                        wins.push(v);
                    }
                    409 | 412 => losses += 1,
                    other => panic!("unexpected status {other}: {}", r.text()),
                }
            }
            (t, wins, losses)
        }));
    }
    let mut winner_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut total_losses = 0;
    for task in tasks {
        let (t, wins, losses) = task.await.unwrap();
        total_losses += losses;
        for v in wins {
            assert!(winner_of.insert(v, t).is_none(), "version {v} was won twice");
        }
    }
    let final_doc = c.get("/race/r1").await.unwrap().json();
    let final_version = final_doc["_meta"]["version"].as_u64().unwrap();
    // Every version from 2 on was won by exactly one request, and the wins are the history.
    assert_eq!(winner_of.keys().copied().collect::<Vec<_>>(), (2..=final_version).collect::<Vec<_>>());
    assert_eq!(winner_of.len() + total_losses, TASKS * ATTEMPTS_PER_TASK);
    let hits: Vec<usize> = serde_json::from_value(final_doc["hits"].clone()).unwrap();
    assert_eq!(hits, winner_of.values().copied().collect::<Vec<_>>(), "the document holds each win once, in order");
    let mut versions = Vec::new();
    let mut path = "/race/r1/events?limit=1000".to_owned();
    loop {
        let page = c.get(&path).await.unwrap().json();
        versions.extend(page["items"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()));
        match page["next"].as_str() {
            Some(n) => path = format!("/race/r1/events?limit=1000&cursor={n}"),
            None => break,
        }
    }
    assert_eq!(versions, (1..=final_version).collect::<Vec<_>>());
    eprintln!("race: {} wins, {} losses over {} versions", winner_of.len(), total_losses, final_version);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_without_versions_all_land() {
    // Without a client version the engine decides again after losing a race (bounded), so
    // concurrent appends to one list mostly all land; any that ran out of retries got 409.
    let backend = TestBackend::new().await;
    let server = sourced_server::start(backend.config()).await.unwrap();
    let addr = server.addr();
    let mut c = Client::connect(addr).await.unwrap();
    c.send_json("POST", "/race", &[], &json!({"id": "r2", "hits": []})).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            let mut ok = 0;
            for i in 0..10 {
                let body = json!([{"op": "add", "path": "/hits/-", "value": t * 100 + i}]).to_string();
                let r = c
                    .request(
                        "PATCH",
                        "/race/r2",
                        &[("content-type", "application/json-patch+json")],
                        Some(body.as_bytes()),
                    )
                    .await
                    .unwrap();
                match r.status {
                    200 => ok += 1,
                    409 => {}
                    other => panic!("unexpected {other}: {}", r.text()),
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let doc = c.get("/race/r2").await.unwrap().json();
    assert_eq!(doc["hits"].as_array().unwrap().len(), ok);
    assert_eq!(doc["_meta"]["version"].as_u64().unwrap(), ok as u64 + 1);
    server.shutdown().await;
}
