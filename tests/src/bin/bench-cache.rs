//! Cache benchmarks (issue 3): prints figures and ratios against baselines run in the same
//! process, asserts nothing.
//!
//! 1. L1 hit: `Cache::get_or_load` on a warm key vs a raw moka `get`.
//! 2. L2 hit (L1 too small to hold anything): `get_or_load` vs a raw fred `GET` (needs Redis).
//! 3. Named query hit over HTTP, 64 keep-alive connections, vs `/livez` on the same server.
//! 4. Loads per expiry with 1k / 5k / 10k concurrent requests on one cold key (loader = one
//!    PostgreSQL query that sleeps 100 ms), vs the naive baseline (every request queries).
//! 5. L1 accounted bytes vs the process's RSS growth after 1M entries.
//!
//! Run: `scripts/bench-cache` (release build, services started).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulwark_cache::{Cache, CacheClass, CacheConfig, Fallback, NamespacePolicy, Strategy};
use bulwark_kernel::auth::Role;
use bulwark_kernel::kv::{KvError, KvStore, LockGuard};
use bulwark_tests::{Backend, TestAppBuilder};
use bytes::Bytes;
use sea_orm::{ConnectionTrait, Statement};

fn policy(strategy: Strategy, ttl: Duration) -> NamespacePolicy {
    NamespacePolicy {
        class: CacheClass::Expensive,
        reason: "benchmark".into(),
        ttl,
        jitter: 0.0,
        strategy,
        stale_ttl: Duration::from_secs(60),
        lock_wait: Duration::from_secs(30),
        lock_lease: Duration::from_secs(30),
        fallback: Fallback::Load,
        early_refresh_beta: None,
        max_value_bytes: 1 << 20,
        error_ttl: Duration::ZERO,
        min_uses: 1,
        min_uses_window: Duration::from_secs(600),
        l1: true,
        l1_share: None,
    }
}

fn config(l1_max_bytes: u64, p: NamespacePolicy) -> CacheConfig {
    CacheConfig {
        l1_max_bytes,
        namespaces: [("bench".to_owned(), p)].into_iter().collect(),
        queries: Default::default(),
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn value() -> Bytes {
    Bytes::from(vec![b'x'; 100])
}

async fn l1_hit() {
    const N: u32 = 200_000;
    let kv: Arc<dyn KvStore> = Arc::new(bulwark_kernel::kv::memory::MemoryStore::new());
    let cache = Cache::new(
        &config(64 << 20, policy(Strategy::Swr, Duration::from_secs(3600))),
        kv,
    );
    cache
        .get_or_load("bench", "k", || async { Ok(value()) })
        .await
        .ok();
    let moka: moka::future::Cache<String, Bytes> = moka::future::Cache::new(10_000);
    moka.insert("bench:k".to_owned(), value()).await;
    let (o, r, ratio) = paired(
        N,
        || async {
            let r = cache
                .get_or_load("bench", "k", || async { Ok(value()) })
                .await;
            std::hint::black_box(&r);
        },
        || async {
            let r = moka.get("bench:k").await;
            std::hint::black_box(&r);
        },
    )
    .await;
    println!(
        "1. L1 hit: get_or_load {o:.0} ns/op vs raw moka get {r:.0} ns/op = {ratio:.2}x (median of {ROUNDS} paired rounds; goal <= 1.5x)"
    );
}

/// Rounds of each benchmark: they alternate ours and the baseline, the ratio is taken per
/// round (neighbours in time see the same machine) and the median reported, so one noisy
/// round cannot decide.
const ROUNDS: usize = 9;

/// `n` sequential calls of `ours`, then of `raw`, `ROUNDS` times: median ns/op of each and
/// the median per-round ratio.
async fn paired<A, FA, B, FB>(n: u32, mut ours: A, mut raw: B) -> (f64, f64, f64)
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = ()>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = ()>,
{
    let (mut o, mut r, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..n {
            ours().await;
        }
        let a = t.elapsed().as_nanos() as f64 / f64::from(n);
        let t = Instant::now();
        for _ in 0..n {
            raw().await;
        }
        let b = t.elapsed().as_nanos() as f64 / f64::from(n);
        o.push(a);
        r.push(b);
        ratios.push(a / b);
    }
    (median(o), median(r), median(ratios))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn l2_hit() {
    const N: u32 = 2_000;
    let Some(url) = bulwark_tests::services::redis_url() else {
        println!("2. L2 hit: skipped (no BULWARK_TEST_REDIS_URL)");
        return;
    };
    let mut rcfg = bulwark_tests::services::default_settings().kernel.redis;
    rcfg.url = Some(bulwark_kernel::config::SecretUrl::new(url.clone()));
    rcfg.key_prefix = format!("{}:", bulwark_tests::services::unique("bench"));
    let prefix = rcfg.key_prefix.clone();
    let kv: Arc<dyn KvStore> = match bulwark_kernel::kv::redis::RedisStore::connect(&rcfg).await {
        Ok(k) => Arc::new(k),
        Err(e) => {
            println!("2. L2 hit: skipped ({e})");
            return;
        }
    };
    // An L2-only namespace (`l1 = false`): every lookup goes to Redis.
    let mut p = policy(Strategy::Swr, Duration::from_secs(3600));
    p.l1 = false;
    let cache = Cache::new(&config(64 << 20, p), kv.clone());
    cache
        .get_or_load("bench", "k", || async { Ok(value()) })
        .await
        .ok();
    use fred::interfaces::{ClientLike as _, KeysInterface as _};
    let fred = match fred::types::config::Config::from_url(&url) {
        Ok(c) => fred::clients::Client::new(c, None, None, None),
        Err(e) => {
            println!("2. L2 hit: skipped ({e})");
            return;
        }
    };
    if fred.init().await.is_err() {
        println!("2. L2 hit: skipped (fred connect)");
        return;
    }
    let raw_key = format!("{prefix}cache:bench:k");
    let raw_get = || async {
        let r: Result<Option<Bytes>, _> = fred.get(&raw_key).await;
        std::hint::black_box(&r);
    };
    let (o, r, ratio) = paired(
        N,
        || async {
            let r = cache
                .get_or_load("bench", "k", || async { Ok(value()) })
                .await;
            std::hint::black_box(&r);
        },
        raw_get,
    )
    .await;
    println!(
        "2. L2 hit: get_or_load {:.1} us/op vs raw fred GET {:.1} us/op = {ratio:.2}x (median of {ROUNDS} paired rounds; goal <= 1.2x)",
        o / 1000.0,
        r / 1000.0
    );
    // Where the difference lies: the store's own GET (prefix, timeout, metrics) against fred.
    let (s, r, ratio) = paired(
        N,
        || async {
            let r = kv.get("cache:bench:k").await;
            std::hint::black_box(&r);
        },
        raw_get,
    )
    .await;
    println!(
        "   of which the store: RedisStore::get {:.1} us/op vs raw fred GET {:.1} us/op = {ratio:.2}x",
        s / 1000.0,
        r / 1000.0
    );
    if std::env::var_os("BENCH_CACHE_LAYERS").is_some() {
        l2_layers(&url, &raw_key, &fred).await;
    }
    let _ = fred.quit().await;
}

/// Which layer of the store's client costs what (set BENCH_CACHE_LAYERS=1).
async fn l2_layers(url: &str, key: &str, plain: &fred::clients::Client) {
    use fred::interfaces::{ClientLike as _, KeysInterface as _};
    use fred::prelude::*;
    const N: u32 = 2_000;
    let timeout = Duration::from_secs(2);
    let Ok(config) = Config::from_url(url) else {
        return;
    };
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 5_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
        });
    let Ok(built) = builder.build() else { return };
    if built.init().await.is_err() {
        return;
    }
    let opts = built.with_options(&Options {
        fail_fast: true,
        timeout: Some(timeout),
        ..Options::default()
    });
    let layers: [(&str, u8); 4] = [
        ("configured like the store", 1),
        ("+ with_options(fail_fast, timeout)", 2),
        ("+ tokio timeout", 3),
        ("with_options, no default_command_timeout", 4),
    ];
    // Fred's defaults (no default_command_timeout), per-command options only.
    let bare = Builder::from_config(Config::from_url(url).unwrap_or_default())
        .build()
        .ok();
    if let Some(b) = &bare {
        let _ = b.init().await;
    }
    let bare_opts = bare.as_ref().map(|b| {
        b.with_options(&Options {
            fail_fast: true,
            timeout: Some(timeout),
            ..Options::default()
        })
    });
    for (name, layer) in layers {
        let (o, r, ratio) = paired(
            N,
            || async {
                let r: Result<Option<Bytes>, Error> = match layer {
                    1 => built.get(key).await,
                    2 => opts.get(key).await,
                    3 => tokio::time::timeout(timeout, opts.get(key))
                        .await
                        .unwrap_or(Ok(None)),
                    _ => match &bare_opts {
                        Some(b) => b.get(key).await,
                        None => Ok(None),
                    },
                };
                std::hint::black_box(&r);
            },
            || async {
                let r: Result<Option<Bytes>, _> = plain.get(key).await;
                std::hint::black_box(&r);
            },
        )
        .await;
        println!(
            "   layer {name}: {:.1} us/op vs plain {:.1} = {ratio:.2}x",
            o / 1000.0,
            r / 1000.0
        );
    }
    let _ = built.quit().await;
}

async fn http_hit() {
    let Some(app) = TestAppBuilder::new(Backend::Embedded)
        .set("telemetry.log_level", "error")
        .set("cache.namespaces.bench.class", "expensive")
        .set("cache.namespaces.bench.reason", "benchmark")
        .set("cache.namespaces.bench.ttl", "1h")
        .set("cache.queries.answer.namespace", "bench")
        .set("cache.queries.answer.sql", "SELECT :n + 1 AS answer")
        .set(
            "cache.queries.answer.params",
            serde_json::json!([{"name": "n", "type": "int"}]),
        )
        .spawn()
        .await
        .ok()
        .flatten()
    else {
        println!("3. HTTP: skipped (app did not start)");
        return;
    };
    let token = app.token(Role::Viewer);
    let query = app.url("/api/cache/queries/answer?n=41");
    let livez = app.url("/livez");
    let _ = app
        .get("/api/cache/queries/answer?n=41", Some(&token))
        .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_default();
    let run = |url: String, auth: Option<String>| {
        let client = client.clone();
        async move {
            let done = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let (client, url, auth, done, stop) = (
                    client.clone(),
                    url.clone(),
                    auth.clone(),
                    done.clone(),
                    stop.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let mut req = client.get(&url);
                        if let Some(t) = &auth {
                            req = req.bearer_auth(t);
                        }
                        if let Ok(r) = req.send().await
                            && r.status().is_success()
                            && r.bytes().await.is_ok()
                        {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let t = Instant::now();
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
        }
    };
    let mut q = Vec::new();
    let mut l = Vec::new();
    for _ in 0..3 {
        q.push(run(query.clone(), Some(token.clone())).await);
        l.push(run(livez.clone(), None).await);
    }
    let (q, l) = (median(q), median(l));
    println!(
        "3. HTTP, 64 connections: named-query hit {q:.0} req/s vs /livez {l:.0} req/s = {:.2}x (goal >= 0.7x)",
        q / l
    );
}

async fn stampede() {
    let Some(db) = bulwark_tests::services::TestDatabase::postgres()
        .await
        .ok()
        .flatten()
    else {
        println!("4. loads per expiry: skipped (no PostgreSQL)");
        return;
    };
    let mut dcfg = bulwark_tests::services::default_settings().kernel.database;
    dcfg.max_connections = 50;
    let Ok(conn) = bulwark_kernel::db::connect_url(&db.url, &dcfg).await else {
        println!("4. loads per expiry: skipped (connect)");
        return;
    };
    let kv: Arc<dyn KvStore> = match bulwark_tests::services::redis_url() {
        Some(url) => {
            let mut rcfg = bulwark_tests::services::default_settings().kernel.redis;
            rcfg.url = Some(bulwark_kernel::config::SecretUrl::new(url));
            rcfg.key_prefix = format!("{}:", bulwark_tests::services::unique("bench"));
            match bulwark_kernel::kv::redis::RedisStore::connect(&rcfg).await {
                Ok(k) => Arc::new(k),
                Err(_) => Arc::new(bulwark_kernel::kv::memory::MemoryStore::new()),
            }
        }
        None => Arc::new(bulwark_kernel::kv::memory::MemoryStore::new()),
    };
    for n in [1_000usize, 5_000, 10_000] {
        let cache = Cache::new(
            &config(64 << 20, policy(Strategy::Lock, Duration::from_secs(3600))),
            kv.clone(),
        );
        let queries = Arc::new(AtomicUsize::new(0));
        let key = bulwark_tests::services::unique("cold");
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (cache, conn, queries, key, barrier) = (
                cache.clone(),
                conn.clone(),
                queries.clone(),
                key.clone(),
                barrier.clone(),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_load("bench", &key, move || async move {
                        queries.fetch_add(1, Ordering::SeqCst);
                        conn.execute(Statement::from_string(
                            conn.get_database_backend(),
                            "SELECT pg_sleep(0.1)".to_owned(),
                        ))
                        .await
                        .map(|_| value())
                        .map_err(|e| e.to_string())
                    })
                    .await
                    .is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                ok += 1;
            }
        }
        let cached_time = t.elapsed();
        // Naive baseline: every request queries (a fast query, or this would take minutes).
        let naive = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (conn, naive) = (conn.clone(), naive.clone());
            tasks.push(tokio::spawn(async move {
                naive.fetch_add(1, Ordering::SeqCst);
                conn.execute(Statement::from_string(
                    conn.get_database_backend(),
                    "SELECT 1".to_owned(),
                ))
                .await
                .is_ok()
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        println!(
            "4. {n} concurrent requests on one cold key: {} database queries ({ok} answered in {:.2} s) vs naive {} queries in {:.2} s (goal: exactly 1)",
            queries.load(Ordering::SeqCst),
            cached_time.as_secs_f64(),
            naive.load(Ordering::SeqCst),
            t.elapsed().as_secs_f64()
        );
    }
}

async fn memory_accounting() {
    const N: usize = 1_000_000;
    // L2 must not hold the entries in this process, or the RSS growth would count them twice.
    let kv: Arc<dyn KvStore> = Arc::new(NoL2(bulwark_kernel::kv::memory::MemoryStore::new()));
    let cache = Cache::new(
        &config(4 << 30, policy(Strategy::Swr, Duration::from_secs(3600))),
        kv,
    );
    let before = rss_bytes();
    for i in 0..N {
        let _ = cache
            .get_or_load("bench", &format!("key-{i:08}"), || async { Ok(value()) })
            .await;
    }
    let accounted = cache.l1_bytes().await;
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    println!(
        "5. 1M entries (100-byte values): L1 accounts {:.1} MiB; RSS grew {:.1} MiB = {:.2}x (goal: within 10%)",
        accounted as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        growth as f64 / accounted.max(1) as f64
    );
}

/// A shared tier that stores nothing (reads miss), so that only L1 grows in this process: the
/// measuring device of benchmark 5. Everything else is the in-process store's.
struct NoL2(bulwark_kernel::kv::memory::MemoryStore);

#[async_trait::async_trait]
impl KvStore for NoL2 {
    fn kind(&self) -> &'static str {
        "none"
    }
    async fn get(&self, _key: &str) -> Result<Option<Bytes>, KvError> {
        Ok(None)
    }
    async fn set(&self, _key: &str, _v: Bytes, _ttl: Option<Duration>) -> Result<(), KvError> {
        Ok(())
    }
    async fn set_nx(&self, k: &str, v: Bytes, t: Option<Duration>) -> Result<bool, KvError> {
        self.0.set_nx(k, v, t).await
    }
    async fn delete(&self, k: &str) -> Result<bool, KvError> {
        self.0.delete(k).await
    }
    async fn ttl(&self, k: &str) -> Result<Option<Duration>, KvError> {
        self.0.ttl(k).await
    }
    async fn try_lock(&self, k: &str, l: Duration) -> Result<Option<LockGuard>, KvError> {
        self.0.try_lock(k, l).await
    }
    async fn extend_lock(&self, g: &LockGuard, l: Duration) -> Result<bool, KvError> {
        self.0.extend_lock(g, l).await
    }
    async fn release_lock(&self, g: &LockGuard) -> Result<bool, KvError> {
        self.0.release_lock(g).await
    }
    async fn current_fencing_token(&self, k: &str) -> Result<u64, KvError> {
        self.0.current_fencing_token(k).await
    }
    async fn publish(&self, c: &str, p: Bytes) -> Result<(), KvError> {
        self.0.publish(c, p).await
    }
    async fn subscribe(
        &self,
        c: &str,
    ) -> Result<futures::stream::BoxStream<'static, Bytes>, KvError> {
        self.0.subscribe(c).await
    }
    async fn presence_heartbeat(&self, s: &str, m: &str, t: Duration) -> Result<(), KvError> {
        self.0.presence_heartbeat(s, m, t).await
    }
    async fn presence_remove(&self, s: &str, m: &str) -> Result<(), KvError> {
        self.0.presence_remove(s, m).await
    }
    async fn presence_members(&self, s: &str) -> Result<Vec<String>, KvError> {
        self.0.presence_members(s).await
    }
    async fn health(&self) -> Result<(), KvError> {
        Ok(())
    }
    async fn memory(&self) -> Result<(u64, Option<u64>), KvError> {
        Ok((0, None))
    }
}

#[tokio::main]
async fn main() {
    println!("bench-cache: release build, one process; baselines run in the same process");
    // The production recorder, so the cache's metrics cost here what they cost in service.
    if let Err(e) = bulwark_kernel::telemetry::prometheus() {
        println!("metrics recorder not installed: {e}");
    }
    // `bench-cache l1 http` runs only those; no arguments runs all five.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let on = |name: &str| only.is_empty() || only.iter().any(|a| a == name);
    if on("memory") {
        memory_accounting().await;
    }
    if on("l1") {
        l1_hit().await;
    }
    if on("l2") {
        l2_hit().await;
    }
    if on("http") {
        http_hit().await;
    }
    if on("stampede") {
        stampede().await;
    }
}
