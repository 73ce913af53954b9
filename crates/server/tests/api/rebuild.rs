//! `sourced rebuild` (SPEC §3.3, §5): after a mixed workload, the read model and the snapshots
//! made again from the events equal, byte for byte, what live appends wrote.

use serde_json::json;

use sourced_core::aggregate::FOLD_VERSION;
use sourced_core::{TenantId, TypeName, Version};
use sourced_store::{DocumentRow, EventStore, ListQuery};

use crate::common::TestApp;

const EVERY: u64 = 4;

/// Every read-model row (all tenants and types of the workload), with its state's JSON text,
/// and every snapshot each version of each stream would load.
async fn read_side(store: &dyn EventStore) -> Vec<(DocumentRow, String, Vec<Option<String>>)> {
    let mut out = Vec::new();
    for (tenant, ty) in [("default", "item"), ("default", "note"), ("acme", "item")] {
        let query = ListQuery {
            include_deleted: true,
            ..ListQuery::new(TenantId::parse(tenant).unwrap(), TypeName::parse(ty).unwrap(), 1_000)
        };
        for row in store.list_documents(&query).await.unwrap() {
            let mut snapshots = Vec::new();
            for v in 1..=row.version.0 {
                let snap = store.load_snapshot(&row.key, FOLD_VERSION, Some(Version(v))).await.unwrap();
                snapshots
                    .push(snap.map(|a| format!("{} {:?} {}", a.version, a.state.map(|s| s.to_string()), a.deleted)));
            }
            let text = row.state.to_string();
            out.push((row, text, snapshots));
        }
    }
    out
}

async fn workload(app: &TestApp) {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for i in 0..24 {
        let (tenant, ty) = [("default", "item"), ("default", "note"), ("acme", "item")][i % 3];
        let path = format!("/{ty}/x{i}");
        let headers = [("x-tenant", tenant), ("content-type", "application/json")];
        let doc = json!({"id": format!("x{i}"), "n": 0, "z": {"b": 1, "a": [i]}, "title": format!("t{i}")});
        app.call("POST", &format!("/{ty}"), &headers, Some(&doc.to_string())).await.ok(201);
        for step in 0..next(12) {
            let step = step + 1 + 100 * i as u64;
            let (method, body, media) = match next(3) {
                0 => (
                    "PATCH",
                    json!([{"op": "replace", "path": "/n", "value": step}]).to_string(),
                    "application/json-patch+json",
                ),
                1 => ("PATCH", json!({"m": step, "title": null}).to_string(), "application/merge-patch+json"),
                _ => {
                    ("PUT", json!({"id": format!("x{i}"), "n": step, "q": [step, "s"]}).to_string(), "application/json")
                }
            };
            let headers = [("x-tenant", tenant), ("content-type", media)];
            app.call(method, &path, &headers, Some(&body)).await.ok(200);
        }
        if i % 5 == 0 {
            app.call("DELETE", &path, &[("x-tenant", tenant)], None).await.ok(200);
        }
    }
}

#[tokio::test]
async fn rebuilt_read_model_equals_the_live_one() {
    let app = TestApp::fresh_with(|c| c.snapshot_every = EVERY).await;
    workload(&app).await;
    let live = read_side(app.store.as_ref()).await;
    assert_eq!(live.len(), 24);
    assert!(live.iter().any(|(r, ..)| r.deleted) && live.iter().any(|(_, _, s)| s.iter().any(Option::is_some)));

    let mut reports = 0;
    let done = sourced_engine::rebuild::rebuild(app.store.as_ref(), EVERY, |_| reports += 1).await.unwrap();
    assert_eq!(done.streams, 24);
    assert!(reports >= 1 && done.events >= 24);
    let rebuilt = read_side(app.store.as_ref()).await;
    assert_eq!(rebuilt.len(), live.len());
    for (l, r) in live.iter().zip(&rebuilt) {
        assert_eq!(l, r, "stream {}", l.0.key);
    }

    // Snapshots of another fold version would be ignored, and rebuild replaces them; a rebuild
    // with another snapshot interval changes the snapshots only.
    sourced_engine::rebuild::rebuild(app.store.as_ref(), 0, |_| {}).await.unwrap();
    let none = read_side(app.store.as_ref()).await;
    for (l, n) in live.iter().zip(&none) {
        assert_eq!((&l.0, &l.1), (&n.0, &n.1));
        assert!(n.2.iter().all(Option::is_none), "no snapshots with SNAPSHOT_EVERY=0");
    }
}

/// The binary: `sourced rebuild` on an embedded store restores a read model that was lost.
#[tokio::test]
async fn the_rebuild_command_restores_the_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sourced.db");
    let app = TestApp::with(|c| {
        c.store = sourced_server::StoreUrl::Sqlite(db.clone());
        c.snapshot_every = EVERY;
    });
    workload(&app).await;
    let live = read_side(app.store.as_ref()).await;
    app.store.clear_read_model().await.unwrap();
    assert!(read_side(app.store.as_ref()).await.is_empty());
    app.store.close().await;
    drop(app);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
        .env_clear()
        .args(["rebuild"])
        .env("EVENT_STORE_URL", format!("sqlite://{}", db.display()))
        .env("SNAPSHOT_EVERY", EVERY.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("sourced rebuild: 24 streams"), "{stderr}");

    let store = sourced_store::sqlite::SqliteStore::open(&db, Default::default()).unwrap();
    assert_eq!(read_side(&store).await, live);
    store.close().await;
}
