//! The shared HTTP surface (K3, K7, K8): probes, problem+json errors, auth, limits, metrics,
//! OpenAPI and draining — against an in-process application on port 0.

use std::time::Duration;

use bulwark_kernel::auth::Role;
use bulwark_tests::app::TEST_SECRET;
use bulwark_tests::{Backend, TestAppBuilder, spawn_app};
use serde_json::Value;

const PROBLEM: &str = "application/problem+json";

async fn problem(res: reqwest::Response, status: u16, type_suffix: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with(PROBLEM), "content-type {ct}");
    let body: Value = res.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status);
    let t = body["type"].as_str().expect("type");
    assert_eq!(
        t,
        format!("urn:bulwark:problem:{type_suffix}"),
        "problem type in {body}"
    );
    body
}

/// The probes, on embedded stand-ins and on PostgreSQL, NATS and Redis.
async fn probes_answer(backend: Backend) {
    let app = TestAppBuilder::new(backend).start().await;
    let live = app.get("/livez", None).await;
    assert_eq!(live.status(), 200);
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready", "{body}");
    let deps = match backend {
        Backend::Embedded => ["database", "bus:embedded", "kv:memory"],
        Backend::Real => ["database", "bus:nats", "kv:redis"],
    };
    for dep in deps {
        assert_eq!(body["checks"][dep], "ok", "{dep} in {body}");
    }
}

bulwark_tests::each_backend!(probes_answer);

#[tokio::test]
async fn unknown_route_is_problem_404() {
    let app = spawn_app().await;
    let body = problem(app.get("/no/such/route", None).await, 404, "not-found").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("/no/such/route")
    );
}

#[tokio::test]
async fn wrong_method_is_problem_405() {
    let app = spawn_app().await;
    let res = app.delete("/livez", None).await;
    assert!(res.headers().get("allow").is_some(), "Allow header kept");
    problem(res, 405, "method-not-allowed").await;
}

#[tokio::test]
async fn auth_rejects_missing_malformed_wrongly_signed_and_expired_tokens() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("auth.leeway", "0s")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    // K8: missing
    let body = problem(
        app.get("/api/cache/status", None).await,
        401,
        "unauthorized",
    )
    .await;
    assert!(body["detail"].as_str().unwrap_or("").contains("missing"));
    // malformed
    problem(
        app.get("/api/cache/status", Some("not.a.jwt")).await,
        401,
        "invalid-token",
    )
    .await;
    let res = app
        .client
        .get(app.url("/api/cache/status"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .expect("req");
    problem(res, 401, "invalid-token").await;
    // wrongly signed
    let other =
        bulwark_kernel::auth::Authenticator::hs256(&[1u8; 40], app.settings.kernel.auth.clone());
    let forged = other
        .issue("mallory", Role::Admin, Duration::from_secs(60))
        .expect("issue");
    problem(
        app.get("/api/cache/status", Some(&forged)).await,
        401,
        "invalid-token",
    )
    .await;
    // expired
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({"sub": "old", "role": "admin", "iss": "bulwark", "aud": "bulwark", "iat": now - 600, "exp": now - 300});
    let expired = signed_with_test_secret(&claims);
    problem(
        app.get("/api/cache/status", Some(&expired)).await,
        401,
        "token-expired",
    )
    .await;
    // a token without a role
    let claims =
        serde_json::json!({"sub": "x", "iss": "bulwark", "aud": "bulwark", "exp": now + 300});
    let roleless = signed_with_test_secret(&claims);
    problem(
        app.get("/api/cache/status", Some(&roleless)).await,
        401,
        "invalid-token",
    )
    .await;
    // valid
    assert_eq!(
        app.get("/api/cache/status", Some(&app.token(Role::Viewer)))
            .await
            .status(),
        200
    );
}

/// A JWT with exactly `claims`, signed with the test applications' secret.
fn signed_with_test_secret(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test]
async fn wrong_role_is_403() {
    let app = spawn_app().await;
    for role in [Role::Viewer, Role::Bidder, Role::Annotator] {
        problem(
            app.get("/api/admin/config", Some(&app.token(role))).await,
            403,
            "forbidden",
        )
        .await;
    }
    let res = app
        .get("/api/admin/config", Some(&app.token(Role::Admin)))
        .await;
    assert_eq!(res.status(), 200);
    let cfg: Value = res.json().await.expect("json");
    // Secrets are redacted in the effective config.
    assert_eq!(cfg["auth"]["hs256_secret"], "[redacted]");
    assert!(!cfg.to_string().contains(TEST_SECRET));
}

#[tokio::test]
async fn every_module_route_requires_auth() {
    let app = spawn_app().await;
    let modules = bulwark::modules::compiled_names();
    assert_eq!(
        modules.len(),
        bulwark::modules::KNOWN.len(),
        "tests build every module"
    );
    for m in modules {
        let res = app.get(&format!("/api/{m}/status"), None).await;
        assert_eq!(res.status(), 401, "{m}");
        let res = app
            .get(&format!("/api/{m}/status"), Some(&app.token(Role::Viewer)))
            .await;
        assert_eq!(res.status(), 200, "{m}");
    }
}

#[tokio::test]
async fn json_endpoint_rejects_bad_bodies_with_named_problems() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("server.body_limit_bytes", 1024)
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let admin = app.token(Role::Admin);
    let post = |body: Vec<u8>, ct: &'static str| {
        app.request(reqwest::Method::POST, "/api/admin/tokens", Some(&admin))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    // Not JSON content type → 415.
    problem(
        post(b"sub=a".to_vec(), "application/x-www-form-urlencoded")
            .await
            .expect("req"),
        415,
        "unsupported-media-type",
    )
    .await;
    // Malformed JSON → 400 naming it.
    let body = problem(
        post(b"{\"sub\": ".to_vec(), "application/json")
            .await
            .expect("req"),
        400,
        "malformed-json",
    )
    .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("eof"),
        "{body}"
    );
    // Wrong field value → 400 naming the field.
    let body = problem(
        post(
            br#"{"sub":"a","role":"wizard"}"#.to_vec(),
            "application/json",
        )
        .await
        .expect("req"),
        400,
        "invalid-body",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap_or("").contains("role"),
        "{body}"
    );
    // Unknown field → 400 naming it.
    let body = problem(
        post(
            br#"{"sub":"a","role":"viewer","admin":true}"#.to_vec(),
            "application/json",
        )
        .await
        .expect("req"),
        400,
        "invalid-body",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap_or("").contains("admin"),
        "{body}"
    );
    // Oversized → 413.
    let big = format!(r#"{{"sub":"{}","role":"viewer"}}"#, "x".repeat(4096));
    problem(
        post(big.into_bytes(), "application/json")
            .await
            .expect("req"),
        413,
        "payload-too-large",
    )
    .await;
    // And a good one works, and the minted token is valid.
    let res = post(
        br#"{"sub":"bob","role":"bidder","ttl":"5m"}"#.to_vec(),
        "application/json",
    )
    .await
    .expect("req");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["expires_in"], 300);
    let token = body["token"].as_str().expect("token");
    assert_eq!(
        app.get("/api/auction/status", Some(token)).await.status(),
        200
    );
}

#[tokio::test]
async fn metrics_use_route_templates_and_build_info() {
    let app = spawn_app().await;
    app.get("/livez", None).await;
    app.get("/api/cache/status", Some(&app.token(Role::Viewer)))
        .await;
    app.get("/secret-raw-path-123", None).await;
    let text = app.metrics_text().await;
    assert!(text.contains("bulwark_build_info{"), "build info");
    assert!(
        text.contains(r#"route="/api/cache/status""#),
        "route template label"
    );
    assert!(text.contains(r#"module="cache""#), "module label");
    assert!(
        text.contains(r#"route="unmatched""#),
        "unmatched routes share one label"
    );
    assert!(
        !text.contains("secret-raw-path-123"),
        "raw paths never become labels"
    );
    assert!(
        text.contains("bulwark_http_request_duration_seconds_bucket{"),
        "a real histogram, not a summary"
    );
}

#[tokio::test]
async fn openapi_lists_kernel_and_module_paths() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    for path in [
        "/livez",
        "/readyz",
        "/api/admin/tokens",
        "/api/cache/status",
        "/api/reporting/status",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn request_id_is_set_and_propagated() {
    let app = spawn_app().await;
    let res = app.get("/livez", None).await;
    assert!(res.headers().get("x-request-id").is_some());
    let res = app
        .client
        .get(app.url("/livez"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("req");
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("abc-123")
    );
}

#[tokio::test]
async fn cors_allows_configured_origins_only() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("server.cors_allowed_origins", vec!["https://ui.example"])
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let res = app
        .client
        .get(app.url("/livez"))
        .header("origin", "https://ui.example")
        .send()
        .await
        .expect("req");
    assert_eq!(
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://ui.example")
    );
    let res = app
        .client
        .get(app.url("/livez"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("req");
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn draining_fails_readiness_but_keeps_serving_during_grace() {
    // K7: readiness 503 at once; liveness and requests keep working during drain.grace.
    let mut app = TestAppBuilder::new(Backend::Embedded)
        .set("drain.grace", "2s")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    assert_eq!(app.get("/readyz", None).await.status(), 200);
    app.shutdown.trigger();
    let body = problem(app.get("/readyz", None).await, 503, "not-ready").await;
    assert_eq!(body["state"], "draining");
    assert_eq!(app.get("/livez", None).await.status(), 200);
    assert_eq!(
        app.get("/api/cache/status", Some(&app.token(Role::Viewer)))
            .await
            .status(),
        200
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn separate_metrics_port() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("server.metrics_listen", "127.0.0.1:0")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    // Not on the main port when a metrics port is configured...
    problem(app.get("/metrics", None).await, 404, "not-found").await;
    // ...but on its own.
    assert!(app.metrics_addr.is_some(), "metrics listener");
    let text = app.metrics_text().await;
    assert!(text.contains("bulwark_build_info"), "{text}");
}

#[tokio::test]
async fn slow_requests_time_out_with_408_problem() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .module(std::sync::Arc::new(bulwark_tests::probe::ProbeModule {
            state: Default::default(),
        }))
        .set("server.request_timeout", "200ms")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    problem(app.get("/api/probe/slow", None).await, 408, "timeout").await;
}

#[tokio::test]
async fn responses_are_compressed_when_accepted() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/api/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("req");
    assert_eq!(
        res.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let off = TestAppBuilder::new(Backend::Embedded)
        .set("server.compression", false)
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let res = off
        .client
        .get(off.url("/api/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("req");
    assert!(
        res.headers().get("content-encoding").is_none(),
        "compression can be switched off"
    );
}

fn content_type(res: &reqwest::Response) -> String {
    res.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn home_page_lists_version_modules_and_links_without_a_token() {
    let app = spawn_app().await;
    let res = app.get("/", None).await;
    assert_eq!(res.status(), 200);
    assert!(
        content_type(&res).starts_with("text/html"),
        "{}",
        content_type(&res)
    );
    let html = res.text().await.expect("text");
    assert!(html.contains("<title>Bulwark</title>"), "{html}");
    assert!(
        html.contains(&format!(
            r#"id="version">{}</span>"#,
            env!("CARGO_PKG_VERSION")
        )),
        "version in {html}"
    );
    for m in ["cache", "auction", "annotation", "pipeline", "reporting"] {
        assert!(
            html.contains(&format!(r#"data-module="{m}" data-enabled="true""#)),
            "{m} listed as enabled in {html}"
        );
    }
    for href in ["/api/docs/", "/api/openapi.json", "/readyz", "/metrics"] {
        assert!(
            html.contains(&format!(r#"href="{href}""#)),
            "link to {href} in {html}"
        );
    }
    // The auction's room page is declared by the module; it needs an id and a token.
    assert!(
        html.contains(r#"data-module="auction" data-path="/auction/{id}?token=TOKEN""#),
        "{html}"
    );
    assert!(html.contains("token: viewer"), "{html}");
    // Every link on the page answers (none needs a token).
    for href in [
        "/api/docs/",
        "/api/openapi.json",
        "/readyz",
        "/metrics",
        "/livez",
    ] {
        assert_eq!(app.get(href, None).await.status(), 200, "{href}");
    }
}

#[tokio::test]
async fn home_page_does_not_link_pages_of_modules_not_enabled() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("modules.enabled", vec!["cache"])
        .set("server.metrics_listen", "127.0.0.1:0")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let html = app.get("/", None).await.text().await.expect("text");
    assert!(
        html.contains(r#"data-module="cache" data-enabled="true""#),
        "{html}"
    );
    // Compiled in, listed, but not enabled: its page is not on the home page.
    assert!(
        html.contains(r#"data-module="auction" data-enabled="false""#),
        "{html}"
    );
    assert!(!html.contains("/auction/{id}"), "{html}");
    assert!(html.contains("No enabled module has a page yet."), "{html}");
    // `/metrics` is on its own port: named, not linked to a 404.
    assert!(!html.contains(r#"href="/metrics""#), "{html}");
    assert!(html.contains("server.metrics_listen"), "{html}");
}

#[tokio::test]
async fn api_docs_serve_the_vendored_swagger_ui() {
    let app = spawn_app().await;
    // Without the slash it redirects (reqwest follows it).
    let res = app.get("/api/docs", None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/api/docs/");
    let index = res.text().await.expect("text");
    assert!(index.contains(r#"id="swagger-ui""#), "{index}");
    // Everything it loads comes from this server, relative to /api/docs/.
    for attr in ["src=\"", "href=\""] {
        for value in index.split(attr).skip(1) {
            assert!(
                !value.starts_with("http") && !value.starts_with("//"),
                "external resource {attr}{value}"
            );
        }
    }
    for asset in [
        "swagger-ui.css",
        "index.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
    ] {
        assert!(index.contains(asset), "{asset} in {index}");
        let res = app.get(&format!("/api/docs/{asset}"), None).await;
        assert_eq!(res.status(), 200, "{asset}");
        assert!(
            res.bytes().await.expect("body").len() > 100,
            "{asset} has content"
        );
    }
    // It reads the one OpenAPI document the server already serves, with the online validator
    // switched off.
    let init = app
        .get("/api/docs/swagger-initializer.js", None)
        .await
        .text()
        .await
        .expect("text");
    assert!(init.contains(r#""url": "/api/openapi.json""#), "{init}");
    assert!(init.contains(r#""validatorUrl": "none""#), "{init}");
    problem(
        app.get("/api/docs/no-such-file.js", None).await,
        404,
        "not-found",
    )
    .await;
}

/// The operations of an OpenAPI document: (path, method, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                ops.push((path.clone(), method.clone(), op.clone()));
            }
        }
    }
    ops
}

/// `status` is documented on `op` with a problem+json `Problem` body.
fn documents_problem(op: &Value, status: &str) -> bool {
    op["responses"][status]["content"][PROBLEM]["schema"]["$ref"] == "#/components/schemas/Problem"
}

#[tokio::test]
async fn openapi_documents_the_shared_errors_of_every_operation() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    let ops = operations(&doc);
    assert!(ops.len() >= 20, "{} operations", ops.len());
    let mut secured = 0;
    for (path, method, op) in &ops {
        let label = format!("{method} {path}");
        let needs_token =
            (path.starts_with("/api/") && path != "/api/openapi.json") || path.starts_with("/ws/");
        let has_security = op["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        assert_eq!(has_security, needs_token, "{label}: security");
        if has_security {
            secured += 1;
            for status in ["401", "403", "503"] {
                assert!(documents_problem(op, status), "{label}: {status}");
            }
            assert!(
                op["responses"]["401"]["headers"]["WWW-Authenticate"].is_object(),
                "{label}: WWW-Authenticate"
            );
        }
        if op.get("requestBody").is_some() {
            for status in ["400", "413", "415"] {
                assert!(documents_problem(op, status), "{label}: {status}");
            }
        }
        if op["parameters"].as_array().is_some_and(|p| !p.is_empty()) {
            assert!(documents_problem(op, "400"), "{label}: 400");
        }
        // Every error response names its body.
        for (status, _) in op["responses"].as_object().expect("responses") {
            if status.starts_with('4') || status.starts_with('5') {
                assert!(documents_problem(op, status), "{label}: {status} body");
            }
        }
    }
    assert!(secured >= 15, "{secured} secured operations");
    // The cache and auction routes document what their handlers return themselves.
    let get = |path: &str, method: &str| {
        ops.iter()
            .find(|(p, m, _)| p == path && m == method)
            .map(|(_, _, op)| op.clone())
            .unwrap_or_else(|| panic!("{method} {path} missing"))
    };
    assert!(documents_problem(
        &get("/api/auction/auctions/{id}", "get"),
        "404"
    ));
    assert!(documents_problem(
        &get("/api/cache/invalidate", "post"),
        "404"
    ));
    assert!(documents_problem(&get("/api/admin/tokens", "post"), "409"));
}

/// A property's schema without the `oneOf` wrapper utoipa puts around an inline schema that
/// carries a description (and without its `null` alternative).
fn unwrapped(schema: &Value) -> Value {
    schema["oneOf"]
        .as_array()
        .and_then(|alts| alts.iter().find(|s| s["type"] != "null"))
        .unwrap_or(schema)
        .clone()
}

#[tokio::test]
async fn openapi_constraints_come_from_the_types_the_handlers_deserialize() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    let params = doc["paths"]["/api/auction/auctions"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .clone();
    let param = |name: &str| {
        params
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["schema"].clone())
            .unwrap_or_else(|| panic!("no parameter {name}"))
    };
    let limit = param("limit");
    assert_eq!(
        (limit["minimum"].as_i64(), limit["maximum"].as_i64()),
        (Some(1), Some(200))
    );
    assert_eq!(limit["default"], 50);
    assert_eq!(
        param("status")["enum"],
        serde_json::json!(["open", "closed"]),
        "{params:?}"
    );
    let id = &doc["paths"]["/api/auction/auctions/{id}"]["get"]["parameters"][0];
    assert_eq!(
        (id["in"].as_str(), id["schema"]["type"].as_str()),
        (Some("path"), Some("integer"))
    );
    let create = |field: &str| {
        unwrapped(&doc["components"]["schemas"]["CreateAuction"]["properties"][field])
    };
    assert_eq!(create("title")["maxLength"], 200);
    assert_eq!(create("title")["minLength"], 1);
    assert_eq!(create("start_price")["maximum"], 1_000_000_000_000_000_i64);
    assert_eq!(create("min_increment")["minimum"], 1);
    assert_eq!(create("soft_close_window_seconds")["maximum"], 86_400);
    let token = &doc["components"]["schemas"]["TokenRequest"]["properties"];
    let ttl = serde_json::to_string(&token["ttl"]).expect("ttl");
    assert!(ttl.contains("(?:[1-9]|[1-2][0-9]|30)d"), "{ttl}");
    // And the server refuses what the schema refuses, naming the field.
    let viewer = app.token(Role::Viewer);
    for (path, field) in [
        ("/api/auction/auctions?limit=0", "limit"),
        ("/api/auction/auctions?limit=201", "limit"),
        ("/api/auction/auctions?status=scheduled", "status"),
        ("/api/auction/auctions?after=1.5", "after"),
    ] {
        let body = problem(app.get(path, Some(&viewer)).await, 400, "invalid-query").await;
        assert_eq!(body["field"], field, "{path}: {body}");
    }
    assert_eq!(
        app.get("/api/auction/auctions?limit=200&status=open", Some(&viewer))
            .await
            .status(),
        200
    );
    let admin = app.token(Role::Admin);
    let mint = |ttl: &'static str| {
        app.client
            .post(app.url("/api/admin/tokens"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"sub": "bob", "role": "viewer", "ttl": ttl}))
            .send()
    };
    for bad in ["31d", "721h", "1h30m", "0s", "01m"] {
        let body = problem(mint(bad).await.expect("req"), 400, "invalid-body").await;
        assert_eq!(body["field"], "ttl", "{bad}: {body}");
    }
    let res = mint("30d").await.expect("req");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["expires_in"], 30 * 86400);
    // JSON Schema's integers include 5.0, so the server takes it.
    let res = app
        .client
        .post(app.url("/api/auction/auctions"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"title": "  Lamp  ", "ends_at": "2999-01-01T00:00:00Z", "min_increment": 5.0}))
        .send()
        .await
        .expect("req");
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.expect("json");
    assert_eq!(
        (created["title"].as_str(), created["min_increment"].as_i64()),
        (Some("Lamp"), Some(5))
    );
    assert_eq!(created["status"], "open");
}

#[tokio::test]
async fn malformed_path_parameters_are_problem_400() {
    let app = spawn_app().await;
    let viewer = app.token(Role::Viewer);
    for path in [
        "/api/auction/auctions/abc",
        "/api/auction/auctions/1.5/bids",
        "/api/auction/auctions/99999999999999999999/state",
    ] {
        let body = problem(
            app.get(path, Some(&viewer)).await,
            400,
            "invalid-path-parameter",
        )
        .await;
        assert_eq!(body["field"], "id", "{path}: {body}");
        // Without a token the answer is 401, as documented, before the path is looked at.
        problem(app.get(path, None).await, 401, "unauthorized").await;
    }
    problem(
        app.get("/auction/abc", None).await,
        400,
        "invalid-path-parameter",
    )
    .await;
    let res = app.get("/api/cache/queries/%FF", Some(&viewer)).await;
    problem(res, 400, "invalid-path-parameter").await;
}

/// A module added later whose document says only what succeeds: the kernel documents the rest.
struct LaterModule;

#[async_trait::async_trait]
impl bulwark_kernel::module::Module for LaterModule {
    fn name(&self) -> &'static str {
        "later"
    }
    fn check_config(
        &self,
        _settings: &bulwark_kernel::config::Settings,
    ) -> Result<Value, bulwark_kernel::config::ConfigError> {
        Ok(serde_json::json!({}))
    }
    async fn start(
        &self,
        _ctx: &bulwark_kernel::module::Context,
    ) -> Result<bulwark_kernel::module::ModuleParts, bulwark_kernel::module::ModuleError> {
        use bulwark_kernel::auth::{Auth, require};
        use bulwark_kernel::http::{ApiJson, ApiPath};
        let routes = axum::Router::new()
            .route(
                "/api/later/items/{id}",
                axum::routing::get(
                    |_auth: Auth<require::Viewer>, ApiPath(id): ApiPath<i64>| async move {
                        axum::Json(serde_json::json!({ "id": id }))
                    },
                ),
            )
            .route(
                "/api/later/items",
                axum::routing::post(
                    |_auth: Auth<require::Admin>, ApiJson(v): ApiJson<Value>| async move {
                        axum::Json(v)
                    },
                ),
            );
        let openapi = serde_json::from_value(serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "later", "version": "0"},
            "paths": {
                "/api/later/items/{id}": {"get": {
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                    "responses": {"200": {"description": "An item"}, "404": {"description": "No such item"}}
                }},
                "/api/later/items": {"post": {
                    "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                    "responses": {"200": {"description": "Stored"}}
                }}
            }
        }))
        .map_err(|e| bulwark_kernel::module::ModuleError::Other(e.to_string()))?;
        Ok(bulwark_kernel::module::ModuleParts {
            routes,
            openapi,
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn a_module_added_later_gets_the_shared_error_responses_documented() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .module(std::sync::Arc::new(LaterModule))
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    let get = &doc["paths"]["/api/later/items/{id}"]["get"];
    let post = &doc["paths"]["/api/later/items"]["post"];
    assert_eq!(get["security"], serde_json::json!([{"bearer": []}]));
    assert_eq!(post["security"], serde_json::json!([{"bearer": []}]));
    for status in ["400", "401", "403", "404", "503"] {
        assert!(documents_problem(get, status), "GET {status}: {get}");
    }
    assert_eq!(
        get["responses"]["404"]["description"], "No such item",
        "kept"
    );
    for status in ["400", "401", "403", "413", "415", "503"] {
        assert!(documents_problem(post, status), "POST {status}: {post}");
    }
    // And each is what the server answers.
    problem(
        app.get("/api/later/items/7", None).await,
        401,
        "unauthorized",
    )
    .await;
    problem(
        app.get("/api/later/items/x", Some(&app.token(Role::Viewer)))
            .await,
        400,
        "invalid-path-parameter",
    )
    .await;
    problem(
        app.client
            .post(app.url("/api/later/items"))
            .bearer_auth(app.token(Role::Viewer))
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("req"),
        403,
        "forbidden",
    )
    .await;
    problem(
        app.client
            .post(app.url("/api/later/items"))
            .bearer_auth(app.token(Role::Admin))
            .body("{}")
            .send()
            .await
            .expect("req"),
        415,
        "unsupported-media-type",
    )
    .await;
}

#[tokio::test]
async fn a_socket_route_asked_without_an_upgrade_is_a_documented_400() {
    let app = spawn_app().await;
    let viewer = app.token(Role::Viewer);
    // Schemathesis leaves `/ws/` out (an upgrade is not request/response): its 400s are here,
    // its 401 and 404 in tests/tests/auction.rs.
    problem(
        app.get("/ws/auction/1", Some(&viewer)).await,
        400,
        "bad-request",
    )
    .await;
    let body = problem(
        app.get("/ws/auction/abc", Some(&viewer)).await,
        400,
        "invalid-path-parameter",
    )
    .await;
    assert_eq!(body["field"], "id");
    problem(app.get("/ws/auction/1", None).await, 401, "unauthorized").await;
    let doc: Value = app
        .get("/api/openapi.json", None)
        .await
        .json()
        .await
        .expect("json");
    let op = &doc["paths"]["/ws/auction/{id}"]["get"];
    for status in ["400", "401", "403", "404"] {
        assert!(documents_problem(op, status), "{status}: {op}");
    }
}
