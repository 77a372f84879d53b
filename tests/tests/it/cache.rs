//! The cache loader (issue 3, C1–C3, C7) against the in-process store and real Redis. Two
//! `Cache` values sharing one store stand in for two processes (the three-process stampede
//! test over HTTP comes with the named queries).

use bulwark_kernel::config::ModuleConfig as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulwark_cache::loader::{jittered, xfetch_should_refresh};
use bulwark_cache::{
    Cache, CacheClass, CacheConfig, CacheError, Fallback, NamespacePolicy, Outcome, Strategy,
};
use bulwark_kernel::config::SecretUrl;
use bulwark_kernel::kv::KvStore;
use bulwark_tests::Backend;
use bytes::Bytes;

fn policy(strategy: Strategy, ttl_ms: u64) -> NamespacePolicy {
    NamespacePolicy {
        class: CacheClass::Expensive,
        reason: "test".into(),
        ttl: Duration::from_millis(ttl_ms),
        jitter: 0.0,
        strategy,
        stale_ttl: Duration::from_secs(30),
        lock_wait: Duration::from_secs(5),
        lock_lease: Duration::from_secs(5),
        fallback: Fallback::Load,
        early_refresh_beta: None,
        max_value_bytes: 1024,
        error_ttl: Duration::ZERO,
        min_uses: 1,
        min_uses_window: Duration::from_secs(600),
        l1: true,
        l1_share: None,
    }
}

fn config(ns: &[(&str, NamespacePolicy)]) -> CacheConfig {
    CacheConfig {
        l1_max_bytes: 64 * 1024 * 1024,
        namespaces: ns
            .iter()
            .map(|(n, p)| ((*n).to_owned(), p.clone()))
            .collect(),
        queries: Default::default(),
    }
}

/// The shared tier on `backend`: the in-process store, or the test Redis under a fresh prefix.
async fn store(backend: Backend) -> Arc<dyn KvStore> {
    match backend {
        Backend::Embedded => Arc::new(bulwark_kernel::kv::memory::MemoryStore::new()),
        Backend::Real => {
            let url = bulwark_tests::services::redis_url().expect("each_backend! checked");
            let mut cfg = bulwark_tests::services::default_settings().kernel.redis;
            cfg.url = Some(SecretUrl::new(url));
            cfg.key_prefix = format!("{}:", bulwark_tests::services::unique("c"));
            cfg.command_timeout = Duration::from_secs(5);
            Arc::new(
                bulwark_kernel::kv::redis::RedisStore::connect(&cfg)
                    .await
                    .expect("redis"),
            )
        }
    }
}

fn counting_loader(
    count: &Arc<AtomicUsize>,
    value: &'static str,
    delay_ms: u64,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<Bytes, String>> + Send + 'static {
    let count = count.clone();
    move || {
        Box::pin(async move {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            Ok(Bytes::from_static(value.as_bytes()))
        })
    }
}

async fn concurrent_misses_in_one_process_run_one_loader(backend: Backend) {
    let store = store(backend).await;
    let cache = Cache::new(&config(&[("ns", policy(Strategy::Swr, 10_000))]), store);
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (cache, count) = (cache.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("ns", "k", counting_loader(&count, "v", 200))
                .await
        }));
    }
    for t in tasks {
        let (v, _) = t.await.expect("join").expect("value");
        assert_eq!(v, "v");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "C3 single-flight: one load for 200 concurrent misses"
    );
    let (_, outcome) = cache
        .get_or_load("ns", "k", counting_loader(&count, "v", 0))
        .await
        .expect("hit");
    assert_eq!(outcome, Outcome::Hit);
}

bulwark_tests::each_backend!(concurrent_misses_in_one_process_run_one_loader);

async fn lock_strategy_loads_once_across_processes(backend: Backend) {
    let store = store(backend).await;
    let cfg = config(&[("ns", policy(Strategy::Lock, 10_000))]);
    let (a, b) = (Cache::new(&cfg, store.clone()), Cache::new(&cfg, store));
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("ns", "k", counting_loader(&count, "v", 300))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("value").0, "v");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "C3: one load across both instances"
    );
}

bulwark_tests::each_backend!(lock_strategy_loads_once_across_processes);

async fn stale_while_revalidate_serves_stale_and_refreshes_once(backend: Backend) {
    let store = store(backend).await;
    let cache = Cache::new(&config(&[("ns", policy(Strategy::Swr, 200))]), store);
    let count = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_load("ns", "k", counting_loader(&count, "old", 0))
        .await
        .expect("first");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (cache, count) = (cache.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("ns", "k", counting_loader(&count, "new", 500))
                .await
        }));
    }
    for t in tasks {
        let (v, outcome) = t.await.expect("join").expect("value");
        assert_eq!(
            (v.as_ref(), outcome),
            (b"old".as_ref(), Outcome::Stale),
            "C2: stale served at once"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "stale answers do not wait for the 500 ms refresh"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count.load(Ordering::SeqCst), 2, "exactly one refresh ran");
    let (v, _) = cache
        .get_or_load("ns", "k", counting_loader(&count, "x", 0))
        .await
        .expect("after");
    assert_eq!(v, "new", "the refreshed value replaced the stale one");
}

bulwark_tests::each_backend!(stale_while_revalidate_serves_stale_and_refreshes_once);

async fn a_filler_whose_lease_expired_does_not_write(backend: Backend) {
    let store = store(backend).await;
    let mut p = policy(Strategy::Lock, 10_000);
    p.lock_lease = Duration::from_millis(150);
    p.lock_wait = Duration::from_millis(100);
    let cfg = config(&[("ns", p)]);
    let (a, b) = (
        Cache::new(&cfg, store.clone()),
        Cache::new(&cfg, store.clone()),
    );
    let count = Arc::new(AtomicUsize::new(0));
    // A takes the lock and is slow; its lease runs out.
    let slow = {
        let (a, c) = (a.clone(), count.clone());
        tokio::spawn(async move {
            a.get_or_load("ns", "k", counting_loader(&c, "stale-writer", 600))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    // B finds the lock free again and fills.
    let (v, _) = b
        .get_or_load("ns", "k", counting_loader(&count, "fresh", 0))
        .await
        .expect("b");
    assert_eq!(v, "fresh");
    slow.await
        .expect("join")
        .expect("a still answers its caller");
    let raw = store
        .get("cache:ns:k")
        .await
        .expect("get")
        .expect("present");
    let entry = bulwark_cache::Entry::decode(raw).expect("decodes");
    assert_eq!(
        entry.value, "fresh",
        "the late write of the expired holder was refused"
    );
}

bulwark_tests::each_backend!(a_filler_whose_lease_expired_does_not_write);

async fn invalidation_reaches_every_instance(backend: Backend) {
    let store = store(backend).await;
    let cfg = config(&[("ns", policy(Strategy::Swr, 60_000))]);
    let (a, b) = (
        Cache::new(&cfg, store.clone()),
        Cache::new(&cfg, store.clone()),
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    tokio::spawn(
        b.clone()
            .follow_invalidations(async move { s.notified().await }),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let count = Arc::new(AtomicUsize::new(0));
    a.get_or_load("ns", "k", counting_loader(&count, "v1", 0))
        .await
        .expect("a");
    assert_eq!(
        b.get_or_load("ns", "k", counting_loader(&count, "v1", 0))
            .await
            .expect("b")
            .1,
        Outcome::Hit
    );
    a.invalidate("ns", "k").await.expect("invalidate");
    let mut gone = false;
    for _ in 0..100 {
        let (v, outcome) = b
            .get_or_load("ns", "k", counting_loader(&count, "v2", 0))
            .await
            .expect("b again");
        if outcome == Outcome::Miss {
            assert_eq!(v, "v2");
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "C7: B's L1 copy was dropped by A's invalidation");
    stop.notify_one();
}

bulwark_tests::each_backend!(invalidation_reaches_every_instance);

#[tokio::test]
async fn ten_thousand_keys_written_together_expire_spread_over_the_jitter_window() {
    let mut p = policy(Strategy::Swr, 10_000);
    p.jitter = 0.5;
    let store: Arc<dyn KvStore> = Arc::new(bulwark_kernel::kv::memory::MemoryStore::new());
    let cache = Cache::new(&config(&[("ns", p)]), store.clone());
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    let mut buckets = [0usize; 10];
    for i in 0..10_000 {
        let t0 = now();
        cache
            .get_or_load("ns", &i.to_string(), || async {
                Ok(Bytes::from_static(b"x"))
            })
            .await
            .expect("load");
        let raw = store
            .get(&format!("cache:ns:{i}"))
            .await
            .expect("get")
            .expect("stored");
        let e = bulwark_cache::Entry::decode(raw).expect("entry");
        // Soft expiry lies in [t0 + ttl, t0 + 1.5 ttl] (plus the load's own ms); bucket the jitter.
        let jitter_ms = e.soft_expires_ms.saturating_sub(t0 + 10_000) as f64;
        let b = ((jitter_ms / 5_000.0) * 10.0).floor() as usize;
        buckets[b.min(9)] += 1;
    }
    for (i, n) in buckets.iter().enumerate() {
        assert!(
            (700..=1300).contains(n),
            "C1: bucket {i} of the jitter window holds {n} of 10,000: {buckets:?}"
        );
    }
}

#[test]
fn jitter_stays_inside_its_window() {
    let ttl = Duration::from_secs(100);
    assert_eq!(jittered(ttl, 0.2, 0.0), ttl);
    assert_eq!(jittered(ttl, 0.2, 0.5), Duration::from_secs(110));
    assert!(jittered(ttl, 0.2, 0.999_999) < Duration::from_secs(120));
}

#[test]
fn xfetch_refresh_probability_matches_the_paper() {
    // P(refresh | t before expiry) = exp(−t / (β·δ)).
    let (delta, beta, expiry) = (100u64, 1.5f64, 1_000_000u64);
    let trials = 200_000;
    for t in [0u64, 50, 150, 300, 600] {
        let hits = (0..trials)
            .filter(|_| {
                xfetch_should_refresh(expiry - t, expiry, delta, beta, rand::random::<f64>())
            })
            .count();
        let observed = hits as f64 / trials as f64;
        let expected = (-(t as f64) / (beta * delta as f64)).exp();
        assert!(
            (observed - expected).abs() < 0.01,
            "t={t}: observed {observed:.4}, expected {expected:.4}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_refused_or_treated_as_a_miss() {
    let store: Arc<dyn KvStore> = Arc::new(bulwark_kernel::kv::memory::MemoryStore::new());
    let cache = Cache::new(
        &config(&[("ns", policy(Strategy::Swr, 10_000))]),
        store.clone(),
    );
    // Unknown namespace.
    let err = cache
        .get_or_load("nope", "k", || async { Ok(Bytes::new()) })
        .await
        .expect_err("unknown");
    assert!(matches!(err, CacheError::UnknownNamespace(_)));
    // Garbage in L2 is a miss, not a crash.
    store
        .set("cache:ns:g", Bytes::from_static(b"\xffgarbage"), None)
        .await
        .expect("set");
    let (v, outcome) = cache
        .get_or_load("ns", "g", || async { Ok(Bytes::from_static(b"good")) })
        .await
        .expect("load");
    assert_eq!((v.as_ref(), outcome), (b"good".as_ref(), Outcome::Miss));
    // Values over the size limit are served but not cached.
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let c = count.clone();
        let (v, _) = cache
            .get_or_load("ns", "big", move || async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(Bytes::from(vec![0u8; 4096]))
            })
            .await
            .expect("big");
        assert_eq!(v.len(), 4096);
    }
    assert_eq!(count.load(Ordering::SeqCst), 3, "never cached");
    // Loader errors reach the caller and are not cached.
    let err = cache
        .get_or_load("ns", "e", || async { Err("db down".to_owned()) })
        .await
        .expect_err("error");
    assert!(matches!(err, CacheError::Loader(_)));
    let (v, _) = cache
        .get_or_load("ns", "e", || async { Ok(Bytes::from_static(b"ok")) })
        .await
        .expect("recovers");
    assert_eq!(v, "ok");
}

#[test]
fn never_class_and_bad_policies_are_refused_naming_the_key() {
    let mut p = policy(Strategy::Swr, 1000);
    p.class = CacheClass::Never;
    let err = config(&[("prices", p)]).validate().expect_err("never");
    assert_eq!(err.key, "cache.namespaces.prices.class");
    let mut p = policy(Strategy::Swr, 1000);
    p.jitter = 1.5;
    assert_eq!(
        config(&[("x", p)]).validate().expect_err("jitter").key,
        "cache.namespaces.x.jitter"
    );
    let mut p = policy(Strategy::Swr, 1000);
    p.reason = " ".into();
    assert_eq!(
        config(&[("x", p)]).validate().expect_err("reason").key,
        "cache.namespaces.x.reason"
    );
}

#[tokio::test]
async fn admin_api_invalidates_and_rejects_bad_input() {
    use bulwark_kernel::auth::Role;
    let app = bulwark_tests::TestAppBuilder::new(bulwark_tests::Backend::Embedded)
        .set("cache.namespaces.reports.class", "expensive")
        .set(
            "cache.namespaces.reports.reason",
            "daily aggregates: ~1000 reads per write, seconds to compute",
        )
        .set("cache.namespaces.reports.ttl", "5m")
        .spawn()
        .await
        .expect("spawn")
        .expect("app");
    let post = |token: String, body: &'static str| {
        app.request(reqwest::Method::POST, "/api/cache/invalidate", Some(&token))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok = post(
        app.token(Role::Admin),
        r#"{"namespace":"reports","key":"2026-11"}"#,
    )
    .await
    .expect("req");
    assert_eq!(ok.status(), 204);
    assert_eq!(
        post(
            app.token(Role::Viewer),
            r#"{"namespace":"reports","key":"x"}"#
        )
        .await
        .expect("req")
        .status(),
        403
    );
    let unknown = post(app.token(Role::Admin), r#"{"namespace":"nope","key":"x"}"#)
        .await
        .expect("req");
    assert_eq!(unknown.status(), 404);
    let by_tag = post(
        app.token(Role::Admin),
        r#"{"namespace":"reports","tag":"region-eu"}"#,
    )
    .await
    .expect("req");
    assert_eq!(by_tag.status(), 204, "invalidation by tag");
    for body in [
        r#"{"namespace":"reports"}"#,
        r#"{"namespace":"reports","key":"a","tag":"b"}"#,
        r#"{"namespace":"reports","key":7}"#,
    ] {
        let bad = post(app.token(Role::Admin), body).await.expect("req");
        assert_eq!(bad.status(), 400, "{body}");
        let problem: serde_json::Value = bad.json().await.expect("problem");
        assert!(
            problem["detail"].as_str().unwrap_or("").contains("key"),
            "{body}: {problem}"
        );
    }
    let stats = app
        .get("/api/cache/stats", Some(&app.token(Role::Viewer)))
        .await;
    assert_eq!(stats.status(), 200);
    let report: serde_json::Value = app
        .get("/api/cache/policies", Some(&app.token(Role::Viewer)))
        .await
        .json()
        .await
        .expect("json");
    // config/default.toml also declares the reporting module's namespace.
    let reports = report
        .as_array()
        .and_then(|a| a.iter().find(|n| n["namespace"] == "reports"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(reports["namespace"], "reports", "{report}");
    assert_eq!(reports["declared"]["class"], "expensive");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"bulwark_cache_memory_bytes{tier="l1"}"#),
        "memory gauge exported"
    );
    assert!(metrics.contains(r#"bulwark_cache_memory_limit_bytes{tier="l1"}"#));
}

#[test]
fn config_check_refuses_a_never_class_namespace() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("cache.toml"),
        "[cache.namespaces.prices]\nclass = \"never\"\nreason = \"live prices\"\nttl = \"1s\"\n",
    )
    .expect("write");
    let (code, _, err) = bulwark_tests::process::run_bulwark(
        dir.path(),
        &["--config", "cache.toml", "config", "check"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`cache.namespaces.prices.class`"), "{err}");
}

#[tokio::test]
async fn observed_behaviour_that_contradicts_the_declaration_is_flagged() {
    // C4: a namespace declared read_mostly that is written often and read once per key.
    let mut p = policy(Strategy::Swr, 60_000);
    p.class = CacheClass::ReadMostly;
    let store: Arc<dyn KvStore> = Arc::new(bulwark_kernel::kv::memory::MemoryStore::new());
    let cache = Cache::new(&config(&[("tail", p.clone()), ("hot", p)]), store);
    for i in 0..150 {
        cache
            .get_or_load("tail", &i.to_string(), || async {
                Ok(Bytes::from_static(b"x"))
            })
            .await
            .expect("load");
        if i % 3 == 0 {
            cache
                .invalidate("tail", &i.to_string())
                .await
                .expect("invalidate");
        }
        cache
            .get_or_load("hot", "one", || async { Ok(Bytes::from_static(b"x")) })
            .await
            .expect("load");
    }
    let report = cache.policy_report();
    let tail = report.iter().find(|r| r.namespace == "tail").expect("tail");
    assert_eq!(
        (tail.reads, tail.misses, tail.invalidations),
        (150, 150, 50)
    );
    assert_eq!(tail.hit_rate, Some(0.0));
    assert_eq!(tail.flags.len(), 2, "{:?}", tail.flags);
    assert!(tail.flags.iter().any(|f| f.contains("reads per write")));
    assert!(tail.flags.iter().any(|f| f.contains("hit rate")));
    let hot = report.iter().find(|r| r.namespace == "hot").expect("hot");
    assert_eq!((hot.reads, hot.hits), (150, 149));
    assert!(hot.flags.is_empty(), "{:?}", hot.flags);
}

async fn waiters_give_up_after_lock_wait_and_apply_the_fallback(backend: Backend) {
    // C3: the others wait at most lock_wait, then fall back (here: 503-style Unavailable, or
    // load anyway). Exercises bulwark_cache_lock_timeouts_total and _lock_wait_seconds.
    let store = store(backend).await;
    for (fallback, expect_unavailable) in [(Fallback::Unavailable, true), (Fallback::Load, false)] {
        let mut p = policy(Strategy::Lock, 10_000);
        p.lock_wait = Duration::from_millis(100);
        p.fallback = fallback;
        let cfg = config(&[("ns", p)]);
        let (a, b) = (
            Cache::new(&cfg, store.clone()),
            Cache::new(&cfg, store.clone()),
        );
        let count = Arc::new(AtomicUsize::new(0));
        let key = format!("k-{fallback:?}");
        let slow = {
            let (a, c, key) = (a.clone(), count.clone(), key.clone());
            tokio::spawn(async move {
                a.get_or_load("ns", &key, counting_loader(&c, "slow", 1000))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let r = b
            .get_or_load("ns", &key, counting_loader(&count, "fallback", 0))
            .await;
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "the waiter did not wait for the slow holder"
        );
        if expect_unavailable {
            assert!(matches!(r, Err(CacheError::Unavailable(_))), "{r:?}");
        } else {
            assert_eq!(r.expect("loaded anyway").0, "fallback");
        }
        slow.await.expect("join").expect("the holder still answers");
    }
}

bulwark_tests::each_backend!(waiters_give_up_after_lock_wait_and_apply_the_fallback);

fn failing_loader(
    count: &Arc<AtomicUsize>,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, Result<Bytes, String>> + Send + 'static {
    let count = count.clone();
    move || {
        Box::pin(async move {
            count.fetch_add(1, Ordering::SeqCst);
            Err("origin down".to_owned())
        })
    }
}

async fn loader_errors_are_remembered_briefly_and_never_replace_a_good_value(backend: Backend) {
    // Issue 3 faults: a failed load is cached for error_ttl only; a stale value beats an error.
    let store = store(backend).await;
    let mut p = policy(Strategy::Lock, 150);
    p.error_ttl = Duration::from_millis(400);
    p.fallback = Fallback::Load;
    let cache = Cache::new(&config(&[("ns", p)]), store);
    let count = Arc::new(AtomicUsize::new(0));
    // No value yet: the error comes back, and for error_ttl the loader is not run again.
    for _ in 0..5 {
        let r = cache
            .get_or_load("ns", "fresh", failing_loader(&count))
            .await;
        assert!(
            matches!(r, Err(CacheError::Loader(ref m)) if m == "origin down"),
            "{r:?}"
        );
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "one load per error_ttl");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = cache
        .get_or_load("ns", "fresh", failing_loader(&count))
        .await;
    assert_eq!(count.load(Ordering::SeqCst), 2, "retried after error_ttl");

    // A good value that went stale is served while the origin fails, and stays.
    let good = Arc::new(AtomicUsize::new(0));
    cache
        .get_or_load("ns", "k", counting_loader(&good, "good", 0))
        .await
        .expect("first load");
    tokio::time::sleep(Duration::from_millis(250)).await; // past ttl, inside stale_ttl
    let fails = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let (v, outcome) = cache
            .get_or_load("ns", "k", failing_loader(&fails))
            .await
            .expect("stale beats an error");
        assert_eq!((v.as_ref(), outcome), (&b"good"[..], Outcome::Stale));
    }
    assert_eq!(
        fails.load(Ordering::SeqCst),
        1,
        "the failure was remembered"
    );
}

bulwark_tests::each_backend!(loader_errors_are_remembered_briefly_and_never_replace_a_good_value);

async fn keys_are_admitted_only_after_min_uses(backend: Backend) {
    // C4 admission (nginx min_uses): long-tail keys read once are served but never stored.
    let store = store(backend).await;
    let mut p = policy(Strategy::Lock, 10_000);
    p.min_uses = 3;
    let cache = Cache::new(&config(&[("tail", p)]), store);
    let count = Arc::new(AtomicUsize::new(0));
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        let (v, o) = cache
            .get_or_load("tail", "k", counting_loader(&count, "v", 0))
            .await
            .expect("served");
        assert_eq!(v, "v");
        outcomes.push(o);
    }
    assert_eq!(
        outcomes,
        vec![Outcome::Miss, Outcome::Miss, Outcome::Miss, Outcome::Hit],
        "stored on the third request, hit on the fourth"
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);
    // A thousand keys read once each leave nothing behind in L1.
    let before = cache.l1_bytes().await;
    for i in 0..1000 {
        cache
            .get_or_load(
                "tail",
                &format!("once-{i}"),
                counting_loader(&count, "v", 0),
            )
            .await
            .expect("served");
    }
    assert_eq!(cache.l1_bytes().await, before, "nothing admitted");
}

bulwark_tests::each_backend!(keys_are_admitted_only_after_min_uses);

#[tokio::test]
async fn redis_down_degrades_to_l1_and_single_flight_and_recovers() {
    // Issue 3 faults: with the shared tier gone, each process still loads a key once, serves
    // it from L1, says it is degraded, and recovers by itself when Redis is back.
    let port = bulwark_tests::procs::free_port();
    let Some(mut redis) = bulwark_tests::procs::start_redis(port) else {
        return;
    };
    let mut cfg = bulwark_tests::services::default_settings().kernel.redis;
    cfg.url = Some(SecretUrl::new(format!("redis://127.0.0.1:{port}/0")));
    cfg.key_prefix = format!("{}:", bulwark_tests::services::unique("deg"));
    cfg.command_timeout = Duration::from_millis(500);
    let store: Arc<dyn KvStore> = Arc::new(
        bulwark_kernel::kv::redis::RedisStore::connect(&cfg)
            .await
            .expect("redis"),
    );
    let cache = Cache::new(&config(&[("ns", policy(Strategy::Lock, 10_000))]), store);
    cache
        .get_or_load("ns", "warm", counting_loader(&Arc::default(), "w", 0))
        .await
        .expect("up");
    assert!(!cache.is_degraded());
    redis.kill9();
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (cache, count) = (cache.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("ns", "k", counting_loader(&count, "v", 300))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await
                .expect("join")
                .expect("served while Redis is down")
                .0,
            "v"
        );
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "single-flight still holds");
    assert!(cache.is_degraded(), "degraded while Redis is down");
    let (_, o) = cache
        .get_or_load("ns", "k", counting_loader(&count, "v", 0))
        .await
        .expect("L1");
    assert_eq!(o, Outcome::Hit, "served from L1");
    let _redis = bulwark_tests::procs::start_redis(port).expect("restart");
    let recovered = bulwark_tests::services::eventually(Duration::from_secs(20), || async {
        let _ = cache
            .get_or_load("ns", "other", counting_loader(&Arc::default(), "o", 0))
            .await;
        (!cache.is_degraded()).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "recovers without a restart");
}

async fn invalidating_a_tag_drops_every_key_filed_under_it(backend: Backend) {
    // C7 by tag: two pages showing product 7 are dropped together; another page stays.
    let store = store(backend).await;
    let cache = Cache::new(&config(&[("pages", policy(Strategy::Lock, 60_000))]), store);
    let count = Arc::new(AtomicUsize::new(0));
    for (key, tags) in [
        ("home", &["product-7", "product-9"][..]),
        ("product-7", &["product-7"][..]),
        ("about", &[][..]),
    ] {
        cache
            .get_or_load_tagged("pages", key, tags, counting_loader(&count, "v", 0))
            .await
            .expect("load");
    }
    let n = cache
        .invalidate_tag("pages", "product-7")
        .await
        .expect("tag");
    assert_eq!(n, 2);
    for (key, expected) in [
        ("home", Outcome::Miss),
        ("product-7", Outcome::Miss),
        ("about", Outcome::Hit),
    ] {
        let (_, o) = cache
            .get_or_load("pages", key, counting_loader(&count, "v", 0))
            .await
            .expect("get");
        assert_eq!(o, expected, "{key}");
    }
    assert_eq!(
        cache
            .invalidate_tag("pages", "nobody")
            .await
            .expect("empty tag"),
        0
    );
    assert!(matches!(
        cache.invalidate_tag("nope", "t").await,
        Err(CacheError::UnknownNamespace(_))
    ));
}

bulwark_tests::each_backend!(invalidating_a_tag_drops_every_key_filed_under_it);

async fn a_key_invalidated_while_loading_is_not_written_back(backend: Backend) {
    // The leases lesson: a load that began before an invalidation may carry the old value;
    // it is served to its waiters but not stored, here and when another instance invalidates.
    let store = store(backend).await;
    let cfg = config(&[("ns", policy(Strategy::Swr, 60_000))]);
    let (a, b) = (Cache::new(&cfg, store.clone()), Cache::new(&cfg, store));
    let stop = Arc::new(tokio::sync::Notify::new());
    let follower = {
        let stop = stop.clone();
        tokio::spawn(
            a.clone()
                .follow_invalidations(async move { stop.notified().await }),
        )
    };
    tokio::time::sleep(Duration::from_millis(200)).await; // the follower subscribed
    for invalidator in [&a, &b] {
        let key = bulwark_tests::services::unique("k");
        let count = Arc::new(AtomicUsize::new(0));
        let loading = {
            let (a, key, count) = (a.clone(), key.clone(), count.clone());
            tokio::spawn(async move {
                a.get_or_load("ns", &key, counting_loader(&count, "old", 500))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        invalidator
            .invalidate("ns", &key)
            .await
            .expect("invalidate");
        let (v, o) = loading.await.expect("join").expect("served");
        assert_eq!((v.as_ref(), o), (&b"old"[..], Outcome::Miss));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, o) = a
            .get_or_load("ns", &key, counting_loader(&count, "new", 0))
            .await
            .expect("again");
        assert_eq!(o, Outcome::Miss, "the outdated load was not stored");
    }
    stop.notify_waiters();
    let _ = follower.await;
}

bulwark_tests::each_backend!(a_key_invalidated_while_loading_is_not_written_back);

#[tokio::test]
async fn an_l2_only_namespace_sees_invalidations_at_once_without_a_broadcast() {
    // `l1 = false`: no process copy, so another instance's invalidation needs no broadcast.
    if !bulwark_tests::services::real_services() {
        return;
    }
    let store = store(Backend::Real).await;
    let mut p = policy(Strategy::Lock, 60_000);
    p.l1 = false;
    let cfg = config(&[("shared", p), ("local", policy(Strategy::Lock, 60_000))]);
    let (a, b) = (Cache::new(&cfg, store.clone()), Cache::new(&cfg, store));
    let count = Arc::new(AtomicUsize::new(0));
    for ns in ["shared", "local"] {
        a.get_or_load(ns, "k", counting_loader(&count, "v", 0))
            .await
            .expect("load");
        b.invalidate(ns, "k").await.expect("invalidate");
    }
    // No follower runs: only the L2-only namespace notices.
    let (_, shared) = a
        .get_or_load("shared", "k", counting_loader(&count, "v", 0))
        .await
        .expect("get");
    let (_, local) = a
        .get_or_load("local", "k", counting_loader(&count, "v", 0))
        .await
        .expect("get");
    assert_eq!((shared, local), (Outcome::Miss, Outcome::Hit));
    assert!(a.l1_bytes().await > 0, "only the local namespace is in L1");
}

#[tokio::test]
async fn waiters_behind_another_instance_poll_the_store_once_per_process() {
    // Issue 3 faults, "waiters are bounded": 500 requests in one process wait for another
    // instance's slow fill. They share one wait, so Redis sees about one GET per request (the
    // lookup) plus one poller — not 500 pollers (≈ 25,000 GETs over the half second).
    let port = bulwark_tests::procs::free_port();
    let Some(_redis) = bulwark_tests::procs::start_redis(port) else {
        return;
    };
    let mut rcfg = bulwark_tests::services::default_settings().kernel.redis;
    rcfg.url = Some(SecretUrl::new(format!("redis://127.0.0.1:{port}/0")));
    rcfg.key_prefix = "w:".into();
    let store: Arc<dyn KvStore> = Arc::new(
        bulwark_kernel::kv::redis::RedisStore::connect(&rcfg)
            .await
            .expect("redis"),
    );
    let cfg = config(&[("ns", policy(Strategy::Lock, 60_000))]);
    let (a, b) = (Cache::new(&cfg, store.clone()), Cache::new(&cfg, store));
    let count = Arc::new(AtomicUsize::new(0));
    let filler = {
        let (a, count) = (a.clone(), count.clone());
        tokio::spawn(async move {
            a.get_or_load("ns", "k", counting_loader(&count, "v", 600))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // A holds the fill lock
    let gets = || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "commandstats"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = gets();
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let (b, count) = (b.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            b.get_or_load("ns", "k", counting_loader(&count, "v", 0))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("value").0, "v");
    }
    filler.await.expect("join").expect("filled");
    let polled = gets() - before;
    assert_eq!(count.load(Ordering::SeqCst), 1, "one load in the cluster");
    assert!(polled < 2_000, "{polled} GETs: waiters share one poller");
}

fn l1_share_config(share: Option<f64>) -> CacheConfig {
    let mut small = policy(Strategy::Swr, 600_000);
    small.l1_share = share;
    let mut cfg = config(&[("small", small), ("big", policy(Strategy::Swr, 600_000))]);
    cfg.l1_max_bytes = 64 * 1024;
    cfg
}

#[tokio::test]
async fn a_namespace_with_an_l1_share_is_not_evicted_by_a_busy_one() {
    // Issue 3 deliverable 2: L1 bounded in bytes with a per-namespace share.
    let kv: Arc<dyn KvStore> = Arc::new(NoStore);
    let cache = Cache::new(&l1_share_config(Some(0.25)), kv);
    let count = Arc::new(AtomicUsize::new(0));
    for i in 0..5 {
        cache
            .get_or_load(
                "small",
                &format!("s{i}"),
                counting_loader(&count, "small value", 0),
            )
            .await
            .expect("load");
    }
    // The busy namespace writes far more than all of L1, each key read several times (so
    // frequency-based admission would let it push others out).
    for round in 0..3 {
        for i in 0..400 {
            let _ = round;
            cache
                .get_or_load(
                    "big",
                    &format!("b{i}"),
                    counting_loader(&count, "big value", 0),
                )
                .await
                .expect("load");
        }
        cache.l1_bytes().await; // run moka's maintenance (evictions)
    }
    for i in 0..5 {
        let (_, o) = cache
            .get_or_load(
                "small",
                &format!("s{i}"),
                counting_loader(&count, "small value", 0),
            )
            .await
            .expect("get");
        assert_eq!(
            o,
            Outcome::Hit,
            "small key s{i} survived in its reserved share"
        );
    }
    assert!(
        cache.l1_bytes().await <= 64 * 1024,
        "L1 stays within l1_max_bytes"
    );
}

#[test]
fn l1_shares_are_validated_naming_the_key() {
    for (share, key) in [(Some(0.0), "l1_share"), (Some(1.5), "l1_share")] {
        let err = l1_share_config(share).validate().expect_err("refused");
        assert!(err.key.ends_with(key), "{err:?}");
    }
    // Everything reserved, one namespace without a share: nothing left for it.
    let mut cfg = l1_share_config(Some(1.0));
    cfg.namespaces.get_mut("small").expect("small").l1_share = Some(1.0);
    let err = cfg.validate().expect_err("refused");
    assert_eq!(err.key, "cache.namespaces.big.l1_share");
    assert!(l1_share_config(Some(0.5)).validate().is_ok());
}

/// A shared tier that never holds anything, so these tests measure L1 alone.
struct NoStore;

#[async_trait::async_trait]
impl KvStore for NoStore {
    fn kind(&self) -> &'static str {
        "none"
    }
    async fn get(&self, _: &str) -> Result<Option<Bytes>, bulwark_kernel::kv::KvError> {
        Ok(None)
    }
    async fn set(
        &self,
        _: &str,
        _: Bytes,
        _: Option<Duration>,
    ) -> Result<(), bulwark_kernel::kv::KvError> {
        Ok(())
    }
    async fn set_nx(
        &self,
        _: &str,
        _: Bytes,
        _: Option<Duration>,
    ) -> Result<bool, bulwark_kernel::kv::KvError> {
        Ok(true)
    }
    async fn delete(&self, _: &str) -> Result<bool, bulwark_kernel::kv::KvError> {
        Ok(false)
    }
    async fn ttl(&self, _: &str) -> Result<Option<Duration>, bulwark_kernel::kv::KvError> {
        Ok(None)
    }
    async fn try_lock(
        &self,
        key: &str,
        _: Duration,
    ) -> Result<Option<bulwark_kernel::kv::LockGuard>, bulwark_kernel::kv::KvError> {
        Ok(Some(bulwark_kernel::kv::LockGuard {
            key: key.to_owned(),
            owner: "me".into(),
            fencing_token: 1,
        }))
    }
    async fn extend_lock(
        &self,
        _: &bulwark_kernel::kv::LockGuard,
        _: Duration,
    ) -> Result<bool, bulwark_kernel::kv::KvError> {
        Ok(true)
    }
    async fn release_lock(
        &self,
        _: &bulwark_kernel::kv::LockGuard,
    ) -> Result<bool, bulwark_kernel::kv::KvError> {
        Ok(true)
    }
    async fn current_fencing_token(&self, _: &str) -> Result<u64, bulwark_kernel::kv::KvError> {
        Ok(1)
    }
    async fn publish(&self, _: &str, _: Bytes) -> Result<(), bulwark_kernel::kv::KvError> {
        Ok(())
    }
    async fn subscribe(
        &self,
        _: &str,
    ) -> Result<futures::stream::BoxStream<'static, Bytes>, bulwark_kernel::kv::KvError> {
        Ok(Box::pin(futures::stream::pending()))
    }
    async fn presence_heartbeat(
        &self,
        _: &str,
        _: &str,
        _: Duration,
    ) -> Result<(), bulwark_kernel::kv::KvError> {
        Ok(())
    }
    async fn presence_remove(&self, _: &str, _: &str) -> Result<(), bulwark_kernel::kv::KvError> {
        Ok(())
    }
    async fn presence_members(&self, _: &str) -> Result<Vec<String>, bulwark_kernel::kv::KvError> {
        Ok(Vec::new())
    }
    async fn health(&self) -> Result<(), bulwark_kernel::kv::KvError> {
        Ok(())
    }
    async fn memory(&self) -> Result<(u64, Option<u64>), bulwark_kernel::kv::KvError> {
        Ok((0, None))
    }
}

/// A store whose value reads (`cache:` keys) see the data at once but answer `delay` later:
/// a request whose read predates a fill gets its "miss" only after that fill has finished.
struct SlowReads {
    inner: Arc<dyn KvStore>,
    delay: Duration,
}

type KvResult<T> = Result<T, bulwark_kernel::kv::KvError>;

#[async_trait::async_trait]
impl KvStore for SlowReads {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn get(&self, key: &str) -> KvResult<Option<Bytes>> {
        let read = self.inner.get(key).await;
        if key.starts_with("cache:") {
            tokio::time::sleep(self.delay).await;
        }
        read
    }
    async fn set(&self, k: &str, v: Bytes, ttl: Option<Duration>) -> KvResult<()> {
        self.inner.set(k, v, ttl).await
    }
    async fn set_nx(&self, k: &str, v: Bytes, ttl: Option<Duration>) -> KvResult<bool> {
        self.inner.set_nx(k, v, ttl).await
    }
    async fn delete(&self, k: &str) -> KvResult<bool> {
        self.inner.delete(k).await
    }
    async fn ttl(&self, k: &str) -> KvResult<Option<Duration>> {
        self.inner.ttl(k).await
    }
    async fn try_lock(
        &self,
        k: &str,
        lease: Duration,
    ) -> KvResult<Option<bulwark_kernel::kv::LockGuard>> {
        self.inner.try_lock(k, lease).await
    }
    async fn extend_lock(
        &self,
        g: &bulwark_kernel::kv::LockGuard,
        lease: Duration,
    ) -> KvResult<bool> {
        self.inner.extend_lock(g, lease).await
    }
    async fn release_lock(&self, g: &bulwark_kernel::kv::LockGuard) -> KvResult<bool> {
        self.inner.release_lock(g).await
    }
    async fn current_fencing_token(&self, k: &str) -> KvResult<u64> {
        self.inner.current_fencing_token(k).await
    }
    async fn publish(&self, c: &str, p: Bytes) -> KvResult<()> {
        self.inner.publish(c, p).await
    }
    async fn subscribe(&self, c: &str) -> KvResult<futures::stream::BoxStream<'static, Bytes>> {
        self.inner.subscribe(c).await
    }
    async fn presence_heartbeat(&self, s: &str, m: &str, ttl: Duration) -> KvResult<()> {
        self.inner.presence_heartbeat(s, m, ttl).await
    }
    async fn presence_remove(&self, s: &str, m: &str) -> KvResult<()> {
        self.inner.presence_remove(s, m).await
    }
    async fn presence_members(&self, s: &str) -> KvResult<Vec<String>> {
        self.inner.presence_members(s).await
    }
    async fn health(&self) -> KvResult<()> {
        self.inner.health().await
    }
    async fn memory(&self) -> KvResult<(u64, Option<u64>)> {
        self.inner.memory().await
    }
}

/// C3 / single-flight: a miss whose lookup predates a fill but whose turn comes after that fill
/// finished (and left the single-flight map) takes the filled value instead of loading again —
/// from L1 in the same process (`swr`: no fill lock) and from L2 in another process (`lock`:
/// looked at right after taking the fill lock).
async fn a_miss_overtaken_by_a_finished_fill_does_not_load_again(backend: Backend) {
    let inner = store(backend).await;
    let kv: Arc<dyn KvStore> = Arc::new(SlowReads {
        inner,
        delay: Duration::from_millis(300),
    });
    for (case, strategy, same_process) in [
        ("swr, same process", Strategy::Swr, true),
        ("lock, other process", Strategy::Lock, false),
    ] {
        let cfg = config(&[("race", policy(strategy, 60_000))]);
        let a = Cache::new(&cfg, kv.clone());
        let second = if same_process {
            a.clone()
        } else {
            Cache::new(&cfg, kv.clone())
        };
        let key = bulwark_tests::services::unique("k");
        let loads = Arc::new(AtomicUsize::new(0));
        // First miss: its read answers at 300 ms, then it loads (50 ms) and writes.
        let first = {
            let (a, key, l) = (a.clone(), key.clone(), counting_loader(&loads, "v", 50));
            tokio::spawn(async move { a.get_or_load("race", &key, l).await })
        };
        // The second reads at 150 ms, before that write, and gets its miss at 450 ms,
        // after the first fill finished.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let got = second
            .get_or_load("race", &key, counting_loader(&loads, "w", 50))
            .await
            .expect("second");
        let first = first.await.expect("join").expect("first");
        assert_eq!(first.0, Bytes::from_static(b"v"));
        assert_eq!(got.0, Bytes::from_static(b"v"), "{case}: the filled value");
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "{case} ({}): one load",
            kv.kind()
        );
    }
}

bulwark_tests::each_backend!(a_miss_overtaken_by_a_finished_fill_does_not_load_again);
