//! List queries over HTTP (SPEC §5): filters, sorts, projections, counts and cursors, on the
//! backend `SOURCED_TEST_BACKEND` selects (CI runs this module on both).

use serde_json::{Value, json};

use crate::common::TestApp;

fn ids(body: &Value) -> Vec<String> {
    body["items"].as_array().expect("items").iter().map(|d| d["id"].as_str().expect("an id").to_owned()).collect()
}

async fn orders(app: &TestApp) {
    let rows = [
        ("o1", "paid", 120, "c1", "Ada"),
        ("o2", "draft", 40, "c2", "Bob"),
        ("o3", "paid", 80, "c1", "Ada"),
        ("o4", "shipped", 200, "c3", "Cy"),
        ("o5", "paid", 100, "c2", "Bob"),
        ("o6", "cancelled", 100, "c3", "Cyd"),
    ];
    for (id, status, total, customer, name) in rows {
        let doc = json!({"id": id, "status": status, "total": total, "customer": {"id": customer, "name": name}});
        app.post("/order", &doc).await.ok(201);
    }
    app.post("/order", &json!({"id": "o7", "status": "paid", "total": "n/a"})).await.ok(201);
    app.call("DELETE", "/order/o6", &[], None).await.ok(200);
}

#[tokio::test]
async fn filters_select_by_type_and_value() {
    let app = TestApp::fresh().await;
    orders(&app).await;
    let cases: &[(&str, &[&str])] = &[
        ("status=paid", &["o1", "o3", "o5", "o7"]),
        ("status=paid&total[gte]=100", &["o1", "o5"]),
        ("total[gt]=80&total[lte]=120", &["o1", "o5"]),
        ("total=100", &["o5"]),
        ("total=100&includeDeleted=true", &["o5", "o6"]),
        ("customer.id=c1", &["o1", "o3"]),
        ("customer.id[in]=c2,c3", &["o2", "o4", "o5"]),
        ("customer.name[prefix]=Cy", &["o4"]),
        ("customer[exists]=false", &["o7"]),
        ("total=%22n%2Fa%22", &["o7"]),
        ("total[lt]=o", &["o7"]),
        ("id[in]=o2,o9", &["o2"]),
        ("status=refunded", &[]),
    ];
    for (q, want) in cases {
        let r = app.get(&format!("/order?{q}")).await;
        assert_eq!(ids(r.ok(200)), *want, "?{q}");
    }
}

#[tokio::test]
async fn sorts_pages_counts_and_projections() {
    let app = TestApp::fresh().await;
    orders(&app).await;
    let r = app.get("/order?sort=-total,id&status[in]=paid,shipped,draft").await;
    // Strings sort after numbers: o7's "n/a" comes first in descending order.
    assert_eq!(ids(r.ok(200)), ["o7", "o4", "o1", "o5", "o3", "o2"]);

    // Pages of 2 in that order, with a count on every page.
    let mut seen = Vec::new();
    let mut path = "/order?sort=-total,id&limit=2&count=true".to_owned();
    for _ in 0..10 {
        let r = app.get(&path).await;
        assert_eq!(r.ok(200)["count"], 6, "{path}");
        seen.extend(ids(&r.body));
        match r.body["next"].as_str() {
            Some(c) => path = format!("/order?sort=-total,id&limit=2&count=true&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["o7", "o4", "o1", "o5", "o3", "o2"]);

    // A cursor only continues the order it was made for.
    let r = app.get("/order?sort=total&limit=1").await;
    let cursor = r.ok(200)["next"].as_str().expect("a next page").to_owned();
    app.get(&format!("/order?sort=-total&cursor={cursor}")).await.problem(400, "invalid-request");
    app.get(&format!("/order?cursor={cursor}")).await.problem(400, "invalid-request");
    assert_eq!(ids(app.get(&format!("/order?sort=total&limit=1&cursor={cursor}")).await.ok(200)), ["o3"]);

    // Projection keeps id and _meta, and the fields asked for at their paths.
    let r = app.get("/order?id=o1&fields=total,customer.name").await;
    let doc = &r.ok(200)["items"][0];
    assert_eq!(doc["total"], 120);
    assert_eq!(doc["customer"], json!({"name": "Ada"}));
    assert!(doc.get("status").is_none() && doc["_meta"]["version"] == 1, "{doc}");
}

#[tokio::test]
async fn bad_queries_are_400_with_every_problem() {
    let app = TestApp::fresh().await;
    orders(&app).await;
    let r = app.get("/order?total[near]=1&a..b=1&sort=x,x&fields=_meta.version").await;
    let body = r.problem(400, "invalid-request");
    let violations = body["violations"].as_array().expect("violations");
    assert_eq!(violations.len(), 4, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("eq, gt, gte, lt, lte, in, exists, prefix"), "{body}");
    assert!(violations[0]["message"].as_str().unwrap().contains("unknown operator 'near'"), "{body}");
    app.get("/order?total[gt]=true").await.problem(400, "invalid-request");
    app.get("/order?a[exists]=maybe").await.problem(400, "invalid-request");
    app.get("/order?sort=a,b,c,d,e").await.problem(400, "invalid-request");
    let many: String = (0..17).map(|i| format!("f{i}=1&")).collect();
    app.get(&format!("/order?{many}")).await.problem(400, "invalid-request");
    // Values are bound, never SQL: a hostile value is just a value.
    let r = app.get("/order?status=%27%20OR%201%3D1%20--").await;
    assert_eq!(ids(r.ok(200)), Vec::<String>::new());
}
