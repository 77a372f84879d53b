//! Named cached queries (issue 3 item 5, C3, C4): bound parameters, typed validation, whole
//! responses cached; and the stampede test — 1,000 concurrent requests on one cold key across
//! three bulwark processes sharing PostgreSQL and Redis run the slow query exactly once,
//! counted by PostgreSQL itself.

use std::time::Duration;

use bulwark_kernel::auth::Role;
use bulwark_kernel::module::ProcessRole;
use bulwark_tests::process::run_bulwark;
use bulwark_tests::services::{eventually, real_services};
use bulwark_tests::{Backend, TestAppBuilder};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};

#[tokio::test]
async fn named_query_is_served_cached_and_validates_parameters() {
    let app = TestAppBuilder::new(Backend::Embedded)
        .set("cache.namespaces.reports.class", "expensive")
        .set("cache.namespaces.reports.reason", "test: computed answers")
        .set("cache.namespaces.reports.ttl", "1m")
        .set("cache.queries.answer.namespace", "reports")
        .set(
            "cache.queries.answer.sql",
            "SELECT :n + 1 AS answer, :who AS who, ':n' AS literal",
        )
        .set(
            "cache.queries.answer.params",
            json!([{"name": "n", "type": "int"}, {"name": "who", "type": "text"}]),
        )
        .set("cache.queries.sneaky.namespace", "reports")
        .set(
            "cache.queries.sneaky.sql",
            "WITH x AS (SELECT 'K') DELETE FROM bus_streams WHERE name IN (SELECT * FROM x)",
        )
        .set("cache.queries.sneaky.params", json!([]))
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let viewer = app.token(Role::Viewer);
    let get = |q: &str| {
        let url = format!("/api/cache/queries/answer{q}");
        let (app, viewer) = (&app, &viewer);
        async move { app.get(&url, Some(viewer)).await }
    };
    let res = get("?n=41&who=bob").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("miss")
    );
    let rows: Value = res.json().await.expect("json");
    assert_eq!(rows, json!([{"answer": 42, "who": "bob", "literal": ":n"}]));
    let res = get("?who=bob&n=41").await;
    assert_eq!(
        res.headers().get("x-cache").and_then(|v| v.to_str().ok()),
        Some("hit")
    );
    // Parameters are bound: an injection attempt is just a string.
    let rows: Value = get("?n=1&who=x'%20OR%201=1--")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rows[0]["who"], "x' OR 1=1--");
    // Bad input, each a 400 naming the parameter.
    for (q, needle) in [
        ("?n=1", "missing parameter `who`"),
        ("?n=one&who=a", "`n` must be an integer"),
        ("?n=1&who=a&x=2", "unknown parameter `x`"),
    ] {
        let res = get(q).await;
        assert_eq!(res.status(), 400, "{q}");
        let body: Value = res.json().await.expect("problem");
        assert!(
            body["detail"].as_str().unwrap_or("").contains(needle),
            "{q}: {body}"
        );
    }
    assert_eq!(
        app.get("/api/cache/queries/nope", Some(&viewer))
            .await
            .status(),
        404
    );
    // Read-only even on SQLite: a statement that writes is refused by the database.
    let f = app.get("/api/cache/queries/sneaky", Some(&viewer)).await;
    assert_eq!(f.status(), 503);
    // The database itself is untouched and writable.
    let db = app.db.connect_migrated().await.expect("db");
    let w = db.execute_unprepared("CREATE TABLE t_after (x int)").await;
    assert!(w.is_ok(), "{w:?}");
    assert_eq!(
        app.get("/api/cache/queries/answer?n=1&who=a", None)
            .await
            .status(),
        401
    );
}

#[test]
fn bad_query_config_is_refused_naming_the_key() {
    for (extra, key) in [
        ("sql = \"DELETE FROM t\"", "cache.queries.q.sql"),
        ("sql = \"SELECT :undeclared\"", "cache.queries.q.sql"),
        ("sql = \"SELECT 1; SELECT 2\"", "cache.queries.q.sql"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = format!(
            "[cache.namespaces.r]\nclass = \"expensive\"\nreason = \"r\"\nttl = \"1m\"\n[cache.queries.q]\nnamespace = \"r\"\n{extra}\n"
        );
        std::fs::write(dir.path().join("c.toml"), cfg).expect("write");
        let (code, _, err) =
            run_bulwark(dir.path(), &["--config", "c.toml", "config", "check"], &[]);
        assert_eq!(code, 2, "{extra}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{extra}: {err}");
    }
}

#[tokio::test]
async fn stampede_across_three_processes_runs_the_query_once() {
    if !real_services() {
        return;
    }
    // The processes share this application's database, Redis prefix and bus prefix.
    let app = TestAppBuilder::new(Backend::Real).start().await;
    let conn = sea_orm::Database::connect(app.db.url.clone())
        .await
        .expect("connect");
    let name = app.db.url.rsplit('/').next().expect("db name").to_owned();
    for sql in [
        "CREATE FUNCTION slow_report(n int) RETURNS TABLE(v int) LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN QUERY SELECT n; END $$".to_owned(),
        format!("ALTER DATABASE {name} SET track_functions = 'all'"),
    ] {
        conn.execute(Statement::from_string(conn.get_database_backend(), sql)).await.expect("setup");
    }
    let config = r#"
[cache.namespaces.reports]
class = "expensive"
reason = "a one-second report; read by everyone, changes hourly"
ttl = "60s"
strategy = "lock"
lock_wait = "10s"
lock_lease = "10s"
[cache.queries.slow]
namespace = "reports"
sql = "SELECT v FROM slow_report(:n::int)"
params = [{ name = "n", type = "int" }]
"#;
    let procs = app
        .process(ProcessRole::All)
        .toml(config)
        .spawn_many(3)
        .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(400)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let token = app.token_for("stampede", Role::Viewer);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (client, token, barrier) = (client.clone(), token.clone(), barrier.clone());
        let url = procs[i % 3].url("/api/cache/queries/slow?n=7");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let res = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            (res.status().as_u16(), res.text().await.unwrap_or_default())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.expect("join");
        assert_eq!((status, body.as_str()), (200, r#"[{"v":7}]"#));
    }
    // Our own counter, summed over the three processes...
    let mut loads = 0.0;
    for p in &procs {
        loads += p
            .metric("bulwark_cache_loads_total", &[("namespace", "reports")])
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(
        loads, 1.0,
        "one load across three processes (bulwark_cache_loads_total)"
    );
    // ...and PostgreSQL's: the function ran once. Backends flush their statistics when idle.
    let calls = || async {
        let row = conn
            .query_one(Statement::from_string(
                conn.get_database_backend(),
                "SELECT COALESCE((SELECT calls FROM pg_stat_user_functions WHERE funcname = 'slow_report'), 0)::bigint AS calls",
            ))
            .await
            .ok()
            .flatten()?;
        row.try_get::<i64>("", "calls").ok()
    };
    let seen = eventually(Duration::from_secs(30), || async {
        conn.execute(Statement::from_string(
            conn.get_database_backend(),
            "SELECT pg_stat_clear_snapshot()",
        ))
        .await
        .ok();
        calls().await.filter(|c| *c > 0)
    })
    .await;
    assert_eq!(seen, Some(1), "PostgreSQL ran slow_report once");
    drop(procs);
}

#[tokio::test]
async fn a_killed_lock_holder_is_replaced_after_its_lease() {
    // C3 with real processes: process A takes the fill lock and starts a 3 s query; A is killed
    // (SIGKILL) mid-load. Process B's request waits, takes the lock over once A's 2 s lease ran
    // out, and loads. B's fallback is `unavailable` with lock_wait 20 s, so only the takeover
    // can answer 200 — waiting for a fill that never comes would answer 503.
    if !real_services() {
        return;
    }
    let app = TestAppBuilder::new(Backend::Real).start().await;
    let conn = sea_orm::Database::connect(app.db.url.clone())
        .await
        .expect("connect");
    conn.execute(Statement::from_string(
        conn.get_database_backend(),
        "CREATE FUNCTION slow_answer(n int) RETURNS TABLE(v int) LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(3); RETURN QUERY SELECT n; END $$".to_owned(),
    ))
    .await
    .expect("setup");
    let config = r#"
[cache.namespaces.reports]
class = "expensive"
reason = "a slow report"
ttl = "60s"
strategy = "lock"
lock_wait = "20s"
lock_lease = "2s"
fallback = "unavailable"
[cache.queries.slow]
namespace = "reports"
sql = "SELECT v FROM slow_answer(:n::int)"
params = [{ name = "n", type = "int" }]
"#;
    let mut procs = app
        .process(ProcessRole::All)
        .toml(config)
        .spawn_many(2)
        .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let token = app.token_for("lease", Role::Viewer);
    const SLOW: &str = "/api/cache/queries/slow?n=5";
    // A starts the load (and holds the lock) ...
    let a = {
        let (client, token, url) = (client.clone(), token.clone(), procs[0].url(SLOW));
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await })
    };
    let running = eventually(Duration::from_secs(10), || async {
        let rows = conn
            .query_all(Statement::from_string(
                conn.get_database_backend(),
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%slow_answer%' AND state = 'active' AND pid <> pg_backend_pid()".to_owned(),
            ))
            .await
            .ok()?;
        (!rows.is_empty()).then_some(())
    })
    .await;
    assert!(running.is_some(), "process A started the query");
    // ... and dies holding it.
    procs[0].kill9();
    assert!(
        a.await.expect("join").is_err(),
        "A's client saw the process die"
    );
    let res = client
        .get(procs[1].url(SLOW))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request to B");
    assert_eq!(
        res.status(),
        200,
        "B took the lock over after the lease instead of waiting for a dead filler"
    );
    assert_eq!(res.text().await.expect("body"), r#"[{"v":5}]"#);
    assert_eq!(
        procs[1]
            .metric("bulwark_cache_lock_timeouts_total", &[])
            .await
            .unwrap_or(0.0),
        0.0,
        "no waiter timed out"
    );
}
