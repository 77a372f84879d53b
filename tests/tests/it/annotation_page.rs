//! The labeling page (N11): `GET /annotation/` serves the single-page app with a strict
//! Content-Security-Policy, the home page links it, and `tasks/next` passes over `skip`ped items
//! (what the page's S key relies on). The page itself is driven in headless Chromium by
//! tests/e2e/annotation-page.mjs.

use bulwark_kernel::auth::Role;
use bulwark_tests::spawn_app;
use serde_json::{Value, json};

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The nonce of a policy's `script-src 'nonce-...'`.
fn nonce(csp: &str) -> String {
    csp.split("script-src 'nonce-")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn the_labeling_page_is_served_with_a_strict_policy_and_no_token() {
    let app = spawn_app().await;
    let res = app.get("/annotation/", None).await;
    assert_eq!(res.status(), 200);
    assert!(
        header(&res, "content-type").starts_with("text/html"),
        "{}",
        header(&res, "content-type")
    );
    let csp = header(&res, "content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let n = nonce(&csp);
    assert_eq!(n.len(), 32, "{csp}");
    let html = res.text().await.expect("text");
    assert!(html.contains(r#"<main id="view""#), "app root");
    assert!(
        html.contains(&format!(r#"<script nonce="{n}">"#)),
        "script nonce"
    );
    assert!(
        html.contains(&format!(r#"<style nonce="{n}">"#)),
        "style nonce"
    );
    assert!(!html.contains("__CSP_NONCE__"));
    // A fresh nonce for every response.
    let again = app.get("/annotation/", None).await;
    assert_ne!(nonce(&header(&again, "content-security-policy")), n);
}

#[tokio::test]
async fn the_home_page_links_the_labeling_page_for_annotators() {
    let app = spawn_app().await;
    let html = app.get("/", None).await.text().await.expect("text");
    assert!(
        html.contains(r#"data-module="annotation" data-path="/annotation/"><a href="/annotation/">Labeling</a>"#),
        "{html}"
    );
    assert!(html.contains("token: annotator"), "{html}");
}

#[tokio::test]
async fn next_task_passes_over_skipped_items() {
    let app = spawn_app().await;
    let admin = app.token(Role::Admin);
    let ann = app.token_for("skipper", Role::Annotator);
    let res = app
        .post_json(
            "/api/annotation/projects",
            Some(&admin),
            &json!({"name": "skip-list", "labels": ["a", "b"], "overlap": 1}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let project: Value = res.json().await.expect("json");
    let pid = project["id"].as_i64().expect("id");
    let lines = "{\"external_id\":\"x1\"}\n{\"external_id\":\"x2\"}\n{\"external_id\":\"x3\"}\n";
    let res = app
        .request(
            reqwest::Method::POST,
            &format!("/api/annotation/projects/{pid}/items"),
            Some(&admin),
        )
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .expect("import");
    assert_eq!(res.status(), 200);

    let next = |skip: &str| {
        let path = if skip.is_empty() {
            format!("/api/annotation/tasks/next?project={pid}")
        } else {
            format!("/api/annotation/tasks/next?project={pid}&skip={skip}")
        };
        let app = &app;
        let ann = ann.clone();
        async move { app.get(&path, Some(&ann)).await }
    };
    let item_of = |v: &Value| v["item"]["id"].as_i64().expect("item id");

    let first: Value = next("").await.json().await.expect("json");
    let a = item_of(&first);
    // Released, the same item comes back first: the queue order is fixed.
    let res = app
        .delete(&format!("/api/annotation/data/{a}/lock"), Some(&ann))
        .await;
    assert_eq!(res.status(), 204);
    let again: Value = next("").await.json().await.expect("json");
    assert_eq!(item_of(&again), a);
    app.delete(&format!("/api/annotation/data/{a}/lock"), Some(&ann))
        .await;
    // Skipped, it is passed over.
    let b: Value = next(&a.to_string()).await.json().await.expect("json");
    let b = item_of(&b);
    assert_ne!(b, a);
    // The caller's live lock on a skipped item is passed over too.
    let c: Value = next(&format!("{a},{b}")).await.json().await.expect("json");
    let c = item_of(&c);
    assert!(c != a && c != b);
    app.delete(&format!("/api/annotation/data/{c}/lock"), Some(&ann))
        .await;
    app.delete(&format!("/api/annotation/data/{b}/lock"), Some(&ann))
        .await;
    // Everything skipped: nothing left for this caller.
    let res = next(&format!("{a}, {b},{c}")).await;
    assert_eq!(res.status(), 204);
    // A bad list is refused, naming the field.
    let res = next("1,x").await;
    assert_eq!(res.status(), 400);
    let problem: Value = res.json().await.expect("json");
    assert_eq!(problem["field"], "skip");
    let many = (1..=101)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(next(&many).await.status(), 400);
}
