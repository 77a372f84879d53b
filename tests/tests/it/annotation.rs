//! The annotation module end to end (N1–N7) against the real application, on the embedded
//! backend (SQLite) and — when the services run — on PostgreSQL. What was acknowledged is
//! checked from the database, not from the clients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::auth::Role;
use bulwark_tests::{Backend, TestApp, TestAppBuilder};
use reqwest::Method;
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

async fn app(backend: Backend) -> TestApp {
    TestAppBuilder::new(backend)
        .set("annotation.janitor_interval", "200ms")
        .start()
        .await
}

async fn create_project(app: &TestApp, body: Value) -> i64 {
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&app.token(Role::Admin)),
            &body,
        )
        .await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    res.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id")
}

async fn import(app: &TestApp, project: i64, content_type: &str, body: String) -> (u16, Value) {
    let res = app
        .request(
            Method::POST,
            &format!("/api/annotation/projects/{project}/items"),
            Some(&app.token(Role::Admin)),
        )
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn seed(app: &TestApp, project: i64, n: usize) {
    let lines: String = (0..n)
        .map(|i| format!("{}\n", json!({"external_id": format!("img-{i:05}"), "uri": format!("file:///data/{i}.jpg")})))
        .collect();
    let (status, report) = import(app, project, "application/x-ndjson", lines).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["imported"], n as u64, "{report}");
}

/// `Some(task)` or `None` on 204.
async fn next(app: &TestApp, token: &str, project: i64) -> Option<Value> {
    let res = app
        .get(
            &format!("/api/annotation/tasks/next?project={project}"),
            Some(token),
        )
        .await;
    match res.status().as_u16() {
        204 => None,
        200 => Some(res.json().await.expect("json")),
        s => panic!("next: {s} {:?}", res.text().await),
    }
}

async fn submit(app: &TestApp, token: &str, body: Value) -> (u16, Value) {
    let res = app
        .post_json("/api/annotation/annotations", Some(token), &body)
        .await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn db(app: &TestApp) -> sea_orm::DatabaseConnection {
    Database::connect(app.settings.kernel.database.url.expose())
        .await
        .expect("connect")
}

async fn rows(db: &sea_orm::DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("query")
}

/// N1, N3, N6: 100 annotators at once. No item gets more annotations than its overlap, every
/// item reaches it, every acknowledged annotation is in the database, and the progress
/// counters agree with the log.
async fn concurrent_annotators_never_exceed_overlap(backend: Backend) {
    let app = Arc::new(app(backend).await);
    let overlap = 3;
    let project = create_project(
        &app,
        json!({"name": "cats", "labels": ["cat", "dog", "other"], "overlap": overlap}),
    )
    .await;
    let items = 120;
    seed(&app, project, items).await;
    let mut workers = Vec::new();
    for a in 0..100 {
        let app = app.clone();
        workers.push(tokio::spawn(async move {
            let token = app.token_for(&format!("ann-{a:03}"), Role::Annotator);
            let mut acked = Vec::new();
            let mut n = 0;
            while let Some(task) = next(&app, &token, project).await {
                let item = task["item"]["id"].as_i64().expect("item id");
                let label = ["cat", "dog", "other"][(a + n) % 3];
                n += 1;
                let (status, body) = submit(
                    &app,
                    &token,
                    json!({"item_id": item, "labels": [label], "request_id": format!("r-{a}-{item}")}),
                )
                .await;
                assert_eq!(status, 201, "{body}");
                acked.push(body["id"].as_i64().expect("annotation id"));
            }
            acked
        }));
    }
    let mut acked = BTreeSet::new();
    for w in workers {
        for id in w.await.expect("worker") {
            assert!(acked.insert(id), "annotation id {id} acknowledged twice");
        }
    }
    let db = db(&app).await;
    let stored: BTreeSet<i64> = rows(&db, "SELECT id FROM annotation_annotations")
        .await
        .iter()
        .map(|r| r.try_get::<i64>("", "id").expect("id"))
        .collect();
    assert_eq!(
        stored, acked,
        "every acknowledged annotation is stored, nothing else"
    );
    let mut per_item: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for r in rows(&db, "SELECT item_id, annotator FROM annotation_annotations").await {
        let item: i64 = r.try_get("", "item_id").expect("item");
        let who: String = r.try_get("", "annotator").expect("annotator");
        assert!(
            per_item.entry(item).or_default().insert(who),
            "one annotator labeled item {item} twice"
        );
    }
    assert_eq!(per_item.len(), items, "every item was labeled");
    for (item, who) in &per_item {
        assert_eq!(
            who.len(),
            overlap,
            "item {item} has {} annotations, overlap is {overlap}",
            who.len()
        );
    }
    let p: Value = app
        .get(
            &format!("/api/annotation/stats/progress?project={project}"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["items"], items as u64, "{p}");
    assert_eq!(p["completed"], items as u64, "{p}");
    assert_eq!(p["annotations"], (items * overlap) as u64, "{p}");
    assert_eq!(p["completion_ratio"], 1.0, "{p}");
    let label_sum: i64 = p["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l["count"].as_i64().expect("count"))
        .sum();
    assert_eq!(label_sum, (items * overlap) as i64, "{p}");
    let daily_sum: i64 = p["annotators"]
        .as_array()
        .expect("annotators")
        .iter()
        .map(|d| d["submitted"].as_i64().expect("n"))
        .sum();
    assert_eq!(daily_sum, (items * overlap) as i64, "{p}");
    // The queue is empty for everyone now.
    assert!(
        next(&app, &app.token_for("latecomer", Role::Annotator), project)
            .await
            .is_none()
    );
}
bulwark_tests::each_backend!(concurrent_annotators_never_exceed_overlap);

/// N2, N3: a lock lapses by itself; the item goes back to the queue; a submit without a lock
/// or after it lapsed is 409 with the reason; a retried submit returns the first result.
async fn locks_lapse_and_submits_need_a_live_lock(backend: Backend) {
    let app = app(backend).await;
    let project = create_project(
        &app,
        json!({"name": "lapse", "labels": ["a", "b"], "lock_ttl_seconds": 1}),
    )
    .await;
    seed(&app, project, 1).await;
    let alice = app.token_for("alice", Role::Annotator);
    let bob = app.token_for("bob", Role::Annotator);
    let task = next(&app, &alice, project).await.expect("a task");
    let item = task["item"]["id"].as_i64().expect("id");
    assert!(task["lock"]["ttl_seconds"].as_i64().expect("ttl") <= 1);
    // Asking again returns the same live lock.
    let again = next(&app, &alice, project).await.expect("the same task");
    assert_eq!(again["item"]["id"], item);
    // Held: bob gets nothing (overlap 1).
    assert!(next(&app, &bob, project).await.is_none());
    let (status, body) = submit(
        &app,
        &bob,
        json!({"item_id": item, "labels": ["a"], "request_id": "b1"}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("no_lock")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Lapsed: bob gets the item back.
    let task = next(&app, &bob, project).await.expect("the lapsed item");
    assert_eq!(task["item"]["id"], item);
    let (status, body) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["a"], "request_id": "a1"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        matches!(body["reason"].as_str(), Some("lock_expired" | "no_lock")),
        "{body}"
    );
    let (status, first) = submit(
        &app,
        &bob,
        json!({"item_id": item, "labels": ["b"], "request_id": "b2"}),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    // The retry (its lock is gone now) answers with the first record, and stores nothing.
    let (status, retry) = submit(
        &app,
        &bob,
        json!({"item_id": item, "labels": ["b"], "request_id": "b2"}),
    )
    .await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["id"], first["id"]);
    let db = db(&app).await;
    assert_eq!(
        rows(&db, "SELECT id FROM annotation_annotations")
            .await
            .len(),
        1
    );
    // A lock on a completed item is refused with its reason.
    let res = app
        .post_json(
            &format!("/api/annotation/data/{item}/lock"),
            Some(&alice),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["reason"], "overlap_reached", "{body}");
    // The janitor counted alice's lapsed lock... unless bob's claim replaced it first: alice's
    // row stays until swept, so at least one expiry is recorded.
    let mut swept = false;
    for _ in 0..50 {
        if rows(&db, "SELECT item_id FROM annotation_locks")
            .await
            .is_empty()
        {
            swept = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(swept, "the janitor removes lapsed locks");
}
bulwark_tests::each_backend!(locks_lapse_and_submits_need_a_live_lock);

/// N2: a heartbeat extends the caller's lock; releasing it frees the item for others.
async fn heartbeat_extends_and_release_frees(backend: Backend) {
    let app = app(backend).await;
    let project = create_project(
        &app,
        json!({"name": "beat", "labels": ["x"], "lock_ttl_seconds": 2}),
    )
    .await;
    seed(&app, project, 1).await;
    let alice = app.token_for("alice", Role::Annotator);
    let bob = app.token_for("bob", Role::Annotator);
    let task = next(&app, &alice, project).await.expect("task");
    let item = task["item"]["id"].as_i64().expect("id");
    let first = task["lock"]["expires_at"]
        .as_str()
        .expect("expires")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let res = app
        .post_json(
            &format!("/api/annotation/data/{item}/lock"),
            Some(&alice),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let lock: Value = res.json().await.expect("json");
    assert!(
        lock["expires_at"].as_str().expect("expires") > first.as_str(),
        "{lock} vs {first}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past the first expiry, still held thanks to the heartbeat.
    assert!(next(&app, &bob, project).await.is_none());
    let res = app
        .post_json(
            &format!("/api/annotation/data/{item}/lock"),
            Some(&bob),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 409);
    assert_eq!(
        res.json::<Value>().await.expect("json")["reason"],
        "locked_by_others"
    );
    let res = app
        .delete(&format!("/api/annotation/data/{item}/lock"), Some(&alice))
        .await;
    assert_eq!(res.status(), 204);
    assert_eq!(
        next(&app, &bob, project).await.expect("freed")["item"]["id"],
        item
    );
}
bulwark_tests::each_backend!(heartbeat_extends_and_release_frees);

/// N3, N4: records are appended, never updated: a correction supersedes, once; a second plain
/// submit is refused; the label counts follow the correction.
async fn corrections_append_and_never_update(backend: Backend) {
    let app = app(backend).await;
    let project = create_project(&app, json!({"name": "fix", "labels": ["cat", "dog"]})).await;
    seed(&app, project, 1).await;
    let alice = app.token_for("alice", Role::Annotator);
    let item = next(&app, &alice, project).await.expect("task")["item"]["id"]
        .as_i64()
        .expect("id");
    let (_, first) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["cat"], "request_id": "1"}),
    )
    .await;
    let lock = |who: String| {
        let app = &app;
        async move {
            let res = app
                .post_json(
                    &format!("/api/annotation/data/{item}/lock"),
                    Some(&who),
                    &json!({}),
                )
                .await;
            assert_eq!(res.status(), 200, "{:?}", res.text().await);
        }
    };
    lock(alice.clone()).await;
    let (status, body) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["dog"], "request_id": "2"}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("already_annotated")),
        "{body}"
    );
    let (status, fix) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["dog"], "request_id": "3", "supersedes": first["id"]}),
    )
    .await;
    assert_eq!(status, 201, "{fix}");
    assert_eq!(fix["supersedes"], first["id"]);
    lock(alice.clone()).await;
    let (status, body) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["cat"], "request_id": "4", "supersedes": first["id"]}),
    )
    .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("already_superseded")),
        "{body}"
    );
    // Someone else's record cannot be superseded.
    let bob = app.token_for("bob", Role::Annotator);
    let (status, body) = submit(
        &app,
        &bob,
        json!({"item_id": item, "labels": ["cat"], "request_id": "5", "supersedes": fix["id"]}),
    )
    .await;
    assert_eq!(status, 409, "bob holds no lock: {body}");
    let trail: Value = app
        .get(
            &format!("/api/annotation/data/{item}/annotations"),
            Some(&bob),
        )
        .await
        .json()
        .await
        .expect("json");
    let labels: Vec<&str> = trail
        .as_array()
        .expect("list")
        .iter()
        .map(|a| a["labels"][0].as_str().expect("label"))
        .collect();
    assert_eq!(labels, ["cat", "dog"], "the first record is kept as it was");
    let p: Value = app
        .get(
            &format!("/api/annotation/stats/progress?project={project}"),
            Some(&bob),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        p["labels"],
        json!([{"label": "cat", "count": 0}, {"label": "dog", "count": 1}]),
        "{p}"
    );
    assert_eq!(
        p["annotations"], 1,
        "a correction is not a new annotation: {p}"
    );
}
bulwark_tests::each_backend!(corrections_append_and_never_update);

/// N4: editable fields carry a version; a stale write is 409 with the current version.
async fn stale_versions_are_refused(backend: Backend) {
    let app = app(backend).await;
    let admin = app.token(Role::Admin);
    let project = create_project(&app, json!({"name": "ver", "labels": ["x"]})).await;
    seed(&app, project, 1).await;
    let page: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/items"),
            Some(&admin),
        )
        .await
        .json()
        .await
        .expect("json");
    let item = &page["items"][0];
    let (id, v) = (
        item["id"].as_i64().expect("id"),
        item["version"].as_i64().expect("v"),
    );
    let patch = |path: String, body: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let res = app
                .request(Method::PATCH, &path, Some(&admin))
                .json(&body)
                .send()
                .await
                .expect("send");
            (
                res.status().as_u16(),
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (s, first) = patch(
        format!("/api/annotation/data/{id}"),
        json!({"version": v, "priority": 5}),
    )
    .await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["priority"], 5);
    let (s, stale) = patch(
        format!("/api/annotation/data/{id}"),
        json!({"version": v, "priority": 9}),
    )
    .await;
    assert_eq!(s, 409, "{stale}");
    assert_eq!(stale["reason"], "stale_version");
    assert_eq!(stale["current_version"], first["version"]);
    let p: Value = app
        .get(&format!("/api/annotation/projects/{project}"), Some(&admin))
        .await
        .json()
        .await
        .expect("json");
    let (s, changed) = patch(
        format!("/api/annotation/projects/{project}"),
        json!({"version": p["version"], "instructions": "Look closely."}),
    )
    .await;
    assert_eq!(s, 200, "{changed}");
    let (s, stale) = patch(
        format!("/api/annotation/projects/{project}"),
        json!({"version": p["version"], "overlap": 2}),
    )
    .await;
    assert_eq!(
        (s, stale["current_version"].clone()),
        (409, changed["version"].clone()),
        "{stale}"
    );
}
bulwark_tests::each_backend!(stale_versions_are_refused);

/// Import: bad lines are reported with their numbers while the rest import; re-importing adds
/// nothing; CSV quoting (a newline inside a field) works; a wrong content type is 415.
async fn import_reports_bad_lines_and_is_idempotent(backend: Backend) {
    let app = app(backend).await;
    let project = create_project(&app, json!({"name": "imp", "labels": ["x"]})).await;
    let body = [
        r#"{"external_id": "a", "priority": 2, "payload": {"text": "hello"}}"#,
        "not json",
        "",
        r#"{"external_id": "b", "colour": "red"}"#,
        r#"{"external_id": "c"}"#,
        r#"{"external_id": "  "}"#,
    ]
    .join("\n");
    let (status, report) = import(&app, project, "application/x-ndjson", body.clone()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["imported"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(3)),
        "{report}"
    );
    let lines: Vec<u64> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(lines, [2, 4, 6], "{report}");
    let (_, again) = import(&app, project, "application/x-ndjson", body).await;
    assert_eq!(
        (again["imported"].as_u64(), again["existing"].as_u64()),
        (Some(0), Some(2)),
        "{again}"
    );
    let csv = "external_id,uri,priority,caption\nd,file:///d.jpg,1,\"two\nlines\"\ne,,x,oops\nf,,,plain\n";
    let (status, report) = import(&app, project, "text/csv", csv.into()).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["imported"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(1)),
        "{report}"
    );
    assert_eq!(report["errors"][0]["line"], 4, "{report}");
    let page: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/items?limit=10"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    let d = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["external_id"] == "d")
        .expect("d")
        .clone();
    assert_eq!(d["payload"], json!({"caption": "two\nlines"}));
    let (status, _) = import(&app, project, "text/plain", "x".into()).await;
    assert_eq!(status, 415);
    let (status, body) = import(&app, project, "text/csv", "id,uri\n1,x\n".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["imported"].as_u64(), body["failed"].as_u64()),
        (Some(0), Some(1)),
        "{body}"
    );
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("external_id"),
        "{body}"
    );
    let (status, _) = import(&app, 999_999, "application/x-ndjson", "{}".into()).await;
    assert_eq!(status, 404);
    let p: Value = app
        .get(
            &format!("/api/annotation/stats/progress?project={project}"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["items"], 4, "{p}");
    // Keyset pages: the second page starts after the first one's cursor.
    let first: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/items?limit=3"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    let next = first["next"].as_i64().expect("a next page");
    let second: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/items?limit=3&after={next}"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(second["items"].as_array().expect("items").len(), 1);
    assert!(second["next"].is_null());
}
bulwark_tests::each_backend!(import_reports_bad_lines_and_is_idempotent);

/// Bad input and roles, each a clear problem: unknown project or item, labels outside the
/// schema, malformed bodies, oversized payloads, wrong role, missing token, self-review.
async fn bad_input_and_roles(backend: Backend) {
    let app = TestAppBuilder::new(backend)
        .set("server.body_limit_bytes", 64 * 1024)
        .start()
        .await;
    let admin = app.token(Role::Admin);
    let alice = app.token_for("alice", Role::Annotator);
    let viewer = app.token(Role::Viewer);
    let project = create_project(&app, json!({"name": "bad", "labels": ["cat", "dog"]})).await;
    seed(&app, project, 2).await;
    // Projects.
    for (body, field) in [
        (json!({"name": "x", "labels": []}), "labels"),
        (json!({"name": "", "labels": ["a"]}), "name"),
        (
            json!({"name": "x", "labels": ["a"], "overlap": 0}),
            "overlap",
        ),
        (
            json!({"name": "x", "labels": ["a"], "shape": "round"}),
            "shape",
        ),
    ] {
        let res = app
            .post_json("/api/annotation/projects", Some(&admin), &body)
            .await;
        assert_eq!(res.status(), 400, "{body}");
        let text = res.text().await.expect("text");
        assert!(text.contains(field), "{body} → {text}");
    }
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": "bad", "labels": ["a"]}),
        )
        .await;
    assert_eq!(res.status(), 409, "a taken name");
    assert_eq!(
        res.json::<Value>().await.expect("json")["reason"],
        "name_taken"
    );
    // A class given twice counts once, at its first place.
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": "twice", "labels": ["b", "a", "b "]}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.json::<Value>().await.expect("json")["labels"],
        json!(["b", "a"])
    );
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&alice),
            &json!({"name": "y", "labels": ["a"]}),
        )
        .await;
    assert_eq!(res.status(), 403);
    let res = app
        .post_json(
            "/api/annotation/projects",
            None,
            &json!({"name": "y", "labels": ["a"]}),
        )
        .await;
    assert_eq!(res.status(), 401);
    // Unknown things.
    assert_eq!(
        app.get("/api/annotation/tasks/next?project=987654", Some(&alice))
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/api/annotation/tasks/next", Some(&alice))
            .await
            .status(),
        400
    );
    assert_eq!(
        app.post_json("/api/annotation/data/987654/lock", Some(&alice), &json!({}))
            .await
            .status(),
        404
    );
    let (s, _) = submit(
        &app,
        &alice,
        json!({"item_id": 987_654, "labels": ["cat"], "request_id": "z"}),
    )
    .await;
    assert_eq!(s, 404);
    // Labels outside the schema, wrong counts, bad fields.
    let item = next(&app, &alice, project).await.expect("task")["item"]["id"]
        .as_i64()
        .expect("id");
    for (body, field) in [
        (
            json!({"item_id": item, "labels": ["horse"], "request_id": "1"}),
            "labels",
        ),
        (
            json!({"item_id": item, "labels": ["cat", "dog"], "request_id": "1"}),
            "labels",
        ),
        (
            json!({"item_id": item, "labels": [], "request_id": "1"}),
            "labels",
        ),
        (
            json!({"item_id": item, "labels": ["cat"], "request_id": ""}),
            "request_id",
        ),
        (json!({"item_id": item, "labels": ["cat"]}), "request_id"),
        (
            json!({"item_id": item, "labels": ["cat"], "request_id": "1", "lead_time_ms": -5}),
            "lead_time_ms",
        ),
    ] {
        let (s, problem) = submit(&app, &alice, body.clone()).await;
        assert_eq!(s, 400, "{body} → {problem}");
        assert!(problem.to_string().contains(field), "{body} → {problem}");
    }
    // A viewer cannot label; nothing was stored by any of the above, and the lock survived.
    let (s, _) = submit(
        &app,
        &viewer,
        json!({"item_id": item, "labels": ["cat"], "request_id": "v"}),
    )
    .await;
    assert_eq!(s, 403);
    let (s, ok) = submit(
        &app,
        &alice,
        json!({"item_id": item, "labels": ["cat"], "request_id": "ok"}),
    )
    .await;
    assert_eq!(s, 201, "{ok}");
    // Oversized payloads: 413, and the import of a huge line is refused line by line.
    let big = "x".repeat(70 * 1024);
    let (s, _) = import(
        &app,
        project,
        "application/x-ndjson",
        format!("{{\"external_id\": \"{big}\"}}"),
    )
    .await;
    assert_eq!(s, 413);
    // Reviews: a reviewer may, an annotator may not, and nobody reviews their own work.
    let id = ok["id"].as_i64().expect("id");
    let path = format!("/api/annotation/annotations/{id}/reviews");
    assert_eq!(
        app.post_json(&path, Some(&alice), &json!({"verdict": "accept"}))
            .await
            .status(),
        403
    );
    let self_review = app.token_for("alice", Role::Reviewer);
    assert_eq!(
        app.post_json(&path, Some(&self_review), &json!({"verdict": "accept"}))
            .await
            .status(),
        403
    );
    let rita = app.token_for("rita", Role::Reviewer);
    assert_eq!(
        app.post_json(&path, Some(&rita), &json!({"verdict": "maybe"}))
            .await
            .status(),
        400
    );
    let res = app
        .post_json(
            &path,
            Some(&rita),
            &json!({"verdict": "reject", "comment": "a dog"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let reviews: Value = app
        .get(&path, Some(&viewer))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(reviews[0]["verdict"], "reject", "{reviews}");
    // A reviewer can label too (the role grants annotator).
    assert!(next(&app, &rita, project).await.is_some());
}
bulwark_tests::each_backend!(bad_input_and_roles);

/// `bulwark annotation import FILE --project NAME` imports with the same rules as the API
/// and exits non-zero naming the refused lines; an unknown project is named.
#[tokio::test]
async fn cli_import_reports_and_is_idempotent() {
    let app = app(Backend::Embedded).await;
    let project = create_project(&app, json!({"name": "cli", "labels": ["x"]})).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("items.jsonl");
    std::fs::write(
        &file,
        "{\"external_id\": \"1\"}\n{\"external_id\": \"2\"}\n",
    )
    .expect("write");
    let config = dir.path().join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {:?}\n",
            app.settings.kernel.database.url.expose()
        ),
    )
    .expect("write");
    let config = config.display().to_string();
    let run = move |args: Vec<String>| {
        let mut all = vec!["bulwark".to_owned(), "--config".to_owned(), config.clone()];
        all.extend(args);
        bulwark::commands::main(
            bulwark::modules::compiled(),
            all.into_iter().map(Into::into),
        )
    };
    let f = file.display().to_string();
    let args = |p: &str| {
        vec![
            "annotation".into(),
            "import".into(),
            f.clone(),
            "--project".into(),
            p.into(),
        ]
    };
    let code = tokio::task::spawn_blocking({
        let a = args("cli");
        {
            let run = run.clone();
            move || run(a)
        }
    });
    assert_eq!(code.await.expect("join"), 0);
    let p: Value = app
        .get(
            &format!("/api/annotation/stats/progress?project={project}"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["items"], 2, "{p}");
    std::fs::write(&file, "{\"external_id\": \"1\"}\nbroken\n").expect("write");
    let a = args(&project.to_string());
    assert_eq!(
        tokio::task::spawn_blocking({
            let run = run.clone();
            move || run(a)
        })
        .await
        .expect("join"),
        1
    );
    let a = args("nosuchproject");
    assert_eq!(
        tokio::task::spawn_blocking({
            let run = run.clone();
            move || run(a)
        })
        .await
        .expect("join"),
        1
    );
    let p: Value = app
        .get(
            &format!("/api/annotation/stats/progress?project={project}"),
            Some(&app.token(Role::Viewer)),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(p["items"], 2, "nothing imported twice: {p}");
}

/// N5: the agreement report over the API uses the current records (a correction counts, the
/// record it replaced does not) and resolves ties by the requested rule.
async fn agreement_over_current_records(backend: Backend) {
    let app = app(backend).await;
    let project = create_project(
        &app,
        json!({"name": "agree", "labels": ["cat", "dog"], "overlap": 2}),
    )
    .await;
    seed(&app, project, 4).await;
    // a: cat cat dog dog; b: cat dog dog dog, but b first said "cat" on the last item and
    // corrected it to "dog".
    let plan = [
        ("a", ["cat", "cat", "dog", "dog"]),
        ("b", ["cat", "dog", "dog", "cat"]),
    ];
    let mut last_of_b = None;
    for (who, labels) in plan {
        let token = app.token_for(who, Role::Annotator);
        for label in labels {
            let task = next(&app, &token, project).await.expect("task");
            let item = task["item"]["id"].as_i64().expect("id");
            let idx = task["item"]["external_id"].as_str().expect("ext")[4..]
                .parse::<usize>()
                .expect("n");
            let label = if who == "a" { label } else { plan[1].1[idx] };
            let (s, body) = submit(
                &app,
                &token,
                json!({"item_id": item, "labels": [label], "request_id": format!("{who}{item}")}),
            )
            .await;
            assert_eq!(s, 201, "{body}");
            if who == "b" && idx == 3 {
                last_of_b = Some((item, body["id"].as_i64().expect("id")));
            }
        }
    }
    let b = app.token_for("b", Role::Annotator);
    let (item, first) = last_of_b.expect("b labeled item 3");
    let res = app
        .post_json(
            &format!("/api/annotation/data/{item}/lock"),
            Some(&b),
            &json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let (s, _) = submit(
        &app,
        &b,
        json!({"item_id": item, "labels": ["dog"], "request_id": "fix", "supersedes": first}),
    )
    .await;
    assert_eq!(s, 201);
    let viewer = app.token(Role::Viewer);
    let report: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/agreement"),
            Some(&viewer),
        )
        .await
        .json()
        .await
        .expect("json");
    // p_o = 3/4, p_e = 1/2·1/4 + 1/2·3/4 = 1/2, κ = (0.75 − 0.5) / 0.5 = 0.5.
    let kappa = report["pairs"][0]["cohen_kappa"]["value"]
        .as_f64()
        .expect("kappa");
    assert!((kappa - 0.5).abs() < 1e-9, "{report}");
    assert_eq!(report["consolidation"]["unresolved"], 1, "{report}");
    assert_eq!(report["consolidation"]["resolved"], 3, "{report}");
    let broken: Value = app
        .get(
            &format!("/api/annotation/projects/{project}/agreement?tie_rule=first_in_schema_order"),
            Some(&viewer),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(broken["consolidation"]["unresolved"], 0, "{broken}");
    assert_eq!(
        app.get(
            &format!("/api/annotation/projects/{project}/agreement?tie_rule=coin"),
            Some(&viewer)
        )
        .await
        .status(),
        400
    );
    assert_eq!(
        app.get("/api/annotation/projects/999999/agreement", Some(&viewer))
            .await
            .status(),
        404
    );
}
bulwark_tests::each_backend!(agreement_over_current_records);
